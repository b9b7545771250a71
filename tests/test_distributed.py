"""Data-parallel training (torchrun, DistributedDataParallel, gloo on the CPU).

Two processes with global batch B must reach the weights one process reaches
with batch B (to float tolerance: the gradients are summed in another order);
checkpoints must resume with another number of processes; a killed process
must end the run with an error, leave the last checkpoint whole, and --resume
must finish the run. Tiny synthetic data, 1 thread per process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from handgrad.training import distributed
from handgrad.training.data import ImageData

from synthetic_data import write_cifar10_tree, write_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
# Summed in another order, float32 gradients differ in the last bits; after a dozen
# steps the weights differ by ~1e-7, far below a step's change (~1e-3).
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
LENET = ["--batch-size", "16", "--lr", "0.01", "--threads", "1", "--no-progress"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(processes, *args, env=None, expect=0, timeout=300):
    proc = subprocess.run([*TORCHRUN, str(processes), *args], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def train_one_process(*args):
    proc = subprocess.run([sys.executable, "-m", "handgrad", "train", *args], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def load(out):
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return metrics, saved


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].double(), b[name].double(), **WEIGHT_TOLERANCE,
                                   msg=lambda m: "%s: %s" % (name, m))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_mnist(root, train=64, test=32)
    write_cifar10_tree(root, train=96, test=40)
    return root


@pytest.fixture(scope="module")
def one_process_lenet(data_root, tmp_path_factory):
    """lenet5, 2 epochs of 6 steps of 16 images, one process: the reference."""
    out = str(tmp_path_factory.mktemp("one") / "run")
    train_one_process("lenet5", "--data-root", data_root, "--out", out, "--epochs", "2", *LENET)
    return out


# -- in one process: the data split and the synchronized batch norm alone ----------------------

@pytest.mark.parametrize("n, world, batch", [(12, 2, 4), (10, 2, 4), (11, 2, 4), (9, 3, 6),
                                             (5, 4, 4)])
def test_the_shares_of_a_batch_are_the_batch_of_one_process(n, world, batch):
    data = ImageData(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                     ["0"], "zeros")
    whole = list(distributed.sampler(data, distributed.SINGLE, seed=5))
    shares = [list(distributed.sampler(data, distributed.Share(r, world), seed=5))
              for r in range(world)]
    per_process = distributed.batch_share(batch, distributed.Share(0, world))
    assert sorted(i for s in shares for i in s) == sorted(whole + whole[:(-n) % world])
    repeated = distributed.repeated_images(n, distributed.Share(0, world))
    assert (n + repeated) % world == 0 and 0 <= repeated < world
    assert len(shares[0]) * world == n + repeated
    if n % world == 0:  # every batch is the single process's batch, split
        for k in range(0, len(shares[0]), per_process):
            together = sorted(i for s in shares for i in s[k:k + per_process])
            assert together == sorted(whole[k * world:(k + per_process) * world])
    for epoch in (0, 1):  # the order changes per epoch and is the same on every process
        sampler = distributed.sampler(data, distributed.SINGLE, seed=5)
        sampler.set_epoch(epoch)
        assert list(sampler) == list(sampler)
    a, b = (distributed.sampler(data, distributed.SINGLE, seed=5) for _ in range(2))
    b.set_epoch(1)
    assert list(a) != list(b) or n < 4


def test_the_global_batch_must_split_evenly():
    assert distributed.batch_share(64, distributed.Share(1, 4)) == 16
    with pytest.raises(ValueError, match="--batch-size 30 is the global batch and must be a "
                                         "multiple of the 4 processes \\(try 28\\)"):
        distributed.batch_share(30, distributed.Share(0, 4))


def test_share_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.from_environment() == distributed.SINGLE
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.from_environment() == distributed.Share(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 and WORLD_SIZE=4"):
        distributed.from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        distributed.from_environment()


def test_synchronized_batch_norm_alone_is_batch_norm():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    with torch.no_grad():
        plain[1].weight.uniform_(0.5, 2)
        plain[1].bias.uniform_(-1, 1)
    synced = distributed.synchronize_batch_norms(
        torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)),
        torch.device("cpu"))
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], distributed.SyncBatchNormCPU)
    assert list(synced.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 2, 4, 4)
    for train in (True, False):
        plain.train(train)
        synced.train(train)
        torch.testing.assert_close(synced(x), plain(x))
    with pytest.raises(ValueError, match="^expected at least 2-D input \\(got 1-D\\)$"):
        synced[1](torch.randn(3))
    # (N, C) is enough, as for BatchNorm1d
    flat = distributed.synchronize_batch_norms(torch.nn.BatchNorm1d(3), torch.device("cpu"))
    torch.testing.assert_close(flat(x[:, 0, 0, :3]), torch.nn.BatchNorm1d(3)(x[:, 0, 0, :3]))


@pytest.mark.parametrize("options", [dict(), dict(affine=False, track_running_stats=False),
                                     dict(momentum=None, eps=1e-3), dict(affine=False)], ids=str)
def test_synchronized_batch_norm_keeps_every_option(options):
    plain = torch.nn.BatchNorm2d(3, **options)
    synced = distributed.synchronize_batch_norms(plain, torch.device("cpu"))
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(synced, name) == getattr(plain, name), name
    # On CUDA devices torch's own SyncBatchNorm (the conversion needs no GPU).
    on_cuda = distributed.synchronize_batch_norms(
        torch.nn.Sequential(torch.nn.BatchNorm2d(3, **options)), torch.device("cuda"))
    assert type(on_cuda[0]) is torch.nn.SyncBatchNorm
    assert on_cuda[0].affine == plain.affine


@pytest.mark.parametrize("options", [dict(), dict(momentum=None), dict(affine=False),
                                     dict(track_running_stats=False)], ids=str)
def test_synchronized_batch_norm_over_two_identical_processes(monkeypatch, options):
    # The synchronized path needs a process group of two or more, which only
    # the torchrun tests below have (in subprocesses). In this process it runs
    # against a stand-in: two processes holding the same batch, so every
    # all_reduce(SUM) doubles its tensor. The result must be batch norm over
    # the batch of both, [x; x] (statistics over 2N samples: the running
    # variance's unbiased factor 2N/(2N-1), not N/(N-1)), and the input's
    # gradient the one each process gets in that two-process run: the
    # gradient with respect to its half of [x; x] of the loss over both halves.
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None, group=None: t.mul_(2))
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(3, dtype=torch.float64, **options)
    if plain.affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 2)
            plain.bias.uniform_(-1, 1)
    synced = distributed.synchronize_batch_norms(
        torch.nn.BatchNorm2d(3, dtype=torch.float64, **options), torch.device("cpu"))
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64) * 3 + 1
    weights = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    for step in range(2):  # the running statistics of two steps (momentum None: their mean)
        mine_x = x.clone().requires_grad_()
        mine = synced(mine_x)
        (mine * weights).sum().backward()
        halves = [x.clone().requires_grad_() for _ in range(2)]
        both = plain(torch.cat(halves))
        ((both[:4] * weights).sum() + (both[4:] * weights).sum()).backward()
        torch.testing.assert_close(mine, both[:4])
        torch.testing.assert_close(mine_x.grad, halves[0].grad)
        for name, buffer in plain.named_buffers():
            torch.testing.assert_close(getattr(synced, name), buffer, msg=name)
        x = x.flip(0) * 0.5 + 0.25
    if plain.affine:
        # Each process's parameter gradient is its own half's; DDP then
        # averages the processes' gradients, which for twins is the same.
        torch.testing.assert_close(synced.weight.grad, plain.weight.grad / 2)
        torch.testing.assert_close(synced.bias.grad, plain.bias.grad / 2)


def test_collective_timeout_from_the_environment(monkeypatch):
    name = distributed.TIMEOUT_ENV
    assert name == "HANDGRAD_DIST_TIMEOUT"
    monkeypatch.delenv(name, raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv(name, "")
    assert distributed.timeout_seconds() == 600
    monkeypatch.setenv(name, "2.5")
    assert distributed.timeout_seconds() == 2.5
    monkeypatch.setenv(name, "soon")
    with pytest.raises(ValueError) as e:
        distributed.timeout_seconds()
    assert str(e.value) == "HANDGRAD_DIST_TIMEOUT must be a number of seconds, not 'soon'"
    for bad in ("0", "-3", "nan"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError) as e:
            distributed.timeout_seconds()
        assert str(e.value) == "HANDGRAD_DIST_TIMEOUT must be positive, got %g" % float(bad)


def test_a_lost_process_is_recognised_only_in_a_group_of_several(monkeypatch):
    gone = RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
    assert not distributed.lost_a_process(gone)  # no process group at all
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 1)
    assert not distributed.lost_a_process(gone)  # alone: nobody to lose
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: 2)
    for marker in distributed.LOST_PEER_MARKERS:
        assert distributed.lost_a_process(RuntimeError("... %s ..." % marker)), marker
    assert distributed.lost_a_process(distributed.dist.DistError("anything"))
    assert not distributed.lost_a_process(RuntimeError("CUDA out of memory"))
    assert not distributed.lost_a_process(ValueError("Connection reset by peer"))


@pytest.fixture
def group_of_one(tmp_path):
    """A real gloo process group of one process, in this process."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():  # (a test may have ended it itself)
            torch.distributed.destroy_process_group()


