"""The classifier models: forward/backward, backend agreement, learning."""

import copy

import pytest
import torch

from handgrad import models
from handgrad.training.trainer import Run, TrainConfig
from synthetic_data import write_cifar10_tree, write_mnist

CLASSIFIERS = ["lenet5", "cifar_cnn", "mnist_cnn", "lstm_mnist", "vit_mnist"]


def tiny_batch(recipe, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 32, 32) if recipe.dataset == "cifar10" else (n, 1, 28, 28)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return recipe.prepare(images, labels, train=False, generator=g)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_and_backward_on_a_tiny_batch(name):
    recipe = models.recipe(name)
    model = models.build(name, "handgrad")
    loss_fn = models.apply_backend(recipe.losses()["cross_entropy"], "handgrad")
    x, y = tiny_batch(recipe)
    logits = model(x)
    assert logits.shape == (len(y), 10)
    loss_fn(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_both_backends_give_the_same_outputs_and_gradients(name):
    recipe = models.recipe(name)
    torch.manual_seed(0)
    native = recipe.build().eval()  # eval: dropout off, batch norm on running stats
    mine = models.apply_backend(copy.deepcopy(native), "handgrad")
    assert type(mine) is type(native)
    ops = [type(m).__module__ for m in mine.modules()]
    assert any(m.startswith("handgrad.nn") for m in ops), "nothing was patched"
    x, y = tiny_batch(recipe)
    outputs, grads = [], []
    for model, backend in ((native, "native"), (mine, "handgrad")):
        loss_fn = models.apply_backend(recipe.losses()["cross_entropy"], backend)
        logits = model(x)
        loss_fn(logits, y).backward()
        outputs.append(logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(str(root), train=256, test=128)
    write_cifar10_tree(str(root), train=200, test=100)
    return str(root)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_a_short_training_run_lowers_the_loss(name, data_root, tmp_path):
    lr = {"lenet5": 0.01}.get(name)  # SGD at the tutorial's 0.001 needs more than a few steps
    run = Run(TrainConfig(model=name, data_root=data_root, epochs=3, batch_size=32, lr=lr,
                          out=str(tmp_path), progress=False), log=lambda *a: None)
    before, _ = run.evaluate()
    history = run.fit()
    assert history[-1]["test_loss"] < before["test_loss"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
