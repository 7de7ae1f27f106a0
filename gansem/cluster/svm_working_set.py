"""Working sets of the per-class SVM solves, chosen and gathered where the rows are.

Rows with margin ``y_i s_i >= 1`` contribute nothing to ``f_k`` (Eq. 3) or its
gradient. A class is therefore solved on a working set ``Omega`` of rows, a
compact replicated copy (typically a few times the class size), and then checked:
if no valid row outside ``Omega`` is active (``y s < 1``) at the reduced
solution, that solution has the full problem's value and gradient, so (``f_k``
convex) it is the full solution. Otherwise ``Omega`` grows by the rows now within
the margin and the solve continues.

Everything here runs on the devices that hold the rows, so no host ever needs all
of them (several processes included):

* membership is a row-sharded bool mask ``[N_pad]``;
* "at most ``limit`` candidate rows with the smallest margins, ties by row index"
  is an exact order statistic found by counting: a radix search over the 32 bits
  of a monotone integer key of the margin (then, among rows tied at the cut-off,
  over the bits of the row index), each step one integer row count. Integer
  counts are exact in any summation order, so the selection is the same on any
  device count and needs no sort of the rows;
* the "any violation outside the working set" test is a row reduction;
* the working set is gathered into a replicated ``[cap, D]`` array by one
  ``shard_map``: each device places its own member rows at their global slots
  and an integer ``psum`` of the bit patterns assembles an exact copy.

Only small replicated values (the working-set size, the violation flag) reach
the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gansem import sharding
from gansem.cluster.svm_start import score_column

__all__ = ["order_key", "select_smallest", "first_working_set", "next_working_set", "gather_working_set"]


def order_key(ys):
    """A ``uint32`` key with the order of the float32 values ``ys`` (``-0.0`` = ``0.0``, NaN last)."""
    ys = jnp.where(ys == 0, 0.0, ys).astype(jnp.float32)
    ys = jnp.where(jnp.isnan(ys), jnp.inf, ys)
    bits = jax.lax.bitcast_convert_type(ys, jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _radix_min(count_le, nbits: int, dtype, need):
    """Smallest ``t`` of ``nbits`` bits with ``count_le(t) >= need`` (``count_le`` non-decreasing)."""
    one = jnp.asarray(1, dtype)

    def body(i, t):
        bit = (nbits - 1 - i).astype(dtype)
        trial = t | ((one << bit) - one)
        return jnp.where(count_le(trial) >= need, t, t | (one << bit))

    return jax.lax.fori_loop(0, nbits, body, jnp.asarray(0, dtype))


def select_smallest(ys, cand, limit, row_index):
    """Mask of at most ``limit`` rows of ``cand`` with the smallest ``ys``, ties by lower row index. Traceable.

    Args:
        ys: ``[N_pad] float32`` row-sharded margins.
        cand: ``[N_pad] bool`` row-sharded candidates.
        limit: ``() int32`` how many rows at most.
        row_index: ``[N_pad] int32`` row-sharded global row indices.

    Returns:
        ``[N_pad] bool`` row-sharded: all candidates if there are at most ``limit``.
    """
    key = order_key(ys)
    n_cand = jnp.sum(cand, dtype=jnp.int32)

    def count(mask):
        return jnp.sum(mask, dtype=jnp.int32)

    def cut():
        t = _radix_min(lambda t: count(cand & (key <= t)), 32, jnp.uint32, limit)
        below = cand & (key < t)
        tied = cand & (key == t)
        need = limit - count(below)  # rows to take among the ties, lowest index first
        nbits = max(1, int(row_index.shape[0] - 1).bit_length())
        last = jax.lax.cond(count(tied) > need,
                            lambda: _radix_min(lambda i: count(tied & (row_index <= i)), nbits, jnp.int32, need),
                            lambda: jnp.int32(row_index.shape[0]))
        return below | (tied & (row_index <= last))

    return jax.lax.cond(n_cand <= limit, lambda: cand, cut)


def _row_index(data):
    idx = jnp.arange(data.padded_rows, dtype=jnp.int32)
    return jax.lax.with_sharding_constraint(idx, sharding.row_sharding(data.mesh))


def _margins(scores, labels, c):
    """``y s``: the score signed by the row's side (+1 in class ``c``)."""
    return jnp.where(labels == c, 1.0, -1.0) * scores


