"""Datasets for the training CLI, decoded once and kept in memory as uint8 tensors.

* MNIST: the IDX files ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
  (torchvision's layout), read and checked here (magic numbers, sizes, label
  range); ``download=True`` fetches them with torchvision.
* CIFAR-10: an image tree ``<root>/cifar10/{train,test}/<class>/*.jpg|png``
  (classes sorted alphabetically, which is CIFAR-10's label order), or
  torchvision's ``<root>/cifar-10-batches-py``. Decoding the 60,000 images of
  the tree takes most of a minute, so the decoded tensors are cached in one
  file next to the data (``<root>/cifar10/.<split>.handgrad-cache.pt``, or
  under ``~/.cache/handgrad`` when the data folder is read-only) and rebuilt
  when the tree changes (a file added, removed, resized or touched).

Every defect of the data -- a bad magic number, a truncated file, fewer labels
than images, a label out of range, an image that does not decode or has the
wrong size, train and test class lists that differ -- raises DataError with a
message naming the file, never a traceback from deep inside a decoder. Epochs
index the tensors in an order drawn from a generator the trainer owns (and
checkpoints), so runs are reproducible.
"""

import hashlib
import os
import struct
from typing import Iterator, Optional, Sequence, Tuple

import torch

DATASETS = ("mnist", "cifar10")
MNIST_FILES = {True: "train", False: "t10k"}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
CIFAR_SIZE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
CACHE_FORMAT = 1


class DataError(Exception):
    """The data cannot be used; the message says which file and why."""


class DataNotFound(DataError):
    """The data is not where the user pointed; the message says what was searched."""


