"""Labelled image sets for UFGS evaluation: the images that name the clusters, and the test images.

A UFGS segmenter predicts cluster ids ``[0, K)``; a handful of labelled images
match clusters to classes (KLiSH Sec. 5.1: 100 validation images of CelebAMask-HQ,
Algorithm 2) and a test set measures the matched segmentation
(:mod:`gansem.ufgs.evaluate`). Both are :class:`LabelledImages`: images, class-id
maps, optional class names and ignore label, and a JSON-able description of
where they came from. Loaders:

* :func:`from_folder` -- images and masks in a folder (layout below);
* :func:`from_tfds` -- a split of a prepared ``tensorflow-datasets`` dataset (optional
  extra ``pip install 'gansem[tfds]'``; never downloads);
* :func:`from_npz` -- a labels file in the layout of ``launch/segment.py``
  (:class:`gansem.references.sources.FileLabels`);
* :func:`from_generated` -- fresh samples of a run's generator labelled by a labeller
  (the built-in ``"faces"`` labeller or any ``images -> labels`` callable); the
  latents and the KLiSH classifier's cluster maps of the same samples are kept.

:func:`load_labelled` picks the loader from a ``--labels`` string and
:func:`evaluation_sets` makes the (matching pool, test set) pair, disjoint by
construction: generated sets come from two different parts of the evaluation PRNG
stream (:data:`gansem.evaluation.streams.STREAM_PARTS` ``"ufgs-match"`` /
``"ufgs-test"``, both disjoint from a run's clustering samples), a single real set
is split by a seeded permutation.

Folder layout (:func:`from_folder`)::

    DIR/images/<name>.png | .jpg | .jpeg   RGB images (grayscale / RGBA / palette converted to RGB)
    DIR/masks/<name>.png                   class id of every pixel: 8- or 16-bit grayscale or palette
                                           PNG (palette indices are the ids), same size as the image
    DIR/classes.txt                        optional: line i names class i

Every image needs exactly one mask of the same name and size and vice versa.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterator, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ..batching import map_batches
from ..evaluation.streams import STREAM_PARTS, count_overlap, evaluation_latents
from ..features import to_uint8
from ..references.sources import (
    MAX_REF_CLASSES,
    CallableLabels,
    EvaluationError,
    FileLabels,
    check_ignore_label,
    check_labelled,
    resolve_labels_source,
)
from ..run import Run
from ..segment import Segmenter, segment_program

__all__ = [
    "LabelledImages",
    "IMAGE_EXTENSIONS",
    "TFDS_INSTALL_HINT",
    "folder_pairs",
    "from_folder",
    "from_tfds",
    "from_npz",
    "from_generated",
    "split",
    "is_generator_labeller",
    "load_labelled",
    "evaluation_sets",
]

#: Image file extensions :func:`from_folder` reads (case-insensitive); masks are always ``.png``.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: What to run when ``tensorflow_datasets`` is missing.
TFDS_INSTALL_HINT = "pip install 'gansem[tfds]'"
_INT32 = np.iinfo(np.int32)
_VERSION = re.compile(r"^\d+(\.(\d+|\*)){0,2}$")


def _as_images(images, what: str):
    """``uint8 [N, H, W, 3]`` array, or a list of ``uint8 [H_i, W_i, 3]`` arrays (checked)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise EvaluationError(f"{what}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        return images
    out = [np.asarray(im) for im in images]
    for i, im in enumerate(out):
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise EvaluationError(f"{what}: image {i} must be uint8 [H, W, 3], got {im.dtype} {im.shape}")
    return out


def _as_labels(labels, what: str):
    """int32 ``[N, H, W]`` array or list of ``[H_i, W_i]`` arrays (integer, within int32)."""

    def one(a, i):
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.integer):
            raise EvaluationError(f"{what}: label map {i} must hold integer class ids, got dtype {a.dtype}")
        if a.size and (int(a.min()) < _INT32.min or int(a.max()) > _INT32.max):
            raise EvaluationError(f"{what}: label map {i} has ids beyond int32")
        return a.astype(np.int32, copy=False)

    if isinstance(labels, np.ndarray):
        if labels.ndim != 3:
            raise EvaluationError(f"{what}: labels must be int [N, H, W], got shape {labels.shape}")
        return one(labels, "s")
    return [one(a, i) for i, a in enumerate(labels)]


def _shape_of(x, i) -> tuple:
    return tuple(x[i].shape)


