"""Data-parallel training of a UFGS segmenter on (image, cluster mask) pairs (KLiSH Sec. 5).

A KLiSH run labels generated images with its clusters; UFGS trains an ordinary
segmentation network on such pairs, which then labels real images. One call::

    seg = fit_segmenter(pairs, arch="unet", steps=2000, batch_size=16, out_dir="runs/ufgs")
    labels = seg.predict(real_images)                    # [N, H, W, 3] uint8 -> [N, H, W] int32

``pairs`` is any random-access source of pairs: ``len(src)``, ``src[i] -> {"image": uint8
[R, R, 3], "label": int [R, R], ...}`` and the attributes ``num_classes``, ``resolution``,
``palette`` ([K, 3] uint8 or None), ``class_names`` (or None) and ``meta`` (a dict), as
``gansem.ufgs.records`` provides.

**Optimisation.** AdamW (decoupled weight decay on convolution kernels only) with a
linear warmup and a cosine decay to zero over ``schedule_steps``; the loss is the pixel
cross-entropy averaged over the pixels whose label is not ``ignore_index``.

**Data.** ``grain.MapDataset.source(src)`` restricted to the training items, shuffled
with ``seed`` (a new permutation each epoch), repeated and batched: the batch of step ``t``
is ``ds[t]``, a pure function of ``(seed, t)``, so the data position of a run is its step.
Batches are read ahead by ``data_threads`` threads. Unless ``val_source`` is given, the
last ``val_samples`` items of the source are held out (never trained on) and evaluated
every ``eval_every`` steps (pixel accuracy, mIoU over classes present, loss).

**Devices.** Data-parallel over a 1-D mesh (:func:`gansem.sharding.make_mesh`): the global
batch is split along its first axis (``NamedSharding(mesh, P("data"))``), parameters and
optimiser state are replicated, and the step is one ``jax.jit`` program with those
shardings; gradients and BatchNorm statistics are those of the global batch (the compiler
adds the cross-device reductions). The loss curve on 1 and on 8 devices agrees to float
rounding (the order of the sums differs). One process: with ``jax.distributed`` every
process would write the run directory's files (not handled yet).

**Checkpoints and resumption.** Orbax saves ``model`` (params, batch_stats), ``train``
(opt_state, step, rng) every ``checkpoint_every`` steps and at the end, keeping the latest
2. ``resume=True`` restores the latest loadable one and continues; as data and dropout
depend only on ``(seed, step)``, N steps then a resumed run to 2N give the same bits as
2N steps in one go (on the same devices), including after the process was killed. The
settings that define the run (architecture, model options, K, resolution, batch size,
seed, optimiser, schedule, split) are fixed when it is created; a resume that asks for
others is refused. The learning-rate schedule spans ``schedule_steps`` (default: the
first call's ``steps``); to train in several sessions, give the total there.

Run directory layout: see :mod:`gansem.ufgs.predict`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, NamedTuple, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .. import sharding, training, viz
from ..run import jsonable
from ..training import CHECKPOINT_DIR, METRICS_FILE, MODEL_FILE, checkpoint_manager
from .models import ARCHS, build_model
from .predict import SegmenterRunError, TrainedSegmenter, read_model_json

__all__ = [
    "TrainState",
    "TrainingPrograms",
    "training_programs",
    "SegmenterTrainConfig",
    "fit_segmenter",
    "pixel_cross_entropy",
    "learning_rate_schedule",
    "make_optimizer",
    "training_batches",
    "confusion_scores",
    "default_val_samples",
    "describe_source",
    "SegmenterRunError",
]

#: Settings a run is created with; resuming with other values is refused.
FIXED_SETTINGS = ("arch", "model_kwargs", "num_classes", "resolution", "batch_size", "seed", "lr", "weight_decay",
                  "warmup", "schedule_steps", "ignore_index", "source_items", "train_items", "val")


class TrainState(NamedTuple):
    """Everything a training step reads and writes (a pytree; replicated on the mesh).

    Attributes:
        step: int32 [] completed steps.
        params: the model's parameters.
        batch_stats: BatchNorm running means and variances.
        opt_state: the AdamW state (moments, counts).
        rng: uint32 [2] raw key data; step ``t`` draws its dropout masks from ``fold_in(rng, t)``.
    """

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: Any


@dataclasses.dataclass(frozen=True)
class SegmenterTrainConfig:
    """The training configuration (stored in ``model.json``); see :func:`fit_segmenter` for each field."""

    arch: str = "unet"
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: Optional[int] = None
    schedule_steps: Optional[int] = None
    seed: int = 0
    val_samples: Optional[int] = None
    eval_every: int = 500
    checkpoint_every: int = 500
    ignore_index: int = 255
    model_kwargs: Mapping = dataclasses.field(default_factory=dict)
    log_every: int = 10
    data_threads: int = 2

    def check(self, num_devices: int) -> None:
        """Raise ``ValueError`` for values that cannot work (before any work is done)."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % num_devices:
            raise ValueError(f"batch size {self.batch_size} cannot be split evenly over {num_devices} devices; "
                             f"use a multiple of {num_devices}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.val_samples is not None and self.val_samples < 0:
            raise ValueError(f"val_samples must be >= 0, got {self.val_samples}")
        if self.data_threads < 0:
            raise ValueError(f"data_threads must be >= 0, got {self.data_threads}")


# -- pieces ---------------------------------------------------------------------------------


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255) -> jax.Array:
    """Mean softmax cross-entropy over the pixels whose label is not ``ignore_index``.

    Args:
        logits: ``[N, H, W, K]`` float.
        labels: ``[N, H, W]`` int in ``[0, K)`` or ``ignore_index``.

    Returns:
        float32 [] (0 when every pixel is ignored).
    """
    valid = labels != ignore_index
    ce = _pixel_ce(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _pixel_ce(logits, labels):
    """``-log softmax(logits)[label]`` per pixel, through a one-hot product.

    The gradient is then dense (``softmax - one_hot``); gathering the label's log-probability
    (``take_along_axis``) has a scatter as its gradient, which on a CPU cost about a tenth of
    a UNet step.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype), axis=-1)


def learning_rate_schedule(peak: float, warmup: int, total: int):
    """``step -> lr``: linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``.

    Step ``t < warmup`` trains at ``peak * (t + 1) / warmup`` (no step at lr 0).
    """
    warmup, total = int(warmup), int(total)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = peak * (t + 1.0) / max(warmup, 1)
        progress = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        return jnp.where(t < warmup, warm, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def make_optimizer(lr: float, weight_decay: float, warmup: int, schedule_steps: int):
    """``(tx, schedule)``: AdamW with :func:`learning_rate_schedule`; weight decay on kernels (ndim > 1) only."""
    schedule = learning_rate_schedule(lr, warmup, schedule_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask), schedule


def default_val_samples(num_items: int) -> int:
    """Items held out for validation when none are asked for: 5 % of the source, at most 200."""
    return min(200, num_items // 20)


def _pair(item) -> dict:
    """The image and label of a source item (other fields dropped), as uint8 / int32."""
    return {"image": np.asarray(item["image"], np.uint8), "label": np.asarray(item["label"], np.int32)}


def training_batches(source, *, batch_size: int, seed: int, num_items: Optional[int] = None) -> grain.MapDataset:
    """The training stream: ``ds[t]`` is the batch of step ``t`` (a pure function of ``(seed, t)``).

    The first ``num_items`` items of ``source`` (default all) are shuffled with ``seed`` (epoch
    ``e`` uses the permutation of seed ``seed + e``), repeated without end and cut into
    batches of ``batch_size`` consecutive items (a batch may span two epochs).

    Returns:
        A grain ``MapDataset`` of ``{"image": uint8 [B, R, R, 3], "label": int32 [B, R, R]}``.
    """
    ds = grain.MapDataset.source(source)
    if num_items is not None and num_items < len(source):
        ds = ds.slice(slice(0, int(num_items)))
    return ds.shuffle(seed=int(seed)).repeat().map(_pair).batch(int(batch_size), drop_remainder=True)


def confusion_scores(table: np.ndarray) -> dict:
    """Pixel accuracy and IoU from a confusion table ``table[true, pred]`` ``[K, K]`` (same label space).

    Returns:
        ``{"pixel_accuracy", "miou", "iou"}``: ``iou`` ``[K]`` (NaN for a class absent from both
        labels and predictions) and ``miou`` its mean over the other classes.
    """
    t = np.asarray(table, np.float64)
    inter = np.diag(t)
    union = t.sum(0) + t.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    total = t.sum()
    return {"pixel_accuracy": float(inter.sum() / total) if total else float("nan"),
            "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"), "iou": iou}


def describe_source(source, name: str = "source") -> dict:
    """Size, K, resolution, palette, class names and meta of a pair source, checked on its first item.

    Raises:
        ValueError: empty source, or a first item that is not a uint8 ``[R, R, 3]`` image with an
            ``[R, R]`` label map.
    """
    n = len(source)
    if n < 1:
        raise ValueError(f"the {name} holds no items")
    k = int(source.num_classes)
    first = source[0]
    image, label = np.asarray(first["image"]), np.asarray(first["label"])
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or image.shape[0] != image.shape[1]:
        raise ValueError(f"{name} item 0: the image must be square uint8 [R, R, 3], got {image.dtype} {image.shape}")
    if label.shape != image.shape[:2] or label.dtype.kind not in "iu":
        raise ValueError(f"{name} item 0: the label must be int [R, R] = {image.shape[:2]}, "
                         f"got {label.dtype} {label.shape}")
    res = getattr(source, "resolution", None)
    res = int(image.shape[0]) if res is None else int(res)
    if res != image.shape[0]:
        raise ValueError(f"{name}: resolution {res} but item 0 is {image.shape[0]}x{image.shape[1]}")
    palette = getattr(source, "palette", None)
    if palette is not None:
        palette = np.asarray(palette, np.uint8)
        if palette.shape != (k, 3):
            raise ValueError(f"{name}: palette must be [{k}, 3], got {palette.shape}")
    names = getattr(source, "class_names", None)
    if names is not None and len(names) != k:
        raise ValueError(f"{name}: {len(names)} class names for {k} classes")
    return {"items": n, "num_classes": k, "resolution": res,
            "palette": None if palette is None else palette.tolist(),
            "class_names": None if names is None else [str(c) for c in names],
            "meta": jsonable(dict(getattr(source, "meta", None) or {}))}


def _check_labels(labels: np.ndarray, k: int, ignore_index: int, where: str) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < k:
        return
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= k))]
    if bad.size:
        raise ValueError(f"{where}: label {int(bad[0])} is outside [0, {k}) and is not the ignore value "
                         f"{ignore_index}")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _normalised_kwargs(kwargs: Optional[Mapping]) -> dict:
    """Model options as JSON values (tuples as lists, dtypes as names), as ``model.json`` stores them."""
    out = {}
    for k, v in dict(kwargs or {}).items():
        out[k] = jnp.dtype(v).name if k == "dtype" and not isinstance(v, str) else v
    return json.loads(json.dumps(jsonable(out)))


# -- the run directory ------------------------------------------------------------------------


def _stored_run(out_dir: str, resume: bool) -> Optional[dict]:
    """The ``model.json`` of the run in ``out_dir`` to resume; ``None`` if ``out_dir`` is new or empty."""
    return training.stored_run(out_dir, resume, read_meta=read_model_json, error=SegmenterRunError, what="segmenter")


def _state_items(state: TrainState) -> dict:
    return {"model": {"params": state.params, "batch_stats": state.batch_stats},
            "train": {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}}


def _restore_state(mngr, abstract: TrainState, out_dir: str) -> Optional[TrainState]:
    """The latest checkpoint that loads (an older kept one, with a warning, if the latest is damaged)."""
    found = training.restore_latest(mngr, _state_items(abstract), out_dir, error=SegmenterRunError)
    if found is None:
        return None
    m, t = found[1]["model"], found[1]["train"]
    return TrainState(step=t["step"], params=m["params"], batch_stats=m["batch_stats"], opt_state=t["opt_state"],
                      rng=t["rng"])


class TrainingPrograms(NamedTuple):
    """The jitted pieces of a training run (built once per model, optimiser, resolution and mesh).

    For custom loops and benchmarks::

        progs = training_programs(model, 64, 1e-3, 1e-4, 50, 1000, 255, mesh)
        state = progs.init(np.uint32(seed))
        state, metrics = progs.step(state, sharding.place_batch(batch, mesh))   # batch: image, label
    """

    init: Any        # seed uint32 [] -> TrainState, replicated
    step: Any        # (TrainState, batch) -> (TrainState, {"loss", "lr"}); the state is donated
    evaluate: Any    # (variables, batch) -> (confusion [K, K] int32, summed loss, counted pixels)
    abstract: Any    # TrainState of ShapeDtypeStructs with their shardings (to restore into)


@functools.lru_cache(maxsize=8)
def training_programs(model, resolution: int, lr: float, weight_decay: float, warmup: int, schedule_steps: int,
                      ignore_index: int, mesh) -> TrainingPrograms:
    """Shapes first, then shardings, then the jitted programs (cached: a resumed or repeated run reuses them).

    Parameters are drawn with the ``rbg`` PRNG (XLA's RngBitGenerator): compiling a network's
    initialisation with the default threefry generator takes many times longer on a CPU. The
    dropout keys of the steps (``rng`` of the state) are threefry keys, whose bits do not depend
    on how the batch is split over devices.
    """
    k = model.num_classes
    tx, schedule = make_optimizer(lr, weight_decay, warmup, schedule_steps)
    repl, rows = sharding.replicated(mesh), sharding.row_sharding(mesh)

    def init_state(seed) -> TrainState:
        variables = model.init({"params": jax.random.key(seed, impl="rbg")},
                               jnp.zeros((1, resolution, resolution, 3), jnp.uint8), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                          opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)))

    abstract, state_sh = training.replicated_state(init_state, mesh)
    batch_sh = {"image": rows, "label": rows}

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                          train=True, mutable=["batch_stats"], rngs={"dropout": key})
            return pixel_cross_entropy(logits, batch["label"], ignore_index), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)  # global-batch mean
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state, rng=state.rng)
        return new, {"loss": loss, "lr": schedule(state.step)}

    def eval_step(variables: dict, batch: dict):
        logits = model.apply(variables, batch["image"], train=False)            # [B, R, R, K]
        labels = batch["label"]
        valid = labels != ignore_index
        codes = jnp.where(valid, labels * k + jnp.argmax(logits, -1), k * k)    # k*k: not counted
        table = jnp.bincount(codes.ravel(), length=k * k + 1)[: k * k].reshape(k, k)
        ce = _pixel_ce(logits, jnp.where(valid, labels, 0))
        return table, jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid)

    return TrainingPrograms(
        init=jax.jit(init_state, in_shardings=repl, out_shardings=state_sh),
        step=jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                     donate_argnums=0),
        evaluate=jax.jit(eval_step, in_shardings=(repl, batch_sh), out_shardings=repl),
        abstract=abstract)


# -- training -------------------------------------------------------------------------------


def fit_segmenter(source, *, arch: str = "unet", steps: int, batch_size: int = 16, out_dir: Optional[str] = None,
                  resume: bool = False, lr: float = 1e-3, weight_decay: float = 1e-4, warmup: Optional[int] = None,
                  schedule_steps: Optional[int] = None, seed: int = 0, mesh=None, val_source=None,
                  val_samples: Optional[int] = None, eval_every: int = 500, checkpoint_every: int = 500,
                  ignore_index: int = 255, model_kwargs: Optional[Mapping] = None, data_threads: int = 2,
                  log_every: int = 10, data_info: Optional[Mapping] = None, progress: bool = True,
                  quiet: bool = False) -> TrainedSegmenter:
    """Train a segmentation network on (image, label) pairs; see the module docstring.

    Args:
        source: random-access pairs (``len``, ``[i] -> {"image", "label"}``, ``num_classes``, ...).
        arch: ``"unet"`` or ``"deeplabv3"``; ``model_kwargs`` its options (:func:`gansem.ufgs.models.build_model`).
        steps: train until this many steps are done (a resumed run continues from its checkpoint).
        batch_size: global batch (images per step), a multiple of the mesh's device count.
        out_dir: run directory (model.json, checkpoints, metrics, curves, summary); ``None``: nothing written.
        resume: continue the run in ``out_dir`` (from scratch if it has no checkpoint yet).
        lr, weight_decay: AdamW peak learning rate and decoupled weight decay (kernels only).
        warmup: warmup steps (default 5 % of ``schedule_steps``).
        schedule_steps: steps of the cosine schedule (default ``steps``); ``steps`` may not exceed it.
        seed: data order, initialisation and dropout.
        mesh: 1-D mesh (:func:`gansem.sharding.make_mesh`) to train data-parallel on; ``None``: one device.
        val_source: pairs to evaluate on; without it the last ``val_samples`` items of ``source``
            (default :func:`default_val_samples`) are held out; 0 turns validation off.
        eval_every, checkpoint_every: in steps (both also happen after the last step).
        ignore_index: label value excluded from the loss and the metrics.
        data_threads: threads reading batches ahead (0: read in the training loop).
        log_every: steps between fetches of the loss from the device (the file still gets every step).
        data_info: extra description of the data for ``model.json`` (e.g. its path).
        progress: tqdm bar with the loss; quiet: no log lines.

    Returns:
        The :class:`TrainedSegmenter` after ``steps`` steps, with ``history`` (every metrics
        record of the run) and ``summary``.

    Raises:
        ValueError (:class:`SegmenterRunError` for run directories): impossible settings, bad data,
        an existing run without ``resume``, a resume with other settings, or damaged checkpoints.
    """
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    n_dev = int(mesh.devices.size)
    cfg = SegmenterTrainConfig(arch=arch, steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                               weight_decay=float(weight_decay), warmup=warmup, schedule_steps=schedule_steps,
                               seed=int(seed), val_samples=val_samples, eval_every=int(eval_every),
                               checkpoint_every=int(checkpoint_every), ignore_index=int(ignore_index),
                               model_kwargs=_normalised_kwargs(model_kwargs), log_every=int(log_every),
                               data_threads=int(data_threads))
    cfg.check(n_dev)
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir of the run to continue")
    data = describe_source(source)
    n_items, k, res = data["items"], data["num_classes"], data["resolution"]
    model = build_model(cfg.arch, k, **cfg.model_kwargs)
    if val_source is not None:
        if val_samples:
            raise ValueError("give val_source or val_samples (items held out of source), not both")
        vdata = describe_source(val_source, "validation source")
        if (vdata["num_classes"], vdata["resolution"]) != (k, res):
            raise ValueError(f"the validation source has K={vdata['num_classes']} at {vdata['resolution']} px, "
                             f"the training source K={k} at {res} px")
    stored = _stored_run(out_dir, resume) if out_dir is not None else None
    old_cfg = (stored or {}).get("config", {})  # a resumed run keeps its split and schedule unless told otherwise
    if val_source is not None:
        n_val, train_items, val_desc = vdata["items"], n_items, f"separate source of {vdata['items']} items"
    else:
        n_val = int(val_samples) if val_samples is not None else int(
            old_cfg.get("val_samples", default_val_samples(n_items)))
        if n_val >= n_items:
            raise ValueError(f"val_samples={n_val} leaves no training item of the {n_items}")
        train_items, val_desc = n_items - n_val, (f"last {n_val} items of the source held out" if n_val else "none")
    sched = cfg.schedule_steps if cfg.schedule_steps is not None else old_cfg.get("schedule_steps", cfg.steps)
    warm = cfg.warmup if cfg.warmup is not None else old_cfg.get("warmup", sched // 20)
    cfg = dataclasses.replace(cfg, schedule_steps=int(sched), warmup=int(warm), val_samples=n_val)
    if cfg.warmup >= cfg.schedule_steps and cfg.schedule_steps > 1:
        raise ValueError(f"warmup ({cfg.warmup}) must be shorter than the schedule ({cfg.schedule_steps} steps)")
    if cfg.steps > cfg.schedule_steps:
        raise ValueError(f"steps={cfg.steps} goes past the learning-rate schedule, which ends (lr 0) at "
                         f"schedule_steps={cfg.schedule_steps}; to train in several sessions create the run with "
                         "schedule_steps set to the total (--schedule-steps)")
    settings = {"arch": cfg.arch, "model_kwargs": cfg.model_kwargs, "num_classes": k, "resolution": res,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                "warmup": cfg.warmup, "schedule_steps": cfg.schedule_steps, "ignore_index": cfg.ignore_index,
                "source_items": n_items, "train_items": train_items, "val": val_desc}
    if stored is not None:
        training.check_same_settings(out_dir, stored.get("fixed", {}), settings, FIXED_SETTINGS,
                                     error=SegmenterRunError)

    meta = {"format": "gansem.ufgs.segmenter", "version": 1, "arch": cfg.arch, "model_kwargs": cfg.model_kwargs,
            "num_classes": k, "resolution": res, "palette": data["palette"], "class_names": data["class_names"],
            "data": {"items": n_items, "train_items": train_items, "validation": val_desc, "meta": data["meta"],
                     **dict(data_info or {})},
            "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "fixed": settings}
    if out_dir is not None and stored is None:
        training.create_run_dir(out_dir, meta, error=SegmenterRunError)  # only now: every check above comes before a folder appears
    elif stored is not None:
        meta = stored

    progs = training_programs(model, res, cfg.lr, cfg.weight_decay, cfg.warmup, cfg.schedule_steps,
                              cfg.ignore_index, mesh)

    # -- resume ----------------------------------------------------------------------------
    mngr = checkpoint_manager(out_dir, create=True) if out_dir is not None else None
    state, start = None, 0
    if mngr is not None and stored is not None:
        state = _restore_state(mngr, progs.abstract, out_dir)
        if state is None:
            _log(f"{out_dir}: no checkpoint yet; training from step 0", quiet)
        else:
            start = int(state.step)
            _log(f"resuming {out_dir} from step {start}", quiet)
    if state is None:
        state = progs.init(np.uint32(cfg.seed))
    log = training.MetricsLog(out_dir, start)  # drops the records of steps after the checkpoint: recomputed
    history, record = log.history, log.append

    # -- validation ------------------------------------------------------------------------
    if val_source is not None:
        val_ds = grain.MapDataset.source(val_source)
    elif n_val:
        val_ds = grain.MapDataset.source(source).slice(slice(train_items, n_items))
    else:
        val_ds = None
    if val_ds is not None:
        val_ds = val_ds.map(_pair).batch(cfg.batch_size)

    def evaluate(state: TrainState) -> dict:
        table, ce_sum, count = np.zeros((k, k), np.int64), 0.0, 0
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        for b in range(len(val_ds)):
            batch = val_ds[b]
            _check_labels(batch["label"], k, cfg.ignore_index, "validation data")
            m = batch["label"].shape[0]
            if m < cfg.batch_size:  # pad with ignored pixels: they count nowhere
                pad = cfg.batch_size - m
                batch = {"image": np.concatenate([batch["image"], np.zeros((pad,) + batch["image"].shape[1:],
                                                                            np.uint8)]),
                         "label": np.concatenate([batch["label"], np.full((pad,) + batch["label"].shape[1:],
                                                                          cfg.ignore_index, np.int32)])}
            t, s, c = jax.device_get(progs.evaluate(variables, sharding.place_batch(batch, mesh)))
            table += t
            ce_sum += float(s)
            count += int(c)
        scores = confusion_scores(table)
        return {"val_loss": ce_sum / max(count, 1), "val_pixel_accuracy": scores["pixel_accuracy"],
                "val_miou": scores["miou"], "val_items": n_val,
                "val_iou": [None if np.isnan(v) else float(v) for v in scores["iou"]]}

    # -- the loop --------------------------------------------------------------------------
    _log(f"{cfg.arch} on {n_items} pairs ({train_items} trained on; validation: {val_desc}), K={k}, {res} px; "
         f"batch {cfg.batch_size} over {n_dev} {jax.default_backend()} device(s), steps {start} -> {cfg.steps}",
         quiet)
    timer = training.StepTimer()
    stream = training_batches(source, batch_size=cfg.batch_size, seed=cfg.seed, num_items=train_items)
    batches = iter(stream[start:].to_iter_dataset(grain.ReadOptions(
        num_threads=cfg.data_threads, prefetch_buffer_size=max(2, 2 * cfg.data_threads))))
    last_eval, last_loss = None, None
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.arch}", disable=not progress, unit="step")
    try:
        for t in range(start, cfg.steps):
            batch = next(batches)
            _check_labels(batch["label"], k, cfg.ignore_index, f"training batch of step {t}")
            state, m = progs.step(state, sharding.place_batch(batch, mesh))
            done = t + 1
            log.defer(done, m)
            timer.step_done(m)  # the first step compiles: time the steps after it
            is_eval = val_ds is not None and (done % cfg.eval_every == 0 or done == cfg.steps)
            is_ckpt = mngr is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
            if log.num_deferred >= cfg.log_every or is_eval or is_ckpt or done == cfg.steps:
                last_loss = log.flush()["loss"]
                bar.set_postfix(loss=f"{last_loss:.4f}")
            bar.update(1)
            with timer.excluded():
                if is_eval:
                    last_eval = evaluate(state)
                    record({"step": done, **{a: b for a, b in last_eval.items() if a != "val_iou"}})
                    if not quiet:
                        (bar.write if progress else print)(
                            f"[gansem] step {done}: validation pixel accuracy {last_eval['val_pixel_accuracy']:.4f}, "
                            f"mIoU {last_eval['val_miou']:.4f}, loss {last_eval['val_loss']:.4f}")
                if is_ckpt:
                    training.save_checkpoint(mngr, done, _state_items(state), {"step": done, "loss": last_loss})
        jax.block_until_ready(state)
    finally:
        training.close_training(bar, batches, mngr)
    done_now = max(0, cfg.steps - start)
    timing = timer.summary(done_now, cfg.batch_size)
    if val_ds is not None and last_eval is None and start >= cfg.steps:
        last_eval = evaluate(state)
    summary = {
        "steps": int(state.step), "resumed_from": start if stored is not None else None,
        "steps_this_call": done_now, **timing,
        "devices": n_dev, "backend": jax.default_backend(), "batch_size": cfg.batch_size,
        "final_loss": history_loss(history),
        "final_val": last_eval,
    }
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    seg = TrainedSegmenter(model=model, variables=variables, meta=meta, step=int(state.step), mesh=mesh,
                           history=history, summary=summary, run_dir=out_dir)
    if out_dir is not None:
        _write_outputs(out_dir, history, summary, meta)
        _log(f"wrote {out_dir}: {MODEL_FILE}, {CHECKPOINT_DIR}/, {METRICS_FILE}, curves.png, summary.json, "
             "manifest.json", quiet)
    return seg


def history_loss(history: list, last: int = 10) -> Optional[float]:
    """Mean training loss of the last ``last`` logged steps (``None`` if none)."""
    losses = [r["loss"] for r in history if "loss" in r][-last:]
    return float(np.mean(losses)) if losses else None


def _write_outputs(out_dir: str, history: list, summary: dict, meta: dict) -> None:
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "val_miou" in r]
    curves = {"val mIoU": [r["val_miou"] for r in evals],
              "val pixel accuracy": [r["val_pixel_accuracy"] for r in evals]} if evals else {}
    viz.training_curves_plot([r["step"] for r in train], [r["loss"] for r in train], [r["step"] for r in evals],
                             curves, os.path.join(out_dir, "curves.png"),
                             title=f"{meta['arch']}, K={meta['num_classes']}, {meta['resolution']} px")
    training.write_json(os.path.join(out_dir, "summary.json"), summary)
    training.write_json(os.path.join(out_dir, "manifest.json"), {
        "kind": "gansem UFGS segmenter run",
        "files": {
            MODEL_FILE: "architecture, model options, K, resolution, palette, class names, data, training config "
                        "(and the settings a resume must match)",
            f"{CHECKPOINT_DIR}/<step>/": "Orbax checkpoints, the latest 2: items model (params, batch_stats), "
                                        "train (opt_state, step, rng), meta (JSON)",
            METRICS_FILE: "one JSON line per step (step, loss, lr) and per evaluation (step, val_loss, "
                          "val_pixel_accuracy, val_miou, val_items)",
            "curves.png": "training loss and validation mIoU / pixel accuracy against the step",
            "summary.json": "steps, seconds, steps/s, images/s, devices, final loss and validation numbers",
        },
        "load": "gansem.ufgs.predict.TrainedSegmenter.load(run_dir)",
    })
