"""The one L-BFGS adapter of gansem: every L-BFGS solve in the library goes through :func:`lbfgs_minimize`.

The SVM solvers (:mod:`gansem.cluster.svm`, :mod:`gansem.cluster.svm_reduced`) and
the softmax read-out of the baselines (:mod:`gansem.cluster.baselines`) call it with
their own value-and-gradient function and stopping rule. It is the only function
that knows the optimiser library: jaxopt's L-BFGS today, as the design asks; to
use ``optax.lbfgs`` instead, replace the solver construction, ``init_state`` and
``update`` calls below (an ``optax.GradientTransformationExtraArgs`` with its
``scale_by_zoom_linesearch``), and nothing else changes.

The loop is a ``lax.while_loop`` (jittable, traced iteration cap allowed) that
runs one L-BFGS update per iteration and decides itself when to stop:

* ``stop_fn(old_params, new_params, aux)`` is the caller's convergence test. It is
  consulted from iteration ``min_iter`` on (default 2: the first L-BFGS step is a
  scaled gradient step whose size says nothing about convergence, the "tiny first
  step" pitfall of the paper's weight-change rule).
* With ``guarded=True`` (default) a step that does not decrease the objective is
  never accepted: the previous point is kept and the loop stops with
  :data:`LINE_SEARCH_FAILED`, as it does when the line search reports failure.
  ``guarded=False`` is the optimiser's plain iteration (steps are taken whatever
  the line search reports), for objectives whose float32 value stalls before the
  gradient test is met.
* Otherwise the loop stops at ``max_iter`` with :data:`MAX_ITER`.

The stop code is returned with the iteration count, so callers report why a
solve stopped instead of silently stopping at a cap.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt

__all__ = ["LBFGSResult", "lbfgs_minimize", "MAX_ITER", "CONVERGED", "LINE_SEARCH_FAILED"]

#: Stop codes of :attr:`LBFGSResult.stop_code` (the first three entries of
#: :data:`gansem.cluster.svm.STOP_REASONS`).
MAX_ITER, CONVERGED, LINE_SEARCH_FAILED = 0, 1, 2


class LBFGSResult(NamedTuple):
    """Output of :func:`lbfgs_minimize`.

    Attributes:
        params: final parameters (same pytree as ``init``).
        value: ``()`` objective at ``params``.
        aux: the auxiliary output of ``fun`` at ``params``.
        n_iter: ``() int32`` L-BFGS iterations run.
        stop_code: ``() int32``: :data:`MAX_ITER`, :data:`CONVERGED` (``stop_fn`` held) or
            :data:`LINE_SEARCH_FAILED`.
    """

    params: Any
    value: jax.Array
    aux: Any
    n_iter: jax.Array
    stop_code: jax.Array


def lbfgs_minimize(fun: Callable, init, *, stop_fn: Callable, max_iter, history_size: int = 10,
                   min_iter: int = 2, guarded: bool = True) -> LBFGSResult:
    """Minimise a smooth function with L-BFGS until ``stop_fn`` says so. Jittable.

    Args:
        fun: ``fun(params) -> ((value, aux), grad)``; ``grad`` has the pytree structure of ``params``.
        init: initial parameters (pytree of float arrays).
        stop_fn: ``stop_fn(old_params, new_params, aux_at_new) -> bool`` convergence test.
        max_iter: iteration cap (Python or traced integer).
        history_size: L-BFGS memory (static).
        min_iter: first iteration count at which ``stop_fn`` is consulted (static).
        guarded: reject non-decreasing steps and stop on a failed line search (static; module docstring).

    Returns:
        :class:`LBFGSResult`.
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
        it = it + 1
        if not guarded:
            code = jnp.where((it >= min_iter) & stop_fn(params, new_params, new_state.aux), CONVERGED, -1)
            return new_params, new_state, it, code
        # Never accept a step that increased the objective (failed line search).
        worse = ~(new_state.value <= state.value)
        keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(worse, o, a), new, old)  # noqa: E731
        new_params = keep(new_params, params)
        new_state = new_state._replace(
            value=keep(new_state.value, state.value),
            grad=keep(new_state.grad, state.grad),
            aux=keep(new_state.aux, state.aux),
        )
        code = jnp.where(
            (it >= min_iter) & stop_fn(params, new_params, new_state.aux),
            CONVERGED,
            jnp.where(new_state.failed_linesearch | worse, LINE_SEARCH_FAILED, -1),
        )
        return new_params, new_state, it, code

    params, state, it, code = jax.lax.while_loop(cond, body, (init, state0, jnp.int32(0), jnp.int32(-1)))
    return LBFGSResult(params, state.value, state.aux, it, jnp.where(code < 0, MAX_ITER, code))
