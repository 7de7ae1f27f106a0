"""One-vs-rest L2-regularised squared-hinge SVMs: Eq. 3 of the KLiSH paper.

Eq. 3 (M classes, dataset A of N labelled rows, lambda_1 = 5000)::

    L(W, b) = lambda_1 / (M N) * sum_i [ (1 - W_y x_i - b_y)_+^2 + sum_{k != y} (1 + W_k x_i + b_k)_+^2 ]
              + 1 / (2 M) * ||W||_F^2

The bias is not regularised. Writing ``y_ik = +1`` if ``y_i = k`` else ``-1``,
Eq. 3 is the mean over classes of M **independent** binary problems::

    L = 1/M * sum_k f_k(v_k),   v_k = [w_k, b_k],
    f_k(v) = C * sum_i (1 - y_ik v . x~_i)_+^2 + 1/2 ||w||^2,   C = lambda_1 / N,   x~ = [x, 1].

:func:`train_ovr_svm` solves the requested classes one by one, each to the
same stopping rule; ``classes=[q]`` re-solves only row q, which after a KLiSH
merge of p into q is the only problem that changed.

How one class is solved (exact: the result is the optimum of the full f_k):

1. **Start.** The start ``(w0, b0)`` is first rescaled: the best
   ``(alpha w0, alpha b0 + beta)`` is found by a 2-D Newton method over all rows
   (a pass over one score column). This fixes the margin scale of, e.g., the
   nearest-centroid start, whose scores all lie in [-1, 0.5].
2. **Working set.** Rows with ``y s >= 1`` contribute nothing to f_k or its
   gradient. The class is solved on the rows ``Omega = {i : y_i s_i < 1 + margin}``
   only (a compact gathered copy, typically a few times the class size). At
   the reduced solution the scores of *all* rows are recomputed; if no row
   outside ``Omega`` is active, the reduced solution has the full problem's
   value and gradient, so (f_k convex) it is the full solution. Otherwise
   ``Omega`` grows by the rows now within the margin and the solve continues.
3. **Reduced solve**, in one of two ways (``solver=``):

   * ``"lbfgs"`` (default): L-BFGS from jaxopt, behind :func:`_minimize` (swap
     it for ``optax.lbfgs`` there and nothing else changes), in the variables
     ``u = L^T v`` where ``L L^T = H`` is the generalised Hessian of f_k at the
     start, ``H = R + 2 C X~_A^T X~_A`` over the active rows A
     (``R = diag(1, .., 1, 0)``). Wherever the active set has not changed the
     Hessian in ``u`` is the identity, so the first unit step is the Newton step.
     The factor is refreshed (and L-BFGS restarted) every ``refresh_every``
     iterations while not converged.
   * ``"newton"``: the primal finite Newton method for the L2-loss SVM (Keerthi &
     DeCoste, JMLR 2005; LIBLINEAR's L2-loss primal): Newton direction from the
     Cholesky factor of H, exact line search on the piecewise-quadratic 1-D
     function; the whole loop runs on device (one dispatch per round).

   H is built once from the active rows (``|A| D^2``) and afterwards updated
   with the rows whose active status flipped (``|flips| D^2``, usually a few).
   A class started at ``w = 0`` (training from scratch) starts from its
   class-mean difference ``mean(x | k) - mean(x | not k)`` instead.

``solver="joint"`` is the original implementation's way, kept as a reference:
one plain jaxopt L-BFGS over all requested classes at once on all rows.

Stopping rule (all solvers): the paper's "L-inf change of W below ``tol`` =
1e-4" between two iterations, guarded against weak cases (tiny first steps, see
docs/measurements.md): the gradient norm must also be below
``grad_rtol * ||grad f_k(0, 0)||``; for L-BFGS the change only counts from the
second iteration of a cycle. Other stop reasons are a failed line search
(converged only if the gradient test holds) and ``max_iter`` (never converged).
Per-class iterations, flags, gradient norms and reasons are returned.

Devices. Passes over all rows go through :func:`gansem.sharding.row_reduce` /
``row_map`` (fixed chunk shapes, ordered sums); reduced problems are gathered
(exact copies of rows) onto the mesh's first device and solved there by the
same program whatever the mesh. Every decision taken on the host comes from
such values, so results are bit-identical on 1 and 8 devices.

Set ``GANSEM_SVM_DEBUG=1`` to print one line per working-set round (rows,
iterations, stop code, gradient norm, time).

Relation to scikit-learn: ``f_k`` is LIBLINEAR's L2-regularised L2-loss primal
``1/2 |w|^2 + C sum_i max(0, 1 - y_i w.x_i)^2`` with ``C = lambda_1 / N``, except
that LIBLINEAR regularises the intercept (it appends a constant feature
``intercept_scaling`` whose weight is penalised). With a large
``intercept_scaling`` s the intercept penalty ``b^2 / (2 s^2)`` vanishes, so
``LinearSVC(loss="squared_hinge", penalty="l2", dual=False, C=lambda_1 / N,
intercept_scaling=s)`` solves the same per-class problems.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from gansem import sharding

__all__ = [
    "SVMResult",
    "STOP_REASONS",
    "SOLVERS",
    "ovr_svm_objective",
    "per_class_hinge",
    "train_ovr_svm",
    "objective_from_hinge",
    "SVMPreconditioner",
    "svm_preconditioner",
]

#: Stop-reason codes used in :attr:`SVMResult.class_stop`.
STOP_REASONS = ("max_iter", "weight_change", "line_search_failed", "not_solved")
_MAX_ITER, _WEIGHT_CHANGE, _LS_FAILED, _NOT_SOLVED = range(4)
_DEBUG = bool(__import__("os").environ.get("GANSEM_SVM_DEBUG"))

#: Solvers accepted by :func:`train_ovr_svm` ("joint" is the original procedure, a slow reference).
SOLVERS = ("lbfgs", "newton", "joint")


class SVMResult(NamedTuple):
    """Output of :func:`train_ovr_svm`.

    Attributes:
        W: ``[K, D] float32`` weights (rows not in ``classes`` are the input rows).
        b: ``[K] float32`` biases.
        objective: ``() float32`` Eq. 3 at (W, b) (NaN if not computed).
        n_iter: ``() int32`` largest number of solver iterations over solved classes.
        converged: ``() bool`` every solved class converged.
        grad_norm: ``() float32`` largest final gradient norm over solved classes.
        stop_reason: ``str``, one of :data:`STOP_REASONS`: the reason of the first
            class that did not converge, else of the class that took most
            iterations (``"not_solved"`` if ``classes`` was empty).
        class_iters: ``[K] int32`` solver iterations per class (0 for classes not solved).
        class_converged: ``[K] bool`` per class (True for classes not solved).
        class_grad_norm: ``[K] float32`` final gradient norm per class (0 if not solved).
        class_stop: ``[K] int32`` index into :data:`STOP_REASONS` per class.
        hessian_evals: number of Hessians built from scratch (``int``).
        working_rows: ``[K] int32`` final working-set size per class (0 if not solved).
    """

    W: jax.Array
    b: jax.Array
    objective: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    grad_norm: jax.Array
    stop_reason: str
    class_iters: jax.Array
    class_converged: jax.Array
    class_grad_norm: jax.Array
    class_stop: jax.Array
    hessian_evals: int = 0
    working_rows: Optional[jax.Array] = None


# -- objective -----------------------------------------------------------------------


def _hinge_chunk(xc, vc, lc, W, b):
    """Per-class sum of squared hinges over one chunk: ``[K]`` (the gradients are not computed)."""
    return _class_partials(xc, vc, lc, W, b, jnp.arange(W.shape[0], dtype=lc.dtype))[0]


def per_class_hinge(W, b, x, valid, labels, *, mesh, layout):
    """``h_k = sum_i valid_i (1 - y_ik (w_k . x_i + b_k))_+^2`` for every class: ``[K]``."""
    return _per_class_hinge(jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32), x, valid, labels,
                            mesh=mesh, layout=layout)


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _per_class_hinge(W, b, x, valid, labels, *, mesh, layout):
    return sharding.row_reduce(_hinge_chunk, mesh, layout, (x, valid, labels), (W, b))


def _n_valid(valid, mesh, layout):
    return sharding.row_reduce(lambda v: jnp.sum(v > 0, dtype=jnp.int32), mesh, layout, (valid,))


def ovr_svm_objective(W, b, x, valid, labels, *, lam=5000.0, mesh, layout):
    """Eq. 3 of the KLiSH paper.

    Args:
        W: ``[K, D]`` weights; b: ``[K]`` biases (not regularised).
        x: ``[N_pad, D]`` row-sharded features; valid: ``[N_pad] float32`` mask.
        labels: ``[N_pad] int32`` cluster ids in ``0..K-1`` (padding rows ignored).
        lam: lambda_1.
        mesh, layout: from :mod:`gansem.sharding`.

    Returns:
        ``() float32``: ``lam / (K N) * sum_ik sqhinge_ik + ||W||_F^2 / (2 K)``.
    """
    return _objective(jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32), x, valid, labels,
                      jnp.float32(lam), mesh=mesh, layout=layout)


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _objective(W, b, x, valid, labels, lam, *, mesh, layout):
    return _eq3(W, b, x, valid, labels, lam, mesh, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _eq3(W, b, x, valid, labels, lam, mesh, layout):
    h = sharding.row_reduce(_hinge_chunk, mesh, layout, (x, valid, labels), (W, b))
    n = _n_valid(valid, mesh, layout).astype(jnp.float32)
    return objective_from_hinge(h, W, lam, n)


def _eq3_fwd(W, b, x, valid, labels, lam, mesh, layout):
    # Value and gradient in one pass over the rows (scores X W^T, then G^T X per chunk): what
    # jax.grad would derive, without differentiating through the chunk loop.
    k = W.shape[0]
    h, gw, gb = sharding.row_reduce(_class_partials, mesh, layout, (x, valid, labels),
                                    (W, b, jnp.arange(k, dtype=labels.dtype)))
    n = _n_valid(valid, mesh, layout).astype(jnp.float32)
    c = lam / (k * n)
    return objective_from_hinge(h, W, lam, n), (c * gw + W / k, c * gb)


def _eq3_bwd(mesh, layout, res, g):
    gW, gb = res
    return g * gW, g * gb, None, None, None, None  # no gradient w.r.t. the data, labels or lambda


_eq3.defvjp(_eq3_fwd, _eq3_bwd)


def objective_from_hinge(hinge, W, lam, n_valid):
    """Eq. 3 from the per-class hinge sums ``[K]`` of :func:`per_class_hinge`.

    NumPy inputs are summed on the host in float32 (no device program per K); anything
    else (jax arrays, tracers) with ``jax.numpy``.
    """
    xp = np if isinstance(hinge, np.ndarray) and isinstance(W, np.ndarray) else jnp
    k = W.shape[0]
    return lam / (k * n_valid) * xp.sum(hinge) + 0.5 / k * xp.sum(W * W)


# -- data-set constants --------------------------------------------------------------


class SVMPreconditioner(NamedTuple):
    """Per-data-set constants of the solver, computed once by :func:`svm_preconditioner`.

    Attributes:
        n_valid: ``() float32`` number of valid rows N (C = lambda_1 / N).
    """

    n_valid: jax.Array


def svm_preconditioner(x, valid, *, mesh, layout) -> SVMPreconditioner:
    """Constants of :func:`train_ovr_svm` for one data set (pass them when calling it repeatedly)."""
    del x
    return SVMPreconditioner(n_valid=_count_valid(valid, mesh=mesh, layout=layout).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _count_valid(valid, *, mesh, layout):
    return _n_valid(valid, mesh, layout)


# -- passes over all rows (sharded, device-invariant) --------------------------------


def _signs(lc, cls):
    """``y [n, B]``: +1 where the row's label is the class, else -1."""
    return jnp.where(lc[:, None] == cls[None, :], 1.0, -1.0)


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _scores(x, W, b, *, mesh, layout):
    """``x W^T + b``: ``[N_pad, B]`` row-sharded."""
    return sharding.row_map(lambda xc, W, b: xc @ W.T + b, mesh, layout, (x,), (W, b))


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _affine_scores(S, alpha, beta, *, mesh, layout):
    """``alpha S + beta`` per column (the rescaled start's scores without another pass over x)."""
    return sharding.row_map(lambda sc, a, c: a * sc + c, mesh, layout, (S,), (alpha, beta))


