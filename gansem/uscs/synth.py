"""A trained USCS run as an object: painted masks in, images out (KLiSH Sec. 5).

::

    synth = load_synthesizer("runs/uscs-k8")          # the latest checkpoint (or step=...)
    images = synth.generate(masks, seed=0)             # int [N, R, R] in [0, K) -> uint8 [N, R, R, 3]
    image, mask = synth.example(0)                     # a held-out (GAN image, KLiSH mask) pair

The generator runs in inference mode (BatchNorm running averages, stored spectral-norm
vectors) and is jit-compiled per batch size; an image depends only on its mask and
``seed`` (the batch it is generated in does not matter), so the same request always gives
the same picture. Without a style encoder the seed has no effect (SPADE's generator is a
deterministic function of the mask); with one (``use_vae``) it draws the style vector.

Examples (:meth:`Synthesizer.example`) are read from the dataset recorded in
``model.json`` (``data.path``: a UFGS dataset directory or a ``launch/segment.py`` .npz):
the held-out pairs when the run held some out, else all pairs; none when the dataset is gone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import training
from ..training import MODEL_FILE
from ..ufgs import records
from .models import SpadeModels, build_models, config_from_dict, synthesize

__all__ = [
    "MODEL_KIND",
    "UscsRunError",
    "Synthesizer",
    "load_synthesizer",
    "read_model_json",
    "abstract_generator",
]

MODEL_KIND = "uscs-spade"
#: Generation batches are padded up to one of these sizes (one compiled program each), then cut in chunks of the last.
_BUCKETS = (1, 2, 4, 8, 16, 32)


class UscsRunError(ValueError):
    """A USCS run directory is missing, damaged, or does not fit the request."""


def read_model_json(run_dir: str) -> dict:
    """The ``model.json`` of a USCS run.

    Raises:
        UscsRunError: no (readable) ``model.json``, or one that does not describe a USCS model.
    """
    path = os.path.join(run_dir, MODEL_FILE)
    meta = training.read_json(path, UscsRunError, f"{run_dir!r} is not a USCS run directory (no {MODEL_FILE}); "
                                                  "train one with launch/train_uscs.py")
    if (not isinstance(meta, dict) or meta.get("kind") != MODEL_KIND
            or not {"num_classes", "resolution", "model", "palette"} <= set(meta)):
        raise UscsRunError(f"{path} does not describe a gansem USCS model (kind {MODEL_KIND!r})")
    return meta


def abstract_generator(models: SpadeModels, sharding_=None) -> dict:
    """The generator's checkpoint item ``{"params": {"generator"[, "encoder"]}, "batch_stats": {...}}``
    as ``jax.ShapeDtypeStruct`` leaves (nothing computed), each with ``sharding_``."""
    res, k = models.resolution, models.num_classes
    mask = jax.ShapeDtypeStruct((1, res, res, k), jnp.float32)
    image = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    z = jax.ShapeDtypeStruct((1, models.config.z_dim), jnp.float32) if models.encoder is not None else None
    key = jax.random.key(0)
    gv = jax.eval_shape(lambda m, z: models.generator.init(key, m, z, train=False), mask, z)
    item = {"params": {"generator": gv["params"]}, "batch_stats": {"generator": gv.get("batch_stats", {})}}
    if models.encoder is not None:
        ev = jax.eval_shape(lambda x: models.encoder.init(key, x, train=False), image)
        item["params"]["encoder"], item["batch_stats"]["encoder"] = ev["params"], ev.get("batch_stats", {})
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_), item)


@functools.lru_cache(maxsize=8)
def _generate_program(models: SpadeModels):
    """``(generator variables, labels [B, R, R], key) -> uint8 [B, R, R, 3]``, jitted (shared by synthesizers)."""
    return jax.jit(lambda v, labels, key: synthesize(models, v, labels, key))


def _open_examples(meta: dict):
    """``(source, first, count)`` of the example pairs of the run's dataset; ``(None, 0, 0)`` when it is gone."""
    data = meta.get("data") or {}
    path = data.get("path")
    if not path:
        return None, 0, 0
    try:
        source = records.load_pairs(path)
    except (OSError, ValueError):
        return None, 0, 0
    if (int(source.num_classes), source.resolution) != (int(meta["num_classes"]), int(meta["resolution"])):
        return None, 0, 0  # another dataset now lives there
    held = data.get("held_out") or {}
    first, count = int(held.get("first", 0)), int(held.get("count", 0))
    if count and first + count <= len(source):
        return source, first, count
    return source, 0, len(source)


