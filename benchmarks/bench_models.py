"""Whole models: one training step's forward+backward, handgrad against native.

    python benchmarks/bench_models.py [--threads 2]

Each case builds the model once from torch.nn layers, and a copy patched onto
handgrad's ops (same weights); both compute the training loss of the same batch
and its backward. The model's own batch size is used (lenet5 at 16, not its
tutorial batch of 4, to keep the table quick; see docs/results.md for epoch
times at the training batch sizes).
"""

import copy
import sys

import torch

import harness
from handgrad import models

CASES = [("lenet5", 16), ("cifar_cnn", 128), ("mnist_cnn", 128), ("lstm_mnist", 128),
         ("vit_mnist", 128), ("mnist_cae", 128), ("mnist_vae", 128), ("mnist_gan", 128)]


def _loss_fn(name, recipe, model, losses):
    if name == "mnist_gan":  # the discriminator's loss on real and generated images
        def step(x, y):
            n = len(x)
            torch.manual_seed(0)
            fake = model.sample(n)
            logits = model.discriminator(torch.cat([x, fake]))
            target = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
            return losses["cross_entropy"](logits, target)
        return step
    if "cross_entropy" in losses and recipe.dataset in ("mnist", "cifar10") and \
            name not in ("mnist_cae", "mnist_vae"):
        return lambda x, y: losses["cross_entropy"](model(x), y)
    return lambda x, y: recipe.loss(model, x, x)[0]["loss"]


def make_cases(device):
    cases = []
    for name, batch in CASES:
        recipe = models.recipe(name)
        torch.manual_seed(0)
        native = recipe.build().to(device)
        mine = models.apply_backend(copy.deepcopy(native), "handgrad")
        native_losses = recipe.losses()
        my_losses = {k: models.apply_backend(copy.deepcopy(v), "handgrad")
                     for k, v in native_losses.items()}
        shape = (batch, 3, 32, 32) if recipe.dataset == "cifar10" else (batch, 1, 28, 28)

        def make_inputs(recipe=recipe, shape=shape):
            g = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            labels = torch.randint(0, 10, (shape[0],), generator=g)
            x, y = recipe.prepare(images, labels, train=False, generator=g)
            return [x.to(device), y.to(device)]

        cases.append(harness.Case(
            name="%s batch %d" % (name, batch), make_inputs=make_inputs,
            handgrad=_loss_fn(name, recipe, mine, my_losses),
            native=_loss_fn(name, recipe, native, native_losses)))
    return cases


if __name__ == "__main__":
    sys.exit(harness.main("models", make_cases))
