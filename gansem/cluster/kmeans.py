"""K-means++ initialisation and Lloyd iterations on row-sharded features.

The first stage of KLiSH (Sec. 3.2 of Xu et al., "Extracting Semantic Knowledge
from GANs with Unsupervised Learning"): K-means with a large K0 gives the
initial clusters that the merge loop then joins.

Data layout (see :mod:`gansem.sharding`): ``x [N_pad, D]`` row-sharded with a
float32 ``valid [N_pad]`` mask, padded to ``layout.padded_rows`` rows where
``layout = sharding.plan_rows(N, n_devices)``. Every sum over rows goes through
:func:`gansem.sharding.row_reduce` and every per-row map through
:func:`gansem.sharding.row_map`, so results are bit-identical on 1 and 8 devices.
Distances are computed one chunk of rows at a time: the full ``N x K`` distance
matrix is never materialised.

Metrics:
    ``"euclidean"``: squared Euclidean distance, centroids are cluster means.
    ``"cosine"``: spherical K-means. Rows are L2-normalised on the fly (they are
    not modified in place), distances are ``||x/|x| - c||^2 = 2 - 2 cos``,
    centroids are normalised cluster means.

Empty clusters: a cluster that receives no rows in an iteration is re-seeded,
as in scikit-learn, with the row farthest from its current centroid (the j-th
empty cluster takes the j-th farthest row); that row is moved out of the cluster
it was assigned to. Centroids are therefore never the zero vector.

Example::

    layout = sharding.plan_rows(n, mesh.devices.size)
    x, valid = sharding.shard_rows(feats, mesh, multiple=layout.padded_rows)
    res = kmeans(jax.random.key(0), x, valid, 100, mesh=mesh, layout=layout)
    res.centroids, res.labels, res.n_iter, res.converged
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gansem import sharding

__all__ = [
    "KMeansResult",
    "kmeans_plusplus_init",
    "lloyd",
    "kmeans",
    "assign",
    "count_valid",
]

_METRICS = ("euclidean", "cosine")
_EPS = 1e-12


class KMeansResult(NamedTuple):
    """Output of :func:`lloyd` / :func:`kmeans`.

    Attributes:
        centroids: ``[K, D] float32`` final centroids (unit norm for ``cosine``).
        labels: ``[N_pad] int32`` nearest centroid of each row (row-sharded;
            padding rows hold an arbitrary cluster id and must be weighted out).
        counts: ``[K] float32`` valid rows per cluster.
        inertia: ``() float32`` sum over valid rows of the squared distance to
            the assigned centroid (of the normalised rows for ``cosine``).
        n_iter: ``() int32`` Lloyd iterations run.
        converged: ``() bool`` whether the L-inf centroid shift fell below ``tol``
            before ``max_iter``.
    """

    centroids: jax.Array
    labels: jax.Array
    counts: jax.Array
    inertia: jax.Array
    n_iter: jax.Array
    converged: jax.Array


# -- helpers -----------------------------------------------------------------------


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _prep_rows(x, metric):
    """Rows as used by ``metric``: unchanged, or L2-normalised for ``cosine``."""
    x = x.astype(jnp.float32)
    if metric == "cosine":
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)
    return x


def _prep_centroids(c, metric):
    if metric == "cosine":
        c = c / jnp.maximum(jnp.linalg.norm(c, axis=-1, keepdims=True), _EPS)
    return c


def _nearest(xc, centroids):
    """Nearest centroid of each row of a chunk and the exact squared distance to it.

    Args:
        xc: ``[n, D]`` rows (already normalised for ``cosine``).
        centroids: ``[K, D]``.

    Returns:
        ``(labels [n] int32, sq_dist [n] float32)``. The argmin uses the expansion
        ``|x|^2 - 2 x.c + |c|^2`` (one matmul); the returned distance is recomputed
        directly as ``sum((x - c_label)^2)`` so it has no cancellation error.
    """
    c_sq = jnp.sum(centroids * centroids, axis=-1)  # [K]
    d = c_sq[None, :] - 2.0 * (xc @ centroids.T)  # [n, K]; |x|^2 is constant per row
    labels = jnp.argmin(d, axis=-1).astype(jnp.int32)
    diff = xc - centroids[labels]
    return labels, jnp.sum(diff * diff, axis=-1)


def _sq_dists(xc, c):
    """``[n, L]`` squared distances by the expansion ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0)."""
    x_sq = jnp.sum(xc * xc, axis=-1, keepdims=True)
    c_sq = jnp.sum(c * c, axis=-1)[None, :]
    return jnp.maximum(x_sq - 2.0 * (xc @ c.T) + c_sq, 0.0)


def count_valid(valid, *, mesh, layout) -> int:
    """Number of valid rows (exact integer count) as a Python int."""
    n = sharding.row_reduce(lambda v: jnp.sum(v > 0, dtype=jnp.int32), mesh, layout, (valid,))
    return int(n)


def _check_inputs(x, valid, k, *, mesh, layout):
    if x.ndim != 2:
        raise ValueError(f"x must be [N_pad, D], got shape {x.shape}")
    if valid.shape != (x.shape[0],):
        raise ValueError(f"valid must be [N_pad]={x.shape[0]}, got shape {valid.shape}")
    if x.shape[0] != layout.padded_rows:
        raise ValueError(
            f"x has {x.shape[0]} rows but the layout expects {layout.padded_rows}; pad with "
            "sharding.shard_rows(x, mesh, multiple=layout.padded_rows)"
        )
    if k < 1:
        raise ValueError(f"number of clusters K must be >= 1, got {k}")
    n = count_valid(valid, mesh=mesh, layout=layout)
    if k > n:
        raise ValueError(
            f"K={k} clusters requested but there are only {n} valid feature rows; lower K0 "
            "or use more images / a higher feature resolution"
        )


# -- public API ----------------------------------------------------------------------


def assign(x, centroids, *, mesh, layout, metric="euclidean"):
    """Nearest-centroid assignment of every row.

    Args:
        x: ``[N_pad, D]`` row-sharded features.
        centroids: ``[K, D]`` replicated centroids.
        mesh, layout: from :mod:`gansem.sharding`.
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        ``(labels [N_pad] int32, min_sq_dist [N_pad] float32)``, row-sharded.
    """
    _check_metric(metric)
    return _assign(x, jnp.asarray(centroids, jnp.float32), mesh=mesh, layout=layout, metric=metric)


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "metric"))
def _assign(x, centroids, *, mesh, layout, metric):
    centroids = _prep_centroids(centroids, metric)
    return sharding.row_map(
        lambda xc, c: _nearest(_prep_rows(xc, metric), c), mesh, layout, (x,), (centroids,)
    )


def kmeans_plusplus_init(key, x, valid, k, *, mesh, layout, metric="euclidean"):
    """Greedy K-means++ seeding (D^2 sampling), independent of the device count.

    As in scikit-learn, each step draws ``2 + log(K)`` candidates by D^2 sampling
    and keeps the one that lowers the potential (inertia) most. Each draw is an
    exponential race: with ``E_i ~ Exp(1)`` drawn for every
    padded row from ``fold_in(key, step)``, the row ``argmin_i E_i / d_i`` is
    selected with probability ``d_i / sum_j d_j`` (``d_i`` = squared distance to
    the nearest chosen centroid, by the matmul expansion). JAX's threefry is
    partitionable, so ``E`` does not depend on the sharding. Rows with
    ``d_i = 0`` and padding rows are never chosen; if every valid row has
    ``d_i = 0`` (fewer distinct rows than K) a uniformly random valid row is used.

    Args:
        key: PRNG key.
        x: ``[N_pad, D]`` row-sharded features.
        valid: ``[N_pad] float32`` mask.
        k: number of centroids.
        mesh, layout: from :mod:`gansem.sharding`.
        metric: ``"euclidean"`` or ``"cosine"`` (sampling on normalised rows).

    Returns:
        ``[K, D] float32`` centroids (rows of x, normalised for ``cosine``).

    Raises:
        ValueError: if ``k`` exceeds the number of valid rows.
    """
    _check_metric(metric)
    _check_inputs(x, valid, k, mesh=mesh, layout=layout)
    return _kmeans_pp(key, x, valid, k=int(k), mesh=mesh, layout=layout, metric=metric)


@functools.partial(jax.jit, static_argnames=("k", "mesh", "layout", "metric"))
def _kmeans_pp(key, x, valid, *, k, mesh, layout, metric):
    n_pad, dim = x.shape
    ok = valid > 0
    trials = 2 + int(np.log(k))  # greedy k-means++, as scikit-learn

    def sq_dist_to(c):  # c: [L, D] -> [N_pad, L]
        return sharding.row_map(
            lambda xc, cc: _sq_dists(_prep_rows(xc, metric), cc),
            mesh,
            layout,
            (x,),
            (c,),
        )

    def rows(idx):
        return _prep_rows(jnp.take(x, idx, axis=0), metric)

    def potentials(dc, vc):  # [n, L] -> [L]
        return jnp.sum(dc * vc[:, None], axis=0)

    e0 = jax.random.exponential(jax.random.fold_in(key, 0), (n_pad,))
    first = jnp.argmin(jnp.where(ok, e0, jnp.inf))
    c0 = rows(first[None])
    d0 = sq_dist_to(c0)[:, 0]
    cents0 = jnp.zeros((k, dim), jnp.float32).at[0].set(c0[0])

    def body(i, carry):
        cents, d = carry
        e = jax.random.exponential(jax.random.fold_in(key, i), (trials, n_pad))
        score = jnp.where(ok & (d > 0), e / jnp.where(d > 0, d, 1.0), jnp.inf)  # [L, N_pad]
        idx = jnp.argmin(score, axis=1)
        fallback = jnp.argmin(jnp.where(ok, e, jnp.inf), axis=1)
        finite = jnp.isfinite(jnp.take_along_axis(score, idx[:, None], axis=1)[:, 0])
        idx = jnp.where(finite, idx, fallback)
        cand = rows(idx)  # [L, D]
        dist = jnp.minimum(d[:, None], sq_dist_to(cand))  # [N_pad, L]
        pot = sharding.row_reduce(potentials, mesh, layout, (dist, valid))
        best = jnp.argmin(pot)
        return cents.at[i].set(cand[best]), dist[:, best]

    cents, _ = jax.lax.fori_loop(1, k, body, (cents0, d0))
    return cents


def lloyd(x, valid, centroids, *, mesh, layout, max_iter=20, tol=1e-4, metric="euclidean"):
    """Lloyd iterations from given centroids.

    Stops when the L-inf shift of the centroids in one iteration is below
    ``tol`` (``converged=True``) or after ``max_iter`` iterations
    (``converged=False``). Labels, counts and inertia are those of the returned
    centroids (one final assignment pass).

    Args:
        x: ``[N_pad, D]`` row-sharded features.
        valid: ``[N_pad] float32`` mask.
        centroids: ``[K, D]`` initial centroids.
        mesh, layout: from :mod:`gansem.sharding`.
        max_iter: iteration cap.
        tol: L-inf centroid-shift tolerance.
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        :class:`KMeansResult`.
    """
    _check_metric(metric)
    centroids = jnp.asarray(centroids, jnp.float32)
    _check_inputs(x, valid, centroids.shape[0], mesh=mesh, layout=layout)
    return _lloyd(
        x, valid, centroids, jnp.float32(tol), max_iter=int(max_iter), mesh=mesh, layout=layout, metric=metric
    )


@functools.partial(jax.jit, static_argnames=("max_iter", "mesh", "layout", "metric"))
def _lloyd(x, valid, centroids, tol, *, max_iter, mesh, layout, metric):
    k, dim = centroids.shape
    n_pad = x.shape[0]
    centroids = _prep_centroids(centroids, metric)

    def stats(xc, vc, c):
        xc = _prep_rows(xc, metric)
        labels, dist = _nearest(xc, c)
        sums = jax.ops.segment_sum(xc * vc[:, None], labels, num_segments=k)
        counts = jax.ops.segment_sum((vc > 0).astype(jnp.int32), labels, num_segments=k)
        return sums, counts

    def reseed(c, sums, counts):
        empty = counts == 0
        labels, dist = sharding.row_map(
            lambda xc, cc: _nearest(_prep_rows(xc, metric), cc), mesh, layout, (x,), (c,)
        )
        _, far = jax.lax.top_k(jnp.where(valid > 0, dist, -1.0), k)  # farthest rows first
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        pick = far[rank]  # [K] row index for each cluster (used only where empty)
        rows = _prep_rows(jnp.take(x, pick, axis=0), metric)
        donors = jnp.take(labels, pick)
        moved = empty.astype(jnp.float32)
        sums = sums - jax.ops.segment_sum(rows * moved[:, None], donors, num_segments=k)
        counts = counts - jax.ops.segment_sum(empty.astype(jnp.int32), donors, num_segments=k)
        sums = jnp.where(empty[:, None], rows, sums)
        counts = jnp.where(empty, 1, counts)
        return sums, counts

    def body(carry):
        c, it, _ = carry
        sums, counts = sharding.row_reduce(stats, mesh, layout, (x, valid), (c,))
        sums, counts = jax.lax.cond(
            jnp.any(counts == 0), reseed, lambda c_, s_, n_: (s_, n_), c, sums, counts
        )
        new = sums / jnp.maximum(counts, 1).astype(jnp.float32)[:, None]
        new = _prep_centroids(new, metric)
        shift = jnp.max(jnp.abs(new - c))
        return new, it + 1, shift

    def cond(carry):
        _, it, shift = carry
        return (it < max_iter) & (shift >= tol)

    c, n_iter, shift = jax.lax.while_loop(
        cond, body, (centroids, jnp.int32(0), jnp.float32(jnp.inf))
    )
    labels, dist = sharding.row_map(
        lambda xc, cc: _nearest(_prep_rows(xc, metric), cc), mesh, layout, (x,), (c,)
    )

    def final(lc, dc, vc):
        counts = jax.ops.segment_sum((vc > 0).astype(jnp.int32), lc, num_segments=k)
        return counts, jnp.sum(dc * vc)

    counts, inertia = sharding.row_reduce(final, mesh, layout, (labels, dist, valid))
    return KMeansResult(
        centroids=c,
        labels=labels,
        counts=counts.astype(jnp.float32),
        inertia=inertia,
        n_iter=n_iter,
        converged=shift < tol,
    )


def kmeans(key, x, valid, k, *, mesh, layout, max_iter=20, tol=1e-4, metric="euclidean"):
    """K-means++ seeding followed by Lloyd iterations.

    Args:
        key: PRNG key for the seeding.
        x: ``[N_pad, D]`` row-sharded features; ``valid [N_pad] float32`` mask.
        k: number of clusters (at most the number of valid rows).
        mesh, layout: from :mod:`gansem.sharding`.
        max_iter, tol: Lloyd stopping rule (L-inf centroid shift).
        metric: ``"euclidean"`` or ``"cosine"`` (spherical K-means).

    Returns:
        :class:`KMeansResult`.

    Raises:
        ValueError: if ``k`` exceeds the number of valid rows (lower K0 or use
            more images / a higher resolution).
    """
    init = kmeans_plusplus_init(key, x, valid, k, mesh=mesh, layout=layout, metric=metric)
    return lloyd(x, valid, init, mesh=mesh, layout=layout, max_iter=max_iter, tol=tol, metric=metric)
