"""Solvers of one class's reduced problem: ``f_k`` of Eq. 3 restricted to a working set of rows.

The working-set driver (:mod:`gansem.cluster.svm`) gathers the rows of one
class's working set into a compact replicated problem ``X [cap, D]``, ``y [cap]``
(``y = +1`` for the class, ``-1`` otherwise, ``0`` on padding slots) and solves::

    f(v) = C * sum_i (1 - y_i (w . x_i + b))_+^2 + 1/2 ||w||^2,   v = [w, b],

in one of two ways (``solver=``):

* ``"lbfgs"``: L-BFGS (:func:`gansem.cluster.optim.lbfgs_minimize`) in the variables
  ``u = L^T v`` where ``L L^T = H`` is the generalised Hessian of f at the start,
  ``H = R + 2 C X~_A^T X~_A`` over the active rows A (``R = diag(1, .., 1, 0)``).
  Wherever the active set has not changed the Hessian in ``u`` is the identity, so
  the first unit step is the Newton step. The factor is refreshed (and L-BFGS
  restarted) every ``refresh_every`` iterations while not converged.
* ``"newton"``: the primal finite Newton method for the L2-loss SVM (Keerthi &
  DeCoste, JMLR 2005; LIBLINEAR's L2-loss primal): Newton direction from the
  Cholesky factor of H, exact line search on the piecewise-quadratic 1-D
  function; the whole loop runs in one device program.

H is built once from the active rows (``|A| D^2``) and afterwards updated with
the rows whose active status flipped (``|flips| D^2``, usually a few).

Stopping rule (both): the paper's "L-inf change of w below ``tol``" between two
iterations, guarded by a gradient-norm test (``||grad f|| <= grad_tol``); for
L-BFGS the change only counts from the second iteration of a cycle. A failed line
search also stops (converged only if the gradient test holds).

The problem is replicated on the mesh: every device runs the same program on the
same rows, so the result is the same on every device and does not depend on the
device count. Only the small per-solve statistics come back to the host.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gansem import sharding
from gansem.cluster import optim

__all__ = ["REDUCED_SOLVERS", "ReducedSolve", "solve_reduced", "bucket"]

#: Solvers of the reduced problem.
REDUCED_SOLVERS = ("lbfgs", "newton")
_MAX_ITER, _WEIGHT_CHANGE, _LS_FAILED = optim.MAX_ITER, optim.CONVERGED, optim.LINE_SEARCH_FAILED


class ReducedSolve(NamedTuple):
    """Outcome of :func:`solve_reduced` (host values, except ``v``).

    Attributes:
        v: ``[D + 1] float32`` solution ``[w, b]`` (replicated on the mesh).
        n_iter: solver iterations (``int``).
        stop_code: index into :data:`gansem.cluster.svm.STOP_REASONS` (``int``).
        grad_norm: final ``||grad f||`` (``float``).
        hessian_builds: Hessians formed from all active rows (``int``).
    """

    v: jax.Array
    n_iter: int
    stop_code: int
    grad_norm: float
    hessian_builds: int


def bucket(n: int, lo: int = 256, step: int = 4096) -> int:
    """Static capacity for ``n`` rows: the next power of two at or above ``max(n, lo)`` up to
    ``step``, above that the next multiple of ``step`` (padding rows cost work in every pass)."""
    if n > step:
        return -(-n // step) * step
    cap = lo
    while cap < n:
        cap *= 2
    return cap


def _reg(d1):
    return jnp.ones((d1,), jnp.float32).at[-1].set(0.0)


def _value_grad(X, y, v, scale):
    """f, grad f and the residuals ``r = (1 - y s) [y != 0]`` of the reduced problem."""
    s = X @ v[:-1] + v[-1]
    r = jnp.where(y != 0, 1.0 - y * s, 0.0)
    ar = jnp.maximum(r, 0.0)
    w = v[:-1]
    f = scale * jnp.sum(ar * ar) + 0.5 * jnp.sum(w * w)
    gr = -2.0 * scale * ar * y
    # gr @ X, not X.T @ gr: XLA:CPU runs the transposed matrix-vector product much slower.
    g = jnp.concatenate([gr @ X + w, jnp.sum(gr)[None]])
    return f, g, r


_HESS_CHUNK = 1024  # rows per Gram product of a large Hessian update


def _row_buckets(cap: int) -> list:
    """Static row counts of :func:`_hess_update`'s single-product branches: 64 and 256, below ``cap``."""
    return [m for m in (64, 256) if m < min(cap, _HESS_CHUNK)]


