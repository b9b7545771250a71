"""PNG pictures of a training run (matplotlib, no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _curves(history, keys, out_dir, name, title, ylabel, running=None):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if running:
        xs, ys = zip(*[(r["epoch"], r["loss"]) for r in running])
        ax.plot(xs, ys, color="0.7", lw=1, label="running train loss")
    epochs = [h["epoch"] for h in history]
    for key in keys:
        if history and key in history[0]:
            ax.plot(epochs, [h[key] for h in history], marker="o", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, name)


def loss_curves(history, running, out_dir, keys=("train_loss", "test_loss"), name="loss_curves.png",
                title="Loss"):
    """Per-epoch losses, plus the running training loss within epochs."""
    return _curves(history, keys, out_dir, name, title, "loss", running)


def metric_curves(history, keys, out_dir, name, title, ylabel="value"):
    """Per-epoch values of the given history keys on one plot."""
    return _curves(history, keys, out_dir, name, title, ylabel)


def compare_runs(runs, key, out_dir, name, title):
    """One curve per run (label -> history) of a per-epoch quantity."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, history in runs.items():
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, name)


def confusion_matrix(matrix, classes, out_dir, name="confusion_matrix.png"):
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(m) / max(1, m.sum())
    ax.set_title("Test confusion matrix (accuracy %.2f%%)" % (100 * accuracy))
    threshold = m.max() / 2 if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > threshold else "black")
    return _save(fig, out_dir, name)


def image_grid(images, out_dir, name, title, columns=8, row_labels=None, cmap="gray",
               symmetric=False, value_range=None):
    """images: (N, C, H, W) float tensor. With value_range=(lo, hi) all images
    share that scale (values outside are clipped); otherwise each is scaled to
    [0, 1] on its own (symmetric: zero maps to the middle of the colour map)."""
    images = images.detach().float().cpu()
    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.1 + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k]
        if value_range is not None:
            lo, hi = value_range
            img = ((img - lo) / (hi - lo)).clamp(0, 1)
        elif symmetric:
            scale = img.abs().max()
            img = img / (2 * scale) + 0.5 if scale > 0 else img * 0 + 0.5
        else:
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else img * 0
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap=cmap, interpolation="nearest")
    if row_labels:
        for r, label in enumerate(row_labels[:rows]):
            axes[r][0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title)
    return _save(fig, out_dir, name)


def filter_grid(weight, out_dir, name, title):
    """Convolution filters (out, in, kh, kw) as a grid of small images."""
    return image_grid(weight.detach()[:, :1] if weight.shape[1] != 3 else weight.detach(),
                      out_dir, name, title, columns=8, cmap="bwr", symmetric=True)


def embedding_scatter(points, labels, out_dir, name, title):
    """2-D points coloured by label."""
    points = torch.as_tensor(points).cpu().numpy()
    labels = torch.as_tensor(labels).cpu().numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=2, alpha=0.6)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_title(title)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    return _save(fig, out_dir, name)
