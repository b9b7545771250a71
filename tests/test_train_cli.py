"""`handgrad train` end to end on tiny synthetic data, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from handgrad.training.recipe import random_crop_flip, schedule_factor

from synthetic_data import write_cifar10_tree, write_mnist

QUICK = ["--epochs", "3", "--batch-size", "32", "--threads", "1", "--no-progress"]


def train(*args, env=None, expect=0):
    proc = subprocess.run([sys.executable, "-m", "handgrad", "train", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)
    if expect is not None:
        assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_mnist(root, train=192, test=64)
    write_cifar10_tree(root, train=96, test=40)
    return root


def learning_curve(out):
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    keep = ("epoch", "train_loss", "test_loss", "test_accuracy")
    return metrics, [{k: h[k] for k in keep} for h in metrics["history"]]


def test_train_writes_metrics_checkpoint_and_plots(data_root, tmp_path):
    out = str(tmp_path / "run")
    proc = train("mnist_cnn", "--data-root", data_root, "--out", out, *QUICK)
    assert "epoch 3/3" in proc.stdout and "test_accuracy" in proc.stdout
    metrics, curve = learning_curve(out)
    assert metrics["backend"] == "handgrad" and metrics["epochs_done"] == 3
    assert len(curve) == 3 and curve[-1]["train_loss"] < curve[0]["train_loss"]
    assert len(metrics["running_loss"]) >= 3
    assert len(metrics["confusion_matrix"]) == 10
    for picture in ("loss_curves.png", "confusion_matrix.png", "first_layer_filters.png"):
        path = os.path.join(out, picture)
        assert os.path.getsize(path) > 1000, picture
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_killed_run_resumes_to_the_same_metrics(data_root, tmp_path, schedule):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    quick = [*QUICK, "--lr-schedule", schedule]
    train("mnist_cnn", "--data-root", data_root, "--out", whole, *quick)
    # 192 images at batch 32 = 6 batches per epoch: die in the middle of epoch 2.
    proc = train("mnist_cnn", "--data-root", data_root, "--out", broken, *quick,
                 env={"HANDGRAD_CRASH_AFTER_BATCHES": "9"}, expect=None)
    assert proc.returncode == -9, proc.stderr
    _, partial = learning_curve(broken)
    assert len(partial) == 1
    proc = train("mnist_cnn", "--data-root", data_root, "--out", broken, "--resume", *quick)
    assert "resumed" in proc.stdout
    assert learning_curve(broken)[1] == learning_curve(whole)[1]


def test_resume_with_different_settings_is_refused(data_root, tmp_path):
    out = str(tmp_path / "run")
    train("mnist_cnn", "--data-root", data_root, "--out", out, "--epochs", "1", "--batch-size",
          "64", "--no-progress")
    proc = train("mnist_cnn", "--data-root", data_root, "--out", out, "--resume", "--epochs", "2",
                 "--batch-size", "32", "--no-progress", expect=2)
    assert "batch_size=64 (now 32)" in proc.stderr


def test_augment_changes_training_and_must_match_on_resume(data_root, tmp_path):
    plain, augmented = str(tmp_path / "plain"), str(tmp_path / "augmented")
    one_epoch = ["--epochs", "1", "--batch-size", "32", "--threads", "1", "--no-progress"]
    train("mnist_cnn", "--data-root", data_root, "--out", plain, *one_epoch)
    train("mnist_cnn", "--data-root", data_root, "--out", augmented, "--augment", "crop-flip",
          *one_epoch)
    assert learning_curve(plain)[1][0]["train_loss"] != learning_curve(augmented)[1][0]["train_loss"]
    proc = train("mnist_cnn", "--data-root", data_root, "--out", augmented, "--resume",
                 "--epochs", "2", "--batch-size", "32", "--no-progress", expect=2)
    assert "augment='crop-flip' (now 'none')" in proc.stderr
    proc = train("mnist_cnn", "--data-root", data_root, "--out", augmented, "--resume",
                 "--epochs", "2", "--batch-size", "32", "--no-progress", "--augment", "flip",
                 expect=2)
    assert "augment='crop-flip' (now 'flip')" in proc.stderr


def test_flip_and_crop_flip_move_pixels_only_as_named():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    flipped = random_crop_flip(x, generator, padding=0)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    cropped = random_crop_flip(x, generator, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image, source in zip(cropped, padded):
        windows = [source[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(image, w) or torch.equal(image, w.flip(2)) for w in windows)
    assert not torch.equal(cropped, x)


def test_schedule_factor():
    assert schedule_factor("constant", 0.0) == schedule_factor("constant", 0.9) == 1.0
    assert schedule_factor("cosine", 0.0) == 1.0
    assert schedule_factor("cosine", 0.5) == pytest.approx(0.5)
    assert schedule_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    steps = [schedule_factor("cosine", t / 10) for t in range(11)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        schedule_factor("step", 0.5)


def test_cosine_schedule_anneals_the_learning_rate_and_must_match_on_resume(data_root, tmp_path):
    out = str(tmp_path / "cosine")
    train("mnist_cnn", "--data-root", data_root, "--out", out, "--epochs", "2", "--batch-size",
          "32", "--threads", "1", "--no-progress", "--lr-schedule", "cosine")
    metrics, _ = learning_curve(out)
    assert metrics["lr_schedule"] == "cosine"
    group = torch.load(os.path.join(out, "checkpoint.pt"),
                       weights_only=False)["optimizers"]["model"]["param_groups"][0]
    # The last of 2 x 6 batches ran at progress 11/12 of the run.
    assert group["initial_lr"] == 1e-3
    assert group["lr"] == pytest.approx(1e-3 * schedule_factor("cosine", 11 / 12))
    proc = train("mnist_cnn", "--data-root", data_root, "--out", out, "--resume", "--epochs", "3",
                 "--batch-size", "32", "--no-progress", expect=2)
    assert "lr_schedule='cosine' (now 'constant')" in proc.stderr
    proc = train("mnist_cnn", "--data-root", data_root, "--out", out, "--resume", "--epochs", "3",
                 "--batch-size", "32", "--no-progress", "--lr-schedule", "cosine", expect=2)
    assert "annealed_over_epochs=2 (now 3)" in proc.stderr


def test_cifar_image_folder_and_native_backend(data_root, tmp_path):
    out = str(tmp_path / "lenet")
    proc = train("lenet5", "--data-root", data_root, "--out", out, "--backend", "native",
                 "--epochs", "1", "--no-progress")
    metrics, curve = learning_curve(out)
    assert metrics["backend"] == "native" and "ImageFolder" in metrics["train_data"]
    assert len(curve) == 1 and "epoch 1/1" in proc.stdout


def test_epoch_times_benchmark_trains_both_backends_interleaved(data_root):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks", "epoch_times.py")
    proc = subprocess.run([sys.executable, script, "--data-root", data_root, "--limit", "96",
                           "--threads", "1", "--models", "mnist_cnn"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith("| mnist_cnn |")]
    assert len(row) == 1, proc.stdout
    native, mine, ratio, step_ratio = (float(v) for v in row[0].strip("| ").split("|")[1:])
    assert native > 0 and mine > 0 and step_ratio > 0
    assert ratio == pytest.approx(mine / native, rel=0.05)  # the table rounds to whole img/s


@pytest.mark.parametrize("args, message", [
    (["resnet"], "unknown model 'resnet'; valid models: cifar_cnn, lenet5"),
    (["mnist_cnn", "--epochs", "0"], "--epochs must be positive"),
    (["mnist_cnn", "--batch-size", "-3"], "--batch-size must be positive"),
    (["mnist_cnn", "--data-root", "/no/such/folder"], "data root /no/such/folder does not exist"),
    (["mnist_cnn", "--epochs", "many"], "invalid int value"),
    (["mnist_cnn", "--lr-schedule", "step"], "invalid choice: 'step'"),
    (["mnist_cnn", "--augment", "rotate"], "invalid choice: 'rotate'"),
])
def test_bad_arguments_give_a_one_line_error(args, message):
    proc = train(*args, expect=2)
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_missing_data_names_the_searched_path(tmp_path):
    proc = train("mnist_cnn", "--data-root", str(tmp_path), expect=2)
    assert os.path.join(str(tmp_path), "MNIST", "raw") in proc.stderr
    assert "--data-root" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