def _label_sums(xc, vc, lc, cls):
    """Per-class feature sums and counts ``[B, D]``, ``[B]`` plus the totals (gradient at 0)."""
    pos = jnp.argmax(jnp.concatenate([lc[:, None] == cls[None, :], jnp.ones_like(lc[:, None], bool)], 1), 1)
    xv = xc * vc[:, None]
    sums = jax.ops.segment_sum(xv, pos, num_segments=cls.shape[0] + 1)
    cnt = jax.ops.segment_sum(vc, pos, num_segments=cls.shape[0] + 1)
    return sums[:-1], cnt[:-1], jnp.sum(xv, axis=0), jnp.sum(vc)


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _class_stats(x, valid, labels, classes, scale, *, mesh, layout):
    """Per class: ``||grad f_k(0, 0)||`` and the class-mean difference ``mean(x | k) - mean(x | not k)``.

    At 0 every row is active, so ``grad f_k(0, 0) = -2 C sum_i y_ik x~_i``.
    """
    s, c, st, ct = sharding.row_reduce(_label_sums, mesh, layout, (x, valid, labels), (classes,))
    gw = -2.0 * scale * (2.0 * s - st[None, :])
    gb = -2.0 * scale * (2.0 * c - ct)
    diff = s / jnp.maximum(c, 1.0)[:, None] - (st[None, :] - s) / jnp.maximum(ct - c, 1.0)[:, None]
    return jnp.sqrt(jnp.sum(gw * gw, axis=1) + gb * gb), diff


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _unit_scores(x, W, b, *, mesh, layout):
    """Scores of ``(W, b)`` and ``(W, b)`` scaled so that every class's largest ``|score|`` is 1."""
    S = _scores(x, W, b, mesh=mesh, layout=layout)
    m = jnp.max(jnp.abs(S), axis=0)
    inv = jnp.where(m > 0, 1.0 / jnp.where(m > 0, m, 1.0), 1.0)
    return W * inv[:, None], b * inv