def test_collectives_in_a_group_of_one(group_of_one):
    cpu = torch.device("cpu")
    assert distributed.all_sum([1.5, -2.0], cpu) == [1.5, -2.0]
    assert distributed.all_max(3.25, cpu) == 3.25
    one = distributed.Share(0, 1)
    assert distributed.broadcast({"a": 1}, one, cpu) == {"a": 1}
    distributed.barrier(one, cpu)
    model = distributed.wrapper(cpu)(torch.nn.Linear(3, 2))
    assert type(model) is torch.nn.parallel.DistributedDataParallel
    x = torch.randn(4, 3, requires_grad=True)
    summed = distributed._SummedOverProcesses.apply(x)
    assert torch.equal(summed, x) and summed is not x
    summed.backward(torch.full_like(x, 2.0))
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    # alone in a group, the synchronized batch norm is batch norm
    bn = torch.nn.BatchNorm2d(3)
    synced = distributed.synchronize_batch_norms(torch.nn.BatchNorm2d(3), cpu)
    images = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(synced(images), bn(images))
    assert not distributed.lost_a_process(RuntimeError("Connection reset by peer"))
    distributed.stop(finished=True)
    assert not torch.distributed.is_initialized()


def test_collectives_without_a_group_are_the_identity():
    cpu = torch.device("cpu")
    assert distributed.all_sum([1.0, 2.0], cpu) == [1.0, 2.0]
    assert distributed.all_max(-1.0, cpu) == -1.0
    assert distributed.broadcast([3], distributed.SINGLE, cpu) == [3]
    assert not distributed.start(distributed.SINGLE, cpu)


