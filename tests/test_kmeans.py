"""K-means++ and Lloyd (gansem.cluster.kmeans) against scikit-learn and numpy."""

import os
import re

_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.cluster import kmeans  # noqa: E402

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def _place(x, n_dev, max_chunk_rows=64):
    mesh = sharding.make_mesh(n_dev)
    layout = sharding.plan_rows(x.shape[0], n_dev, max_chunk_rows=max_chunk_rows)
    return sharding.place_rows(x, mesh, layout)


def _blobs(rng, n=600, d=5, k=4, spread=6.0, offset=3.0):
    centers = rng.standard_normal((k, d)) * spread + offset
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def test_lloyd_matches_sklearn(rng):
    x, _ = _blobs(rng, k=5)
    init = x[rng.choice(len(x), 5, replace=False)]
    data = _place(x, 8)
    res = kmeans.lloyd(data, init, max_iter=300, tol=1e-5)
    ref = sklearn_cluster.KMeans(5, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(x)
    n = len(x)
    assert bool(res.converged)
    np.testing.assert_array_equal(np.asarray(res.labels)[:n], ref.labels_)
    np.testing.assert_allclose(float(res.inertia), ref.inertia_, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.centroids), ref.cluster_centers_, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.counts), np.bincount(ref.labels_, minlength=5))


def test_assign_matches_numpy(rng):
    x, _ = _blobs(rng, n=300)
    c = x[:7]
    data = _place(x, 8)
    labels, dist = kmeans.assign(data, c)
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(labels)[:300], d.argmin(1))
    np.testing.assert_allclose(np.asarray(dist)[:300], d.min(1), rtol=1e-5, atol=1e-4)


def test_spherical_kmeans_matches_numpy(rng):
    x, _ = _blobs(rng, n=400, d=6, k=3, offset=0.0)
    init = x[:3]
    data = _place(x, 8)
    res = kmeans.lloyd(data, init, max_iter=50, tol=1e-5, metric="cosine")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    for _ in range(50):
        lab = (xn @ c.T).argmax(1)
        c = np.stack([xn[lab == j].sum(0) for j in range(3)])
        c /= np.linalg.norm(c, axis=1, keepdims=True)
    lab = (xn @ c.T).argmax(1)
    np.testing.assert_array_equal(np.asarray(res.labels)[:400], lab)
    np.testing.assert_allclose(np.asarray(res.centroids), c, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(res.centroids), axis=1), 1.0, rtol=1e-6)


def test_kmeans_plusplus_quality_vs_sklearn(rng):
    x, _ = _blobs(rng, n=800, d=4, k=8, spread=10.0)
    data = _place(x, 8)
    ours, theirs = [], []
    for seed in range(3):
        init = kmeans.kmeans_plusplus_init(jax.random.key(seed), data, 8)
        init = np.asarray(init)
        # Every seed is a distinct real row (never padding, never a duplicate).
        idx = [np.flatnonzero((x == row).all(1)) for row in init]
        assert all(len(i) >= 1 for i in idx)
        assert len({int(i[0]) for i in idx}) == 8
        ours.append(float(kmeans.kmeans(jax.random.key(seed), data, 8,
                                        max_iter=100).inertia))
        theirs.append(sklearn_cluster.KMeans(8, n_init=1, random_state=seed).fit(x).inertia_)
    assert np.median(ours) <= 1.1 * np.median(theirs)


def test_empty_cluster_is_reseeded_like_sklearn(rng):
    x, _ = _blobs(rng, n=500, d=3, k=3)
    init = np.concatenate([x[:3], np.full((1, 3), 1e3, np.float32)])  # 4th centroid gets no rows
    data = _place(x, 8)
    res = kmeans.lloyd(data, init, max_iter=100, tol=1e-5)
    ref = sklearn_cluster.KMeans(4, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=100).fit(x)
    c = np.asarray(res.centroids)
    assert np.isfinite(c).all() and (np.abs(c).sum(1) > 0).all()
    assert (np.asarray(res.counts) > 0).all()
    np.testing.assert_allclose(float(res.inertia), ref.inertia_, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(res.labels)[:500], ref.labels_)


