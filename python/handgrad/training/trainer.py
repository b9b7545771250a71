"""The training loop behind ``handgrad train``.

Reproducibility: every source of randomness is seeded from --seed (torch's
global generator for initialization and dropout, one generator for the data
order, one for augmentation and noise) and saved in the checkpoint after
every epoch. ``--resume`` restores all of it, so a run that is interrupted at
any point -- even killed -- and resumed replays the unfinished epoch exactly
and ends with the same metrics as an uninterrupted run (CPU, same --threads).

Devices: ``--device auto`` trains on the GPU when one is usable (and, for the
handgrad backend, handgrad has CUDA kernels), else on the CPU. The model, its
losses and each batch live on that device; the data stays on the CPU as uint8
and moves one batch at a time. Random numbers for augmentation and noise are
drawn on the CPU generators whatever the device, and checkpoints load onto
the CPU first, so a run started on a GPU resumes on a CPU and vice versa.

Processes: under torchrun (``torchrun --nproc-per-node N -m handgrad train``)
each process trains its share of every batch with DistributedDataParallel;
see distributed.py. Rank 0 alone evaluates, logs, and writes the checkpoint,
metrics and plots; the checkpoint does not depend on the number of processes.
"""

import copy
import dataclasses
import os
import random
import signal
import time
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .. import models
from . import checkpoint, data, distributed, plots
from .recipe import Precision, schedule_factor

# Fault injection for the tests of --resume: after this many training batches
# the process kills itself with SIGKILL, as a crash or an OOM kill would.
CRASH_AFTER_BATCHES_ENV = "HANDGRAD_CRASH_AFTER_BATCHES"
CRASH_RANK_ENV = "HANDGRAD_CRASH_RANK"  # only this process crashes (default: every process)
RUNNING_POINTS_PER_EPOCH = 50


@dataclasses.dataclass
class TrainConfig:
    model: str
    data_root: str = "data"
    epochs: int = None
    batch_size: int = None
    lr: float = None
    backend: str = "handgrad"
    out: str = None
    seed: int = 0
    resume: bool = False
    threads: int = None
    download: bool = False
    limit: int = None  # train on N images, class-balanced and drawn with the seed (quick runs)
    noise: float = 0.0  # denoising autoencoders: std of the Gaussian input noise
    d_steps: int = 1  # GAN: discriminator steps per generator step
    augment: str = None  # classifiers: "none", "flip" or "crop-flip" (None: the recipe's)
    lr_schedule: str = None  # "constant" or "cosine" (None: the recipe's)
    progress: bool = True
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    amp: Optional[str] = None  # mixed precision: None, "bf16" or "fp16"

    def resolved(self, recipe):
        """The config with the recipe's defaults filled in."""
        c = dataclasses.replace(self)
        c.epochs = c.epochs or recipe.epochs
        c.batch_size = c.batch_size or recipe.batch_size
        c.lr = c.lr or recipe.lr
        c.augment = getattr(recipe, "augment", None)
        c.lr_schedule = c.lr_schedule or recipe.lr_schedule
        variant = "-noise%g" % c.noise if c.noise else ""
        c.out = c.out or os.path.join("runs", "%s%s-%s" % (recipe.name, variant, c.backend))
        return c

    def identity(self):
        """What must match between a checkpoint and the run resuming it."""
        identity = {k: getattr(self, k) for k in ("model", "batch_size", "lr", "seed", "limit",
                                                  "noise", "d_steps", "augment", "lr_schedule",
                                                  "amp")}
        # An annealed learning rate depends on the run's length: more epochs on --resume
        # would make it jump back up.
        identity["annealed_over_epochs"] = self.epochs if self.lr_schedule != "constant" else None
        return identity


