"""Pictures: palettes, colourised label maps, image/mask grids and merge-trajectory plots."""

from __future__ import annotations

import colorsys
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "palette",
    "colorize",
    "overlay",
    "image_grid",
    "save_png",
    "cluster_map_figure",
    "trajectory_plot",
    "training_curves_plot",
    "curves_plot",
    "image_rows_figure",
    "gan_curves_plot",
]


def palette(k: int, seed: int = 0) -> np.ndarray:
    """``[k, 3]`` uint8 colours, well spread in hue/lightness, deterministic."""
    cols = []
    golden = 0.618033988749895
    h = (0.11 + 0.37 * seed) % 1.0
    for i in range(k):
        h = (h + golden) % 1.0
        light = 0.45 + 0.2 * ((i // 3) % 2)
        sat = 0.85 - 0.25 * ((i // 6) % 2)
        cols.append(colorsys.hls_to_rgb(h, light, sat))
    return (np.asarray(cols) * 255).round().astype(np.uint8).reshape(k, 3)


def colorize(labels: np.ndarray, colors: Optional[np.ndarray] = None) -> np.ndarray:
    """``labels [..., H, W]`` int → ``[..., H, W, 3]`` uint8 (negative labels are black)."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if labels.size else 1
    colors = palette(max(k, 1)) if colors is None else np.asarray(colors, np.uint8)
    out = colors[np.clip(labels, 0, len(colors) - 1)]
    out[labels < 0] = 0
    return out


def overlay(images: np.ndarray, labels: np.ndarray, alpha: float = 0.5, colors=None) -> np.ndarray:
    """Blend colourised labels over uint8 images ``[..., H, W, 3]``."""
    c = colorize(labels, colors).astype(np.float32)
    return (alpha * c + (1 - alpha) * np.asarray(images, np.float32)).round().astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int = 8, pad: int = 2, fill: int = 255) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 → one ``[rows·(H+pad), cols·(W+pad), 3]`` image."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray) -> str:
    """Write ``image [H, W, 3]`` uint8 as a PNG (folders created); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return path


def _plt():
    """matplotlib's pyplot on the Agg backend, imported on first use: it costs about as much as the rest of
    gansem's imports together and only the figures need it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str, title: Optional[str] = None, dpi: int = 110) -> str:
    """Title, tight layout, write ``path`` (its folder created) and close ``fig``; returns ``path``."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def cluster_map_figure(images: np.ndarray, label_maps: Mapping[str, np.ndarray], path: str,
                       title: Optional[str] = None, cell: float = 1.4) -> str:
    """Rows = samples; first column the images, then one column per labelling.

    Args:
        images: ``[n, H, W, 3]`` uint8.
        label_maps: column title → ``[n, H, W]`` int labels.
    """
    plt = _plt()
    n = images.shape[0]
    cols = 1 + len(label_maps)
    fig, axes = plt.subplots(n, cols, figsize=(cell * cols, cell * n + (0.4 if title else 0)), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        for j, (name, lab) in enumerate(label_maps.items()):
            axes[i, j + 1].imshow(colorize(lab[i]))
        for j in range(cols):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    axes[0, 0].set_title("image", fontsize=8)
    for j, name in enumerate(label_maps):
        axes[0, j + 1].set_title(str(name), fontsize=8)
    return _save_figure(fig, path, title)


def trajectory_plot(ks: Sequence[int], min_iou: Sequence[float], merge_ecos: Sequence[float], path: str,
                    threshold: Optional[float] = None, marks: Sequence[int] = ()) -> str:
    """Minimum IoU (Eq. 4) and the ECoS (Eq. 5) of the merged pair against K."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(ks, min_iou, "-o", ms=2.5, label="min IoU (least separable cluster)")
    ax.plot(ks, merge_ecos, "-s", ms=2.5, label="ECoS of merged pair")
    if threshold is not None:
        ax.axhline(threshold, color="gray", ls="--", lw=0.8, label=f"φ* = {threshold}")
    for k in marks:
        ax.axvline(k, color="lightgray", lw=0.6)
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel("value")
    ax.invert_xaxis()
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path, dpi=120)


def _loss_panel(ax, steps: Sequence[int], curves: Mapping[str, Sequence[float]], ylabel: str) -> None:
    """Loss curves against the step on ``ax``; a long noisy curve also gets its running mean."""
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    values = [v for c in curves.values() for v in c]
    for (name, loss), color in zip(curves.items(), colors):
        long = len(loss) > 50
        ax.plot(steps, loss, lw=0.8, color=color, alpha=0.4 if long else 1.0, label=None if long else name)
        if long:  # a running mean shows the trend under the step-to-step noise
            w = max(5, len(loss) // 50)
            smooth = np.convolve(np.asarray(loss, float), np.ones(w) / w, mode="valid")
            ax.plot(np.asarray(steps)[w - 1:], smooth, lw=1.2, color=color, label=f"{name} (mean of {w})")
    if len(curves) > 1 or any(len(c) > 50 for c in curves.values()):
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log" if values and min(values) > 0 else "linear")
    ax.grid(alpha=0.3)


def training_curves_plot(steps: Sequence[int], loss: Sequence[float], eval_steps: Sequence[int],
                         eval_curves: Mapping[str, Sequence[float]], path: str, title: Optional[str] = None) -> str:
    """Training loss (left) and validation curves such as mIoU (right) against the step.

    Args:
        steps, loss: the training loss of every logged step.
        eval_steps: steps of the evaluations; ``eval_curves``: name -> one value per evaluation (in [0, 1]).
    """
    plt = _plt()
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    _loss_panel(ax_l, steps, {"loss": loss}, "training loss (pixel cross-entropy)")
    for name, values in eval_curves.items():
        ax_v.plot(eval_steps, values, "-o", ms=3, label=name)
    ax_v.set_xlabel("step")
    ax_v.set_ylabel("validation")
    ax_v.set_ylim(0, 1.02)
    ax_v.grid(alpha=0.3)
    if eval_curves:
        ax_v.legend(fontsize=8)
    else:
        ax_v.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax_v.transAxes)
    return _save_figure(fig, path, title)


def curves_plot(x: Sequence[float], curves: Mapping[str, Sequence[float]], path: str, *, xlabel: str, ylabel: str,
                title: Optional[str] = None, log_y: bool = False) -> str:
    """Several named curves ``y`` against one ``x`` (e.g. an objective per cluster against the epoch)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, y in curves.items():
        ax.plot(x, y, "-", lw=1.6 if name.startswith("mean") else 0.9, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save_figure(fig, path, title)


def image_rows_figure(rows: Mapping[str, np.ndarray], path: str, title: Optional[str] = None,
                      cell: float = 0.9) -> str:
    """One labelled row of images per entry: ``{row label: [n, H, W, 3] uint8}`` (rows may differ in n)."""
    plt = _plt()
    ncols = max(1, max(len(v) for v in rows.values()))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(cell * ncols + 1.2, cell * len(rows) + 0.4), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for q in range(ncols):
            ax = axes[r, q]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if q < len(images):
                ax.imshow(images[q])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    return _save_figure(fig, path, title)


def gan_curves_plot(steps: Sequence[int], g_curves: Mapping[str, Sequence[float]],
                    d_curves: Mapping[str, Sequence[float]], path: str, title: Optional[str] = None) -> str:
    """The generator's (left) and the discriminator's (right) loss terms against the step.

    Args:
        steps: the logged steps; ``g_curves`` / ``d_curves``: name -> one value per logged step.
    """
    plt = _plt()
    fig, (ax_g, ax_d) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    _loss_panel(ax_g, steps, g_curves, "generator loss")
    _loss_panel(ax_d, steps, d_curves, "discriminator loss")
    return _save_figure(fig, path, title)
