"""Autoencoders, the VAE and the GAN: steps, backend agreement, pictures."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from handgrad import models
from handgrad.training.trainer import Run, TrainConfig
from synthetic_data import write_mnist
from test_train_cli import train

GENERATIVE = ["mnist_ae", "mnist_cae", "mnist_cae_skip", "mnist_vae", "mnist_gan"]


def tiny_images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def outputs(name, model, x):
    if name == "mnist_gan":
        torch.manual_seed(1)
        return torch.cat([model.discriminator(x).flatten(), model.sample(len(x)).flatten()])
    out = model(x)
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", GENERATIVE)
def test_forward_and_backward_on_a_tiny_batch(name):
    recipe = models.recipe(name)
    model = models.build(name, "handgrad")
    images, labels = tiny_images()
    x, _ = recipe.prepare(images, labels, train=True, generator=None)
    outputs(name, model, x).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", GENERATIVE)
def test_both_backends_give_the_same_outputs(name):
    recipe = models.recipe(name)
    torch.manual_seed(0)
    native = recipe.build().eval()
    mine = models.apply_backend(copy.deepcopy(native), "handgrad")
    images, labels = tiny_images()
    x, _ = recipe.prepare(images, labels, train=False, generator=None)
    a, b = outputs(name, native, x), outputs(name, mine, x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(native.named_parameters(), mine.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_skip_connections_feed_the_decoder():
    model = models.recipe("mnist_cae_skip").build()
    plain = models.recipe("mnist_cae").build()
    plain.load_state_dict(model.state_dict())  # same weights, different wiring
    x = torch.rand(2, 1, 28, 28)
    assert not torch.allclose(model(x), plain(x))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp("data")), train=256, test=64)


@pytest.mark.parametrize("name, noise", [("mnist_ae", 0.0), ("mnist_cae", 0.0),
                                         ("mnist_cae_skip", 0.3), ("mnist_vae", 0.0)])
def test_a_few_steps_lower_the_loss(name, noise, data_root, tmp_path):
    run = Run(TrainConfig(model=name, data_root=data_root, epochs=2, batch_size=32, lr=3e-3,
                          noise=noise, out=str(tmp_path), progress=False), log=lambda *a: None)
    before, _ = run.evaluate()
    history = run.fit()
    assert history[-1]["test_loss"] < before["test_loss"]


def test_gan_steps_give_finite_losses_and_move_the_generator(data_root, tmp_path):
    run = Run(TrainConfig(model="mnist_gan", data_root=data_root, epochs=1, batch_size=32,
                          d_steps=2, out=str(tmp_path), progress=False), log=lambda *a: None)
    before = [p.detach().clone() for p in run.model.generator.parameters()]
    d_before = [p.detach().clone() for p in run.model.discriminator.parameters()]
    (record,) = run.fit()
    for key in ("train_d_loss", "train_g_loss", "test_d_loss", "test_g_loss"):
        assert torch.isfinite(torch.tensor(record[key])), key
    assert 0 < record["train_D_x"] < 1 and 0 < record["train_D_G_z"] < 1
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, run.model.discriminator.parameters()))


def _assert_pngs(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        assert os.path.exists(path), name
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_cli_denoising_autoencoder_pictures(data_root, tmp_path):
    plain, skip = str(tmp_path / "cae"), str(tmp_path / "skip")
    quick = ["--data-root", data_root, "--epochs", "2", "--batch-size", "64", "--no-progress"]
    proc = train("mnist_cae", "--out", plain, "--noise", "0.3", *quick)
    assert "test_mse_vs_noisy_input" in proc.stdout
    train("mnist_cae_skip", "--out", skip, "--noise", "0.3", *quick)
    for folder in (plain, skip):
        _assert_pngs(folder, ["reconstructions.png", "embedding.png", "loss_curves.png"])
    out = str(tmp_path / "skip_vs_plain.png")
    subprocess.run([sys.executable, "-m", "handgrad", "compare", plain, skip, "--labels",
                    "no skip,skip", "--out", out], check=True, capture_output=True)
    _assert_pngs(str(tmp_path), ["skip_vs_plain.png"])


def test_cli_gan_and_vae_pictures(data_root, tmp_path):
    gan, vae = str(tmp_path / "gan"), str(tmp_path / "vae")
    quick = ["--data-root", data_root, "--epochs", "2", "--batch-size", "64", "--no-progress"]
    proc = train("mnist_gan", "--out", gan, "--d-steps", "2", *quick)
    assert "train_D_x" in proc.stdout and "train_D_G_z" in proc.stdout
    _assert_pngs(gan, ["gan_samples_epoch_01.png", "gan_samples_epoch_02.png", "gan_losses.png",
                       "gan_d_outputs.png", "loss_curves.png"])
    proc = train("mnist_vae", "--out", vae, *quick)
    assert "train_kl" in proc.stdout and "train_reconstruction" in proc.stdout
    _assert_pngs(vae, ["vae_samples.png", "vae_interpolation.png", "reconstructions.png"])