def test_too_many_clusters_is_a_clear_error(rng):
    x, _ = _blobs(rng, n=20)
    data = _place(x, 8)
    with pytest.raises(ValueError, match="lower K0"):
        kmeans.kmeans(jax.random.key(0), data, 21)


def test_one_and_eight_devices_bitwise_equal(rng):
    x, _ = _blobs(rng, n=700, d=6, k=6)
    out = []
    for n_dev in (1, 8):
        data = _place(x, n_dev)
        res = kmeans.kmeans(jax.random.key(3), data, 6, max_iter=30)
        out.append(jax.tree.map(np.asarray, res))
    a, b = out
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels[:700], b.labels[:700])
    assert a.inertia.tobytes() == b.inertia.tobytes()
    assert int(a.n_iter) == int(b.n_iter)


def test_row_products_equal_the_per_chunk_product_on_every_device_count(rng):
    """The k-means++ candidate products (no chunk copies) keep row_map's bits and its device invariance."""
    x = rng.standard_normal((3000, 300)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((6, 300)).astype(np.float32))
    first = None
    for n_dev in (1, 2, 8):
        data = _place(x, n_dev, max_chunk_rows=512)
        xs, mesh, layout = data.x, data.mesh, data.layout
        got = np.asarray(sharding.row_products(xs, w, mesh, layout))
        per_chunk = jax.jit(lambda a, b: sharding.row_map(lambda xc, wc: xc @ wc.T, mesh, layout, (a,), (b,)))
        np.testing.assert_array_equal(got, np.asarray(per_chunk(xs, w)))
        np.testing.assert_allclose(got[:3000], x @ np.asarray(w).T, rtol=1e-4, atol=1e-3)
        first = got if first is None else first
        np.testing.assert_array_equal(got, first)


def test_product_map_reduce_keeps_the_per_chunk_bits_on_every_device_count(rng):
    """Lloyd's in-place pass: each chunk's products equal ``w @ chunk.T`` taken chunk by chunk (seen
    through the exact column min and first argmin Lloyd takes of them), the row view reads the
    chunk's own rows, and everything is the same on 1, 2 and 8 devices."""
    x = rng.standard_normal((3000, 300)).astype(np.float32)
    w_np = rng.standard_normal((37, 300)).astype(np.float32)
    w = jnp.asarray(w_np)

    def columns(prod):
        return jnp.min(prod, axis=0), kmeans._first_argmin_t(prod)

    def fn(prod, rows, vc, wc):
        back = jnp.arange(rows.size, dtype=jnp.int32)[::-1]  # the chunk's rows in reverse, gathered
        return (columns(prod), rows.take(back), rows.all()), (jnp.sum(rows.all() * vc[:, None], axis=0),)

    def per_chunk(xc, vc, wc):
        return (columns(wc @ xc.T), xc[::-1], xc), (jnp.sum(xc * vc[:, None], axis=0),)

    first = None
    for n_dev in (1, 2, 8):
        data = _place(x, n_dev, max_chunk_rows=512)
        xs, valid, mesh, layout = data.x, data.valid, data.mesh, data.layout
        got = jax.jit(lambda a, v, b: sharding.product_map_reduce(fn, a, b, mesh, layout, (v,), (b,)))(xs, valid, w)
        want = jax.jit(lambda a, v, b: sharding.row_map_reduce(per_chunk, mesh, layout, (a, v), (b,)))(xs, valid, w)
        got, want = jax.tree.map(np.asarray, (got, want))
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, e)
        ((low, arg), _, rows), (total,) = got
        np.testing.assert_array_equal(rows[:3000], x)
        np.testing.assert_allclose(low[:3000], (x @ w_np.T).min(1), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(total, x.sum(0), rtol=1e-4, atol=1e-3)
        first = got if first is None else first
        for g, f in zip(jax.tree.leaves(got), jax.tree.leaves(first)):
            np.testing.assert_array_equal(g, f)


def test_dsquared_sampling_matches_probabilities(rng):
    """Inverse-CDF sampling picks row i with probability mass_i / sum(mass), never a zero-mass row."""
    n = 200
    mass = rng.uniform(0.0, 1.0, n).astype(np.float32)
    mass[::7] = 0.0
    data = _place(np.zeros((n, 1), np.float32), 8, max_chunk_rows=16)
    m = np.zeros(data.padded_rows, np.float32)
    m[:n] = mass
    m_dev = jax.device_put(m, data.x.sharding)
    draws = 20000
    u = jax.random.uniform(jax.random.key(0), (draws,))
    idx, total = kmeans._sample_rows(data, m_dev, u)
    idx = np.asarray(idx)
    np.testing.assert_allclose(float(total), mass.sum(dtype=np.float64), rtol=1e-5)
    assert idx.min() >= 0 and idx.max() < n
    counts = np.bincount(idx, minlength=n)
    assert counts[mass == 0].sum() == 0
    # Targets at the very top of the range stay on real rows (trailing chunks are padding).
    top = jnp.asarray([np.nextafter(np.float32(1.0), np.float32(0.0))] * 3, jnp.float32)
    idx_top, _ = kmeans._sample_rows(data, m_dev, top)
    assert all(mass[int(i)] > 0 for i in np.asarray(idx_top))
    expected = draws * mass / mass.sum()
    ok = expected > 0
    chi2 = float((((counts - expected) ** 2)[ok] / expected[ok]).sum())
    dof = int(ok.sum()) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof)  # ~5 sigma of the chi-square distribution