@dataclasses.dataclass
class LabelledImages:
    """Images with reference class maps.

    Attributes:
        images: ``[N, H, W, 3]`` uint8, or a list of ``[H_i, W_i, 3]`` uint8 (images of different sizes).
        labels: class ids ``[N, H, W]`` int32 (or a list of ``[H_i, W_i]``) in ``[0, num_classes)``,
            or ``ignore_label`` for pixels without a label.
        class_names: ``M`` names (class ``m`` is ``class_names[m]``), or ``None``.
        ignore_label: label value of unlabelled pixels, or ``None``.
        description: where the set came from (JSON-able).
        latents: ``[N, ...]`` float32 generator inputs (generated sets), else ``None``.
        class_labels: ``[N]`` int32 class labels of a conditional generator, else ``None``.
        cluster_labels: ``[N, H, W]`` int32 KLiSH cluster ids of the same images (generated sets with a
            :class:`~gansem.segment.Segmenter`), else ``None``.
        num_clusters: K of ``cluster_labels``.
    """

    images: Union[np.ndarray, list]
    labels: Union[np.ndarray, list]
    class_names: Optional[tuple] = None
    ignore_label: Optional[int] = None
    description: dict = dataclasses.field(default_factory=lambda: {"kind": "arrays"})
    latents: Optional[np.ndarray] = None
    class_labels: Optional[np.ndarray] = None
    cluster_labels: Optional[Union[np.ndarray, list]] = None
    num_clusters: Optional[int] = None

    def __post_init__(self):
        what = self.description.get("kind", "labelled images") if isinstance(self.description, dict) else "labelled"
        self.images = _as_images(self.images, what)
        self.labels = _as_labels(self.labels, what)
        self.ignore_label = check_ignore_label(self.ignore_label)
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)
        n = len(self.images)
        if len(self.labels) != n:
            raise EvaluationError(f"{what}: {len(self.labels)} label maps for {n} images")
        for i in range(n):
            if _shape_of(self.labels, i) != _shape_of(self.images, i)[:2]:
                raise EvaluationError(f"{what}: label map {i} has shape {_shape_of(self.labels, i)} but its image "
                                      f"is {_shape_of(self.images, i)[:2]}")
        m = self.num_classes
        if self.class_names is None and m > MAX_REF_CLASSES:
            raise EvaluationError(
                f"{what}: labels go up to {m - 1}, but classes must be numbered 0..M-1 with M <= {MAX_REF_CLASSES} "
                "(tables have one row per id); pass ignore_label for the value of unlabelled pixels, or class_names")
        for i in range(n):
            lab = self.labels[i]
            kept = lab if self.ignore_label is None else lab[lab != self.ignore_label]
            if kept.size and (int(kept.min()) < 0 or (self.class_names is not None and int(kept.max()) >= m)):
                raise EvaluationError(
                    f"{what}: label map {i} holds ids {int(kept.min())}..{int(kept.max())}; class ids must lie in "
                    f"[0, {m if self.class_names is not None else 'M'})"
                    + ("" if self.ignore_label is not None
                       else "; pass ignore_label for the value of unlabelled pixels"))
        if self.latents is not None and len(self.latents) != n:
            raise EvaluationError(f"{what}: {len(self.latents)} latents for {n} images")
        if self.class_labels is not None and len(self.class_labels) != n:
            raise EvaluationError(f"{what}: {len(self.class_labels)} class labels for {n} images")
        if self.cluster_labels is not None:
            self.cluster_labels = _as_labels(self.cluster_labels, what + " (cluster labels)")
            if len(self.cluster_labels) != n or any(
                    _shape_of(self.cluster_labels, i) != _shape_of(self.labels, i) for i in range(n)):
                raise EvaluationError(f"{what}: cluster label maps must match the label maps one to one")
            if self.num_clusters is None:
                raise EvaluationError(f"{what}: cluster_labels need num_clusters")
            self.num_clusters = int(self.num_clusters)

    # -- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image [H, W, 3] uint8, labels [H, W] int32)`` of sample ``i``."""
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        """M: the number of class names, else the largest labelled id + 1 (0 for a set without labels)."""
        if self.class_names is not None:
            return len(self.class_names)
        top = -1
        for lab in self.labels:
            kept = lab if self.ignore_label is None else lab[lab != self.ignore_label]
            if kept.size:
                top = max(top, int(kept.max()))
        return top + 1

    @property
    def uniform(self) -> bool:
        """Whether every image has the same size (then ``images`` can be stacked)."""
        return isinstance(self.images, np.ndarray) or len({im.shape for im in self.images}) <= 1

    def num_unlabelled(self) -> int:
        """Images whose every pixel is ``ignore_label`` (they add nothing to any score)."""
        if self.ignore_label is None:
            return 0
        return int(sum(bool(np.all(lab == self.ignore_label)) for lab in self.labels))

    def subset(self, indices: Sequence[int], note: Optional[str] = None) -> "LabelledImages":
        """The samples ``indices`` (in that order), everything else kept."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise EvaluationError(f"subset indices must lie in [0, {len(self)})")

        def take(x):
            if x is None:
                return None
            return x[idx] if isinstance(x, np.ndarray) else [x[int(i)] for i in idx]

        desc = dict(self.description)
        if note:
            desc["subset"] = note
        return dataclasses.replace(self, images=take(self.images), labels=take(self.labels), description=desc,
                                   latents=take(self.latents), class_labels=take(self.class_labels),
                                   cluster_labels=take(self.cluster_labels))

    def stacked(self, what: str = "images", indices: Optional[Sequence[int]] = None):
        """``images`` / ``labels`` / ``cluster_labels`` of ``indices``: one array if their sizes agree, else a list."""
        x = getattr(self, what)
        idx = range(len(self)) if indices is None else [int(i) for i in indices]
        items = [x[i] for i in idx]
        if items and len({a.shape for a in items}) == 1:
            return np.stack(items)
        return items

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(indices [B], images [B, H, W, 3] uint8, labels [B, H, W] int32)``.

        Consecutive images of the same size are stacked, at most ``batch_size`` per batch
        (a size change starts a new batch).
        """
        if batch_size < 1:
            raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
        n = len(self)
        start = 0
        while start < n:
            stop = start + 1
            shape = _shape_of(self.images, start)
            while stop < n and stop - start < batch_size and _shape_of(self.images, stop) == shape:
                stop += 1
            idx = np.arange(start, stop)
            yield idx, np.stack([self.images[i] for i in idx]), np.stack([self.labels[i] for i in idx])
            start = stop


