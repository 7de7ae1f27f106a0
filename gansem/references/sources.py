"""Reference labels for evaluation: where they come from, and how they are checked.

A :class:`LabelsSource` gives the reference classes of generated samples:

* :class:`FileLabels` -- an ``.npz`` in the layout ``launch/segment.py`` writes:
  ``images`` uint8 ``[N,H,W,3]``, ``latents`` ``[N,...]`` (generator inputs; the
  features are recomputed from them), ``labels`` int ``[N,H,W]`` (reference
  classes), optional ``class_names`` ``[M]`` and ``class_labels`` ``[N]``
  (conditional generators).
* :class:`CallableLabels` -- any function ``images uint8 [B,H,W,3] -> labels int
  [B,H,W]`` (a pretrained segmenter), named ``module:function`` or
  ``path/to/file.py:function``; samples are then drawn from the generator
  (:mod:`gansem.evaluation.streams`).
* ``"faces"`` -- the built-in face-part labeller :func:`gansem.references.faces.segment_faces`
  (dlib 68-point landmarks; classes background, skin, brows, eyes, nose, lips, mouth),
  a :class:`CallableLabels` with ``ignore_label = IGNORE`` (255).

Reference labels are class ids ``0..M-1``: at most :data:`MAX_REF_CLASSES` (1024)
classes, or as many as ``class_names`` names; larger ids are refused (contingency
tables are sized by the largest id), as are ids beyond int32 and NaN/Inf latents.

A sample whose reference map is entirely ``ignore_label`` (e.g. no face found by the
``faces`` labeller) is **skipped** (:func:`num_skipped`): it adds no pixel to any
contingency table and no image to the per-image mIoU average.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional

import numpy as np

from . import faces

__all__ = [
    "EvaluationError",
    "MAX_REF_CLASSES",
    "BUILTIN_LABELS",
    "LabelsSource",
    "FileLabels",
    "CallableLabels",
    "load_labels_callable",
    "resolve_labels_source",
    "check_ignore_label",
    "num_skipped",
    "check_labelled",
    "nearest_resize_labels",
]

#: Built-in reference labellers, accepted by name as ``--labels`` (see :func:`resolve_labels_source`).
BUILTIN_LABELS = ("faces",)
#: Most reference classes (label ids ``0..MAX_REF_CLASSES-1``) accepted without ``class_names`` naming more:
#: every contingency table has one row per id up to the largest one seen.
MAX_REF_CLASSES = 1024
_INT32 = np.iinfo(np.int32)


class EvaluationError(ValueError):
    """Impossible evaluation request (bad labels source, shapes, K...); the message says what to do."""


def check_ignore_label(ignore_label) -> Optional[int]:
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
        ignore_label = check_ignore_label(ignore_label)
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
        return _checked_labels(out, check_ignore_label(self.ignore_label), self.class_names,
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
    ignore_label = check_ignore_label(ignore_label)
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



def num_skipped(ref: np.ndarray, ignore_label) -> int:
    """Samples of ``ref [B, H, W]`` without reference labels (every pixel ``ignore_label``)."""
    if ignore_label is None:
        return 0
    return int(np.all(ref == ignore_label, axis=(1, 2)).sum())


def check_labelled(skipped: int, n: int, what: str) -> None:
    """Raise if none of ``n`` samples has reference labels."""
    if skipped == n:
        raise EvaluationError(f"none of the {n} {what} samples has reference labels (every pixel is the ignored "
                              "label); check the labels source and --ignore-label")


def nearest_resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """``[N, S, S]`` → ``[N, size, size]`` sampling at the align_corners positions of the feature resize."""
    s = labels.shape[1]
    if s == size:
        return labels
    pos = np.rint(np.arange(size) * (s - 1) / max(size - 1, 1)).astype(int) if size > 1 else np.zeros(1, int)
    return labels[:, pos][:, :, pos]
