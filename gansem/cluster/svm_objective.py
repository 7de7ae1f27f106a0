"""Eq. 3 of the KLiSH paper: the one-vs-rest L2-regularised squared-hinge objective, its gradient and constants.

Eq. 3 (M classes, dataset A of N labelled rows, lambda_1 = 5000)::

    L(W, b) = lambda_1 / (M N) * sum_i [ (1 - W_y x_i - b_y)_+^2 + sum_{k != y} (1 + W_k x_i + b_k)_+^2 ]
              + 1 / (2 M) * ||W||_F^2

The bias is not regularised. Writing ``y_ik = +1`` if ``y_i = k`` else ``-1``,
Eq. 3 is the mean over classes of M **independent** binary problems::

    L = 1/M * sum_k f_k(v_k),   v_k = [w_k, b_k],
    f_k(v) = C * sum_i (1 - y_ik v . x~_i)_+^2 + 1/2 ||w||^2,   C = lambda_1 / N,   x~ = [x, 1].

Every sum over rows goes through :func:`gansem.sharding.row_reduce` (fixed chunk
shapes, sums in chunk order), so values and gradients are bit-identical on any
device count that divides the layout's chunk count. ``jax.grad`` of
:func:`ovr_svm_objective` uses a hand-written VJP that computes value and
gradient in one pass over the rows (scores ``X W^T``, then ``G^T X`` per chunk).

All functions here are jittable; the rows arrive as one :class:`gansem.sharding.RowData`
whose ``valid`` mask selects the rows of the data set A (padding and, e.g.,
held-out rows are 0).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gansem import sharding

__all__ = [
    "ovr_svm_objective",
    "per_class_hinge",
    "objective_from_hinge",
    "SVMPreconditioner",
    "svm_preconditioner",
]


# -- per-chunk sums ------------------------------------------------------------------


def signs(lc, cls):
    """``y [n, B]``: +1 where the row's label is the class, else -1."""
    return jnp.where(lc[:, None] == cls[None, :], 1.0, -1.0)


def class_partials(xc, vc, lc, W, b, cls):
    """Squared-hinge sums ``[B]`` and their gradients ``[B, D]``, ``[B]`` over one chunk."""
    y = signs(lc, cls)
    m = jnp.maximum(0.0, 1.0 - y * (xc @ W.T + b)) * vc[:, None]
    gs = -2.0 * y * m
    return jnp.sum(m * m, axis=0), sharding.rows_tdot(gs, xc), jnp.sum(gs, axis=0)


def _hinge_chunk(xc, vc, lc, W, b):
    """Per-class sum of squared hinges over one chunk: ``[K]`` (the gradients are not computed)."""
    return class_partials(xc, vc, lc, W, b, jnp.arange(W.shape[0], dtype=lc.dtype))[0]


def n_valid_rows(valid, mesh, layout):
    """``() int32`` number of rows with ``valid > 0`` (traceable)."""
    return sharding.row_reduce(lambda v: jnp.sum(v > 0, dtype=jnp.int32), mesh, layout, (valid,))


# -- public functions ----------------------------------------------------------------


def per_class_hinge(W, b, data: sharding.RowData, labels):
    """``h_k = sum_i valid_i (1 - y_ik (w_k . x_i + b_k))_+^2`` for every class. Jittable.

    Args:
        W: ``[K, D]`` weights; b: ``[K]`` biases.
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        labels: ``[N_pad] int32`` row-sharded class ids (same layout as ``data``).

    Returns:
        ``[K] float32``.
    """
    return _per_class_hinge(jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32), data, labels)


@jax.jit
def _per_class_hinge(W, b, data, labels):
    return sharding.row_reduce(_hinge_chunk, data.mesh, data.layout, (data.x, data.valid, labels), (W, b))


def ovr_svm_objective(W, b, data: sharding.RowData, labels, *, lam=5000.0):
    """Eq. 3 of the KLiSH paper. Jittable and differentiable in ``(W, b)``.

    Args:
        W: ``[K, D]`` weights; b: ``[K]`` biases (not regularised).
        data: rows ``x [N_pad, D]`` and mask ``valid [N_pad]`` (the data set A).
        labels: ``[N_pad] int32`` cluster ids in ``0..K-1`` (rows outside ``valid`` ignored).
        lam: lambda_1.

    Returns:
        ``() float32``: ``lam / (K N) * sum_ik sqhinge_ik + ||W||_F^2 / (2 K)``.
    """
    return _objective(jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32), data, labels, jnp.float32(lam))


@jax.jit
def _objective(W, b, data, labels, lam):
    return _eq3(W, b, data.x, data.valid, labels, lam, data.mesh, data.layout)


# Loose rows here: mesh and layout must be non-differentiable static arguments of the custom VJP.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _eq3(W, b, x, valid, labels, lam, mesh, layout):
    h = sharding.row_reduce(_hinge_chunk, mesh, layout, (x, valid, labels), (W, b))
    n = n_valid_rows(valid, mesh, layout).astype(jnp.float32)
    return objective_from_hinge(h, W, lam, n)


def _eq3_fwd(W, b, x, valid, labels, lam, mesh, layout):
    # Value and gradient in one pass over the rows (scores X W^T, then G^T X per chunk): what
    # jax.grad would derive, without differentiating through the chunk loop.
    k = W.shape[0]
    h, gw, gb = sharding.row_reduce(class_partials, mesh, layout, (x, valid, labels),
                                    (W, b, jnp.arange(k, dtype=labels.dtype)))
    n = n_valid_rows(valid, mesh, layout).astype(jnp.float32)
    c = lam / (k * n)
    return objective_from_hinge(h, W, lam, n), (c * gw + W / k, c * gb)


def _eq3_bwd(mesh, layout, res, g):
    gW, gb = res
    return g * gW, g * gb, None, None, None, None  # no gradient w.r.t. the data, labels or lambda


_eq3.defvjp(_eq3_fwd, _eq3_bwd)


def objective_from_hinge(hinge, W, lam, n_valid):
    """Eq. 3 from the per-class hinge sums ``[K]`` of :func:`per_class_hinge`. Jittable.

    NumPy inputs are summed on the host in float32 (no device program per K); anything
    else (jax arrays, tracers) with ``jax.numpy``.
    """
    xp = np if isinstance(hinge, np.ndarray) and isinstance(W, np.ndarray) else jnp
    k = W.shape[0]
    return lam / (k * n_valid) * xp.sum(hinge) + 0.5 / k * xp.sum(W * W)


class SVMPreconditioner(NamedTuple):
    """Per-data-set constants of the SVM solvers, computed once by :func:`svm_preconditioner`.

    Attributes:
        n_valid: ``() float32`` number of valid rows N (C = lambda_1 / N).
    """

    n_valid: jax.Array


def svm_preconditioner(data: sharding.RowData) -> SVMPreconditioner:
    """Constants of :func:`gansem.cluster.svm.train_ovr_svm` for one data set (pass them when looping). Jittable."""
    return SVMPreconditioner(n_valid=_count_valid(data).astype(jnp.float32))


@jax.jit
def _count_valid(data):
    return n_valid_rows(data.valid, data.mesh, data.layout)
