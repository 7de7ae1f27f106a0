"""One-vs-rest L2-regularised squared-hinge SVMs: Eq. 3 of the KLiSH paper, solved.

Eq. 3 (:mod:`gansem.cluster.svm_objective`) is the mean over classes of M
**independent** binary problems ``f_k(v_k)``, ``v_k = [w_k, b_k]``::

    f_k(v) = C * sum_i (1 - y_ik v . x~_i)_+^2 + 1/2 ||w||^2,   C = lambda_1 / N,   x~ = [x, 1],

with ``y_ik = +1`` if row i is labelled k, else -1. Two entry points solve it:

* :func:`fit_ovr_svm` -- **jittable core**: one L-BFGS over all classes on all rows
  (the original implementation's procedure), with a fixed iteration budget and the
  guarded stopping rule below inside a ``lax.while_loop``. Call it inside your own
  ``jax.jit``; every output is an array.
* :func:`train_ovr_svm` -- **host-level driver**, what the merge loop uses: each
  requested class is solved on its own, to the same stopping rule, exactly (the
  result is the optimum of the full ``f_k``), and much faster:

  1. *Start* (:mod:`gansem.cluster.svm_start`): a class started at ``w = 0`` starts
     from its class-mean difference; every start is moved to its best
     ``(alpha w0, alpha b0 + beta)``.
  2. *Working set* (:mod:`gansem.cluster.svm_working_set`): the class is solved on
     the rows within the margin only, a compact replicated copy gathered where
     the rows are. At the reduced solution all rows are scored; if no row outside
     the working set is active the reduced solution is the full one, otherwise
     the set grows and the solve continues.
  3. *Reduced solve* (:mod:`gansem.cluster.svm_reduced`): Hessian-preconditioned
     L-BFGS (``solver="lbfgs"``) or primal finite Newton (``solver="newton"``), by
     every process on its first device (the same problem, where its data are).

  ``solver="joint"`` runs :func:`fit_ovr_svm` from the driver (no working sets,
  no preconditioning, no start rescaling): the slow reference procedure.
  ``classes=[q]`` re-solves only row q, which after a KLiSH merge of p into q is
  the only problem that changed.

Stopping rule (every solver): the paper's "L-inf change of W below ``tol`` =
1e-4" between two iterations, guarded because with L-BFGS a tiny (line-search
shortened) step meets it far from the optimum: the gradient norm must also be
below ``grad_rtol * ||grad f_k(0, 0)||``, and for L-BFGS the change only counts
from the second iteration of a cycle. Other stop reasons are a failed line search
(converged only if the gradient test holds) and ``max_iter`` (never converged).
Per-class iterations, flags, gradient norms and reasons are returned.

Devices and processes. Passes over all rows use :func:`gansem.sharding.row_reduce`
/ ``row_map`` (fixed chunk shapes, ordered sums); working sets are selected with
exact integer counts and gathered as exact copies; reduced problems run on the
first device of each process, the same single-device program whatever the device
count (run replicated on all devices of one process at once, the same program
gave other bits on the CPU backend at full scale). Every decision the host takes
comes from such replicated values, so results are bit-identical on any device
count dividing the layout's chunk count, and no process ever reads rows that its
devices do not hold.

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

import os
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gansem import sharding
from gansem.cluster import optim
from gansem.cluster import svm_start as start
from gansem.cluster import svm_working_set as ws
from gansem.cluster.svm_objective import (SVMPreconditioner, class_partials, objective_from_hinge,
                                          ovr_svm_objective, per_class_hinge, svm_preconditioner)
from gansem.cluster.svm_reduced import REDUCED_SOLVERS, bucket, solve_reduced

__all__ = [
    "SVMResult",
    "SVMFit",
    "STOP_REASONS",
    "SOLVERS",
    "fit_ovr_svm",
    "train_ovr_svm",
    "ovr_svm_objective",
    "per_class_hinge",
    "objective_from_hinge",
    "SVMPreconditioner",
    "svm_preconditioner",
]

#: Stop-reason codes used in :attr:`SVMResult.class_stop` (the first three are
#: :mod:`gansem.cluster.optim`'s stop codes).
STOP_REASONS = ("max_iter", "weight_change", "line_search_failed", "not_solved")
_MAX_ITER, _WEIGHT_CHANGE, _LS_FAILED, _NOT_SOLVED = range(4)
assert (_MAX_ITER, _WEIGHT_CHANGE, _LS_FAILED) == (optim.MAX_ITER, optim.CONVERGED, optim.LINE_SEARCH_FAILED)
_DEBUG = bool(os.environ.get("GANSEM_SVM_DEBUG"))

#: Solvers accepted by :func:`train_ovr_svm`: the per-class working-set solvers and
#: ``"joint"`` (:func:`fit_ovr_svm` on all rows, the original procedure; slow).
SOLVERS = REDUCED_SOLVERS + ("joint",)


class SVMResult(NamedTuple):
    """Output of :func:`train_ovr_svm`.

    Attributes:
        W: ``[K, D] float32`` weights (rows not in ``classes`` are the input rows), replicated.
        b: ``[K] float32`` biases, replicated.
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


