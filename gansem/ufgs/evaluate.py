"""UFGS evaluation (KLiSH Sec. 5.1, Tab. 5 and Tab. 6): name clusters with M labelled images, score on a test set.

A UFGS segmenter predicts cluster ids ``[0, K)``. To score it against reference
classes ``[0, C)``, the clusters are matched to classes (many-to-one) by the greedy
maximum-matching mIoU of Algorithm 2 (Eq. 6-7, :func:`gansem.metrics.greedy_matching_miou`)
on the contingency tables of ``M`` labelled *matching* images -- the paper uses 100
validation images of CelebAMask-HQ -- and the matched segmentation is scored on a
disjoint *test* set: per-class IoU (Tab. 6) and mIoU (Tab. 5).

Everything works on two kinds of plain callables, so any network plugs in:

* a **predictor** ``images uint8 [N, H, W, 3] -> int labels [N, H, W]`` (cluster ids for a
  UFGS segmenter, class ids for a supervised one);
* a **few-shot trainer** ``(images, labels, num_classes, seed) -> predictor``: the
  supervised baseline trained directly on the M labelled images (``images`` uint8
  ``[M, H, W, 3]``, or a list when sizes differ; ``labels`` int32 ``[M, H, W]`` with
  **-1 for unlabelled pixels**).

:func:`ufgs_table` runs the experiment of Tab. 5/6: for every M (default 1, 10, 100)
and R repeats with different draws of the M images from the matching pool, (i) the
UFGS segmenter matched with the M images, (ii) the KLiSH classifier itself matched the
same way (generated sets only: its cluster maps come from the generator's features),
(iii) the few-shot baseline trained on the same M images and applied without matching.
The draws are shared by the three rows (paired comparison) and fixed by the seed.

Scores (:class:`SegmentationScores`) are computed from per-image contingency tables,
streamed batch by batch over the test set:

* ``per_class_iou`` / ``miou`` / ``pixel_accuracy``: pixels **pooled over the test set**
  (the usual supervised-segmentation protocol; what the tables show);
* ``*_image``: per-class IoU in every image, averaged over the images where the class or
  its prediction appears (the averaging of the original KLiSH evaluation code);
* the mIoU is the mean over classes whose IoU is defined (a class neither present in the
  test set nor predicted is left out); pixels whose reference is the ignore label count
  nowhere.

Matching averages per image by default (``match_average="image"``), as
:func:`gansem.metrics.greedy_matching_miou` does for per-image tables. Clusters that do
not occur in the M matching images still get a class: Algorithm 2 assigns every cluster,
and with no pixel to decide, ties go to the first class (``assign_all=False`` leaves
them unmatched instead: their pixels then count as missed for their true class).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .. import metrics, viz
from ..references.sources import EvaluationError
from ..run import jsonable
from .labelled import LabelledImages, evaluation_sets
from .records import ArrayPairs
from .train import fit_segmenter

__all__ = [
    "Predictor",
    "FewShotTrainer",
    "SegmentationScores",
    "UfgsTable",
    "prediction_tables",
    "match_clusters",
    "match_from_tables",
    "apply_assignment",
    "scores_from_tables",
    "per_class_iou",
    "draw_match_sets",
    "ufgs_table",
    "network_few_shot_trainer",
    "tables_markdown",
    "examples_figure",
    "write_report",
    "evaluate_segmenter",
    "REPORT_FILES",
]

#: ``images uint8 [N, H, W, 3] -> int labels [N, H, W]``.
Predictor = Callable[[np.ndarray], np.ndarray]
#: ``(images, labels with -1 for unlabelled pixels, num_classes, seed) -> Predictor``.
FewShotTrainer = Callable[[Union[np.ndarray, list], Union[np.ndarray, list], int, int], Predictor]

#: Files :func:`write_report` writes, and what they hold (``manifest.json`` repeats this).
REPORT_FILES = {
    "results.json": "every number: per-repeat scores (pooled and per-image mIoU, pixel accuracy, per-class IoU), "
                    "means and standard deviations, the M-image draws, cluster → class assignments, the sets used",
    "tables.md": "Tab. 5 (mIoU per method and M) and Tab. 6 (per-class IoU) as markdown",
    "examples.png": "test images with the reference, the matched UFGS prediction, the KLiSH classifier (generated "
                    "sets) and the few-shot prediction (largest M, first repeat)",
    "manifest.json": "what is where, and the inputs of the evaluation",
}

_METHODS = ("ufgs", "klish", "few_shot")


class SegmentationScores(NamedTuple):
    """Scores of a segmentation into ``C`` classes on a test set.

    Attributes:
        per_class_iou: ``[C]`` IoU with pixels pooled over the test set; ``nan`` if undefined.
        miou: mean of the defined entries of ``per_class_iou``.
        pixel_accuracy: correct / labelled pixels over the test set.
        per_class_iou_image: ``[C]`` IoU per image, averaged over the images where it is defined.
        miou_image: mean of the defined entries of ``per_class_iou_image``.
        pixel_accuracy_image: pixel accuracy per image, averaged over images with labelled pixels.
        num_images: test images with labelled pixels.
    """

    per_class_iou: np.ndarray
    miou: float
    pixel_accuracy: float
    per_class_iou_image: np.ndarray
    miou_image: float
    pixel_accuracy_image: float
    num_images: int


class UfgsTable(NamedTuple):
    """Result of :func:`ufgs_table`.

    Attributes:
        results: JSON-able dict (see :func:`ufgs_table`).
        examples: ``dict`` with ``indices`` (test indices), ``images``, ``reference`` (lists of
            arrays) and ``maps`` (column title → list of label maps) for :func:`examples_figure`.
    """

    results: dict
    examples: dict


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


# =====================================================================================
# Contingency tables of predictions
# =====================================================================================


def _checked_prediction(pred, ref: np.ndarray, num_pred: int, what: str) -> np.ndarray:
    p = np.asarray(pred)
    if p.shape != ref.shape:
        raise EvaluationError(f"{what} returned label maps of shape {p.shape} for references of shape {ref.shape}; "
                              "it must return int labels [N, H, W] at the size of the input images")
    if not np.issubdtype(p.dtype, np.integer):
        raise EvaluationError(f"{what} returned dtype {p.dtype}; return integer ids (argmax of the scores)")
    if p.size and (int(p.min()) < 0 or int(p.max()) >= num_pred):
        raise EvaluationError(f"{what} returned ids {int(p.min())}..{int(p.max())}; expected ids in [0, {num_pred})")
    return p


def prediction_tables(predictor_or_labels, labelled: LabelledImages, num_pred: int, num_classes: int, *,
                      batch_size: int = 16, keep: Sequence[int] = (), progress: bool = False,
                      desc: str = "predict") -> tuple[np.ndarray, dict]:
    """Per-image contingency tables of predictions against the reference labels.

    Args:
        predictor_or_labels: a :data:`Predictor`, or precomputed label maps (``[N, H, W]`` array or
            a list of ``[H_i, W_i]``) of ``labelled``'s images.
        labelled: the images and their reference labels (``ignore_label`` pixels are not counted).
        num_pred: number of predicted ids (K clusters, or C classes).
        num_classes: C reference classes.
        batch_size: images per predictor call (consecutive images of one size).
        keep: image indices whose predictions are returned too (for figures).

    Returns:
        ``(tables [N, C, num_pred] int64, {index: prediction [H, W]} for keep)``.
    """
    call = callable(predictor_or_labels)
    what = "the predictor" if call else "the given label maps"
    if not call and len(predictor_or_labels) != len(labelled):
        raise EvaluationError(f"{len(predictor_or_labels)} label maps for {len(labelled)} images")
    keep = set(int(i) for i in keep)
    tables, kept = [], {}
    bar = tqdm(total=len(labelled), desc=desc, disable=not progress, unit="img")
    for idx, img, ref in labelled.batches(batch_size):
        if call:
            pred = predictor_or_labels(img)
        else:
            maps = [np.asarray(predictor_or_labels[i]) for i in idx]
            if any(x.shape != ref.shape[1:] for x in maps):
                raise EvaluationError(f"{what}: a label map's size differs from its image's {ref.shape[1:]}")
            pred = np.stack(maps)
        pred = _checked_prediction(pred, ref, num_pred, what)
        try:
            tables.append(metrics.contingency(pred, ref, num_pred, num_classes, per_image=True,
                                              ignore_label=labelled.ignore_label))
        except ValueError as e:
            raise EvaluationError(f"{labelled.description.get('kind', 'labelled images')}: {e}") from e
        for j, i in enumerate(idx):
            if int(i) in keep:
                kept[int(i)] = pred[j]
        bar.update(len(idx))
    bar.close()
    if not tables:
        return np.zeros((0, num_classes, num_pred), np.int64), kept
    return np.concatenate(tables), kept


# =====================================================================================
# Matching and scores
# =====================================================================================


def match_from_tables(tables, average: str = "image", *, assign_all: bool = True) -> np.ndarray:
    """Cluster → class assignment ``[K]`` by Algorithm 2 on per-image tables ``[M, C, K]``.

    See :func:`gansem.metrics.greedy_matching_miou`; ``-1`` marks an unmatched cluster
    (only with ``assign_all=False``).
    """
    t = np.asarray(tables)
    if t.ndim != 3 or t.shape[0] < 1:
        raise EvaluationError(f"matching needs per-image tables [M >= 1, C, K], got shape {t.shape}")
    return metrics.greedy_matching_miou(t, average, assign_all=assign_all).assignment


def match_clusters(pred, ref, num_clusters: int, num_classes: int, ignore_label: Optional[int] = None,
                   average: str = "image", *, assign_all: bool = True) -> np.ndarray:
    """Match clusters to classes with the M matching images (Algorithm 2, Eq. 6-7).

    Args:
        pred: ``[M, H, W]`` int cluster ids in ``[0, num_clusters)`` (or a list of ``[H_i, W_i]`` maps).
        ref: reference class ids in ``[0, num_classes)`` or ``ignore_label``, same shapes.
        num_clusters: K.
        num_classes: C.
        ignore_label: reference value of unlabelled pixels.
        average: ``"image"`` (per-class IoU averaged over the images, as the original KLiSH
            evaluation) or ``"dataset"`` (pixels of the M images pooled).
        assign_all: Algorithm 2 assigns every cluster; ``False`` stops when no step raises J.

    Returns:
        ``[K]`` int64: class of every cluster (``-1``: unmatched).
    """
    if len(pred) != len(ref):
        raise EvaluationError(f"{len(pred)} predicted maps for {len(ref)} reference maps")
    tables = []
    for p, r in zip(pred, ref):
        p, r = np.asarray(p), np.asarray(r)
        if p.shape != r.shape:
            raise EvaluationError(f"a predicted map has shape {p.shape} but its reference {r.shape}")
        tables.append(metrics.contingency(p[None], r[None], num_clusters, num_classes, per_image=True,
                                          ignore_label=ignore_label))
    return match_from_tables(np.concatenate(tables), average, assign_all=assign_all)


def apply_assignment(labels, assignment) -> Union[np.ndarray, list]:
    """Cluster maps → class maps: ``assignment[labels]`` (``-1`` where a cluster is unmatched).

    Args:
        labels: int cluster ids ``[..., H, W]`` in ``[0, K)``, or a list of such maps.
        assignment: ``[K]`` class of every cluster (``-1``: none).

    Returns:
        int32 class maps of the same shape(s).
    """
    a = np.asarray(assignment, np.int64)
    if isinstance(labels, list):
        return [apply_assignment(x, a) for x in labels]
    lab = np.asarray(labels)
    if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= a.shape[0]):
        raise EvaluationError(f"cluster ids {int(lab.min())}..{int(lab.max())} outside [0, K={a.shape[0]})")
    return a[lab].astype(np.int32)


def scores_from_tables(tables, assignment=None) -> SegmentationScores:
    """Scores of the matched segmentation from per-image tables.

    Args:
        tables: ``[N, C, K]`` counts (reference classes × predicted ids) of the test images.
        assignment: ``[K]`` class of every predicted id (``-1``: none); default the identity
            (predictions are class ids, ``K == C``).

    Returns:
        :class:`SegmentationScores`.
    """
    t = np.asarray(tables, np.int64)
    n, c, k = t.shape
    if assignment is None:
        if k != c:
            raise EvaluationError(f"predictions with {k} ids need an assignment to the {c} classes")
        assignment = np.arange(c)
    a = np.asarray(assignment, np.int64)
    pooled = metrics.per_class_iou_after_matching(t.sum(0), a, "dataset")
    per_image = metrics.per_class_iou_after_matching(t, a, "image") if n else np.full(c, np.nan)
    matched = a >= 0
    correct = t[:, a[matched], np.flatnonzero(matched)].sum(axis=1) if matched.any() else np.zeros(n, np.int64)
    total = t.sum(axis=(1, 2))
    labelled = total > 0

    def nanmean(x):
        return float(np.nanmean(x)) if np.any(np.isfinite(x)) else float("nan")

    return SegmentationScores(
        per_class_iou=pooled, miou=nanmean(pooled),
        pixel_accuracy=float(correct.sum() / total.sum()) if total.sum() else float("nan"),
        per_class_iou_image=per_image, miou_image=nanmean(per_image),
        pixel_accuracy_image=float(np.mean(correct[labelled] / total[labelled])) if labelled.any() else float("nan"),
        num_images=int(labelled.sum()))


def per_class_iou(predictor_or_labels, test_set: LabelledImages, assignment=None,
                  num_classes: Optional[int] = None, *, num_clusters: Optional[int] = None, batch_size: int = 16,
                  progress: bool = False) -> SegmentationScores:
    """Per-class IoU, mIoU and pixel accuracy of a (matched) segmentation on a test set.

    Streams the test set batch by batch (per-image contingency tables,
    ``ignore_label`` respected), then applies ``assignment``.

    Args:
        predictor_or_labels: a :data:`Predictor`, or precomputed label maps of the test images.
        test_set: images and reference labels.
        assignment: ``[K]`` class of every cluster (from :func:`match_clusters`); ``None``: predictions
            are class ids already.
        num_classes: C (default ``test_set.num_classes``).
        num_clusters: K (default ``len(assignment)``, or C without an assignment).

    Returns:
        :class:`SegmentationScores` (pooled and per-image).
    """
    c = int(num_classes if num_classes is not None else test_set.num_classes)
    k = int(num_clusters if num_clusters is not None else (c if assignment is None else len(assignment)))
    tables, _ = prediction_tables(predictor_or_labels, test_set, k, c, batch_size=batch_size, progress=progress)
    return scores_from_tables(tables, assignment)


# =====================================================================================
# Tab. 5 / Tab. 6
# =====================================================================================


def draw_match_sets(pool_size: int, num_match: Sequence[int], repeats: int, seed: int) -> dict:
    """The M-image draws: ``{M: [indices [M] sorted, one per repeat]}``.

    Repeat ``r`` of ``M`` draws without replacement from ``default_rng([seed, M, r])``, so
    a draw depends only on ``(seed, M, r)``: adding repeats or other M keeps the earlier
    draws. With ``M == pool_size`` every repeat takes the whole pool.
    """
    out = {}
    for m in num_match:
        if not 1 <= int(m) <= int(pool_size):
            raise EvaluationError(f"cannot draw M={m} images from a matching pool of {pool_size}")
        out[int(m)] = [np.sort(np.random.default_rng([int(seed), int(m), r]).choice(int(pool_size), int(m),
                                                                                     replace=False))
                       for r in range(int(repeats))]
    return out


def _summary(values: list) -> dict:
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    std = float(np.std(v[ok], ddof=1)) if ok.sum() > 1 else 0.0 if ok.any() else float("nan")
    return {"mean": float(np.mean(v[ok])) if ok.any() else float("nan"), "std": std, "values": v.tolist()}


def _class_summary(rows: list) -> dict:
    v = np.asarray(rows, np.float64)  # [R, C]
    ok = np.isfinite(v)
    cnt = ok.sum(axis=0)
    mean = np.where(cnt > 0, np.where(ok, v, 0).sum(0) / np.maximum(cnt, 1), np.nan)
    dev = np.where(ok, v - mean, 0.0)
    std = np.where(cnt > 1, np.sqrt((dev ** 2).sum(0) / np.maximum(cnt - 1, 1)), np.where(cnt == 1, 0.0, np.nan))
    return {"mean": mean.tolist(), "std": std.tolist()}


def _row(method: str, title: str, m: int, role: str, scores: list, extra: dict) -> dict:
    return {
        "method": method, "title": title, "num_match": m, "labelled_images": m, "labelled_role": role,
        "repeats": len(scores),
        "miou": _summary([s.miou for s in scores]),
        "miou_image": _summary([s.miou_image for s in scores]),
        "pixel_accuracy": _summary([s.pixel_accuracy for s in scores]),
        "pixel_accuracy_image": _summary([s.pixel_accuracy_image for s in scores]),
        "per_class_iou": _class_summary([s.per_class_iou for s in scores]),
        "per_class_iou_image": _class_summary([s.per_class_iou_image for s in scores]),
        **extra,
    }


def _for_trainer(labels, ignore_label):
    """Labels with ``ignore_label`` pixels set to -1 (what a few-shot trainer receives)."""
    if ignore_label is None:
        return labels
    if isinstance(labels, list):
        return [np.where(x == ignore_label, -1, x).astype(np.int32) for x in labels]
    return np.where(labels == ignore_label, -1, labels).astype(np.int32)


def ufgs_table(match_pool: LabelledImages, test_set: LabelledImages, *,
               ufgs_predictor: Optional[Predictor] = None, num_clusters: Optional[int] = None,
               few_shot_trainer: Optional[FewShotTrainer] = None,
               klish_match_labels=None, klish_test_labels=None, include_klish: bool = True,
               num_classes: Optional[int] = None, num_match: Sequence[int] = (1, 10, 100), repeats: int = 5,
               seed: int = 0, match_average: str = "image", assign_all: bool = True, batch_size: int = 16,
               num_examples: int = 4, titles: Optional[dict] = None, progress: bool = False,
               quiet: bool = True) -> UfgsTable:
    """The Tab. 5 / Tab. 6 experiment: UFGS, the KLiSH classifier and a few-shot baseline per M.

    For every M in ``num_match`` (values above the pool size are lowered to it) and every
    repeat ``r < repeats``, the same M images are drawn from ``match_pool``
    (:func:`draw_match_sets`) for every method:

    * ``"ufgs"`` -- ``ufgs_predictor``'s cluster maps of the M images give the assignment
      (:func:`match_from_tables`), applied to its cluster maps of the test images;
    * ``"klish"`` -- the same with the KLiSH classifier's own cluster maps
      (``klish_match_labels`` / ``klish_test_labels``, default the sets' ``cluster_labels``,
      present for generated sets); skipped when they are missing;
    * ``"few_shot"`` -- ``few_shot_trainer`` trained on the M images (labels with -1 for
      ignored pixels, seed from ``(seed, M, r)``) and applied to the test images without matching.

    Each predictor runs once over the pool and once over the test set (per-image tables
    are kept and re-used for every draw); the few-shot predictor of each draw runs once
    over the test set.

    Args:
        match_pool: labelled images the M-image draws come from.
        test_set: labelled test images (disjoint from the pool).
        ufgs_predictor: the UFGS segmenter, ``images -> cluster ids [0, K)``.
        num_clusters: K (default ``ufgs_predictor.num_classes``, else the sets' ``num_clusters``).
        few_shot_trainer: :data:`FewShotTrainer`, or ``None`` (no few-shot rows).
        num_classes: C (default: the number of class names, else the largest label + 1 of both sets).
        num_match: the M values.
        repeats: R draws per M.
        seed: seed of the draws and of the few-shot training.
        match_average: averaging of Algorithm 2's IoU on the M images (``"image"`` or ``"dataset"``).
        assign_all: Algorithm 2 assigns every cluster (see the module docstring).
        batch_size: images per predictor call.
        num_examples: test images shown in the example figure.
        titles: row titles per method (``{"ufgs": ..., "klish": ..., "few_shot": ...}``).

    Returns:
        :class:`UfgsTable`; ``results`` holds ``rows`` (one per method and M: ``miou``,
        ``miou_image``, ``pixel_accuracy``, ``pixel_accuracy_image`` as ``{mean, std, values}``
        over repeats, ``per_class_iou`` / ``per_class_iou_image`` as ``{mean [C], std [C]}``,
        ``labelled_images``, assignments or training seeds), ``draws``, the sets' descriptions,
        ``num_classes``, ``class_names``, ``num_match`` / ``num_match_requested`` and timings.
        Standard deviations are sample standard deviations (ddof = 1) over the repeats.
    """
    t0 = time.time()
    if match_average not in ("image", "dataset"):
        raise EvaluationError(f"match_average must be 'image' or 'dataset', got {match_average!r}")
    if int(repeats) < 1:
        raise EvaluationError(f"repeats must be >= 1, got {repeats}")
    if len(match_pool) < 1 or len(test_set) < 1:
        raise EvaluationError(f"need matching and test images (got {len(match_pool)} and {len(test_set)})")
    names = match_pool.class_names or test_set.class_names
    c = int(num_classes) if num_classes is not None else (len(names) if names else
                                                          max(match_pool.num_classes, test_set.num_classes))
    if c < 1:
        raise EvaluationError("the reference labels hold no class: check the labels and the ignore label")
    if klish_match_labels is None and klish_test_labels is None and include_klish:
        if match_pool.cluster_labels is not None and test_set.cluster_labels is not None:
            klish_match_labels, klish_test_labels = match_pool.cluster_labels, test_set.cluster_labels
    if not include_klish:
        klish_match_labels = klish_test_labels = None
    if (klish_match_labels is None) != (klish_test_labels is None):
        raise EvaluationError("the KLiSH row needs the classifier's cluster maps of both the matching and the test "
                              "images")
    k = num_clusters if num_clusters is not None else getattr(ufgs_predictor, "num_classes", None)
    k = k if k is not None else (match_pool.num_clusters or test_set.num_clusters)
    if (ufgs_predictor is not None or klish_test_labels is not None) and k is None:
        raise EvaluationError("give num_clusters (K of the UFGS segmenter)")
    if ufgs_predictor is None and klish_test_labels is None and few_shot_trainer is None:
        raise EvaluationError("nothing to evaluate: give a UFGS predictor, KLiSH cluster maps or a few-shot trainer")
    k = None if k is None else int(k)
    for part, given in ((match_pool, klish_match_labels), (test_set, klish_test_labels)):
        if given is not None and given is part.cluster_labels and part.num_clusters != k:
            raise EvaluationError(f"the KLiSH cluster maps have K={part.num_clusters} clusters but the UFGS "
                                      f"segmenter K={k}: use the run's classifier at the K of the UFGS dataset")
    requested = [int(m) for m in num_match]
    if not requested or min(requested) < 1:
        raise EvaluationError(f"M values must be >= 1, got {requested}")
    ms = sorted({min(m, len(match_pool)) for m in requested})
    if ms != sorted(set(requested)):
        _log(f"the matching pool holds {len(match_pool)} images: M = {sorted(set(requested))} → {ms}", quiet)
    draws = draw_match_sets(len(match_pool), ms, repeats, seed)
    ex_rng = np.random.default_rng([int(seed), 0xE7])
    ex_idx = np.sort(ex_rng.choice(len(test_set), min(int(num_examples), len(test_set)), replace=False))
    titles = {"ufgs": f"UFGS (K={k})", "klish": f"KLiSH classifier (K={k})",
              "few_shot": "few-shot (same network, trained on the M images)", **(titles or {})}
    rows, timings = [], {}
    maps_shown: dict = {}
    m_show = ms[-1]

    # -- UFGS and KLiSH: one pass over pool and test set, then every draw on the tables ---------
    for method, pool_pred, test_pred in (("ufgs", ufgs_predictor, ufgs_predictor),
                                         ("klish", klish_match_labels, klish_test_labels)):
        if test_pred is None:
            continue
        t = time.time()
        _log(f"{titles[method]}: cluster maps of {len(match_pool)} matching and {len(test_set)} test images", quiet)
        pool_tables, _ = prediction_tables(pool_pred, match_pool, k, c, batch_size=batch_size, progress=progress,
                                           desc=f"{method} matching images")
        test_tables, kept = prediction_tables(test_pred, test_set, k, c, batch_size=batch_size, keep=ex_idx,
                                              progress=progress, desc=f"{method} test images")
        for m in ms:
            scores, assigns = [], []
            for idx in draws[m]:
                a = match_from_tables(pool_tables[idx], match_average, assign_all=assign_all)
                assigns.append(a)
                scores.append(scores_from_tables(test_tables, a))
            rows.append(_row(method, titles[method], m, "cluster → class matching", scores,
                             {"assignments": [a.tolist() for a in assigns]}))
        a_show = np.asarray(rows[-1]["assignments"][0])  # largest M (the last row), first repeat
        if method == "ufgs":
            maps_shown[f"UFGS clusters (K={k})"] = [kept[int(i)] for i in ex_idx]
        maps_shown[f"{'UFGS' if method == 'ufgs' else 'KLiSH'}, M={m_show}"] = [
            apply_assignment(kept[int(i)], a_show) for i in ex_idx]
        timings[f"{method}_s"] = time.time() - t

    # -- few-shot: one network per draw -------------------------------------------------------------
    if few_shot_trainer is not None:
        t = time.time()
        jobs = [(m, r) for m in ms for r in range(int(repeats))]
        _log(f"few-shot baseline: {len(jobs)} trainings (M = {ms}, {repeats} repeat(s))", quiet)
        bar = tqdm(total=len(jobs), desc="few-shot trainings", disable=not progress)
        per_m: dict = {m: ([], []) for m in ms}
        for m, r in jobs:
            idx = draws[m][r]
            train_seed = int(np.random.default_rng([int(seed), m, r, 0xF5]).integers(2 ** 31 - 1))
            predictor = few_shot_trainer(match_pool.stacked("images", idx),
                                         _for_trainer(match_pool.stacked("labels", idx), match_pool.ignore_label),
                                         c, train_seed)
            show = (m, r) == (m_show, 0)
            tables, kept = prediction_tables(predictor, test_set, c, c, batch_size=batch_size,
                                             keep=ex_idx if show else (), desc=f"few-shot M={m} r={r}")
            per_m[m][0].append(scores_from_tables(tables))
            per_m[m][1].append(train_seed)
            if show:
                maps_shown[f"few-shot, M={m_show}"] = [kept[int(i)] for i in ex_idx]
            bar.update(1)
        bar.close()
        for m in ms:
            rows.append(_row("few_shot", titles["few_shot"], m, "training", per_m[m][0],
                             {"train_seeds": per_m[m][1]}))
        timings["few_shot_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    reference = [np.where(test_set.labels[int(i)] == test_set.ignore_label, -1, test_set.labels[int(i)])
                 if test_set.ignore_label is not None else test_set.labels[int(i)] for i in ex_idx]
    examples = {"indices": ex_idx.tolist(), "images": [test_set.images[int(i)] for i in ex_idx],
                "reference": reference, "maps": maps_shown, "num_classes": c}
    results = {
        "num_classes": c, "class_names": list(names) if names else None, "num_clusters": k,
        "ignore_label": test_set.ignore_label,
        "num_match": ms, "num_match_requested": requested, "repeats": int(repeats), "seed": int(seed),
        "match_average": match_average, "assign_all": bool(assign_all),
        "match_pool": {**jsonable(match_pool.description), "num_images": len(match_pool)},
        "test_set": {**jsonable(test_set.description), "num_images": len(test_set),
                     "num_without_labels": test_set.num_unlabelled()},
        "draws": {str(m): [d.tolist() for d in v] for m, v in draws.items()},
        "methods": [mth for mth in _METHODS if any(r["method"] == mth for r in rows)],
        "titles": titles, "rows": rows, "example_indices": ex_idx.tolist(), "timings": timings,
        "notes": {
            "miou": "mean over classes of the per-class IoU with pixels pooled over the test set (classes neither "
                    "present nor predicted left out); miou_image: per-class IoU averaged over the images where it "
                    "is defined, then over classes",
            "matching": f"Algorithm 2 (greedy maximum-matching mIoU, many-to-one), IoU averaged per {match_average}, "
                        f"{'every cluster assigned' if assign_all else 'clusters that do not raise J left unmatched'}",
            "std": "sample standard deviation (ddof = 1) over the repeats",
            "draws": "repeat r of M draws M images of the pool without replacement from default_rng([seed, M, r])",
        },
    }
    return UfgsTable(results, examples)


# =====================================================================================
# Reports
# =====================================================================================


def _pct(summary: dict, with_std: bool = True) -> str:
    m, sd = summary["mean"], summary["std"]
    if not np.isfinite(m):
        return "–"
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if with_std and np.isfinite(sd) else f"{100 * m:.1f}"


def _describe_set(d: dict) -> str:
    kind = d.get("kind")
    if kind == "generated":
        lab = d.get("labeller", {}).get("name", "?")
        return (f"{d['num_labelled']} generated samples labelled by `{lab}` ({d['num_drawn']} drawn, "
                f"{d['num_skipped']} skipped without labels; stream part `{d['part']}`, seed {d['seed']})")
    if kind == "folder":
        return f"{d['num_images']} images of the folder `{d['path']}`"
    if kind == "tfds":
        return f"{d['num_images']} images of `tfds:{d['name']}` split `{d['split']}`"
    if kind == "file":
        return f"{d['num_images']} samples of the labels file `{d['path']}`"
    return f"{d.get('num_images', '?')} labelled images"


def tables_markdown(results: dict) -> str:
    """Tab. 5 (mIoU per method and M) and Tab. 6 (per-class IoU) of :func:`ufgs_table`'s results as markdown."""
    c = results["num_classes"]
    names = results["class_names"] or [str(i) for i in range(c)]
    rows = results["rows"]
    ts = results["test_set"]
    lines = [
        "# UFGS evaluation (KLiSH Tab. 5 / Tab. 6)", "",
        f"Test set: {_describe_set(ts)}"
        + (f", {ts['num_without_labels']} of them without labelled pixels" if ts.get("num_without_labels") else "")
        + f". {c} classes: {', '.join(names)}.",
        f"Matching pool: {_describe_set(results['match_pool'])}; M images drawn {results['repeats']} time(s) "
        f"(seed {results['seed']}) for every M in {results['num_match']}"
        + (f" (asked {results['num_match_requested']}; M is at most the pool size)"
           if sorted(set(results['num_match_requested'])) != results['num_match'] else "")
        + "; every method of a row group uses the same draws.", "",
        f"Clusters are named by {results['notes']['matching']} on the M images; the few-shot baseline is the same "
        "network trained on the M labelled images and applied without matching. mIoU: "
        + results["notes"]["miou"] + f". Values in %, mean ± {results['notes']['std']}.", "",
        "## Tab. 5: mIoU", "",
        "| method | labelled images (M) | used for | #classes | mIoU | mIoU per image | pixel accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['title']} | {r['labelled_images']} | {r['labelled_role']} | {c} | {_pct(r['miou'])} | "
                     f"{_pct(r['miou_image'])} | {_pct(r['pixel_accuracy'])} |")
    lines += ["", "## Tab. 6: IoU per class (pooled over the test pixels, mean over repeats)", "",
              "| method | M | " + " | ".join(names) + " |", "|---|---|" + "---|" * c]
    for r in rows:
        vals = ["–" if not np.isfinite(v) else f"{100 * v:.1f}" for v in r["per_class_iou"]["mean"]]
        lines.append(f"| {r['title']} | {r['num_match']} | " + " | ".join(vals) + " |")
    lines += ["", "Standard deviations of the per-class IoU and the per-image averages are in results.json.", ""]
    if results["example_indices"]:
        lines += ["![examples](examples.png)", "",
                  f"Examples: test images {results['example_indices']}, reference, and the predictions at "
                  f"M = {results['num_match'][-1]} (first repeat); black: unlabelled / unmatched pixels.", ""]
    return "\n".join(lines)


def _resize(a: np.ndarray, hw: tuple, labels: bool) -> np.ndarray:
    if a.shape[:2] == hw:
        return a
    if labels:
        im = Image.fromarray(a.astype(np.int32), mode="I").resize((hw[1], hw[0]), Image.NEAREST)
        return np.asarray(im).astype(np.int32)
    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.BILINEAR))