def _gram_rows(X, idx, sgn, rebuild):
    """``[G^T diag(s) G, G^T s; s^T G, sum s]`` for the gathered rows ``G = X[idx]`` (zero-sign rows add nothing).

    ``rebuild``: every sign is 0 or +1, so ``G^T G`` (rows with sign 0 are zeroed) replaces ``G^T diag(s) G``.
    """
    G = jnp.where((sgn != 0)[:, None], X[idx], 0.0)
    gram = jax.lax.cond(rebuild, lambda G: sharding.rows_tdot(G, G),
                        lambda G: sharding.rows_tdot(G * sgn[:, None], G), G)
    col = sgn @ G
    top = jnp.concatenate([gram, col[:, None]], axis=1)
    bottom = jnp.concatenate([col, jnp.sum(sgn)[None]])[None, :]
    return jnp.concatenate([top, bottom], axis=0)


def _hess_update(H, H_active, X, active, scale):
    """The generalised Hessian ``R + 2 C X~_A^T X~_A`` for the active mask ``active``.

    ``H`` is the Hessian for the mask ``H_active``. If fewer rows changed status
    than are active, only those rows are added (+) or removed (-); otherwise H is
    rebuilt from the active rows. Up to 256 selected rows are gathered into the
    smallest static bucket (64 or 256 rows) for one product; more are summed
    over chunks of ``_HESS_CHUNK`` gathered rows, as many chunks as needed, so
    the cost is about ``min(|flips|, |A|) D^2`` and each product is a full-size
    GEMM. Returns ``(H, built)``: whether H was formed from all active rows.
    """
    flips = active != H_active
    n_flip = jnp.sum(flips, dtype=jnp.int32)
    n_act = jnp.sum(active, dtype=jnp.int32)
    rebuild = n_act <= n_flip
    sel = jnp.where(rebuild, active, flips)
    n_sel = jnp.where(rebuild, n_act, n_flip)
    H0 = jnp.diag(_reg(H.shape[0])).at[-1, -1].set(1e-6)  # tiny bias ridge: H definite with no active row
    base = jnp.where(rebuild, H0, H)
    n = X.shape[0]
    chunk = min(_HESS_CHUNK, n)
    sizes = _row_buckets(n)

    def signs(idx, pos):
        # +1: row now active, -1: now inactive, 0: unused slot (position past the n_sel selected rows)
        return jnp.where(pos < n_sel, jnp.where(active[idx], 1.0, -1.0), 0.0)

    def small(size):
        def f(base):
            idx = jnp.nonzero(sel, size=size, fill_value=0)[0]
            return base + (2.0 * scale) * _gram_rows(X, idx, signs(idx, jnp.arange(size)), rebuild)
        return f

    def chunked(base):
        n_chunks = -(-n // chunk)
        idx = jnp.nonzero(sel, size=n_chunks * chunk, fill_value=0)[0]

        def body(c, acc):
            ids = jax.lax.dynamic_slice(idx, (c * chunk,), (chunk,))
            return acc + _gram_rows(X, ids, signs(ids, c * chunk + jnp.arange(chunk)), rebuild)

        acc = jax.lax.fori_loop(0, (n_sel + chunk - 1) // chunk, body, jnp.zeros_like(base))
        return base + (2.0 * scale) * acc

    branch = jnp.where(n_sel == 0, 0, 1 + jnp.sum(jnp.asarray(sizes, jnp.int32) < n_sel, dtype=jnp.int32))
    H = jax.lax.switch(branch, [lambda base: base] + [small(m) for m in sizes] + [chunked], base)
    return H, rebuild & (n_sel > 0)


def _hess_start(X):
    """A placeholder Hessian and an all-inactive mask: the first :func:`_hess_update` builds H."""
    d1 = X.shape[1] + 1
    return jnp.zeros((d1, d1), jnp.float32), jnp.zeros((X.shape[0],), bool)


def _factor(H):
    """Cholesky factor of H; a diagonal fallback if float32 rounding broke it."""
    L = jnp.linalg.cholesky(H)
    good = jnp.all(jnp.isfinite(L))
    return jnp.where(good, L, jnp.diag(jnp.sqrt(jnp.maximum(jnp.diagonal(H), 1e-6))))


@jax.jit
def _hess_factor(H, H_active, X, active, scale):
    """:func:`_hess_update` then the Cholesky factor: ``(H, L, rebuilt)``."""
    H, rebuilt = _hess_update(H, H_active, X, active, scale)
    return H, _factor(H), rebuilt


def _ls_deriv(alpha, r0, t, wd, dd, scale):
    """``phi'(alpha)`` and ``phi''(alpha)`` of ``phi(alpha) = f(v + alpha d)`` (piecewise linear phi')."""
    r = r0 - alpha * t
    act = r > 0
    return (wd + alpha * dd - 2.0 * scale * jnp.sum(jnp.where(act, r * t, 0.0)),
            dd + 2.0 * scale * jnp.sum(jnp.where(act, t * t, 0.0)))


def _line_search(X, y, v, d, r0, scale, max_steps=60):
    """Exact minimiser over ``alpha >= 0`` of ``f(v + alpha d)`` (safeguarded Newton on phi')."""
    t = y * (X @ d[:-1] + d[-1])
    wd = jnp.sum(v[:-1] * d[:-1])
    dd = jnp.sum(d[:-1] * d[:-1])
    g0, _ = _ls_deriv(0.0, r0, t, wd, dd, scale)
    descent = g0 < 0
    thresh = 1e-7 * jnp.abs(g0)

    def cond(c):
        it, _, _, _, done = c
        return (it < max_steps) & ~done

    def body(c):
        it, alpha, lo, hi, _ = c
        g, h = _ls_deriv(alpha, r0, t, wd, dd, scale)
        lo = jnp.where(g < 0, alpha, lo)
        hi = jnp.where(g >= 0, alpha, hi)
        newton = alpha - g / jnp.maximum(h, 1e-30)
        mid = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * alpha)
        nxt = jnp.where((newton > lo) & ((newton < hi) | ~jnp.isfinite(hi)), newton, mid)
        done = jnp.abs(g) <= thresh
        return it + 1, jnp.where(done, alpha, nxt), lo, hi, done

    _, alpha, _, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), jnp.float32(1.0), jnp.float32(0.0), jnp.float32(jnp.inf), ~descent))
    return jnp.where(descent, alpha, 0.0), descent