def test_plain_and_greedy_kmeans_plusplus_pick_distinct_rows(rng):
    x, _ = _blobs(rng, n=400, d=4, k=8, spread=10.0)
    data = _place(x, 8)
    for trials in (1, 3):
        init = np.asarray(kmeans.kmeans_plusplus_init(jax.random.key(1), data, 8, n_trials=trials))
        idx = {int(np.flatnonzero((x == row).all(1))[0]) for row in init}
        assert len(idx) == 8
    with pytest.raises(ValueError, match="n_trials"):
        kmeans.kmeans_plusplus_init(jax.random.key(1), data, 8, n_trials=0)


def test_duplicate_rows_fall_back_to_uniform_valid_rows(rng):
    """Fewer distinct rows than K: seeding still returns K real rows (no padding, no NaN)."""
    x = np.repeat(rng.standard_normal((3, 4)).astype(np.float32), 10, axis=0)  # 3 distinct rows
    data = _place(x, 8)
    init = np.asarray(kmeans.kmeans_plusplus_init(jax.random.key(0), data, 5))
    assert np.isfinite(init).all()
    assert all((x == row).all(1).any() for row in init)
    assert len({tuple(r) for r in init}) == 3


def test_large_chunks_match_numpy(rng):
    """Chunks of 8192 rows (one distance block each) match numpy exactly."""
    n = 8 * 8192
    x, _ = _blobs(rng, n=n, d=3, k=4)
    c = x[:6]
    data = _place(x, 8, max_chunk_rows=8192)
    assert data.layout.chunk_rows == 8192
    labels, dist = kmeans.assign(data, c)
    d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    lab = np.asarray(labels)[:n]
    # Rows whose two nearest centroids are closer than float32 rounding may go either way.
    srt = np.sort(d, 1)
    clear = srt[:, 1] - srt[:, 0] > 1e-3 * (1 + srt[:, 0])
    np.testing.assert_array_equal(lab[clear], d.argmin(1)[clear])
    np.testing.assert_allclose(np.asarray(dist)[:n], d[np.arange(n), lab], rtol=1e-5, atol=1e-4)


def test_fixed_point_stops_early_with_identical_result(rng):
    """Lloyd stops at a fixed point (tol=0): same result as a run that could not stop there."""
    x, y = _blobs(rng, n=500, d=4, k=4, spread=3.0)
    init = x[[int(np.flatnonzero(y == j)[0]) for j in range(4)]]  # one row per blob: no empty cluster
    data = _place(x, 8)
    res = kmeans.lloyd(data, init, max_iter=100, tol=0.0)
    assert bool(res.converged) and int(res.n_iter) < 100
    # Reference: plain numpy Lloyd for exactly 100 iterations from the same init.
    c = init.astype(np.float64)
    for _ in range(100):
        lab = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[lab == j].mean(0) for j in range(4)])
    np.testing.assert_array_equal(np.asarray(res.labels)[:500], lab)
    np.testing.assert_allclose(np.asarray(res.centroids), c, rtol=1e-5, atol=1e-5)
    # Stopping one iteration short of the fixed point reports not converged.
    n = int(res.n_iter)
    short = kmeans.lloyd(data, init, max_iter=n - 1, tol=0.0)
    assert not bool(short.converged) and int(short.n_iter) == n - 1


