"""Foreground-mask datasets of the seed methods, in the UFGS pair format.

Style-mixing segmentation (seed 003) and the latent-direction segmenter (seed 004) both
end in ``(image, foreground mask)`` pairs that the UFGS segmenter trains on. The pairs go
through the UFGS writer's :class:`gansem.ufgs.dataset.ShardSink` (temporary name, sync,
record count, rename); this module holds what the two methods share around it: the
two-class index (``index.json``, written first with ``complete: false`` and again with
``complete: true`` at the end, so readers refuse an interrupted write), the read-back
check, the preview picture and the manifest. Masks are 0 = background, 1 = foreground.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Optional

import jax
import numpy as np

from .. import training, viz
from ..generators.base import Generator
from ..ufgs.dataset import ShardSink, plan_shards
from ..ufgs.records import FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, DatasetError, label_bits, open_dataset

__all__ = ["MASK_CLASSES", "MASK_PALETTE", "enlarge", "reference_foreground", "start_mask_dataset",
           "finish_mask_dataset"]

#: Class names and colours of the mask datasets.
MASK_CLASSES = ("background", "foreground")
MASK_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)


def enlarge(tiles: np.ndarray, target: int = 64) -> np.ndarray:
    """``tiles [..., h, w, c]`` repeated ``target // h`` times along both axes (tiny generators: visible pixels)."""
    scale = max(1, target // tiles.shape[-2])
    return tiles.repeat(scale, axis=-3).repeat(scale, axis=-2)


def reference_foreground(labels_fn, images: np.ndarray, ignore_label: Optional[int] = None) -> np.ndarray:
    """Reference foreground masks ``[B, h, w]`` uint8 from a labeller (class 0 = background; ``ignore_label`` kept)."""
    labels = np.asarray(labels_fn(images))
    ref = (labels != 0).astype(np.uint8)
    if ignore_label is not None:
        ref[labels == ignore_label] = ignore_label
    return ref


def start_mask_dataset(out_dir: str, gen: Generator, *, num_samples: int, shard_size: int, resolution: int,
                       seed: int, batch_size: int, class_conditional: bool, sampling: str, method: dict,
                       generator_info: Optional[dict], command: Optional[str], mesh=None) -> tuple[dict, ShardSink]:
    """Create ``out_dir``, write its index with ``complete: false`` and open the shard sink.

    Args:
        out_dir: the dataset directory (must be new or empty).
        gen: the generator the pairs come from (its family, latent shape and config go to the index).
        num_samples, shard_size: pairs in all and per shard file.
        resolution: side of the images and masks.
        seed, batch_size: the settings that fix the bits of the samples.
        class_conditional: whether records carry class labels.
        sampling: how sample ``i``'s inputs are drawn, in words.
        method: the method's name, paper section and settings.
        generator_info, command: provenance for the index.
        mesh: the mesh the pairs are computed on (its size is recorded).

    Returns:
        ``(meta, sink)``: the index dict and a :class:`~gansem.ufgs.dataset.ShardSink` for its shards
        (close it, then call :func:`finish_mask_dataset`).

    Raises:
        DatasetError: ``out_dir`` is not empty.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DatasetError(f"dataset directory {out_dir!r} is not empty; choose a new one")
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": False,
        "num_samples": int(num_samples), "shard_size": int(shard_size),
        "shards": plan_shards(int(num_samples), int(shard_size)),
        "k": 2, "num_classes": 2, "class_names": list(MASK_CLASSES), "threshold": None,
        "palette": MASK_PALETTE.tolist(), "resolution": int(resolution), "label_bits": label_bits(2),
        "latent_shape": [int(d) for d in gen.latent_shape], "class_conditional": bool(class_conditional),
        "seed": int(seed), "batch_size": int(batch_size),
        "sampling": sampling,
        "method": method,
        "generator": dict(generator_info or {"family": gen.family}, config=json.loads(json.dumps(gen.to_config()))),
        "command": command,
        "software": {"jax": jax.__version__, "platform": jax.default_backend(), "python": platform.python_version(),
                     "devices": 1 if mesh is None else int(mesh.devices.size)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    training.write_json(os.path.join(out_dir, INDEX_FILE), meta)
    return meta, ShardSink(out_dir, meta, meta["shards"], retry="then write again into a new directory")


def finish_mask_dataset(out_dir: str, meta: dict) -> dict:
    """Mark the dataset complete, read it back (index and every shard's record count), write
    ``preview.png`` (the first samples: image | mask over the image) and ``manifest.json``.

    Returns:
        ``meta`` with ``complete: true``.
    """
    meta["complete"] = True
    training.write_json(os.path.join(out_dir, INDEX_FILE), meta)
    ds = open_dataset(out_dir)
    items = [ds[i] for i in range(min(8, len(ds)))]
    ds.close()
    imgs = np.stack([it["image"] for it in items])
    over = viz.overlay(imgs, np.stack([it["label"] for it in items]), alpha=0.6, colors=MASK_PALETTE)
    viz.save_png(os.path.join(out_dir, "preview.png"),
                 viz.image_grid(enlarge(np.stack([imgs, over], 1).reshape((-1,) + imgs.shape[1:])), ncols=8))
    training.write_json(os.path.join(out_dir, "manifest.json"), {
        "format": f"{FORMAT_NAME} version {FORMAT_VERSION}",
        "files": {INDEX_FILE: "settings, generator, shard list with counts and SHA-256",
                  "pairs-SSSSS-of-NNNNN.array_record": "one record per (image, mask) pair (gansem.ufgs.records)",
                  "preview.png": "the first samples: image | mask over the image", "manifest.json": "this file"},
        "read": "gansem.ufgs.records.open_dataset(DIR); train: python launch/train_segmenter.py --data DIR"})
    return meta