# -- torchrun, 2 processes ---------------------------------------------------------------------

def test_two_processes_reach_the_weights_of_one_and_resume_with_one(data_root, one_process_lenet,
                                                                    tmp_path):
    out = str(tmp_path / "two")
    proc = torchrun(2, "-m", "handgrad", "train", "lenet5", "--data-root", data_root, "--out",
                    out, "--epochs", "1", *LENET)
    assert "2 processes (gloo): global batch 16 = 8 per process; 48 images per process" \
        in proc.stdout
    assert proc.stdout.count("epoch 1/1") == 1, "only rank 0 logs"
    metrics, _ = load(out)
    reference, final = load(one_process_lenet)
    assert metrics["world_size"] == 2 and metrics["batch_size_per_process"] == 8
    assert reference["world_size"] == 1 and reference["batch_size_per_process"] == 16
    first, expected = metrics["history"][0], reference["history"][0]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert first[key] == pytest.approx(expected[key], rel=1e-5), key
    assert len(metrics["running_loss"]) == 6
    # The checkpoint of 2 processes, resumed by one, ends where one process ends.
    train_one_process("lenet5", "--data-root", data_root, "--out", out, "--epochs", "2",
                      "--resume", *LENET)
    metrics, resumed = load(out)
    assert metrics["world_size"] == 1 and len(metrics["history"]) == 2
    assert_same_weights(resumed["model"], final["model"])
    assert not any(k.startswith("module.") for k in resumed["model"])


# The biases of the layers just before the generator's batch norms: the batch norm
# subtracts the batch mean, so their gradient is 0 in exact arithmetic and its
# rounding noise decides the sign of Adam's steps (lr * sign(gradient) at first):
# they differ between any two summation orders by whole steps, and change nothing.
BIASES_BEFORE_BATCH_NORMS = ("generator.project.0.bias", "generator.net.1.bias")


