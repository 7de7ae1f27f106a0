"""KLiSH: K-means with Linear Separability Heuristic (Algorithm 1 of Xu et al.).

Starting from K0 K-means clusters, repeat until one cluster is left:

1. train the one-vs-rest SVMs of Eq. 3 on the current clusters
   (:mod:`gansem.cluster.svm`);
2. IoU of every cluster with its SVM's positive set (Eq. 4, counts over the
   whole dataset) and the ECoS matrix (Eq. 5, cosine similarity of the clamped
   score maps ``clamp((s + 1) / 2, 0, 1)``);
3. ``p = argmin_k IoU_k`` (least linearly separable cluster),
   ``q = argmax_{j != p} ECoS[p, j]``;
4. merge p into q: rows labelled p get label q, row p of (W, b) is deleted and
   q keeps its weights as the warm start of the next solve (as in Algorithm 1;
   the original code averages w_p and w_q instead). Indices above p shift down.

After a merge only the SVM of q has a new problem (every other class keeps its
positives and its negatives), so ``retrain="merged"`` (default) re-solves that
single class; ``retrain="all"`` re-solves every class from the warm start. Both
reach the same optimum of Eq. 3.

Initial-cluster filter (Sec. 3.2, on by default): train the SVMs on the K0
clusters, map IoU through the inverse sigmoid (IoU clipped to [1e-6, 1-1e-6]),
drop clusters whose logit is below ``mean - std`` (population std), and re-run
Lloyd from the kept centroids.

Held-out statistics (``holdout``, a switchable deviation; off = the paper). The
paper trains the SVMs and measures Eq. 4/5 on the same pixels, which is sound when
every cluster holds far more pixels than the feature dimension (about 168,000
pixels per initial cluster in the paper). With a few hundred pixels per cluster a
compact cluster is perfectly separable (IoU = 1) whatever it means, never merges,
and the least separable cluster is always the growing merged one: the trajectory
snowballs into one cluster. With a ``holdout`` row mask, the SVMs are trained on
the other valid rows and IoU and ECoS are counted on the held-out rows only, so a
cluster is "separable" when its SVM generalises to unseen pixels (the launch
scripts hold out whole images). A cluster with no held-out pixel has IoU 0. ECoS
is counted on the held-out rows too: over all rows it is dominated by the training
rows' overfitted score maps and picks worse partners (benchmarks/README.md,
"Fidelity ablation"). With many pixels per cluster both readings agree.

Incremental statistics (exact). After merging p into q only w_q changes, so
only score column q needs recomputing. :class:`MergeCache` keeps the score
matrix ``[N_pad, Kw]`` (row-sharded, ``Kw = K_init`` for the whole run) between
steps; a step then costs the solve plus one score GEMM of ``_LANES`` columns
(``O(N D)``) and one pass over the scores that recomputes the counts behind
IoU_k (Eq. 4), the hinge sums and the ECoS numerator matrix ``sum_i d_ik d_ij``
(Eq. 5; one ``[w, N] x [N, w]`` GEMM, ``w`` = K rounded up to ``_STAT_LANES``),
instead of ``O(N D K)``.

Two GEMM shapes produce score columns: the *build* ``[chunk, D] x [D, Kw]`` (all
classes at once, at the first step) and the *update* ``[chunk, D] x [D, _LANES]``
(the re-solved class of a merge step). A column's bits depend only on its
classifier and on which of the two produced it, not on its lane, and which one
produced it is known from the state: the build for the initial clusters (ids
``< K_init``, never re-solved after the first step), the update for every
cluster made by a merge. A cache rebuilt from scratch (resume, or ``cache=None``)
recomputes each column with the same shape that produced it, so it is bitwise
identical to the updated one, and so is the trajectory.

Everything per row goes through :mod:`gansem.sharding` (``row_reduce``/``row_map``),
so the merge sequence is bit-identical on 1 and 8 devices.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gansem import sharding
from gansem.cluster import kmeans as km
from gansem.cluster import svm

__all__ = [
    "KlishState",
    "MergeRecord",
    "svm_scores",
    "cluster_iou",
    "ecos_matrix",
    "merge_statistics",
    "separability_filter",
    "filter_initial_clusters",
    "linear_init",
    "klish_init",
    "klish_step",
    "run_klish",
    "MergeCache",
    "training_rows",
    "counted_rows",
    "is_complete",
    "klish_steps",
]

_LANES = 16  # classes per score GEMM of a merge step's update (the build computes all Kw at once)
_STAT_LANES = 16  # the statistics cover the first K columns rounded up to a multiple of this


class KlishState(NamedTuple):
    """Everything needed to continue the merge loop exactly.

    Attributes:
        W: ``[K, D] float32`` SVM weights (warm start of the next solve).
        b: ``[K] float32`` SVM biases.
        labels: ``[N_pad] int32`` row-sharded current cluster ids ``0..K-1``
            (padding rows: arbitrary).
        sizes: ``[K] int32`` valid rows per cluster.
        step: merges done so far (``int``).
        ids: ``[K] int32`` AHC-style node ids: initial clusters are ``0..K_init-1``,
            the cluster made by a merge gets ``max(ids) + 1``.
        stale: ``[K] bool`` classes whose SVM must be (re)trained before the next
            IoU/ECoS (all at the start, then only the merged class).
    """

    W: jax.Array
    b: jax.Array
    labels: jax.Array
    sizes: jax.Array
    step: int
    ids: jax.Array
    stale: jax.Array


class MergeRecord(NamedTuple):
    """One step of the trajectory, for the K clusters *before* the merge (host values).

    Attributes:
        k: number of clusters K at this step.
        W: ``[K, D]`` trained SVM weights; b: ``[K]`` biases.
        iou: ``[K]`` Eq. 4 per cluster.
        ecos: ``[K, K]`` Eq. 5 (diagonal left as computed, ~1).
        p: merged (removed) cluster index, ``-1`` at K = 1.
        q: receiving cluster index, ``-1`` at K = 1.
        sizes: ``[K]`` valid rows per cluster.
        svm_iters: L-BFGS iterations of this step's solve.
        svm_converged: whether it converged.
        svm_stop_reason: why it stopped (:data:`gansem.cluster.svm.STOP_REASONS`).
        objective: Eq. 3 at (W, b).
        merged_ids: ``(id_q, id_p, new_id)`` node ids, ``(-1, -1, -1)`` at K = 1.
    """

    k: int
    W: np.ndarray
    b: np.ndarray
    iou: np.ndarray
    ecos: np.ndarray
    p: int
    q: int
    sizes: np.ndarray
    svm_iters: int
    svm_converged: bool
    svm_stop_reason: str
    objective: float
    merged_ids: tuple

    @classmethod
    def from_saved(cls, d: dict) -> "MergeRecord":
        """A record from its saved parts (arrays and JSON values, as :mod:`gansem.checkpoint` stores them)."""
        return cls(
            k=int(d["k"]), W=np.asarray(d["W"], np.float32), b=np.asarray(d["b"], np.float32),
            iou=np.asarray(d["iou"], np.float32), ecos=np.asarray(d["ecos"], np.float32),
            p=int(d["p"]), q=int(d["q"]), sizes=np.asarray(d["sizes"]),
            svm_iters=int(d["svm_iters"]), svm_converged=bool(d["svm_converged"]),
            svm_stop_reason=str(d["svm_stop_reason"]), objective=float(d["objective"]),
            merged_ids=tuple(int(i) for i in np.asarray(d["merged_ids"]).reshape(-1)),
        )


# -- Eq. 4 and Eq. 5 -----------------------------------------------------------------


def svm_scores(W, b, x):
    """SVM scores ``x W^T + b``: ``x [n, D]``, ``W [K, D]``, ``b [K]`` -> ``[n, K]``."""
    return x @ W.T + b


def _bucket(k: int, m: int = 32) -> int:
    return -(-k // m) * m


def merge_statistics(W, b, data: sharding.RowData, labels):
    """IoU (Eq. 4), ECoS (Eq. 5) and per-class squared-hinge sums, from scratch.

    Uses the kernels of the merge loop (one score GEMM over all K classes, then
    the statistics pass), so at the loop's first step (``K = K_init``) these values
    are bitwise those the loop computes.

    Args:
        W: ``[K, D]``; b: ``[K]``.
        data: :class:`~gansem.sharding.RowData` of features ``[N_pad, D]``; rows with
            ``data.valid`` 0 are not counted.
        labels: ``[N_pad] int32`` row-sharded cluster ids.

    Returns:
        ``(iou [K], ecos [K, K], hinge [K])`` float32. A cluster with an empty
        union has IoU 0; a score map that is 0 everywhere has ECoS 0 with all.
    """
    k = W.shape[0]
    stats = _build(W, b, k, k, (), data, labels)
    iou, ecos = _finish(stats)
    return iou[:k], ecos[:k, :k], stats.hinge[:k]


def cluster_iou(W, b, data: sharding.RowData, labels):
    """Eq. 4: ``IoU_k = |S_k & Y_k| / |S_k | Y_k|`` with ``S_k = {x : w_k.x + b_k > 0}``.

    Counts are over every valid row of the dataset (not averaged per image).

    Returns:
        ``[K] float32``.
    """
    return merge_statistics(W, b, data, labels)[0]


def ecos_matrix(W, b, data: sharding.RowData):
    """Eq. 5: cosine similarity of the score maps ``clamp((s_k + 1) / 2, 0, 1)`` over valid rows.

    Returns:
        ``[K, K] float32``.
    """
    labels = jnp.zeros(data.valid.shape, jnp.int32)
    return merge_statistics(W, b, data, labels)[1]


def select_merge(iou, ecos):
    """Merge rule: ``p = argmin IoU``, ``q = argmax_{j != p} ECoS[p, j]`` (first index on ties)."""
    iou = np.asarray(iou)
    p = int(np.argmin(iou))
    row = np.array(ecos[p], dtype=np.float64)
    row[p] = -np.inf
    return p, int(np.argmax(row))


# -- incremental statistics ----------------------------------------------------------


class _Stats(NamedTuple):
    """Merge statistics of classes ``0..K-1`` stored in ``Kw`` columns (the rest padding).

    Attributes:
        scores: ``[N_pad, Kw] float32`` row-sharded SVM scores (padding columns -2).
        gram: ``[w, w] float32`` ECoS numerators ``sum_i d_ik d_ij`` of the first
            ``w = _stats_width(K) <= Kw`` columns (so are the vectors below).
        inter, pred, n_gt: ``[w] int32`` counts behind Eq. 4.
        hinge: ``[w] float32`` per-class squared-hinge sums.
    """

    scores: jax.Array
    gram: jax.Array
    inter: jax.Array
    pred: jax.Array
    n_gt: jax.Array
    hinge: jax.Array


class MergeCache:
    """The merge loop's score matrix kept in memory between :func:`klish_step` calls.

    Create one per run and pass it to every step (``cache=``); the step reads it
    when it belongs to the state it is given (same x, W, b and labels objects)
    and leaves the scores of the state it returns in it (the IoU/ECoS statistics
    are recomputed from the scores every step). With no matching cache the
    scores are rebuilt from scratch, with bitwise the same result, so nothing
    about it needs saving: a resumed run rebuilds it once.
    """

    def __init__(self):
        self._key = None
        self._scores = None

    def _get(self, state, data):
        if self._key is None:
            return None
        xr, W, b, labels = self._key
        if xr() is data.x and W is state.W and b is state.b and labels is state.labels:
            return self._scores
        return None

    def _put(self, state, data, scores):
        self._key = (weakref.ref(data.x), state.W, state.b, state.labels)
        self._scores = scores

    def clear(self):
        """Forget the cached scores."""
        self._key = None
        self._scores = None


def _width(state) -> int:
    """Column count of the score matrix for the whole run: ``K_init = K + steps``."""
    return int(state.W.shape[0]) + int(state.step)


def _updated_classes(state, retrain) -> np.ndarray:
    """Classes whose score column the merge loop last computed by an update: those made by a merge."""
    if retrain != "merged":  # every step rebuilds all columns
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.asarray(state.ids) >= _width(state))


@jax.jit
def _score_block(x, Wl, bl):
    """Scores of classifiers ``Wl [L, D]``, ``bl [L]`` on the rows of ``x`` (a RowData): ``[N_pad, L]``.

    One fixed-shape GEMM per chunk.
    """
    return sharding.row_map(lambda xc, W, b: svm_scores(W, b, xc), x.mesh, x.layout, (x.x,), (Wl, bl))


def _stats_width(k: int) -> int:
    """Columns the statistics cover for ``k`` classes: ``k`` rounded up to ``_STAT_LANES``."""
    return -(-k // _STAT_LANES) * _STAT_LANES


def _stats_chunk(sc, vc, lc, *, width):
    """Statistics of the first ``width`` score columns of one chunk ``sc [c, Kw]`` (column j: class j).

    Returns the ECoS numerators ``d^T d`` of the score maps ``d = clamp((s + 1) / 2, 0, 1)``
    (one GEMM), the Eq. 4 counts and the squared-hinge sums. Padding columns (scores -2)
    contribute nothing. Only two quantities need every entry of the block (the positive
    count and ``max(0, 1 + s)^2``, the hinge of a negative example); the terms that
    involve a row's own class come from that one score per row, gathered and summed by
    class with a one-hot product (exact for the counts, and deterministic on every backend,
    unlike a scatter-add).
    """
    sc = sc[:, :width]
    valid = vc > 0
    own_ok = valid & (lc >= 0) & (lc < width)
    lab = jnp.clip(lc, 0, width - 1)
    d = jnp.clip((sc + 1.0) * 0.5, 0.0, 1.0) * vc[:, None]
    neg = jnp.maximum(0.0, 1.0 + sc) * vc[:, None]
    pos = jnp.where(sc > 0, vc[:, None], 0.0)
    # Column sums as vector-matrix products (faster than XLA:CPU's column reductions); counts are
    # exact in float32 per chunk (< 2^24 rows) and summed over chunks as int32.
    one = jnp.ones((sc.shape[0],), jnp.float32)
    own = jnp.take_along_axis(sc, lab[:, None], axis=1)[:, 0]
    per_row = jnp.stack([jnp.ones_like(own), (own > 0).astype(jnp.float32),
                         jnp.maximum(0.0, 1.0 - own) ** 2 - jnp.maximum(0.0, 1.0 + own) ** 2], axis=0)
    onehot = ((lab[:, None] == jnp.arange(width, dtype=lab.dtype)[None, :])
              & own_ok[:, None]).astype(jnp.float32)
    by_class = sharding.rows_tdot(per_row.T, onehot)  # [3, width]: rows of the class, its positives, hinge correction
    inter, n_gt = by_class[1].astype(jnp.int32), by_class[0].astype(jnp.int32)
    return sharding.rows_tdot(d, d), inter, (one @ pos).astype(jnp.int32), n_gt, one @ (neg * neg) + by_class[2]


@functools.partial(jax.jit, static_argnames=("width",))
def _stats_of(S, data, labels, *, width):
    return sharding.row_reduce(functools.partial(_stats_chunk, width=width), data.mesh, data.layout,
                               (S, data.valid, labels))


def _with_stats(S, k, data, labels):
    """Statistics of classes ``0..k-1`` from the score matrix ``S [N_pad, Kw]``: one pass, one GEMM per row chunk.

    They cover ``_stats_width(k)`` columns, so the Gram matrix shrinks as classes merge
    and a merge step compiles a new program only when ``k`` crosses a multiple of
    ``_STAT_LANES``. (``S`` is not passed through the jitted function: returning an
    input copies it.)
    """
    return _Stats(S, *_stats_of(S, _mask_only(data), labels, width=min(_stats_width(k), S.shape[1])))


@jax.jit
def _set_columns(S, x, Wl, bl, cols):
    """``S`` with columns ``cols [m]`` set to the first ``m`` lanes of the update GEMM ``x Wl^T + bl`` (``Wl [_LANES, D]``)."""
    blk = _score_block(x, Wl, bl)  # [N_pad, _LANES]: the shape fixes the bits
    return S.at[:, cols].set(blk[:, : cols.shape[0]], unique_indices=True)


def _lane_groups(W, b, cols):
    """Host-side ``(Wl [L, D], bl [L], cols [m])`` update groups of the classes ``cols``, ``L = _LANES`` at a time."""
    W = np.asarray(W, np.float32)  # gathered on the host: no device program per K
    b = np.asarray(b, np.float32)
    cols = np.asarray(cols, np.int64)
    for s in range(0, cols.size, _LANES):
        c = cols[s:s + _LANES]
        Wl = np.zeros((_LANES, W.shape[1]), np.float32)
        bl = np.full(_LANES, -2.0, np.float32)
        Wl[: c.size], bl[: c.size] = W[c], b[c]
        yield Wl, bl, c.astype(np.int32)


def _build(W, b, k, kw, updated, data, labels):
    """Statistics of classes ``0..k-1`` in ``kw`` columns from scratch: bitwise what :func:`_refresh` keeps.

    One ``[chunk, D] x [D, kw]`` GEMM scores every class (padding columns: weights
    0, bias -2); the columns of ``updated`` (host ints: the classes the merge loop
    last scored with an update) are then recomputed with the update GEMM, so every
    column has the bits of the product that produced it in the loop (a column's
    bits do not depend on its lane). The rest is a function of the scores.
    """
    W = np.asarray(W, np.float32)
    Wp = np.zeros((kw, W.shape[1]), np.float32)
    bp = np.full(kw, -2.0, np.float32)
    Wp[:k], bp[:k] = W, np.asarray(b, np.float32)
    feats = _rows_only(data)
    S = _score_block(feats, Wp, bp)
    for Wl, bl, c in _lane_groups(W, b, updated):
        S = _set_columns(S, feats, Wl, bl, c)
    return _with_stats(S, k, data, labels)


def _refresh(S, W, b, cols, data, labels):
    """Recompute the score columns of classes ``cols`` (host ints) of ``S``, then all statistics from the scores."""
    feats = _rows_only(data)
    for Wl, bl, c in _lane_groups(W, b, cols):
        S = _set_columns(S, feats, Wl, bl, c)
    return _with_stats(S, int(W.shape[0]), data, labels)


def _rows_only(data):
    """``data`` without its mask (a score GEMM does not read it; one compiled program for every mask)."""
    return data.replace(valid=None)


def _mask_only(data):
    """``data`` without its features (the statistics pass reads the scores and the mask only)."""
    return data.replace(x=None)


@jax.jit
def _finish(stats):
    union = stats.pred + stats.n_gt - stats.inter
    iou = stats.inter.astype(jnp.float32) / jnp.maximum(union, 1).astype(jnp.float32)
    norm = jnp.sqrt(jnp.maximum(jnp.diagonal(stats.gram), 1e-12))
    return iou, stats.gram / (norm[:, None] * norm[None, :])


@jax.jit
def _drop_class(S, perm):
    """Delete one class's score column: columns reordered by ``perm [Kw]`` (deleted class last), last reset."""
    last = jnp.arange(perm.shape[0]) == perm.shape[0] - 1
    return jnp.where(last[None, :], -2.0, S[:, perm])