def _affine_chunk(sc, vc, lc, cls, alpha, beta):
    """Value, gradient and Hessian sums of ``C sum (1 - y (alpha s + beta))_+^2`` in (alpha, beta)."""
    y = _signs(lc, cls)
    r = (1.0 - y * (alpha[None, :] * sc + beta[None, :])) * vc[:, None]
    a = (r > 0).astype(jnp.float32)
    ar = a * r
    return (jnp.sum(ar * r, 0), jnp.sum(ar * y * sc, 0), jnp.sum(ar * y, 0),
            jnp.sum(a * sc * sc, 0), jnp.sum(a * sc, 0), jnp.sum(a, 0))


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "iters"))
def _best_affine(S, valid, labels, cls, wsq, scale, *, mesh, layout, iters=30):
    """Per column of ``S``, minimise ``phi(a, c) = C sum (1 - y (a s + c))_+^2 + a^2 |w0|^2 / 2``.

    Damped 2-D Newton (halving until the value does not increase), starting at
    ``(1, 0)``: the result is never worse than the start.
    """
    rows = (S, valid, labels)

    def stats(alpha, beta):
        return sharding.row_reduce(_affine_chunk, mesh, layout, rows, (cls, alpha, beta))

    def value(alpha, beta, h):
        return scale * h + 0.5 * alpha * alpha * wsq

    def body(_, carry):
        alpha, beta = carry
        h, rs, r1, s2, s1, n1 = stats(alpha, beta)
        f0 = value(alpha, beta, h)
        ga = alpha * wsq - 2.0 * scale * rs
        gb = -2.0 * scale * r1
        haa = wsq + 2.0 * scale * s2
        hab = 2.0 * scale * s1
        hbb = 2.0 * scale * n1 + 1e-6
        det = haa * hbb - hab * hab
        ok = det > 1e-12 * haa * hbb
        # Singular (e.g. w0 = 0, or no active row): move alpha and beta separately.
        da = jnp.where(ok, -(hbb * ga - hab * gb) / jnp.where(ok, det, 1.0), -ga / jnp.maximum(haa, 1e-12))
        db = jnp.where(ok, -(haa * gb - hab * ga) / jnp.where(ok, det, 1.0), -gb / hbb)
        da = jnp.where(jnp.isfinite(da), da, 0.0)
        db = jnp.where(jnp.isfinite(db), db, 0.0)

        # Per class, try t = 1, 1/2, 1/4, ... until the value does not increase.
        t = jnp.ones_like(alpha)
        good = jnp.zeros_like(alpha, bool)
        best = jnp.zeros_like(alpha)

        def cond2(c):
            t, good, _ = c
            return jnp.any(~good & (t > 1e-3))

        def body2(c):
            t, good, best = c
            h1 = stats(alpha + t * da, beta + t * db)[0]
            ok1 = (value(alpha + t * da, beta + t * db, h1) <= f0) & ~good
            best = jnp.where(ok1, t, best)
            good = good | ok1
            return jnp.where(good, t, 0.5 * t), good, best

        _, _, best = jax.lax.while_loop(cond2, body2, (t, good, best))
        return alpha + best * da, beta + best * db

    return jax.lax.fori_loop(0, iters, body, (jnp.ones_like(wsq), jnp.zeros_like(wsq)))


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _score_col(x, v, *, mesh, layout):
    """Scores ``x w + b`` of one classifier ``v = [w, b]`` on all rows: ``[N_pad]``."""
    return sharding.row_map(lambda xc, v: xc @ v[:-1] + v[-1], mesh, layout, (x,), (v,))


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "m"))
def _top_classes_padded(x, W, b, m, *, mesh, layout):
    return sharding.row_map(lambda xc, W, b: jax.lax.top_k(xc @ W.T + b, m)[1], mesh, layout, (x,), (W, b))


