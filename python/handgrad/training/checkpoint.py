"""Checkpoints and metrics files, written atomically.

A file is written to a temporary name in the same folder, flushed to disk and
then renamed over the old one, so a run killed at any moment leaves either the
previous complete file or the new complete file, never a torn one.
"""

import json
import os
import random
import tempfile

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state(generators):
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng_state(state, generators):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def save_checkpoint(out_dir, payload):
    _atomic_write(os.path.join(out_dir, CHECKPOINT), lambda f: torch.save(payload, f))


def load_checkpoint(out_dir):
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def save_metrics(out_dir, metrics):
    _atomic_write(os.path.join(out_dir, METRICS),
                  lambda f: f.write(json.dumps(metrics, indent=2).encode()))