# -- initialisation ------------------------------------------------------------------


def linear_init(centroids):
    """Linear classifier equivalent to nearest-centroid assignment.

    ``w_k = c_k / s``, ``b_k = -|c_k|^2 / (2 s)`` with ``s = max_k |c_k|^2``, so
    ``argmax_k (w_k.x + b_k) = argmin_k |x - c_k|^2`` and biases lie in [-0.5, 0].

    Args:
        centroids: ``[K, D]``.

    Returns:
        ``(W [K, D], b [K])`` float32.
    """
    c = jnp.asarray(centroids, jnp.float32)
    sq = jnp.sum(c * c, axis=-1)
    s = jnp.maximum(jnp.max(sq), 1e-12)
    return c / s, -0.5 * sq / s


def separability_filter(iou):
    """Initial-cluster filter of Sec. 3.2 on host values.

    ``m = logit(clip(IoU, 1e-6, 1 - 1e-6))``; keep clusters with
    ``m >= mean(m) - std(m)`` (population std).

    Returns:
        ``(keep [K] bool, logits [K], threshold float)``.
    """
    iou = np.clip(np.asarray(iou, np.float64), 1e-6, 1 - 1e-6)
    m = np.log(iou) - np.log1p(-iou)
    thr = float(m.mean() - m.std())
    return m >= thr, m, thr


