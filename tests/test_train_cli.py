"""`handgrad train` end to end on tiny synthetic data, as a user runs it."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from handgrad.training.recipe import random_crop_flip, schedule_factor

from synthetic_data import write_cifar10_tree, write_mnist

QUICK = ["--epochs", "3", "--batch-size", "32", "--threads", "1", "--no-progress"]


def command_here(command, *args):
    """`handgrad COMMAND ARGS` in this process (the error paths, which stop before
    any training: a subprocess would spend seconds importing torch for each);
    the exit status, stdout and stderr as from a subprocess."""
    import contextlib
    import io

    from handgrad.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([command, *args])
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def train_here(*args):
    return command_here("train", *args)


# Under mutation testing (tools/mutation.py sets HANDGRAD_TEST_TRAIN_IN_PROCESS=1)
# train() runs `handgrad train` in the pytest process: mutmut switches its
# mutants on, and records which tests reach which function, in that process
# only -- a subprocess imports handgrad anew and would see neither, so every
# mutant of the training loop would pass for untested.
IN_PROCESS = os.environ.get("HANDGRAD_TEST_TRAIN_IN_PROCESS") == "1"
needs_subprocess = pytest.mark.skipif(
    IN_PROCESS, reason="kills its own process: cannot run inside pytest's")


def train(*args, env=None, expect=0):
    if IN_PROCESS:
        with mock.patch.dict(os.environ, env or {}):
            proc = train_here(*args)
    else:
        proc = subprocess.run([sys.executable, "-m", "handgrad", "train", *args],
                              capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=600)
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


@needs_subprocess
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_killed_run_resumes_to_the_same_metrics(data_root, tmp_path, schedule):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    quick = [*QUICK, "--lr-schedule", schedule]
    # Bitwise equality across three processes under the default "auto" CPU
    # GEMM policy: the first process measures each product class and stores
    # its choice in the decision file, the other two read it. (Before the
    # file, each process timed the kernels itself; on an AMD Zen 4, where the
    # own kernel and MKL tie, they chose differently and CI saw epoch 3's loss
    # differ in the 8th digit.)
    same_kernels = {"HANDGRAD_CPU_GEMM": "auto",
                    "HANDGRAD_CPU_GEMM_CACHE": str(tmp_path / "cpu_gemm_decisions.txt")}
    train("mnist_cnn", "--data-root", data_root, "--out", whole, *quick, env=same_kernels)
    # 192 images at batch 32 = 6 batches per epoch: die in the middle of epoch 2.
    proc = train("mnist_cnn", "--data-root", data_root, "--out", broken, *quick,
                 env={"HANDGRAD_CRASH_AFTER_BATCHES": "9", **same_kernels}, expect=None)
    assert proc.returncode == -9, proc.stderr
    _, partial = learning_curve(broken)
    assert len(partial) == 1
    proc = train("mnist_cnn", "--data-root", data_root, "--out", broken, "--resume", *quick,
                 env=same_kernels)
    assert "resumed" in proc.stdout
    assert learning_curve(broken)[1] == learning_curve(whole)[1]


def test_resume_with_different_settings_is_refused(data_root, tmp_path):
    out = str(tmp_path / "run")
    train("mnist_cnn", "--data-root", data_root, "--out", out, "--epochs", "1", "--batch-size",
          "64", "--no-progress")
    proc = train("mnist_cnn", "--data-root", data_root, "--out", out, "--resume", "--epochs", "2",
                 "--batch-size", "32", "--seed", "5", "--no-progress", expect=2)
    assert proc.stderr.strip() == ("handgrad train: error: the checkpoint in %s was made with "
                                   "different settings: batch_size=64 (now 32), seed=0 (now 5)"
                                   % out)
    # --resume without a checkpoint starts afresh, and says so
    fresh = str(tmp_path / "fresh")
    proc = train_here("mnist_cnn", "--data-root", data_root, "--out", fresh, "--resume",
                      "--epochs", "1", "--batch-size", "64", "--limit", "64", "--no-progress")
    assert proc.returncode == 0
    assert "no checkpoint in %s; starting from epoch 1\n" % fresh in proc.stdout + proc.stderr


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


def test_float16_loss_scale_is_saved_and_restored():
    from handgrad.training.recipe import Precision

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fp16 = Precision("cpu", "fp16")
    start = fp16.state_dict()["scale"]
    # An overflowing gradient: the step is skipped and the scale halves.
    fp16.step(model(torch.full((2, 3), float("inf"))).sum(), optimizer)
    state = fp16.state_dict()
    assert state["scale"] == start / 2
    resumed = Precision("cpu", "fp16")
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    # A checkpoint of a run without fp16 carries no scaler state: a fresh scale.
    fresh = Precision("cpu", "fp16")
    fresh.load_state_dict({})
    assert fresh.state_dict()["scale"] == start
    # and a run without fp16 has no scaler to restore
    plain = Precision("cpu")
    plain.load_state_dict(state)
    assert plain.state_dict() == {} and plain.scaler is None


def test_augmentation_draws_only_from_its_generator():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = random_crop_flip(x, torch.Generator().manual_seed(7), padding=2)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator untouched
    torch.manual_seed(123)
    b = random_crop_flip(x, torch.Generator().manual_seed(7), padding=2)
    assert torch.equal(a, b)
    c = random_crop_flip(x, torch.Generator().manual_seed(8), padding=2)
    assert not torch.equal(a, c)


def test_limit_subset_is_pinned_and_independent_of_the_global_seed():
    from handgrad.training.data import ImageData

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    data = ImageData(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), labels,
                     ["a", "b", "c"], "toy")
    assert data.subset(10, seed=1) is data and data.subset(11, seed=1) is data
    torch.manual_seed(0)
    first = data.subset(4, seed=3)
    torch.manual_seed(99)
    again = data.subset(4, seed=3)
    assert torch.equal(first.images, again.images) and first.source == "toy[4 class-balanced, seed 3]"
    # one of each class first, in class order, then the second round starts with class 0
    assert first.labels.tolist() == sorted(first.labels.tolist())
    assert sorted(first.labels.tolist()) == [0, 0, 1, 2]
    assert sorted(data.subset(2, seed=3).labels.tolist()) == [0, 1]


def test_one_line_error_text():
    from handgrad.training.cli import _one_line

    assert _one_line(ValueError("two\n   lines  here")) == "two lines here"
    assert _one_line(KeyError()) == "KeyError"


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


# -- bad data, checkpoints and output folders: one line, exit status 2 ----------------------------

def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def copy_tree(source, dest):
    import shutil

    shutil.copytree(source, dest)
    return str(dest)


@pytest.mark.parametrize("change, message", [
    ("remove truck", "the test set lacks truck"),
    ("add zebra", "the test set has zebra, absent from the training set"),
])
def test_cifar_test_classes_must_match_the_training_classes(data_root, tmp_path, change, message):
    import shutil

    root = copy_tree(os.path.join(data_root, "cifar10"), tmp_path / "data" / "cifar10")
    test_dir = os.path.join(root, "test")
    if change == "remove truck":
        shutil.rmtree(os.path.join(test_dir, "truck"))
    else:
        shutil.copytree(os.path.join(test_dir, "cat"), os.path.join(test_dir, "zebra"))
    proc = train_here("lenet5", "--data-root", str(tmp_path / "data"), "--out",
                      str(tmp_path / "o"), *QUICK)
    assert_one_line_error(proc, "training and test classes differ", message)


def mnist_copy(data_root, tmp_path):
    root = tmp_path / "data"
    copy_tree(os.path.join(data_root, "MNIST"), root / "MNIST")
    return str(root), os.path.join(str(root), "MNIST", "raw")


def _rewrite(path, edit):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    with open(path, "wb") as f:
        f.write(edit(data))


@pytest.mark.parametrize("file, edit, message", [
    ("train-labels-idx1-ubyte", lambda d: d[:8 + 100].replace(d[4:8], (100).to_bytes(4, "big")),
     "holds 100 labels for the 192 images"),
    ("t10k-labels-idx1-ubyte", lambda d: d[:-1] + bytes([10]), "holds label 10, outside 0..9"),
    ("train-images-idx3-ubyte", lambda d: (1234).to_bytes(4, "big") + d[4:],
     "is not an MNIST image file: magic number 1234, expected 2051"),
    ("train-images-idx3-ubyte", lambda d: d[:-5], "holds 150523 bytes of data, but its header"),
    ("t10k-images-idx3-ubyte", lambda d: d[:10], "is truncated"),
])
def test_broken_mnist_files_give_a_one_line_error(data_root, tmp_path, file, edit, message):
    root, raw = mnist_copy(data_root, tmp_path)
    _rewrite(os.path.join(raw, file), edit)
    proc = train_here("mnist_cnn", "--data-root", root, "--out", str(tmp_path / "o"), *QUICK)
    assert_one_line_error(proc, file, message)


@pytest.mark.parametrize("defect, message", [
    ("truncated", "cannot decode image"),
    ("odd size", "is 31x32; CIFAR-10 images are 32x32"),
])
def test_broken_cifar_images_give_a_one_line_error(data_root, tmp_path, defect, message):
    from PIL import Image

    root = copy_tree(os.path.join(data_root, "cifar10"), tmp_path / "data" / "cifar10")
    folder = os.path.join(root, "train", "bird")
    victim = os.path.join(folder, sorted(os.listdir(folder))[0])
    if defect == "truncated":
        _rewrite(victim, lambda d: d[:len(d) // 2])
    else:
        Image.new("RGB", (31, 32)).save(victim)
    proc = train_here("lenet5", "--data-root", str(tmp_path / "data"), "--out",
                      str(tmp_path / "o"), *QUICK)
    assert_one_line_error(proc, victim, message)


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    """A complete one-epoch mnist_cnn run whose folder the tests copy and damage."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    train("mnist_cnn", "--data-root", data_root, "--out", out, "--epochs", "1",
          "--batch-size", "64", "--threads", "1", "--no-progress", "--limit", "64")
    return out