# =====================================================================================
# Folders
# =====================================================================================


def _read_class_names(path: str) -> Optional[tuple]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise EvaluationError(f"{path} is empty; write one class name per line (line i names class i) or remove it")
    empty = [i for i, ln in enumerate(lines) if not ln]
    if empty:
        raise EvaluationError(f"{path}: line(s) {[i + 1 for i in empty]} are empty; line i names class i-1, so "
                              "every class id up to the last needs a name")
    return tuple(lines)


def folder_pairs(directory: str) -> list[tuple[str, str, str]]:
    """``(name, image path, mask path)`` of every image/mask pair of a folder, sorted by name.

    Raises:
        EvaluationError: missing ``images/`` or ``masks/`` folder, no images, an image without
            a mask or a mask without an image, two images with the same name.
    """
    img_dir, mask_dir = os.path.join(directory, "images"), os.path.join(directory, "masks")
    for d in (directory, img_dir, mask_dir):
        if not os.path.isdir(d):
            raise EvaluationError(
                f"labelled folder {directory!r}: {d!r} is not a folder; expected DIR/images/<name>.png|.jpg "
                "(images) and DIR/masks/<name>.png (class ids), optional DIR/classes.txt")
    images: dict[str, str] = {}
    for f in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(os.path.join(img_dir, f)):
            continue
        if stem in images:
            raise EvaluationError(f"{img_dir}: two images are named {stem!r} ({os.path.basename(images[stem])}, {f}); "
                                  "keep one")
        images[stem] = os.path.join(img_dir, f)
    masks = {os.path.splitext(f)[0]: os.path.join(mask_dir, f) for f in sorted(os.listdir(mask_dir))
             if f.lower().endswith(".png") and os.path.isfile(os.path.join(mask_dir, f))}
    if not images:
        raise EvaluationError(f"{img_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) without a mask in masks/ (e.g. {no_mask[:3]})")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) without an image in images/ (e.g. {no_image[:3]})")
        raise EvaluationError(f"labelled folder {directory!r}: " + "; ".join(parts)
                              + "; every image needs a .png mask of the same name")
    return [(name, images[name], masks[name]) for name in sorted(images)]


def _read_mask(path: str) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise EvaluationError(
                f"{path}: mask mode {im.mode}; masks hold one class id per pixel (8/16-bit grayscale or palette "
                "PNG), not colours")
        return np.asarray(im).astype(np.int64)