def filter_initial_clusters(iou, centroids, data: sharding.RowData, *, kmeans_iters=20, kmeans_tol=1e-4):
    """Drop poorly separable initial clusters and re-run Lloyd from the kept centroids.

    Args:
        iou: ``[K]`` IoU of SVMs trained on the initial clusters.
        centroids: ``[K, D]`` the initial centroids.
        data: the clustered rows (:class:`~gansem.sharding.RowData`).
        kmeans_iters, kmeans_tol: Lloyd settings.

    Returns:
        ``(KMeansResult, keep [K] bool, logits [K], threshold)``.
    """
    keep, logits, thr = separability_filter(iou)
    res = km.lloyd(data, jnp.asarray(centroids)[np.flatnonzero(keep)], max_iter=kmeans_iters, tol=kmeans_tol)
    return res, keep, logits, thr


@jax.jit
def _relabel(labels, table):
    return jnp.take(table, jnp.clip(labels, 0, table.shape[0] - 1))


def _apply_table(labels, table):
    """``labels -> table[labels]`` with the table padded to a multiple of 32 (few compiles)."""
    table = np.asarray(table, np.int32)
    padded = np.zeros(_bucket(table.size), np.int32)
    padded[: table.size] = table
    return _relabel(labels, padded)


@jax.jit
def _without(valid, holdout):
    return valid * (1.0 - holdout)


