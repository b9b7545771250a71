"""What the trainer needs to know about a model: the Recipe interface.

A recipe builds its model from plain torch.nn layers; the trainer makes it
run on handgrad's ops with handgrad.patch (``--backend handgrad``) or leaves
it native (``--backend native``), so both backends train the very same
architecture and the same weights load into either.
"""

import contextlib
import copy
from typing import Any, Dict, Optional

import torch

from .distributed import SINGLE
# The named choices live in options.py (importable without torch); re-exported here.
from .options import AUGMENTATIONS, LR_SCHEDULES, schedule_factor  # noqa: F401

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def normalize(images, mean, std):
    """uint8 (N, C, H, W) -> float32 in [0, 1], then (x - mean) / std per channel
    (on the images' device)."""
    x = images.float().div_(255)
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (x - mean) / std


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Mixed precision for a training step (``--amp``): the forward pass under
    torch.autocast in bfloat16 or float16, backward and the optimizer step
    outside it; float16 scales the loss (torch.amp.GradScaler) so that small
    gradients do not flush to zero. ``Precision(device, None)`` is plain float32."""

    def __init__(self, device: torch.device, amp: Optional[str] = None):
        self.device = torch.device(device)
        self.amp = amp
        self.dtype = AMP_DTYPES[amp] if amp else None
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def autocast(self):
        """The context for forward passes (a no-op without --amp)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """zero_grad, backward and the optimizer step (through the scaler for float16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> Dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FLOAT32 = Precision("cpu")


def random_crop_flip(x, generator, padding=4):
    """The standard CIFAR augmentation on a batch: pad with zeros, take a random
    crop of the original size, and flip horizontally with probability 1/2
    (padding 0: the flips alone)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    # Drawn on the CPU generator whatever the device: a run is the same on a GPU.
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    idx_c = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    index = [t.to(x.device) for t in (idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w))]
    return padded[tuple(index)]


class Recipe:
    """Base class. Subclasses set the class attributes and implement build()."""

    name = ""
    dataset = "mnist"  # "mnist" or "cifar10"
    description = ""
    epochs = 1
    batch_size = 64
    lr = 1e-3
    lr_schedule = "constant"  # or "cosine" (annealed per step over the run's epochs)
    eval_batch_size = 1000
    share = SINGLE  # this process's place among the training processes (distributed.Share)

    def configured(self, config):
        """The recipe adjusted to run options (e.g. --noise); default: unchanged."""
        return self

    def build(self):
        """The model, made of torch.nn layers."""
        raise NotImplementedError

    def distribute(self, model, wrap):
        """What train_batch gets among several processes: by default the model wrapped
        by wrap (in DistributedDataParallel). A recipe whose steps call parts of the
        model wraps those parts instead."""
        return wrap(model)

    def losses(self):
        """Loss modules (patched along with the model); default: cross-entropy."""
        return {"cross_entropy": torch.nn.CrossEntropyLoss()}

    def optimizers(self, model, lr):
        return {"model": torch.optim.Adam(model.parameters(), lr=lr)}

    def prepare(self, images, labels, train, generator):
        """uint8 images -> model inputs (normalization, augmentation)."""
        raise NotImplementedError

    def train_batch(self, model, losses, optimizers, x, y, step=0, precision=FLOAT32):
        """One optimization step (`step`: the batch's index in the epoch), its
        forward passes under precision.autocast() and its updates through
        precision.step(); returns a dict of floats (the first is the loss shown
        in the progress bar and the running-loss curve; a key may be missing
        from some batches)."""
        raise NotImplementedError

    def evaluate(self, model, losses, data, prepare):
        """Test-set metrics: a dict of floats, plus a dict of extra results
        (arrays for the plots) that are not logged per epoch."""
        raise NotImplementedError

    def curve_keys(self, history):
        """The per-epoch quantities drawn in loss_curves.png."""
        return ("train_loss", "test_loss")

    def plots(self, model, losses, history, extras, out_dir, test_data, prepare):
        """Writes the recipe's own pictures; returns their file names."""
        return []


class ClassifierRecipe(Recipe):
    """Images -> class logits, trained with cross-entropy."""

    mean, std = MNIST_MEAN, MNIST_STD
    augment = "none"  # a key of AUGMENTATIONS

    def configured(self, config):
        if config.augment is None or config.augment == self.augment:
            return self
        recipe = copy.copy(self)
        recipe.augment = config.augment
        return recipe

    def prepare(self, images, labels, train, generator):
        x = normalize(images, self.mean, self.std)
        padding = AUGMENTATIONS[self.augment]
        if train and padding is not None:
            x = random_crop_flip(x, generator, padding)
        return x, labels

    def train_batch(self, model, losses, optimizers, x, y, step=0, precision=FLOAT32):
        with precision.autocast():
            loss = losses["cross_entropy"](model(x), y)
        precision.step(loss, optimizers["model"])
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, model, losses, data, prepare):
        total_loss, correct = 0.0, 0
        classes = len(data.classes)
        confusion = torch.zeros(classes, classes, dtype=torch.long)
        for images, labels in data.batches(self.eval_batch_size):
            x, y = prepare(images, labels)
            logits = model(x)
            total_loss += losses["cross_entropy"](logits, y).item() * len(y)
            predicted = logits.argmax(1)
            correct += (predicted == y).sum().item()
            confusion += torch.bincount((y * classes + predicted).cpu(),
                                        minlength=classes * classes).view(classes, classes)
        n = len(data)
        return ({"test_loss": total_loss / n, "test_accuracy": correct / n},
                {"confusion_matrix": confusion.tolist()})

    def plots(self, model, losses, history, extras, out_dir, test_data, prepare):
        from . import plots

        return [plots.confusion_matrix(extras["confusion_matrix"], test_data.classes, out_dir)]