#: Label of unlabelled pixels in the few-shot training pairs (what :func:`~gansem.ufgs.train.fit_segmenter` ignores).
FEW_SHOT_IGNORE = 255


def network_few_shot_trainer(arch: str, steps: int, batch_size: int, resolution: int, *, mesh=None,
                             model_kwargs: Optional[dict] = None) -> Callable:
    """The few-shot baseline of :func:`ufgs_table`: the segmentation network trained on the M labelled images.

    Returns ``train(images, labels (-1: unlabelled), num_classes, seed) -> predictor``, which fits
    ``arch`` with ``model_kwargs`` (give the UFGS segmenter's, so the baseline is the same network)
    for ``steps`` steps on the M pairs with :func:`~gansem.ufgs.train.fit_segmenter`. Images of another
    size (real sets) are resized to ``resolution`` for training; the predictor labels images at their
    own size, as the UFGS segmenter does.
    """
    hw = (resolution, resolution)

    def train(images, labels, num_classes, seed):
        imgs = np.stack([_resize(np.asarray(x), hw, False) for x in images])
        labs = np.stack([_resize(np.asarray(y), hw, True) for y in labels])
        labs = np.where(labs < 0, FEW_SHOT_IGNORE, labs).astype(np.int32)
        source = ArrayPairs(imgs, labs, num_classes, ignore_label=FEW_SHOT_IGNORE)
        net = fit_segmenter(source, arch=arch, steps=steps, batch_size=batch_size, seed=seed, mesh=mesh,
                            val_samples=0, ignore_index=FEW_SHOT_IGNORE, model_kwargs=model_kwargs,
                            progress=False, quiet=True)
        return net.predict

    return train