def training_rows(data: sharding.RowData, holdout=None) -> sharding.RowData:
    """The rows the SVMs are trained on: ``data`` with the ``holdout`` rows masked out (all rows if ``None``)."""
    return data if holdout is None else data.replace(valid=_without(data.valid, holdout))


def counted_rows(data: sharding.RowData, holdout=None) -> sharding.RowData:
    """The rows IoU and ECoS count: the ``holdout`` rows (module docstring), or all rows if ``None``."""
    return data if holdout is None else data.replace(valid=holdout)


def klish_init(key, data: sharding.RowData, k0, *, filter_clusters=True, kmeans_iters=20,
               kmeans_tol=1e-4, lam=5000.0, tol=1e-4, max_iter=2000, precond=None, solver="lbfgs",
               holdout=None):
    """K-means++ and Lloyd, optional filter, ordered initial state of the merge loop (host-level driver).

    The state's classifier is the nearest-centroid linear model (:func:`linear_init`)
    or, with the filter, the SVMs trained for the filter (rows of kept clusters;
    a warm start only, the first :func:`klish_step` re-trains every class on the
    re-run clusters). Clusters are ordered by descending size.

    Args:
        key: PRNG key for K-means++.
        data: :class:`~gansem.sharding.RowData` of features ``[N_pad, D]``.
        k0: initial number of clusters K0.
        filter_clusters: apply the initial-cluster filter.
        kmeans_iters, kmeans_tol: Lloyd settings.
        lam, tol, max_iter, solver: SVM settings (filter only).
        precond: :class:`gansem.cluster.svm.SVMPreconditioner` of the training rows (computed if None).
        holdout: ``[N_pad] float32`` row-sharded mask of held-out rows (module docstring) or
            ``None``: the filter's SVMs train on the other rows and its IoU counts these.

    Returns:
        ``(KlishState, info)`` with ``info`` a dict of host values: ``k0``,
        ``k_init``, ``kmeans_inertia``, ``kmeans_iters``, ``kmeans_converged`` and,
        with the filter, ``filter_iou``, ``filter_logits``, ``filter_threshold``,
        ``filter_keep``, ``filter_svm_iters``, ``filter_svm_converged``,
        ``filter_svm_stop_reason``.
    """
    res = km.kmeans(key, data, k0, max_iter=kmeans_iters, tol=kmeans_tol)
    info = {"k0": int(k0), "kmeans_inertia": float(res.inertia), "kmeans_iters": int(res.n_iter),
            "kmeans_converged": bool(res.converged)}
    W, b = linear_init(res.centroids)
    if filter_clusters:
        train = training_rows(data, holdout)
        if precond is None:
            precond = svm.svm_preconditioner(train)
        fit = svm.train_ovr_svm(train, res.labels, W, b, lam=lam, tol=tol, max_iter=max_iter, precond=precond,
                                compute_objective=False, solver=solver)
        iou = cluster_iou(fit.W, fit.b, counted_rows(data, holdout), res.labels)
        res, keep, logits, thr = filter_initial_clusters(iou, res.centroids, data, kmeans_iters=kmeans_iters,
                                                         kmeans_tol=kmeans_tol)
        kept = np.flatnonzero(keep)
        W, b = fit.W[kept], fit.b[kept]
        info.update(filter_iou=np.asarray(iou), filter_logits=logits, filter_threshold=thr,
                    filter_keep=keep, filter_svm_iters=int(fit.n_iter),
                    filter_svm_converged=bool(fit.converged),
                    filter_svm_stop_reason=fit.stop_reason,
                    kmeans_inertia=float(res.inertia), kmeans_refit_iters=int(res.n_iter))
    counts = np.asarray(res.counts).astype(np.int64)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    k = order.size
    rep = sharding.replicated(data.mesh)  # K-shaped arrays: host values, replicated on the mesh
    state = KlishState(
        W=jax.device_put(np.asarray(W, np.float32)[order], rep),
        b=jax.device_put(np.asarray(b, np.float32)[order], rep),
        labels=_apply_table(res.labels, rank),
        sizes=jax.device_put(counts[order].astype(np.int32), rep),
        step=0,
        ids=jax.device_put(np.arange(k, dtype=np.int32), rep),
        stale=jax.device_put(np.ones((k,), bool), rep),
    )
    info["k_init"] = k
    return state, info