def _read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.uint8)
    except OSError as e:
        raise EvaluationError(f"{path}: cannot read the image ({e})") from e


def from_folder(directory: str, *, indices: Optional[Sequence[int]] = None, ignore_label: Optional[int] = None,
                class_names: Optional[Sequence[str]] = None) -> LabelledImages:
    """Images and masks of a folder (layout in the module docstring).

    Args:
        directory: the folder.
        indices: read only these pairs (positions in :func:`folder_pairs` order); default all.
        ignore_label: mask value of unlabelled pixels (e.g. 255).
        class_names: class names; default ``DIR/classes.txt`` if present.

    Returns:
        :class:`LabelledImages` with a list of images (sizes may differ).

    Raises:
        EvaluationError: layout problems (see :func:`folder_pairs`), a mask whose size differs
            from its image, colour masks, ids outside ``[0, M)`` that are not ``ignore_label``.
    """
    pairs = folder_pairs(directory)
    if class_names is None:
        class_names = _read_class_names(os.path.join(directory, "classes.txt"))
    chosen = range(len(pairs)) if indices is None else [int(i) for i in indices]
    images, labels, names = [], [], []
    for i in chosen:
        if not 0 <= i < len(pairs):
            raise EvaluationError(f"{directory}: pair index {i} outside [0, {len(pairs)})")
        name, ip, mp = pairs[i]
        img, mask = _read_image(ip), _read_mask(mp)
        if mask.shape != img.shape[:2]:
            raise EvaluationError(f"{directory}: mask {os.path.basename(mp)} is {mask.shape[1]}x{mask.shape[0]} but "
                                  f"its image is {img.shape[1]}x{img.shape[0]} (width x height); they must match")
        images.append(img)
        labels.append(mask)
        names.append(name)
    desc = {"kind": "folder", "path": os.path.abspath(directory), "num_pairs": len(pairs), "num_read": len(names)}
    return LabelledImages(images, labels, class_names, ignore_label, desc)


# =====================================================================================
# tensorflow-datasets
# =====================================================================================