@jax.jit
def _newton_solve(X, y, v, scale, tol, grad_tol, budget):
    """Primal finite Newton on the reduced problem from ``v``, all on device.

    Each iteration: Hessian for the current active set (rank update by the rows
    that flipped), Cholesky, Newton direction, exact line search. Stops when the
    L-inf change of w is below ``tol`` and the gradient norm at most
    ``grad_tol`` (converged), when the line search cannot move, or after
    ``budget`` iterations. Returns ``(v, iterations, stop_code, grad_norm, hessian_builds)``.
    """
    _, g, r = _value_grad(X, y, v, scale)
    H, H_active = _hess_start(X)

    def cond(c):
        it, code = c[0], c[1]
        return (code < 0) & (it < budget)

    def body(c):
        it, _, v, g, r, H, H_active, _, builds = c
        active = r > 0
        H, rebuilt = _hess_update(H, H_active, X, active, scale)
        d = -jax.scipy.linalg.cho_solve((_factor(H), True), g)
        d = jnp.where(jnp.all(jnp.isfinite(d)), d, -g)
        alpha, descent = _line_search(X, y, v, d, r, scale)
        v1 = v + alpha * d
        _, g1, r1 = _value_grad(X, y, v1, scale)
        dw = jnp.max(jnp.abs(alpha * d[:-1]))
        gn = jnp.sqrt(jnp.sum(g1 * g1))
        moved = descent & (alpha > 0)
        code = jnp.where(~moved, _LS_FAILED, jnp.where((dw < tol) & (gn <= grad_tol), _WEIGHT_CHANGE, -1))
        return it + 1, code, v1, g1, r1, H, active, gn, builds + rebuilt.astype(jnp.int32)

    gn0 = jnp.sqrt(jnp.sum(g * g))
    it, code, v, _, _, _, _, gn, builds = jax.lax.while_loop(
        cond, body, (jnp.int32(0), jnp.int32(-1), v, g, r, H, H_active, gn0, jnp.int32(0)))
    return v, it, jnp.where(code < 0, _MAX_ITER, code), gn, builds