class SVMFit(NamedTuple):
    """Output of :func:`fit_ovr_svm` (arrays only, so it can leave a ``jax.jit``).

    Attributes:
        W: ``[K, D] float32`` weights; b: ``[K] float32`` biases.
        n_iter: ``() int32`` L-BFGS iterations (one solve for all classes).
        stop_code: ``() int32`` index into :data:`STOP_REASONS`.
        class_grad_norm: ``[K] float32`` final ``||grad f_k||`` per class.
        class_converged: ``[K] bool`` stopped by the rule, or by a failed line search
            with the gradient test met.
        converged: ``() bool`` every class converged.
    """

    W: jax.Array
    b: jax.Array
    n_iter: jax.Array
    stop_code: jax.Array
    class_grad_norm: jax.Array
    class_converged: jax.Array
    converged: jax.Array


# -- the jittable core: one L-BFGS over all classes and rows ----------------------------


def fit_ovr_svm(data: sharding.RowData, labels, W0, b0, *, lam=5000.0, tol=1e-4, max_iter=2000,
                grad_rtol=1e-3, history_size: int = 10, precond: Optional[SVMPreconditioner] = None) -> SVMFit:
    """Eq. 3 by one L-BFGS over all K classes on all valid rows, from ``(W0, b0)``. Jittable.

    Minimises ``sum_k f_k`` (Eq. 3 times K: same minimiser) without working sets,
    preconditioning or start rescaling, inside one ``lax.while_loop``; stops when the
    L-inf change of W is below ``tol`` (from the second iteration on) and every
    class's gradient norm is at most ``grad_rtol * ||grad f_k(0, 0)||``, when the
    line search fails, or after ``max_iter`` iterations.

    Args:
        data: rows ``x [N_pad, D]``; ``data.valid`` marks the training rows.
        labels: ``[N_pad] int32`` row-sharded class ids in ``0..K-1``.
        W0: ``[K, D]`` initial weights; b0: ``[K]`` initial biases.
        lam: lambda_1; tol: the paper's weight-change tolerance; max_iter: iteration budget
            (may be traced); grad_rtol: gradient guard; history_size: L-BFGS memory (static).
        precond: from :func:`svm_preconditioner` (computed if ``None``).

    Returns:
        :class:`SVMFit`. Example::

            fit = jax.jit(lambda d, y: svm.fit_ovr_svm(d, y, W0, b0, max_iter=500))(data, labels)
    """
    W0 = jnp.asarray(W0, jnp.float32)
    n_valid = svm_preconditioner(data).n_valid if precond is None else precond.n_valid
    return _joint_fit(data, labels, W0, jnp.asarray(b0, jnp.float32), jnp.arange(W0.shape[0], dtype=jnp.int32),
                      jnp.float32(lam), jnp.float32(tol), jnp.float32(grad_rtol), max_iter, n_valid,
                      history_size=int(history_size))