@dataclasses.dataclass(eq=False)
class Synthesizer(training.RunDescription):
    """A SPADE generator with its variables and the description of its run.

    ``num_classes`` (K), ``resolution`` (R) and ``palette`` (``[K, 3]`` uint8, the KLiSH run's
    colours) come from ``meta`` (:class:`gansem.training.RunDescription`).

    Attributes:
        models: the networks (:func:`gansem.uscs.models.build_models` of ``meta``).
        variables: the generator's ``{"params", "batch_stats"}`` (on one device).
        meta: the contents of ``model.json``.
        step: training steps behind these variables.
        run_dir: the run directory (``None`` for a run trained without one).
        history, summary: the metric records and the training call's summary (``None`` when loaded).
    """

    models: SpadeModels
    variables: Any
    meta: dict
    step: int
    run_dir: Optional[str] = None
    history: list = dataclasses.field(default_factory=list)
    summary: Optional[dict] = None

    def __post_init__(self):
        gen = {"params": self.variables["params"]["generator"],
               "batch_stats": self.variables["batch_stats"]["generator"]}
        self._generator = gen
        self._program = _generate_program(self.models)
        self._examples = None

    # -- description (num_classes, resolution, palette: gansem.training.RunDescription) ------
    @property
    def class_names(self) -> tuple:
        """K names (``"class 0"``, ... when the run has none)."""
        names = self.meta.get("class_names")
        return tuple(names) if names else tuple(f"class {i}" for i in range(self.num_classes))

    # -- generation ------------------------------------------------------------------------
    def generate(self, masks, *, seed: int = 0) -> np.ndarray:
        """Images for painted masks.

        Args:
            masks: int ``[N, R, R]`` (or one ``[R, R]``) with class ids in ``[0, K)``.
            seed: the style seed (only with a style encoder); the same (mask, seed) gives the same image.

        Returns:
            uint8 ``[N, R, R, 3]`` (``[R, R, 3]`` for one ``[R, R]`` mask).

        Raises:
            ValueError: not an integer array of that shape, or a class id outside ``[0, K)``.
        """
        masks = np.asarray(masks)
        single = masks.ndim == 2
        if single:
            masks = masks[None]
        r, k = self.resolution, self.num_classes
        if masks.ndim != 3 or masks.shape[1:] != (r, r):
            raise ValueError(f"masks must be [N, {r}, {r}] (or [{r}, {r}]), got shape {list(np.shape(masks))}")
        if masks.dtype.kind not in "iub":
            raise ValueError(f"masks must hold integer class ids, got dtype {masks.dtype}")
        if masks.size and (int(masks.min()) < 0 or int(masks.max()) >= k):
            bad = masks[(masks < 0) | (masks >= k)]
            raise ValueError(f"class id {int(bad[0])} is outside [0, {k})")
        if not 0 <= int(seed) < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        masks = masks.astype(np.int32)
        key = jax.random.key(int(seed))
        n = masks.shape[0]
        out = np.empty((n, r, r, 3), np.uint8)
        chunk = _BUCKETS[-1]
        for start in range(0, n, chunk):
            part = masks[start:start + chunk]
            rows = next(b for b in _BUCKETS if b >= part.shape[0])
            padded = np.concatenate([part, np.zeros((rows - part.shape[0], r, r), np.int32)])
            out[start:start + part.shape[0]] = np.asarray(self._program(self._generator, padded, key))[:part.shape[0]]
        return out[0] if single else out

    # -- examples --------------------------------------------------------------------------
    def _example_source(self):
        if self._examples is None:
            self._examples = _open_examples(self.meta)
        return self._examples

    @property
    def num_examples(self) -> int:
        """Pairs available to :meth:`example` (0 when the run's dataset is gone)."""
        return self._example_source()[2]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example pair ``i``: a GAN-generated image and its KLiSH mask.

        Returns:
            ``(image uint8 [R, R, 3], mask int32 [R, R])``.

        Raises:
            IndexError: ``i`` outside ``[0, num_examples)``.
        """
        source, first, count = self._example_source()
        i = int(i)
        if not 0 <= i < count:
            raise IndexError(f"example {i} out of range: this run has {count} example pair(s)")
        item = source[first + i]
        return np.asarray(item["image"], np.uint8), np.asarray(item["label"], np.int32)


def load_synthesizer(run_dir: str, step: Optional[int] = None) -> Synthesizer:
    """Open a USCS run directory at checkpoint ``step`` (default: the latest).

    Raises:
        UscsRunError: not a USCS run, no checkpoint, no such step, or damaged files.
    """
    meta = read_model_json(run_dir)
    try:
        models = build_models(config_from_dict(meta["model"]), int(meta["num_classes"]), int(meta["resolution"]))
    except (TypeError, ValueError) as e:
        raise UscsRunError(f"{os.path.join(run_dir, MODEL_FILE)} describes no buildable SPADE model ({e})") from e
    where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, items = training.restore_step(run_dir, {"generator": abstract_generator(models, where)}, step,
                                        error=UscsRunError)
    return Synthesizer(models=models, variables=items["generator"], meta=meta, step=step, run_dir=run_dir,
                       history=training.read_metrics(run_dir, step))
