"""Eq. 3 one-vs-rest squared-hinge SVMs (gansem.cluster.svm) against numpy and LIBLINEAR."""

import os
import re

_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.cluster import svm, svm_working_set  # noqa: E402

LAM = 5000.0


def _place(x, labels, n_dev=8, max_chunk_rows=256):
    mesh = sharding.make_mesh(n_dev)
    layout = sharding.plan_rows(x.shape[0], n_dev, max_chunk_rows=max_chunk_rows)
    data = sharding.place_rows(x, mesh, layout)
    return data, data.place(labels.astype(np.int32))


def _problem(rng, n=1200, d=6, k=4):
    centers = rng.standard_normal((k, d)) * 2.5
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def _eq3_numpy(W, b, x, y, lam=LAM):
    """Eq. 3 written out: lam/(M|A|) sum_i [(1 - s_iy)_+^2 + sum_{k != y} (1 + s_ik)_+^2] + |W|^2/(2M)."""
    W, b, x = (np.asarray(a, np.float64) for a in (W, b, x))
    m, n = W.shape[0], x.shape[0]
    s = x @ W.T + b
    total = 0.0
    for i in range(n):
        total += max(0.0, 1.0 - s[i, y[i]]) ** 2
        total += sum(max(0.0, 1.0 + s[i, k]) ** 2 for k in range(m) if k != y[i])
    return lam / (m * n) * total + 0.5 / m * np.sum(W * W)


def _eq3_grad_numpy(W, b, x, y, lam=LAM):
    W, b, x = (np.asarray(a, np.float64) for a in (W, b, x))
    m, n = W.shape[0], x.shape[0]
    Y = np.where(y[:, None] == np.arange(m), 1.0, -1.0)
    g = -2.0 * Y * np.maximum(0.0, 1.0 - Y * (x @ W.T + b)) * lam / (m * n)
    return g.T @ x + W / m, g.sum(0)


def test_objective_matches_numpy(rng):
    x, y = _problem(rng, n=300)
    W = rng.standard_normal((4, 6)).astype(np.float32) * 0.3
    b = rng.standard_normal(4).astype(np.float32) * 0.3
    data, ls = _place(x, y, max_chunk_rows=32)
    ours = float(svm.ovr_svm_objective(W, b, data, ls, lam=LAM))
    np.testing.assert_allclose(ours, _eq3_numpy(W, b, x, y), rtol=1e-5)


def test_objective_gradient_matches_numpy(rng):
    # jax.grad of the objective goes through its hand-written one-pass VJP (padding rows included).
    x, y = _problem(rng, n=300)
    W = rng.standard_normal((4, 6)).astype(np.float32) * 0.3
    b = rng.standard_normal(4).astype(np.float32) * 0.3
    data, ls = _place(x, y, max_chunk_rows=32)
    f = lambda W_, b_: svm.ovr_svm_objective(W_, b_, data, ls, lam=LAM)  # noqa: E731
    val, (gW, gb) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(W), jnp.asarray(b))
    rW, rb = _eq3_grad_numpy(W, b, x, y)
    np.testing.assert_allclose(float(val), _eq3_numpy(W, b, x, y), rtol=1e-5)
    scale = max(np.abs(rW).max(), np.abs(rb).max())  # float32 sums: error relative to the largest entry
    np.testing.assert_allclose(np.asarray(gW), rW, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(np.asarray(gb), rb, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def solved():
    rng = np.random.default_rng(1)
    x, y = _problem(rng)
    data, ls = _place(x, y)
    res = svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), lam=LAM)
    return x, y, (data, ls), res


def test_solution_is_optimal_and_beats_liblinear(solved):
    x, y, _, res = solved
    assert bool(res.converged) and res.stop_reason == "weight_change"
    assert 2 <= int(res.n_iter) < 2000
    W, b = np.asarray(res.W), np.asarray(res.b)
    gW, gb = _eq3_grad_numpy(W, b, x, y)
    g0W, g0b = _eq3_grad_numpy(np.zeros_like(W), np.zeros_like(b), x, y)
    scale = np.sqrt(np.sum(g0W**2) + np.sum(g0b**2))
    assert np.sqrt(np.sum(gW**2) + np.sum(gb**2)) <= 1e-3 * scale
    ours = _eq3_numpy(W, b, x, y)
    np.testing.assert_allclose(float(res.objective), ours, rtol=1e-5)

    svc = pytest.importorskip("sklearn.svm")
    # Per class, Eq. 3 is LIBLINEAR's 1/2|w|^2 + C sum sqhinge with C = lam / N; a large
    # intercept_scaling makes LIBLINEAR's intercept penalty negligible.
    Ws, bs = [], []
    for k in range(4):
        clf = svc.LinearSVC(loss="squared_hinge", penalty="l2", dual=False, C=LAM / len(x),
                            intercept_scaling=1000.0, tol=1e-10, max_iter=100000).fit(x, y == k)
        Ws.append(clf.coef_[0])
        bs.append(clf.intercept_[0])
    theirs = _eq3_numpy(np.stack(Ws), np.array(bs), x, y)
    assert ours <= theirs * (1 + 1e-5)
    pred = np.argmax(x @ W.T + b, 1)
    assert np.mean(pred == np.argmax(x @ np.stack(Ws).T + np.array(bs), 1)) > 0.995


