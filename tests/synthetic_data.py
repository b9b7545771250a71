"""Tiny datasets made by the tests, in the on-disk formats the CLI reads.

Each class is a bright square at its own place on a noisy background, so a
model learns it within a few steps.
"""

import os
import struct

import numpy as np


def _images(n, size, channels, seed, classes=10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    cell = size // 4
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 4)
        images[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell, :] = 230
    return images, labels.astype(np.uint8)


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for dim in array.shape:
            f.write(struct.pack(">I", dim))
        f.write(np.ascontiguousarray(array).tobytes())


def write_mnist(root, train=256, test=128, seed=0):
    """<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, as torchvision reads them."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n, s in (("train", train, seed), ("t10k", test, seed + 1)):
        images, labels = _images(n, 28, 1, s)
        _write_idx(os.path.join(raw, "%s-images-idx3-ubyte" % prefix), images[..., 0], 2051)
        _write_idx(os.path.join(raw, "%s-labels-idx1-ubyte" % prefix), labels, 2049)
    return root


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def write_cifar10_tree(root, train=200, test=100, seed=0):
    """<root>/cifar10/{train,test}/<class>/NNNN.jpg, as torchvision's ImageFolder reads them."""
    from PIL import Image

    for split, n, s in (("train", train, seed), ("test", test, seed + 1)):
        images, labels = _images(n, 32, 3, s)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, "cifar10", split, CIFAR_CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, "%04d.jpg" % i), quality=95)
    return root
