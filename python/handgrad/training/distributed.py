"""Data-parallel training on torch.distributed: ``torchrun --nproc-per-node N -m handgrad train``.

torchrun starts N copies of ``handgrad train`` and gives each its RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment; this
module reads them, joins the process group (gloo on the CPU, nccl on CUDA,
with a timeout so that a lost peer ends the run instead of hanging it), and
provides what the trainer needs to train one model on N processes with
torch's DistributedDataParallel:

* ``--batch-size`` stays the global batch: each process takes B / N images of
  every batch (B must be a multiple of N).
* The data order comes from torch's DistributedSampler (shuffled with --seed
  and the epoch, so it is the same on every process and after --resume with
  any number of processes). Process r takes positions r, r + N, r + 2N, ... of
  the epoch's permutation and cuts them into batches of B / N, so the N shares
  of batch k are together positions kB .. kB + B - 1: exactly the batch a
  single process would take. When the training set is not a multiple of N,
  DistributedSampler repeats the first N - (size mod N) images of the
  permutation so that every process gets the same number (the trainer logs
  how many); every image is still seen at least once per epoch.
* Batch norms are synchronized: their statistics are those of the global
  batch (torch.nn.SyncBatchNorm on CUDA; SyncBatchNormCPU below on the CPU,
  where torch's has no kernels), so N processes compute what one process
  computes with the whole batch.
* Checkpoints hold the unwrapped module's state (no ``module.`` prefixes),
  written by rank 0 alone and broadcast from it on --resume, so they resume
  with any number of processes, or none.

Random numbers: every process is seeded alike and draws alike, so the random
state saved in a checkpoint is every process's state. Draws sized by a
process's share (dropout masks, augmentation, autoencoder noise, the VAE's
eps) are therefore the same pattern on every process; a run with dropout or
augmentation is a valid data-parallel run but not bit-for-bit the
single-process run. The GAN's noise is drawn for the global batch and sliced,
so the GAN without dropout is (tests/test_distributed.py).
"""

import dataclasses
import datetime
import gc
import os
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

# What gloo and NCCL say when a peer died, hung past the timeout or closed its connection;
# DistributedDataParallel's backward re-raises them as plain RuntimeErrors.
LOST_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Timed out",
                     "timed out", "NCCL communicator was aborted", "Socket Timeout")
TIMEOUT_ENV = "HANDGRAD_DIST_TIMEOUT"  # seconds a collective waits for the other processes
DEFAULT_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Share()


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError("environment variable %s must be an integer, not %r"
                         % (name, value)) from None


def from_environment() -> Share:
    """The share torchrun announces (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError("RANK=%d and WORLD_SIZE=%d do not describe a process of the group"
                         % (rank, world_size))
    return Share(rank, world_size, local_rank)


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError("%s must be a number of seconds, not %r" % (TIMEOUT_ENV, value)) from None
    if not seconds > 0:
        raise ValueError("%s must be positive, got %g" % (TIMEOUT_ENV, seconds))
    return seconds


def start(share: Share, device: torch.device) -> bool:
    """Joins the process group (gloo for the CPU, nccl for CUDA); True if this call
    created it (and so should end it). A group already started is reused."""
    if not share.distributed or dist.is_initialized():
        return False
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()),
                            device_id=device if device.type == "cuda" else None)
    if dist.get_world_size() != share.world_size or dist.get_rank() != share.rank:
        raise ValueError("the process group (rank %d of %d) disagrees with RANK/WORLD_SIZE "
                         "(%d of %d)" % (dist.get_rank(), dist.get_world_size(), share.rank,
                                         share.world_size))
    return True


def lost_a_process(error: BaseException) -> bool:
    """Whether `error` says that another training process is gone or stopped answering."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in LOST_PEER_MARKERS)


def stop(finished: bool = False) -> None:
    """Ends the process group in order, while the interpreter is fully alive.

    A DistributedDataParallel left in an unreachable reference cycle keeps the
    gloo group's work objects (tensors with Python references) alive until
    interpreter shutdown, and destroying them then aborts the process
    ("terminate called without an active exception", seen once in CI on rank 1
    after every model had trained). So: collect such cycles first and, when
    every process `finished` its work, let them all arrive before any of them
    closes its connections (after an error, a peer may be gone: no barrier)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def batch_share(batch_size: int, share: Share) -> int:
    """Each process's part of the global batch."""
    if batch_size % share.world_size:
        raise ValueError("--batch-size %d is the global batch and must be a multiple of the %d "
                         "processes (try %d)" % (batch_size, share.world_size,
                                                 max(1, batch_size // share.world_size)
                                                 * share.world_size))
    return batch_size // share.world_size


def sampler(dataset, share: Share, seed: int) -> DistributedSampler:
    """The epoch order: set_epoch(e) before each epoch; the same on every process."""
    return DistributedSampler(dataset, num_replicas=share.world_size, rank=share.rank,
                              shuffle=True, seed=seed, drop_last=False)


def repeated_images(n: int, share: Share) -> int:
    """How many images DistributedSampler repeats per epoch to give every process as many."""
    return (-n) % share.world_size


class _SummedOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) as a differentiable function: the gradient of a sum over the
    processes with respect to each process's term is the sum of the processes'
    gradients, so backward is all_reduce(SUM) too."""

    @staticmethod
    def forward(ctx, tensor):
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx, grad):
        summed = grad.clone()
        dist.all_reduce(summed)
        return summed


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the batch of all processes,
    for CPU tensors (torch.nn.SyncBatchNorm runs on accelerators only).

    The per-channel sum and count, then the sum of squared deviations, are summed
    over the processes by a differentiable all_reduce (_SummedOverProcesses), so
    autograd differentiates through the global statistics, as torch's
    SyncBatchNorm does on GPUs. In eval mode, or alone, it is BatchNorm. The
    state dict is BatchNorm's, so checkpoints load into either.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError("expected at least 2-D input (got %d-D)" % input.dim())

    def forward(self, input):
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        all_reduce = _SummedOverProcesses.apply
        channels = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, channels] + [1] * (input.dim() - 2)
        local = torch.cat([input.sum(dims), input.new_full((1,), input.numel() / channels)])
        total = all_reduce(local)
        count = total[channels]
        mean = total[:channels] / count
        centered = input - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def synchronize_batch_norms(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm*d replaced by a synchronized one (same parameters,
    buffers and state-dict keys)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module,
                                                                               SyncBatchNormCPU):
        synced = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                synced.weight, synced.bias = module.weight, module.bias
            if module.track_running_stats:
                synced.running_mean, synced.running_var = module.running_mean, module.running_var
                synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, synchronize_batch_norms(child, device))
    return module


def wrapper(device: torch.device):
    """The function that wraps a module in DistributedDataParallel on `device`."""
    def wrap(module):
        if device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[device.index],
                                           output_device=device.index)
        return DistributedDataParallel(module)
    return wrap


def all_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise sums over the processes (float64 on `device`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast(obj, share: Share, device: torch.device):
    """Rank 0's `obj` on every process (pickled; rank 0 read it safely first)."""
    if not share.distributed:
        return obj
    box = [obj if share.is_main else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def barrier(share: Share, device: torch.device) -> None:
    if share.distributed:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