@jax.jit
def first_working_set(data, S, j, labels, c, near, threshold, min_rows):
    """A class's first working set, from the scores ``S[:, j]`` of its start.

    The valid rows within the margin (``y s < threshold = 1 + ws_margin``), at most
    ``max(min_rows // 2, 2 n_c)`` of them, smallest margins first (``n_c``: rows labelled
    ``c``), plus the valid rows that rank ``c`` among their best classes (``near [N_pad, m]``,
    or ``None``).

    Returns:
        ``(member [N_pad] bool row-sharded, size () int32)``.
    """
    ys = _margins(jnp.take(S, j, axis=1), labels, c)
    live = data.valid > 0
    limit = jnp.maximum(min_rows // 2, 2 * jnp.sum(labels == c, dtype=jnp.int32))
    member = select_smallest(ys, live & (ys < threshold), limit, _row_index(data))
    if near is not None:
        member = member | (live & jnp.any(near == c, axis=1))
    return member, jnp.sum(member, dtype=jnp.int32)


@jax.jit
def next_working_set(data, labels, member, v, c, threshold, min_rows):
    """Check a reduced solution ``v = [w, b]`` on all rows and grow the working set if needed.

    Returns:
        ``(violated, member, size)``: ``violated`` is whether a valid row outside the
        working set is active (``y s < 1``); if so ``member`` adds the outside rows with
        ``y s < threshold``, at most ``max(min_rows, size)`` of them, smallest margins first.
    """
    ys = _margins(score_column(data, v), labels, c)
    out = (data.valid > 0) & ~member
    violated = jnp.any(out & (ys < 1.0))
    limit = jnp.maximum(min_rows, jnp.sum(member, dtype=jnp.int32))
    grown = jax.lax.cond(violated,
                         lambda: member | select_smallest(ys, out & (ys < threshold), limit, _row_index(data)),
                         lambda: member)
    return violated, grown, jnp.sum(grown, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("cap",))
def gather_working_set(data, labels, member, c, *, cap):
    """The member rows as a replicated reduced problem, in row order.

    Args:
        data: the rows; labels: ``[N_pad] int32`` row-sharded.
        member: ``[N_pad] bool`` row-sharded, at most ``cap`` rows set.
        c: the class.
        cap: static capacity (slots past the members are padding).

    Returns:
        ``X [cap, D] float32`` (exact copies of the rows, zeros on padding slots) and
        ``y [cap] float32`` (+1 in class ``c``, -1 otherwise, 0 on padding), replicated.
    """
    n_dev = data.mesh.devices.size
    n_local = data.padded_rows // n_dev
    take = min(cap, n_local)

    def local(x_l, lab_l, mem_l, c):
        me = jax.lax.axis_index(sharding.DATA_AXIS)
        cnt = jnp.sum(mem_l, dtype=jnp.int32)
        counts = jax.lax.all_gather(cnt, sharding.DATA_AXIS)
        start = jnp.sum(jnp.where(jnp.arange(n_dev) < me, counts, 0))
        pos = jnp.nonzero(mem_l, size=take, fill_value=0)[0]
        slot = jnp.where(jnp.arange(take) < cnt, start + jnp.arange(take), cap)  # cap: dropped
        rows = jax.lax.bitcast_convert_type(jnp.take(x_l, pos, axis=0).astype(jnp.float32), jnp.int32)
        sign = jnp.where(jnp.take(lab_l, pos) == c, 1, -1).astype(jnp.int32)
        X = jnp.zeros((cap, x_l.shape[1]), jnp.int32).at[slot].set(rows, mode="drop")
        y = jnp.zeros((cap,), jnp.int32).at[slot].set(sign, mode="drop")
        # One device holds each slot, the others add zero bits: the sum is an exact copy.
        X, y = jax.lax.psum((X, y), sharding.DATA_AXIS)
        return jax.lax.bitcast_convert_type(X, jnp.float32), y.astype(jnp.float32)

    return jax.shard_map(local, mesh=data.mesh,
                         in_specs=(P(sharding.DATA_AXIS),) * 3 + (P(),), out_specs=(P(), P()),
                         check_vma=False)(data.x, labels, member, c)