def examples_figure(examples: dict, path: str, title: Optional[str] = None) -> Optional[str]:
    """Rows = test images; columns: image, reference, then every prediction of ``examples['maps']``.

    Images of different sizes are resized to the first one's (labels nearest-neighbour).
    Returns ``path``, or ``None`` when there is no example.
    """
    if not examples["images"]:
        return None
    hw = examples["images"][0].shape[:2]
    images = np.stack([_resize(x, hw, False) for x in examples["images"]])
    maps = {"reference": np.stack([_resize(x, hw, True) for x in examples["reference"]])}
    for name, xs in examples["maps"].items():
        maps[name] = np.stack([_resize(np.asarray(x), hw, True) for x in xs])
    return viz.cluster_map_figure(images, maps, path, title=title)


def write_report(table: UfgsTable, out_dir: str, manifest: Optional[dict] = None) -> dict:
    """Write ``results.json``, ``tables.md``, ``examples.png`` and ``manifest.json`` (:data:`REPORT_FILES`).

    Args:
        table: :func:`ufgs_table`'s result.
        out_dir: output folder (created).
        manifest: extra entries of ``manifest.json`` (e.g. the inputs and the command).

    Returns:
        ``{file name: path}`` of the written files.
    """
    os.makedirs(out_dir, exist_ok=True)
    files = {name: os.path.join(out_dir, name) for name in REPORT_FILES}
    if examples_figure(table.examples, files["examples.png"],
                       title=f"test images, predictions at M={table.results['num_match'][-1]}") is None:
        files.pop("examples.png")
    with open(files["tables.md"], "w") as f:
        f.write(tables_markdown(table.results))
    with open(files["results.json"], "w") as f:
        json.dump(jsonable({**table.results, "files": files}), f, indent=1)
    with open(files["manifest.json"], "w") as f:
        json.dump(jsonable({"out_dir": os.path.abspath(out_dir),
                            "files": {n: REPORT_FILES[n] for n in files}, **(manifest or {})}), f, indent=2)
    return files