def _joint_fit(data, labels, W0, b0, classes, lam, tol, grad_rtol, max_iter, n_valid, *, history_size):
    """:func:`fit_ovr_svm` for the classes ``classes [B]`` whose rows are ``W0 [B, D]``, ``b0 [B]``."""
    scale = lam / n_valid
    gnorm0, _ = start.class_stats(data, labels, classes, scale)
    grad_tol = grad_rtol * gnorm0
    rows = (data.x, data.valid, labels)

    def fun(params):
        W, b = params
        h, gw, gb = sharding.row_reduce(class_partials, data.mesh, data.layout, rows, (W, b, classes))
        gW, gB = scale * gw + W, scale * gb
        gnorm = jnp.sqrt(jnp.sum(gW * gW, axis=1) + gB * gB)
        return (scale * jnp.sum(h) + 0.5 * jnp.sum(W * W), gnorm), (gW, gB)

    def stop_fn(old, new, gnorm):
        return (jnp.max(jnp.abs(new[0] - old[0])) < tol) & jnp.all(gnorm <= grad_tol)

    res = optim.lbfgs_minimize(fun, (W0, b0), stop_fn=stop_fn, max_iter=max_iter, history_size=history_size)
    W, b = res.params
    gnorm = res.aux
    conv = (res.stop_code == _WEIGHT_CHANGE) | ((res.stop_code == _LS_FAILED) & (gnorm <= grad_tol))
    return SVMFit(W=W, b=b, n_iter=res.n_iter, stop_code=res.stop_code, class_grad_norm=gnorm,
                  class_converged=conv, converged=jnp.all(conv))


_joint_fit_jit = jax.jit(_joint_fit, static_argnames=("history_size",))


# -- the host-level driver --------------------------------------------------------------


class _Starts(NamedTuple):
    """Per requested class (host arrays ``[B, ...]`` unless noted): where its solve begins."""

    W: np.ndarray  # [B, D] start weights (rescaled)
    b: np.ndarray  # [B]
    scores: jax.Array  # [N_pad, B] row-sharded scores of the starts (seed the working sets)
    grad_tol: np.ndarray  # [B] gradient-norm guard: grad_rtol * ||grad f_k(0, 0)||
    near: Optional[jax.Array]  # [N_pad, m] row-sharded best classes of each row, or None


class _ClassSolve(NamedTuple):
    """One class solved by the working-set driver (host values)."""

    w: np.ndarray  # [D]
    b: float
    n_iter: int
    converged: bool
    grad_norm: float
    stop_code: int
    working_rows: int
    hessian_builds: int


class _Settings(NamedTuple):
    solver: str
    lam: float
    tol: float
    max_iter: int
    grad_rtol: float
    history_size: int
    refresh_every: int
    ws_margin: float
    max_rounds: int
    min_rows: int