def resolve_device(choice, backend, share=distributed.SINGLE):
    """The torch.device for --device: auto picks the GPU when one is usable (and the
    backend can run there), else the CPU; an explicit cuda must be usable. Among
    several processes, each takes the GPU numbered by its LOCAL_RANK."""
    device = _resolve_device(choice, backend)
    if device.type != "cuda" or not share.distributed:
        return device
    if device.index is not None:
        raise ValueError("--device %s: with %d processes each takes the GPU of its LOCAL_RANK; "
                         "pass --device cuda (or auto)" % (choice, share.world_size))
    if share.local_rank >= torch.cuda.device_count():
        raise ValueError("process %d (LOCAL_RANK %d) has no GPU: this machine has %d; start at "
                         "most that many processes per node" % (share.rank, share.local_rank,
                                                                 torch.cuda.device_count()))
    torch.cuda.set_device(share.local_rank)
    return torch.device("cuda", share.local_rank)


def _resolve_device(choice, backend):
    try:
        device = torch.device("cuda" if choice == "auto" else choice)
    except RuntimeError:
        raise ValueError("--device must be auto, cpu, cuda or cuda:N, not %r" % choice) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError("--device must be auto, cpu, cuda or cuda:N, not %r" % choice)
    if device.type == "cpu":
        return device
    problem = None
    if not torch.cuda.is_available():
        problem = "no CUDA GPU is usable here (torch %s%s)" % (
            torch.__version__, "" if torch.version.cuda else " is a CPU-only build")
    elif device.index is not None and device.index >= torch.cuda.device_count():
        problem = "there is no GPU %d (this machine has %d)" % (device.index,
                                                                  torch.cuda.device_count())
    elif backend == "handgrad":
        import handgrad

        if not handgrad.info()["cuda_kernels_compiled"]:
            problem = ("handgrad was built without its CUDA kernels; rebuild it with a CUDA "
                       "toolkit (HANDGRAD_CUDA=1 pip install --no-build-isolation -e .) or "
                       "pass --backend native")
    if problem is None:
        return device
    if choice == "auto":
        return torch.device("cpu")
    raise ValueError("--device %s: %s" % (choice, problem))


class _OnDevice:
    """A dataset whose batches() move to `device` and advance a progress bar."""

    def __init__(self, dataset, device, bar):
        self._data, self._device, self._bar = dataset, device, bar

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __len__(self):
        return len(self._data)

    def batches(self, *args, **kwargs):
        for images, labels in self._data.batches(*args, **kwargs):
            yield images.to(self._device), labels.to(self._device)
            self._bar.update(len(labels))