def evaluate_segmenter(ufgs_predictor: Optional[Predictor], labels, *, num_clusters: Optional[int] = None,
                       segmenter=None, match_labels=None, few_shot_trainer: Optional[FewShotTrainer] = None,
                       num_match: Sequence[int] = (1, 10, 100), repeats: int = 5, num_test: Optional[int] = None,
                       match_pool: Optional[int] = None, seed: int = 0, ignore_label: Optional[int] = None,
                       match_average: str = "image", batch_size: int = 16, num_examples: int = 4,
                       tfds_options: Optional[dict] = None,
                       exclude_latents=None, out_dir: Optional[str] = None, manifest: Optional[dict] = None,
                       progress: bool = False, quiet: bool = True) -> UfgsTable:
    """Load the matching pool and the test set from ``--labels`` strings, run :func:`ufgs_table`, write the report.

    Args:
        ufgs_predictor: the UFGS segmenter (:data:`Predictor`, cluster ids ``[0, K)``).
        labels: the test labels: ``"faces"`` / ``module:function`` / a callable (fresh samples of
            ``segmenter``'s generator), a folder, ``tfds:NAME[:SPLIT]`` or an ``.npz`` (see
            :func:`gansem.ufgs.labelled.evaluation_sets`).
        num_clusters: K (default ``ufgs_predictor.num_classes``).
        segmenter: the KLiSH :class:`~gansem.segment.Segmenter` at K (generated labels; its cluster
            maps give the KLiSH rows), or ``None``.
        match_labels: where the matching images come from (default: from ``labels``, disjoint).
        few_shot_trainer: the few-shot baseline (:data:`FewShotTrainer`) or ``None``.
        num_test: test images (generated labels: samples drawn; real sets: default all the rest).
        match_pool: images the M-image draws come from (default ``2 * max(num_match)``).
        exclude_latents: latents the generated sets must not contain (e.g. the UFGS training set's).
        tfds_options: more arguments of :func:`gansem.ufgs.labelled.from_tfds` (``data_dir``,
            ``manual_dir``, ``image_key``, ``label_key``, ``class_names``).
        out_dir: write the report there (:func:`write_report`).
        manifest: extra ``manifest.json`` entries.

    Returns:
        :class:`UfgsTable` (``results['files']`` lists the written files with ``out_dir``).
    """
    t0 = time.time()
    if not num_match or min(int(m) for m in num_match) < 1:
        raise EvaluationError(f"--num-match values must be >= 1, got {list(num_match)}")
    pool_size = int(match_pool) if match_pool is not None else 2 * max(int(m) for m in num_match)
    if num_test is not None and int(num_test) < 1:
        raise EvaluationError(f"--num-test must be >= 1, got {num_test}")
    _log(f"loading the matching pool ({pool_size}) and the test set from {labels!r}", quiet)
    pool, test = evaluation_sets(labels, match_labels=match_labels, num_match_pool=pool_size, num_test=num_test,
                                 seed=seed, segmenter=segmenter, ignore_label=ignore_label, batch_size=batch_size,
                                 exclude_latents=exclude_latents, tfds_options=tfds_options, progress=progress)
    load_s = time.time() - t0
    table = ufgs_table(pool, test, ufgs_predictor=ufgs_predictor, num_clusters=num_clusters,
                       few_shot_trainer=few_shot_trainer, num_match=num_match, repeats=repeats, seed=seed,
                       match_average=match_average, batch_size=batch_size, num_examples=num_examples,
                       progress=progress, quiet=quiet)
    table.results["timings"].update(load_sets_s=load_s, total_s=time.time() - t0)
    table.results["match_pool_requested"] = pool_size
    if out_dir is not None:
        table.results["files"] = write_report(table, out_dir, manifest)
        _log(f"wrote {table.results['files']['tables.md']}", quiet)
    return table