def from_tfds(name: str, split: str, *, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
              image_key: str = "image", label_key: Optional[str] = None, max_examples: Optional[int] = None,
              ignore_label: Optional[int] = None, class_names: Optional[Sequence[str]] = None) -> LabelledImages:
    """A split of a ``tensorflow-datasets`` segmentation dataset, read without any download.

    ``tensorflow_datasets`` is an optional extra (``pip install 'gansem[tfds]'``; datasets stored
    as TFRecords are read through TensorFlow, e.g. ``pip install tensorflow-cpu``), imported
    here only. Nothing is downloaded: a dataset already prepared in ``data_dir`` is read as
    it is; otherwise it is built (``download_and_prepare``) only when ``manual_dir`` is given,
    from the archives placed there by hand, with downloads from TFDS' GCS mirror switched off
    (only for builders that declare manual-download instructions). Datasets whose builder
    fetches its files itself must be prepared beforehand on a machine with network
    (``tfds build NAME --data_dir D``) and ``D`` copied here.

    Manual downloads: TFDS' own default folder is ``<data_dir>/downloads/manual/`` (``data_dir``
    defaults to ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``); gansem builds only when the
    folder is named explicitly (``manual_dir``, ``--tfds-manual-dir``), so nothing is prepared by
    accident. Each dataset's catalog page (and ``tfds.builder(NAME).MANUAL_DOWNLOAD_INSTRUCTIONS``)
    lists the archives it expects, e.g. ``cityscapes``: ``leftImg8bit_trainvaltest.zip`` and
    ``gtFine_trainvaltest.zip`` from cityscapes-dataset.com. Feature names differ between
    datasets: see ``builder.info.features`` and pass ``image_key`` / ``label_key``.

    Args:
        name: dataset name, optionally with config/version (``"cityscapes/semantic_segmentation"``).
        split: split, with TFDS slicing if wanted (``"validation"``, ``"test[:500]"``).
        data_dir: TFDS data folder (default TFDS' own).
        manual_dir: folder with the manually downloaded archives (builds an unprepared dataset).
        image_key: feature holding the RGB image.
        label_key: feature holding the class-id map; default: the only other image feature.
        max_examples: read at most this many examples (in split order).
        ignore_label: label value of unlabelled pixels (e.g. 255).
        class_names: class names (TFDS image features carry none).

    Returns:
        :class:`LabelledImages` (a list of images; sizes may differ).

    Raises:
        ImportError: ``tensorflow_datasets`` is not installed (the message says what to install).
        EvaluationError: the dataset is not prepared and no ``manual_dir`` is given, unknown keys.
    """
    try:
        import tensorflow_datasets as tfds  # optional extra gansem[tfds]: imported only by this loader
    except ImportError as e:
        raise ImportError(f"tfds:{name}: reading tensorflow-datasets needs the tfds extra: {TFDS_INSTALL_HINT} "
                          f"({e})") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise EvaluationError(f"tfds:{name}: {e}") from e
    prepared = os.path.isfile(os.path.join(str(builder.data_dir), "dataset_info.json"))
    if not prepared:
        prepare_elsewhere = (f"or run `tfds build {name}` on a machine with network and copy its data_dir here "
                             "(--tfds-data-dir)")
        if manual_dir is None:
            raise EvaluationError(
                f"tfds:{name} is not prepared in {builder.data_dir!s} and gansem never downloads: put the archives "
                f"the dataset's catalog page lists into a folder and pass it as manual_dir (--tfds-manual-dir), "
                + prepare_elsewhere)
        if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            raise EvaluationError(f"tfds:{name} fetches its files itself (no manual download), and gansem never "
                                  "downloads: " + prepare_elsewhere)
        cfg = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
        builder.download_and_prepare(download_config=cfg)
    features = builder.info.features
    keys = list(features.keys())
    if image_key not in keys:
        raise EvaluationError(f"tfds:{name}: no feature {image_key!r} (features: {keys}); pass image_key")
    if label_key is None:
        cand = [k for k in keys if k != image_key and isinstance(features[k], tfds.features.Image)]
        if len(cand) != 1:
            raise EvaluationError(f"tfds:{name}: cannot tell which feature holds the class ids among {cand or keys}; "
                                  "pass label_key")
        label_key = cand[0]
    elif label_key not in keys:
        raise EvaluationError(f"tfds:{name}: no feature {label_key!r} (features: {keys}); pass label_key")
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except ImportError as e:  # TFRecord datasets are read through TensorFlow, which tfds does not install
        raise ImportError(f"tfds:{name}: reading its records needs TensorFlow: pip install tensorflow-cpu ({e})") from e
    if max_examples is not None:
        ds = ds.take(int(max_examples))
    images, labels = [], []
    for ex in tfds.as_numpy(ds):
        img, lab = np.asarray(ex[image_key]), np.asarray(ex[label_key])
        if img.ndim == 3 and img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        if lab.ndim == 3 and lab.shape[-1] == 1:
            lab = lab[..., 0]
        images.append(img.astype(np.uint8))
        labels.append(lab)
    if not images:
        raise EvaluationError(f"tfds:{name}: split {split!r} is empty")
    desc = {"kind": "tfds", "name": name, "split": split, "data_dir": str(builder.data_dir),
            "image_key": image_key, "label_key": label_key, "num_read": len(images)}
    return LabelledImages(images, labels, class_names, ignore_label, desc)


# =====================================================================================
# Labels files and generated samples
# =====================================================================================


def from_npz(path: str, *, ignore_label: Optional[int] = None) -> LabelledImages:
    """Samples of a labels file (``images``, ``latents``, ``labels`` [, ``class_names``, ``class_labels``]).

    The layout of ``launch/segment.py`` / :class:`gansem.references.sources.FileLabels`, read
    without pickles; the latents are kept.
    """
    src = FileLabels.load(path, ignore_label)
    return LabelledImages(src.images, src.labels, src.class_names, src.ignore_label, src.describe(),
                          latents=src.latents, class_labels=src.class_labels)


def _segmenter(segmenter_or_run, k: Optional[int]):
    """``(Segmenter or None, generator, params, run latents or None)``."""
    if isinstance(segmenter_or_run, Segmenter):
        if k is not None and int(k) != segmenter_or_run.k:
            raise EvaluationError(f"k={k} differs from the segmenter's K={segmenter_or_run.k}")
        s = segmenter_or_run
        return s, s.generator, s.params, None
    run = segmenter_or_run if isinstance(segmenter_or_run, Run) else Run.open(str(segmenter_or_run))
    seg = Segmenter.from_run(run, k=int(k)) if k is not None else None
    return seg, run.generator, run.params, run.latents