@functools.partial(jax.jit, static_argnames=("history_size",))
def _lbfgs_cycle(X, y, v0, L, scale, tol, grad_tol, max_iter, *, history_size):
    """L-BFGS on the reduced f in the variables ``u = L^T v``."""
    solve_t = functools.partial(jax.scipy.linalg.solve_triangular, L, lower=True)

    def to_v(u):
        return solve_t(u, trans="T")  # L^-T u

    def fun(u):
        f, g, _ = _value_grad(X, y, to_v(u), scale)
        return (f, jnp.sqrt(jnp.sum(g * g))), solve_t(g)  # grad in u: L^-1 g

    def stop_fn(old, new, gnorm):
        dw = jnp.max(jnp.abs(to_v(new)[:-1] - to_v(old)[:-1]))
        return (dw < tol) & (gnorm <= grad_tol)

    res = optim.lbfgs_minimize(fun, L.T @ v0, stop_fn=stop_fn, max_iter=max_iter, history_size=history_size)
    v = to_v(res.params)
    _, g, r = _value_grad(X, y, v, scale)
    return v, r > 0, jnp.sqrt(jnp.sum(g * g)), res.n_iter, res.stop_code


@jax.jit
def _reduced_start(X, y, v, scale):
    """A placeholder Hessian, an all-inactive mask, and the active set and gradient norm at ``v``."""
    H, H_active = _hess_start(X)
    _, g, r = _value_grad(X, y, v, scale)
    return H, H_active, r > 0, jnp.sqrt(jnp.sum(g * g))


def solve_reduced(solver, X, y, v, scale, tol, grad_tol, budget, *, history_size=10,
                  refresh_every=50) -> ReducedSolve:
    """Solve one reduced problem from ``v``. Host-level driver (reads back small scalars).

    Args:
        solver: ``"lbfgs"`` or ``"newton"`` (module docstring).
        X: ``[cap, D] float32`` rows; y: ``[cap] float32`` signs (0 on padding slots); both
            replicated on the mesh.
        v: ``[D + 1] float32`` start, replicated.
        scale: C = lambda_1 / N; tol: weight-change tolerance; grad_tol: gradient-norm guard
            (float32 scalars, replicated).
        budget: iteration cap (``int``).
        history_size: L-BFGS memory; refresh_every: L-BFGS iterations per Hessian refresh.

    Returns:
        :class:`ReducedSolve`.
    """
    if solver == "newton":
        v, it, code, gn, builds = _newton_solve(X, y, v, scale, tol, grad_tol, jnp.int32(budget))
        return ReducedSolve(v, int(it), int(code), float(gn), int(builds))
    H, H_active, active, gnorm = _reduced_start(X, y, v, scale)
    it, code, builds = 0, _MAX_ITER, 0
    while it < budget:
        H, L, rebuilt = _hess_factor(H, H_active, X, active, scale)
        H_active = active
        builds += int(rebuilt)
        cap = min(int(refresh_every), budget - it)
        v, active, gnorm, n, c = _lbfgs_cycle(X, y, v, L, scale, tol, grad_tol, jnp.int32(cap),
                                              history_size=int(history_size))
        it += int(n)
        code = int(c)
        if code == _WEIGHT_CHANGE:
            break
        if code == _LS_FAILED:
            if float(gnorm) <= float(grad_tol) or int(n) <= 1:
                break
            code = _MAX_ITER  # a restart with a fresh factor may still make progress
    return ReducedSolve(v, it, code, float(gnorm), builds)