def resume(data_root, out, expect=0):
    return train("mnist_cnn", "--data-root", data_root, "--out", out, "--resume", "--epochs", "1",
                 "--batch-size", "64", "--threads", "1", "--no-progress", "--limit", "64",
                 expect=expect)


def resume_here(data_root, out):
    return train_here("mnist_cnn", "--data-root", data_root, "--out", out, "--resume", "--epochs",
                      "1", "--batch-size", "64", "--threads", "1", "--no-progress", "--limit", "64")


class Exploit:
    """Unpickling this runs os.mkdir: a checkpoint that executes code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("damage, message", [
    ("empty", "is empty"),
    ("truncated", "cannot be read (truncated, corrupt, or not a handgrad checkpoint"),
    ("garbage", "cannot be read (truncated, corrupt, or not a handgrad checkpoint"),
    ("missing keys", "lacks model, optimizers"),
    ("other model", "does not fit model mnist_cnn"),
    ("code", "cannot be read"),
])
def test_broken_checkpoints_give_a_one_line_error(data_root, finished_run, tmp_path, damage,
                                                  message):
    out = copy_tree(finished_run, tmp_path / "run")
    path = os.path.join(out, "checkpoint.pt")
    saved = torch.load(path, weights_only=True)
    marker = str(tmp_path / "code-ran")
    if damage == "empty":
        open(path, "wb").close()
    elif damage == "truncated":
        _rewrite(path, lambda d: d[:len(d) // 3])
    elif damage == "garbage":
        _rewrite(path, lambda d: bytes(range(256)) * 4)
    elif damage == "missing keys":
        torch.save({k: v for k, v in saved.items() if k not in ("model", "optimizers")}, path)
    elif damage == "other model":
        saved["model"] = {"weight": torch.zeros(3)}
        torch.save(saved, path)
    else:
        saved["history"] = Exploit(marker)
        torch.save(saved, path)
    proc = resume_here(data_root, out)
    assert_one_line_error(proc, path, message)
    assert not os.path.exists(marker), "--resume ran code stored in the checkpoint"
    # every message ends with the same fix, in these words
    assert proc.stderr.strip().endswith(
        "; delete it to start over, or choose another --out"), proc.stderr
    if damage == "empty":
        assert proc.stderr.strip() == ("handgrad train: error: checkpoint %s is empty; delete it "
                                       "to start over, or choose another --out" % path)
    if damage == "other model":  # the reason: the first line of load_state_dict's error
        assert "does not fit model mnist_cnn (Error(s) in loading state_dict for " in proc.stderr


def test_output_folder_that_cannot_be_written_is_refused_before_training(data_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = train_here("mnist_cnn", "--data-root", data_root, "--out", str(blocker / "run"), *QUICK)
    assert_one_line_error(proc, "cannot write to the output folder --out", str(blocker))
    assert "epoch" not in proc.stdout


def test_resuming_a_finished_run_rewrites_metrics_and_plots(data_root, finished_run, tmp_path):
    """A run killed after its last checkpoint but before its metrics and plots were written."""
    out = copy_tree(finished_run, tmp_path / "run")
    for name in ("loss_curves.png", "confusion_matrix.png"):
        os.unlink(os.path.join(out, name))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"history": [], "epochs_done": 0}, f)
    proc = resume(data_root, out)
    assert "metrics and plots rewritten" in proc.stdout
    metrics, curve = learning_curve(out)
    assert metrics["epochs_done"] == 1 and len(curve) == 1
    for name in ("loss_curves.png", "confusion_matrix.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000


def test_stale_temporary_files_are_removed(data_root, finished_run, tmp_path):
    out = copy_tree(finished_run, tmp_path / "run")
    stale = [os.path.join(out, ".checkpoint.pt.k1ll3d"), os.path.join(out, ".metrics.json.x")]
    for path in stale:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
    proc = resume(data_root, out)
    assert all(not os.path.exists(p) for p in stale)
    assert "removed %s" % stale[0] in proc.stdout
    assert not [f for f in os.listdir(out) if f.startswith(".")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_the_umask_gives(data_root, tmp_path, umask):
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "handgrad", "train", "mnist_cnn", "--data-root",
                           data_root, "--out", out, "--epochs", "1", "--limit", "32",
                           "--no-progress", "--threads", "1"],
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint.pt", "metrics.json", "loss_curves.png"):
        mode = os.stat(os.path.join(out, name)).st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))


# -- --limit, the CIFAR-10 cache, progress bars --------------------------------------------------

def test_limit_takes_a_class_balanced_seeded_subset():
    from handgrad.training.data import ImageData

    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, as an image tree lists them
    data = ImageData(torch.arange(500).view(500, 1, 1, 1).to(torch.uint8), labels,
                     [str(c) for c in range(10)], "sorted")
    subset = data.subset(45, seed=3)
    counts = torch.bincount(subset.labels, minlength=10)
    assert len(subset) == 45 and int(counts.min()) == 4 and int(counts.max()) == 5
    assert torch.equal(subset.labels, data.subset(45, seed=3).labels)
    assert not torch.equal(subset.images, data.subset(45, seed=4).images)
    assert "45 class-balanced, seed 3" in subset.source
    rare = ImageData(data.images[:53], labels[:53], data.classes, "one class and a bit")
    assert torch.bincount(rare.subset(10, seed=0).labels, minlength=2).tolist()[:2] == [7, 3]


def test_limit_on_cifar_trains_on_every_class(data_root, tmp_path):
    out = str(tmp_path / "run")
    train("lenet5", "--data-root", data_root, "--out", out, "--epochs", "1", "--limit", "20",
          "--no-progress")
    metrics, _ = learning_curve(out)
    assert "20 class-balanced, seed 0" in metrics["train_data"]


def test_decoded_cifar_is_cached_and_rebuilt_when_the_folder_changes(data_root, tmp_path,
                                                                     monkeypatch):
    from handgrad.training import data

    root = str(tmp_path / "data")
    copy_tree(os.path.join(data_root, "cifar10"), tmp_path / "data" / "cifar10")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = data.load_cifar10(root, train=False, progress=False)
    cache = os.path.join(root, "cifar10", ".test.handgrad-cache.pt")
    assert os.path.exists(cache)

    def no_decoding(path):
        raise AssertionError("decoded %s although the cache is valid" % path)

    with monkeypatch.context() as m:
        m.setattr(data, "_decode", no_decoding)
        again = data.load_cifar10(root, train=False, progress=False)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    folder = os.path.join(root, "cifar10", "test", "cat")
    os.unlink(os.path.join(folder, sorted(os.listdir(folder))[0]))
    changed = data.load_cifar10(root, train=False, progress=False)
    assert len(changed) == len(first) - 1
    # A data folder where the cache cannot be written: the user's cache folder instead.
    os.unlink(cache)
    os.mkdir(cache)
    data.load_cifar10(root, train=False, progress=False)
    assert len(os.listdir(tmp_path / "xdg" / "handgrad")) == 1


def _tiny_cifar_tree(root, classes=("cat", "dog")):
    """root/cifar10/test/<class>/0.png, one 32x32 RGB image per class."""
    from PIL import Image

    for k, name in enumerate(classes):
        folder = os.path.join(root, "cifar10", "test", name)
        os.makedirs(folder)
        Image.new("RGB", (32, 32), (10 * k, 20, 30)).save(os.path.join(folder, "0.png"))
    return os.path.join(root, "cifar10", "test")


def test_cifar_tree_defects_are_named_exactly(tmp_path, monkeypatch):
    from PIL import Image

    from handgrad.training import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = str(tmp_path / "empty")
    folder = os.path.join(root, "cifar10", "test")
    os.makedirs(folder)
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(root, train=False, progress=False)
    assert str(e.value) == ("%s holds no class folders (expected %s/<class>/*.jpg)"
                            % (folder, folder))
    os.makedirs(os.path.join(folder, "cat", "not-an-image.jpg"))  # a folder named like one
    with open(os.path.join(folder, "cat", "notes.txt"), "w") as f:
        f.write("not an image either")
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(root, train=False, progress=False)
    assert str(e.value) == "no images under %s" % folder
    # A grayscale (or palette, or RGBA) image is converted to RGB, like torchvision's loader.
    Image.new("L", (32, 32), 77).save(os.path.join(folder, "cat", "gray.png"))
    loaded = data.load_cifar10(root, train=False, progress=False)
    assert loaded.images.shape == (1, 3, 32, 32) and bool((loaded.images == 77).all())
    assert loaded.labels.dtype == torch.long and loaded.classes == ["cat"]
    victim = os.path.join(folder, "cat", "small.png")
    Image.new("RGB", (32, 31)).save(victim)
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(root, train=False, progress=False)
    assert str(e.value) == "image %s is 32x31; CIFAR-10 images are 32x32" % victim
    with open(victim, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(data.DataError) as e:
        data.load_cifar10(root, train=False, progress=False)
    assert str(e.value).startswith("cannot decode image %s: " % victim)


def _torchvision_cifar(root, per_batch=2, test=3, extra_label=False, label=None):
    """A tiny <root>/cifar-10-batches-py in torchvision's format (5 training
    batches, a test batch, batches.meta); returns (train, test) as
    (CHW images, labels)."""
    import pickle

    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    g = torch.Generator().manual_seed(3)
    splits = {}
    for split, names, n in (("train", ["data_batch_%d" % k for k in range(1, 6)], per_batch),
                            ("test", ["test_batch"], test)):
        images, labels = [], []
        for name in names:
            data = torch.randint(0, 256, (n, 3 * 32 * 32), dtype=torch.uint8, generator=g)
            batch_labels = torch.randint(0, 10, (n,), generator=g).tolist()
            if label is not None:
                batch_labels[0] = label
            if extra_label and split == "train":
                batch_labels.append(1)
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump({"data": data.numpy(), "labels": batch_labels}, f)
            images.append(data.view(n, 3, 32, 32))
            labels += batch_labels
        splits[split] = torch.cat(images), torch.tensor(labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["class%d" % k for k in range(10)]}, f)
    return splits


def test_torchvision_cifar10_files_are_read(tmp_path, monkeypatch):
    # torchvision checks its files' MD5 sums; these tiny files cannot match,
    # so the check is switched off here -- and left on for the corrupt case.
    import torchvision.datasets.cifar as tv_cifar

    from handgrad.training import data

    root = str(tmp_path / "data")
    expected = _torchvision_cifar(root)
    batches = os.path.join(root, "cifar-10-batches-py")
    with pytest.raises(data.DataError) as e:  # the MD5 check fails: named, one line
        data.load_cifar10(root, train=True, progress=False)
    assert str(e.value).startswith("CIFAR-10 could not be read from %s: " % batches)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    for train, split in ((True, "train"), (False, "test")):
        loaded = data.load_cifar10(root, train=train, progress=False)
        images, labels = expected[split]
        assert loaded.images.shape == images.shape and loaded.images.is_contiguous()
        assert torch.equal(loaded.images, images)  # CHW, as torchvision's bytes are laid out
        assert torch.equal(loaded.labels, labels) and loaded.labels.dtype == torch.long
        assert loaded.classes == ["class%d" % k for k in range(10)]
        assert loaded.source == "CIFAR10(%s)" % root
    for options, message in (
            (dict(extra_label=True), "%s holds 15 labels for 10 images" % batches),
            (dict(label=12), "%s holds label 12, outside 0..9 for its 10 classes" % batches)):
        other = str(tmp_path / str(len(message)))
        _torchvision_cifar(other, **options)
        with pytest.raises(data.DataError) as e:
            data.load_cifar10(other, train=True, progress=False)
        assert str(e.value) == message.replace(root, other)


def test_missing_cifar10_names_both_places_searched(tmp_path):
    from handgrad.training import data

    root = str(tmp_path)
    with pytest.raises(data.DataNotFound) as e:
        data.load_cifar10(root, train=False, progress=False)
    assert str(e.value) == (
        "CIFAR-10 not found: searched %s (an ImageFolder tree) and %s (torchvision's CIFAR-10 "
        "files); point --data-root at the folder that contains one of them (or pass --download)"
        % (os.path.join(root, "cifar10", "test"), os.path.join(root, "cifar-10-batches-py")))
    with pytest.raises(data.DataNotFound, match="^data root %s does not exist"
                       % os.path.join(root, "absent")):
        data.load_cifar10(os.path.join(root, "absent"), train=False, progress=False)


def test_embedding_scatter_plots_each_point_in_its_labels_colour(tmp_path, monkeypatch):
    from handgrad.training import plots

    seen = {}

    def keep(fig, out_dir, name):
        ax = fig.axes[0]
        (points,) = ax.collections
        seen.update(offsets=points.get_offsets().tolist(), colours=points.get_array().tolist(),
                    cmap=points.get_cmap().name, title=ax.get_title(),
                    axes=(ax.get_xlabel(), ax.get_ylabel()), colorbar=len(fig.axes) == 2)
        return name

    monkeypatch.setattr(plots, "_save", keep)
    z = torch.tensor([[0.5, -1.0], [2.0, 3.0], [-4.0, 0.25]])
    assert plots.embedding_scatter(z, torch.tensor([3, 0, 9]), str(tmp_path), "z.png",
                                   "latent") == "z.png"
    assert seen == {"offsets": z.tolist(), "colours": [3, 0, 9], "cmap": "tab10",
                    "title": "latent", "axes": ("z1", "z2"), "colorbar": True}


def test_a_missing_optional_package_is_named_exactly():
    from handgrad.training import data

    with pytest.raises(data.DataError) as e:
        data._optional("handgrad_no_such_package.submodule")
    assert str(e.value) == ("reading this data needs the optional package "
                            "handgrad_no_such_package: pip install handgrad[train]")


def test_cifar_cache_default_location_is_the_users_cache_folder(tmp_path, monkeypatch):
    import hashlib

    from handgrad.training import data

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = str(tmp_path / "data")
    key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    assert data._cache_paths(root, "test") == [
        os.path.join(root, "cifar10", ".test.handgrad-cache.pt"),
        os.path.join(str(tmp_path / "home"), ".cache", "handgrad", "cifar10-%s-test.pt" % key)]
    # One key per data folder: two folders never share a cache file.
    assert data._cache_paths(root + "2", "test")[1] != data._cache_paths(root, "test")[1]


def test_a_cache_file_is_never_unpickled_as_code(tmp_path, monkeypatch):
    # The cache beside the data is written by whoever can write there; loading
    # it must not run code (weights_only). A file that would is skipped like a
    # torn one, and the next place (the user's cache folder) is still read.
    from handgrad.training import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = str(tmp_path / "data")
    _tiny_cifar_tree(root)
    first = data.load_cifar10(root, train=False, progress=False)
    beside, home = data._cache_paths(root, "test")
    os.makedirs(os.path.dirname(home))
    os.replace(beside, home)  # the valid cache now only in the user's folder
    marker = str(tmp_path / "code-ran")
    torch.save({"fingerprint": Exploit(marker)}, beside)

    def no_decoding(path):
        raise AssertionError("decoded %s although a valid cache exists" % path)

    monkeypatch.setattr(data, "_decode", no_decoding)
    again = data.load_cifar10(root, train=False, progress=False)
    assert not os.path.exists(marker)
    assert torch.equal(again.images, first.images) and again.classes == first.classes


def test_progress_bars_for_decoding_training_and_evaluation(data_root, tmp_path):
    root = str(tmp_path / "data")
    copy_tree(os.path.join(data_root, "cifar10"), tmp_path / "data" / "cifar10")
    proc = train("lenet5", "--data-root", root, "--out", str(tmp_path / "run"), "--epochs", "1")
    for bar in ("decoding CIFAR-10 train", "epoch 1/1", "evaluating"):
        assert bar in proc.stderr, bar


# -- handgrad compare ----------------------------------------------------------------------------

def compare_here(*args):
    """`handgrad compare ARGS` in this process: (exit status, stdout, stderr)."""
    proc = command_here("compare", *args)
    return proc.returncode, proc.stdout, proc.stderr


def _fake_run(folder, history):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"history": history}, f)
    return str(folder)


@pytest.fixture
def two_runs(tmp_path):
    a = _fake_run(tmp_path / "fast", [{"epoch": 1, "train_loss": 2.0, "test_accuracy": 0.5},
                                      {"epoch": 2, "train_loss": 1.0, "test_accuracy": 0.7}])
    b = _fake_run(tmp_path / "slow", [{"epoch": 1, "train_loss": 2.5, "test_accuracy": 0.4},
                                      {"epoch": 2, "train_loss": 1.5, "test_accuracy": 0.6},
                                      {"epoch": 3, "train_loss": 1.2, "test_accuracy": 0.65}])
    return a, b


def test_compare_plots_one_curve_per_run(two_runs, tmp_path, monkeypatch):
    from handgrad.training import plots

    figures = []
    real_save = plots._save

    def keep(fig, out_dir, name):
        ax = fig.axes[0]
        figures.append({"curves": [(line.get_label(), list(line.get_xdata()),
                                    list(line.get_ydata())) for line in ax.get_lines()],
                        "title": ax.get_title(), "xlabel": ax.get_xlabel(),
                        "ylabel": ax.get_ylabel(), "legend": ax.get_legend() is not None,
                        "where": (out_dir, name)})
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(plots, "_save", keep)
    out = str(tmp_path / "plots" / "accuracy.png")
    # (a folder given with a trailing separator is still labelled by its name)
    code, stdout, stderr = compare_here(two_runs[0] + os.sep, two_runs[1], "--key",
                                        "test_accuracy", "--out", out)
    assert (code, stderr) == (0, "") and stdout == "wrote %s\n" % out
    assert os.path.getsize(out) > 0
    assert figures[-1] == {
        "curves": [("fast", [1, 2], [0.5, 0.7]), ("slow", [1, 2, 3], [0.4, 0.6, 0.65])],
        "title": "test accuracy", "xlabel": "epoch", "ylabel": "test accuracy", "legend": True,
        "where": (str(tmp_path / "plots"), "accuracy.png")}
    # defaults: train_loss; --labels and --title
    code, _, _ = compare_here(*two_runs, "--out", out, "--labels", "A,B", "--title", "Loss!")
    assert code == 0
    assert [c[0] for c in figures[-1]["curves"]] == ["A", "B"]
    assert figures[-1]["curves"][1][2] == [2.5, 1.5, 1.2]
    assert figures[-1]["title"] == "Loss!" and figures[-1]["ylabel"] == "train loss"


def test_compare_errors_are_one_line_and_exact(two_runs, tmp_path):
    out = str(tmp_path / "c.png")
    assert compare_here(*two_runs, "--out", out, "--labels", "only-one") == (
        2, "", "handgrad compare: error: 1 labels for 2 runs\n")
    missing = str(tmp_path / "nowhere")
    code, _, err = compare_here(two_runs[0], missing, "--out", out)
    path = os.path.join(missing, "metrics.json")
    assert code == 2 and err.startswith("handgrad compare: error: cannot read %s: " % path)
    assert err.count("\n") == 1
    broken = _fake_run(tmp_path / "broken", [])
    with open(os.path.join(broken, "metrics.json"), "w") as f:
        f.write("{not json")
    code, _, err = compare_here(broken, "--out", out)
    assert code == 2 and err.startswith("handgrad compare: error: cannot read %s"
                                        % os.path.join(broken, "metrics.json"))
    assert compare_here(*two_runs, "--key", "lr", "--out", out) == (
        2, "", "handgrad compare: error: %s has no 'lr' (it has epoch, test_accuracy, "
               "train_loss)\n" % os.path.join(two_runs[0], "metrics.json"))
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    code, _, err = compare_here(*two_runs, "--out", str(blocker / "c.png"))
    assert code == 2 and err.startswith("handgrad compare: error: cannot write %s: "
                                        % (blocker / "c.png"))
    assert not os.path.exists(out)


# -- the command itself --------------------------------------------------------------------------

def handgrad_command(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "handgrad", *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_version():
    import handgrad

    proc = handgrad_command("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("handgrad %s" % handgrad.__version__)
    assert "torch" in proc.stdout


def test_a_closed_pipe_ends_the_command_quietly():
    reader = subprocess.Popen([sys.executable, "-m", "handgrad", "info"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader.stdout.close()  # as `handgrad info | head -0` does
    _, err = reader.communicate(timeout=300)
    assert err == b"", err.decode()
    assert reader.returncode == 1


def test_a_missing_optional_package_names_the_train_extra(data_root, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "tqdm.py").write_text("raise ImportError('No module named tqdm', name='tqdm')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(blocker)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = handgrad_command("train", "mnist_cnn", "--data-root", data_root, env=env)
    assert_one_line_error(proc, "needs the optional package tqdm: pip install handgrad[train]")


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_device_and_amp_arguments(data_root, args, message):
    proc = train_here("mnist_cnn", "--data-root", data_root, *args)
    assert_one_line_error(proc, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_says_so(data_root, tmp_path):
    proc = train_here("mnist_cnn", "--data-root", data_root, "--out", str(tmp_path / "o"),
                      "--device", "cuda")
    assert_one_line_error(proc, "--device cuda: no CUDA GPU is usable here")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_end_to_end_on_the_cpu(data_root, tmp_path, amp):
    out = str(tmp_path / "run")
    train("mnist_ae", "--data-root", data_root, "--out", out, "--epochs", "1", "--limit", "64",
          "--amp", amp, "--no-progress")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["amp"] == amp and metrics["device"] == "cpu"
    assert all(h["train_loss"] == h["train_loss"] for h in metrics["history"])  # not NaN
    proc = train("mnist_ae", "--data-root", data_root, "--out", out, "--resume", "--epochs", "1",
                 "--limit", "64", "--no-progress", expect=2)
    assert "amp='%s' (now None)" % amp in proc.stderr


def test_float16_resume_continues_from_the_saved_loss_scale(data_root, tmp_path):
    # A short run never changes GradScaler's scale (it grows after 2,000 clean
    # steps), so the checkpoint is given another scale: the resumed run must
    # start from it, not from a fresh scaler's.
    out = str(tmp_path / "run")
    args = ["mnist_ae", "--data-root", data_root, "--out", out, "--limit", "64", "--amp", "fp16",
            "--no-progress"]
    train(*args, "--epochs", "1")
    path = os.path.join(out, "checkpoint.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["grad_scaler"]["scale"] == 65536.0
    saved["grad_scaler"]["scale"] = 1024.0
    torch.save(saved, path)
    proc = train(*args, "--epochs", "2", "--resume")
    assert "resumed from %s after epoch 1\n" % out in proc.stdout
    assert torch.load(path, weights_only=True)["grad_scaler"]["scale"] == 1024.0


def test_amp_on_a_model_of_handgrad_ops_trains_or_names_the_missing_dtype(data_root, tmp_path):
    """Until every op has CPU bfloat16 kernels, --amp bf16 on a CNN may stop; with one
    line naming the dtype, never a traceback."""
    proc = train("mnist_cnn", "--data-root", data_root, "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--limit", "64", "--amp", "bf16", "--no-progress", expect=None)
    if proc.returncode == 0:
        metrics, _ = learning_curve(str(tmp_path / "run"))
        assert metrics["amp"] == "bf16"
    else:
        assert_one_line_error(proc, "--amp bf16", "BFloat16")