def test_joint_reference_solver_reaches_the_same_optimum(solved):
    # The original implementation's procedure (one plain L-BFGS over all classes, all rows).
    x, y, (data, ls), res = solved
    joint = svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), lam=LAM, solver="joint")
    assert bool(joint.converged) and joint.stop_reason == "weight_change"
    assert len(set(np.asarray(joint.class_iters).tolist())) == 1  # one solve for all classes
    np.testing.assert_allclose(_eq3_numpy(np.asarray(joint.W), np.asarray(joint.b), x, y),
                               _eq3_numpy(np.asarray(res.W), np.asarray(res.b), x, y), rtol=1e-5)
    pred = np.argmax(x @ np.asarray(joint.W).T + np.asarray(joint.b), 1)
    assert np.mean(pred == np.argmax(x @ np.asarray(res.W).T + np.asarray(res.b), 1)) > 0.995


def test_resolving_one_class_matches_solving_all(solved):
    x, y, (data, ls), res = solved
    W, b = np.asarray(res.W).copy(), np.asarray(res.b).copy()
    W[2] = 0.0
    b[2] = 0.0
    one = svm.train_ovr_svm(data, ls, W, b, classes=[2], lam=LAM)
    assert bool(one.converged)
    np.testing.assert_array_equal(np.delete(np.asarray(one.W), 2, 0), np.delete(W, 2, 0))
    np.testing.assert_array_equal(np.delete(np.asarray(one.b), 2), np.delete(b, 2))
    assert np.asarray(one.class_stop)[0] == svm.STOP_REASONS.index("not_solved")
    # Same optimum: objective and weights of class 2 agree with the joint solve.
    np.testing.assert_allclose(float(one.objective), float(res.objective), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(one.W)[2], np.asarray(res.W)[2], rtol=2e-2, atol=2e-3)


def test_max_iter_is_reported_not_converged(solved):
    _, _, (data, ls), _ = solved
    res = svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), max_iter=3)
    assert not bool(res.converged)
    assert res.stop_reason == "max_iter" and int(res.n_iter) == 3


def test_bad_classes_is_a_clear_error(solved):
    _, _, (data, ls), _ = solved
    with pytest.raises(ValueError, match="distinct indices"):
        svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), classes=[4])


def test_newton_matches_lbfgs_and_numpy(solved):
    x, y, (data, ls), res = solved
    new = svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), lam=LAM, solver="newton")
    assert bool(new.converged) and new.stop_reason == "weight_change" and new.hessian_evals >= 4
    W, b = np.asarray(new.W), np.asarray(new.b)
    gW, gb = _eq3_grad_numpy(W, b, x, y)
    g0W, g0b = _eq3_grad_numpy(np.zeros_like(W), np.zeros_like(b), x, y)
    assert np.sqrt(np.sum(gW**2) + np.sum(gb**2)) <= 1e-3 * np.sqrt(np.sum(g0W**2) + np.sum(g0b**2))
    np.testing.assert_allclose(_eq3_numpy(W, b, x, y), _eq3_numpy(np.asarray(res.W), np.asarray(res.b), x, y),
                               rtol=1e-6)
    pred_n = np.argmax(x @ W.T + b, 1)
    pred_l = np.argmax(x @ np.asarray(res.W).T + np.asarray(res.b), 1)
    assert np.mean(pred_n == pred_l) > 0.999


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_working_sets_do_not_change_the_solution(solved, solver):
    # ws_margin=1e9 puts every row in every working set: the plain full-data solve.
    x, y, (data, ls), _ = solved
    kw = dict(lam=LAM, solver=solver)
    small = svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), ws_margin=0.0, **kw)
    full = svm.train_ovr_svm(data, ls, np.zeros((4, 6)), np.zeros(4), ws_margin=1e9, **kw)
    assert bool(small.converged) and bool(full.converged)
    np.testing.assert_allclose(_eq3_numpy(np.asarray(small.W), np.asarray(small.b), x, y),
                               _eq3_numpy(np.asarray(full.W), np.asarray(full.b), x, y), rtol=1e-6)