def _top_classes(x, W, b, m, *, mesh, layout):
    """The ``m`` best-scoring classes of every row under host arrays ``(W, b)``: ``[N_pad, m] int32``.

    The classes are padded to a power of two (padding never ranks: bias -inf), so a merge
    loop compiles this once per power of two instead of once per K.
    """
    k = W.shape[0]
    kp = _bucket(k, lo=16)
    Wp = np.zeros((kp, W.shape[1]), np.float32)
    bp = np.full(kp, -np.inf, np.float32)
    Wp[:k], bp[:k] = W, b
    return _top_classes_padded(x, Wp, bp, m, mesh=mesh, layout=layout)


def _select_rows(ys, cand, limit):
    """Indices of at most ``limit`` candidate rows, smallest margin ``y s`` first (stable: ties by row)."""
    idx = np.flatnonzero(cand)
    if idx.size > limit:
        idx = np.sort(idx[np.argsort(ys[idx], kind="stable")[:limit]])
    return idx


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gather_rows(x, labels, idx, cls, *, mesh):
    """Rows ``idx`` (``-1`` = padding) as a reduced problem: ``X [cap, D]``, ``y [cap]`` (0 on padding)."""
    del mesh
    ok = idx >= 0
    j = jnp.maximum(idx, 0)
    X = jnp.where(ok[:, None], x[j], 0.0)
    y = jnp.where(ok, jnp.where(labels[j] == cls, 1.0, -1.0), 0.0)
    return X, y


