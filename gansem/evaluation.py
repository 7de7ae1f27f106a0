"""Evaluate KLiSH against the baselines (Tab. 4) and SVM against a softmax extractor (Tab. 3).

Reference labels come from a :class:`LabelsSource`:

* :class:`FileLabels` -- an ``.npz`` in the layout ``launch/segment.py`` writes:
  ``images`` uint8 ``[N,H,W,3]``, ``latents`` ``[N,...]`` (generator inputs; the
  features are recomputed from them), ``labels`` int ``[N,H,W]`` (reference
  classes), optional ``class_names`` ``[M]`` and ``class_labels`` ``[N]``
  (conditional generators).
* :class:`CallableLabels` -- any function ``images uint8 [B,H,W,3] -> labels int
  [B,H,W]`` (a pretrained segmenter), named ``module:function`` or
  ``path/to/file.py:function``. Samples are then drawn from the run's generator
  on an **evaluation stream disjoint from the clustering samples**: the run drew
  its latents from ``fold_in(key(seed), 0)`` (class labels ``1``, K-means ``2``);
  the evaluation draws from ``fold_in(fold_in(key(eval_seed), EVAL_STREAM), j)``
  with ``EVAL_STREAM = 1_000_003``, ``j = 0`` (latents) / ``1`` (class labels) for
  evaluation samples and ``j = 2 / 3`` for the training samples of the
  separability experiment. The derivation paths differ, so the streams are
  independent whatever ``eval_seed`` is; :func:`evaluation_latents` also checks
  that no evaluation latent equals a clustering latent and raises otherwise.
* ``"faces"`` -- the built-in face-part labeller :func:`gansem.references.faces.segment_faces`
  (dlib 68-point landmarks; classes background, skin, brows, eyes, nose, lips, mouth),
  a :class:`CallableLabels` with ``ignore_label = IGNORE`` (255).

Reference labels are class ids ``0..M-1``: at most :data:`MAX_REF_CLASSES` (1024)
classes, or as many as ``class_names`` names; larger ids are refused (contingency
tables are sized by the largest id), as are ids beyond int32 and NaN/Inf latents.

A sample whose reference map is entirely ``ignore_label`` (e.g. no face found by the
``faces`` labeller) is **skipped**: it adds no pixel to any contingency table and no
image to the per-image mIoU average. Both experiments report how many samples were
labelled and skipped.

:func:`evaluate_run` fits the requested baselines on the **same clustering data
as the run** (features recomputed from the run's ``latents.npy`` with the run's
generator, layers and resolution), evaluates every method at every K on the
evaluation samples by streaming per-image contingency tables batch by batch,
and reports ARI, AMI, NMI and the greedy-matching mIoU (Algorithm 2) with both
averagings (``"image"``: per-class IoU averaged over the images where the union
is non-empty, as the original evaluation; ``"dataset"``: pixels pooled over all
images). Every method is a :class:`gansem.cluster.baselines.ClusterClassifier`
applied to the features upsampled to the label resolution, exactly as KLiSH
segments new samples.

:func:`separability_experiment` (Sec. 4.2, Tab. 3) trains the one-vs-rest SVMs
of Eq. 3 and a cross-entropy linear extractor (LSE, softmax regression) on
features with reference labels and compares their mIoU on held-out samples.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics
from .cluster import baselines as bl
from .features import FeatureTransform, to_uint8
from .segment import SegmentError, classifier_at

__all__ = [
    "EVAL_STREAM",
    "BASELINES",
    "EvaluationError",
    "MAX_REF_CLASSES",
    "BUILTIN_LABELS",
    "LabelsSource",
    "FileLabels",
    "CallableLabels",
    "load_labels_callable",
    "resolve_labels_source",
    "evaluation_latents",
    "evaluate_run",
    "results_table_markdown",
    "separability_experiment",
]

#: Stream offset of evaluation samples (see module docstring).
EVAL_STREAM = 1_000_003
#: Baseline names accepted by :func:`evaluate_run` and ``launch/evaluate.py --baselines``.
BASELINES = ("kmeans", "kmeans-arccos", "ahc", "ahc-cosine", "kasp")
#: Built-in reference labellers, accepted by name as ``--labels`` (see :func:`resolve_labels_source`).
BUILTIN_LABELS = ("faces",)
#: Most reference classes (label ids ``0..MAX_REF_CLASSES-1``) accepted without ``class_names`` naming more:
#: every contingency table has one row per id up to the largest one seen.
MAX_REF_CLASSES = 1024
_INT32 = np.iinfo(np.int32)
_METHOD_TITLES = {
    "klish": "KLiSH", "kmeans": "K-means (euclidean)", "kmeans-arccos": "K-means (arccos)",
    "ahc": "AHC (ward)", "ahc-cosine": "AHC (arccos)", "kasp": "KASP (euclidean)",
}


class EvaluationError(ValueError):
    """Impossible evaluation request (bad labels source, shapes, K...); the message says what to do."""


# =====================================================================================
# Labels sources
# =====================================================================================


def _check_ignore_label(ignore_label) -> Optional[int]:
    if ignore_label is None:
        return None
    if isinstance(ignore_label, (bool, np.bool_)) or not isinstance(ignore_label, (int, np.integer)):
        raise EvaluationError(f"--ignore-label must be an integer, got {ignore_label!r}")
    if not _INT32.min <= int(ignore_label) <= _INT32.max:
        raise EvaluationError(f"--ignore-label {ignore_label} is outside the int32 range of label maps")
    return int(ignore_label)


def _checked_labels(labels: np.ndarray, ignore_label, class_names, what: str) -> np.ndarray:
    """Integer ``labels`` as int32 after checking their range on the original values (nothing wraps).

    Kept (not ignored) labels must lie in ``[0, M)`` with ``M`` the number of ``class_names``,
    or :data:`MAX_REF_CLASSES` without them.
    """
    keep = labels != ignore_label if ignore_label is not None else np.ones(labels.shape, bool)
    vals = labels[keep]
    if vals.size:
        lo, hi = int(vals.min()), int(vals.max())
        if lo < 0:
            raise EvaluationError(f"{what}: negative labels (down to {lo}); pass --ignore-label for the value "
                                  "marking unlabelled pixels")
        if class_names is not None and hi >= len(class_names):
            raise EvaluationError(f"{what}: labels go up to {hi} but class_names has {len(class_names)} entries")
        if class_names is None and hi >= MAX_REF_CLASSES:
            raise EvaluationError(
                f"{what}: labels go up to {hi}, but reference classes must be numbered 0..M-1 with M <= "
                f"{MAX_REF_CLASSES} (tables have one row per id); renumber the classes compactly, mark unlabelled "
                "pixels with --ignore-label, or name the classes (class_names) if there really are more")
    return labels.astype(np.int32)



class LabelsSource:
    """Where reference labels come from. See :class:`FileLabels` and :class:`CallableLabels`."""

    class_names: Optional[tuple] = None
    ignore_label: Optional[int] = None

    def describe(self) -> dict:
        raise NotImplementedError


@dataclasses.dataclass
class FileLabels(LabelsSource):
    """Labels stored with their samples in an ``.npz`` (layout of ``launch/segment.py``).

    Attributes:
        path: the file.
        images: ``[N, H, W, 3]`` uint8; latents: ``[N, ...]`` float32; labels: ``[N, H, W]`` int32.
        class_labels: ``[N]`` int32 or None; class_names: tuple of M names or None.
    """

    path: str
    images: np.ndarray
    latents: np.ndarray
    labels: np.ndarray
    class_labels: Optional[np.ndarray] = None
    class_names: Optional[tuple] = None
    ignore_label: Optional[int] = None

    @classmethod
    def load(cls, path: str, ignore_label: Optional[int] = None) -> "FileLabels":
        if not os.path.isfile(path):
            raise EvaluationError(f"labels file {path!r} does not exist")
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:  # BadZipFile, ValueError (pickled object arrays), OSError
            raise EvaluationError(f"{path}: cannot read as an .npz without pickles ({e})") from e
        with z:
            missing = [k for k in ("images", "latents", "labels") if k not in z.files]
            if missing:
                raise EvaluationError(
                    f"{path}: missing arrays {missing}; a labels file holds images uint8 [N,H,W,3], latents [N,...] "
                    f"(the generator inputs) and labels int [N,H,W] (found: {sorted(z.files)})")
            images, latents, labels = z["images"], z["latents"], z["labels"]
            class_labels = z["class_labels"] if "class_labels" in z.files else None
            names = z["class_names"] if "class_names" in z.files else None
        if names is not None:
            if names.ndim != 1:
                raise EvaluationError(f"{path}: class_names must be a list of names [M], got shape {names.shape}")
            names = tuple(str(s) for s in names.tolist())
        ignore_label = _check_ignore_label(ignore_label)
        n = images.shape[0] if images.ndim else 0
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise EvaluationError(f"{path}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
            raise EvaluationError(f"{path}: labels must be int [N, H, W], got {labels.dtype} {labels.shape}")
        if labels.shape != images.shape[:3]:
            raise EvaluationError(
                f"{path}: labels {labels.shape} do not match images {images.shape[:3]} (need the same N, H, W)")
        if labels.shape[1] != labels.shape[2]:
            raise EvaluationError(f"{path}: label maps must be square (H == W), got {labels.shape[1:]}")
        if latents.ndim < 1 or not (np.issubdtype(latents.dtype, np.floating)
                                    or np.issubdtype(latents.dtype, np.integer)):
            raise EvaluationError(f"{path}: latents must be a float array [N, ...] of generator inputs, got "
                                  f"{latents.dtype} of shape {latents.shape}")
        if latents.shape[0] != n:
            raise EvaluationError(f"{path}: {latents.shape[0]} latents for {n} images")
        if class_labels is not None and class_labels.shape != (n,):
            raise EvaluationError(f"{path}: class_labels must be [N]={n}, got {class_labels.shape}")
        if n == 0:
            raise EvaluationError(f"{path}: holds no samples")
        if class_labels is not None:
            if not np.issubdtype(class_labels.dtype, np.integer):
                raise EvaluationError(f"{path}: class_labels must be integer class ids [N], got {class_labels.dtype}")
            if class_labels.size and not (0 <= int(class_labels.min()) and int(class_labels.max()) <= _INT32.max):
                raise EvaluationError(f"{path}: class_labels must lie in [0, 2**31), got "
                                      f"{int(class_labels.min())}..{int(class_labels.max())}")
        lab = _checked_labels(labels, ignore_label, names, path)
        with np.errstate(over="ignore", invalid="ignore"):
            lat = latents.astype(np.float32)
        if not np.all(np.isfinite(lat)):
            bad = int((~np.isfinite(lat)).reshape(n, -1).any(axis=1).sum())
            raise EvaluationError(f"{path}: latents of {bad} of {n} samples are NaN/Inf (or beyond float32); "
                                  "the generator inputs must be finite: remake the file")
        return cls(path, images, lat, lab,
                   None if class_labels is None else class_labels.astype(np.int32), names, ignore_label)

    @property
    def num_samples(self) -> int:
        return int(self.latents.shape[0])

    @property
    def label_size(self) -> int:
        return int(self.labels.shape[1])

    def describe(self) -> dict:
        return {"kind": "file", "path": os.path.abspath(self.path), "num_samples": self.num_samples,
                "label_size": self.label_size, "class_names": list(self.class_names) if self.class_names else None}


@dataclasses.dataclass
class CallableLabels(LabelsSource):
    """A function ``images uint8 [B,H,W,3] -> labels int [B,H,W]``; samples come from the generator."""

    fn: Callable
    name: str
    class_names: Optional[tuple] = None
    ignore_label: Optional[int] = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = np.asarray(self.fn(images))
        b, h, w = images.shape[:3]
        if out.shape != (b, h, w):
            raise EvaluationError(
                f"labels callable {self.name} returned shape {out.shape} for images {images.shape}; it must return "
                f"int labels [B, H, W] = [{b}, {h}, {w}]")
        if not np.issubdtype(out.dtype, np.integer):
            if (np.issubdtype(out.dtype, np.floating) and np.all(np.isfinite(out)) and np.all(np.mod(out, 1) == 0)
                    and (out.size == 0 or np.abs(out).max() <= _INT32.max)):
                out = out.astype(np.int64)
            else:
                raise EvaluationError(f"labels callable {self.name} returned dtype {out.dtype}; return integer class ids")
        return _checked_labels(out, _check_ignore_label(self.ignore_label), self.class_names,
                               f"labels callable {self.name}")

    def describe(self) -> dict:
        return {"kind": "callable", "name": self.name,
                "class_names": list(self.class_names) if self.class_names else None}


def load_labels_callable(spec: str) -> CallableLabels:
    """Import ``module:function`` or ``path/to/file.py:function``.

    The function's optional ``class_names`` attribute names the classes.
    """
    if ":" not in spec:
        raise EvaluationError(f"labels callable {spec!r} must be 'module:function' or 'path/to/file.py:function'")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise EvaluationError(f"labels callable: file {mod_name!r} does not exist")
            name = "_gansem_labels_" + os.path.splitext(os.path.basename(mod_name))[0]
            module_spec = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise EvaluationError(f"labels callable {spec!r}: cannot import {mod_name!r} ({e})") from e
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise EvaluationError(f"labels callable {spec!r}: {mod_name!r} has no callable named {fn_name!r}")
    names = getattr(fn, "class_names", None)
    return CallableLabels(fn, spec, tuple(names) if names is not None else None)


def _builtin_labels(name: str, ignore_label: Optional[int]) -> CallableLabels:
    """The built-in labeller ``name`` (one of :data:`BUILTIN_LABELS`), its models loaded now to fail early."""
    from .references import faces

    try:
        faces.load_models()
    except ImportError as e:
        raise EvaluationError(f"--labels {name}: {e}") from e
    if ignore_label not in (None, faces.IGNORE):
        raise EvaluationError(f"--labels {name} marks unlabelled samples with {faces.IGNORE}; "
                              f"leave --ignore-label unset (got {ignore_label})")
    return CallableLabels(faces.segment_faces, name, faces.CLASS_NAMES, faces.IGNORE)


def resolve_labels_source(spec, ignore_label: Optional[int] = None) -> LabelsSource:
    """A :class:`LabelsSource` from a built-in name, an ``.npz`` path, a ``module:function`` string, or a callable.

    ``"faces"`` is the built-in face-part labeller (:mod:`gansem.references.faces`) with
    ``ignore_label`` = its ``IGNORE`` value (255) and its class names.
    """
    ignore_label = _check_ignore_label(ignore_label)
    if isinstance(spec, LabelsSource):
        if ignore_label is not None:
            spec.ignore_label = ignore_label
        return spec
    if callable(spec):
        return CallableLabels(spec, getattr(spec, "__name__", repr(spec)),
                              tuple(spec.class_names) if hasattr(spec, "class_names") else None, ignore_label)
    spec = str(spec)
    if spec in BUILTIN_LABELS:
        return _builtin_labels(spec, ignore_label)
    if spec.endswith(".npz") or os.path.isfile(spec):
        return FileLabels.load(spec, ignore_label)
    if ":" in spec:
        src = load_labels_callable(spec)
        src.ignore_label = ignore_label
        return src
    raise EvaluationError(
        f"--labels {spec!r} is neither an .npz labels file, 'module:function' / 'file.py:function' (a callable "
        f"mapping uint8 images [B,H,W,3] to int labels [B,H,W]) nor a built-in labeller ({', '.join(BUILTIN_LABELS)})")


def _stream_key(seed: int, j: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seed)), EVAL_STREAM), j)


def evaluation_latents(gen, seed: int, n: int, *, training_latents=None, part: str = "eval"):
    """Latents (and class labels) of the evaluation stream, disjoint from the clustering samples.

    Args:
        gen: the generator.
        seed: evaluation seed (the run's seed by default in :func:`evaluate_run`).
        n: number of samples.
        training_latents: the run's ``latents.npy``; if any sampled latent equals one of
            them exactly, raise (cannot happen with distinct PRNG streams; checked anyway).
        part: ``"eval"`` (stream parts 0/1) or ``"train"`` (parts 2/3, separability training set).

    Returns:
        ``(latents [n, ...] float32, class_labels [n] int32 or None)``.
    """
    j = {"eval": 0, "train": 2}[part]
    lat = np.asarray(gen.sample_latents(_stream_key(seed, j), n), np.float32)
    cl = gen.sample_class_labels(_stream_key(seed, j + 1), n)
    cl = None if cl is None else np.asarray(cl, np.int32)
    if training_latents is not None:
        overlap = count_overlap(lat, training_latents)
        if overlap:
            raise EvaluationError(f"{overlap} evaluation latents equal clustering latents; use another --eval-seed")
    return lat, cl


def count_overlap(a, b) -> int:
    """Number of rows of ``a`` that also occur (bit-exactly) in ``b``."""
    a = np.ascontiguousarray(np.asarray(a, np.float32).reshape(len(a), -1))
    b = np.ascontiguousarray(np.asarray(b, np.float32).reshape(len(b), -1))
    if a.shape[1] != b.shape[1]:
        return 0
    sb = {r.tobytes() for r in b}
    return int(sum(r.tobytes() in sb for r in a))


# =====================================================================================
# Streaming contingency tables with a growing number of reference classes
# =====================================================================================


class _Tables:
    """Per-image ``[n, M, K]`` tables of one classifier; M grows as new reference classes appear."""

    def __init__(self, k: int, ignore_label):
        self.k = k
        self.ignore_label = ignore_label
        self.parts: list[np.ndarray] = []

    def update(self, pred: np.ndarray, ref: np.ndarray, m: int):
        self.parts.append(metrics.contingency(pred, ref, self.k, m, per_image=True, ignore_label=self.ignore_label))

    def tables(self, m: int) -> np.ndarray:
        return np.concatenate([np.pad(t, ((0, 0), (0, m - t.shape[1]), (0, 0))) for t in self.parts])


def _num_skipped(ref: np.ndarray, ignore_label) -> int:
    """Samples of ``ref [B, H, W]`` without reference labels (every pixel ``ignore_label``)."""
    if ignore_label is None:
        return 0
    return int(np.all(ref == ignore_label, axis=(1, 2)).sum())


def _check_labelled(num_skipped: int, n: int, what: str) -> None:
    if num_skipped == n:
        raise EvaluationError(f"none of the {n} {what} samples has reference labels (every pixel is the ignored "
                              "label); check the labels source and --ignore-label")


def _num_ref(ref: np.ndarray, ignore_label, current: int) -> int:
    keep = ref != ignore_label if ignore_label is not None else slice(None)
    r = ref[keep]
    return max(current, int(r.max()) + 1 if r.size else 1)


# =====================================================================================
# Classifier evaluation on generated samples
# =====================================================================================


def _pack(classifiers: Sequence[bl.ClusterClassifier]):
    """Stack the rows of many classifiers (shared row blocks once) → W_all, b_all and static slices."""
    blocks, index, spec = [], {}, []
    start = 0
    for c in classifiers:
        key = id(c.W)
        if key not in index:
            index[key] = start
            blocks.append((c.W, c.b))
            start += c.W.shape[0]
        s = index[key]
        groups = None if c.groups is None else tuple(int(g) for g in c.groups)
        spec.append((s, s + c.W.shape[0], groups, int(c.num_clusters)))
    W = np.concatenate([b[0] for b in blocks]).astype(np.float32)
    bb = np.concatenate([b[1] for b in blocks]).astype(np.float32)
    return W, bb, tuple(spec)


def make_predict_fn(generator, layers, size: int, spec):
    """Jitted ``f(params, latents, class_labels, W_all, b_all) -> (images, preds [C, B, size, size] int32)``.

    Per-layer affine scores are computed at each layer's native resolution and
    upsampled (resizing is linear, so this equals scoring the upsampled
    features), then each classifier takes its rows (group-max for KASP) and the argmax.
    """
    from .segment import segment_scores

    layers = tuple(layers)
    names = tuple(l.name for l in layers)

    @jax.jit
    def fn(params, latents, class_labels, W, b):
        img, feats = generator.synthesize(params, latents, class_labels, capture=names)
        s = segment_scores(feats, layers, W, b, size)  # [B, size, size, R]
        preds = []
        for start, stop, groups, k in spec:
            sc = s[..., start:stop]
            if groups is not None:
                sc = bl.group_max(sc, np.asarray(groups, np.int32), k)
            preds.append(jnp.argmax(sc, axis=-1).astype(jnp.int32))
        return img, jnp.stack(preds)

    return fn


def _pad_batch(a, m):
    if a is None or a.shape[0] == m:
        return a
    return np.concatenate([a, np.repeat(a[-1:], m - a.shape[0], 0)])


def _iterate_samples(source, gen, params, layers, size, spec, W, b, latents, class_labels, batch_size,
                     progress, desc):
    """Yield ``(images uint8, ref [B,S,S], preds [C,B,S,S])`` batch by batch."""
    from tqdm.auto import tqdm

    fn = make_predict_fn(gen, layers, size, spec)
    Wj, bj = jnp.asarray(W), jnp.asarray(b)
    n = latents.shape[0]
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        lat = latents[s:s + batch_size]
        m = lat.shape[0]
        cl = None if class_labels is None else class_labels[s:s + batch_size]
        img, preds = fn(params, _pad_batch(lat, batch_size), _pad_batch(cl, batch_size), Wj, bj)
        img = to_uint8(np.asarray(img)[:m])
        preds = np.asarray(preds)[:, :m]
        if isinstance(source, FileLabels):
            ref = source.labels[s:s + m]
            img_show = source.images[s:s + m]
        else:
            ref = source(img)
            img_show = img
            if ref.shape[1] != size:
                raise EvaluationError(f"labels callable returned {ref.shape[1:]} maps, expected {size}x{size}")
        yield img_show, ref, preds


def _load_run(run_dir: str):
    from .checkpoint import load_trajectory
    from .features import select_feature_layers
    from .generators import load_generator
    from .pipeline import apply_generator_settings

    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise EvaluationError(f"{run_dir!r} is not a KLiSH run directory (no config.json); run launch/klish.py first")
    with open(cfg_path) as f:
        cfg = json.load(f)
    traj = load_trajectory(run_dir)
    if not traj:
        raise EvaluationError(f"{run_dir!r} has no merge steps yet; let launch/klish.py finish (or --resume it)")
    gen, params, _ = load_generator(cfg["generator"])
    gen = apply_generator_settings(gen, cfg)
    layers = select_feature_layers(gen.feature_layers(), cfg["channel_budget"])
    lat_path = os.path.join(run_dir, "latents.npy")
    if not os.path.isfile(lat_path):
        raise EvaluationError(f"{run_dir!r} has no latents.npy (the clustered samples); the run is incomplete")
    latents = np.load(lat_path)
    cl_path = os.path.join(run_dir, "class_labels.npy")
    class_labels = np.load(cl_path) if os.path.isfile(cl_path) else None
    return cfg, traj, gen, params, layers, latents, class_labels


def _check_ks(traj, ks):
    avail = sorted({int(r["k"]) for r in traj})
    bad = [k for k in ks if k not in avail]
    if bad:
        raise EvaluationError(
            f"K={bad} not in the run's trajectory (available: {avail[0]}..{avail[-1]}); choose --k among those")


def _log(msg, quiet):
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def fit_baselines(baselines: Sequence[str], ks: Sequence[int], x_host: np.ndarray, *, seed: int, k0: int,
                  mesh, ahc_samples: int = 4000, kmeans_iters: int = 20, quiet: bool = True,
                  progress: bool = False) -> tuple[dict, dict]:
    """Fit baselines on clustering features ``x_host [N, D]``.

    Returns:
        ``({(method, k): ClusterClassifier}, {method: fit info})``.
    """
    from . import sharding
    from tqdm.auto import tqdm

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise EvaluationError(f"unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
    key = jax.random.fold_in(jax.random.key(int(seed)), 7)  # baselines' own stream (run uses 0, 1, 2)
    layout = sharding.plan_rows(x_host.shape[0], mesh.devices.size)
    x = valid = None
    if any(b in ("kmeans", "kmeans-arccos", "kasp") for b in baselines):
        x, valid = sharding.shard_rows(x_host, mesh, multiple=layout.padded_rows)
    out, info = {}, {}
    jobs = [(m, k) for m in baselines if m in ("kmeans", "kmeans-arccos") for k in ks]
    bar = tqdm(total=len(jobs) + sum(m in ("ahc", "ahc-cosine", "kasp") for m in baselines),
               desc="fit baselines", disable=not progress)
    for m, k in jobs:
        t = time.time()
        metric = "euclidean" if m == "kmeans" else "cosine"
        clf, res = bl.fit_kmeans(jax.random.fold_in(key, k * 2 + (m != "kmeans")),
                                 sharding.RowData(x, valid, layout, mesh), k, metric=metric, max_iter=kmeans_iters)
        out[(m, k)] = clf
        info.setdefault(m, {})[str(k)] = {"iters": int(res.n_iter), "converged": bool(res.converged),
                                          "inertia": float(res.inertia), "time_s": time.time() - t}
        bar.update(1)
    if "kasp" in baselines:
        t = time.time()
        if max(ks) > k0:
            raise EvaluationError(f"KASP groups K0={k0} centroids; K={max(ks)} is larger: raise --kasp-k0")
        clf, res = bl.fit_kmeans(jax.random.fold_in(key, 1), sharding.RowData(x, valid, layout, mesh), k0,
                                 max_iter=kmeans_iters)
        for k, c in bl.fit_kasp(np.asarray(res.centroids), ks, seed=seed).items():
            out[("kasp", k)] = c
        info["kasp"] = {"k0": int(k0), "kmeans_iters": int(res.n_iter), "kmeans_converged": bool(res.converged),
                        "groups_found": {str(k): int(out[("kasp", k)].num_clusters) for k in ks},
                        "time_s": time.time() - t}
        bar.update(1)
    for m in ("ahc", "ahc-cosine"):
        if m not in baselines:
            continue
        t = time.time()
        rng = np.random.default_rng(seed)
        n_sub = min(int(ahc_samples), x_host.shape[0])
        idx = np.sort(rng.choice(x_host.shape[0], n_sub, replace=False))
        fits = bl.fit_ahc(x_host[idx], ks, linkage="ward" if m == "ahc" else "average-cosine", mesh=mesh)
        for k, (clf, lab, r) in fits.items():
            out[(m, k)] = clf
            info.setdefault(m, {})[str(k)] = {
                "subsample": n_sub, "readout_iters": r.n_iter, "readout_converged": r.converged,
                "readout_train_accuracy": r.accuracy}
        info[m]["time_s"] = time.time() - t
        bar.update(1)
    bar.close()
    return out, info


def evaluate_run(run_dir: str, labels, ks: Sequence[int], baselines: Sequence[str] = BASELINES,
                 num_samples: Optional[int] = None, seed: Optional[int] = None, *, batch_size: int = 8,
                 devices: Optional[int] = None, miou_average: str = "image", ahc_samples: int = 4000,
                 kasp_k0: Optional[int] = None, kmeans_iters: int = 20, ignore_label: Optional[int] = None,
                 num_vis: int = 4, out_dir: Optional[str] = None, progress: bool = False,
                 quiet: bool = True) -> dict:
    """Tab. 4 for one run: KLiSH and baselines × K × (AMI, ARI, NMI, mIoU) on evaluation samples.

    Args:
        run_dir: a finished (or partial) ``launch/klish.py`` run directory.
        labels: a :class:`LabelsSource`, ``"faces"``, an ``.npz`` path, ``"module:function"``, or a callable.
        ks: numbers of clusters (each must be in the trajectory).
        baselines: subset of :data:`BASELINES`.
        num_samples: evaluation samples (callable source: required; file: default all).
        seed: evaluation seed for a callable source (default: the run's seed; the
            stream is disjoint from the clustering samples either way).
        batch_size: generator batch size of the evaluation pass.
        devices: devices for fitting the baselines (default all).
        miou_average: which mIoU the table shows, ``"image"`` or ``"dataset"`` (both are in the results).
        ahc_samples: pixels subsampled from the clustering data for AHC.
        kasp_k0: K-means centroids grouped by KASP (default: the run's K0).
        kmeans_iters: Lloyd iterations for K-means baselines (as the run).
        ignore_label: reference label value to skip.
        num_vis: samples shown in the cluster-map figures.
        out_dir: write ``results.json``, ``table.md`` and ``clusters_k{K}.png`` there.

    Returns:
        A JSON-able dict: ``scores[method][str(k)]`` with ``ari, ami, nmi, miou_image,
        miou_dataset, miou`` (the chosen averaging), ``per_class_iou``, ``assignment``,
        plus ``num_labelled`` / ``num_skipped`` (samples without reference labels, left
        out), ``fit`` statistics, ``labels`` description, timings and, with
        ``out_dir``, the written ``files``.
    """
    from . import sharding

    t0 = time.time()
    if miou_average not in ("image", "dataset"):
        raise EvaluationError(f"--miou-average must be 'image' or 'dataset', got {miou_average!r}")
    ks = sorted({int(k) for k in ks}, reverse=True)
    if not ks:
        raise EvaluationError("give at least one K")
    baselines = list(dict.fromkeys(baselines))
    # The labels source first: importing a callable's module may register a generator family.
    source = resolve_labels_source(labels, ignore_label)
    cfg, traj, gen, params, layers, run_latents, run_cls = _load_run(run_dir)
    _check_ks(traj, ks)
    classifiers = {("klish", k): bl.linear_classifier(*classifier_at(traj, k)) for k in ks}
    dim = sum(l.channels for l in layers)
    if classifiers[("klish", ks[0])].W.shape[1] != dim:
        raise EvaluationError(f"the trajectory's classifier has {classifiers[('klish', ks[0])].W.shape[1]} inputs but "
                              f"the generator's layers give {dim}: the generator changed since the run")

    # -- evaluation samples -----------------------------------------------------------------
    eval_seed = int(cfg["seed"] if seed is None else seed)
    if isinstance(source, FileLabels):
        if tuple(source.latents.shape[1:]) != tuple(gen.latent_shape):
            raise EvaluationError(
                f"{source.path}: latents have shape {source.latents.shape[1:]} but the run's generator takes "
                f"{tuple(gen.latent_shape)}: the file was made with another generator")
        n = source.num_samples if num_samples is None else int(num_samples)
        if not 1 <= n <= source.num_samples:
            raise EvaluationError(f"--num-samples {n}: the labels file holds {source.num_samples} samples")
        if gen.num_classes and source.class_labels is None:
            raise EvaluationError(f"{source.path}: the generator is class-conditional; the file needs class_labels [N]")
        latents, class_labels = source.latents[:n], (None if source.class_labels is None else source.class_labels[:n])
        if n < source.num_samples:
            source = dataclasses.replace(source, images=source.images[:n], latents=latents, labels=source.labels[:n],
                                         class_labels=class_labels)
        size = source.label_size
        overlap = count_overlap(latents, run_latents)
        if overlap:
            _log(f"warning: {overlap} of {n} labelled samples are clustering samples of the run "
                 "(evaluation on training data)", False)
    else:
        if num_samples is None or int(num_samples) < 1:
            raise EvaluationError("--num-samples is required (>= 1) when labels come from a callable")
        n = int(num_samples)
        latents, class_labels = evaluation_latents(gen, eval_seed, n, training_latents=run_latents)
        size = gen.resolution
        overlap = 0
    class_names = source.class_names

    # -- baselines on the run's clustering data ------------------------------------------------
    timings = {}
    fit_info = {}
    if baselines:
        from .features import extract_features

        t = time.time()
        _log(f"recomputing the run's clustering features ({run_latents.shape[0]} samples at {cfg['resolution']}²)",
             quiet)
        _, feats = extract_features(gen, params, run_latents, layers, cfg["resolution"], run_cls,
                                    batch_size=cfg.get("batch_size", 16), progress=progress, desc="clustering features")
        x_host = feats.reshape(-1, dim)
        del feats
        # Baselines cluster in the run's clustering space (layer balance, PCA), like KLiSH itself.
        transform = FeatureTransform.from_run(run_dir)
        if transform is not None:
            x_host = transform.apply(x_host)
        mesh = sharding.make_mesh(devices)
        fitted, fit_info = fit_baselines(baselines, ks, x_host, seed=int(cfg["seed"]), k0=int(kasp_k0 or cfg["k0"]),
                                         mesh=mesh, ahc_samples=ahc_samples, kmeans_iters=kmeans_iters, quiet=quiet,
                                         progress=progress)
        del x_host
        if transform is not None:
            fitted = {nm: c._replace(**dict(zip("Wb", transform.to_feature_space(c.W, c.b))))
                      for nm, c in fitted.items()}
        classifiers.update(fitted)
        timings["fit_baselines_s"] = time.time() - t

    # -- streaming evaluation -------------------------------------------------------------------
    t = time.time()
    methods = ["klish"] + baselines
    names = [(m, k) for m in methods for k in ks]
    W, b, spec = _pack([classifiers[nm] for nm in names])
    _log(f"evaluating {len(methods)} method(s) × K={ks} on {n} samples at {size}² ({W.shape[0]} affine rows)", quiet)
    tables = {nm: _Tables(classifiers[nm].num_clusters, source.ignore_label) for nm in names}
    m_ref = 1  # grows to (largest reference label seen) + 1; class_names only name the classes
    skipped = 0
    vis_img, vis_ref, vis_pred = [], [], []
    for img, ref, preds in _iterate_samples(source, gen, params, layers, size, spec, W, b, latents, class_labels,
                                            batch_size, progress, "evaluate"):
        m_ref = _num_ref(ref, source.ignore_label, m_ref)
        skipped += _num_skipped(ref, source.ignore_label)
        for i, nm in enumerate(names):
            tables[nm].update(preds[i], ref, m_ref)
        shown = sum(a.shape[0] for a in vis_img)
        if shown < num_vis:
            take = num_vis - shown
            vis_img.append(img[:take])
            vis_ref.append(ref[:take] if source.ignore_label is None else
                           np.where(ref[:take] == source.ignore_label, -1, ref[:take]))  # ignored: black
            vis_pred.append(preds[:, :take])
    timings["evaluate_s"] = time.time() - t
    _check_labelled(skipped, n, "evaluation")
    _log(f"reference labels for {n - skipped} of {n} samples ({skipped} skipped: every pixel ignored)", quiet)

    scores = {}
    for m, k in names:
        tab = tables[(m, k)].tables(m_ref)
        cs = metrics.clustering_scores(tab, average=miou_average)
        other = "dataset" if miou_average == "image" else "image"
        alt = metrics.greedy_matching_miou(tab, other)
        scores.setdefault(m, {})[str(k)] = {
            "ari": cs.ari, "ami": cs.ami, "nmi": cs.nmi, "miou": cs.miou,
            f"miou_{miou_average}": cs.miou, f"miou_{other}": alt.miou,
            "per_class_iou": [None if not np.isfinite(v) else float(v) for v in cs.per_class_iou],
            "assignment": cs.assignment.tolist(), "ami_method": cs.ami_method,
            "num_clusters": int(classifiers[(m, k)].num_clusters),
        }
    timings["total_s"] = time.time() - t0
    results = {
        "run_dir": os.path.abspath(run_dir), "generator": cfg["generator"], "ks": ks, "methods": methods,
        "labels": source.describe(), "num_samples": n, "num_labelled": n - skipped, "num_skipped": skipped,
        "skipped_note": "samples whose reference map is entirely ignore_label; they add nothing to any score",
        "label_size": size, "num_ref_classes": m_ref,
        "class_names": list(class_names) if class_names else None,
        "eval_seed": eval_seed if not isinstance(source, FileLabels) else None,
        "eval_stream": (f"latents = sample_latents(fold_in(fold_in(key({eval_seed}), {EVAL_STREAM}), 0)); "
                        f"the run used fold_in(key({cfg['seed']}), 0)") if not isinstance(source, FileLabels)
        else "samples of the labels file",
        "overlap_with_clustering_samples": overlap,
        "miou_average": miou_average,
        "miou_note": ("greedy many-to-one matching of clusters to classes (Algorithm 2); 'image': per-class IoU "
                      "averaged over the images where the union is non-empty, then over classes (as the original "
                      "KLiSH evaluation); 'dataset': pixels pooled over all images"),
        "ignore_label": source.ignore_label, "scores": scores, "fit": fit_info, "timings": timings,
        "baseline_settings": {"ahc_samples": ahc_samples, "kasp_k0": int(kasp_k0 or cfg["k0"]),
                              "kasp_spectral": "nearest_neighbors, n_neighbors=3, assign_labels=discretize",
                              "ahc_readout": "softmax regression, full-batch L-BFGS (jaxopt), l2=1e-4",
                              "kmeans_iters": kmeans_iters},
    }
    if out_dir is not None:
        results["files"] = write_evaluation(results, out_dir, np.concatenate(vis_img), np.concatenate(vis_ref),
                                            np.concatenate(vis_pred, axis=1), names)
        _log(f"wrote {results['files']['table']}", quiet)
    return results


def results_table_markdown(results: dict) -> str:
    """Tab.-4-style markdown: rows K × (AMI, ARI, mIoU), columns the methods, values in %."""
    methods = results["methods"]
    avg = results["miou_average"]
    lines = [
        f"# Clustering evaluation: {os.path.basename(results['run_dir'])}", "",
        f"Generator `{results['generator']}`; {results['num_samples']} evaluation samples at "
        f"{results['label_size']}²; reference labels: {_describe_labels(results['labels'])}; "
        f"{results['num_ref_classes']} reference classes. Samples with reference labels: "
        f"{results['num_labelled']} labelled, {results['num_skipped']} skipped (every pixel ignored; left out of "
        "all scores).", "",
        f"mIoU: greedy maximum matching (Algorithm 2, many-to-one), **averaged per {avg}** "
        + ("(per-class IoU over the images where the class or its clusters appear, then over classes — the original "
           "KLiSH evaluation)" if avg == "image" else "(pixels pooled over all images)")
        + f"; the other averaging is in results.json (`miou_{'dataset' if avg == 'image' else 'image'}`).", "",
        "| K | metric | " + " | ".join(_METHOD_TITLES.get(m, m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for k in results["ks"]:
        for metric, key in (("AMI", "ami"), ("ARI", "ari"), ("mIoU", "miou")):
            vals = [results["scores"][m][str(k)][key] for m in methods]
            best = max(vals)
            cells = [f"**{100 * v:.1f}**" if v == best else f"{100 * v:.1f}" for v in vals]
            lines.append(f"| {k if metric == 'AMI' else ''} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Values in %, best per row in bold. Baselines are fitted on the run's clustering samples; "
              "every method segments the evaluation samples as argmax of its (piecewise-)linear classifier on the "
              "upsampled generator features.", ""]
    for k in results["ks"]:
        lines.append(f"![cluster maps K={k}](clusters_k{k}.png)")
    return "\n".join(lines) + "\n"


def _describe_labels(d: dict) -> str:
    if d["kind"] == "file":
        return f"file `{d['path']}`"
    return f"built-in labeller `{d['name']}`" if d["name"] in BUILTIN_LABELS else f"callable `{d['name']}`"


def write_evaluation(results, out_dir, vis_img, vis_ref, vis_pred, names) -> dict:
    """Write ``results.json``, ``table.md`` and one cluster-map figure per K (like Fig. 5)."""
    from . import viz

    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md")}
    for k in results["ks"]:
        maps = {"reference": vis_ref}
        for i, (m, kk) in enumerate(names):
            if kk == k:
                maps[f"{_METHOD_TITLES.get(m, m)}@{k}"] = vis_pred[i]
        p = os.path.join(out_dir, f"clusters_k{k}.png")
        viz.cluster_map_figure(vis_img, maps, p, title=f"cluster maps at K={k} (same evaluation samples)")
        files[f"clusters_k{k}"] = p
    with open(files["table"], "w") as f:
        f.write(results_table_markdown(results))
    with open(files["json"], "w") as f:
        json.dump({**results, "files": files}, f, indent=1)
    return files


# =====================================================================================
# Linear separability: SVM (Eq. 3) vs LSE (cross-entropy), Sec. 4.2 / Tab. 3
# =====================================================================================


def _nearest_resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """``[N, S, S]`` → ``[N, size, size]`` sampling at the align_corners positions of the feature resize."""
    s = labels.shape[1]
    if s == size:
        return labels
    pos = np.rint(np.arange(size) * (s - 1) / max(size - 1, 1)).astype(int) if size > 1 else np.zeros(1, int)
    return labels[:, pos][:, :, pos]


def separability_experiment(labels, *, run_dir: Optional[str] = None, generator: Optional[str] = None,
                            num_train: int = 32, num_test: int = 32, seed: int = 0,
                            resolution: Optional[int] = None, channel_budget: int = 1000,
                            truncation: Optional[float] = None, lam: float = 5000.0, svm_tol: float = 1e-4,
                            svm_max_iter: int = 2000, lse_l2: float = 1e-4, lse_tol: float = 1e-4,
                            lse_max_iter: int = 1000, ignore_label: Optional[int] = None, batch_size: int = 8,
                            devices: Optional[int] = None, progress: bool = False, quiet: bool = True) -> dict:
    """SVM (Eq. 3, ``train_ovr_svm``) vs LSE (softmax regression) on reference labels (Tab. 3).

    Both are linear classifiers of the generator features trained on the same
    pixels (features resized to ``resolution``, reference labels sampled at the
    same positions), then segment ``num_test`` held-out samples at the label
    resolution. The LSE is trained to convergence with full-batch L-BFGS
    (:func:`gansem.cluster.baselines.train_softmax_regression`) rather than the
    paper's one epoch of Adam (lr 1e-3).

    Samples: with a labels file, the first ``num_train`` samples train and the next
    ``num_test`` test; with a callable, training latents come from the
    ``"train"`` part and test latents from the ``"eval"`` part of the evaluation
    stream (:func:`evaluation_latents`), disjoint from each other and from a run's
    clustering samples.

    Args:
        labels: labels source (see :func:`resolve_labels_source`).
        run_dir: take generator, truncation, channel budget and resolution from a run;
            or ``generator`` (a name or checkpoint path) with ``channel_budget`` / ``truncation``.
        resolution: training feature resolution (default: the run's, else the generator's).
        lam, svm_tol, svm_max_iter: SVM settings (Eq. 3; λ1 = 5000 as in KLiSH).
        lse_l2, lse_tol, lse_max_iter: LSE settings.

    Returns:
        dict with ``svm`` and ``lse`` (``miou`` = mean over classes of the per-class IoU
        pooled over the test set, ``miou_image`` per-image averaging, ``per_class_iou``,
        ``pixel_accuracy``, solver statistics), ``delta = (svm - lse) / lse``, the labelled
        and skipped sample counts (``num_{train,test}_{labelled,skipped}``) and the setup.
    """
    from . import sharding
    from .cluster.svm import train_ovr_svm
    from .features import extract_features, select_feature_layers
    from .generators import load_generator
    from .pipeline import apply_generator_settings

    t0 = time.time()
    source = resolve_labels_source(labels, ignore_label)
    run_latents = None
    if run_dir is not None:
        cfg, _, gen, params, layers, run_latents, _ = _load_run(run_dir)
        resolution = resolution or cfg["resolution"]
        gen_name = cfg["generator"]
    elif generator is not None:
        gen, params, _ = load_generator(generator)
        gen = apply_generator_settings(gen, {"truncation": truncation})
        layers = select_feature_layers(gen.feature_layers(), channel_budget)
        gen_name = generator
    else:
        raise EvaluationError("give a run directory (--run) or a generator (--generator)")
    resolution = int(resolution or gen.resolution)
    dim = sum(l.channels for l in layers)

    if isinstance(source, FileLabels):
        if source.num_samples < num_train + num_test:
            raise EvaluationError(f"{source.path} holds {source.num_samples} samples; --num-train {num_train} + "
                                  f"--num-test {num_test} are needed")
        tr = slice(0, num_train)
        te = slice(num_train, num_train + num_test)
        lat_tr, cl_tr = source.latents[tr], None if source.class_labels is None else source.class_labels[tr]
        ref_tr = source.labels[tr]
        test_source = dataclasses.replace(
            source, images=source.images[te], latents=source.latents[te], labels=source.labels[te],
            class_labels=None if source.class_labels is None else source.class_labels[te])
        lat_te, cl_te = test_source.latents, test_source.class_labels
        size = source.label_size
    else:
        lat_tr, cl_tr = evaluation_latents(gen, seed, num_train, training_latents=run_latents, part="train")
        lat_te, cl_te = evaluation_latents(gen, seed, num_test, training_latents=run_latents, part="eval")
        test_source = source
        size = gen.resolution
        ref_tr = None

    # -- training pixels --------------------------------------------------------------------
    t = time.time()
    imgs, feats = extract_features(gen, params, lat_tr, layers, resolution, cl_tr, batch_size=batch_size,
                                   progress=progress, desc="train features")
    if ref_tr is None:
        ref_tr = np.concatenate([source(imgs[i:i + batch_size]) for i in range(0, len(imgs), batch_size)])
    train_skipped = _num_skipped(ref_tr, source.ignore_label)
    _check_labelled(train_skipped, num_train, "training")
    y = _nearest_resize_labels(ref_tr, resolution).reshape(-1)
    x_host = feats.reshape(-1, dim)
    del feats
    keep = y != source.ignore_label if source.ignore_label is not None else np.ones(y.shape, bool)
    if not keep.any():
        raise EvaluationError("every training pixel has the ignored label; check --ignore-label and the labels")
    m_ref = int(y[keep].max()) + 1  # class_names, if any, only name the classes
    mesh = sharding.make_mesh(devices)
    layout = sharding.plan_rows(x_host.shape[0], mesh.devices.size)
    x, valid = sharding.shard_rows(x_host, mesh, multiple=layout.padded_rows)
    valid = valid * sharding.shard_rows(keep.astype(np.float32), mesh, multiple=layout.padded_rows)[0]
    ys, _ = sharding.shard_rows(np.where(keep, y, 0).astype(np.int32), mesh, multiple=layout.padded_rows)
    del x_host
    timings = {"train_features_s": time.time() - t}

    t = time.time()
    _log(f"SVM (Eq. 3, λ1={lam}) on {int(keep.sum())} pixels × {dim} features, {m_ref} classes", quiet)
    svm_res = train_ovr_svm(sharding.RowData(x, valid, layout, mesh), ys, np.zeros((m_ref, dim), np.float32),
                            np.zeros(m_ref, np.float32), lam=lam, tol=svm_tol, max_iter=svm_max_iter)
    timings["svm_s"] = time.time() - t
    t = time.time()
    _log("LSE (softmax regression, L-BFGS)", quiet)
    lse_res = bl.train_softmax_regression(sharding.RowData(x, valid, layout, mesh), ys, m_ref, l2=lse_l2,
                                          tol=lse_tol, max_iter=lse_max_iter)
    timings["lse_s"] = time.time() - t
    del x, valid, ys

    # -- held-out evaluation ----------------------------------------------------------------
    t = time.time()
    clfs = [bl.linear_classifier(svm_res.W, svm_res.b), bl.linear_classifier(lse_res.W, lse_res.b)]
    W, b, spec = _pack(clfs)
    acc = [_Tables(m_ref, source.ignore_label) for _ in clfs]
    m_all = m_ref
    test_skipped = 0
    for _, ref, preds in _iterate_samples(test_source, gen, params, layers, size, spec, W, b, lat_te, cl_te,
                                          batch_size, progress, "test"):
        m_all = _num_ref(ref, source.ignore_label, m_all)
        test_skipped += _num_skipped(ref, source.ignore_label)
        for i in range(2):
            acc[i].update(np.minimum(preds[i], m_ref - 1), ref, m_all)
    timings["test_s"] = time.time() - t
    _check_labelled(test_skipped, num_test, "test")
    _log(f"reference labels for {num_train - train_skipped} of {num_train} training and {num_test - test_skipped} "
         f"of {num_test} test samples (the others skipped: every pixel ignored)", quiet)

    def summary(tables, extra):
        tab = tables.tables(m_all)  # [N, M_all, M_ref]: reference rows, predicted classes
        ident = np.arange(m_ref)
        per_ds = metrics.per_class_iou_after_matching(tab, ident, "dataset")
        per_im = metrics.per_class_iou_after_matching(tab, ident, "image")
        total = tab.sum(0)
        correct = sum(total[c, c] for c in range(min(m_ref, m_all)))
        return {"miou": float(np.nanmean(per_ds)), "miou_image": float(np.nanmean(per_im)),
                "per_class_iou": [None if not np.isfinite(v) else float(v) for v in per_ds],
                "pixel_accuracy": float(correct / max(total.sum(), 1)), **extra}

    svm_out = summary(acc[0], {"iters": int(svm_res.n_iter), "converged": bool(svm_res.converged),
                               "stop_reason": svm_res.stop_reason, "objective": float(svm_res.objective)})
    lse_out = summary(acc[1], {"iters": lse_res.n_iter, "converged": lse_res.converged, "loss": lse_res.loss,
                               "train_accuracy": lse_res.accuracy})
    timings["total_s"] = time.time() - t0
    return {
        "generator": gen_name, "run_dir": None if run_dir is None else os.path.abspath(run_dir),
        "labels": source.describe(), "num_train": num_train, "num_test": num_test,
        "num_train_labelled": num_train - train_skipped, "num_train_skipped": train_skipped,
        "num_test_labelled": num_test - test_skipped, "num_test_skipped": test_skipped,
        "train_resolution": resolution,
        "test_resolution": size, "num_classes": m_ref,
        "class_names": list(source.class_names) if source.class_names else None,
        "svm": svm_out, "lse": lse_out,
        "delta": (svm_out["miou"] - lse_out["miou"]) / lse_out["miou"] if lse_out["miou"] > 0 else float("nan"),
        "delta_image": ((svm_out["miou_image"] - lse_out["miou_image"]) / lse_out["miou_image"]
                        if lse_out["miou_image"] > 0 else float("nan")),
        "settings": {"lam": lam, "svm_tol": svm_tol, "svm_max_iter": svm_max_iter, "lse_l2": lse_l2,
                     "lse_solver": "full-batch L-BFGS (jaxopt) on standardised features", "seed": seed},
        "miou_note": "mIoU = mean over reference classes of the IoU pooled over all test pixels ('miou'), "
                     "or averaged per image ('miou_image'); classes absent from the test set are skipped",
        "timings": timings,
    }