class ImageData:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), class names."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 source: str):
        self.images, self.labels, self.classes, self.source = images, labels, list(classes), source

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        return self.batches_in_order(order[:stop], batch_size)

    def batches_in_order(self, order: Sequence[int], batch_size: int
                         ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) batches of the images at the indices `order`, in that order."""
        order = torch.as_tensor(order, dtype=torch.long)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.images[idx], self.labels[idx]

    def subset(self, limit: int, seed: int) -> "ImageData":
        """`limit` images drawn at random (seeded) with the classes as balanced as
        the data allows: the first images of a class-sorted order would all be
        one class (CIFAR-10's tree lists airplanes first)."""
        if limit >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        labels = self.labels[order]
        # Rank of each image among the images of its class in the random order;
        # taking the lowest ranks first interleaves the classes.
        rank = torch.empty_like(order)
        for label in labels.unique():
            members = (labels == label).nonzero().flatten()
            rank[members] = torch.arange(len(members))
        by_rank = torch.sort(rank * (int(labels.max()) + 1) + labels, stable=True).indices
        chosen = order[by_rank[:limit]].sort().values
        return ImageData(self.images[chosen], self.labels[chosen], self.classes,
                         "%s[%d class-balanced, seed %d]" % (self.source, limit, seed))


def check_labels(data: ImageData, where: str) -> ImageData:
    """Labels must index the class list."""
    if len(data.labels) and (int(data.labels.min()) < 0
                             or int(data.labels.max()) >= len(data.classes)):
        bad = data.labels[(data.labels < 0) | (data.labels >= len(data.classes))]
        raise DataError("%s holds label %d, outside 0..%d for its %d classes"
                        % (where, int(bad[0]), len(data.classes) - 1, len(data.classes)))
    return data


def check_same_classes(train: ImageData, test: ImageData) -> None:
    """Train and test must name the same classes in the same order, or test labels
    would mean other classes than the ones the model learned."""
    if list(train.classes) == list(test.classes):
        return
    missing = [c for c in train.classes if c not in test.classes]
    extra = [c for c in test.classes if c not in train.classes]
    parts = (["the test set lacks %s" % ", ".join(missing)] if missing else []) + \
            (["the test set has %s, absent from the training set" % ", ".join(extra)]
             if extra else [])
    raise DataError("training and test classes differ (%s): %s; both splits must hold "
                    "the same classes" % (train.source, "; ".join(parts) or "in another order"))


def _optional(module):
    """Imports a package of the [train] extra, or says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError("reading this data needs the optional package %s: "
                        "pip install handgrad[train]" % module.split(".")[0]) from None


def _require_root(root):
    if not os.path.isdir(root):
        raise DataNotFound("data root %s does not exist; point --data-root at the folder holding "
                           "MNIST/raw or cifar10/ (or pass --download)" % os.path.abspath(root))


# -- MNIST ------------------------------------------------------------------------------------
def read_idx(path: str, magic: int, dims: int) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format) as a uint8 tensor."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError("cannot read %s: %s" % (path, e.strerror or e)) from None
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError("%s is truncated: %d bytes, shorter than its %d-byte header"
                        % (path, len(data), header))
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise DataError("%s is not an MNIST %s file: magic number %d, expected %d"
                        % (path, "image" if magic == IMAGE_MAGIC else "label", found, magic))
    shape = struct.unpack(">%dI" % dims, data[4:header])
    size = 1
    for d in shape:
        size *= d
    if len(data) != header + size:
        raise DataError("%s holds %d bytes of data, but its header announces %s = %d"
                        % (path, len(data) - header, "x".join(map(str, shape)), size))
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*shape)


def load_mnist(root: str, train: bool, download: bool = False) -> ImageData:
    raw = os.path.join(root, "MNIST", "raw")
    if download:
        _optional("torchvision.datasets").MNIST(root, train=train, download=True)
    else:
        _require_root(root)
        if not os.path.isdir(raw):
            raise DataNotFound("MNIST not found: searched %s for torchvision's MNIST/raw files; "
                               "point --data-root at the folder that contains MNIST/ "
                               "(or pass --download to fetch it)" % os.path.abspath(raw))
    prefix = os.path.join(raw, MNIST_FILES[train])
    paths = [prefix + "-images-idx3-ubyte", prefix + "-labels-idx1-ubyte"]
    for path in paths:
        if not os.path.exists(path):
            raise DataNotFound("MNIST file %s is missing (or pass --download)"
                               % os.path.abspath(path))
    images = read_idx(paths[0], IMAGE_MAGIC, 3)
    labels = read_idx(paths[1], LABEL_MAGIC, 1).long()
    if len(labels) != len(images):
        raise DataError("%s holds %d labels for the %d images of %s"
                        % (paths[1], len(labels), len(images), paths[0]))
    data = ImageData(images.unsqueeze(1).contiguous(), labels, [str(d) for d in range(10)],
                     "MNIST(%s)" % prefix)
    return check_labels(data, paths[1])


# -- CIFAR-10 ---------------------------------------------------------------------------------
def _image_tree(folder):
    """(class names, [(path, label)]) of an ImageFolder-style tree."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError("%s holds no class folders (expected %s/<class>/*.jpg)" % (folder, folder))
    samples = []
    for label, name in enumerate(classes):
        with os.scandir(os.path.join(folder, name)) as entries:
            files = sorted(e.name for e in entries
                           if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        samples += [(os.path.join(folder, name, f), label) for f in files]
    if not samples:
        raise DataError("no images under %s" % folder)
    return classes, samples


def _fingerprint(samples):
    """Changes when an image is added, removed, renamed, resized or modified."""
    digest = hashlib.sha256(b"%d" % CACHE_FORMAT)
    for path, label in samples:
        st = os.stat(path)
        digest.update(("%s|%d|%d|%d\n" % (path, label, st.st_size, st.st_mtime_ns)).encode())
    return digest.hexdigest()


def _decode(path):
    Image = _optional("PIL.Image")

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError("cannot decode image %s: %s" % (path, e)) from None
    if rgb.size != (CIFAR_SIZE, CIFAR_SIZE):
        raise DataError("image %s is %dx%d; CIFAR-10 images are %dx%d"
                        % ((path,) + rgb.size + (CIFAR_SIZE, CIFAR_SIZE)))
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(
        CIFAR_SIZE, CIFAR_SIZE, 3).permute(2, 0, 1)


def _cache_paths(root, split):
    beside = os.path.join(root, "cifar10", ".%s.handgrad-cache.pt" % split)
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return [beside, os.path.join(home, "handgrad", "cifar10-%s-%s.pt" % (key, split))]


def _read_cache(paths, fingerprint):
    for path in paths:
        try:
            cached = torch.load(path, weights_only=True)
        except Exception:  # absent, or a torn/foreign file: decode again
            continue
        if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
            return cached
    return None


def _write_cache(paths, payload):
    from .checkpoint import atomic_write

    for path in paths:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, lambda f: torch.save(payload, f))
            return path
        except OSError:  # a read-only data folder: try the next place
            continue
    return None


def _load_cifar_tree(root, folder, split, progress):
    from tqdm import tqdm

    classes, samples = _image_tree(folder)
    fingerprint = _fingerprint(samples)
    paths = _cache_paths(root, split)
    cached = _read_cache(paths, fingerprint)
    if cached is not None:
        return cached["images"], cached["labels"], cached["classes"]
    bar = tqdm(samples, desc="decoding CIFAR-10 %s (once; cached afterwards)" % split,
               unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    images = torch.stack([_decode(path) for path, _ in bar])
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    _write_cache(paths, {"fingerprint": fingerprint, "images": images, "labels": labels,
                         "classes": classes})
    return images, labels, classes


def load_cifar10(root: str, train: bool, download: bool = False,
                 progress: bool = True) -> ImageData:
    split = "train" if train else "test"
    tree = os.path.join(root, "cifar10", split)
    if os.path.isdir(tree) and not download:
        images, labels, classes = _load_cifar_tree(root, tree, split, progress)
        return check_labels(ImageData(images, labels, classes, "ImageFolder(%s)" % tree), tree)
    batches = os.path.join(root, "cifar-10-batches-py")
    if not download:
        _require_root(root)
        if not os.path.isdir(batches):
            raise DataNotFound("CIFAR-10 not found: searched %s (an ImageFolder tree) and %s "
                               "(torchvision's CIFAR-10 files); point --data-root at the folder "
                               "that contains one of them (or pass --download)"
                               % (os.path.abspath(tree), os.path.abspath(batches)))
    CIFAR10 = _optional("torchvision.datasets").CIFAR10
    try:
        ds = CIFAR10(root, train=train, download=download)
    except Exception as e:  # torchvision's checks and unpickling: name the folder
        raise DataError("CIFAR-10 could not be read from %s: %s" % (batches, e)) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.long)
    if len(labels) != len(images):
        raise DataError("%s holds %d labels for %d images" % (batches, len(labels), len(images)))
    return check_labels(ImageData(images, labels, list(ds.classes), "CIFAR10(%s)" % root), batches)


def load(name: str, root: str, train: bool, download: bool = False,
         progress: bool = True) -> ImageData:
    """The `train` or test split of dataset `name` ("mnist" or "cifar10") under `root`."""
    if name == "mnist":
        return load_mnist(root, train, download)
    if name == "cifar10":
        return load_cifar10(root, train, download, progress)
    raise ValueError("unknown dataset %r (have %s)" % (name, ", ".join(DATASETS)))