def test_one_and_eight_devices_bitwise_equal_large_chunks(rng):
    """Device invariance also holds for large chunks and plain k-means++."""
    x, _ = _blobs(rng, n=8 * 4200, d=3, k=5)
    out = []
    for n_dev in (1, 8):
        data = _place(x, n_dev, max_chunk_rows=8400)
        init = kmeans.kmeans_plusplus_init(jax.random.key(2), data, 5, n_trials=1)
        res = kmeans.lloyd(data, init, max_iter=5)
        out.append(jax.tree.map(np.asarray, res))
    a, b = out
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia.tobytes() == b.inertia.tobytes()


@pytest.mark.parametrize("n_changed", [0, 1, 4, 10, 40, 200, 250, "first"])
def test_cluster_delta_every_branch_matches_numpy(rng, n_changed):
    """The per-chunk change of the cluster sums is exact for each buffer size and the fallbacks.

    256 rows: buffers of 4, 16 and 64 rows; 0-4 changes fit the smallest, 10 the
    next, 40 the largest, 200 and 250 (every valid row) take the all-rows path; "first" is a chunk
    never counted before (every old label is the "no cluster" id).
    """
    rows, d, k = 256, 7, 5
    assert kmeans._capacities(rows) == (4, 16, 64)  # 0-4 changes: smallest buffer
    xc = rng.standard_normal((rows, d)).astype(np.float32)
    old = rng.integers(0, k, rows).astype(np.int32)
    old[-6:] = k  # padding rows stay "no cluster"
    new = old.copy()
    if n_changed == "first":
        old = np.full(rows, k, np.int32)
        new[:] = rng.integers(0, k, rows)
        new[-6:] = k
    else:
        pick = rng.choice(rows - 6, n_changed, replace=False)
        new[pick] = (old[pick] + rng.integers(1, k, n_changed)) % k
    # The chunk is read in place from the middle of a larger block, as in Lloyd's pass.
    block = np.concatenate([rng.standard_normal((rows, d)), xc, rng.standard_normal((rows, d))]).astype(np.float32)
    ds, dn, nc = jax.jit(lambda b, n, o: kmeans._cluster_delta(sharding.ChunkRows(b, rows, rows), n, o, k))(
        block, new, old)
    want_s = np.zeros((k, d))
    want_n = np.zeros(k, np.int64)
    for r in range(rows):
        if new[r] != old[r]:
            if new[r] < k:
                want_s[new[r]] += xc[r]
                want_n[new[r]] += 1
            if old[r] < k:
                want_s[old[r]] -= xc[r]
                want_n[old[r]] -= 1
    assert int(nc) == int((new != old).sum())
    np.testing.assert_array_equal(np.asarray(dn), want_n)
    np.testing.assert_allclose(np.asarray(ds), want_s, rtol=1e-5, atol=1e-5)


def test_lloyd_sums_stay_exact_over_many_iterations(rng):
    """Sums accumulated from changed rows over many iterations end where fresh sums would (numpy, float64)."""
    x, _ = _blobs(rng, n=3000, d=6, k=8, spread=1.5)
    init = x[:8]
    data = _place(x, 8, max_chunk_rows=256)
    res = kmeans.lloyd(data, init, max_iter=60, tol=0.0)
    c = init.astype(np.float64)
    for _ in range(int(res.n_iter)):
        lab = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(8)])
    assert int(res.n_iter) > 5
    np.testing.assert_allclose(np.asarray(res.centroids), c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.counts), np.bincount(lab, minlength=8))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmeans_fit_under_jit_matches_the_host_driver(rng, metric):
    # The jittable core inside a user's jax.jit: the same result as the host-level kmeans().
    x, _ = _blobs(rng, n=500, k=4)
    data = _place(x, 8)
    host = kmeans.kmeans(jax.random.key(5), data, 4, max_iter=25, metric=metric)
    fit = jax.jit(lambda key, d: kmeans.kmeans_fit(key, d, 4, max_iter=25, metric=metric))(jax.random.key(5), data)
    for a, b in zip(host, fit):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(fit.n_iter) >= 1 and bool(fit.converged)
