"""Checkpoints and metrics files, written atomically and read back safely.

A file is written to a temporary name in the same folder, flushed to disk and
then renamed over the old one, so a run killed at any moment leaves either the
previous complete file or the new complete file, never a torn one; a
temporary file a kill left behind is removed by the next run in that folder.
Files get the mode the umask gives new files (mkstemp's private 0600 is
widened), like the PNGs written next to them.

Checkpoints hold tensors, numbers, strings and containers only (the numpy
random state is stored as a tensor), so ``--resume`` reads them with
``torch.load(weights_only=True)``: a checkpoint cannot run code. Tensors are
loaded onto the CPU and moved by load_state_dict, so a checkpoint written on a
GPU resumes on the CPU and the other way round.
"""

import glob
import json
import os
import random
import tempfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
REQUIRED_KEYS = ("config", "epoch", "model", "optimizers", "rng", "history", "running")


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed; the message names the file and the fix."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Writes `path` through write(file) so that it is either old or new, never torn."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(out_dir: str) -> list:
    """Deletes the temporary files of writes that a kill interrupted; returns them."""
    stale = []
    for name in (CHECKPOINT, METRICS):
        for path in glob.glob(os.path.join(glob.escape(out_dir), "." + name + ".*")):
            os.unlink(path)
            stale.append(path)
    return stale


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(out_dir: str, payload: Dict[str, Any]) -> None:
    atomic_write(os.path.join(out_dir, CHECKPOINT), lambda f: torch.save(payload, f))


def load_checkpoint(out_dir: str) -> Optional[Dict[str, Any]]:
    """The checkpoint in `out_dir` (tensors on the CPU), None if there is none;
    CheckpointError if it is empty, truncated, corrupt, unsafe or incomplete."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    fix = "delete it to start over, or choose another --out"
    if os.path.getsize(path) == 0:
        raise CheckpointError("checkpoint %s is empty; %s" % (path, fix))
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors alike
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError("checkpoint %s cannot be read (truncated, corrupt, or not a "
                              "handgrad checkpoint: %s); %s" % (path, reason[:200], fix)) from None
    if not isinstance(saved, dict):
        raise CheckpointError("checkpoint %s is not a handgrad checkpoint; %s" % (path, fix))
    missing = [k for k in REQUIRED_KEYS if k not in saved]
    if missing:
        raise CheckpointError("checkpoint %s lacks %s; %s" % (path, ", ".join(missing), fix))
    return saved


def save_metrics(out_dir: str, metrics: Dict[str, Any]) -> None:
    atomic_write(os.path.join(out_dir, METRICS),
                 lambda f: f.write(json.dumps(metrics, indent=2).encode()))