def assert_moved_alike(a, b, initial, tolerance=1e-3):
    """a and b differ by less than `tolerance` of how far training moved them (Adam's
    steps are lr-sized whatever the gradient's size, so the tolerance is relative to
    the distance moved). Measured after 2 steps: at most 8e-5 of it."""
    for name in initial:
        if name in BIASES_BEFORE_BATCH_NORMS:
            continue
        if not initial[name].is_floating_point():
            assert torch.equal(a[name], b[name]), name
            continue
        moved = (b[name] - initial[name]).double().norm().item()
        apart = (a[name] - b[name]).double().norm().item()
        assert apart <= tolerance * moved + 1e-7, (name, apart, moved)


def test_two_processes_train_the_gan_as_one_process(data_root, tmp_path):
    """Both optimizers, the generator's batch norms synchronized (SyncBatchNormCPU);
    without dropout, whose masks are drawn per process."""
    worker = [os.path.join(HERE, "distributed_worker.py"), "--models", "mnist_gan",
              "--data-root", data_root, "--batch-size", "16", "--limit", "32", "--epochs", "1",
              "--no-dropout"]
    torchrun(1, *worker, "--out", str(tmp_path / "one"))
    torchrun(2, *worker, "--out", str(tmp_path / "two"))
    (one_metrics, one), (two_metrics, two) = (load(str(tmp_path / n / "mnist_gan"))
                                              for n in ("one", "two"))
    assert two_metrics["world_size"] == 2 and one_metrics["world_size"] == 1
    initial = torch.load(str(tmp_path / "one" / "mnist_gan" / "initial.pt"), weights_only=True)
    assert_same_weights(torch.load(str(tmp_path / "two" / "mnist_gan" / "initial.pt"),
                                   weights_only=True), initial)
    assert_moved_alike(two["model"], one["model"], initial)  # with the batch norms' statistics
    for key in ("train_d_loss", "train_g_loss", "train_D_x", "test_d_loss"):
        assert two_metrics["history"][0][key] == pytest.approx(one_metrics["history"][0][key],
                                                               rel=1e-5), key


def test_every_model_trains_on_two_processes(data_root, tmp_path):
    names = sorted(__import__("handgrad.models", fromlist=["RECIPES"]).RECIPES)
    torchrun(2, os.path.join(HERE, "distributed_worker.py"), "--models", ",".join(names),
             "--data-root", data_root, "--batch-size", "8", "--limit", "16",
             "--out", str(tmp_path), timeout=600)
    for name in names:
        metrics, saved = load(str(tmp_path / name))
        assert metrics["world_size"] == 2 and metrics["batch_size_per_process"] == 4, name
        loss = [v for k, v in metrics["history"][0].items() if k.startswith("train_")][0]
        assert loss == loss and abs(loss) < 1e6, (name, loss)  # not NaN
        assert not any(k.startswith("module.") for k in saved["model"]), name


def test_a_killed_process_ends_the_run_and_resume_finishes_it(data_root, one_process_lenet,
                                                              tmp_path):
    out = str(tmp_path / "run")
    # 6 batches per epoch: process 1 is killed in the middle of epoch 2.
    proc = torchrun(2, "-m", "handgrad", "train", "lenet5", "--data-root", data_root, "--out", out,
                    "--epochs", "2", *LENET, expect=None, timeout=120,
                    env={"HANDGRAD_CRASH_AFTER_BATCHES": "9", "HANDGRAD_CRASH_RANK": "1"})
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr
    # Process 0 says why, unless torchrun's SIGTERM (sent as soon as it sees process 1
    # die) reaches it before gloo's connection error does.
    assert ("process 0 lost the other training processes" in proc.stderr
            or "Signal 15 (SIGTERM) received" in proc.stderr), proc.stderr
    metrics, saved = load(out)
    assert saved["epoch"] == 1 and len(metrics["history"]) == 1
    assert not [f for f in os.listdir(out) if f.startswith(".")], "torn temporary files"
    proc = torchrun(2, "-m", "handgrad", "train", "lenet5", "--data-root", data_root, "--out", out,
                    "--epochs", "2", "--resume", *LENET)
    assert "resumed from %s after epoch 1" % out in proc.stdout
    metrics, resumed = load(out)
    assert len(metrics["history"]) == 2 and metrics["world_size"] == 2
    assert_same_weights(resumed["model"], load(one_process_lenet)[1]["model"])
