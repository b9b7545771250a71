"""One process of a test of data-parallel training, started by torchrun from
tests/test_distributed.py: trains each of --models for the given settings in
one process group, the way ``handgrad train`` does, with the options a test
needs and the command line lacks (--no-dropout).

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py --models mnist_gan ...
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from handgrad import models
from handgrad.training import distributed
from handgrad.training.trainer import Run, TrainConfig


def without_dropout(module):
    """Dropout draws a mask per process for that process's share of the batch, so a
    run with dropout is not bit-for-bit the single-process run (distributed.py)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            module.add_module(name, nn.Identity())
        else:
            without_dropout(child)
    return module


def main():
    try:
        train(parse())
        distributed.stop(finished=True)  # as `handgrad train` does, before interpreter shutdown
    finally:
        distributed.stop()


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--no-dropout", action="store_true")
    return p.parse_args()


def train(args):
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for name in args.models.split(","):
        if args.no_dropout:
            recipe = models.RECIPES[name]
            build = type(recipe).build
            recipe.build = lambda recipe=recipe, build=build: without_dropout(build(recipe))
        config = TrainConfig(model=name, data_root=args.data_root, epochs=args.epochs,
                             batch_size=args.batch_size, out=os.path.join(args.out, name),
                             limit=args.limit, threads=1, progress=False, device="cpu")
        run = Run(config)
        if run.share.is_main:  # the weights before training, to measure how far they moved
            torch.save(run.model.state_dict(), os.path.join(config.out, "initial.pt"))
        run.fit()


if __name__ == "__main__":
    main()