# -- merge loop ----------------------------------------------------------------------


def is_complete(state: KlishState) -> bool:
    """The loop's one stopping rule: K = 1 and its record written (the step at K = 1 trains, then stops)."""
    return int(state.W.shape[0]) == 1 and not bool(np.asarray(state.stale).any())


def klish_step(state: KlishState, data: sharding.RowData, *, lam=5000.0, tol=1e-4, max_iter=2000,
               retrain="merged", precond=None, solver="lbfgs", cache: Optional[MergeCache] = None,
               holdout=None):
    """One iteration of Algorithm 1: train, measure, record, merge (host-level driver).

    Args:
        state: current :class:`KlishState`.
        data: :class:`~gansem.sharding.RowData` of features ``[N_pad, D]``.
        lam, tol, max_iter, solver: SVM settings (:func:`gansem.cluster.svm.train_ovr_svm`).
        retrain: ``"merged"`` re-solves only stale classes (all at the first step,
            then the class produced by the last merge) and updates the merge
            statistics of those classes only; ``"all"`` re-solves every class
            from the warm start and recomputes every statistic (the original
            procedure, for comparison).
        precond: :class:`gansem.cluster.svm.SVMPreconditioner` of the training rows
            (computed if None; pass it when looping).
        cache: a :class:`MergeCache` shared by the steps of one run (speed only;
            the result is bitwise the same without it).
        holdout: ``[N_pad] float32`` held-out row mask or ``None`` (module docstring): SVMs
            train on the other valid rows, IoU, ECoS and the record's objective (Eq. 3 on
            those rows) count these rows only.

    Returns:
        ``(new_state, record)``; at K = 1 the record has ``p = q = -1`` and the
        state is not merged further (:func:`is_complete` becomes true).
    """
    k = int(state.W.shape[0])
    if retrain == "merged":
        classes = np.flatnonzero(np.asarray(state.stale))
    elif retrain == "all":
        classes = np.arange(k)
    else:
        raise ValueError(f"retrain must be 'merged' or 'all', got {retrain!r}")
    scores = None if cache is None or retrain == "all" else cache._get(state, data)
    fit = svm.train_ovr_svm(training_rows(data, holdout), state.labels, state.W, state.b, lam=lam, tol=tol,
                            max_iter=max_iter, classes=classes, precond=precond, compute_objective=False,
                            solver=solver)
    counted = counted_rows(data, holdout)
    if scores is None:
        stats = _build(fit.W, fit.b, k, _width(state), _updated_classes(state, retrain), counted, state.labels)
    else:
        stats = _refresh(scores, fit.W, fit.b, classes, counted, state.labels)
    iou, ecos = _finish(stats)
    n = float(np.asarray(state.sizes).sum()) if holdout is None else float(np.asarray(stats.n_gt).sum())
    W_h, b_h = np.asarray(fit.W), np.asarray(fit.b)
    objective = float(svm.objective_from_hinge(np.asarray(stats.hinge)[:k], W_h, lam, n))
    iou_h, ecos_h = np.asarray(iou)[:k], np.asarray(ecos)[:k, :k]
    sizes = np.asarray(state.sizes)
    ids = np.asarray(state.ids)
    if k > 1:
        p, q = select_merge(iou_h, ecos_h)
        new_id = int(ids.max()) + 1
        merged_ids = (int(ids[q]), int(ids[p]), new_id)
    else:
        p = q = -1
        merged_ids = (-1, -1, -1)
    record = MergeRecord(
        k=k, W=W_h, b=b_h, iou=iou_h, ecos=ecos_h, p=p, q=q,
        sizes=sizes.copy(), svm_iters=int(fit.n_iter), svm_converged=bool(fit.converged),
        svm_stop_reason=fit.stop_reason, objective=objective, merged_ids=merged_ids,
    )
    if k == 1:
        new_state = state._replace(W=fit.W, b=fit.b, step=state.step + 1,
                                   stale=jnp.zeros((1,), bool))
        if cache is not None:
            cache._put(new_state, data, stats.scores)
        return new_state, record
    # Merge p into q: labels p -> q, indices above p shift down, row p deleted. K-shaped arrays are
    # built on the host and placed with device_put, so no device program is compiled per K.
    keep = np.delete(np.arange(k), p)
    q_new = q - int(q > p)
    table = np.arange(k) - (np.arange(k) > p)
    table[p] = q_new
    new_sizes = sizes.copy()
    new_sizes[q] += sizes[p]
    new_ids = ids.copy()
    new_ids[q] = merged_ids[2]
    stale = np.zeros(k - 1, bool)
    stale[q_new] = True
    rep = sharding.replicated(data.mesh)
    new_state = KlishState(
        W=jax.device_put(W_h[keep], rep),
        b=jax.device_put(b_h[keep], rep),
        labels=_apply_table(state.labels, table),
        sizes=jax.device_put(new_sizes[keep].astype(np.int32), rep),
        step=state.step + 1,
        ids=jax.device_put(new_ids[keep].astype(np.int32), rep),
        stale=jax.device_put(stale, rep),
    )
    if cache is not None:
        kw = stats.scores.shape[1]
        perm = np.concatenate([np.delete(np.arange(kw), p), [p]]).astype(np.int32)
        cache._put(new_state, data, _drop_class(stats.scores, perm))
    return new_state, record