def test_fit_ovr_svm_under_jit_matches_the_host_driver(solved):
    # The jittable core (one L-BFGS over all classes) inside a user's jax.jit gives the host driver's
    # "joint" result, and a solution that passes the same optimality test as the per-class solvers.
    x, y, (data, ls), res = solved
    W0, b0 = np.zeros((4, 6), np.float32), np.zeros(4, np.float32)
    fit = jax.jit(lambda d, l: svm.fit_ovr_svm(d, l, W0, b0, lam=LAM))(data, ls)
    host = svm.train_ovr_svm(data, ls, W0, b0, lam=LAM, solver="joint")
    assert bool(fit.converged) and svm.STOP_REASONS[int(fit.stop_code)] == "weight_change"
    np.testing.assert_array_equal(np.asarray(fit.W), np.asarray(host.W))
    np.testing.assert_array_equal(np.asarray(fit.b), np.asarray(host.b))
    assert int(fit.n_iter) == int(host.n_iter)
    np.testing.assert_allclose(_eq3_numpy(np.asarray(fit.W), np.asarray(fit.b), x, y),
                               _eq3_numpy(np.asarray(res.W), np.asarray(res.b), x, y), rtol=1e-5)


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_same_bits_on_1_2_4_and_8_devices(solver):
    # Small working sets (several rounds, ties cut by the device-side selection) on every device count.
    x, y = _problem(np.random.default_rng(4), n=1500, d=5, k=4)
    out = []
    for n_dev in (1, 2, 4, 8):
        data, ls = _place(x, y, n_dev=n_dev, max_chunk_rows=128)
        r = svm.train_ovr_svm(data, ls, np.zeros((4, 5)), np.zeros(4), lam=LAM, solver=solver, ws_margin=0.1,
                              min_rows=64, ws_rank=1)
        assert bool(r.converged)
        out.append((np.asarray(r.W), np.asarray(r.b), np.asarray(r.class_iters), np.asarray(r.working_rows)))
    assert out[0][3].max() < len(x)  # the working sets were smaller than the data
    for other in out[1:]:
        for a, b in zip(out[0], other):
            np.testing.assert_array_equal(a, b)


def _host_selection(ys, cand, limit):
    """The rule written out on the host: at most ``limit`` candidates, smallest ``ys`` first, ties by row."""
    idx = np.flatnonzero(cand)
    if idx.size > limit:
        idx = np.sort(idx[np.argsort(ys[idx], kind="stable")[:limit]])
    mask = np.zeros(ys.shape, bool)
    mask[idx] = True
    return mask


@pytest.mark.parametrize("n_dev", [1, 8])
def test_working_set_selection_and_gather_match_the_host_rule(rng, n_dev):
    n = 1000
    ys = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 0.25, 0.7, 1.2, np.inf], np.float32), n)
    ys[::7] = rng.standard_normal(ys[::7].shape).astype(np.float32)
    cand = rng.random(n) < 0.6
    x = rng.standard_normal((n, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    data, ls = _place(x, labels, n_dev=n_dev, max_chunk_rows=64)
    ys_d, cand_d = data.place(ys), data.place(cand)
    select = jax.jit(lambda y_, c_, lim, d: svm_working_set.select_smallest(
        y_, c_, lim, jnp.arange(d.padded_rows, dtype=jnp.int32)))
    for limit in (1, 5, 17, 100, 300, int(cand.sum()), n):
        got = np.asarray(select(ys_d, cand_d, jnp.int32(limit), data))[:n]
        np.testing.assert_array_equal(got, _host_selection(ys, cand, limit), err_msg=f"limit={limit}")
    member = _host_selection(ys, cand, 100)
    X, yr = svm_working_set.gather_working_set(data, ls, data.place(member), np.int32(1), cap=128)
    rows = np.flatnonzero(member)
    np.testing.assert_array_equal(np.asarray(X)[:rows.size], x[rows])
    np.testing.assert_array_equal(np.asarray(X)[rows.size:], 0.0)
    np.testing.assert_array_equal(np.asarray(yr), np.concatenate([np.where(labels[rows] == 1, 1.0, -1.0),
                                                                   np.zeros(128 - rows.size)]))