# -- the reduced problem (one class, one device) -------------------------------------


def _bucket(n: int, lo: int = 256, step: int = 4096) -> int:
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
    # gr @ X, not X.T @ gr: XLA:CPU runs the transposed matrix-vector product ~10x slower.
    g = jnp.concatenate([gr @ X + w, jnp.sum(gr)[None]])
    return f, g, r


@jax.jit
def _r_eval(X, y, v, scale):
    _, g, r = _value_grad(X, y, v, scale)
    return g, r, r > 0, jnp.sqrt(jnp.sum(g * g))


_HESS_CHUNK = 1024  # rows per Gram product of a large Hessian update


def _row_buckets(cap: int) -> list:
    """Static row counts of :func:`_hess_update`'s single-product branches: 64 and 256, below ``cap``."""
    return [m for m in (64, 256) if m < min(cap, _HESS_CHUNK)]


def _gram_rows(X, idx, sgn, rebuild):
    """``[G^T diag(s) G, G^T s; s^T G, sum s]`` for the gathered rows ``G = X[idx]`` (zero-sign rows add nothing).

    ``rebuild``: every sign is 0 or +1, so ``G^T G`` (rows with sign 0 are zeroed) replaces ``G^T diag(s) G``.
    """
    G = jnp.where((sgn != 0)[:, None], X[idx], 0.0)
    gram = jax.lax.cond(rebuild, lambda G: G.T @ G, lambda G: (G * sgn[:, None]).T @ G, G)
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


def _minimize(fun, init, *, stop_fn, max_iter, history_size=10):
    """Minimise a smooth convex function with L-BFGS until ``stop_fn`` says so.

    The only place that knows the optimiser library (jaxopt); replace the three
    jaxopt calls to use ``optax.lbfgs`` instead.

    Args:
        fun: ``fun(params) -> ((value, aux), grad)``.
        init: initial parameters (pytree).
        stop_fn: ``stop_fn(old_params, new_params, aux) -> bool`` convergence test,
            only consulted from the second iteration on (the first L-BFGS step is
            a scaled gradient step and says nothing about convergence).
        max_iter: iteration cap (may be a traced integer).
        history_size: L-BFGS memory.

    Returns:
        ``(params, value, aux, n_iter, stop_code)`` with ``stop_code`` an index
        into :data:`STOP_REASONS`.
    """
    solver = jaxopt.LBFGS(fun=fun, value_and_grad=True, has_aux=True, maxiter=1,
                          tol=0.0, history_size=history_size)
    state0 = solver.init_state(init)

    def cond(carry):
        _, _, it, code = carry
        return (code < 0) & (it < max_iter)

    def body(carry):
        params, state, it, _ = carry
        new_params, new_state = solver.update(params, state)
        # Never accept a step that increased the objective (failed line search).
        worse = ~(new_state.value <= state.value)
        keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(worse, o, a), new, old)  # noqa: E731
        new_params = keep(new_params, params)
        new_state = new_state._replace(
            value=keep(new_state.value, state.value),
            grad=keep(new_state.grad, state.grad),
            aux=keep(new_state.aux, state.aux),
        )
        it = it + 1
        code = jnp.where(
            (it >= 2) & stop_fn(params, new_params, new_state.aux),
            _WEIGHT_CHANGE,
            jnp.where(new_state.failed_linesearch | worse, _LS_FAILED, -1),
        )
        return new_params, new_state, it, code

    params, state, it, code = jax.lax.while_loop(
        cond, body, (init, state0, jnp.int32(0), jnp.int32(-1))
    )
    return params, state.value, state.aux, it, jnp.where(code < 0, _MAX_ITER, code)


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

    u, _, _, it, code = _minimize(fun, L.T @ v0, stop_fn=stop_fn, max_iter=max_iter, history_size=history_size)
    v = to_v(u)
    _, g, r = _value_grad(X, y, v, scale)
    return v, r > 0, jnp.sqrt(jnp.sum(g * g)), it, code


