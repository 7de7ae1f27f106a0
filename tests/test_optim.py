"""The one L-BFGS adapter (gansem.cluster.optim.lbfgs_minimize): convergence, stop codes, jit."""

import jax
import jax.numpy as jnp
import numpy as np

from gansem.cluster import optim


def _quadratic(A, c):
    def fun(p):
        g = A @ p - c
        return (0.5 * p @ A @ p - c @ p, jnp.sqrt(jnp.sum(g * g))), g

    return fun


def test_lbfgs_minimize_solves_a_quadratic_and_reports_why_it_stopped(rng):
    m = rng.standard_normal((6, 6)).astype(np.float32)
    A = jnp.asarray(m @ m.T + 6 * np.eye(6, dtype=np.float32))
    c = jnp.asarray(rng.standard_normal(6).astype(np.float32))
    fun = _quadratic(A, c)
    run = jax.jit(lambda p0, cap: optim.lbfgs_minimize(fun, p0, stop_fn=lambda o, n, g: g <= 1e-4, max_iter=cap))
    res = run(jnp.zeros(6), 100)
    assert int(res.stop_code) == optim.CONVERGED and 2 <= int(res.n_iter) < 100
    np.testing.assert_allclose(np.asarray(res.params), np.linalg.solve(np.asarray(A), np.asarray(c)), rtol=1e-3,
                               atol=1e-4)
    assert float(res.aux) <= 1e-4
    capped = run(jnp.zeros(6), 1)
    assert int(capped.stop_code) == optim.MAX_ITER and int(capped.n_iter) == 1


def test_stop_rule_is_not_consulted_before_min_iter():
    fun = _quadratic(jnp.eye(2), jnp.ones(2))
    always = lambda o, n, g: True  # noqa: E731
    late = optim.lbfgs_minimize(fun, jnp.zeros(2), stop_fn=always, max_iter=10)
    early = optim.lbfgs_minimize(fun, jnp.zeros(2), stop_fn=always, max_iter=10, min_iter=1)
    assert int(late.n_iter) == 2 and int(early.n_iter) == 1
    assert int(late.stop_code) == int(early.stop_code) == optim.CONVERGED
