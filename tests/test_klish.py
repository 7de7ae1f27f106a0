"""KLiSH merge loop (gansem.cluster.klish): Eq. 4, Eq. 5, merge rule, resume, devices."""

import os
import re

_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.cluster import klish  # noqa: E402


def _place(x, labels=None, n_dev=8, max_chunk_rows=128):
    """``RowData`` of ``x`` (and the placed labels, if given)."""
    mesh = sharding.make_mesh(n_dev)
    layout = sharding.plan_rows(x.shape[0], n_dev, max_chunk_rows=max_chunk_rows)
    data = sharding.place_rows(x, mesh, layout)
    return data if labels is None else (data, data.place(labels.astype(np.int32)))


def _blobs(seed, n=600, d=3, k=4, spread=8.0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * spread
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.mark.parametrize("k", [5, 20])  # statistics over 16 and 32 of the 32 score columns
def test_iou_and_ecos_match_numpy(rng, k):
    n, d = 257, 4
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    W = rng.standard_normal((k, d)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    data, ls = _place(x, y, max_chunk_rows=16)
    iou, ecos, hinge = klish.merge_statistics(W, b, data, ls)
    s = x.astype(np.float64) @ W.T + b
    sign = np.where(y[:, None] == np.arange(k)[None, :], 1.0, -1.0)
    np.testing.assert_allclose(np.asarray(hinge), (np.maximum(0, 1 - sign * s) ** 2).sum(0), rtol=1e-5)
    ref_iou = []
    for j in range(k):
        pred, gt = s[:, j] > 0, y == j
        ref_iou.append((pred & gt).sum() / (pred | gt).sum())
    conf = np.clip((s + 1) / 2, 0, 1)
    assert (conf == 0).any() and (conf == 1).any()  # the clamp is exercised
    ref_ecos = np.array([[conf[:, i] @ conf[:, j] / np.linalg.norm(conf[:, i]) / np.linalg.norm(conf[:, j])
                          for j in range(k)] for i in range(k)])
    np.testing.assert_allclose(np.asarray(iou), ref_iou, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ecos), ref_ecos, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(klish.cluster_iou(W, b, data, ls)),
                               ref_iou, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(klish.ecos_matrix(W, b, data)),
                               ref_ecos, rtol=1e-5)


def test_iou_by_hand():
    # 1-D points, one classifier s = x: positives predicted at x > 0.
    x = np.array([[-2.0], [-1.0], [1.0], [2.0], [3.0]], np.float32)
    y = np.array([0, 1, 1, 0, 1])  # class 1 = {-1, 1, 3}: intersection {1, 3}, union {-1, 1, 2, 3}
    W = np.array([[-1.0], [1.0]], np.float32)
    b = np.zeros(2, np.float32)
    data, ls = _place(x, y, max_chunk_rows=8)
    iou = np.asarray(klish.cluster_iou(W, b, data, ls))
    np.testing.assert_allclose(iou, [1 / 3, 2 / 4], rtol=1e-6)  # class 0: S={-2,-1}, Y={-2,2}


def test_merge_rule_and_bookkeeping():
    iou = np.array([0.9, 0.2, 0.95, 0.5])
    ecos = np.eye(4)
    ecos[1, 3] = ecos[3, 1] = 0.7
    ecos[1, 0] = ecos[0, 1] = 0.4
    assert klish.select_merge(iou, ecos) == (1, 3)
    # Separability filter: logit below mean - std is dropped.
    keep, logits, thr = klish.separability_filter(np.array([0.9, 0.95, 0.1, 0.92, 1.0]))
    m = np.log(np.clip([0.9, 0.95, 0.1, 0.92, 1.0], 1e-6, 1 - 1e-6))
    m = m - np.log1p(-np.clip([0.9, 0.95, 0.1, 0.92, 1.0], 1e-6, 1 - 1e-6))
    np.testing.assert_allclose(logits, m)
    np.testing.assert_array_equal(keep, m >= m.mean() - m.std())
    assert not keep[2]


@pytest.mark.slow
def test_step_merges_labels_weights_and_ids():
    x, _ = _blobs(0, n=400, k=4)
    data = _place(x)
    state, info = klish.klish_init(jax.random.key(0), data, 6,
                                   filter_clusters=False)
    sizes = np.asarray(state.sizes)
    assert (np.diff(sizes) <= 0).all() and sizes.sum() == 400
    new, rec = klish.klish_step(state, data)
    p, q = rec.p, rec.q
    assert (p, q) == klish.select_merge(rec.iou, rec.ecos)
    assert rec.k == 6 and rec.W.shape == (6, 3) and rec.ecos.shape == (6, 6)
    old = np.asarray(state.labels)[:400]
    expect = old.copy()
    expect[old == p] = q
    expect = expect - (expect > p)
    np.testing.assert_array_equal(np.asarray(new.labels)[:400], expect)
    np.testing.assert_array_equal(np.asarray(new.W), np.delete(rec.W, p, 0))
    np.testing.assert_array_equal(np.asarray(new.sizes), np.bincount(expect, minlength=5))
    assert rec.merged_ids == (q, p, 6)
    assert int(np.asarray(new.ids)[q - (q > p)]) == 6
    assert np.asarray(new.stale).sum() == 1 and np.asarray(new.stale)[q - (q > p)]


def _records_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for f in klish.MergeRecord._fields:
            va, vb = getattr(ra, f), getattr(rb, f)
            if isinstance(va, np.ndarray):
                assert va.tobytes() == vb.tobytes(), f
            elif isinstance(va, float):
                assert np.float32(va).tobytes() == np.float32(vb).tobytes() or va == vb, f
            else:
                assert va == vb, f


@pytest.fixture(scope="module")
def full_run():
    x, y = _blobs(1, n=500, k=4)
    data = _place(x)
    recs = klish.run_klish(jax.random.key(1), data, 6)
    return x, recs


@pytest.mark.slow
def test_resume_is_bitwise_identical(full_run):
    x, recs = full_run
    data = _place(x)
    state, _ = klish.klish_init(jax.random.key(1), data, 6)
    first = []
    for _ in range(3):
        state, rec = klish.klish_step(state, data)
        first.append(rec)
    # Simulate a checkpoint round trip through host memory.
    state = state._replace(
        W=jnp.asarray(np.asarray(state.W)), b=jnp.asarray(np.asarray(state.b)),
        labels=data.place(np.asarray(state.labels)[:500]),
    )
    rest = klish.run_klish(None, data, 6, state=state)
    assert [r.k for r in recs][-1] == 1 and recs[-1].p == -1
    _records_equal(first + rest, recs)


@pytest.mark.slow
def test_one_and_eight_devices_bitwise_equal(full_run):
    x, recs = full_run
    data = _place(x, n_dev=1)
    recs1 = klish.run_klish(jax.random.key(1), data, 6)
    _records_equal(recs1, recs)


@pytest.mark.slow
@pytest.mark.parametrize("retrain,solver", [("all", "lbfgs"), ("all", "joint")])
def test_merged_class_resolve_gives_the_joint_retraining_trajectory(retrain, solver):
    # gansem's default (re-solve the merged class only, incremental statistics) against
    # re-training all K classes after every merge; ("all", "joint") is the original
    # implementation's procedure: one plain L-BFGS over all classes on all rows.
    x, _ = _blobs(2, n=500, k=4, spread=10.0)
    data = _place(x)
    seqs = []
    for mode, sol in (("merged", "lbfgs"), (retrain, solver)):
        recs = klish.run_klish(jax.random.key(2), data, 6, retrain=mode,
                               solver=sol, filter_clusters=False)
        assert all(r.svm_converged for r in recs)
        seqs.append([(r.p, r.q) for r in recs])
    assert seqs[0] == seqs[1]


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_incremental_statistics_equal_recomputation(solver):
    # With a cache, each step updates only the merged class's statistics; without one
    # they are rebuilt from scratch. Records must be bitwise equal, and agree with the
    # independent one-pass merge_statistics to float tolerance.
    x, _ = _blobs(3, n=450, k=4, spread=6.0)
    data = _place(x)
    state0, _ = klish.klish_init(jax.random.key(3), data, 7,
                                 filter_clusters=False)
    cache = klish.MergeCache()
    sa, sb = state0, state0
    for _ in range(state0.W.shape[0]):
        labels = sa.labels
        sa, ra = klish.klish_step(sa, data, solver=solver, cache=cache)
        sb, rb = klish.klish_step(sb, data, solver=solver, cache=None)
        _records_equal([ra], [rb])
        iou, ecos, _ = klish.merge_statistics(ra.W, ra.b, data, labels)
        np.testing.assert_allclose(ra.iou, np.asarray(iou), rtol=1e-6)
        np.testing.assert_allclose(ra.ecos, np.asarray(ecos), rtol=1e-5, atol=1e-6)
        assert ra.svm_converged


def test_score_columns_do_not_depend_on_their_lane(rng):
    # A class's score column is recomputed at another lane after merges shift the classes (and
    # in a different update group on a rebuild): its bits may depend on the GEMM's shape, never
    # on the lane or on the other classes in the product.
    x = rng.standard_normal((300, 32)).astype(np.float32)
    W = rng.standard_normal((32, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    data, ls = _place(x, rng.integers(0, 32, 300), max_chunk_rows=64)
    S = np.asarray(klish._build(W, b, 32, 32, (), data, ls).scores)
    perm = rng.permutation(32)
    Sp = np.asarray(klish._build(W[perm], b[perm], 32, 32, (), data, ls).scores)
    assert Sp.tobytes() == S[:, perm].tobytes()
    # Update GEMM: class 5 in lane 0 alone, then in lane 15 of a full group.
    one = np.asarray(klish._refresh(jnp.asarray(S), W, b, [5], data, ls).scores)
    grp = np.asarray(klish._refresh(jnp.asarray(S), W, b, np.r_[np.arange(5), np.arange(6, 16), 5],
                                    data, ls).scores)
    assert one[:, 5].tobytes() == grp[:, 5].tobytes()


@pytest.mark.slow
def test_rebuild_recomputes_each_score_column_with_the_product_that_made_it():
    # At K_init = 32 the build's [chunk, D] x [D, 32] GEMM and a merge step's [chunk, D] x [D, 16]
    # update round differently on XLA:CPU, so a cache rebuilt from scratch (resume) must score the
    # clusters made by merges with the update, as the loop did, to give bitwise the same records.
    x, _ = _blobs(4, n=1200, d=32, k=40, spread=3.0)
    data = _place(x)
    state0, _ = klish.klish_init(jax.random.key(4), data, 32,
                                 filter_clusters=False)
    assert state0.W.shape[0] == 32
    cache = klish.MergeCache()
    sa = sb = state0
    for _ in range(4):
        sa, ra = klish.klish_step(sa, data, cache=cache, max_iter=300)
        sb, rb = klish.klish_step(sb, data, cache=None, max_iter=300)
        _records_equal([ra], [rb])
    assert (np.asarray(sa.ids) >= 32).sum() >= 2  # merged clusters were re-scored by updates


def test_merge_steps_compile_no_program_per_k():
    """Every compiled XLA program is kept for the life of the process (CPU: several MB each), so a
    merge loop that compiled programs for K-shaped arrays grew by ~60 MB per step (the default job
    peaked at 5.3 GiB). Once the programs of the first steps exist, later steps compile nothing."""
    x, _ = _blobs(3, n=400, k=6)
    data = _place(x)
    state, _ = klish.klish_init(jax.random.key(0), data, 12,
                                filter_clusters=False)
    compiles, listening = [], [True]  # the listener cannot be removed: it goes quiet after the test
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event)
        if listening[0] and event == "/jax/core/compile/backend_compile_duration" else None)
    cache = klish.MergeCache()
    per_step = []
    try:
        while state.W.shape[0] > 2:
            before = len(compiles)
            state, _ = klish.klish_step(state, data, cache=cache)
            per_step.append(len(compiles) - before)
    finally:
        listening[0] = False
    assert len(per_step) >= 8
    assert sum(per_step[3:]) == 0, per_step
