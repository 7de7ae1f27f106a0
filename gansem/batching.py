"""Run a function over many samples in fixed-size batches, data-parallel over a mesh.

Feature extraction, segmentation and evaluation all push ``N`` latents through a
generator. :func:`map_batches` is the one loop that does it: the samples are cut
into batches, the last batch is padded (its last row repeated) so that every call
has the same shape and compiles once, and padding rows are dropped from the outputs.

Without a mesh, each batch of ``batch_size`` rows is one call of ``jax.jit(fn)`` on
the default device.

With a ``mesh`` each batch is split over the mesh's devices along the batch axis
(``jax.shard_map`` over the data axis; broadcast arguments such as parameters are
replicated) and results do not depend on the device count, bit for bit. A compiled
program's rounding depends on its shapes (XLA picks other kernels and blockings for
another batch size), so the unit of work is a **micro-batch** of
``micro = ceil(batch_size / 8)`` rows whatever the number of devices: a batch holds
``lcm(devices, 8)`` micro-batches, each device maps the same micro-batch program over
its share (``lax.map``, behind optimisation barriers so XLA cannot fuse it with the
loop differently when a device has one micro-batch or several). Samples of a
generator are independent (no cross-sample statistics at inference), so every row's
bits are the same on 1, 2, 4 or 8 devices. The mesh may hold only this process's
devices (``jax.local_devices()`` in a multi-host job): each process maps its own samples.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from . import sharding

__all__ = ["map_batches", "pad_batch", "batch_rows", "micro_batch_rows"]


def pad_batch(a: Optional[np.ndarray], rows: int) -> Optional[np.ndarray]:
    """``a [m, ...]`` padded to ``rows`` rows by repeating its last row (``None`` stays ``None``)."""
    if a is None or a.shape[0] == rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], 0)])


def micro_batch_rows(batch_size: int) -> int:
    """Rows of the micro-batch program used with a mesh: ``ceil(batch_size / 8)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return -(-int(batch_size) // 8)


def batch_rows(batch_size: int, mesh=None) -> int:
    """Rows per call: ``batch_size`` without a mesh, ``micro * lcm(devices, 8)`` with one."""
    if mesh is None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return int(batch_size)
    return micro_batch_rows(batch_size) * math.lcm(int(mesh.devices.size), 8)


def _sharded_program(fn: Callable, mesh, micro: int, present: tuple, num_bcast: int):
    """``jit(shard_map(...))`` running ``fn`` micro-batch by micro-batch on every device."""

    def local(bcast, rows):
        def one(r):
            b, r = jax.lax.optimization_barrier((bcast, r))
            full = iter(r)
            args = [next(full) if p else None for p in present]
            return jax.lax.optimization_barrier(fn(*b, *args))

        split = tuple(a.reshape((a.shape[0] // micro, micro) + a.shape[1:]) for a in rows)
        out = jax.lax.map(one, split)
        return jax.tree.map(lambda o: o.reshape((o.shape[0] * o.shape[1],) + o.shape[2:]), out)

    spec = P(sharding.DATA_AXIS)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(tuple(P() for _ in range(num_bcast)),
                                                            tuple(spec for p in present if p)),
                                 out_specs=spec, check_vma=False))


def map_batches(fn: Callable, batch_args: Sequence[Optional[np.ndarray]], *, batch_size: int, mesh=None,
                bcast_args: Sequence = (), progress: bool = False, desc: str = "batches",
                ) -> Iterator[tuple[int, int, object]]:
    """Apply ``fn(*bcast_args, *batch)`` to fixed-size batches of ``batch_args``.

    Args:
        fn: a traceable function returning a pytree of arrays whose leading axis is the
            batch (rows must not depend on each other).
        batch_args: host arrays ``[N, ...]`` split along axis 0 (``None`` entries are passed
            through as ``None``, e.g. class labels of an unconditional generator).
        batch_size: samples per call without a mesh; with one, the micro-batch is
            ``ceil(batch_size / 8)`` rows and a call takes ``lcm(devices, 8)`` of them.
        mesh: a 1-D mesh (:func:`gansem.sharding.make_mesh`) to split each batch over;
            ``None``: one device.
        bcast_args: arguments passed whole to every call (replicated over the mesh).
        progress: show a progress bar.

    Yields:
        ``(start, stop, outputs)`` per batch: the rows ``[start, stop)`` of the inputs and
        ``fn``'s outputs for them as host numpy arrays (padding rows dropped).
    """
    present = tuple(a is not None for a in batch_args)
    arrays = [a for a in batch_args if a is not None]
    if not arrays:
        raise ValueError("map_batches needs at least one batched array")
    n = int(arrays[0].shape[0])
    if any(int(a.shape[0]) != n for a in arrays):
        raise ValueError(f"batched arrays have different numbers of rows: {[a.shape[0] for a in arrays]}")
    rows = batch_rows(batch_size, mesh)
    bcast_args = tuple(bcast_args)
    if mesh is None:
        program = jax.jit(fn)
        call = lambda batch: program(*bcast_args, *batch)  # noqa: E731
    else:
        program = _sharded_program(fn, mesh, micro_batch_rows(batch_size), present, len(bcast_args))
        bcast_args = jax.device_put(bcast_args, sharding.replicated(mesh))
        row_sh = sharding.row_sharding(mesh)
        call = lambda batch: program(bcast_args, tuple(jax.device_put(a, row_sh)  # noqa: E731
                                                       for a in batch if a is not None))
    for start in tqdm(range(0, n, rows), desc=desc, disable=not progress, unit="batch"):
        stop = min(start + rows, n)
        batch = [None if a is None else pad_batch(np.asarray(a[start:stop]), rows) for a in batch_args]
        out = call(batch)
        yield start, stop, jax.tree.map(lambda o: np.asarray(o)[: stop - start], out)
