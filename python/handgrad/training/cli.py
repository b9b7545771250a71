"""``handgrad train MODEL ...`` and ``handgrad compare`` (also ``python -m handgrad``).

Every problem a user can cause -- a bad argument, missing or broken data, an
unreadable checkpoint, an output folder that cannot be written -- ends the
command with one line on stderr and exit status 2, never a traceback.
"""

import argparse
import os
import sys

from .options import AMP_CHOICES, AUGMENTATIONS, BACKENDS, DEVICE_CHOICES, LR_SCHEDULES


class OneLineErrors(argparse.ArgumentParser):
    """Argument errors as one line on stderr (no usage block, no traceback)."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def _model_names():
    try:
        from .. import models
    except ImportError:  # no torch: --help still works
        return []
    return sorted(models.RECIPES)


def add_train_arguments(p):
    p.add_argument("model", help="one of: " + (", ".join(_model_names()) or "(needs torch)"))
    p.add_argument("--data-root", default=os.environ.get("HANDGRAD_DATA", "data"),
                   help="folder holding MNIST/raw and/or cifar10/{train,test} "
                        "(default: $HANDGRAD_DATA or ./data)")
    p.add_argument("--epochs", type=int, help="number of epochs (default: the model's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the model's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the model's)")
    p.add_argument("--backend", default="handgrad", choices=BACKENDS,
                   help="run conv/pool/cross-entropy/LSTM/attention on handgrad's ops or natively")
    p.add_argument("--out", help="output folder (default: runs/MODEL-BACKEND)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--download", action="store_true",
                   help="download the dataset into --data-root if it is missing")
    p.add_argument("--limit", type=int,
                   help="train on N training images only, drawn at random with --seed and "
                        "balanced over the classes")
    p.add_argument("--noise", type=float, default=0.0,
                   help="autoencoders: std of Gaussian noise added to inputs (denoising)")
    p.add_argument("--d-steps", type=int, default=1,
                   help="GAN: discriminator steps per generator step")
    p.add_argument("--augment", choices=AUGMENTATIONS,
                   help="classifiers: augmentation of the training images: none, flip "
                        "(horizontal, probability 1/2) or crop-flip (random 32x32 crop of the "
                        "image zero-padded by 4, then flip) (default: the model's; flip for "
                        "cifar_cnn, none for the others)")
    p.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                   help="same as --augment none")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="learning rate over the run: constant, or cosine annealing to 0 per step "
                        "(default: the model's)")
    p.add_argument("--device", default="auto",
                   help="where to train: %s (default auto: the GPU when one is usable)"
                        % DEVICE_CHOICES)
    p.add_argument("--amp", choices=AMP_CHOICES,
                   help="mixed precision: forward passes under torch.autocast in bfloat16 or "
                        "float16 (float16 with loss scaling); default: float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def validate(args):
    from .. import models

    if args.model not in models.RECIPES:
        raise ValueError("unknown model %r; valid models: %s"
                         % (args.model, ", ".join(sorted(models.RECIPES))))
    for name in ("epochs", "batch_size", "threads", "limit", "d_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError("--%s must be positive, got %d" % (name.replace("_", "-"), value))
    if args.lr is not None and not args.lr > 0:
        raise ValueError("--lr must be positive, got %g" % args.lr)
    if not 0 <= args.noise:
        raise ValueError("--noise must be non-negative, got %g" % args.noise)
    if not args.download and not os.path.isdir(args.data_root):
        raise ValueError("data root %s does not exist; point --data-root at the folder holding "
                         "MNIST/raw or cifar10/ (or pass --download)"
                         % os.path.abspath(args.data_root))


def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _error_printer():
    """Prints a one-line error; among torchrun's processes only rank 0 does, since
    every process meets the same problem."""
    quiet = os.environ.get("RANK", "0") not in ("", "0")
    return lambda message: None if quiet else print(message, file=sys.stderr)


def run(args):
    from . import distributed
    from .checkpoint import CheckpointError
    from .data import DataError
    from .trainer import Run, TrainConfig

    error = _error_printer()
    try:
        validate(args)
        config = TrainConfig(model=args.model, data_root=args.data_root, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, backend=args.backend,
                             out=args.out, seed=args.seed, resume=args.resume,
                             threads=args.threads, download=args.download, limit=args.limit,
                             noise=args.noise, d_steps=args.d_steps, augment=args.augment,
                             lr_schedule=args.lr_schedule, device=args.device, amp=args.amp,
                             progress=not args.no_progress)
        Run(config).fit()
        distributed.stop(finished=True)
    except (ValueError, DataError, CheckpointError) as e:
        error("handgrad train: error: %s" % _one_line(e))
        return 2
    except OSError as e:  # e.g. the disk filled up while writing the checkpoint
        error("handgrad train: error: %s" % _one_line(e))
        return 2
    except (RuntimeError, TypeError, NotImplementedError) as e:
        if distributed.lost_a_process(e):
            # torchrun ends the other processes too; every process may say this.
            print("handgrad train: error: process %s lost the other training processes (%s); "
                  "the checkpoint of the last finished epoch is intact: continue with --resume"
                  % (os.environ.get("RANK", "0"), _one_line(e)[:300]), file=sys.stderr)
            return 1
        if "handgrad::" not in str(e) or not args.amp:
            raise
        # An op without kernels for the autocast dtype on this device.
        error("handgrad train: error: --amp %s: %s" % (args.amp, str(e).strip().splitlines()[0]))
        return 2
    except KeyboardInterrupt:
        error("handgrad train: interrupted; continue with --resume")
        return 130
    finally:
        distributed.stop()
    return 0


def add_compare_arguments(p):
    p.add_argument("runs", nargs="+", help="output folders of `handgrad train` runs")
    p.add_argument("--key", default="train_loss",
                   help="per-epoch quantity to plot (default train_loss)")
    p.add_argument("--labels", help="comma-separated curve labels (default: the folder names)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=None)


def compare(args):
    """Plots one per-epoch quantity of several runs on one plot."""
    import json

    from . import plots

    labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(r))
                                                         for r in args.runs]
    if len(labels) != len(args.runs):
        print("handgrad compare: error: %d labels for %d runs" % (len(labels), len(args.runs)),
              file=sys.stderr)
        return 2
    runs = {}
    for label, run in zip(labels, args.runs):
        path = os.path.join(run, "metrics.json")
        try:
            with open(path) as f:
                history = json.load(f)["history"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print("handgrad compare: error: cannot read %s: %s" % (path, e), file=sys.stderr)
            return 2
        if history and args.key not in history[0]:
            print("handgrad compare: error: %s has no %r (it has %s)"
                  % (path, args.key, ", ".join(sorted(history[0]))), file=sys.stderr)
            return 2
        runs[label] = history
    out_dir, name = os.path.split(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
        plots.compare_runs(runs, args.key, out_dir, name, args.title or args.key.replace("_", " "))
    except OSError as e:
        print("handgrad compare: error: cannot write %s: %s" % (args.out, e.strerror or e),
              file=sys.stderr)
        return 2
    print("wrote %s" % args.out)
    return 0