def klish_steps(state: KlishState, data: sharding.RowData, *, max_steps: Optional[int] = None,
                precond=None, holdout=None, **step_kw) -> Iterator[tuple[MergeRecord, KlishState]]:
    """The merge loop of Algorithm 1 as a generator: yields ``(record, state_after)`` per step.

    This is the one merge loop of gansem: :func:`run_klish`, the command-line pipeline
    (which saves each pair to resume from it) and research code all iterate it. It stops
    by the one rule :func:`is_complete` (the record at K = 1 is the last), or after
    ``max_steps`` steps of this call. One :class:`MergeCache` and one preconditioner
    serve every step.

    Args:
        state: the state to continue from (:func:`klish_init`, or a saved one).
        data: :class:`~gansem.sharding.RowData` of features ``[N_pad, D]``.
        max_steps: stop after this many steps (``None``: run to completion).
        precond: preconditioner of the training rows (computed once if None).
        holdout: held-out row mask (see :func:`klish_step`).
        **step_kw: ``lam``, ``tol``, ``max_iter``, ``retrain``, ``solver`` of :func:`klish_step`.
    """
    if precond is None:
        precond = svm.svm_preconditioner(training_rows(data, holdout))
    cache = MergeCache()
    done = 0
    while not is_complete(state) and (max_steps is None or done < max_steps):
        state, record = klish_step(state, data, precond=precond, cache=cache, holdout=holdout, **step_kw)
        done += 1
        yield record, state


