"""Starting points of the per-class SVM solves, and the passes over all rows that compute them.

For class k the solver starts from ``(w0, b0)`` (a warm start: the previous merge
step's classifier, or the nearest-centroid classifier), moved first to a better
point along two cheap directions:

* **From scratch.** A class started at ``w = 0`` starts from its class-mean
  difference ``mean(x | k) - mean(x | not k)``, scaled so that its largest
  ``|score|`` is 1 (:func:`class_stats`, :func:`unit_scores`).
* **Affine rescaling.** The best ``(alpha w0, alpha b0 + beta)`` is found by a damped
  2-D Newton method over all rows (:func:`best_affine`, a pass over one score
  column per iteration). This fixes the margin scale of, e.g., the nearest-centroid
  start, whose scores all lie in [-1, 0.5]; the result is never worse than the start.

Both are speed only: the optimum of ``f_k`` does not depend on the start.
:func:`class_stats` also gives ``||grad f_k(0, 0)||``, the scale of the solvers'
gradient-norm guard, and :func:`top_classes` the rows that rank a class among
their best few (they seed the class's first working set).

Every function is jitted and takes the rows as a :class:`gansem.sharding.RowData`;
row passes go through :func:`gansem.sharding.row_map` / ``row_reduce``, so results
are bit-identical across device counts. Outputs are replicated, except score
arrays, which stay row-sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gansem import sharding
from gansem.cluster.svm_objective import signs
from gansem.cluster.svm_reduced import bucket

__all__ = ["scores", "affine_scores", "score_column", "class_stats", "unit_scores", "best_affine",
           "top_classes"]


@jax.jit
def scores(data, W, b):
    """``x W^T + b``: ``[N_pad, B]`` row-sharded."""
    return sharding.row_map(lambda xc, W, b: xc @ W.T + b, data.mesh, data.layout, (data.x,), (W, b))


@jax.jit
def affine_scores(data, S, alpha, beta):
    """``alpha S + beta`` per column of scores ``S [N_pad, B]`` (a rescaled start's scores without a pass over x)."""
    return sharding.row_map(lambda sc, a, c: a * sc + c, data.mesh, data.layout, (S,), (alpha, beta))


@jax.jit
def score_column(data, v):
    """Scores ``x w + b`` of one classifier ``v = [w, b]`` on all rows: ``[N_pad]`` row-sharded."""
    return sharding.row_map(lambda xc, v: xc @ v[:-1] + v[-1], data.mesh, data.layout, (data.x,), (v,))


def _label_sums(xc, vc, lc, cls):
    """Per-class feature sums and counts ``[B, D]``, ``[B]`` plus the totals (gradient at 0)."""
    pos = jnp.argmax(jnp.concatenate([lc[:, None] == cls[None, :], jnp.ones_like(lc[:, None], bool)], 1), 1)
    xv = xc * vc[:, None]
    sums = jax.ops.segment_sum(xv, pos, num_segments=cls.shape[0] + 1)
    cnt = jax.ops.segment_sum(vc, pos, num_segments=cls.shape[0] + 1)
    return sums[:-1], cnt[:-1], jnp.sum(xv, axis=0), jnp.sum(vc)


@jax.jit
def class_stats(data, labels, classes, scale):
    """Per class: ``||grad f_k(0, 0)||`` and the class-mean difference ``mean(x | k) - mean(x | not k)``.

    At 0 every row is active, so ``grad f_k(0, 0) = -2 C sum_i y_ik x~_i``.
    Returns ``([B], [B, D])``, replicated.
    """
    s, c, st, ct = sharding.row_reduce(_label_sums, data.mesh, data.layout, (data.x, data.valid, labels),
                                       (classes,))
    gw = -2.0 * scale * (2.0 * s - st[None, :])
    gb = -2.0 * scale * (2.0 * c - ct)
    diff = s / jnp.maximum(c, 1.0)[:, None] - (st[None, :] - s) / jnp.maximum(ct - c, 1.0)[:, None]
    return jnp.sqrt(jnp.sum(gw * gw, axis=1) + gb * gb), diff


@jax.jit
def unit_scores(data, W, b):
    """``(W, b)`` scaled so that every class's largest ``|score|`` over the rows is 1."""
    S = scores(data, W, b)
    m = jnp.max(jnp.abs(S), axis=0)
    inv = jnp.where(m > 0, 1.0 / jnp.where(m > 0, m, 1.0), 1.0)
    return W * inv[:, None], b * inv


def _affine_chunk(sc, vc, lc, cls, alpha, beta):
    """Value, gradient and Hessian sums of ``C sum (1 - y (alpha s + beta))_+^2`` in (alpha, beta)."""
    y = signs(lc, cls)
    r = (1.0 - y * (alpha[None, :] * sc + beta[None, :])) * vc[:, None]
    a = (r > 0).astype(jnp.float32)
    ar = a * r
    return (jnp.sum(ar * r, 0), jnp.sum(ar * y * sc, 0), jnp.sum(ar * y, 0),
            jnp.sum(a * sc * sc, 0), jnp.sum(a * sc, 0), jnp.sum(a, 0))


@functools.partial(jax.jit, static_argnames=("iters",))
def best_affine(data, S, labels, cls, wsq, scale, *, iters=30):
    """Per column of the scores ``S [N_pad, B]`` of ``data``'s rows, the best affine rescaling ``(a, c)``.

    Minimises ``phi(a, c) = C sum_i valid_i (1 - y_i (a s_i + c))_+^2 + a^2 |w0|^2 / 2``
    (``wsq = |w0|^2 [B]``, ``scale = C``). Returns ``(alpha [B], beta [B])``, replicated.

    Damped 2-D Newton (halving until the value does not increase), starting at
    ``(1, 0)``: the result is never worse than the start.
    """
    rows = (S, data.valid, labels)

    def stats(alpha, beta):
        return sharding.row_reduce(_affine_chunk, data.mesh, data.layout, rows, (cls, alpha, beta))

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


@functools.partial(jax.jit, static_argnames=("m",))
def _top_classes_padded(data, W, b, m):
    return sharding.row_map(lambda xc, W, b: jax.lax.top_k(xc @ W.T + b, m)[1], data.mesh, data.layout,
                            (data.x,), (W, b))


def top_classes(data, W, b, m):
    """The ``m`` best-scoring classes of every row under host arrays ``(W, b)``: ``[N_pad, m] int32`` row-sharded.

    The classes are padded to a power of two (padding never ranks: bias -inf), so a merge
    loop compiles this once per power of two instead of once per K.
    """
    k = W.shape[0]
    kp = bucket(k, lo=16)
    Wp = np.zeros((kp, W.shape[1]), np.float32)
    bp = np.full(kp, -np.inf, np.float32)
    Wp[:k], bp[:k] = W, b
    return _top_classes_padded(data, Wp, bp, m)