def from_generated(segmenter_or_run, labeller, num: int, seed: int, *, k: Optional[int] = None,
                   part: str = "ufgs-test", batch_size: int = 16, exclude_latents=None, ignore_label=None,
                   progress: bool = False) -> LabelledImages:
    """Fresh generator samples labelled by ``labeller``; samples it skipped are dropped and counted.

    Latents come from ``part`` of the evaluation stream
    (:func:`gansem.evaluation.streams.evaluation_latents`: ``"ufgs-match"`` for matching
    images, ``"ufgs-test"`` for test images; disjoint from each other and from the run's
    clustering samples). With a :class:`~gansem.segment.Segmenter` (or a run and ``k``)
    the same generator pass also gives the KLiSH classifier's cluster maps, kept as
    ``cluster_labels`` so the classifier itself can be scored on the same samples.

    A sample is skipped when its reference map is entirely the labeller's ignore label
    (e.g. no face found by the ``"faces"`` labeller); ``description`` reports
    ``num_drawn``, ``num_labelled`` and ``num_skipped``.

    Args:
        segmenter_or_run: a :class:`~gansem.segment.Segmenter`, an opened
            :class:`~gansem.run.Run`, or a run directory.
        labeller: ``"faces"``, ``"module:function"``, a callable ``images uint8 [B,H,W,3] -> int [B,H,W]``
            or a :class:`~gansem.references.sources.CallableLabels`.
        num: samples drawn (the set holds ``num - num_skipped``).
        seed: evaluation seed of the stream.
        k: the run's K (with a run): keep the KLiSH cluster maps; without it images only.
        part: evaluation stream part (:data:`~gansem.evaluation.streams.STREAM_PARTS`).
        batch_size: generator batch size (the labeller sees one batch at a time).
        exclude_latents: ``[n, ...]`` latents that must not be drawn (e.g. a UFGS training set's);
            a run's clustering latents are always excluded.
        ignore_label: overrides the labeller's ignore label.

    Returns:
        :class:`LabelledImages` at the generator's resolution with ``latents`` (and
        ``cluster_labels`` / ``num_clusters`` with a segmenter).

    Raises:
        EvaluationError: the labeller is a labels file, ``num < 1``, or no sample was labelled.
    """
    if int(num) < 1:
        raise EvaluationError(f"draw at least one sample, got num={num}")
    if part not in STREAM_PARTS:
        raise EvaluationError(f"unknown stream part {part!r}; choose from {', '.join(STREAM_PARTS)}")
    source = resolve_labels_source(labeller, ignore_label)
    if not isinstance(source, CallableLabels):
        raise EvaluationError("a labels file is not a labeller: load it with from_npz, or label generated samples "
                              "with 'faces' or a callable images -> labels")
    seg, gen, params, run_latents = _segmenter(segmenter_or_run, k)
    lat, cl = evaluation_latents(gen, seed, int(num), training_latents=run_latents, part=part)
    if exclude_latents is not None:
        overlap = count_overlap(lat, exclude_latents)
        if overlap:
            raise EvaluationError(f"{overlap} drawn latents equal excluded latents; choose another seed")
    if seg is not None:  # one generator pass: images and the KLiSH classifier's cluster maps
        program = segment_program(gen, seg.layers)
        bcast = (params, jnp.asarray(seg.W), jnp.asarray(seg.b))
    else:
        program = lambda p, z, c: (gen.synthesize(p, z, c)[0], None)  # noqa: E731
        bcast = (params,)
    keep, images, refs, clusters = [], [], [], []
    for s, e, (img, clu) in map_batches(program, [lat, cl], batch_size=batch_size,
                                        mesh=None if seg is None else seg.mesh, bcast_args=bcast,
                                        progress=progress, desc=f"label {part} samples"):
        img = to_uint8(img)
        ref = source(img)
        ok = (np.ones(len(ref), bool) if source.ignore_label is None
              else ~np.all(ref == source.ignore_label, axis=(1, 2)))
        keep.append(np.arange(s, e)[ok])
        images.append(img[ok])
        refs.append(ref[ok])
        if clu is not None:
            clusters.append(clu[ok].astype(np.int32))
    keep = np.concatenate(keep)
    check_labelled(int(num) - len(keep), int(num), part)
    k_used = None if seg is None else int(seg.k)
    desc = {"kind": "generated", "labeller": source.describe(), "part": part, "seed": int(seed),
            "stream": f"evaluation_latents(gen, seed={int(seed)}, part={part!r})",
            "num_drawn": int(num), "num_labelled": int(len(keep)), "num_skipped": int(num) - int(len(keep)),
            "k": k_used}
    return LabelledImages(np.concatenate(images), np.concatenate(refs), source.class_names, source.ignore_label,
                          desc, latents=lat[keep], class_labels=None if cl is None else cl[keep],
                          cluster_labels=np.concatenate(clusters) if clusters else None,
                          num_clusters=k_used)


