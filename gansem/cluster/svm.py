"""One-vs-rest L2-regularised squared-hinge SVMs: Eq. 3 of the KLiSH paper.

Eq. 3 (M classes, dataset A of N labelled rows, lambda_1 = 5000)::

    L(W, b) = lambda_1 / (M N) * sum_i [ (1 - W_y x_i - b_y)_+^2 + sum_{k != y} (1 + W_k x_i + b_k)_+^2 ]
              + 1 / (2 M) * ||W||_F^2

The bias is not regularised. Writing ``y_ik = +1`` if ``y_i = k`` else ``-1``,
Eq. 3 is the mean over classes of M **independent** binary problems::

    L = 1/M * sum_k f_k(w_k, b_k),
    f_k(w, b) = lambda_1 / N * sum_i (1 - y_ik (w . x_i + b))_+^2 + 1/2 ||w||^2.

:func:`train_ovr_svm` exploits this: each requested class is solved on its own
(all of them at once with ``jax.vmap``, so one matmul serves every class), and
``classes=[q]`` re-solves only row q. After a KLiSH merge of p into q, only the
problem of q changes (every other class keeps its positives and its negatives),
so one binary solve per merge step reaches the same optimum as re-solving all.

Solver: L-BFGS from jaxopt behind :func:`_minimize` (swap it for ``optax.lbfgs``
there and nothing else changes). The objective and its closed-form gradient are
row sums computed by :func:`gansem.sharding.row_reduce`, hence bit-identical on 1
and 8 devices.

Stopping rule per class: the paper's "L-inf change of W below ``tol`` = 1e-4"
between two L-BFGS iterations, guarded against the weak cases seen with L-BFGS
(tiny first steps, see docs/measurements.md): it only counts from the second
iteration on and only when the gradient norm is also below
``grad_rtol * ||grad f_k(0, 0)||`` (the gradient at the zero classifier, a
problem-scale quantity independent of the warm start). Other stop reasons are a
failed line search (converged only if the gradient test holds) and ``max_iter``
(never converged). Nothing stops silently: per-class iterations, flags, gradient
norms and reasons are returned.

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
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from gansem import sharding

__all__ = [
    "SVMResult",
    "STOP_REASONS",
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


class SVMResult(NamedTuple):
    """Output of :func:`train_ovr_svm`.

    Attributes:
        W: ``[K, D] float32`` weights (rows not in ``classes`` are the input rows).
        b: ``[K] float32`` biases.
        objective: ``() float32`` Eq. 3 at (W, b) (NaN if not computed).
        n_iter: ``() int32`` largest number of L-BFGS iterations over solved classes.
        converged: ``() bool`` every solved class converged.
        grad_norm: ``() float32`` largest final gradient norm over solved classes.
        stop_reason: ``str``, one of :data:`STOP_REASONS` (``"not_solved"`` if
            ``classes`` was empty).
        class_iters: ``[K] int32`` iterations of the solve each class took part in
            (0 for classes not solved).
        class_converged: ``[K] bool`` per class: its gradient test holds and the
            solve converged (True for classes not solved).
        class_grad_norm: ``[K] float32`` final gradient norm per class (0 if not solved).
        class_stop: ``[K] int32`` index into :data:`STOP_REASONS` per class.
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


# -- objective -----------------------------------------------------------------------


def _hinge_chunk(xc, vc, lc, W, b):
    """Per-class sum of squared hinges over one chunk: ``[K]``."""
    s = xc @ W.T + b  # [n, K]
    y = jnp.where(lc[:, None] == jnp.arange(W.shape[0], dtype=lc.dtype)[None, :], 1.0, -1.0)
    m = jnp.maximum(0.0, 1.0 - y * s) * vc[:, None]
    return jnp.sum(m * m, axis=0)


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
    h = sharding.row_reduce(_hinge_chunk, mesh, layout, (x, valid, labels), (W, b))
    n = _n_valid(valid, mesh, layout).astype(jnp.float32)
    return objective_from_hinge(h, W, lam, n)