def train_ovr_svm(
    data: sharding.RowData,
    labels,
    W0,
    b0,
    *,
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
    """Train the one-vs-rest SVMs of Eq. 3, warm-started at (W0, b0). Host-level driver.

    Every class is an independent binary problem ``f_k`` (module docstring); only
    the rows listed in ``classes`` are optimised, the others are returned unchanged.
    Reads back only small replicated values (per-class scalars, working-set sizes),
    so it runs unchanged with the rows spread over several processes. Not jittable
    (see :func:`fit_ovr_svm`).

    Stopping, per class: L-inf change of ``w_k`` below ``tol`` between two
    iterations (paper) and gradient norm at most ``grad_rtol`` times its norm at
    ``(0, 0)``, at a point where no row outside the working set is active.

    Args:
        data: rows ``x [N_pad, D]``; ``data.valid`` marks the training rows.
        labels: ``[N_pad] int32`` row-sharded cluster ids in ``0..K-1`` (``data.place``).
        W0: ``[K, D]`` initial weights; b0: ``[K]`` initial biases.
        lam: lambda_1 of Eq. 3 (5000 in the paper).
        tol: paper's stopping rule, L-inf change of W between iterations.
        max_iter: iteration cap per class (L-BFGS or Newton iterations over all
            working-set rounds); hitting it = not converged.
        classes: class indices to (re)train; ``None`` trains all K.
        solver: ``"lbfgs"`` (Hessian-preconditioned L-BFGS), ``"newton"``, or ``"joint"``
            (:func:`fit_ovr_svm` over the requested classes on all rows; slow, a reference).
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
    W0, b0, cls = _check_arguments(data, labels, W0, b0, classes, solver, ws_margin, max_iter, refresh_every)
    k = W0.shape[0]
    settings = _Settings(solver, float(lam), float(tol), int(max_iter), float(grad_rtol), int(history_size),
                         int(refresh_every), float(ws_margin), int(max_rounds), int(min_rows))
    iters = np.zeros(k, np.int32)
    conv = np.ones(k, bool)
    gnorms = np.zeros(k, np.float32)
    stop = np.full(k, _NOT_SOLVED, np.int32)
    wrows = np.zeros(k, np.int32)
    W, b = W0.copy(), b0.copy()
    builds = 0
    if cls.size:
        if precond is None:
            precond = svm_preconditioner(data)
        if solver == "joint":
            fit = _joint_fit_jit(data, labels, W0[cls], b0[cls], jnp.asarray(cls, jnp.int32), jnp.float32(lam),
                                 jnp.float32(tol), jnp.float32(grad_rtol), jnp.int32(max_iter), precond.n_valid,
                                 history_size=int(history_size))
            W[cls], b[cls] = np.asarray(fit.W), np.asarray(fit.b)
            iters[cls], gnorms[cls], stop[cls] = int(fit.n_iter), np.asarray(fit.class_grad_norm), int(fit.stop_code)
            conv[cls] = np.asarray(fit.class_converged)
        else:
            scale = np.float32(lam) / np.float32(float(precond.n_valid))
            starts = _prepare_starts(data, labels, W0, b0, cls, scale, grad_rtol=grad_rtol, ws_rank=ws_rank,
                                     rescale_start=rescale_start)
            for j, c in enumerate(cls):
                one = _solve_class(data, labels, j, int(c), starts, scale, settings)
                W[c], b[c] = one.w, one.b
                iters[c], conv[c], gnorms[c], stop[c] = one.n_iter, one.converged, one.grad_norm, one.stop_code
                wrows[c] = one.working_rows
                builds += one.hessian_builds
    return _result(data, labels, W, b, cls, iters, conv, gnorms, stop, wrows, builds, lam=lam,
                   compute_objective=compute_objective)


def _check_arguments(data, labels, W0, b0, classes, solver, ws_margin, max_iter, refresh_every):
    """Validated host copies ``(W0 [K, D], b0 [K], classes [B])``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(data, sharding.RowData):
        raise TypeError(f"data must be a sharding.RowData (sharding.place_rows), got {type(data).__name__}")
    # (W, b) are handled on the host (small); device programs only see fixed or per-class shapes,
    # so a merge loop (K shrinking by one per step) does not compile a program per K.
    W0 = np.asarray(W0, np.float32)
    b0 = np.asarray(b0, np.float32)
    k, dim = W0.shape
    x = data.x
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"data.x must be [N_pad, {dim}] to match W0 {W0.shape}, got {x.shape}")
    if b0.shape != (k,):
        raise ValueError(f"b0 must be [{k}], got {b0.shape}")
    if labels.shape != data.valid.shape:
        raise ValueError(f"labels {labels.shape} must have the rows of data {data.valid.shape}; place them "
                         "with data.place(labels)")
    if ws_margin < 0:
        raise ValueError(f"ws_margin must be >= 0, got {ws_margin}")
    if max_iter < 1 or refresh_every < 1:
        raise ValueError(f"max_iter and refresh_every must be >= 1, got {max_iter}, {refresh_every}")
    if not (np.isfinite(W0).all() and np.isfinite(b0).all()):
        raise ValueError("W0/b0 contain NaN or inf; start from finite weights (e.g. zeros)")
    cls = np.arange(k) if classes is None else np.asarray(classes, dtype=np.int64).reshape(-1)
    if cls.size and (cls.min() < 0 or cls.max() >= k or np.unique(cls).size != cls.size):
        raise ValueError(f"classes must be distinct indices in [0, {k}), got {cls.tolist()}")
    return W0, b0, cls


def _prepare_starts(data, labels, W0, b0, cls, scale, *, grad_rtol, ws_rank, rescale_start) -> _Starts:
    """Step 1: the start of every requested class, its scores, its gradient guard and the rows near it."""
    k = W0.shape[0]
    idx = jnp.asarray(cls, jnp.int32)
    gnorm0, diff = start.class_stats(data, labels, idx, jnp.float32(scale))
    grad_tol = np.asarray(jnp.float32(grad_rtol) * gnorm0)
    # A class started at w = 0 (training from scratch) starts from its class-mean difference
    # instead (then rescaled like any start): speed only, the optimum does not depend on it.
    zero = np.flatnonzero(~np.any(W0[cls] != 0, axis=1))
    Wstart, bstart = W0.copy(), b0.copy()
    if zero.size:
        Wz, bz = start.unit_scores(data, np.asarray(diff)[zero], np.zeros(zero.size, np.float32))
        Wstart[cls[zero]], bstart[cls[zero]] = np.asarray(Wz), np.asarray(bz)
    Wc, bc = Wstart[cls], bstart[cls]
    near = start.top_classes(data, Wstart, bstart, min(int(ws_rank), k)) if ws_rank > 0 and k > 1 else None
    S = start.scores(data, Wc, bc)
    if rescale_start:
        wsq = np.sum(Wc * Wc, axis=1)
        al, be = start.best_affine(data, S, labels, idx, wsq, jnp.float32(scale))
        al, be = np.asarray(al), np.asarray(be)
        Wc, bc = al[:, None] * Wc, al * bc + be
        S = start.affine_scores(data, S, al, be)  # only seeds working sets
    return _Starts(W=Wc, b=bc, scores=S, grad_tol=grad_tol, near=near)


