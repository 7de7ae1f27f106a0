"""K-means++ initialisation and Lloyd iterations on row-sharded features.

The first stage of KLiSH (Sec. 3.2 of Xu et al., "Extracting Semantic Knowledge
from GANs with Unsupervised Learning"): K-means with a large K0 gives the
initial clusters that the merge loop then joins.

Data layout: the rows travel as one :class:`gansem.sharding.RowData` (``x [N_pad, D]``
row-sharded, a float32 ``valid [N_pad]`` mask, the layout and the mesh; build it with
:func:`gansem.sharding.place_rows`). Every sum over rows goes through
:func:`gansem.sharding.row_reduce` and every per-row map through
:func:`gansem.sharding.row_map` (or their in-place forms), so results are
bit-identical on every device count dividing the layout's chunk count, and no
function reads rows back to the host.

Design: the distance block is laid out ``[K, rows]`` per chunk, and for float32
euclidean rows all of a device's chunks are multiplied in place in one batched
product (:func:`gansem.sharding.product_map_reduce`: no chunk copies, the same
bits); it is reduced with a column ``min`` followed by a first-index ``min``
taken over a float32 index (XLA's CPU argmin over the minor axis, and an int32
column ``min``, compile to much slower kernels); one block per chunk; Lloyd
updates the cluster sums from the rows whose label changed (after the first
passes a few percent of the rows, so the scatter-add over all N x D values is
paid once) and stops at an exact fixed point.

Entry points: :func:`kmeans_fit` is the jittable core (K-means++ then Lloyd, no
host reads); :func:`kmeans`, :func:`kmeans_plusplus_init` and :func:`lloyd` are
host-level drivers that check their arguments (e.g. K against the number of valid
rows) first. :func:`assign` is jittable. :func:`kmeans_fit_batched` solves many
small independent problems at once (one per image, rows of one problem on one
device; ``jax.vmap`` over problems), for methods that cluster each image's pixels
on their own; placing the batch of problems over devices is the caller's business.

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

    data = sharding.place_rows(feats, mesh)          # feats: [N, D] host array
    res = kmeans(jax.random.key(0), data, 100)
    res.centroids, res.labels, res.n_iter, res.converged
    res = jax.jit(lambda d: kmeans_fit(jax.random.key(0), d, 100))(data)   # the same, inside jit
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
    "kmeans_fit",
    "kmeans_fit_batched",
    "assign",
    "count_valid",
]

_METRICS = ("euclidean", "cosine")
_EPS = 1e-12
# Lloyd's cluster sums are updated from the rows whose label changed, gathered into
# one of these fractions of a chunk (the smallest that holds them; more: every row).
_DELTA_FRACTIONS = (64, 16, 4)


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
            or an exact fixed point was reached before ``max_iter``.
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


def _first_argmin_t(d):
    """Index of the first minimum of each column of ``d [K, n]`` (int32 ``[n]``).

    Same tie rule as ``argmin`` (lowest index), but as two vectorised column
    reductions, which XLA's CPU backend runs much faster than a variadic argmin.
    The index is reduced as float32 (exact for K < 2^24): an int32 column ``min``
    compiles to a much slower reduce-window.
    """
    k = d.shape[0]
    iota = jax.lax.broadcasted_iota(jnp.float32, d.shape, 0)
    d1 = jnp.min(d, axis=0)
    labels = jnp.min(jnp.where(d == d1[None, :], iota, float(k)), axis=0)
    return jnp.minimum(labels, k - 1).astype(jnp.int32)  # NaN rows: keep a valid id


def _labels(xb, centroids, c_sq):
    """First nearest centroid of each row of ``xb`` (``c_sq``: squared centroid norms)."""
    return _labels_from_products(centroids @ xb.T, c_sq)


def _labels_from_products(prod, c_sq):
    """First nearest centroid per column of ``prod = centroids @ rows.T [K, b]``."""
    return _first_argmin_t(c_sq[:, None] - 2.0 * prod)  # |x|^2 is constant per row


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
    return _own_sq_dist(xc, centroids, _labels(xc, centroids, jnp.sum(centroids * centroids, axis=-1)))


def _own_sq_dist(xc, centroids, labels):
    """``(labels, sum((x - c_label)^2))``: the distance recomputed directly, without cancellation error."""
    diff = xc - jnp.take(centroids, labels, axis=0)
    return labels, jnp.sum(diff * diff, axis=-1)


def _in_place(x, metric):
    """Whether products can be taken from ``x`` as stored (float32 rows, not normalised per chunk)."""
    return metric == "euclidean" and x.dtype == jnp.float32


def _nearest_pass(data, centroids, *, metric, row_args=(), partials=None):
    """Nearest centroid and squared distance of every row, one pass over the chunks.

    Euclidean float32 rows are multiplied in place (:func:`sharding.product_map_reduce`);
    cosine rows are normalised chunk by chunk first. ``partials(labels, dist,
    *row_chunk_args)`` (optional) adds per-chunk partial sums to the result.
    Returns ``((labels, dist), totals)``.
    """
    part = partials or (lambda *a: ())
    x, mesh, layout = data.x, data.mesh, data.layout
    if _in_place(x, metric):
        def fn(prod, rows, *rest):
            *rc, c = rest
            lc, dc = _own_sq_dist(rows.all(), c, _labels_from_products(prod, jnp.sum(c * c, axis=-1)))
            return (lc, dc), part(lc, dc, *rc)

        return sharding.product_map_reduce(fn, x, centroids, mesh, layout, row_args, (centroids,))

    def fn(xc, *rest):
        *rc, c = rest
        lc, dc = _nearest(_prep_rows(xc, metric), c)
        return (lc, dc), part(lc, dc, *rc)

    return sharding.row_map_reduce(fn, mesh, layout, (x,) + tuple(row_args), (centroids,))


def count_valid(data) -> int:
    """Number of valid rows of ``data`` (exact integer count) as a Python int. Host-level."""
    return int(_count_valid(data))


def _count_chunk(v):
    return jnp.sum(v > 0, dtype=jnp.int32)


@jax.jit
def _count_valid(data):
    # Jitted at module level: an eager shard_map would be re-traced on every call.
    return sharding.row_reduce(_count_chunk, data.mesh, data.layout, (data.valid,))


def _check_inputs(data, k):
    if not isinstance(data, sharding.RowData):
        raise TypeError(f"data must be a sharding.RowData (sharding.place_rows), got {type(data).__name__}")
    if data.x.ndim != 2:
        raise ValueError(f"data.x must be [N_pad, D], got shape {data.x.shape}")
    if k < 1:
        raise ValueError(f"number of clusters K must be >= 1, got {k}")
    n = count_valid(data)
    if k > n:
        raise ValueError(
            f"K={k} clusters requested but there are only {n} valid feature rows; lower K0 "
            "or use more images / a higher feature resolution"
        )


# -- public API ----------------------------------------------------------------------


def assign(data, centroids, *, metric="euclidean"):
    """Nearest-centroid assignment of every row. Jittable.

    Args:
        data: rows ``x [N_pad, D]`` (:class:`gansem.sharding.RowData`).
        centroids: ``[K, D]`` replicated centroids.
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        ``(labels [N_pad] int32, min_sq_dist [N_pad] float32)``, row-sharded.
    """
    _check_metric(metric)
    return _assign(data, jnp.asarray(centroids, jnp.float32), metric=metric)


@functools.partial(jax.jit, static_argnames=("metric",))
def _assign(data, centroids, *, metric):
    centroids = _prep_centroids(centroids, metric)
    return _nearest_pass(data, centroids, metric=metric)[0]


def kmeans_plusplus_init(key, data, k, *, metric="euclidean", n_trials=None):
    """Greedy K-means++ seeding (D^2 sampling), independent of the device count. Host-level driver.

    As in scikit-learn, each step draws ``n_trials`` (default ``2 + ln K``)
    candidates by D^2 sampling and keeps the one that lowers the potential
    (inertia) most; ``n_trials=1`` is plain k-means++ (as faiss), cheaper per
    step but with a worse start (8 % higher inertia after 20 Lloyd iterations on
    the 100-component benchmark mixture). Draws use inverse-CDF sampling
    (:func:`_sample_rows`): one uniform per candidate from ``fold_in(key, step)``
    and per-chunk cumulative sums of ``d_i`` (squared distance to the nearest
    chosen centroid, from precomputed row norms and one matmul per step), so the
    choice does not depend on the device count and no per-row random numbers are
    generated. Rows with ``d_i = 0`` and padding rows are never chosen; if every
    valid row has ``d_i = 0`` (fewer distinct rows than K) a uniformly random
    valid row is used.

    Args:
        key: PRNG key.
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        k: number of centroids.
        metric: ``"euclidean"`` or ``"cosine"`` (sampling on normalised rows).
        n_trials: candidates per step (``None``: ``2 + int(ln K)``, scikit-learn's rule).

    Returns:
        ``[K, D] float32`` centroids (rows of x, normalised for ``cosine``).

    Raises:
        ValueError: if ``k`` exceeds the number of valid rows or ``n_trials < 1``.
    """
    _check_metric(metric)
    _check_inputs(data, k)
    return _kmeans_pp(key, data, k=int(k), trials=_trials(k, n_trials), metric=metric)


def _trials(k, n_trials):
    trials = 2 + int(np.log(k)) if n_trials is None else int(n_trials)
    if trials < 1:
        raise ValueError(f"n_trials must be >= 1 (1 = plain k-means++), got {n_trials}")
    return trials


def _row_sq_norms(data, *, metric):
    """``[N_pad]`` squared norms of the rows as used by ``metric`` (1 for ``cosine``)."""
    return sharding.row_map(
        lambda xc: jnp.sum(jnp.square(_prep_rows(xc, metric)), axis=-1), data.mesh, data.layout, (data.x,)
    )


def _sample_rows(data, mass, u):
    """Rows drawn with probability proportional to ``mass`` (inverse CDF), device-invariant.

    Args:
        data: the rows (only their layout and mesh are used).
        mass: ``[N_pad] float32`` row-sharded non-negative row weights (0 on padding).
        u: ``[L] float32`` uniforms in [0, 1).

    Returns:
        ``(idx [L] int32, total () float32)``. Each chunk's inclusive cumulative
        sum is computed with the same shapes on every device count; a draw picks
        a chunk by the cumulative chunk totals, then a row inside it by binary
        search, so rows of zero mass are never chosen (``idx`` is arbitrary when
        ``total == 0``).
    """
    g, rows = data.layout.num_chunks, data.layout.chunk_rows
    cums = sharding.row_map(jnp.cumsum, data.mesh, data.layout, (mass,))  # [N_pad], per chunk
    cums = cums.reshape(g, rows)
    chunk_tot = cums[:, -1]  # [G]
    chunk_cum = jnp.cumsum(chunk_tot)
    total = chunk_cum[-1]
    # Keep every target strictly below the total it is compared with, so rounding can
    # never land on a zero-mass chunk (e.g. trailing padding) or row.
    target = jnp.minimum(u * total, jnp.nextafter(total, 0.0))
    c = jnp.clip(jnp.searchsorted(chunk_cum, target, side="right", method="compare_all"), 0, g - 1)  # [L]
    before = jnp.concatenate([jnp.zeros((1,), chunk_cum.dtype), chunk_cum[:-1]])[c]
    rest = jnp.clip(target - before, 0.0, jnp.nextafter(chunk_tot[c], 0.0))
    # compare_all: one vectorised pass over the chunk instead of a binary-search while loop
    # (XLA:CPU runs each loop step as separate small kernels)
    within = jax.vmap(lambda cc, r: jnp.searchsorted(cums[cc], r, side="right", method="compare_all"))(c, rest)
    within = jnp.clip(within, 0, rows - 1)
    return (c * rows + within).astype(jnp.int32), total


def _kmeans_pp_core(key, data, *, k, trials, metric):
    x, valid, mesh, layout = data.x, data.valid, data.mesh, data.layout
    dim = x.shape[1]
    x_sq = _row_sq_norms(data, metric=metric)

    def rows(idx):
        return _prep_rows(jnp.take(x, idx, axis=0), metric)

    def draw(step, d, n):
        """``n`` rows by D^2 sampling (uniformly among valid rows if every d is 0)."""
        u = jax.random.uniform(jax.random.fold_in(key, step), (n,))
        idx, total = _sample_rows(data, d * valid, u)
        return jax.lax.cond(
            total > 0,
            lambda: idx,
            lambda: _sample_rows(data, valid, u)[0],
        )

    def cand_dists(d, cand):
        """``[N_pad, L]`` squared distance to the nearest of (chosen centroids, candidate l), and
        the ``[L]`` potentials (sums over valid rows) in the same pass."""
        c_sq = jnp.sum(cand * cand, axis=-1)

        def finish(new, dc, vc):
            dist = jnp.minimum(dc[:, None], jnp.maximum(new, 0.0))
            return dist, jnp.sum(dist * vc[:, None], axis=0)

        if metric != "euclidean":
            def chunk(xc, xsc, dc, vc, cc, csq):
                xc = _prep_rows(xc, metric)
                return finish(xsc[:, None] - 2.0 * (xc @ cc.T) + csq[None, :], dc, vc)

            return sharding.row_map_reduce(chunk, mesh, layout, (x, x_sq, d, valid), (cand, c_sq))
        # The products without copying each chunk out (the copy costs as much as the product);
        # same bits as the per-chunk product. Several candidates are padded to 8 columns
        # (copies of the last candidate, dropped again): XLA:CPU multiplies 8 columns faster
        # than 6 (see benchmarks/README.md).
        pad = -trials % 8 if trials > 1 else 0
        cand_p = jnp.concatenate([cand, jnp.repeat(cand[-1:], pad, axis=0)]) if pad else cand
        prod = sharding.row_products(x, cand_p, mesh, layout)[:, :trials]

        def combine(pc, xsc, dc, vc, csq):
            return finish(xsc[:, None] - 2.0 * pc + csq[None, :], dc, vc)

        return sharding.row_map_reduce(combine, mesh, layout, (prod, x_sq, d, valid), (c_sq,))

    big = jnp.full((x.shape[0],), jnp.inf, jnp.float32)
    first = draw(0, jnp.ones_like(valid), 1)
    c0 = rows(first)
    d0 = cand_dists(big, c0)[0][:, 0]
    cents0 = jnp.zeros((k, dim), jnp.float32).at[0].set(c0[0])

    def body(i, carry):
        cents, d = carry
        cand = rows(draw(i, d, trials))  # [L, D]
        dist, pot = cand_dists(d, cand)  # [N_pad, L], [L]
        best = jnp.argmin(pot) if trials > 1 else 0
        return cents.at[i].set(cand[best]), dist[:, best]

    cents, _ = jax.lax.fori_loop(1, k, body, (cents0, d0))
    return cents


_kmeans_pp = functools.partial(jax.jit, static_argnames=("k", "trials", "metric"))(_kmeans_pp_core)


def lloyd(data, centroids, *, max_iter=20, tol=1e-4, metric="euclidean"):
    """Lloyd iterations from given centroids. Host-level driver (checks K against the valid rows).

    Stops when the L-inf shift of the centroids in one iteration is below
    ``tol`` or at a fixed point (no row changes cluster, so every further
    iteration would repeat the last one bit for bit; this also ends ``tol=0``
    runs early, as scikit-learn's "strict convergence" does), both
    ``converged=True``, or after ``max_iter`` iterations (``converged=False``).
    Labels, counts and inertia are those of the returned centroids (one final
    assignment pass).

    Each iteration is one pass over the rows: per chunk, the ``[K, rows]``
    distance block (for float32 euclidean rows from products taken in place,
    :func:`gansem.sharding.product_map_reduce`), the first minimum per column,
    and the change of the per-cluster sums and counts. The first pass sums
    every row (``segment_sum``); later passes gather only the rows whose label changed and move them from the
    old cluster to the new one (into the smallest of the buffers of 1/64, 1/16 or
    1/4 of the chunk that holds them; more changes: all rows, masked). The sums
    are therefore accumulated over iterations rather than recomputed: they agree
    with fresh sums to float32 rounding, and are bit-identical across device
    counts (each chunk's branch depends on its own rows only).

    Args:
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        centroids: ``[K, D]`` initial centroids.
        max_iter: iteration cap.
        tol: L-inf centroid-shift tolerance.
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        :class:`KMeansResult`.
    """
    _check_metric(metric)
    centroids = jnp.asarray(centroids, jnp.float32)
    _check_inputs(data, centroids.shape[0])
    return _lloyd(data, centroids, jnp.float32(tol), max_iter=int(max_iter), metric=metric)


def _capacities(rows: int) -> tuple[int, ...]:
    """Compaction sizes for the changed rows of a ``rows``-row chunk (ascending, each < rows)."""
    caps = sorted({-(-rows // f) for f in _DELTA_FRACTIONS})
    return tuple(c for c in caps if c < rows)


def _cluster_delta(rows, lc, oc, k):
    """Change of the per-cluster sums and counts of one chunk when its labels go from ``oc`` to ``lc``.

    ``k`` marks "no cluster" (padding rows; every row before the first pass). A
    chunk seen for the first time (all ``oc == k``) gets its sums directly; later,
    only the rows whose label changed are gathered (into the smallest of a few
    fixed sizes that holds them) and moved from the old cluster to the new one.
    Which branch runs depends on the chunk's data alone, so results are the same
    on any device count. ``rows`` is the chunk's :class:`sharding.ChunkRows`.
    Returns ``(dsums [K, D], dcounts [K] int32, changed () int32)``.
    """
    changed = lc != oc
    n_changed = jnp.sum(changed.astype(jnp.int32))
    caps = _capacities(lc.shape[0])

    def fresh():
        return (jax.ops.segment_sum(rows.all(), lc, num_segments=k),
                jax.ops.segment_sum(jnp.ones_like(lc), lc, num_segments=k))

    def move(rows, new, old):
        one = jnp.ones_like(new)
        return (jax.ops.segment_sum(rows, new, num_segments=k) - jax.ops.segment_sum(rows, old, num_segments=k),
                jax.ops.segment_sum(one, new, num_segments=k) - jax.ops.segment_sum(one, old, num_segments=k))

    def compact(cap):
        def run():
            idx = jnp.nonzero(changed, size=cap, fill_value=0)[0]
            live = jnp.arange(cap) < n_changed
            return move(rows.take(idx), jnp.where(live, lc[idx], k), jnp.where(live, oc[idx], k))

        return run

    def every_row():
        return move(rows.all(), jnp.where(changed, lc, k), jnp.where(changed, oc, k))

    first = jnp.all(oc == k)
    # compare_all: a handful of vectorised compares instead of a binary-search while loop
    pos = jnp.searchsorted(jnp.asarray(caps, jnp.int32), n_changed, side="left", method="compare_all")
    tier = jnp.where(first, 0, 1 + pos)
    dsums, dcounts = jax.lax.switch(tier, [fresh] + [compact(c) for c in caps] + [every_row])
    return dsums, dcounts, n_changed


def _lloyd_core(data, centroids, tol, *, max_iter, metric):
    x, valid, mesh, layout = data.x, data.valid, data.mesh, data.layout
    k = centroids.shape[0]
    centroids = _prep_centroids(centroids, metric)

    def step_products(prod, rows, vc, oc, c):
        # One pass over the chunk: nearest centroid (padding rows get the out-of-range id k),
        # then the change of the per-cluster sums since the previous labels ``oc``.
        lc = jnp.where(vc > 0, _labels_from_products(prod, jnp.sum(c * c, axis=-1)), k)
        return lc, _cluster_delta(rows, lc, oc, k)

    def step_rows(xc, vc, oc, c):  # cosine / not float32: rows prepared chunk by chunk
        xc = _prep_rows(xc, metric)
        return step_products(c @ xc.T, sharding.ChunkRows(xc), vc, oc, c)

    def labels_pass(c, labels):
        if _in_place(x, metric):  # chunks multiplied in place, rows gathered only where they moved
            return sharding.product_map_reduce(step_products, x, c, mesh, layout, (valid, labels), (c,))
        return sharding.row_map_reduce(step_rows, mesh, layout, (x, valid, labels), (c,))

    def own_dist(xc, lc, cc):
        # Distance of each row to the centroid it was just assigned (labels are carried: no second argmin).
        diff = _prep_rows(xc, metric) - jnp.take(cc, jnp.minimum(lc, k - 1), axis=0)
        return jnp.sum(diff * diff, axis=-1)

    def reseed(c, sums, counts, labels):
        empty = counts == 0
        dist = sharding.row_map(own_dist, mesh, layout, (x, labels), (c,))
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
        # The moved rows now belong to the clusters they re-seeded (the next pass starts from these labels).
        labels = labels.at[jnp.where(empty, pick, labels.shape[0])].set(jnp.arange(k, dtype=labels.dtype),
                                                                        mode="drop")
        return sums, counts, labels

    def body(carry):
        c, it, _, sums, counts, labels, _ = carry
        labels, (dsums, dcounts, n_changed) = labels_pass(c, labels)
        # No label changed: a fixed point. The sums, centroids and assignment would repeat
        # bit for bit, so stopping here gives exactly the result of running on.
        fixed = (it > 0) & (n_changed == 0)
        sums, counts = sums + dsums, counts + dcounts
        sums, counts, labels = jax.lax.cond(
            jnp.any(counts == 0), reseed, lambda c_, s_, n_, l_: (s_, n_, l_), c, sums, counts, labels
        )
        new = sums / jnp.maximum(counts, 1).astype(jnp.float32)[:, None]
        new = _prep_centroids(new, metric)
        new = jnp.where(fixed, c, new)
        return new, it + 1, jnp.max(jnp.abs(new - c)), sums, counts, labels, fixed

    def cond(carry):
        _, it, shift, _, _, _, fixed = carry
        return (it < max_iter) & (shift >= tol) & ~fixed

    dim = centroids.shape[1]
    c, n_iter, shift, _, _, _, fixed = jax.lax.while_loop(
        cond, body,
        (centroids, jnp.int32(0), jnp.float32(jnp.inf), jnp.zeros((k, dim), jnp.float32),
         jnp.zeros((k,), jnp.int32), jnp.full_like(valid, k, dtype=jnp.int32), jnp.bool_(False)),
    )

    def final(lc, dc, vc):
        counts = jax.ops.segment_sum((vc > 0).astype(jnp.int32), lc, num_segments=k)
        return counts, jnp.sum(dc * vc)

    (labels, _), (counts, inertia) = _nearest_pass(data, c, metric=metric, row_args=(valid,), partials=final)
    return KMeansResult(
        centroids=c,
        labels=labels,
        counts=counts.astype(jnp.float32),
        inertia=inertia,
        n_iter=n_iter,
        converged=(shift < tol) | fixed,
    )


_lloyd = functools.partial(jax.jit, static_argnames=("max_iter", "metric"))(_lloyd_core)


def kmeans(key, data, k, *, max_iter=20, tol=1e-4, metric="euclidean"):
    """K-means++ seeding followed by Lloyd iterations. Host-level driver.

    Checks the arguments (``k`` against the number of valid rows, which it reads
    back), then runs the same computation as :func:`kmeans_fit`.

    Args:
        key: PRNG key for the seeding.
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        k: number of clusters (at most the number of valid rows).
        max_iter, tol: Lloyd stopping rule (L-inf centroid shift).
        metric: ``"euclidean"`` or ``"cosine"`` (spherical K-means).

    Returns:
        :class:`KMeansResult`.

    Raises:
        ValueError: if ``k`` exceeds the number of valid rows (lower K0 or use
            more images / a higher resolution).
    """
    init = kmeans_plusplus_init(key, data, k, metric=metric)
    return lloyd(data, init, max_iter=max_iter, tol=tol, metric=metric)


def kmeans_fit(key, data, k: int, *, max_iter: int = 20, tol=1e-4, metric: str = "euclidean",
               n_trials=None) -> KMeansResult:
    """K-means++ seeding followed by Lloyd iterations. Jittable.

    The core of :func:`kmeans` without its argument checks: ``k``, ``max_iter``,
    ``metric`` and ``n_trials`` are static, ``key``, ``data`` and ``tol`` may be traced.
    The caller guarantees ``1 <= k <=`` the number of valid rows (with fewer valid
    rows than ``k``, some centroids repeat rows).

    Args:
        key: PRNG key for the seeding.
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        k: number of clusters.
        max_iter, tol: Lloyd stopping rule (L-inf centroid shift).
        metric: ``"euclidean"`` or ``"cosine"``.
        n_trials: K-means++ candidates per step (see :func:`kmeans_plusplus_init`).

    Returns:
        :class:`KMeansResult`.
    """
    _check_metric(metric)
    init = _kmeans_pp(key, data, k=int(k), trials=_trials(k, n_trials), metric=metric)
    return _lloyd(data, init, jnp.float32(tol), max_iter=int(max_iter), metric=metric)


# -- many small problems at once -------------------------------------------------------


def _dense_sample(key, mass):
    """One row index drawn with probability proportional to ``mass [N]`` (uniform if all 0), inverse CDF."""
    cum = jnp.cumsum(mass)
    total = cum[-1]
    uniform = total <= 0
    cum = jnp.where(uniform, jnp.arange(1, mass.shape[0] + 1, dtype=jnp.float32), cum)
    total = cum[-1]
    target = jnp.minimum(jax.random.uniform(key, ()) * total, jnp.nextafter(total, 0.0))
    idx = jnp.searchsorted(cum, target, side="right", method="compare_all")
    return jnp.clip(idx, 0, mass.shape[0] - 1).astype(jnp.int32)


def _dense_kmeans(key, x, *, k, trials, max_iter, tol, metric):
    """One problem: greedy K-means++ then Lloyd on rows ``x [N, D]`` held whole. Returns a :class:`KMeansResult`."""
    x = _prep_rows(x, metric)  # [N, D]
    n, dim = x.shape
    x_sq = jnp.sum(x * x, axis=-1)  # [N]

    def dists_to(c):  # [L, D] -> [L, N] squared distances, clipped at 0
        return jnp.maximum(x_sq[None, :] - 2.0 * (c @ x.T) + jnp.sum(c * c, axis=-1)[:, None], 0.0)

    first = _dense_sample(jax.random.fold_in(key, 0), jnp.zeros((n,), jnp.float32))
    d0 = dists_to(x[first][None])[0]
    cents0 = jnp.zeros((k, dim), jnp.float32).at[0].set(x[first])

    def seed_step(i, carry):
        cents, d = carry
        keys = jax.random.split(jax.random.fold_in(key, i), trials)
        cand = x[jax.vmap(_dense_sample, in_axes=(0, None))(keys, d)]  # [L, D]
        dist = jnp.minimum(d[None, :], dists_to(cand))  # [L, N]
        best = jnp.argmin(jnp.sum(dist, axis=1))  # the candidate that lowers the potential most
        return cents.at[i].set(cand[best]), dist[best]

    cents, _ = jax.lax.fori_loop(1, k, seed_step, (cents0, d0))
    cents = _prep_centroids(cents, metric)

    def assign_rows(c):
        return _nearest(x, c)  # labels [N], squared distances [N]

    def update(c):
        labels, dist = assign_rows(c)
        onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32)  # [N, K]
        sums = sharding.rows_tdot(onehot, x)  # NK.ND = KD, summed in a fixed order
        counts = jnp.sum(onehot, axis=0)  # [K], exact integers
        new = _prep_centroids(sums / jnp.maximum(counts, 1.0)[:, None], metric)
        # Empty clusters take the farthest rows (the j-th empty cluster the j-th farthest row).
        empty = counts == 0
        far = jax.lax.top_k(dist, k)[1]  # [K]
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        new = jnp.where(empty[:, None], x[far[rank]], new)
        return new, labels

    def cond(carry):
        _, _, it, done = carry
        return (it < max_iter) & ~done

    def body(carry):
        c, old_labels, it, _ = carry
        new, labels = update(c)
        done = (jnp.max(jnp.abs(new - c)) <= tol) | jnp.all(labels == old_labels)
        return new, labels, it + 1, done

    init = (cents, jnp.full((n,), -1, jnp.int32), jnp.int32(0), jnp.bool_(False))
    cents, _, n_iter, converged = jax.lax.while_loop(cond, body, init)
    labels, dist = assign_rows(cents)
    counts = jnp.sum(jax.nn.one_hot(labels, k, dtype=jnp.float32), axis=0)
    return KMeansResult(centroids=cents, labels=labels, counts=counts, inertia=jnp.sum(dist),
                        n_iter=n_iter, converged=converged)


def kmeans_fit_batched(keys, x, k: int, *, max_iter: int = 20, tol=1e-4, metric: str = "euclidean",
                       n_trials=None) -> KMeansResult:
    """K-means++ then Lloyd on ``B`` independent small problems at once. Jittable, vmapped over problems.

    The per-problem algorithm is that of :func:`kmeans_fit` (greedy K-means++ with
    ``n_trials`` candidates per step, Lloyd stopping at a fixed point or when the
    L-inf centroid shift is below ``tol``, empty clusters re-seeded with the farthest
    rows), but every problem's rows are held whole on one device, as one image's
    pixels are: no row sharding, no padding. Sums over rows are taken with
    :func:`gansem.sharding.rows_tdot` (fixed summation order), so with threefry keys (JAX's
    default; ``rbg`` draws change under ``vmap``) a problem's result does not depend on which
    other problems share its batch or device. Spread the
    batch over devices by sharding its leading axis (e.g. with
    :func:`gansem.batching.map_batches`).

    Args:
        keys: ``[B]`` PRNG keys, one per problem.
        x: ``[B, N, D]`` rows of each problem.
        k: number of clusters (static; the caller guarantees ``1 <= k <= N``).
        max_iter, tol: Lloyd stopping rule.
        metric: ``"euclidean"`` or ``"cosine"``.
        n_trials: K-means++ candidates per step (``None``: ``2 + int(ln K)``).

    Returns:
        :class:`KMeansResult` whose fields have a leading ``[B]`` axis: ``centroids [B, K, D]``,
        ``labels [B, N]`` int32, ``counts [B, K]``, ``inertia [B]``, ``n_iter [B]``, ``converged [B]``.
    """
    _check_metric(metric)
    if x.ndim != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    if not 1 <= int(k) <= x.shape[1]:
        raise ValueError(f"k must be in [1, {x.shape[1]}] (rows per problem), got {k}")
    fit = functools.partial(_dense_kmeans, k=int(k), trials=_trials(k, n_trials), max_iter=int(max_iter),
                            tol=jnp.float32(tol), metric=metric)
    return jax.vmap(fit)(keys, jnp.asarray(x, jnp.float32))
