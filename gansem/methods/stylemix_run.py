"""A style-mixing segmentation run directory: masks, pictures, the ablation and a UFGS mask dataset.

:func:`run_stylemix` is what ``launch/stylemix_segment.py`` calls. It segments
``num_images`` samples with :func:`gansem.methods.stylemix.segment_samples` and writes::

    config.json          the settings, the generator, the seed and the command
    stylemix.png         per image: image | style-mixed variants | cluster map Y' | mask Y over the image
    report.json          per-image foreground fraction, foreground clusters, K-means iterations/convergence;
                         the ablation table; scores against reference labels when given
    report.md            the same, readable
    ablation.png         (with the ablation) the mask of each image under every cutoff x colour space
    dataset/             (with dataset_samples) (image, foreground mask) pairs in the UFGS format
    manifest.json        what is where

**Ablation** (Tab. 4 of the seed paper): every cutoff ``c`` in ``cutoffs`` with every
colour space, on the same images (an image's latents and K-means seed do not depend
on the setting). Each setting is scored against reference foreground masks when a
labeller is given (``labels``: class 0 = background), as the paper scores against a
pretrained segmenter: foreground IoU, background IoU and their mean (mIoU). Without
one, each setting's agreement (mIoU) with the run's own setting is reported instead.

**Dataset**: sample ``i`` of the dataset is image ``i`` of the same stream (so the
report's images are its first samples); masks are 0 = background, 1 = foreground; the
directory is a UFGS pair dataset (:mod:`gansem.ufgs.records`) that
``launch/train_segmenter.py --data DIR`` trains on.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from .. import training, viz
from ..features import to_uint8
from ..generators.base import Generator
from ..metrics import binary_segmentation_metrics
from ..ufgs.records import DatasetError, encode_pair
from .mask_dataset import MASK_CLASSES, MASK_PALETTE, enlarge, finish_mask_dataset, reference_foreground, start_mask_dataset
from .stylemix import COLOR_SPACES, StyleMixConfig, StyleMixError, iter_segments, segment_samples

__all__ = ["MASK_CLASSES", "MASK_PALETTE", "run_stylemix", "run_ablation", "write_mask_dataset",
           "stylemix_figure", "reference_foreground"]

_NUM_FIGURE_VARIANTS = 6


def stylemix_figure(images, variants, clusters, masks, path: str, k: int) -> str:
    """One row per image: ``X_0`` | up to 6 style-mixed variants | cluster map ``Y'`` | mask ``Y`` over ``X_0``.

    Args:
        images: ``[B, h, w, 3]`` uint8. variants: ``[B, n, h, w, 3]`` uint8.
        clusters: ``[B, h, w]`` int in ``[0, k)``. masks: ``[B, h, w]`` bool.
        path: PNG to write.
    """
    v = variants[:, :_NUM_FIGURE_VARIANTS]
    cols = viz.colorize(clusters, viz.palette(k))
    over = viz.overlay(images, masks.astype(np.int32), alpha=0.6, colors=np.array([[0, 0, 0], [255, 64, 64]]))
    rows = np.concatenate([images[:, None], v, cols[:, None], over[:, None]], axis=1)  # [B, 3 + n', h, w, 3]
    tiles = enlarge(rows.reshape((-1,) + rows.shape[2:]))
    return viz.save_png(path, viz.image_grid(tiles, ncols=rows.shape[1]))


def _scores(masks, ref, ignore_label) -> dict:
    m = binary_segmentation_metrics(masks, ref, ignore_label=ignore_label)
    return {"iou_fg": m.iou_fg, "iou_bg": m.iou_bg, "miou": m.miou}


def run_ablation(gen: Generator, params, config: StyleMixConfig, key, indices, *, cutoffs: Sequence[int],
                 color_spaces: Sequence[str] = COLOR_SPACES, mesh=None, batch_size: int = 8, reference=None,
                 ignore_label: Optional[int] = None, base_masks=None,
                 progress: bool = False) -> tuple[list[dict], dict]:
    """The cutoff x colour-space ablation (seed paper Tab. 4) on the images ``indices``.

    Args:
        gen, params: a style-based generator and its parameters.
        config: the base setting (``k``, the foreground rule, ... are kept; cutoff and colour vary).
        key: PRNG key of the image stream.
        indices: ``[N]`` image indices.
        cutoffs: the cutoffs ``c`` to try.
        color_spaces: ``"rgb"`` and/or ``"lab"``.
        mesh, batch_size, progress: as :func:`gansem.methods.stylemix.segment_samples`.
        reference: ``[N, h, w]`` reference foreground masks (0/1, or ``ignore_label``), or ``None``.
        base_masks: ``[N, h, w]`` masks of ``config`` itself if already computed (used without a reference).

    Returns:
        ``(rows, masks)``: one dict per setting (``cutoff``, ``color_space``, ``foreground_fraction``,
        ``kmeans_converged``, and ``iou_fg``/``iou_bg``/``miou`` against ``reference``, or
        ``agreement_miou`` with the base setting), and ``{(cutoff, color_space): masks [N, h, w]}``.
    """
    for c in cutoffs:
        config.replace(cutoff=int(c)).check(gen)
    base = base_masks
    if reference is None and base is None:
        base = segment_samples(gen, params, config, key, indices, mesh=mesh, batch_size=batch_size)["mask"]
    rows, masks = [], {}
    for c in cutoffs:
        for space in color_spaces:
            cfg = config.replace(cutoff=int(c), color_space=space)
            out = segment_samples(gen, params, cfg, key, indices, mesh=mesh, batch_size=batch_size,
                                  progress=progress, desc=f"c={c} {space}")
            row = {"cutoff": int(c), "color_space": space, "foreground_fraction": float(out["mask"].mean()),
                   "kmeans_converged": float(out["kmeans_converged"].mean())}
            if reference is not None:
                row.update(_scores(out["mask"], reference, ignore_label))
            else:
                row["agreement_miou"] = _scores(out["mask"], base.astype(np.uint8), None)["miou"]
            rows.append(row)
            masks[(int(c), space)] = out["mask"]
    return rows, masks


def _ablation_figure(images, masks: dict, path: str) -> str:
    """Rows = images; columns: the image, then its mask under each (cutoff, colour space)."""
    settings = list(masks)
    cols = [images] + [viz.overlay(images, masks[s].astype(np.int32), alpha=0.6,
                                   colors=np.array([[0, 0, 0], [255, 64, 64]])) for s in settings]
    tiles = enlarge(np.stack(cols, axis=1).reshape((-1,) + images.shape[1:]))
    return viz.save_png(path, viz.image_grid(tiles, ncols=len(cols)))


def write_mask_dataset(gen: Generator, params, config: StyleMixConfig, out_dir: str, *, key, seed: int,
                       num_samples: int, shard_size: int = 1000, batch_size: int = 8, mesh=None,
                       generator_info: Optional[dict] = None, command: Optional[str] = None,
                       progress: bool = False) -> dict:
    """Write ``num_samples`` (image, foreground mask) pairs as a UFGS dataset (:mod:`gansem.ufgs.records`).

    Sample ``i`` is image ``i`` of the stream ``key`` (:func:`gansem.methods.stylemix.image_inputs`), at the
    clustering resolution; its label is the mask (0 background, 1 foreground) and its latent the structure
    latent ``z_0``. One compiled program streams the batches into the shards
    (:class:`gansem.ufgs.dataset.ShardSink`: each written under a temporary name, synced, counted and renamed); ``index.json`` says ``complete: true`` at the end (the readers refuse an
    interrupted write; there is no resume: write again into a new directory).

    Returns:
        The dataset's index (``index.json``).

    Raises:
        DatasetError: ``out_dir`` is not empty, or bad sizes.
    """
    if num_samples < 1 or shard_size < 1:
        raise DatasetError(f"num_samples and shard_size must be >= 1, got {num_samples} and {shard_size}")
    config.check(gen)
    meta, sink = start_mask_dataset(
        out_dir, gen, num_samples=num_samples, shard_size=shard_size, resolution=config.out_resolution(gen),
        seed=seed, batch_size=batch_size, class_conditional=False,
        sampling=f"sample i: the structure latent and style latents of fold_in(key({int(seed)}), i) "
                 "(gansem.methods.stylemix.image_inputs)",
        method={"name": "stylemix", "paper": "seed 003, Sec. 3.2", "config": vars(config)},
        generator_info=generator_info, command=command, mesh=mesh)
    try:
        for start, stop, out in iter_segments(gen, params, config, key, np.arange(num_samples), mesh=mesh,
                                              batch_size=batch_size, progress=progress, desc="mask dataset"):
            images = to_uint8(out["image"])
            for r in range(stop - start):
                sink.write(encode_pair(images[r], out["mask"][r].astype(np.uint8), num_classes=2,
                                       index=start + r, latent=out["latent"][r]))
    finally:
        sink.close()
    return finish_mask_dataset(out_dir, meta)


def _markdown(summary: dict) -> str:
    cfg = summary["config"]
    lines = [f"# Style-mixing segmentation ({summary['generator'].get('name') or summary['generator']['family']})",
             "",
             f"{summary['num_images']} images, n = {cfg['num_variants']} variants, cutoff c = {cfg['cutoff']}, "
             f"{cfg['color_space'].upper()}, k = {cfg['k']}, {cfg['foreground']} rule, "
             f"{summary['resolution']} px; {summary['seconds']:.1f} s on {summary['devices']} device(s).",
             "", "![image | variants | clusters | mask](stylemix.png)", "",
             f"Mean foreground fraction {summary['foreground_fraction']:.3f}; K-means converged on "
             f"{summary['kmeans_converged']:.0%} of the images.", ""]
    if summary.get("reference"):
        r = summary["reference"]
        lines += [f"Against `{r['labels']}` (class 0 = background): fg IoU {r['iou_fg']:.3f}, "
                  f"bg IoU {r['iou_bg']:.3f}, mIoU {r['miou']:.3f}.", ""]
    if summary.get("ablation"):
        score = "miou" if summary.get("reference") else "agreement_miou"
        lines += ["## Ablation (seed paper Tab. 4)", "",
                  "mIoU against the reference labels" if score == "miou" else
                  "No reference labels: agreement (mIoU) of each setting's masks with the run's own setting.", "",
                  "| c | colour | " + score + " | fg fraction | K-means converged |", "|---|---|---|---|---|"]
        for row in summary["ablation"]:
            lines.append(f"| {row['cutoff']} | {row['color_space']} | {row[score]:.3f} | "
                         f"{row['foreground_fraction']:.3f} | {row['kmeans_converged']:.0%} |")
        lines += ["", "![masks per setting](ablation.png)", ""]
    if summary.get("dataset"):
        lines += [f"Mask dataset: `{summary['dataset']}` ({summary['dataset_samples']} pairs, UFGS format); train "
                  f"with `python launch/train_segmenter.py --data {summary['dataset']}`.", ""]
    return "\n".join(lines)


def run_stylemix(gen: Generator, params, config: StyleMixConfig, out_dir: str, *, seed: int = 0,
                 num_images: int = 8, mesh=None, batch_size: int = 8, ablation_cutoffs: Sequence[int] = (),
                 labels=None, ignore_label: Optional[int] = None, dataset_samples: int = 0,
                 shard_size: int = 1000, generator_info: Optional[dict] = None, command: Optional[str] = None,
                 progress: bool = True) -> dict:
    """Segment ``num_images`` samples, write the pictures and report (module docstring); optionally the ablation
    over ``ablation_cutoffs`` x colour spaces and a mask dataset of ``dataset_samples`` pairs.

    Args:
        gen, params: a style-based generator and its parameters.
        config: the settings (:class:`gansem.methods.stylemix.StyleMixConfig`).
        out_dir: run directory (created; must be empty or absent).
        seed: image ``i`` uses ``fold_in(jax.random.key(seed), i)``.
        num_images: images segmented for the report (and the ablation).
        mesh: a 1-D mesh to split batches over, or ``None``.
        batch_size: images per call.
        ablation_cutoffs: cutoffs of the ablation (empty: none).
        labels: a reference labeller ``uint8 [B, H, W, 3] -> int [B, H, W]`` (class 0 = background), or ``None``.
        ignore_label: label value the scores skip.
        dataset_samples: pairs of the mask dataset written to ``out_dir/dataset`` (0: none).
        shard_size: pairs per dataset shard.
        generator_info: ``{"name", "checkpoint", "family"}`` recorded in the outputs.
        command: the command line, recorded.
        progress: progress bars.

    Returns:
        The report (also in ``report.json``).

    Raises:
        StyleMixError: the generator is not style-based or a setting does not fit it.
    """
    config.check(gen)
    for c in ablation_cutoffs:
        config.replace(cutoff=int(c)).check(gen)
    if num_images < 1:
        raise StyleMixError(f"num_images must be >= 1, got {num_images}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise StyleMixError(f"run directory {out_dir!r} is not empty; choose a new --out")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    info = dict(generator_info or {"family": gen.family})
    training.write_json(os.path.join(out_dir, "config.json"), {
        "method": "stylemix (seed 003)", "config": vars(config), "seed": seed, "num_images": num_images,
        "batch_size": batch_size, "ablation_cutoffs": list(ablation_cutoffs), "dataset_samples": dataset_samples,
        "generator": info, "generator_config": gen.to_config(), "command": command})
    key = jax.random.key(seed)
    indices = np.arange(num_images)
    out = segment_samples(gen, params, config, key, indices, mesh=mesh, batch_size=batch_size, variants=True,
                          progress=progress, desc="style mixing")
    images = to_uint8(out["image"])
    nfig = min(num_images, 8)
    stylemix_figure(images[:nfig], to_uint8(out["variants"][:nfig]), out["clusters"][:nfig], out["mask"][:nfig],
                    os.path.join(out_dir, "stylemix.png"), config.k)
    files = {"config.json": "settings, generator, seed, command",
             "stylemix.png": "per image: image | style-mixed variants | cluster map Y' | mask Y over the image",
             "report.json": "per-image results, ablation table, scores", "report.md": "the report, readable",
             "manifest.json": "this file"}
    summary = {
        "generator": info, "config": vars(config), "num_images": num_images, "seed": seed,
        "resolution": config.out_resolution(gen), "devices": 1 if mesh is None else int(mesh.devices.size),
        "foreground_fraction": float(out["mask"].mean()),
        "kmeans_converged": float(out["kmeans_converged"].mean()),
        "images": [{"index": int(i), "foreground_fraction": float(out["mask"][j].mean()),
                    "foreground_clusters": np.flatnonzero(out["foreground"][j]).tolist(),
                    "kmeans_iters": int(out["kmeans_iters"][j]), "kmeans_converged": bool(out["kmeans_converged"][j])}
                   for j, i in enumerate(indices)],
    }
    reference = None
    if labels is not None:
        reference = reference_foreground(labels, images, ignore_label)
        summary["reference"] = dict(_scores(out["mask"], reference, ignore_label),
                                    labels=str(getattr(labels, "name", labels)))
    if ablation_cutoffs:
        rows, masks = run_ablation(gen, params, config, key, indices, cutoffs=ablation_cutoffs, mesh=mesh,
                                   batch_size=batch_size, reference=reference, ignore_label=ignore_label,
                                   base_masks=out["mask"], progress=progress)
        summary["ablation"] = rows
        _ablation_figure(images[:nfig], {s: m[:nfig] for s, m in masks.items()}, os.path.join(out_dir, "ablation.png"))
        files["ablation.png"] = "rows = images; columns: the image, its mask under each cutoff x colour space"
    if dataset_samples:
        ddir = os.path.join(out_dir, "dataset")
        write_mask_dataset(gen, params, config, ddir, key=key, seed=seed, num_samples=dataset_samples,
                           shard_size=shard_size, batch_size=batch_size, mesh=mesh, generator_info=info,
                           command=command, progress=progress)
        summary["dataset"], summary["dataset_samples"] = ddir, int(dataset_samples)
        files["dataset/"] = "the mask dataset (UFGS format: index.json + array_record shards, preview.png)"
    summary["seconds"] = time.time() - t0
    training.write_json(os.path.join(out_dir, "report.json"), summary)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(summary))
    training.write_json(os.path.join(out_dir, "manifest.json"), {"files": files})
    return summary