# =====================================================================================
# Choosing and splitting sets
# =====================================================================================


def split(labelled: LabelledImages, sizes: Sequence[Optional[int]], seed: int) -> list[LabelledImages]:
    """Disjoint random subsets of ``labelled`` of the given sizes (``None``: all that remain).

    The order comes from one permutation ``default_rng([seed, 0x5917]).permutation(N)``;
    subset ``j`` takes the next ``sizes[j]`` positions, each subset sorted by index.

    Raises:
        EvaluationError: the sizes add up to more than ``len(labelled)``.
    """
    n = len(labelled)
    perm = np.random.default_rng([int(seed), 0x5917]).permutation(n)
    out, start = [], 0
    for j, size in enumerate(sizes):
        size = n - start if size is None else int(size)
        if size < 0 or start + size > n:
            raise EvaluationError(f"cannot take {size} more images from a set of {n} ({start} already taken)")
        out.append(labelled.subset(np.sort(perm[start:start + size]), note=f"split part {j} of {n} (seed {seed})"))
        start += size
    return out


def _tfds_spec(spec: str) -> tuple[str, str]:
    """``tfds:NAME[:SPLIT]`` → ``(NAME, SPLIT)``; a trailing version (``:3.0.0``) stays part of NAME."""
    rest = spec[len("tfds:"):]
    if not rest:
        raise EvaluationError("--labels tfds: needs a dataset name, e.g. tfds:cityscapes:validation")
    depth, cut = 0, -1
    for i in range(len(rest) - 1, -1, -1):  # the last ':' outside a slice such as "train[:10]"
        ch = rest[i]
        depth += (ch == "]") - (ch == "[")
        if ch == ":" and depth == 0:
            cut = i
            break
    head, last = (rest[:cut], rest[cut + 1:]) if cut >= 0 else ("", rest)
    if head and not _VERSION.match(last):
        return head, last
    return rest, "test"


def is_generator_labeller(spec) -> bool:
    """Whether a ``--labels`` value labels generated samples (a built-in labeller or a callable), not a set on disk."""
    if isinstance(spec, CallableLabels) or callable(spec):
        return True
    s = str(spec)
    return not (s.startswith("tfds:") or os.path.isdir(s) or s.endswith(".npz") or os.path.isfile(s))


def load_labelled(spec, *, num: Optional[int] = None, seed: int = 0, part: str = "ufgs-test",
                  segmenter: Optional[Segmenter] = None, ignore_label: Optional[int] = None,
                  batch_size: int = 16, exclude_latents=None, tfds_options: Optional[dict] = None,
                  progress: bool = False) -> LabelledImages:
    """A labelled set from a ``--labels`` string.

    * ``tfds:NAME[:SPLIT]`` -- :func:`from_tfds` (default split ``test``), at most ``num`` examples;
    * an existing folder -- :func:`from_folder`, a seeded random choice of ``num`` pairs;
    * an ``.npz`` -- :func:`from_npz`, a seeded random choice of ``num`` samples; with a
      ``segmenter`` whose generator takes the file's latents, its cluster maps of the
      samples are added (``cluster_labels``);
    * otherwise a generator labeller (``"faces"``, ``module:function``, a callable) --
      :func:`from_generated` on ``segmenter`` with ``num`` drawn samples of stream ``part``.

    Args:
        num: images wanted (real sets and files: default all); samples drawn (labellers: required).
        seed: choice of the subset / the evaluation stream seed.
        tfds_options: more arguments of :func:`from_tfds` (``data_dir``, ``manual_dir``, ``image_key``,
            ``label_key``, ``class_names``).
    """
    if is_generator_labeller(spec):
        if segmenter is None:
            raise EvaluationError(f"--labels {spec!r} labels generated samples: give the KLiSH run (--run, --k) "
                                  "whose generator draws them")
        if num is None:
            raise EvaluationError(f"--labels {spec!r} labels generated samples: say how many to draw")
        return from_generated(segmenter, spec, num, seed, part=part, batch_size=batch_size,
                              exclude_latents=exclude_latents, ignore_label=ignore_label, progress=progress)
    spec = str(spec)
    rng = np.random.default_rng([int(seed), STREAM_PARTS.get(part, 0)])
    if spec.startswith("tfds:"):
        name, tsplit = _tfds_spec(spec)
        return from_tfds(name, tsplit, max_examples=num, ignore_label=ignore_label, **(tfds_options or {}))
    if os.path.isdir(spec):
        total = len(folder_pairs(spec))
        idx = None if num is None or num >= total else np.sort(rng.choice(total, int(num), replace=False))
        return from_folder(spec, indices=idx, ignore_label=ignore_label)
    out = from_npz(spec, ignore_label=ignore_label)
    if num is not None and num < len(out):
        out = out.subset(np.sort(rng.choice(len(out), int(num), replace=False)), note=f"{num} random samples")
    return _with_clusters(out, segmenter, batch_size, progress)


