"""A trained UFGS segmenter applied to images of any size, and the run directory it is read from.

A segmenter run directory (written by :func:`gansem.ufgs.train.fit_segmenter`) holds::

    model.json        architecture, model options, K, resolution, palette, class names, data, training config
    checkpoints/<s>/  Orbax steps (latest 2): items ``model`` (params, batch_stats), ``train``
                      (opt_state, step, rng) and ``meta`` (JSON)
    metrics.jsonl     one JSON line per training step (step, loss, lr) and per evaluation
                      (step, val_loss, val_pixel_accuracy, val_miou, val_items)
    curves.png        loss and validation mIoU against the step
    summary.json      steps, seconds, steps/s, images/s, final validation numbers
    manifest.json     what each of these files is

Example::

    seg = TrainedSegmenter.load("runs/ufgs")
    labels = seg.predict(images)                 # [N, H, W, 3] uint8 -> [N, H, W] int32, any H, W
    masks = seg.predict_list([img_a, img_b])     # differently sized images, one mask each

Images whose size differs from the training resolution ``R`` are resized to ``R × R``
on device (bilinear, antialiased, rounded back to uint8 as the model takes stored
pixels), and the logits are resized back to the image's own size (bilinear) before the
argmax, so a mask always has the size of its image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .. import sharding, viz
from ..run import jsonable
from ..training import (CHECKPOINT_DIR, METRICS_FILE, MODEL_FILE, RunDescription, checkpoint_manager, read_json,
                        read_metrics, restore_step)
from .models import build_model

__all__ = [
    "MODEL_FILE",
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "SegmenterRunError",
    "TrainedSegmenter",
    "read_model_json",
    "read_metrics",
    "checkpoint_manager",
    "abstract_variables",
    "restore_variables",
    "labels_at_size",
    "read_image_folder",
    "IMAGE_EXTENSIONS",
    "write_predictions",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class SegmenterRunError(ValueError):
    """A segmenter run directory is missing, damaged, or does not fit the request."""


def read_model_json(run_dir: str) -> dict:
    """The run's ``model.json`` as a dict.

    Raises:
        SegmenterRunError: no (readable) ``model.json``: not a segmenter run directory.
    """
    path = os.path.join(run_dir, MODEL_FILE)
    meta = read_json(path, SegmenterRunError, f"{run_dir!r} is not a segmenter run directory (no {MODEL_FILE}); "
                                              "train one with launch/train_segmenter.py")
    if not isinstance(meta, dict) or not {"arch", "num_classes", "resolution", "model_kwargs"} <= set(meta):
        raise SegmenterRunError(f"{path} does not describe a gansem segmenter")
    return meta


def abstract_variables(model: nn.Module, resolution: int, sharding_=None) -> dict:
    """``{"params", "batch_stats"}`` of ``model`` as ``jax.ShapeDtypeStruct`` leaves (nothing computed).

    Args:
        model: a segmentation network.
        resolution: training image size R (the shapes do not depend on it; it is the probe size).
        sharding_: a ``jax.sharding.Sharding`` given to every leaf (to restore into), or ``None``.
    """
    probe = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.uint8)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), probe)
    shapes = {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_), shapes)


def restore_variables(run_dir: str, model: nn.Module, resolution: int, step: Optional[int] = None,
                      mesh=None) -> tuple[dict, int]:
    """The ``model`` item (params and BatchNorm statistics) of a checkpoint, replicated on ``mesh``.

    Args:
        step: the checkpoint step; ``None``: the latest.
        mesh: replicate over this mesh; ``None``: the default device.

    Returns:
        ``(variables, step)``.

    Raises:
        SegmenterRunError: no checkpoint, no such step (the kept steps are named), or a damaged step.
    """
    where = (sharding.replicated(mesh) if mesh is not None
             else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    step, out = restore_step(run_dir, {"model": abstract_variables(model, resolution, where)}, step,
                             error=SegmenterRunError)
    return dict(out["model"]), step


def labels_at_size(model: nn.Module, variables: dict, images: jax.Array, resolution: int) -> jax.Array:
    """Labels of ``images`` at their own size from a model trained at ``resolution`` (jittable).

    Args:
        images: ``[B, h, w, 3]`` uint8.

    Returns:
        ``[B, h, w]`` int32: argmax of the logits, resized (bilinear) from ``R × R`` to ``h × w``
        when the images were resized (bilinear, antialiased) to the model's ``R × R``.
    """
    b, h, w, _ = images.shape
    x = images
    if (h, w) != (resolution, resolution):
        x = jax.image.resize(images.astype(jnp.float32), (b, resolution, resolution, 3), "bilinear",
                             antialias=True)
        x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
    logits = model.apply(variables, x, train=False)                      # [B, R, R, K]
    if (h, w) != (resolution, resolution):
        logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), "bilinear")
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(eq=False)
class TrainedSegmenter(RunDescription):
    """A segmentation network with its variables and the description of its training.

    ``num_classes``, ``resolution`` and ``palette`` come from ``meta`` (:class:`gansem.training.RunDescription`).

    Attributes:
        model: the Flax module (:func:`gansem.ufgs.models.build_model` of ``meta``).
        variables: ``{"params", "batch_stats"}`` (replicated on ``mesh``, or on one device).
        meta: the contents of ``model.json``.
        step: training steps behind these variables.
        mesh: split prediction batches over this mesh (``None``: one device).
        history: the ``metrics.jsonl`` records up to ``step`` (training losses and evaluations).
        summary: the ``summary.json`` of the training call that produced it (``None`` when loaded).
        run_dir: the run directory it came from (``None`` for a run without one).
    """

    model: nn.Module
    variables: dict
    meta: dict
    step: int
    mesh: Any = None
    history: list = dataclasses.field(default_factory=list)
    summary: Optional[dict] = None
    run_dir: Optional[str] = None

    def __post_init__(self):
        self._programs = {}

    @classmethod
    def load(cls, run_dir: str, step: Optional[int] = None, mesh=None) -> "TrainedSegmenter":
        """Open a run directory at checkpoint ``step`` (default: the latest).

        Raises:
            SegmenterRunError: not a segmenter run, no checkpoint, no such step, or damaged files.
        """
        meta = read_model_json(run_dir)
        try:
            model = build_model(meta["arch"], meta["num_classes"], **meta["model_kwargs"])
        except (TypeError, ValueError) as e:
            raise SegmenterRunError(f"{os.path.join(run_dir, MODEL_FILE)} describes no buildable model ({e})") from e
        variables, step = restore_variables(run_dir, model, int(meta["resolution"]), step, mesh)
        return cls(model=model, variables=variables, meta=meta, step=step, mesh=mesh,
                   history=read_metrics(run_dir, step), run_dir=run_dir)

    # -- description --------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def class_names(self) -> Optional[tuple]:
        names = self.meta.get("class_names")
        return None if names is None else tuple(names)

    # -- prediction ---------------------------------------------------------------------
    def _program(self):
        if "labels" not in self._programs:
            fn = lambda v, x: labels_at_size(self.model, v, x, self.resolution)  # noqa: E731
            if self.mesh is None:
                self._programs["labels"] = jax.jit(fn)
            else:
                rows = sharding.row_sharding(self.mesh)
                self._programs["labels"] = jax.jit(fn, in_shardings=(sharding.replicated(self.mesh), rows),
                                                   out_shardings=rows)
        return self._programs["labels"]

    def predict(self, images, batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Label every pixel of same-sized images.

        Args:
            images: ``[N, H, W, 3]`` uint8 (any H, W; see the module docstring).
            batch_size: images per call (rounded up to a multiple of the mesh's devices);
                the last batch is padded by repeating its last image.
            progress: show a progress bar.

        Returns:
            ``[N, H, W]`` int32 labels in ``[0, K)``.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"predict takes uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = images.shape[0]
        devices = 1 if self.mesh is None else self.mesh.devices.size
        rows = sharding.padded_length(min(int(batch_size), max(n, 1)), devices)
        out = np.empty(images.shape[:3], np.int32)
        program = self._program()
        for start in tqdm(range(0, n, rows), desc="predict", disable=not progress, unit="batch"):
            stop = min(start + rows, n)
            batch = images[start:stop]
            if stop - start < rows:
                batch = np.concatenate([batch, np.repeat(batch[-1:], rows - (stop - start), 0)])
            if self.mesh is not None:
                batch = sharding.place_batch(batch, self.mesh)
            out[start:stop] = np.asarray(program(self.variables, batch))[: stop - start]
        return out

    def predict_list(self, images: Sequence[np.ndarray], batch_size: int = 32,
                     progress: bool = False) -> list[np.ndarray]:
        """Label differently sized images: ``[H_i, W_i, 3]`` uint8 each -> ``[H_i, W_i]`` int32 each.

        Images of the same size are labelled together (one compiled program per size).
        """
        images = [np.asarray(im) for im in images]
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
                raise ValueError(f"image {i}: predict_list takes uint8 images [H, W, 3], got {im.dtype} {im.shape}")
        out: list = [None] * len(images)
        by_size: dict = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.shape, []).append(i)
        for idx in tqdm(by_size.values(), desc="image sizes", disable=not progress or len(by_size) < 2):
            labels = self.predict(np.stack([images[i] for i in idx]), batch_size=batch_size)
            for i, lab in zip(idx, labels):
                out[i] = lab
        return out


# -- files: image folders in, masks/overlays out ------------------------------------------


def read_image_folder(folder: str) -> tuple[list[str], list[np.ndarray]]:
    """Every ``.png``/``.jpg``/``.jpeg`` file directly in ``folder`` (sorted by name) as RGB uint8.

    RGBA, greyscale and palette images are converted to RGB (alpha dropped).

    Returns:
        ``(names, images)``: the file names without extension (with it, where two files
        share a stem) and ``[H_i, W_i, 3]`` uint8 arrays.

    Raises:
        FileNotFoundError: no such folder, or no image in it.
        ValueError: a file that cannot be decoded (named).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder")
    files = sorted(f for f in os.listdir(folder)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise FileNotFoundError(f"{folder!r} holds no {'/'.join(IMAGE_EXTENSIONS)} image")
    stems = [os.path.splitext(f)[0] for f in files]
    names = [f if stems.count(s) > 1 else s for f, s in zip(files, stems)]
    images = []
    for f in files:
        try:
            with Image.open(os.path.join(folder, f)) as im:
                images.append(np.asarray(im.convert("RGB"), np.uint8))
        except OSError as e:
            raise ValueError(f"{os.path.join(folder, f)} cannot be read as an image ({e})") from e
    return names, images


def _label_png(labels: np.ndarray, num_classes: int) -> Image.Image:
    """Label ids as a greyscale PNG image: 8-bit for K <= 256, 16-bit above."""
    return Image.fromarray(labels.astype(np.uint8 if num_classes <= 256 else np.uint16))


def _thumb(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def write_predictions(out_dir: str, names: Sequence[str], images: Sequence[np.ndarray],
                      labels: Sequence[np.ndarray], segmenter: TrainedSegmenter, *, source: str = "",
                      npz_labels: bool = False, preview: int = 16, alpha: float = 0.5,
                      extra: Optional[dict] = None) -> dict:
    """Write masks, overlays, a preview grid and a manifest for predicted labels.

    Files::

        out_dir/masks/<name>.png     label ids (8-bit greyscale for K <= 256, else 16-bit)
        out_dir/overlays/<name>.png  the image with the labels blended in the model's palette
        out_dir/preview.png          the first ``preview`` images and overlays, side by side (128 px)
        out_dir/predictions.npz      with ``npz_labels``: ``labels`` int32 [N, H, W] (same-sized images)
        out_dir/manifest.json        what is where

    Args:
        names: one file name (no extension) per image.
        images: ``[H_i, W_i, 3]`` uint8 each.
        labels: ``[H_i, W_i]`` int each, in the images' order.
        segmenter: the model that produced them (its palette, K, run and step go into the manifest).
        source: where the images came from (for the manifest).
        extra: more entries for the manifest (e.g. the agreement with the input's own labels).

    Returns:
        The manifest (also written as ``manifest.json``).
    """
    if not (len(names) == len(images) == len(labels)):
        raise ValueError(f"{len(names)} names, {len(images)} images and {len(labels)} label maps")
    k, pal = segmenter.num_classes, segmenter.palette
    for d in ("masks", "overlays"):
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    thumbs = []
    for i, (name, im, lab) in enumerate(zip(names, images, labels)):
        _label_png(np.asarray(lab), k).save(os.path.join(out_dir, "masks", f"{name}.png"))
        over = viz.overlay(im, lab, alpha=alpha, colors=pal)
        viz.save_png(os.path.join(out_dir, "overlays", f"{name}.png"), over)
        if i < preview:
            thumbs += [_thumb(np.asarray(im), 128), _thumb(over, 128)]
    files = {
        "masks/": f"label ids in [0, {k}) per image, <name>.png, "
                  + ("8-bit greyscale" if k <= 256 else "16-bit greyscale") + ", the image's own size",
        "overlays/": f"<name>.png: the image with its labels blended in (alpha {alpha}), the model's palette",
        "preview.png": f"the first {min(preview, len(names))} images and their overlays, side by side, 128 px",
    }
    if thumbs:
        viz.save_png(os.path.join(out_dir, "preview.png"), viz.image_grid(np.stack(thumbs), ncols=8))
    if npz_labels:
        np.savez_compressed(os.path.join(out_dir, "predictions.npz"), labels=np.stack(labels).astype(np.int32))
        files["predictions.npz"] = "labels int32 [N, H, W]: the images of the input npz, in its order"
    manifest = {
        "model": segmenter.run_dir,
        "step": segmenter.step,
        "arch": segmenter.arch,
        "num_classes": k,
        "class_names": segmenter.class_names,
        "images": source,
        "count": len(names),
        "names": list(names),
        "files": files,
        **dict(extra or {}),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(jsonable(manifest), f, indent=2)
    return manifest