def _solve_reduced(solver, X, y, v, scale, tol, grad_tol, budget, *, history_size, refresh_every):
    """Solve one reduced problem from ``v``. Returns ``(v, iters, code, grad_norm, hessian_builds)``."""
    if solver == "newton":
        v, it, code, gn, builds = _newton_solve(X, y, v, scale, tol, grad_tol, jnp.int32(budget))
        return v, int(it), int(code), float(gn), int(builds)
    H, H_active = _hess_start(X)
    _, _, active, gnorm = _r_eval(X, y, v, scale)
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
    return v, it, code, float(gnorm), builds


# -- the original procedure (reference) -----------------------------------------------


def _class_partials(xc, vc, lc, W, b, cls):
    """Squared-hinge sums ``[B]`` and their gradients ``[B, D]``, ``[B]`` over one chunk."""
    y = _signs(lc, cls)
    m = jnp.maximum(0.0, 1.0 - y * (xc @ W.T + b)) * vc[:, None]
    gs = -2.0 * y * m
    return jnp.sum(m * m, axis=0), gs.T @ xc, jnp.sum(gs, axis=0)


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "history_size"))
def _joint_solve(x, valid, labels, W0, b0, classes, scale, tol, grad_tol, max_iter, *, mesh, layout,
                 history_size):
    """One plain L-BFGS over all requested classes at once, on all rows (the original implementation's way).

    Minimises ``sum_k f_k`` (Eq. 3 times the class count: same minimiser) from
    ``(W0, b0)`` without preconditioning or working sets; stops when the L-inf
    change of W is below ``tol`` and every class's gradient norm is at most its
    ``grad_tol`` (the guarded paper rule of the per-class solvers).
    """
    rows = (x, valid, labels)

    def fun(params):
        W, b = params
        h, gw, gb = sharding.row_reduce(_class_partials, mesh, layout, rows, (W, b, classes))
        gW, gB = scale * gw + W, scale * gb
        gnorm = jnp.sqrt(jnp.sum(gW * gW, axis=1) + gB * gB)
        return (scale * jnp.sum(h) + 0.5 * jnp.sum(W * W), gnorm), (gW, gB)

    def stop_fn(old, new, gnorm):
        return (jnp.max(jnp.abs(new[0] - old[0])) < tol) & jnp.all(gnorm <= grad_tol)

    (W, b), _, gnorm, it, code = _minimize(fun, (W0, b0), stop_fn=stop_fn, max_iter=max_iter,
                                           history_size=history_size)
    return W, b, gnorm, it, code


# -- driver --------------------------------------------------------------------------


