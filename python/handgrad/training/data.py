"""Datasets for the training CLI, read through torchvision and kept in memory.

MNIST is read with torchvision.datasets.MNIST (``<root>/MNIST/raw``).
CIFAR-10 is read with torchvision.datasets.CIFAR10 (``<root>/cifar-10-batches-py``)
or, when the root holds an image tree ``<root>/cifar10/{train,test}/<class>/``,
with torchvision.datasets.ImageFolder (classes sorted alphabetically, which is
CIFAR-10's label order). Downloads happen only with ``download=True``.

Both are decoded once into uint8 tensors: epochs then index tensors instead
of decoding images one by one, and the order of every epoch comes from a
generator the trainer owns (and checkpoints), so runs are reproducible.
"""

import os

import torch

DATASETS = ("mnist", "cifar10")


class DataNotFound(Exception):
    """The data is not where the user pointed; the message says what was searched."""


class ImageData:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), class names."""

    def __init__(self, images, labels, classes, source):
        self.images, self.labels, self.classes, self.source = images, labels, classes, source

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size, generator=None, drop_last=False):
        """(uint8 images, labels) batches; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.images[idx], self.labels[idx]


def _require_root(root):
    if not os.path.isdir(root):
        raise DataNotFound("data root %s does not exist; point --data-root at the folder holding "
                           "MNIST/raw or cifar10/ (or pass --download)" % os.path.abspath(root))


def load_mnist(root, train, download=False):
    from torchvision.datasets import MNIST

    raw = os.path.join(root, "MNIST", "raw")
    if not download:
        _require_root(root)
        if not os.path.isdir(raw):
            raise DataNotFound("MNIST not found: searched %s for torchvision's MNIST/raw files; "
                               "point --data-root at the folder that contains MNIST/ "
                               "(or pass --download to fetch it)" % os.path.abspath(raw))
    try:
        ds = MNIST(root, train=train, download=download)
    except RuntimeError as e:
        raise DataNotFound("MNIST could not be read from %s: %s" % (os.path.abspath(raw), e)) from None
    return ImageData(ds.data.unsqueeze(1).contiguous(), ds.targets.long(), list(map(str, range(10))),
                     "torchvision.datasets.MNIST(%s)" % root)


def _decode_image_folder(folder):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    ds = ImageFolder(folder)
    if len(ds) == 0:
        raise DataNotFound("no images under %s" % folder)
    images = torch.stack([pil_to_tensor(ds.loader(path).convert("RGB")) for path, _ in ds.samples])
    labels = torch.tensor([label for _, label in ds.samples], dtype=torch.long)
    return images, labels, ds.classes


def load_cifar10(root, train, download=False):
    split = "train" if train else "test"
    tree = os.path.join(root, "cifar10", split)
    if os.path.isdir(tree) and not download:
        images, labels, classes = _decode_image_folder(tree)
        return ImageData(images, labels, classes, "torchvision.datasets.ImageFolder(%s)" % tree)
    from torchvision.datasets import CIFAR10

    batches = os.path.join(root, "cifar-10-batches-py")
    if not download:
        _require_root(root)
        if not os.path.isdir(batches):
            raise DataNotFound("CIFAR-10 not found: searched %s (an ImageFolder tree) and %s "
                               "(torchvision's CIFAR-10 files); point --data-root at the folder "
                               "that contains one of them (or pass --download)"
                               % (os.path.abspath(tree), os.path.abspath(batches)))
    ds = CIFAR10(root, train=train, download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes),
                     "torchvision.datasets.CIFAR10(%s)" % root)


def load(name, root, train, download=False):
    if name == "mnist":
        return load_mnist(root, train, download)
    if name == "cifar10":
        return load_cifar10(root, train, download)
    raise ValueError("unknown dataset %r (have %s)" % (name, ", ".join(DATASETS)))