def objective_from_hinge(hinge, W, lam, n_valid):
    """Eq. 3 from the per-class hinge sums ``[K]`` of :func:`per_class_hinge`."""
    k = W.shape[0]
    return lam / (k * n_valid) * jnp.sum(hinge) + 0.5 / k * jnp.sum(W * W)


# -- preconditioning -----------------------------------------------------------------


class SVMPreconditioner(NamedTuple):
    """Change of variables that makes Eq. 3 well conditioned for L-BFGS.

    Computed once per feature matrix by :func:`svm_preconditioner` and reused
    for every merge step. With ``C = U diag(e) U^T`` the covariance of the valid
    rows and ``mu`` their mean, class k is optimised over ``(v, c)`` with::

        w = U (s_k * v),   s_k = (1 + 2 lam a_k e)^(-1/2)
        b = c / sqrt(2 lam a_k) - w . mu

    where ``a_k = clip(2 n_k / N, 1e-3, 1)`` estimates the fraction of rows with
    an active hinge. The Hessian of ``f_k`` in ``(v, c)`` is then close to a
    multiple of the identity. It changes only the path of the solver, never the
    problem being solved: the minimiser of Eq. 3 is the same.

    Attributes:
        basis: ``[D, D] float32`` eigenvectors U of the feature covariance.
        eigvals: ``[D] float32`` eigenvalues e (clipped at 0).
        mean: ``[D] float32`` feature mean mu.
    """

    basis: jax.Array
    eigvals: jax.Array
    mean: jax.Array


def svm_preconditioner(x, valid, *, mesh, layout) -> SVMPreconditioner:
    """Feature mean and covariance eigendecomposition (eigh in float64).

    Estimated from the first ``min(chunk_rows, 2048)`` rows of every chunk.

    Args:
        x: ``[N_pad, D]`` row-sharded features; valid: ``[N_pad] float32`` mask.
        mesh, layout: from :mod:`gansem.sharding`.
    """
    s1, s2, n = _moments(x, valid, mesh=mesh, layout=layout)
    n = float(n)
    mean = np.asarray(s1, np.float64) / n
    cov = np.asarray(s2, np.float64) / n - np.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    e, u = np.linalg.eigh(cov)
    return SVMPreconditioner(
        basis=jnp.asarray(u, jnp.float32),
        eigvals=jnp.asarray(np.maximum(e, 0.0), jnp.float32),
        mean=jnp.asarray(mean, jnp.float32),
    )


@functools.partial(jax.jit, static_argnames=("mesh", "layout"))
def _moments(x, valid, *, mesh, layout):
    # A preconditioner needs only an estimate: use the first rows of every chunk
    # (at most 2048 of them), which keeps this pass ~8x cheaper than a full one.
    m = min(layout.chunk_rows, 2048)

    def part(xc, vc):
        xc, vc = xc[:m], vc[:m]
        xv = xc * vc[:, None]
        return jnp.sum(xv, axis=0), xv.T @ xc, jnp.sum(vc > 0, dtype=jnp.int32)

    return sharding.row_reduce(part, mesh, layout, (x, valid))


# -- solver --------------------------------------------------------------------------


def _minimize(fun, init, *, stop_fn, max_iter, history_size=10):
    """Minimise a smooth convex function with L-BFGS until ``stop_fn`` says so.

    The only place that knows the optimiser library (jaxopt); replace the three
    jaxopt calls to use ``optax.lbfgs`` instead.

    Args:
        fun: ``fun(params) -> ((value, aux), grad)``.
        init: initial parameters (pytree).
        stop_fn: ``stop_fn(old_params, new_params, aux) -> bool`` convergence test,
            only consulted from the second iteration on (the first L-BFGS step is
            a short gradient step and says nothing about convergence).
        max_iter: iteration cap.
        history_size: L-BFGS memory.

    Returns:
        ``(params, value, aux, n_iter, stop_code)`` with ``stop_code`` an index
        into :data:`STOP_REASONS`.
    """
    solver = jaxopt.LBFGS(fun=fun, value_and_grad=True, has_aux=True, maxiter=max_iter,
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
        keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(worse, o, a), new, old)
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


