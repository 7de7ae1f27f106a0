"""Evaluation metrics: contingency tables, ARI/NMI/AMI, greedy matching mIoU, fg/bg scores.

Everything starts from a **contingency table** ``table[m, k]`` = number of pixels
whose reference (ground-truth) label is ``m`` and whose predicted cluster is
``k`` (rows: ``M`` reference classes, columns: ``K`` predicted clusters). Tables
are built from label maps by ``bincount`` on ``ref * K + pred``, batch by batch
(:class:`ContingencyAccumulator`), so billions of pixels never sit in memory at
once. Per-image tables ``[N, M, K]`` are kept when a metric needs them (the
per-image mIoU of the original KLiSH evaluation).

From a table:

* :func:`adjusted_rand_index`, :func:`normalized_mutual_info`,
  :func:`adjusted_mutual_info` -- the clustering scores of the KLiSH paper
  (Sec. 4.3), equal to scikit-learn's ``adjusted_rand_score``,
  ``normalized_mutual_info_score`` and ``adjusted_mutual_info_score``
  (arithmetic normalisation) on the same pixels. The expected mutual
  information in AMI is computed without the ``O(number of pixels)`` cost of the
  textbook sum; see :func:`adjusted_mutual_info` for the methods and their
  error bounds.
* :func:`greedy_matching_miou` -- the maximum-matching mIoU (Eq. 6-7,
  Algorithm 2) and :func:`per_class_iou_after_matching`.
* :func:`binary_segmentation_metrics` / :func:`binary_metrics_from_tables` --
  foreground/background IoU, mIoU, F1, precision, recall and accuracy
  (Labels4Free, Melas-Kyriazi et al.), and :func:`max_f_beta` (maxFβ, β² = 0.3).

Example::

    acc = ContingencyAccumulator(num_pred=K, num_ref=M, ignore_label=255, keep_per_image=True)
    for pred, ref in batches:                 # [B, H, W] int label maps
        acc.update(pred, ref)
    ari = adjusted_rand_index(acc.table)
    ami = adjusted_mutual_info(acc.table).ami
    match = greedy_matching_miou(acc.per_image_tables)     # KLiSH's per-image mIoU
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding

__all__ = [
    "contingency",
    "contingency_device",
    "ContingencyAccumulator",
    "MAX_TABLE_ENTRIES",
    "adjusted_rand_index",
    "mutual_info",
    "normalized_mutual_info",
    "AdjustedMutualInfo",
    "adjusted_mutual_info",
    "ExpectedMutualInfo",
    "expected_mutual_info",
    "GreedyMatching",
    "greedy_matching_miou",
    "per_class_iou_after_matching",
    "ClusteringScores",
    "clustering_scores",
    "BinaryMetrics",
    "binary_metrics_from_tables",
    "binary_segmentation_metrics",
    "MaxFBeta",
    "max_f_beta",
]

_EPS = float(np.finfo(np.float64).eps)
_INT32_MAX = 2**31 - 1
#: Largest contingency table one call may build (entries; int64 counts: 1 GiB). Tables are sized by the
#: largest label ids, so one stray huge id would otherwise ask for gigabytes.
MAX_TABLE_ENTRIES = 2**27


# =====================================================================================
# Contingency tables
# =====================================================================================


def _as_int_labels(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and a.size and np.all(np.mod(a, 1) == 0):
            return a.astype(np.int64)
        raise TypeError(
            f"{name} must hold integer labels, got dtype {a.dtype}; "
            "pass argmax'ed label maps (e.g. scores.argmax(-1)), not scores"
        )
    return a.astype(np.int64, copy=False)


def _check_counts(num_pred: int, num_ref: int, num_images: int = 1) -> None:
    if int(num_pred) < 1 or int(num_ref) < 1:
        raise ValueError(f"num_pred and num_ref must be >= 1, got num_pred={num_pred}, num_ref={num_ref}")
    entries = int(num_images) * int(num_ref) * int(num_pred)
    if entries > MAX_TABLE_ENTRIES:
        raise ValueError(
            f"a contingency table of {int(num_images)} image(s) × {int(num_ref)} reference classes × {int(num_pred)} "
            f"clusters ({entries * 8 / 2**30:.1f} GiB) is too large (at most {MAX_TABLE_ENTRIES} entries): label ids "
            "size the table, so number the classes compactly 0..M-1 (or pass fewer images per call)")


def _valid_ref_mask(ref: np.ndarray, pred: np.ndarray, num_pred: int, num_ref: int, ignore_label) -> np.ndarray:
    """Mask of counted pixels; raises on labels that are neither in range nor ignored."""
    keep = np.ones(ref.shape, bool) if ignore_label is None else ref != int(ignore_label)
    r, p = ref[keep], pred[keep]
    if r.size:
        if r.min() < 0 or r.max() >= num_ref:
            bad = np.unique(r[(r < 0) | (r >= num_ref)])[:10]
            raise ValueError(
                f"reference labels {bad.tolist()} are outside [0, num_ref={num_ref}); raise num_ref, "
                f"or pass ignore_label=<value> to skip such pixels (ignore_label is {ignore_label})"
            )
        if p.min() < 0 or p.max() >= num_pred:
            bad = np.unique(p[(p < 0) | (p >= num_pred)])[:10]
            raise ValueError(
                f"predicted labels {bad.tolist()} are outside [0, num_pred={num_pred}); "
                "pass the number of clusters of the model as num_pred"
            )
    return keep


def contingency(pred, ref, num_pred: int, num_ref: int, *, per_image: bool = False, ignore_label=None) -> np.ndarray:
    """Contingency table of reference classes against predicted clusters (numpy, on host).

    ``table[m, k] = #{pixels : ref == m and pred == k}``, computed by one
    ``bincount`` of ``ref * num_pred + pred``.

    Args:
        pred: ``[N, H, W]`` (or any shape, e.g. ``[n]``) int predicted cluster ids in ``[0, num_pred)``.
        ref: int reference labels, same shape as ``pred``, in ``[0, num_ref)`` or equal to ``ignore_label``.
        num_pred: number of predicted clusters K.
        num_ref: number of reference classes M.
        per_image: return one table per leading index (image) ``[N, M, K]``.
        ignore_label: reference value whose pixels are not counted (e.g. 255 or -1).

    Returns:
        ``[M, K]`` int64, or ``[N, M, K]`` int64 when ``per_image``.

    Raises:
        ValueError: shapes differ, or labels are out of range and not ignored.
    """
    _check_counts(num_pred, num_ref)
    pred = _as_int_labels(pred, "pred")
    ref = _as_int_labels(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    M, K = int(num_ref), int(num_pred)
    if per_image and pred.ndim >= 1:
        _check_counts(num_pred, num_ref, pred.shape[0])
    keep = _valid_ref_mask(ref, pred, K, M, ignore_label)
    if per_image:
        if pred.ndim < 1:
            raise ValueError("per_image=True needs label maps with a leading image axis [N, ...]")
        n = pred.shape[0]
        img = np.broadcast_to(np.arange(n, dtype=np.int64).reshape((n,) + (1,) * (pred.ndim - 1)), pred.shape)
        codes = (img[keep] * M + ref[keep]) * K + pred[keep]
        return np.bincount(codes, minlength=n * M * K).astype(np.int64).reshape(n, M, K)
    codes = ref[keep] * K + pred[keep]
    return np.bincount(codes, minlength=M * K).astype(np.int64).reshape(M, K)


def _device_codes(pred, ref, num_pred, num_ref, ignore_label, per_image):
    """Flat bin codes (``L`` for dropped pixels) and the number of out-of-range pixels."""
    M, K = num_ref, num_pred
    n = pred.shape[0] if per_image else 1
    L = n * M * K
    pred = pred.astype(jnp.int32)
    ref = ref.astype(jnp.int32)
    ignored = jnp.zeros(ref.shape, bool) if ignore_label is None else ref == ignore_label
    in_range = (ref >= 0) & (ref < M) & (pred >= 0) & (pred < K)
    bad = jnp.sum(~ignored & ~in_range)
    code = ref * K + pred
    if per_image:
        img = jnp.arange(n, dtype=jnp.int32).reshape((n,) + (1,) * (pred.ndim - 1))
        code = code + img * (M * K)
    code = jnp.where(in_range & ~ignored, code, L)
    return code.reshape(-1), bad, L


def _device_table(pred, ref, *, num_pred, num_ref, ignore_label, per_image, mesh, layout):
    codes, bad, L = _device_codes(pred, ref, num_pred, num_ref, ignore_label, per_image)

    def count(c):  # one chunk of codes -> [L + 1] counts (last bin: dropped pixels)
        return jnp.zeros((L + 1,), jnp.int32).at[c].add(1)

    if mesh is None:
        return count(codes)[:L], bad

    codes = jnp.pad(codes, (0, layout.padded_rows - codes.shape[0]), constant_values=L)
    codes = jax.lax.with_sharding_constraint(codes, sharding.row_sharding(mesh))
    return sharding.row_reduce(count, mesh, layout, (codes,))[:L], bad


_device_table_jit = None


def contingency_device(
    pred, ref, num_pred: int, num_ref: int, *, per_image: bool = False, ignore_label=None, mesh=None
) -> np.ndarray:
    """:func:`contingency` computed with JAX (jit; scatter-add), optionally row-sharded over ``mesh``.

    Pixels are flattened and counted chunk by chunk with
    :func:`gansem.sharding.row_reduce`, so the counts are the same on any number
    of devices. Counts are int32 on the device (so one call may hold at most
    2**31 - 1 pixels) and returned as int64 on the host; accumulate many calls
    with :class:`ContingencyAccumulator`.

    Args:
        pred, ref, num_pred, num_ref, per_image, ignore_label: as :func:`contingency`.
        mesh: optional mesh from :func:`gansem.sharding.make_mesh`; ``None`` counts on
            the default device.

    Returns:
        ``[M, K]`` (or ``[N, M, K]``) int64 numpy array.
    """
    global _device_table_jit
    _check_counts(num_pred, num_ref)
    pred = jnp.asarray(pred)
    ref = jnp.asarray(ref)
    for name, a in (("pred", pred), ("ref", ref)):
        if not (jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_):
            raise TypeError(f"{name} must hold integer labels, got dtype {a.dtype}")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    if pred.size > _INT32_MAX:
        raise ValueError(f"{pred.size} pixels in one call overflow int32 counts; pass fewer images per call")
    if per_image and pred.ndim < 1:
        raise ValueError("per_image=True needs label maps with a leading image axis [N, ...]")
    n = pred.shape[0] if per_image else 1
    _check_counts(num_pred, num_ref, n)
    layout = None
    if mesh is not None:
        layout = sharding.plan_rows(max(int(pred.size), 1), mesh.devices.size)
    if _device_table_jit is None:
        _device_table_jit = jax.jit(
            _device_table, static_argnames=("num_pred", "num_ref", "ignore_label", "per_image", "mesh", "layout")
        )
    table, bad = _device_table_jit(
        pred,
        ref,
        num_pred=int(num_pred),
        num_ref=int(num_ref),
        ignore_label=None if ignore_label is None else int(ignore_label),
        per_image=bool(per_image),
        mesh=mesh,
        layout=layout,
    )
    if int(bad):
        # Re-run the host check for a precise message.
        ref_h, pred_h = np.asarray(ref).astype(np.int64), np.asarray(pred).astype(np.int64)
        _valid_ref_mask(ref_h, pred_h, num_pred, num_ref, ignore_label)
        raise ValueError(f"{int(bad)} pixels have labels out of range")  # pragma: no cover
    shape = (n, num_ref, num_pred) if per_image else (num_ref, num_pred)
    return np.asarray(table).astype(np.int64).reshape(shape)


class ContingencyAccumulator:
    """Streams batches of label maps into a dataset-level contingency table.

    Args:
        num_pred: number of predicted clusters K.
        num_ref: number of reference classes M.
        ignore_label: reference value whose pixels are skipped (e.g. 255 or -1).
        keep_per_image: also keep one ``[M, K]`` table per image (needed for the
            per-image mIoU of the original KLiSH evaluation); host memory
            ``8 * N * M * K`` bytes.
        backend: ``"numpy"`` (host bincount) or ``"jax"`` (:func:`contingency_device`).
        mesh: with ``backend="jax"``, shard the counting over this mesh.
        grow_ref: the number of reference classes is not known in advance: ``num_ref`` is a
            lower bound that grows to (largest reference label seen) + 1, earlier tables
            gaining zero rows (reference labels streamed from a labeller).

    Attributes:
        table: ``[M, K]`` int64 counts over every image seen so far.
        per_image_tables: ``[N, M, K]`` int64 (only with ``keep_per_image``).
        num_images: images seen.
        num_ignored: pixels skipped because their reference was ``ignore_label``.
    """

    def __init__(
        self,
        num_pred: int,
        num_ref: int,
        *,
        ignore_label=None,
        keep_per_image: bool = False,
        backend: str = "numpy",
        mesh=None,
        grow_ref: bool = False,
    ):
        _check_counts(num_pred, num_ref)
        if backend not in ("numpy", "jax"):
            raise ValueError(f"backend must be 'numpy' or 'jax', got {backend!r}")
        if mesh is not None and backend != "jax":
            raise ValueError("a mesh is only used with backend='jax'")
        self.num_pred = int(num_pred)
        self.num_ref = int(num_ref)
        self.ignore_label = ignore_label
        self.keep_per_image = bool(keep_per_image)
        self.backend = backend
        self.mesh = mesh
        self.grow_ref = bool(grow_ref)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.table = np.zeros((self.num_ref, self.num_pred), np.int64)
        self._per_image: list[np.ndarray] = []
        self.num_images = 0
        self.num_ignored = 0

    def update(self, pred, ref) -> None:
        """Add a batch ``pred, ref: [B, H, W]`` int (or one image ``[H, W]``)."""
        p_shape = np.shape(pred)
        if len(p_shape) == 2:
            pred, ref = pred[None], ref[None]
        elif len(p_shape) != 3:
            raise ValueError(f"update expects label maps [B, H, W] or [H, W], got shape {p_shape}")
        if self.grow_ref:
            self._grow(ref)
        fn = contingency if self.backend == "numpy" else contingency_device
        kw = {} if self.backend == "numpy" else {"mesh": self.mesh}
        t = fn(
            pred, ref, self.num_pred, self.num_ref,
            per_image=self.keep_per_image, ignore_label=self.ignore_label, **kw,
        )
        batch_total = t.sum(axis=0) if self.keep_per_image else t
        if self.keep_per_image:
            self._per_image.append(t)
        self.table += batch_total
        self.num_images += int(np.shape(pred)[0])
        self.num_ignored += int(np.prod(np.shape(pred))) - int(batch_total.sum())

    def _grow(self, ref) -> None:
        """Add zero rows so that every kept reference label of ``ref`` has one."""
        r = np.asarray(ref)
        if self.ignore_label is not None:
            r = r[r != self.ignore_label]
        if r.size == 0:
            return
        m = int(r.max()) + 1
        if m <= self.num_ref:
            return
        _check_counts(self.num_pred, m)
        extra = m - self.num_ref
        self.table = np.pad(self.table, ((0, extra), (0, 0)))
        self._per_image = [np.pad(t, ((0, 0), (0, extra), (0, 0))) for t in self._per_image]
        self.num_ref = m

    @property
    def per_image_tables(self) -> np.ndarray:
        if not self.keep_per_image:
            raise ValueError("per-image tables were not kept; create the accumulator with keep_per_image=True")
        if not self._per_image:
            return np.zeros((0, self.num_ref, self.num_pred), np.int64)
        if len(self._per_image) > 1:
            self._per_image = [np.concatenate(self._per_image, axis=0)]
        return self._per_image[0]


# =====================================================================================
# Pair counting and information-theoretic scores
# =====================================================================================


def _as_table(table, name: str = "table") -> np.ndarray:
    """``[M, K]`` int64 table (a ``[N, M, K]`` stack is summed over images)."""
    t = np.asarray(table)
    if t.ndim == 3:
        t = t.sum(axis=0)
    if t.ndim != 2:
        raise ValueError(f"{name} must be [M, K] (or per-image [N, M, K]), got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.isfinite(t)) or np.any(np.mod(t, 1) != 0):
            raise ValueError(f"{name} must hold integer counts, got non-integer values (dtype {t.dtype})")
    t = t.astype(np.int64)
    if t.size and t.min() < 0:
        raise ValueError(f"{name} holds negative counts")
    return t


def _nonempty(t: np.ndarray):
    """Row/column sums with empty classes/clusters removed (they carry no information)."""
    a = t.sum(axis=1)
    b = t.sum(axis=0)
    return t[a > 0][:, b > 0], a[a > 0], b[b > 0]


def adjusted_rand_index(table) -> float:
    """Adjusted Rand index (Hubert & Arabie) of a contingency table.

    Computed from the pair-confusion counts in exact integer arithmetic, so it is
    exact for any number of pixels; equals ``sklearn.metrics.adjusted_rand_score``.

    Args:
        table: ``[M, K]`` int counts (or ``[N, M, K]``, summed over images).

    Returns:
        ARI in ``[-0.5, 1]``; 1.0 for identical partitions (and for empty input).
    """
    t = _as_table(table)
    n = int(t.sum())
    sum_sq = int(sum(int(v) * int(v) for v in t[t > 0]))
    sum_a2 = int(sum(int(v) * int(v) for v in t.sum(axis=1)))
    sum_b2 = int(sum(int(v) * int(v) for v in t.sum(axis=0)))
    # Ordered pair counts: tp same-same, fp same-pred/diff-ref, fn diff-pred/same-ref.
    tp = sum_sq - n
    fp = sum_b2 - sum_sq
    fn = sum_a2 - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return float(2 * (tp * tn - fn * fp)) / float((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    n = counts.sum()
    return float(-np.sum((counts / n) * (np.log(counts) - math.log(n))))


def mutual_info(table) -> float:
    """Mutual information (nats) between the reference and predicted partitions."""
    t, a, b = _nonempty(_as_table(table))
    if a.size <= 1 or b.size <= 1:
        return 0.0
    n = float(t.sum())
    i, j = np.nonzero(t)
    v = t[i, j].astype(np.float64)
    outer = a[i].astype(np.float64) * b[j].astype(np.float64)
    mi = (v / n) * (np.log(v) - math.log(n)) + (v / n) * (-np.log(outer) + 2.0 * math.log(n))
    mi = np.where(np.abs(mi) < _EPS, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def normalized_mutual_info(table) -> float:
    """NMI with arithmetic normalisation ``MI / ((H(ref) + H(pred)) / 2)`` (sklearn's default).

    Args:
        table: ``[M, K]`` int counts (or ``[N, M, K]``).

    Returns:
        NMI in ``[0, 1]``; 1.0 when both partitions have a single (or no) class.
    """
    t, a, b = _nonempty(_as_table(table))
    if a.size == b.size and a.size <= 1:
        return 1.0
    mi = mutual_info(t)
    if mi == 0:
        return 0.0
    return float(mi / ((_entropy(a) + _entropy(b)) / 2.0))


# -- expected mutual information ------------------------------------------------------


class ExpectedMutualInfo(NamedTuple):
    """Result of :func:`expected_mutual_info`: EMI (nats), truncation error bound, terms, method."""

    value: float
    error_bound: float
    work: int
    method: str


def _emi_sum(a: np.ndarray, b: np.ndarray, n: int, lo: np.ndarray, hi: np.ndarray, chunk: int) -> float:
    """``sum_pairs sum_{x=lo}^{hi} P(x) f(x)`` with P the hypergeometric pmf renormalised on [lo, hi].

    ``f(x) = x/N log(N x / (a b))``. Consecutive log-probabilities come from the
    ratio ``P(x+1)/P(x) = (a-x)(b-x) / ((x+1)(N-a-b+x+1))`` (all factors O(1), so no
    cancellation between huge log-factorials); every window is cut into pieces of at
    most ``chunk`` terms that are combined with a streaming log-sum-exp.
    """
    lengths = hi - lo + 1
    # Cut windows into pieces of <= chunk terms.
    n_pieces = -(-lengths // chunk)
    pair = np.repeat(np.arange(a.size), n_pieces)
    first = np.cumsum(n_pieces) - n_pieces
    piece_idx = np.arange(pair.size) - np.repeat(first, n_pieces)
    p_lo = lo[pair] + piece_idx * chunk
    p_hi = np.minimum(p_lo + chunk - 1, hi[pair])
    p_len = p_hi - p_lo + 1
    num = p_len.size
    p_max = np.empty(num)
    p_sw = np.empty(num)
    p_swf = np.empty(num)
    p_total = np.empty(num)  # sum of log-ratios from p_lo to the first term of the next piece
    log_n = math.log(n)
    # Group pieces into batches of about `chunk` terms.
    ends = np.cumsum(p_len)
    batch_of = (ends - 1) // chunk
    bounds = np.flatnonzero(np.diff(batch_of)) + 1
    starts_b = np.concatenate([[0], bounds])
    stops_b = np.concatenate([bounds, [num]])
    for s, e in zip(starts_b, stops_b):
        lens = p_len[s:e]
        seg = np.repeat(np.arange(e - s), lens)
        seg_start = np.cumsum(lens) - lens
        off = np.arange(int(lens.sum())) - np.repeat(seg_start, lens)
        x = (np.repeat(p_lo[s:e], lens) + off).astype(np.float64)
        aa = a[pair[s:e]][seg].astype(np.float64)
        bb = b[pair[s:e]][seg].astype(np.float64)
        last = np.repeat(hi[pair[s:e]], lens)
        has_next = (np.repeat(p_lo[s:e], lens) + off) < last
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log(aa - x) + np.log(bb - x) - np.log(x + 1.0) - np.log(n - aa - bb + x + 1.0)
        r = np.where(has_next, r, 0.0)
        # Exclusive cumulative sum within each piece: log P(x) - log P(piece start).
        cs = np.cumsum(r)
        incl_at_start = cs[seg_start] - r[seg_start]
        logw = cs - r - np.repeat(incl_at_start, lens)
        p_total[s:e] = np.add.reduceat(r, seg_start)
        mx = np.maximum.reduceat(logw, seg_start)
        w = np.exp(logw - np.repeat(mx, lens))
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(x > 0, (x / n) * (log_n + np.log(x) - np.log(aa) - np.log(bb)), 0.0)
        p_max[s:e] = mx
        p_sw[s:e] = np.add.reduceat(w, seg_start)
        p_swf[s:e] = np.add.reduceat(w * f, seg_start)
    # Combine the pieces of each pair (in order) with their log offsets.
    pair_first = np.repeat(first, n_pieces)
    cs_total = np.cumsum(p_total)
    offset = cs_total - p_total - (cs_total[pair_first] - p_total[pair_first])
    top = offset + p_max
    pair_top = np.maximum.reduceat(top, first)
    scale = np.exp(top - pair_top[pair])
    sw = np.add.reduceat(p_sw * scale, first)
    swf = np.add.reduceat(p_swf * scale, first)
    return float(np.sum(swf / sw))


def expected_mutual_info(
    table, *, method: str = "auto", tol: float = 1e-12, exact_work_limit: int = 10_000_000, chunk: int = 1 << 20
) -> ExpectedMutualInfo:
    """Expected mutual information E[MI] under the permutation (hypergeometric) model.

    ``EMI = sum_ij sum_x P_ij(x) x/N log(N x / (a_i b_j))`` with ``P_ij`` the
    hypergeometric pmf of the overlap of class i (``a_i`` pixels) and cluster j
    (``b_j`` pixels) among ``N`` pixels (Vinh, Epps & Bailey 2010).

    Args:
        table: ``[M, K]`` int counts.
        method: ``"exact"`` sums over the whole support ``max(0, a+b-N) .. min(a, b)``
            (work ``sum_ij min(a_i, b_j)``, as scikit-learn does); ``"truncated"``
            sums over a window ``mu +- d`` around the mean ``mu = a b / N``, with
            ``d`` from Bernstein's inequality (valid for the hypergeometric by
            Hoeffding's 1963 comparison with the binomial) so that the omitted
            probability mass of each pair is at most ``exp(-L)`` per side; the
            returned ``error_bound`` (a rigorous bound on the truncation error,
            not counting float64 rounding) is at most ``tol``. Work is
            ``O(sum_ij sqrt(L a_i b_j / N)) <= O(sqrt(L M K N))`` instead of
            ``O(sum_ij min(a_i, b_j))``: about 3e7 terms for a
            15 x 100 table of 2.6e9 pixels. ``"auto"``: exact when its work is at most
            ``exact_work_limit`` terms, truncated otherwise.
        tol: target bound on the truncation error of ``"truncated"``.
        exact_work_limit: largest exact work (terms) ``"auto"`` accepts.
        chunk: terms evaluated per vectorised batch (bounds memory).

    Returns:
        ``(value, error_bound, work, method)``; ``work`` is the number of terms
        evaluated, ``method`` the one used (``"exact"`` or ``"truncated"``).
    """
    t, a, b = _nonempty(_as_table(table))
    n = int(t.sum())
    if a.size == 0 or b.size == 0:
        return ExpectedMutualInfo(0.0, 0.0, 0, "exact")
    A = np.repeat(a, b.size).astype(np.int64)
    B = np.tile(b, a.size).astype(np.int64)
    sup_lo = np.maximum(0, A + B - n)
    sup_hi = np.minimum(A, B)
    exact_work = int(np.sum(sup_hi - sup_lo + 1))
    if method == "auto":
        method = "exact" if exact_work <= exact_work_limit else "truncated"
    if method == "exact":
        return ExpectedMutualInfo(_emi_sum(A, B, n, sup_lo, sup_hi, chunk), 0.0, exact_work, "exact")
    if method != "truncated":
        raise ValueError(f"EMI method must be 'auto', 'exact' or 'truncated', got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    Af, Bf = A.astype(np.float64), B.astype(np.float64)
    # |f(x)| <= min(a,b)/N * max(|log(N/(ab))|, |log(N/max(a,b))|) for 1 <= x <= min(a,b).
    f_max = (np.minimum(Af, Bf) / n) * np.maximum(
        np.abs(math.log(n) - np.log(Af) - np.log(Bf)), np.abs(math.log(n) - np.log(np.maximum(Af, Bf)))
    )
    L = max(1.0, math.log(8.0 * max(float(f_max.sum()), 1e-300) / tol))
    mu = Af * Bf / n
    var = mu * (1.0 - np.maximum(Af, Bf) / n)  # variance of the smaller of the two dominating binomials
    d = L / 3.0 + np.sqrt(L * L / 9.0 + 2.0 * var * L)
    lo = np.maximum(sup_lo, np.ceil(mu - d).astype(np.int64))
    hi = np.minimum(sup_hi, np.floor(mu + d).astype(np.int64))
    lo = np.minimum(lo, hi)
    tail = math.exp(-L) * ((lo > sup_lo).astype(np.float64) + (hi < sup_hi).astype(np.float64))
    # Omitted terms contribute <= tail * f_max; renormalising the window by its mass S >= 1 - tail
    # changes the kept part by <= tail / (1 - tail) * f_max.
    bound = float(np.sum(tail * f_max * (1.0 + 1.0 / (1.0 - tail))))
    work = int(np.sum(hi - lo + 1))
    return ExpectedMutualInfo(_emi_sum(A, B, n, lo, hi, chunk), bound, work, "truncated")


class AdjustedMutualInfo(NamedTuple):
    """Result of :func:`adjusted_mutual_info`.

    Attributes:
        ami: adjusted mutual information (arithmetic normalisation).
        mutual_info: MI (nats) of the table that was scored.
        expected_mutual_info: EMI (nats) of that table.
        method: ``"exact"``, ``"truncated"`` or ``"scaled"`` -- what was used.
        emi_error_bound: rigorous bound on the EMI truncation error (0 for exact;
            float64 rounding, ~1e-12 relative, not included). ``nan`` for
            ``"scaled"``, which scores a different (coarsened) table.
        ami_error_bound: the corresponding bound on ``ami`` (first order in the EMI error).
        scale: the divisor applied to the counts (1 unless ``"scaled"``).
        work: number of hypergeometric terms evaluated.
    """

    ami: float
    mutual_info: float
    expected_mutual_info: float
    method: str
    emi_error_bound: float
    ami_error_bound: float
    scale: int
    work: int


def adjusted_mutual_info(
    table,
    *,
    method: str = "auto",
    tol: float = 1e-12,
    exact_work_limit: int = 10_000_000,
    scale: int = 1000,
) -> AdjustedMutualInfo:
    """Adjusted mutual information ``(MI - E[MI]) / (mean(H_ref, H_pred) - E[MI])`` (KLiSH Sec. 4.3).

    Equals ``sklearn.metrics.adjusted_mutual_info_score`` (arithmetic
    normalisation) on the same pixels. The expected MI is the expensive part:
    its textbook sum has ``sum_ij min(a_i, b_j)`` terms, billions for a
    10k-image evaluation. Methods:

    * ``"exact"``: the full sum (what scikit-learn computes).
    * ``"truncated"``: the sum restricted to a Bernstein window around the mean
      of each hypergeometric overlap; the omitted probability is bounded, and
      the resulting EMI error bound (``<= tol``, default 1e-12) is reported.
      Exact to float64 precision in practice, at a cost growing like the square
      root of the number of pixels (see :func:`expected_mutual_info`).
    * ``"auto"`` (default): exact when its work is at most ``exact_work_limit``
      terms, truncated otherwise. The result says which was used.
    * ``"scaled"``: what the original KLiSH evaluation did -- divide the counts
      by ``scale`` (1000), floor, and compute the exact AMI of that coarser
      table. Not an approximation with a bound (it scores different data);
      provided to reproduce the paper's numbers.

    Args:
        table: ``[M, K]`` int counts (or ``[N, M, K]``, summed over images).
        method: ``"auto" | "exact" | "truncated" | "scaled"``.
        tol: truncation error target of ``"truncated"``.
        exact_work_limit: see ``"auto"``.
        scale: divisor of ``"scaled"``.

    Returns:
        :class:`AdjustedMutualInfo` (``.ami`` is the score).
    """
    if method not in ("auto", "exact", "truncated", "scaled"):
        raise ValueError(f"method must be 'auto', 'exact', 'truncated' or 'scaled', got {method!r}")
    t = _as_table(table)
    used_scale = 1
    if method == "scaled":
        if int(scale) < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        used_scale = int(scale)
        t = t // used_scale
    t, a, b = _nonempty(t)
    scaled = used_scale > 1

    def result(ami, mi=0.0, emi=None, ami_bound=0.0):
        emi = emi or ExpectedMutualInfo(0.0, 0.0, 0, "exact")
        return AdjustedMutualInfo(
            ami=float(ami),
            mutual_info=float(mi),
            expected_mutual_info=float(emi.value),
            method="scaled" if scaled else emi.method,
            emi_error_bound=float("nan") if scaled else float(emi.error_bound),
            ami_error_bound=float("nan") if scaled else float(ami_bound),
            scale=used_scale,
            work=int(emi.work),
        )

    # Special cases as scikit-learn: no split on either side is a perfect match; one side
    # unsplit gives 0.
    if a.size == b.size and a.size <= 1:
        return result(1.0)
    if a.size == 1 or b.size == 1:
        return result(0.0)
    mi = mutual_info(t)
    emi = expected_mutual_info(
        t, method="exact" if scaled else method, tol=tol, exact_work_limit=exact_work_limit
    )
    normalizer = (_entropy(a) + _entropy(b)) / 2.0
    denominator = normalizer - emi.value
    denominator = min(denominator, -_EPS) if denominator < 0 else max(denominator, _EPS)
    numerator = mi - emi.value
    numerator = min(numerator, -_EPS) if numerator < 0 else max(numerator, _EPS)
    # |d AMI / d EMI| = |normalizer - MI| / (normalizer - EMI)^2, bounded over the error interval.
    slack = abs(denominator) - emi.error_bound
    ami_bound = (
        emi.error_bound * (abs(normalizer - mi) + emi.error_bound) / slack**2 if slack > 0 else float("inf")
    )
    return result(numerator / denominator, mi, emi, ami_bound)


# =====================================================================================
# Greedy maximum-matching mIoU (KLiSH Eq. 6-7, Algorithm 2)
# =====================================================================================


class GreedyMatching(NamedTuple):
    """Result of :func:`greedy_matching_miou`.

    Attributes:
        miou: ``J(a) / M`` (Eq. 6), classes with an empty union counting 0.
        assignment: ``[K]`` int64, the class each cluster is matched to (``-1``: unmatched).
        per_class_iou: ``[M]`` float64 IoU of each class after matching (``nan`` where undefined:
            empty union, or for per-image averaging no image with a non-empty union).
        average: ``"dataset"`` or ``"image"``.
    """

    miou: float
    assignment: np.ndarray
    per_class_iou: np.ndarray
    average: str


def _tables_for(table, average: Optional[str]):
    t = np.asarray(table)
    if t.ndim not in (2, 3):
        raise ValueError(f"table must be [M, K] or per-image [N, M, K], got shape {t.shape}")
    if average is None:
        average = "image" if t.ndim == 3 else "dataset"
    if average not in ("dataset", "image"):
        raise ValueError(f"average must be 'dataset' or 'image', got {average!r}")
    if average == "image" and t.ndim != 3:
        raise ValueError(
            "average='image' needs per-image tables [N, M, K] (ContingencyAccumulator(keep_per_image=True))"
        )
    t = t.astype(np.float64)
    if t.size and (t.min() < 0 or not np.all(np.isfinite(t))):
        raise ValueError("table must hold finite non-negative counts")
    if t.ndim == 2 or average == "dataset":
        t = t.reshape((-1,) + t.shape[-2:]).sum(axis=0, keepdims=True)
    return t, average  # [N', M, K] with N' = 1 for dataset averaging


def _iou_from_parts(inter, pred, gt, axis_img: int = 0):
    """Mean over images (axis 0) with a non-empty union; returns (iou_for_J, iou_report)."""
    union = gt + pred - inter
    present = union > 0
    ratio = np.where(present, inter / np.where(present, union, 1.0), 0.0)
    count = present.sum(axis=axis_img)
    total = ratio.sum(axis=axis_img)
    iou = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return iou, np.where(count > 0, iou, np.nan)


def per_class_iou_after_matching(table, assignment, average: Optional[str] = None) -> np.ndarray:
    """IoU of every reference class with the union of the clusters matched to it.

    Args:
        table: ``[M, K]`` or per-image ``[N, M, K]`` counts (reference rows, cluster columns).
        assignment: ``[K]`` int, class of each cluster or ``-1`` for none (e.g. found by
            :func:`greedy_matching_miou` on other images).
        average: ``"dataset"`` (pool pixels over all images, then IoU) or ``"image"``
            (IoU per image, averaged over the images where the union is non-empty);
            default ``"image"`` for per-image tables, ``"dataset"`` for one table.

    Returns:
        ``[M]`` float64; ``nan`` where the IoU is undefined (empty union everywhere).
    """
    t, average = _tables_for(table, average)
    M, K = t.shape[1:]
    assignment = np.asarray(assignment, np.int64)
    if assignment.shape != (K,):
        raise ValueError(f"assignment must have shape [K]=({K},), got {assignment.shape}")
    if assignment.size and (assignment.min() < -1 or assignment.max() >= M):
        raise ValueError(f"assignment values must be -1 or class ids in [0, {M})")
    onehot = (assignment[:, None] == np.arange(M)[None, :]).astype(np.float64)  # [K, M]
    inter = np.einsum("nmk,km->nm", t, onehot)  # pixels of class m inside its clusters
    pred = np.einsum("nk,km->nm", t.sum(axis=1), onehot)  # pixels of the clusters matched to m
    gt = t.sum(axis=2)
    return _iou_from_parts(inter, pred, gt)[1]


def greedy_matching_miou(
    table, average: Optional[str] = None, *, assign_all: bool = True
) -> GreedyMatching:
    """Maximum-matching mIoU by greedy search (KLiSH Eq. 6-7, Algorithm 2).

    Clusters are matched many-to-one to reference classes: starting from no
    assignment, each step commits the (cluster, class) pair that maximises
    ``J(a) = sum_m IoU(Y_m, U_{k: a_k = m} C_k)`` (equivalently the mean IoU over
    all ``M`` classes), until every cluster is assigned (Algorithm 2 runs K steps,
    even when the best step lowers J). Ties go to the first pair in (class,
    cluster) order.

    IoU averaging -- the paper's Eq. 7 writes one IoU per class; the original
    evaluation code (``find_label_permutation`` in AtlantixJJ/KLiSH) computes, for
    each class, the IoU in every image and averages it over the images where the
    union is non-empty, then takes the mean over all classes. That is
    ``average="image"``, the default for per-image tables ``[N, M, K]``.
    ``average="dataset"`` pools the pixels of all images into one table first
    (the default, and the only option, for a single ``[M, K]`` table).

    Cost: the gain of every candidate pair is kept in an ``[M, K]`` array; after a
    commit only the chosen class's row changes, so a step costs ``O(N K)`` (``N``
    images) after an ``O(N M K)`` start -- no pixels are touched.

    Args:
        table: ``[M, K]`` or ``[N, M, K]`` counts (reference classes x predicted clusters).
        average: ``"image"`` or ``"dataset"`` (see above).
        assign_all: ``True`` follows Algorithm 2. ``False`` stops as soon as the best
            remaining step does not increase J, leaving the other clusters unmatched
            (``-1``; ``a_k = 0`` in Eq. 6).

    Returns:
        :class:`GreedyMatching` ``(miou, assignment [K], per_class_iou [M], average)``.
    """
    t, average = _tables_for(table, average)
    N, M, K = t.shape
    col = t.sum(axis=1)  # [N, K] cluster sizes
    gt = t.sum(axis=2)  # [N, M] class sizes
    inter = np.zeros((N, M))
    pred = np.zeros((N, M))
    cur_iou = _iou_from_parts(inter, pred, gt)[0]  # [M]

    def candidate_iou(m_idx):  # IoU of classes m_idx after adding each cluster: [len(m_idx), K]
        i = inter[:, m_idx, None] + t[:, m_idx, :]
        p = pred[:, m_idx, None] + col[:, None, :]
        return _iou_from_parts(i, p, gt[:, m_idx, None])[0]

    gains = candidate_iou(np.arange(M)) - cur_iou[:, None]  # [M, K]
    assignment = np.full(K, -1, np.int64)
    for _ in range(K):
        flat = int(np.argmax(gains))
        m, k = divmod(flat, K)
        if not np.isfinite(gains[m, k]) or (not assign_all and gains[m, k] <= 0):
            break
        assignment[k] = m
        inter[:, m] += t[:, m, k]
        pred[:, m] += col[:, k]
        cur_iou[m] = _iou_from_parts(inter[:, m], pred[:, m], gt[:, m])[0]
        gains[:, k] = -np.inf
        free = assignment < 0
        row = candidate_iou(np.array([m]))[0] - cur_iou[m]
        gains[m, free] = row[free]
    per_class = per_class_iou_after_matching(table, assignment, average)
    miou = float(np.nansum(per_class) / M) if M else float("nan")
    return GreedyMatching(miou, assignment, per_class, average)


class ClusteringScores(NamedTuple):
    """All clustering scores of the KLiSH evaluation for one table."""

    ari: float
    ami: float
    nmi: float
    miou: float
    assignment: np.ndarray
    per_class_iou: np.ndarray
    ami_method: str


def clustering_scores(table, *, average: Optional[str] = None, ami_method: str = "auto") -> ClusteringScores:
    """ARI, AMI, NMI (dataset-level table) and greedy mIoU (``average`` as in :func:`greedy_matching_miou`).

    Args:
        table: ``[M, K]`` or per-image ``[N, M, K]`` counts.
        average: mIoU averaging; default per-image for ``[N, M, K]`` (as the original evaluation).
        ami_method: passed to :func:`adjusted_mutual_info`.
    """
    t = np.asarray(table)
    total = t.sum(axis=0) if t.ndim == 3 else t
    ami = adjusted_mutual_info(total, method=ami_method)
    match = greedy_matching_miou(t, average)
    return ClusteringScores(
        adjusted_rand_index(total), ami.ami, normalized_mutual_info(total), match.miou,
        match.assignment, match.per_class_iou, ami.method,
    )


# =====================================================================================
# Foreground / background metrics
# =====================================================================================


class BinaryMetrics(NamedTuple):
    """Foreground/background segmentation scores (Labels4Free Tab. 1; Melas-Kyriazi et al. Acc/IoU).

    ``iou_fg = TP/(TP+FP+FN)``, ``iou_bg = TN/(TN+FN+FP)``, ``miou`` their mean,
    ``precision = TP/(TP+FP)``, ``recall = TP/(TP+FN)``, ``f1 = 2TP/(2TP+FP+FN)``,
    ``accuracy = (TP+TN)/total``.
    """

    iou_fg: float
    iou_bg: float
    miou: float
    f1: float
    precision: float
    recall: float
    accuracy: float


def binary_metrics_from_tables(tables, average: str = "dataset") -> BinaryMetrics:
    """Fg/bg metrics from 2x2 contingency tables (rows: reference bg/fg, columns: prediction bg/fg).

    Args:
        tables: ``[2, 2]`` or per-image ``[N, 2, 2]`` int counts.
        average: ``"dataset"`` pools the pixels of all images, then computes each score
            (what ``sklearn.metrics.*_score`` on the flattened masks gives);
            ``"image"`` computes each score per image and averages over the images
            where it is defined (non-zero denominator).

    Returns:
        :class:`BinaryMetrics`; a score with a zero denominator everywhere is ``nan``.
    """
    t = np.asarray(tables, np.float64)
    if t.shape[-2:] != (2, 2) or t.ndim not in (2, 3):
        raise ValueError(f"tables must be [2, 2] or [N, 2, 2], got shape {t.shape}")
    if average not in ("dataset", "image"):
        raise ValueError(f"average must be 'dataset' or 'image', got {average!r}")
    t = t.reshape(-1, 2, 2)
    if average == "dataset":
        t = t.sum(axis=0, keepdims=True)
    tn, fp, fn, tp = t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1]

    def ratio(num, den):
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        return float(np.nanmean(v)) if np.any(den > 0) else float("nan")

    iou_fg = ratio(tp, tp + fp + fn)
    iou_bg = ratio(tn, tn + fp + fn)
    if average == "dataset":
        miou = (iou_fg + iou_bg) / 2.0
    else:  # per image: mean of the classes defined in that image, averaged over images
        with np.errstate(divide="ignore", invalid="ignore"):
            fg = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
            bg = np.where(tn + fp + fn > 0, tn / (tn + fp + fn), np.nan)
        both = np.stack([fg, bg])
        defined = np.any(np.isfinite(both), axis=0)
        per = np.where(defined, np.nansum(both, axis=0) / np.maximum(np.isfinite(both).sum(axis=0), 1), np.nan)
        miou = float(np.nanmean(per)) if np.any(defined) else float("nan")
    return BinaryMetrics(
        iou_fg=iou_fg,
        iou_bg=iou_bg,
        miou=miou,
        f1=ratio(2 * tp, 2 * tp + fp + fn),
        precision=ratio(tp, tp + fp),
        recall=ratio(tp, tp + fn),
        accuracy=ratio(tp + tn, tp + tn + fp + fn),
    )


def _binary(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != bool:
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be a boolean/0-1 integer mask, got dtype {a.dtype}; threshold scores first")
    return a


def binary_segmentation_metrics(
    pred, ref, *, average: str = "dataset", ignore_label=None, images_per_chunk: int = 64
) -> BinaryMetrics:
    """Fg/bg IoU, mIoU, F1, precision, recall and accuracy of binary masks.

    Args:
        pred: ``[N, H, W]`` (or ``[H, W]``) bool / {0, 1} predicted foreground mask.
        ref: same shape, reference mask, {0, 1} or ``ignore_label``.
        average: ``"dataset"`` (default; pixels pooled over the dataset, like the scikit-learn
            scores on flattened masks) or ``"image"`` (mean over images of per-image scores,
            as the Melas-Kyriazi et al. code does for Acc and IoU); see
            :func:`binary_metrics_from_tables`.
        ignore_label: reference value to skip (e.g. 255).
        images_per_chunk: images counted at a time (bounds memory).

    Returns:
        :class:`BinaryMetrics`.
    """
    p, r = _binary(pred, "pred"), _binary(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}")
    if p.ndim == 2:
        p, r = p[None], r[None]
    tables = [
        contingency(
            p[i : i + images_per_chunk], r[i : i + images_per_chunk], 2, 2,
            per_image=True, ignore_label=ignore_label,
        )
        for i in range(0, p.shape[0], images_per_chunk)
    ]
    return binary_metrics_from_tables(np.concatenate(tables, axis=0), average)


class MaxFBeta(NamedTuple):
    """Result of :func:`max_f_beta`.

    Attributes:
        max_f_beta: the largest F-beta over thresholds.
        threshold: the threshold attaining it.
        thresholds: ``[T]`` thresholds (mask = score > threshold).
        f_beta: ``[T]`` F-beta at each threshold.
        precision, recall: ``[T]`` at each threshold (image means or pooled, as ``average``).
    """

    max_f_beta: float
    threshold: float
    thresholds: np.ndarray
    f_beta: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def max_f_beta(
    scores,
    ref,
    *,
    beta2: float = 0.3,
    thresholds: Union[int, Sequence[float], np.ndarray] = 255,
    average: str = "image",
    ignore_label=None,
    images_per_chunk: int = 64,
) -> MaxFBeta:
    """maxFβ: the best F-beta over binarisation thresholds (Melas-Kyriazi et al. 2022, Sec. 4.2, β² = 0.3).

    ``F_beta = (1 + β²) P R / (β² P + R)`` with the mask ``score > threshold``.
    With ``average="image"`` (default, as the authors' evaluation code) precision
    and recall are computed per image (precision = 1 when nothing is predicted,
    recall = 1 when the reference is empty), F-beta per image (0 when P = R = 0),
    then averaged over images at each threshold; the maximum over thresholds is
    returned. ``average="dataset"`` pools TP/FP/FN over all pixels per threshold.

    Args:
        scores: ``[N, H, W]`` (or ``[H, W]``) float soft masks / foreground probabilities.
        ref: same shape, reference {0, 1} mask (or ``ignore_label``).
        beta2: β².
        thresholds: an int ``T`` for the thresholds ``k / T, k = 1 .. T-1`` (the paper's
            "255 uniformly distributed thresholds between 0 and 1" as implemented by the
            authors: ``arange(0, 1, 1/255)`` without 0), or explicit thresholds.
        average: ``"image"`` or ``"dataset"``.
        ignore_label: reference value to skip.
        images_per_chunk: images processed at a time.

    Returns:
        :class:`MaxFBeta`.
    """
    if average not in ("dataset", "image"):
        raise ValueError(f"average must be 'dataset' or 'image', got {average!r}")
    if isinstance(thresholds, (int, np.integer)):
        if thresholds < 2:
            raise ValueError(f"thresholds must be >= 2 when an int, got {thresholds}")
        thr = np.arange(1, int(thresholds), dtype=np.float64) / float(thresholds)
    else:
        thr = np.asarray(thresholds, np.float64).reshape(-1)
        if thr.size == 0 or np.any(np.diff(thr) <= 0):
            raise ValueError("explicit thresholds must be a non-empty strictly increasing sequence")
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        raise TypeError(f"scores must be floating point, got dtype {s.dtype}")
    r = _binary(ref, "ref")
    if s.shape != r.shape:
        raise ValueError(f"scores and ref must have the same shape, got {s.shape} and {r.shape}")
    if s.ndim == 2:
        s, r = s[None], r[None]
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    T = thr.size
    counts = []  # per image: [2 (ref bg/fg), T + 1] histogram of "number of thresholds below the score"
    for i in range(0, s.shape[0], images_per_chunk):
        sc = s[i : i + images_per_chunk].astype(np.float64)
        rc = r[i : i + images_per_chunk].astype(np.int64)
        n = sc.shape[0]
        keep = np.ones(rc.shape, bool) if ignore_label is None else rc != int(ignore_label)
        if np.any((rc[keep] < 0) | (rc[keep] > 1)):
            raise ValueError("ref must be a 0/1 mask (pass ignore_label for other values)")
        pos = np.searchsorted(thr, sc, side="left")  # thresholds strictly below the score
        img = np.broadcast_to(np.arange(n).reshape(n, 1, 1), sc.shape)
        code = (img[keep] * 2 + rc[keep]) * (T + 1) + pos[keep]
        counts.append(np.bincount(code, minlength=n * 2 * (T + 1)).reshape(n, 2, T + 1))
    h = np.concatenate(counts, axis=0).astype(np.float64)
    # Positives at threshold j: pixels with more than j thresholds below their score.
    above = np.cumsum(h[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # [N, 2, T]
    fp, tp = above[:, 0], above[:, 1]
    gt_pos = h[:, 1].sum(axis=-1, keepdims=True)
    if average == "dataset":
        tp, fp, gt_pos = tp.sum(0, keepdims=True), fp.sum(0, keepdims=True), gt_pos.sum(0, keepdims=True)
    pred_pos = tp + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pred_pos > 0, tp / np.where(pred_pos > 0, pred_pos, 1), 1.0)
        rec = np.where(gt_pos > 0, tp / np.where(gt_pos > 0, gt_pos, 1), 1.0)
        den = beta2 * prec + rec
        f = np.where(den > 0, (1.0 + beta2) * prec * rec / np.where(den > 0, den, 1), 0.0)
    f_mean = f.mean(axis=0)
    best = int(np.argmax(f_mean))
    return MaxFBeta(float(f_mean[best]), float(thr[best]), thr, f_mean, prec.mean(axis=0), rec.mean(axis=0))
