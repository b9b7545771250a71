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


def _autocast_outputs(model, loss_fn, x, y, dtype):
    with torch.autocast("cpu", dtype=dtype):
        logits = model(x)
        loss = loss_fn(logits, y)
    loss.backward()
    return logits.float(), loss.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_autocast_on_the_cpu_matches_native_or_names_the_dtype(name, dtype):
    """--amp on the CPU: handgrad's ops follow native's autocast policy (conv, attention
    and LSTM in the low-precision dtype, cross-entropy in float32). An op without CPU
    kernels for that dtype must say so; it must never return something else."""
    recipe = models.recipe(name)
    torch.manual_seed(0)
    native = recipe.build().eval()
    mine = models.apply_backend(copy.deepcopy(native), "handgrad")
    x, y = tiny_batch(recipe)
    try:
        ref_logits, ref_loss = _autocast_outputs(
            native, models.apply_backend(recipe.losses()["cross_entropy"], "native"), x, y, dtype)
    except RuntimeError as e:
        # e.g. native nn.LSTM under CPU autocast float16: "could not create a primitive
        # descriptor for the LSTM forward propagation primitive" (oneDNN): no reference.
        pytest.skip("native PyTorch cannot run %s under CPU autocast %s: %s"
                    % (name, dtype, str(e).splitlines()[0][:120]))
    try:
        logits, loss = _autocast_outputs(
            mine, models.apply_backend(recipe.losses()["cross_entropy"], "handgrad"), x, y, dtype)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        assert "handgrad::" in str(e) and any(n in str(e) for n in ("BFloat16", "bfloat16", "Half",
                                                                    "float16")), str(e)
        return
    # Both sides round to the low-precision dtype at different points (8 mantissa bits for bf16).
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(logits, ref_logits, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(loss, ref_loss, atol=tolerance, rtol=tolerance)
    for (n, p), q in zip(native.named_parameters(), mine.parameters()):
        assert q.grad is not None and q.grad.dtype == torch.float32, n
        assert torch.isfinite(q.grad).all(), n


def test_a_training_run_on_the_emulated_cuda_kernels_matches_the_cpu_run(data_root, tmp_path):
    """The CUDA code path of `handgrad train` without a GPU: the same tiny mnist_cnn run
    with every handgrad op on its CPU kernels and on its CUDA kernels (emulator)."""
    from handgrad import cuda_emulation

    if not cuda_emulation.available():
        pytest.skip("handgrad was built without its CUDA emulation module")
    runs = []
    for emulated in (False, True):
        config = TrainConfig(model="mnist_cnn", data_root=data_root, epochs=1, batch_size=16,
                             limit=48, out=str(tmp_path / str(emulated)), progress=False,
                             device="cpu")
        run = Run(config, log=lambda *a: None)
        # Plain SGD: its step is linear in the gradient, so the two runs stay
        # rounding-close. Adam's first steps are about lr * sign(gradient), and a
        # gradient element that is rounding noise around zero flips sign between
        # the CPU and CUDA kernels, moving that weight by 2 lr in one run only.
        sgd = torch.optim.SGD(run.model.parameters(), lr=0.05)
        sgd.param_groups[0]["initial_lr"] = 0.05
        run.optimizers = {"model": sgd}
        if emulated:
            with cuda_emulation.emulated():
                cuda_emulation.reset_launch_statistics()
                history = run.fit()
                launched = cuda_emulation.launch_statistics()
            assert any("conv2d" in k for k in launched) and any("max_pool" in k for k in launched)
        else:
            history = run.fit()
        runs.append((history, run.model.state_dict()))
    (cpu_history, cpu_weights), (cuda_history, cuda_weights) = runs
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert cuda_history[0][key] == pytest.approx(cpu_history[0][key], rel=1e-4, abs=1e-5), key
    for name in cpu_weights:
        torch.testing.assert_close(cuda_weights[name], cpu_weights[name], atol=1e-4, rtol=1e-3,
                                   msg=name)


def test_device_auto_is_the_cpu_without_a_usable_gpu():
    from handgrad.training.trainer import resolve_device

    expected = "cuda" if torch.cuda.is_available() and \
        __import__("handgrad").info()["cuda_kernels_compiled"] else "cpu"
    assert resolve_device("auto", "handgrad").type == expected
    assert resolve_device("cpu", "handgrad") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        resolve_device("mps", "native")


def test_checkpoints_load_onto_the_cpu_without_running_code(tmp_path, monkeypatch):
    """map_location="cpu" lets a checkpoint written on a GPU resume anywhere;
    weights_only=True refuses anything but tensors and plain data."""
    from handgrad.training import checkpoint

    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    checkpoint.save_checkpoint(str(tmp_path), {k: 0 for k in checkpoint.REQUIRED_KEYS})
    assert checkpoint.load_checkpoint(str(tmp_path))["epoch"] == 0
    assert seen == {"map_location": "cpu", "weights_only": True}