def _seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class Run:
    """One training run: model, optimizers, data, generators and history."""

    def __init__(self, config, log=print):
        self.share = distributed.from_environment()
        self.recipe = models.recipe(config.model).configured(config)
        self.config = config.resolved(self.recipe)
        self.log = log if self.share.is_main else (lambda *args: None)
        c = self.config
        self.device = resolve_device(c.device, c.backend, self.share)
        self.rank_batch = distributed.batch_share(c.batch_size, self.share)
        distributed.start(self.share, self.device)  # `handgrad train` stops it at the end
        if self.share.distributed:
            self.recipe = copy.copy(self.recipe)
            self.recipe.share = self.share
        self.precision = Precision(self.device, c.amp)
        if self.share.is_main:
            self._prepare_output_folder()
        if c.threads:
            torch.set_num_threads(c.threads)
        _seed_everything(c.seed)
        progress = c.progress and self.share.is_main
        if not self.share.is_main:
            # Rank 0 first: it decodes (or downloads) the data once and caches it for the rest.
            distributed.barrier(self.share, self.device)
        train_data = data.load(self.recipe.dataset, c.data_root, True, c.download, progress)
        self.test_data = data.load(self.recipe.dataset, c.data_root, False, c.download, progress)
        if self.share.is_main:
            distributed.barrier(self.share, self.device)
        data.check_same_classes(train_data, self.test_data)
        self.train_data = train_data.subset(c.limit, c.seed) if c.limit else train_data
        self.model = models.apply_backend(self.recipe.build(), c.backend)
        if self.share.distributed:
            self.model = distributed.synchronize_batch_norms(self.model, self.device)
        self.model = self.model.to(self.device)
        # What the training steps call: the model itself, or its DistributedDataParallel
        # wrapping (sharing the model's parameters, which the optimizers update).
        self.train_model = (self.recipe.distribute(self.model, distributed.wrapper(self.device))
                            if self.share.distributed else self.model)
        self.sampler = distributed.sampler(self.train_data, self.share, c.seed)
        self.losses = {k: models.apply_backend(v, c.backend).to(self.device)
                       for k, v in self.recipe.losses().items()}
        self.optimizers = self.recipe.optimizers(self.model, c.lr)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        # The data order is DistributedSampler's, a function of --seed and the epoch.
        self.generators = {"augment": torch.Generator().manual_seed(c.seed + 2)}
        self.epoch = 0
        self.history = []
        self.running = []
        self.extras = {}

    def _prepare_output_folder(self):
        """Creates --out and proves it writable before any training time is spent;
        removes temporary files that a killed run left there."""
        out = self.config.out
        try:
            os.makedirs(out, exist_ok=True)
            checkpoint.atomic_write(os.path.join(out, ".write-test"), lambda f: f.write(b"ok"))
            os.unlink(os.path.join(out, ".write-test"))
        except OSError as e:
            raise ValueError("cannot write to the output folder --out %s: %s"
                             % (out, e.strerror or e)) from None
        for path in checkpoint.remove_stale_temporaries(out):
            self.log("removed %s, left by a run that was killed while writing it" % path)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self):
        return {
            "config": self.config.identity(),
            "backend": self.config.backend,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "grad_scaler": self.precision.state_dict(),
            "rng": checkpoint.rng_state(self.generators),
            "history": self.history,
            "running": self.running,
            "extras": self.extras,
        }

    def resume(self):
        saved, problem = None, None
        if self.share.is_main:
            try:
                saved = checkpoint.load_checkpoint(self.config.out)
            except checkpoint.CheckpointError as e:
                problem = str(e)
        saved, problem = distributed.broadcast((saved, problem), self.share, self.device)
        if problem is not None:
            raise checkpoint.CheckpointError(problem)
        if saved is None:
            self.log("no checkpoint in %s; starting from epoch 1" % self.config.out)
            return
        # Settings added later (augment, lr_schedule) are absent from older checkpoints: not checked.
        mismatched = {k: (v, saved["config"][k]) for k, v in self.config.identity().items()
                      if k in saved["config"] and saved["config"][k] != v}
        if mismatched:
            raise ValueError("the checkpoint in %s was made with different settings: %s"
                             % (self.config.out, ", ".join("%s=%r (now %r)" % (k, old, new)
                                                           for k, (new, old) in mismatched.items())))
        try:
            self.model.load_state_dict(saved["model"])
            for k, o in self.optimizers.items():
                o.load_state_dict(saved["optimizers"][k])
            self.precision.load_state_dict(saved.get("grad_scaler", {}))
            checkpoint.restore_rng_state(saved["rng"], self.generators)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise checkpoint.CheckpointError(
                "checkpoint %s does not fit model %s (%s); delete it to start over, or choose "
                "another --out" % (os.path.join(self.config.out, checkpoint.CHECKPOINT),
                                   self.config.model, reason[:200])) from None
        self.epoch = saved["epoch"]
        self.history = saved["history"]
        self.running = saved["running"]
        self.extras = saved.get("extras", {})
        self.log("resumed from %s after epoch %d" % (self.config.out, self.epoch))

    # -- one epoch --------------------------------------------------------------------------
    def _prepare(self, train):
        generator, device = self.generators["augment"], self.device
        return lambda images, labels: self.recipe.prepare(images.to(device), labels.to(device),
                                                          train, generator)

    def _set_learning_rates(self, progress):
        """Learning rates at `progress` (0 to 1) through the run; a function of the
        position only, so a resumed run recomputes them exactly."""
        factor = schedule_factor(self.config.lr_schedule, progress)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor

    def epoch_order(self):
        """This process's training images of the current epoch, in order: its share of
        the epoch's permutation (all of it for one process)."""
        self.sampler.set_epoch(self.epoch)
        return list(self.sampler)

    def epoch_batches(self):
        """The current epoch's (uint8 images, labels) training batches of this process."""
        return self.train_data.batches_in_order(self.epoch_order(), self.rank_batch)

    def train_step(self, images, labels, b, batches):
        """One optimization step on batch `b` of `batches` in the current epoch."""
        self._set_learning_rates((self.epoch + b / batches) / self.config.epochs)
        x, y = self._prepare(train=True)(images, labels)
        return self.recipe.train_batch(self.train_model, self.losses, self.optimizers, x, y,
                                       step=b, precision=self.precision)

    def train_epoch(self, crash_after):
        c = self.config
        self.model.train()
        self.train_model.train()
        world = self.share.world_size
        n = self.sampler.num_samples  # this process's images per epoch
        batches = (n + self.rank_batch - 1) // self.rank_batch
        totals, counts, batch_losses, seen = {}, {}, [], 0
        bar = tqdm(total=n * world, unit="img", desc="epoch %d/%d" % (self.epoch + 1, c.epochs),
                   disable=not (c.progress and self.share.is_main), leave=False,
                   dynamic_ncols=True)
        start = time.perf_counter()
        for b, (images, labels) in enumerate(self.epoch_batches()):
            out = self.train_step(images, labels, b, batches)
            main = next(iter(out.values()))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v * len(labels)
                counts[k] = counts.get(k, 0) + len(labels)
            batch_losses.append(main)
            seen += len(labels)
            bar.update(len(labels) * world)
            bar.set_postfix(loss="%.4f" % main, img_s="%.0f" % (
                seen * world / max(1e-9, time.perf_counter() - start)))
            if crash_after is not None:
                crash_after -= 1
                if crash_after == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        seconds = time.perf_counter() - start
        bar.close()
        # Sums over the processes (every process has as many batches, with the same keys).
        keys = sorted(totals)
        summed = distributed.all_sum([totals[k] for k in keys] + [counts[k] for k in keys]
                                     + batch_losses + [seen], self.device)
        totals = dict(zip(keys, summed[:len(keys)]))
        counts = dict(zip(keys, summed[len(keys):2 * len(keys)]))
        batch_losses = [v / world for v in summed[2 * len(keys):-1]]  # equal shares: the mean
        seen = summed[-1]
        seconds = distributed.all_max(seconds, self.device)
        self._record_running_loss(batch_losses)
        metrics = {"train_" + k: v / counts[k] for k, v in totals.items()}
        metrics.update(epoch_seconds=seconds, images_per_second=seen / seconds)
        return metrics, crash_after

    def _record_running_loss(self, batch_losses):
        batches = len(batch_losses)
        every = max(1, batches // RUNNING_POINTS_PER_EPOCH)
        window = []
        for b, loss in enumerate(batch_losses):
            window.append(loss)
            if (b + 1) % every == 0 or b + 1 == batches:
                self.running.append({"epoch": self.epoch + (b + 1) / batches,
                                     "loss": sum(window) / len(window)})
                window = []

    def evaluate(self):
        self.model.eval()
        start = time.perf_counter()
        bar = tqdm(total=len(self.test_data), unit="img", desc="evaluating",
                   disable=not self.config.progress, leave=False, dynamic_ncols=True)
        with self.precision.autocast():
            metrics, extras = self.recipe.evaluate(self.model, self.losses,
                                                   _OnDevice(self.test_data, self.device, bar),
                                                   self._prepare(train=False))
        bar.close()
        metrics["eval_seconds"] = time.perf_counter() - start
        return metrics, extras

    def write_outputs(self):
        c = self.config
        out = c.out
        summary = {
            "model": c.model, "backend": c.backend, "device": str(self.device), "amp": c.amp,
            "epochs_done": self.epoch, "epochs": c.epochs,
            "batch_size": c.batch_size, "world_size": self.share.world_size,
            "batch_size_per_process": self.rank_batch, "lr": c.lr, "lr_schedule": c.lr_schedule,
            "augment": c.augment, "seed": c.seed,
            "threads": torch.get_num_threads(), "train_data": self.train_data.source,
            "test_data": self.test_data.source, "history": self.history,
            "running_loss": self.running,
        }
        summary.update({k: v for k, v in self.extras.items() if k in ("confusion_matrix",)})
        checkpoint.save_metrics(out, summary)
        files = [plots.loss_curves(self.history, self.running, out,
                                   keys=self.recipe.curve_keys(self.history),
                                   title="%s (%s)" % (c.model, c.backend))]
        self.model.eval()
        files += self.recipe.plots(self.model, self.losses, self.history, self.extras, out,
                                   self.test_data, self._prepare(train=False))
        return files

    def _crash_after(self):
        crash_after = os.environ.get(CRASH_AFTER_BATCHES_ENV)
        crash_rank = os.environ.get(CRASH_RANK_ENV)
        if not crash_after or (crash_rank and int(crash_rank) != self.share.rank):
            return None
        return int(crash_after)

    def _log_processes(self):
        s, c = self.share, self.config
        if not s.distributed:
            return
        repeated = distributed.repeated_images(len(self.train_data), s)
        self.log("%d processes (%s): global batch %d = %d per process; %d images per process "
                 "and epoch%s" % (s.world_size, "nccl" if self.device.type == "cuda" else "gloo",
                                  c.batch_size, self.rank_batch, self.sampler.num_samples,
                                  "" if not repeated else
                                  " (%d training images do not split evenly: DistributedSampler "
                                  "repeats %d of them each epoch)"
                                  % (len(self.train_data), repeated)))

    def fit(self):
        c = self.config
        if c.resume:
            self.resume()
        crash_after = self._crash_after()
        self.log("%s on %s: %d training / %d test images, backend %s, device %s%s, %d threads, "
                 "output %s" % (c.model, self.recipe.dataset, len(self.train_data),
                                len(self.test_data), c.backend, self.device,
                                ", amp " + c.amp if c.amp else "", torch.get_num_threads(), c.out))
        self._log_processes()
        if self.epoch and self.epoch >= c.epochs and self.share.is_main:
            # A finished run may have been killed after its last checkpoint and before its
            # metrics and plots were written: write them again from the checkpoint.
            self.write_outputs()
            self.log("the run in %s is complete (%d epochs); metrics and plots rewritten"
                     % (c.out, self.epoch))
        while self.epoch < c.epochs:
            train_metrics, crash_after = self.train_epoch(crash_after)
            if self.share.is_main:
                test_metrics, self.extras = self.evaluate()
            self.epoch += 1
            if self.share.is_main:
                record = {"epoch": self.epoch, **train_metrics, **test_metrics}
                self.history.append(record)
                self.log(format_epoch(record, c.epochs))
                checkpoint.save_checkpoint(c.out, self.state())
                self.write_outputs()
            # The others wait for the checkpoint: a process that fails later leaves it whole.
            distributed.barrier(self.share, self.device)
        return self.history


def format_epoch(record, epochs):
    parts = ["epoch %d/%d" % (record["epoch"], epochs)]
    for k, v in record.items():
        if k in ("epoch", "epoch_seconds", "images_per_second", "eval_seconds"):
            continue
        parts.append(("%s %.2f%%" % (k, 100 * v)) if "accuracy" in k else "%s %.4f" % (k, v))
    parts.append("%.1f s (%.0f img/s)" % (record["epoch_seconds"], record["images_per_second"]))
    return "  ".join(parts)