def train_ovr_svm(
    x,
    valid,
    labels,
    W0,
    b0,
    *,
    mesh,
    layout,
    lam: float = 5000.0,
    tol: float = 1e-4,
    max_iter: int = 2000,
    classes: Optional[Sequence[int]] = None,
    solver: str = "lbfgs",
    grad_rtol: float = 1e-3,
    history_size: int = 10,
    refresh_every: int = 50,
    ws_margin: float = 0.5,
    rescale_start: bool = True,
    precond: Optional[SVMPreconditioner] = None,
    compute_objective: bool = True,
    max_rounds: int = 50,
    min_rows: int = 2048,
    ws_rank: int = 3,
) -> SVMResult:
    """Train the one-vs-rest SVMs of Eq. 3, warm-started at (W0, b0).

    Every class is an independent binary problem ``f_k`` (module docstring);
    only the rows listed in ``classes`` are optimised, the others are returned
    unchanged.

    Stopping, per class: L-inf change of ``w_k`` below ``tol`` between two
    iterations (paper) and gradient norm at most ``grad_rtol`` times its norm at
    ``(0, 0)``, at a point where no row outside the working set is active.

    Args:
        x: ``[N_pad, D]`` row-sharded features; valid: ``[N_pad] float32`` mask.
        labels: ``[N_pad] int32`` row-sharded cluster ids in ``0..K-1``.
        W0: ``[K, D]`` initial weights; b0: ``[K]`` initial biases.
        mesh, layout: from :mod:`gansem.sharding`.
        lam: lambda_1 of Eq. 3 (5000 in the paper).
        tol: paper's stopping rule, L-inf change of W between iterations.
        max_iter: iteration cap per class (L-BFGS or Newton iterations over all
            working-set rounds); hitting it = not converged.
        classes: class indices to (re)train; ``None`` trains all K.
        solver: ``"lbfgs"`` (jaxopt L-BFGS, Hessian-preconditioned), ``"newton"``, or
            ``"joint"``: the original implementation's procedure, one plain L-BFGS over all
            requested classes together on all rows (no working sets, no preconditioning,
            no start rescaling; same stopping rule). Slow; a reference for benchmarks and tests.
        grad_rtol: guard of the stopping rule (relative gradient norm).
        history_size: L-BFGS memory.
        refresh_every: L-BFGS iterations between refreshes of the Hessian factor.
        ws_margin: working sets hold the rows with ``y s < 1 + ws_margin`` (speed
            only: the result is the full problem's solution whatever its value).
        rescale_start: first move each start to its best ``(alpha w0, alpha b0 + beta)``
            (speed only).
        precond: from :func:`svm_preconditioner` (computed here if ``None``).
        compute_objective: also evaluate Eq. 3 at the result (one pass over x).
        max_rounds: working-set rounds per class before giving up (not converged).
        min_rows: smallest working-set growth (speed only). A working set starts
            with the rows within the margin, at most ``max(min_rows / 2, 2 n_k)`` of
            them (smallest margins first), plus (``ws_rank``) the rows that rank the
            class among their ``ws_rank`` best under (W0, b0); it grows by at most
            ``max(min_rows, |working set|)`` rows per round.
        ws_rank: see ``min_rows`` (0: off).

    Returns:
        :class:`SVMResult`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    # (W, b) are handled on the host (small); device programs only see fixed or per-class shapes,
    # so a merge loop (K shrinking by one per step) does not compile a program per K.
    W0 = np.asarray(W0, np.float32)
    b0 = np.asarray(b0, np.float32)
    k, dim = W0.shape
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must be [N_pad, {dim}] to match W0 {W0.shape}, got {x.shape}")
    if b0.shape != (k,):
        raise ValueError(f"b0 must be [{k}], got {b0.shape}")
    if labels.shape != valid.shape or x.shape[0] != valid.shape[0]:
        raise ValueError(f"x {x.shape}, valid {valid.shape} and labels {labels.shape} need the same rows")
    if ws_margin < 0:
        raise ValueError(f"ws_margin must be >= 0, got {ws_margin}")
    if max_iter < 1 or refresh_every < 1:
        raise ValueError(f"max_iter and refresh_every must be >= 1, got {max_iter}, {refresh_every}")
    if not (np.isfinite(W0).all() and np.isfinite(b0).all()):
        raise ValueError("W0/b0 contain NaN or inf; start from finite weights (e.g. zeros)")
    cls = np.arange(k) if classes is None else np.asarray(classes, dtype=np.int64).reshape(-1)
    if cls.size and (cls.min() < 0 or cls.max() >= k or np.unique(cls).size != cls.size):
        raise ValueError(f"classes must be distinct indices in [0, {k}), got {cls.tolist()}")

    iters = np.zeros(k, np.int32)
    conv = np.ones(k, bool)
    gnorms = np.zeros(k, np.float32)
    stop = np.full(k, _NOT_SOLVED, np.int32)
    wrows = np.zeros(k, np.int32)
    W = np.array(W0)
    b = np.array(b0)
    builds = 0
    if cls.size and solver == "joint":
        if precond is None:
            precond = svm_preconditioner(x, valid, mesh=mesh, layout=layout)
        scale = jnp.float32(lam) / precond.n_valid
        idx = jnp.asarray(cls, jnp.int32)
        gnorm0, _ = _class_stats(x, valid, labels, idx, scale, mesh=mesh, layout=layout)
        grad_tol = jnp.float32(grad_rtol) * gnorm0
        Wj, bj, gn, n, code = _joint_solve(x, valid, labels, W0[cls], b0[cls], idx, scale, jnp.float32(tol),
                                           grad_tol, jnp.int32(max_iter), mesh=mesh, layout=layout,
                                           history_size=int(history_size))
        W[cls], b[cls] = np.asarray(Wj), np.asarray(bj)
        gn, code = np.asarray(gn), int(code)
        iters[cls], gnorms[cls], stop[cls] = int(n), gn, code
        conv[cls] = (code == _WEIGHT_CHANGE) | ((code == _LS_FAILED) & (gn <= np.asarray(grad_tol)))
    elif cls.size:
        if precond is None:
            precond = svm_preconditioner(x, valid, mesh=mesh, layout=layout)
        rep = sharding.replicated(mesh)
        n_valid = float(precond.n_valid)
        scale = np.float32(lam) / np.float32(n_valid)
        idx = jnp.asarray(cls, jnp.int32)
        gnorm0, diff = _class_stats(x, valid, labels, idx, jnp.float32(scale), mesh=mesh, layout=layout)
        grad_tol = np.asarray(jnp.float32(grad_rtol) * gnorm0)
        # A class started at w = 0 (training from scratch) starts from its class-mean difference
        # instead (then rescaled like any start): speed only, the optimum does not depend on it.
        zero = np.flatnonzero(~np.any(W0[cls] != 0, axis=1))
        Wstart, bstart = W0.copy(), b0.copy()
        if zero.size:
            Wz, bz = _unit_scores(x, np.asarray(diff)[zero], np.zeros(zero.size, np.float32), mesh=mesh,
                                  layout=layout)
            Wstart[cls[zero]], bstart[cls[zero]] = np.asarray(Wz), np.asarray(bz)
        Wc, bc = Wstart[cls], bstart[cls]
        near = None
        if ws_rank > 0 and k > 1:
            near = np.asarray(_top_classes(x, Wstart, bstart, min(int(ws_rank), k), mesh=mesh, layout=layout))
        S = _scores(x, Wc, bc, mesh=mesh, layout=layout)
        if rescale_start:
            wsq = np.sum(Wc * Wc, axis=1)
            al, be = _best_affine(S, valid, labels, idx, wsq, jnp.float32(scale), mesh=mesh, layout=layout)
            al, be = np.asarray(al), np.asarray(be)
            Wc, bc = al[:, None] * Wc, al * bc + be
            S = _affine_scores(S, al, be, mesh=mesh, layout=layout)  # only seeds working sets
        valid_h = np.asarray(valid) > 0
        labels_h = np.asarray(labels)
        dev0 = mesh.devices.flat[0]
        on0 = lambda a: jax.device_put(a, dev0)  # noqa: E731
        scale0, tol0 = on0(np.float32(scale)), on0(np.float32(tol))
        kw = dict(history_size=history_size, refresh_every=refresh_every)
        for j, c in enumerate(cls):
            pos = labels_h == c
            ys = np.where(pos, 1.0, -1.0) * np.asarray(S[:, j])
            # First working set: the rows within the margin, at most max(min_rows / 2, 2 n_k) of them
            # (smallest margins first); it grows by the rows found active outside it.
            member = np.zeros(valid_h.shape, bool)
            member[_select_rows(ys, valid_h & (ys < 1.0 + ws_margin), max(min_rows // 2, 2 * int(pos.sum())))] = True
            if near is not None:
                member |= valid_h & (near == c).any(axis=1)
            v = np.concatenate([Wc[j], bc[j:j + 1]]).astype(np.float32)
            used, code, gn, ok = 0, _MAX_ITER, np.inf, False
            c_rep = jax.device_put(jnp.int32(c), rep)
            for _ in range(max_rounds):
                rows = np.flatnonzero(member)
                cap = _bucket(rows.size)
                ridx = np.full(cap, -1, np.int32)
                ridx[: rows.size] = rows
                Xr, yr = (on0(a) for a in _gather_rows(x, labels, jax.device_put(ridx, rep), c_rep, mesh=mesh))
                t_dbg = time.perf_counter() if _DEBUG else 0.0
                v_dev, n, code, gn, nb = _solve_reduced(solver, Xr, yr, on0(v), scale0, tol0,
                                                        on0(np.float32(grad_tol[j])), int(max_iter) - used, **kw)
                used += n
                builds += nb
                if _DEBUG:
                    print(f"[svm] class {c} round rows={rows.size} cap={cap} iters={n} code={code} gn={gn:.2e} "
                          f"hess={nb} t={time.perf_counter() - t_dbg:.3f}s",
                          flush=True)
                v = np.asarray(v_dev)
                wrows[c] = rows.size
                ys = np.where(pos, 1.0, -1.0) * np.asarray(_score_col(x, jax.device_put(v, rep), mesh=mesh,
                                                                       layout=layout))
                out = valid_h & ~member
                if not (out & (ys < 1.0)).any():  # no violation: the full problem's solution
                    ok = code == _WEIGHT_CHANGE or (code == _LS_FAILED and gn <= grad_tol[j])
                    break
                if used >= max_iter:
                    code = _MAX_ITER
                    break
                member[_select_rows(ys, out & (ys < 1.0 + ws_margin), max(min_rows, rows.size))] = True
            W[c], b[c] = v[:-1], v[-1]
            iters[c], conv[c], gnorms[c], stop[c] = used, ok, gn, code
    W = jax.device_put(W)
    b = jax.device_put(b)
    objective = (
        ovr_svm_objective(W, b, x, valid, labels, lam=lam, mesh=mesh, layout=layout)
        if compute_objective
        else jnp.float32(jnp.nan)
    )
    solved = conv[cls] if cls.size else np.ones(0, bool)
    if not cls.size:
        reason = STOP_REASONS[_NOT_SOLVED]
    elif not solved.all():
        reason = STOP_REASONS[int(stop[cls[int(np.argmin(solved))]])]
    else:
        reason = STOP_REASONS[int(stop[cls[int(np.argmax(iters[cls]))]])]
    return SVMResult(
        W=W,
        b=b,
        objective=objective,
        n_iter=jnp.int32(iters.max(initial=0)),
        converged=jnp.bool_(bool(solved.all())),
        grad_norm=jnp.float32(gnorms.max(initial=0.0)),
        stop_reason=reason,
        class_iters=jax.device_put(iters),
        class_converged=jax.device_put(conv),
        class_grad_norm=jax.device_put(gnorms),
        class_stop=jax.device_put(stop),
        hessian_evals=int(builds),
        working_rows=jax.device_put(wrows),
    )