def _solve_class(data, labels, j, c, starts: _Starts, scale, cfg: _Settings) -> _ClassSolve:
    """Steps 2 and 3 for class ``c`` (column ``j`` of the starts): working-set rounds until exact."""
    rep = sharding.replicated(data.mesh)
    put = lambda a: jax.device_put(a, rep)  # noqa: E731
    # Reduced problems are solved by every process on its first device (sharding.solve_device).
    dev = sharding.solve_device(data.mesh)
    sput = lambda a: jax.device_put(a, dev)  # noqa: E731
    scale_r, tol_r, gtol_r = sput(np.float32(scale)), sput(np.float32(cfg.tol)), sput(np.float32(starts.grad_tol[j]))
    threshold, c32 = np.float32(1.0 + cfg.ws_margin), np.int32(c)
    member, size = ws.first_working_set(data, starts.scores, np.int32(j), labels, c32, starts.near, threshold,
                                        np.int32(cfg.min_rows))
    v = np.concatenate([starts.W[j], starts.b[j:j + 1]]).astype(np.float32)
    used, code, gn, ok, builds, rows = 0, _MAX_ITER, np.inf, False, 0, 0
    for _ in range(cfg.max_rounds):
        rows = int(size)
        gathered = ws.gather_working_set(data, labels, member, c32, cap=bucket(rows))
        X, y = (sharding.local_copy(a, dev) for a in gathered)
        t_dbg = time.perf_counter() if _DEBUG else 0.0
        red = solve_reduced(cfg.solver, X, y, sput(v), scale_r, tol_r, gtol_r, cfg.max_iter - used,
                            history_size=cfg.history_size, refresh_every=cfg.refresh_every)
        used += red.n_iter
        builds += red.hessian_builds
        code, gn = red.stop_code, red.grad_norm
        if _DEBUG:
            print(f"[svm] class {c} round rows={rows} cap={X.shape[0]} iters={red.n_iter} code={code} "
                  f"gn={gn:.2e} hess={red.hessian_builds} t={time.perf_counter() - t_dbg:.3f}s", flush=True)
        v = np.asarray(red.v)
        violated, grown, size = ws.next_working_set(data, labels, member, put(v), c32, threshold,
                                                    np.int32(cfg.min_rows))
        if not bool(violated):  # no active row outside the working set: the full problem's solution
            ok = code == _WEIGHT_CHANGE or (code == _LS_FAILED and gn <= starts.grad_tol[j])
            break
        if used >= cfg.max_iter:
            code = _MAX_ITER
            break
        member = grown
    return _ClassSolve(w=v[:-1], b=float(v[-1]), n_iter=used, converged=bool(ok), grad_norm=float(gn),
                       stop_code=int(code), working_rows=rows, hessian_builds=builds)


def _result(data, labels, W, b, cls, iters, conv, gnorms, stop, wrows, builds, *, lam, compute_objective):
    """Step 4: the :class:`SVMResult`, arrays replicated on the data's mesh."""
    rep = sharding.replicated(data.mesh)
    W = jax.device_put(W, rep)
    b = jax.device_put(b, rep)
    objective = ovr_svm_objective(W, b, data, labels, lam=lam) if compute_objective else jnp.float32(jnp.nan)
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
        class_iters=jax.device_put(iters, rep),
        class_converged=jax.device_put(conv, rep),
        class_grad_norm=jax.device_put(gnorms, rep),
        class_stop=jax.device_put(stop, rep),
        hessian_evals=int(builds),
        working_rows=jax.device_put(wrows, rep),
    )