def _class_partials(xc, vc, lc, W, b, cls):
    """Squared-hinge sums ``[B]`` and their gradients ``[B, D]``, ``[B]`` over one chunk."""
    s = xc @ W.T + b  # [n, B]
    y = jnp.where(lc[:, None] == cls[None, :], 1.0, -1.0)
    m = jnp.maximum(0.0, 1.0 - y * s) * vc[:, None]
    gs = -2.0 * y * m  # d(m^2)/ds
    return jnp.sum(m * m, axis=0), gs.T @ xc, jnp.sum(gs, axis=0)


def _class_sizes(xc, vc, lc, cls):
    return jnp.sum((lc[:, None] == cls[None, :]) & (vc[:, None] > 0), axis=0, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "max_iter", "history_size"))
def _solve_classes(x, valid, labels, W0, b0, classes, pre, lam, tol, grad_rtol, *, mesh, layout,
                   max_iter, history_size):
    rows = (x, valid, labels)
    n = _n_valid(valid, mesh, layout).astype(jnp.float32)
    scale = lam / n
    sizes = sharding.row_reduce(_class_sizes, mesh, layout, rows, (classes,)).astype(jnp.float32)
    frac = jnp.clip(2.0 * sizes / n, 1e-3, 1.0)  # [B] estimated active fraction
    s = jax.lax.rsqrt(1.0 + 2.0 * lam * frac[:, None] * pre.eigvals[None, :])  # [B, D]
    cs = jax.lax.rsqrt(2.0 * lam * frac)  # [B]

    def to_wb(params):
        v, c = params
        W = (s * v) @ pre.basis.T  # BD,DD -> BD
        return W, cs * c - W @ pre.mean

    def grads(W, b):
        h, gw, gb = sharding.row_reduce(_class_partials, mesh, layout, rows, (W, b, classes))
        return scale * h, scale * gw + W, scale * gb

    def fun(params):
        W, b = to_wb(params)
        h, gW, gb = grads(W, b)
        value = jnp.sum(h) + 0.5 * jnp.sum(W * W)
        gW_total = gW - gb[:, None] * pre.mean[None, :]  # b depends on W through -W.mu
        gv = s * (gW_total @ pre.basis)
        gc = cs * gb
        gnorm = jnp.sqrt(jnp.sum(gW * gW, axis=1) + gb * gb)  # per class, in (w, b)
        return (value, (gnorm, h + 0.5 * jnp.sum(W * W, axis=1))), (gv, gc)

    _, g0w, g0b = grads(jnp.zeros_like(W0), jnp.zeros_like(b0))
    grad_tol = grad_rtol * jnp.sqrt(jnp.sum(g0w * g0w, axis=1) + g0b * g0b)  # [B]

    def stop_fn(old, new, aux):
        dw = jnp.max(jnp.abs(to_wb(new)[0] - to_wb(old)[0]))
        return (dw < tol) & jnp.all(aux[0] <= grad_tol)

    init = ((W0 @ pre.basis) / s, (b0 + W0 @ pre.mean) / cs)
    params, _, (gnorm, f), it, code = _minimize(
        fun, init, stop_fn=stop_fn, max_iter=max_iter, history_size=history_size
    )
    W, b = to_wb(params)
    converged = (code == _WEIGHT_CHANGE) | ((code == _LS_FAILED) & jnp.all(gnorm <= grad_tol))
    return W, b, f, it, code, gnorm, gnorm <= grad_tol, converged


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
    precond: Optional[SVMPreconditioner] = None,
    compute_objective: bool = True,
) -> SVMResult:
    """Train the one-vs-rest SVMs of Eq. 3 by L-BFGS, warm-started at (W0, b0).

    Every class is an independent binary problem ``f_k`` (module docstring);
    only the rows listed in ``classes`` are optimised, the others are returned
    unchanged. The requested classes are solved together as one problem
    ``sum_k f_k`` (its minimiser is the per-class minimisers; one matmul per
    evaluation serves all of them), in the preconditioned variables of
    :class:`SVMPreconditioner`.

    Stopping: L-inf change of the requested rows of W below ``tol`` between two
    iterations (paper), from the second iteration on, and every requested
    class's gradient norm at most ``grad_rtol`` times its norm at ``(0, 0)``.

    Args:
        x: ``[N_pad, D]`` row-sharded features; valid: ``[N_pad] float32`` mask.
        labels: ``[N_pad] int32`` row-sharded cluster ids in ``0..K-1``.
        W0: ``[K, D]`` initial weights; b0: ``[K]`` initial biases.
        mesh, layout: from :mod:`gansem.sharding`.
        lam: lambda_1 of Eq. 3 (5000 in the paper).
        tol: paper's stopping rule, L-inf change of W between iterations.
        max_iter: L-BFGS iteration cap (hitting it = not converged).
        classes: class indices to (re)train; ``None`` trains all K.
        solver: only ``"lbfgs"``.
        grad_rtol: guard of the stopping rule (relative gradient norm).
        history_size: L-BFGS memory.
        precond: from :func:`svm_preconditioner` (computed here if ``None``;
            pass it when calling repeatedly on the same x).
        compute_objective: also evaluate Eq. 3 at the result (one pass over x).

    Returns:
        :class:`SVMResult`.
    """
    if solver != "lbfgs":
        raise ValueError(f"solver must be 'lbfgs', got {solver!r}")
    W0 = jnp.asarray(W0, jnp.float32)
    b0 = jnp.asarray(b0, jnp.float32)
    k, dim = W0.shape
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must be [N_pad, {dim}] to match W0 {W0.shape}, got {x.shape}")
    if b0.shape != (k,):
        raise ValueError(f"b0 must be [{k}], got {b0.shape}")
    if labels.shape != valid.shape or x.shape[0] != valid.shape[0]:
        raise ValueError(f"x {x.shape}, valid {valid.shape} and labels {labels.shape} need the same rows")
    cls = np.arange(k) if classes is None else np.asarray(classes, dtype=np.int64).reshape(-1)
    if cls.size and (cls.min() < 0 or cls.max() >= k or np.unique(cls).size != cls.size):
        raise ValueError(f"classes must be distinct indices in [0, {k}), got {cls.tolist()}")

    iters = np.zeros(k, np.int32)
    conv = np.ones(k, bool)
    gnorms = np.zeros(k, np.float32)
    stop = np.full(k, _NOT_SOLVED, np.int32)
    W, b = W0, b0
    n_iter, converged, reason = 0, True, STOP_REASONS[_NOT_SOLVED]
    if cls.size:
        if precond is None:
            precond = svm_preconditioner(x, valid, mesh=mesh, layout=layout)
        idx = jnp.asarray(cls, jnp.int32)
        Ws, bs, _, it, code, gn, cls_ok, ok = _solve_classes(
            x, valid, labels, W0[idx], b0[idx], idx, precond,
            jnp.float32(lam), jnp.float32(tol), jnp.float32(grad_rtol),
            mesh=mesh, layout=layout, max_iter=int(max_iter), history_size=int(history_size),
        )
        W = W0.at[idx].set(Ws)
        b = b0.at[idx].set(bs)
        n_iter, converged, reason = int(it), bool(ok), STOP_REASONS[int(code)]
        iters[cls] = n_iter
        conv[cls] = np.asarray(cls_ok) & converged
        gnorms[cls] = np.asarray(gn)
        stop[cls] = int(code)
    objective = (
        ovr_svm_objective(W, b, x, valid, labels, lam=lam, mesh=mesh, layout=layout)
        if compute_objective
        else jnp.float32(jnp.nan)
    )
    return SVMResult(
        W=W,
        b=b,
        objective=objective,
        n_iter=jnp.int32(n_iter),
        converged=jnp.bool_(converged),
        grad_norm=jnp.float32(gnorms.max(initial=0.0)),
        stop_reason=reason,
        class_iters=jnp.asarray(iters),
        class_converged=jnp.asarray(conv),
        class_grad_norm=jnp.asarray(gnorms),
        class_stop=jnp.asarray(stop),
    )