def _with_clusters(labelled: LabelledImages, segmenter: Optional[Segmenter], batch_size: int,
                   progress: bool) -> LabelledImages:
    """Add the segmenter's cluster maps of a file's samples when its generator takes their latents."""
    gen = None if segmenter is None else segmenter.generator
    if (gen is None or labelled.latents is None or tuple(labelled.latents.shape[1:]) != tuple(gen.latent_shape)
            or (gen.num_classes and labelled.class_labels is None) or not labelled.uniform):
        return labelled
    size = labelled.labels[0].shape
    if size[0] != size[1]:
        return labelled
    out = segmenter.segment_latents(labelled.latents, labelled.class_labels, batch_size=batch_size, size=size[0],
                                    progress=progress)
    return dataclasses.replace(labelled, cluster_labels=out["labels"], num_clusters=segmenter.k)


def evaluation_sets(labels, *, match_labels=None, num_match_pool: int, num_test: Optional[int] = None,
                    seed: int = 0, segmenter: Optional[Segmenter] = None, ignore_label: Optional[int] = None,
                    batch_size: int = 16, exclude_latents=None, tfds_options: Optional[dict] = None,
                    progress: bool = False) -> tuple[LabelledImages, LabelledImages]:
    """The matching pool and the test set of a UFGS evaluation, disjoint.

    * ``match_labels`` given: the pool is ``num_match_pool`` images of it, the test set
      ``num_test`` images of ``labels`` (e.g. a validation and a test split, as the paper);
    * ``labels`` a generator labeller: ``num_match_pool`` samples drawn from stream part
      ``"ufgs-match"`` and ``num_test`` from ``"ufgs-test"`` (skipped samples dropped);
    * otherwise one real set split by a seeded permutation (:func:`split`): ``num_match_pool``
      images for the pool, then ``num_test`` (default: all the rest) for the test set.

    Returns:
        ``(match_pool, test_set)``.
    """
    kw = dict(seed=seed, segmenter=segmenter, ignore_label=ignore_label, batch_size=batch_size,
              exclude_latents=exclude_latents, tfds_options=tfds_options,
              progress=progress)
    if int(num_match_pool) < 1:
        raise EvaluationError(f"the matching pool needs at least one image, got {num_match_pool}")
    if match_labels is not None:
        pool = load_labelled(match_labels, num=num_match_pool, part="ufgs-match", **kw)
        test = load_labelled(labels, num=num_test, part="ufgs-test", **kw)
    elif is_generator_labeller(labels):
        if num_test is None:
            raise EvaluationError("say how many test samples to draw (--num-test)")
        pool = load_labelled(labels, num=num_match_pool, part="ufgs-match", **kw)
        test = load_labelled(labels, num=num_test, part="ufgs-test", **kw)
    else:
        want = None if num_test is None else int(num_match_pool) + int(num_test)
        full = load_labelled(labels, num=want, part="ufgs-test", **kw)
        if len(full) <= int(num_match_pool):
            raise EvaluationError(f"{labels}: {len(full)} images cannot give a matching pool of {num_match_pool} and "
                                  "a test set; lower --match-pool or give --match-labels")
        pool, test = split(full, [int(num_match_pool), None if num_test is None else min(int(num_test),
                                                                                          len(full) - num_match_pool)],
                           seed)
    if pool.class_names is not None and test.class_names is not None and pool.class_names != test.class_names:
        raise EvaluationError(f"the matching images name the classes {pool.class_names} but the test images "
                              f"{test.class_names}; both must use the same class ids")
    return pool, test