def run_klish(key, data: sharding.RowData, k0, *, on_step: Optional[Callable] = None,
              state: Optional[KlishState] = None, max_steps: Optional[int] = None, filter_clusters=True,
              kmeans_iters=20, kmeans_tol=1e-4, lam=5000.0, tol=1e-4, max_iter=2000, retrain="merged",
              solver="lbfgs", holdout=None) -> list[MergeRecord]:
    """Algorithm 1 from K-means to K = 1 (the record at K = 1 has no merge); host-level driver.

    Args:
        key: PRNG key (K-means++; unused when resuming).
        data: :class:`~gansem.sharding.RowData` of features ``[N_pad, D]``.
        k0: initial number of clusters.
        on_step: ``on_step(record, state)`` called after every step with the
            record and the state *after* it (save both to resume).
        state: resume from this state instead of initialising.
        max_steps: stop after this many merge steps (see :func:`klish_steps`).
        filter_clusters, kmeans_iters, kmeans_tol: see :func:`klish_init`.
        lam, tol, max_iter, retrain, solver, holdout: see :func:`klish_step`.

    Returns:
        ``list[MergeRecord]`` of the steps run by this call.
    """
    precond = svm.svm_preconditioner(training_rows(data, holdout))
    if state is None:
        state, _ = klish_init(key, data, k0, filter_clusters=filter_clusters, kmeans_iters=kmeans_iters,
                              kmeans_tol=kmeans_tol, lam=lam, tol=tol, max_iter=max_iter,
                              precond=precond, solver=solver, holdout=holdout)
    records = []
    for record, state in klish_steps(state, data, max_steps=max_steps, precond=precond, holdout=holdout,
                                     lam=lam, tol=tol, max_iter=max_iter, retrain=retrain, solver=solver):
        records.append(record)
        if on_step is not None:
            on_step(record, state)
    return records
