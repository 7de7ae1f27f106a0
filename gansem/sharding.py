"""Devices, meshes and row sharding: the only module in gansem that knows about devices.

Everything else receives arrays that are already placed. The data axis of every
mesh is called ``"data"``; row-sharded arrays (pixel features, labels) are split
over it, parameters and small statistics are replicated.

Row counts rarely divide the number of devices, so row-sharded data always
travels with a float32 ``valid`` mask (1 for real rows, 0 for padding) and every
reduction is weighted by it. Padding never changes a result.

Example::

    from gansem import sharding
    sharding.simulate_cpu_devices(8)     # before JAX starts; no-op on GPU/TPU hosts
    mesh = sharding.make_mesh(8)
    data = sharding.place_rows(features, mesh)   # RowData: x [N_pad, D], valid [N_pad], layout, mesh
"""

from __future__ import annotations

import dataclasses as _dc
import math
import os
import re
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "simulate_cpu_devices",
    "setup_devices_from_cli",
    "MAX_SIMULATED_CPU_DEVICES",
    "make_mesh",
    "row_sharding",
    "replicated",
    "place_batch",
    "padded_length",
    "DeviceError",
    "RowLayout",
    "plan_rows",
    "row_reduce",
    "row_map",
    "row_map_reduce",
    "row_products",
    "product_map_reduce",
    "ChunkRows",
    "RowData",
    "place_rows",
    "local_row_range",
    "local_mesh",
    "solve_device",
    "local_copy",
    "initialize_distributed",
    "barrier",
]

DATA_AXIS = "data"


class DeviceError(RuntimeError):
    """Raised when the requested devices cannot be provided."""


def simulate_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` host (CPU) devices. Must run before JAX initialises its backends.

    On a machine whose default backend already has ``n`` or more devices (a GPU
    node) this does nothing harmful: the flag only affects the CPU platform.

    Raises:
        DeviceError: if JAX's backends are already initialised with fewer CPU
            devices than requested (the flag can no longer take effect).
    """
    if n < 1:
        raise DeviceError(f"--devices must be at least 1, got {n}")
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()
    if _backends_initialised() and len(jax.devices("cpu")) < n and jax.default_backend() == "cpu":
        raise DeviceError(
            f"JAX is already running with {len(jax.devices('cpu'))} CPU device(s); "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts "
            "(launch scripts do this for you when --devices is given first thing)."
        )


def _backends_initialised() -> bool:
    """Whether JAX has created its backends (after which XLA_FLAGS no longer take effect)."""
    try:
        from jax._src import xla_bridge  # private, but the only way to know without starting them

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - defensive
        return True


#: Most CPU devices ``--devices`` simulates. Each simulated device is a host thread and XLA's collectives wait
#: for all of them: hundreds on a few cores stall past XLA's rendezvous timeout and abort the program.
MAX_SIMULATED_CPU_DEVICES = 64


def setup_devices_from_cli(devices: Optional[int]) -> Optional[str]:
    """For launch scripts, first thing after parsing: simulate ``devices`` CPU devices if asked.

    More than :data:`MAX_SIMULATED_CPU_DEVICES` devices are accepted only where the
    accelerator backend really has that many.

    Returns:
        ``None`` on success, or an error message for the user (the script then
        prints it and exits with status 2).
    """
    if devices is None:
        return None
    if devices > MAX_SIMULATED_CPU_DEVICES:

        try:
            real, backend = len(jax.devices()), jax.default_backend()
        except RuntimeError as e:  # pragma: no cover - broken installation
            return f"--devices {devices}: cannot list the devices ({e})"
        if backend != "cpu" and real >= devices:
            return None
        most = max(real, MAX_SIMULATED_CPU_DEVICES) if backend != "cpu" else MAX_SIMULATED_CPU_DEVICES
        return (f"--devices {devices}: only {real} {backend} device(s) exist and at most "
                f"{MAX_SIMULATED_CPU_DEVICES} CPU devices can be simulated (more stall XLA's collectives); "
                f"ask for at most {most}")
    try:
        simulate_cpu_devices(devices)
    except DeviceError as e:
        return str(e)
    return None


def make_mesh(num_devices: Optional[int] = None):
    """A 1-D mesh over the first ``num_devices`` devices of the default backend.

    Args:
        num_devices: how many devices to use; ``None`` uses all of them.

    Returns:
        ``jax.sharding.Mesh`` with the single axis ``"data"`` (axis type Auto, so
        ``jax.jit`` propagates shardings and ``jax.shard_map`` splits explicitly).

    Raises:
        DeviceError: more devices requested than exist, with what to do about it.
    """

    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if n < 1:
        raise DeviceError(f"number of devices must be >= 1, got {n}")
    if jax.process_count() > 1:
        return _multiprocess_mesh(n)
    if n > len(devices) and jax.default_backend() != "cpu" and len(jax.devices("cpu")) >= n:

        warnings.warn(
            f"{n} devices requested but only {len(devices)} {jax.default_backend()} device(s) exist; "
            f"using {n} simulated CPU devices instead"
        )
        devices = jax.devices("cpu")
    if n > len(devices):
        raise DeviceError(
            f"{n} devices requested but only {len(devices)} {jax.default_backend()} device(s) exist. "
            f"On CPU, start the program with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "(launch/*.py --devices N does this) or ask for fewer devices."
        )
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def _multiprocess_mesh(n: int):
    """The mesh of ``n`` devices over all processes: the first ``n / P`` local devices of each, process by process."""

    procs = jax.process_count()
    if n % procs:
        raise DeviceError(f"{n} devices cannot be split evenly over {procs} processes; use a multiple of {procs}")
    per = n // procs
    by_proc = [[d for d in jax.devices() if d.process_index == p] for p in range(procs)]
    short = [p for p, ds in enumerate(by_proc) if len(ds) < per]
    if short:
        raise DeviceError(f"{n} devices over {procs} processes needs {per} per process, but process {short[0]} has "
                          f"{len(by_proc[short[0]])}; ask for fewer devices (or simulate more per process)")
    devices = [d for ds in by_proc for d in sorted(ds, key=lambda d: d.id)[:per]]
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def local_mesh(mesh):
    """The 1-D mesh of this process's devices of ``mesh``, in mesh order (all of ``mesh`` with one process).

    For work that each process does on its own samples with no collective across
    processes (generating images and features of the rows it holds): a program over
    this mesh runs on the process's devices only.
    """

    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not mine:
        raise DeviceError(f"process {jax.process_index()} holds no device of the mesh")
    if len(mine) == mesh.devices.size:
        return mesh
    return Mesh(np.asarray(mine), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def solve_device(mesh):
    """This process's first device on ``mesh``: where it solves small problems that every process holds.

    Small replicated problems (the SVMs' working sets) are solved there by each process on
    its own copy, with no collective, by the same single-device program whatever the number
    of devices (the same program run replicated on all devices of one process gave other
    bits on the CPU backend).
    """
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def local_copy(array, device):
    """This process's copy of a replicated ``array``, on ``device`` (one of its own devices)."""
    shard = next((s.data for s in array.addressable_shards if s.device == device), None)
    return jax.device_put(array.addressable_data(0) if shard is None else shard, device)


def row_sharding(mesh):
    """``NamedSharding`` that splits axis 0 over the data axis and replicates the rest."""

    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
    """``NamedSharding`` that replicates an array on every device of ``mesh``."""

    return NamedSharding(mesh, P())


def place_batch(tree, mesh):
    """Host arrays ``[B, ...]`` -> global arrays split along axis 0 over the data axis of ``mesh``.

    For data-parallel steps (training batches, prediction batches). Every process passes
    the same whole batch; each keeps the rows of its own devices.

    Raises:
        DeviceError: ``B`` is not a multiple of the mesh's device count.
    """
    n = mesh.devices.size
    where = row_sharding(mesh)

    def one(a):
        a = np.asarray(a)
        if a.ndim == 0 or a.shape[0] % n:
            raise DeviceError(f"a batch of {a.shape[0] if a.ndim else 0} rows cannot be split evenly over "
                              f"{n} devices; use a batch size divisible by {n}")
        return jax.make_array_from_callback(a.shape, where, lambda idx: a[idx])

    return jax.tree.map(one, tree)


def padded_length(n: int, multiple: int) -> int:
    """Smallest length >= n divisible by ``multiple``."""
    return -(-n // multiple) * multiple


# -- device-count-invariant row computations ------------------------------------------
#
# Sums over millions of rows (K-means statistics, SVM gradients, contingency
# tables) are computed chunk by chunk: rows are cut into ``num_chunks`` equal
# chunks, each chunk's partial result is computed with the same shapes whatever
# the number of devices, and the partials are added in chunk order. The result is
# therefore bit-identical on 1, 2, 4 or 8 devices (any device count dividing the
# chunk count), and memory per step is bounded by one chunk.



@_dc.dataclass(frozen=True)
class RowLayout:
    """How ``num_rows`` real rows are padded and cut into chunks.

    Attributes:
        num_rows: real rows N.
        num_chunks: chunks G (a multiple of 8 and of the device count).
        chunk_rows: rows per chunk; ``padded_rows = num_chunks * chunk_rows``.
    """

    num_rows: int
    num_chunks: int
    chunk_rows: int

    @property
    def padded_rows(self) -> int:
        return self.num_chunks * self.chunk_rows


def plan_rows(num_rows: int, num_devices: int, max_chunk_rows: int = 16384) -> RowLayout:
    """Choose a chunking of ``num_rows`` rows for ``num_devices`` devices.

    The chunk count is a multiple of ``lcm(num_devices, 8)``, so layouts (and
    therefore results) are identical for every device count that divides 8.
    """

    if num_rows < 1:
        raise ValueError(f"need at least one row, got {num_rows}")
    base = math.lcm(int(num_devices), 8)
    g = max(1, -(-num_rows // max_chunk_rows))
    g = padded_length(g, base)
    chunk = -(-num_rows // g)
    return RowLayout(num_rows=num_rows, num_chunks=g, chunk_rows=chunk)


def _check_layout(mesh, layout: RowLayout):
    n_dev = mesh.devices.size
    if layout.num_chunks % n_dev:
        raise DeviceError(
            f"{layout.num_chunks} row chunks cannot be split over {n_dev} devices; "
            "build the layout with plan_rows(num_rows, num_devices)"
        )


def row_reduce(fn, mesh, layout: RowLayout, row_args, bcast_args=()):
    """``sum over chunks c of fn(*row_args[c], *bcast_args)``, bit-identical across device counts.

    Args:
        fn: ``fn(*row_chunk_args, *bcast_args) -> pytree`` of partial sums for one
            chunk of ``layout.chunk_rows`` rows. Must be traceable.
        mesh: mesh from :func:`make_mesh`.
        layout: the :class:`RowLayout` the row arrays were padded with.
        row_args: tuple of row-sharded arrays ``[padded_rows, ...]``.
        bcast_args: tuple of replicated arrays (parameters).

    Returns:
        The pytree of totals, replicated. Call inside or outside ``jax.jit``.
    """
    return _chunked(lambda *a: ((), fn(*a)), mesh, layout, row_args, bcast_args)[1]


def row_map_reduce(fn, mesh, layout: RowLayout, row_args, bcast_args=()):
    """:func:`row_map` and :func:`row_reduce` in one pass over the chunks.

    ``fn(*row_chunk_args, *bcast_args)`` returns ``(rows, partials)``: a pytree
    of per-row outputs (leading axis = the chunk's rows) and a pytree of partial
    sums. Returns ``(rows [padded_rows, ...] row-sharded, totals replicated)``,
    both bit-identical across device counts.
    """
    return _chunked(fn, mesh, layout, row_args, bcast_args)


class ChunkRows:
    """The rows of one chunk of a row-sharded array, read where they lie.

    :func:`product_map_reduce` hands one of these to its ``fn`` in place of the
    chunk itself: copying every chunk out of the device's block costs about as
    much as reading it, so rows are gathered only when needed. ``ChunkRows(a)``
    wraps an array that already is one chunk.

    Attributes:
        block: the array holding the chunk (the device's rows, or the chunk).
        start: index of the chunk's first row in ``block`` (traced or int).
        size: rows in the chunk.
    """

    def __init__(self, block, start=0, size=None):
        self.block = block
        self.start = start
        self.size = block.shape[0] if size is None else int(size)

    def take(self, idx):
        """Rows ``idx`` (chunk-relative, in range) as ``[len(idx), ...]``."""

        return jnp.take(self.block, self.start + idx, axis=0, mode="clip")  # in range: no fill select

    def all(self):
        """The whole chunk ``[size, ...]`` (a copy unless ``block`` is the chunk)."""

        if self.size == self.block.shape[0]:
            return self.block
        return jax.lax.dynamic_slice_in_dim(self.block, self.start, self.size, axis=0)


def product_map_reduce(fn, x, w, mesh, layout: RowLayout, row_args=(), bcast_args=()):
    """:func:`row_map_reduce` over the chunks of ``x`` with the chunk's products ``w @ x_chunk.T``.

    ``fn(prod, rows, *row_chunk_args, *bcast_args)`` gets ``prod [L, chunk_rows]``
    and ``rows``, a :class:`ChunkRows` view of the chunk of ``x``, and returns
    ``(rows_out, partials)`` as for :func:`row_map_reduce`.

    The products of all of a device's chunks are one batched product with the
    chunk's shape (``[chunks, L, D] x [chunks, rows, D]``), so every column has
    the bits of the per-chunk product ``w @ x_chunk.T`` on any device count, and
    no chunk of ``x`` is copied. It holds ``L`` floats per local row at once
    (``L / D`` of the size of ``x``). The products are taken in place because copying
    every chunk out of ``x`` first costs about as much as reading it. Use ``prod`` in its
    ``[L, rows]`` orientation: a consumer that transposes it can make XLA pick a
    different product kernel (other rounding).
    """
    return _chunked(fn, mesh, layout, row_args, bcast_args, products=(x, w))


def _chunked(fn, mesh, layout: RowLayout, row_args, bcast_args, products=None):
    """Run ``fn`` chunk by chunk (``lax.map``); per-row outputs stay sharded, partials are summed in chunk order."""

    _check_layout(mesh, layout)
    n_local = layout.num_chunks // mesh.devices.size
    size = layout.chunk_rows
    row_args = tuple(row_args)
    bcast_args = tuple(bcast_args)

    def local(rows, bcast, extra):
        chunks = jax.tree.map(lambda a: a.reshape((n_local, size) + a.shape[1:]), rows)
        if products is None:
            out, partials = jax.lax.map(lambda r: _isolated(fn, r, bcast), chunks)
        else:
            xl, wl = extra
            prod = jnp.einsum("gld,grd->glr", jnp.broadcast_to(wl, (n_local,) + wl.shape),
                              xl.reshape((n_local, size) + xl.shape[1:]))
            prod = jax.lax.optimization_barrier(prod)

            def one(a):
                i, p, rc = a
                return _isolated(lambda p_, s_, *rest: fn(p_, ChunkRows(rest[-1], s_, size), *rest[:-1]),
                                 (p, i * size) + tuple(rc), bcast + (xl,))

            out, partials = jax.lax.map(one, (jnp.arange(n_local, dtype=jnp.int32), prod, chunks))
        out = jax.tree.map(lambda o: o.reshape((n_local * size,) + o.shape[2:]), out)
        gathered = jax.tree.map(lambda p: jax.lax.all_gather(p, DATA_AXIS, tiled=True), partials)
        return out, jax.tree.map(_ordered_sum, gathered)

    extra = () if products is None else tuple(products)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tuple(P(DATA_AXIS) for _ in row_args), tuple(P() for _ in bcast_args),
                  (P(DATA_AXIS), P())[:len(extra)]),
        out_specs=(P(DATA_AXIS), P()),
        check_vma=False,
    )(row_args, bcast_args, extra)


def _isolated(fn, rows, bcast):
    """``fn(*rows, *bcast)`` behind optimisation barriers.

    With one chunk per device XLA removes the chunk loop and may fuse ``fn`` with
    the surrounding code, which changes the order of floating-point sums inside
    ``fn``; the barriers keep the per-chunk program the same for every device count.
    """

    # Separate barriers: one barrier over rows and parameters together makes XLA:CPU compile
    # some chunk programs (the nearest-centroid pass) into markedly slower code.
    rows = jax.lax.optimization_barrier(rows)
    bcast = jax.lax.optimization_barrier(bcast)
    return jax.lax.optimization_barrier(fn(*rows, *bcast))


def _ordered_sum(p):
    """Sum over axis 0 in a fixed sequential order (independent of how XLA vectorises reductions)."""

    def body(acc, x):
        return acc + x, None

    acc, _ = jax.lax.scan(body, p[0], p[1:])
    return acc


#: Rows per block of :func:`rows_tdot`: products over at most this many rows come out with the same bits
#: whatever the number of host threads (checked for XLA:CPU: larger contractions are split across threads).
TDOT_BLOCK_ROWS = 256

#: Largest ``blocks × P × Q`` for which :func:`rows_tdot` computes all block products in one batched
#: product before adding them; above it, each block's product is added as it is computed (a scan), so
#: memory stays ``P × Q`` (the bits are the same either way: each block is one ``[block, P] x [block, Q]``
#: product, and the sum runs in block order).
TDOT_BATCHED_MAX_ELEMENTS = 1 << 20


def rows_tdot(a, b, block: int = TDOT_BLOCK_ROWS):
    """``aᵀ b``, a sum over rows, with a summation order fixed by the shapes alone.

    XLA:CPU splits a matrix product whose contraction runs over many rows and whose
    output is small (a Gram matrix ``Gᵀ G``, gradients ``gᵀ X``) across the host's
    threads, so its rounding depends on the machine's core count and on how many CPU
    devices the process simulates. Here the rows are cut into blocks of ``block``
    rows, each block's product is one batched matrix product, and the block results
    are added in block order: the same bits on every machine and device count.

    Args:
        a: ``[N, P]`` or ``[N]``; b: ``[N, Q]`` or ``[N]``.

    Returns:
        ``[P, Q]`` (``[P]``/``[Q]``/``[]`` for vector arguments), the dtype of ``a @ b``.
    """
    n = a.shape[0]
    if n <= block:
        return jnp.tensordot(a, b, axes=(0, 0))
    nb = -(-n // block)
    pad = nb * block - n
    a2 = jnp.pad(a.reshape(n, -1), ((0, pad), (0, 0))).reshape(nb, block, -1)  # zero padding rows add exact zeros
    b2 = jnp.pad(b.reshape(n, -1), ((0, pad), (0, 0))).reshape(nb, block, -1)
    if nb * a2.shape[-1] * b2.shape[-1] <= TDOT_BATCHED_MAX_ELEMENTS:
        total = _ordered_sum(jnp.einsum("grp,grq->gpq", a2, b2))
    else:  # e.g. a covariance of 960 channels: one block's product at a time, not nb of them held at once

        def body(acc, blocks):
            return acc + jnp.einsum("rp,rq->pq", *blocks), None

        total, _ = jax.lax.scan(body, jnp.einsum("rp,rq->pq", a2[0], b2[0]), (a2[1:], b2[1:]))
    return total.reshape(a.shape[1:] + b.shape[1:])


def row_map(fn, mesh, layout: RowLayout, row_args, bcast_args=()):
    """Apply ``fn`` chunk by chunk to row-sharded arrays; outputs stay row-sharded.

    ``fn(*row_chunk_args, *bcast_args)`` returns a pytree of arrays whose leading
    axis is the chunk's rows. Same chunk shapes on every device count, so every
    row's result is bit-identical across device counts.
    """
    return _chunked(lambda *a: (fn(*a), ()), mesh, layout, row_args, bcast_args)[0]


def row_products(x, w, mesh, layout: RowLayout):
    """``x @ w.T`` for row-sharded ``x [N_pad, D]`` and replicated ``w [L, D]``, chunk by chunk.

    One batched matrix product over a device's chunks (``[chunks, rows, D] x
    [chunks, L, D]``): every chunk is multiplied in place with the chunk's own
    shape, so each row's products are bit-identical across device counts, as with
    :func:`row_map`, but no chunk is copied out first. For a few columns ``L``
    (k-means++ candidates) that copy costs more than the product itself.

    Returns:
        ``[N_pad, L]`` row-sharded.
    """

    _check_layout(mesh, layout)
    n_local = layout.num_chunks // mesh.devices.size

    def local(xl, wl):
        xc = xl.reshape((n_local, layout.chunk_rows) + xl.shape[1:])
        out = jnp.einsum("grd,gld->grl", xc, jnp.broadcast_to(wl, (n_local,) + wl.shape))
        return out.reshape((n_local * layout.chunk_rows, wl.shape[0]))

    return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P()), out_specs=P(DATA_AXIS),
                         check_vma=False)(x, w)


# -- rows that travel together ---------------------------------------------------------


@_dc.dataclass(frozen=True)
class RowData:
    """Row-sharded data with everything needed to compute on it: one pytree, not four loose values.

    Attributes:
        x: ``[padded_rows, ...]`` row-sharded array (pixel features, labels, ...).
        valid: ``[padded_rows] float32`` row-sharded mask: 1 on real rows, 0 on padding
            (or on rows excluded from a computation, e.g. held-out rows).
        layout: the :class:`RowLayout` the rows were padded and chunked with (static).
        mesh: the mesh the rows are sharded over (static).

    ``x`` and ``valid`` are the pytree's leaves and ``layout`` and ``mesh`` its static
    metadata, so a ``RowData`` can be passed straight into ``jax.jit``: the compiled
    program is specialised to the layout and mesh, and re-used for new rows of the same
    shape. Build one with :func:`place_rows`; derive related row arrays (labels, masks)
    with :meth:`place` so they share the layout.
    """

    x: object
    valid: object
    layout: RowLayout
    mesh: object

    def __post_init__(self):
        _check_layout(self.mesh, self.layout)
        for name in ("x", "valid"):
            a = getattr(self, name)
            shape = getattr(a, "shape", None)
            if shape is not None and (len(shape) < 1 or shape[0] != self.layout.padded_rows):
                raise ValueError(
                    f"RowData.{name} has {shape[0] if shape else 'no'} rows but its layout pads "
                    f"{self.layout.num_rows} rows to {self.layout.padded_rows}; build row arrays with "
                    "sharding.place_rows(...) or RowData.place(...)")

    @property
    def num_rows(self) -> int:
        """Real rows N (padding excluded)."""
        return self.layout.num_rows

    @property
    def padded_rows(self) -> int:
        return self.layout.padded_rows

    def replace(self, **changes) -> "RowData":
        """A copy with some fields replaced (e.g. ``valid=training_mask``)."""
        return _dc.replace(self, **changes)

    def place(self, rows, fill=0):
        """Place another per-row array (host ``[N, ...]`` or ``fetch(start, stop)``) with this layout.

        Returns a row-sharded ``jax.Array`` ``[padded_rows, ...]``, padding rows set to ``fill``.
        """
        return _place(rows, self.mesh, self.layout, fill)

    def local_range(self) -> tuple[int, int]:
        """``(start, stop)``: the real rows whose shards live on this process's devices."""
        return local_row_range(self.mesh, self.layout)


def _register_rowdata():

    jax.tree_util.register_dataclass(RowData, data_fields=["x", "valid"], meta_fields=["layout", "mesh"])


_register_rowdata()


def local_row_range(mesh, layout: RowLayout) -> tuple[int, int]:
    """Real rows ``[start, stop)`` held by the devices of this process (all rows on one host).

    Each device of the mesh holds ``padded_rows / num_devices`` consecutive rows; a
    process's devices are consecutive on the mesh (:func:`make_mesh`), so its rows are
    one block. Padding rows are excluded, so the range may be empty.
    """

    _check_layout(mesh, layout)
    per = layout.padded_rows // mesh.devices.size
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine:
        return (0, 0)
    lo, hi = min(mine) * per, (max(mine) + 1) * per
    if hi - lo != per * len(mine):
        raise DeviceError("this process's devices are not consecutive on the mesh; build it with make_mesh()")
    return (min(lo, layout.num_rows), min(hi, layout.num_rows))


def _place(rows, mesh, layout: RowLayout, fill=0):
    """Place rows ``[N, ...]`` (host array or ``fetch(start, stop)``) padded to ``layout``, shard by shard.

    Each device's shard is built on its own from the rows it holds, so the padded array
    never exists on a host and, with several processes, each process only reads (or
    computes, with ``fetch``) its own rows.
    """

    n = layout.num_rows
    if callable(rows):
        fetch = rows
        first = np.asarray(fetch(0, 0))
        tail, dtype = first.shape[1:], first.dtype
    else:
        arr = rows
        if arr.shape[0] != n:
            raise ValueError(f"expected {n} rows for this layout, got {arr.shape[0]}")
        fetch = lambda a, b: arr[a:b]  # noqa: E731
        tail, dtype = tuple(arr.shape[1:]), arr.dtype

    def shard(index):
        sl = index[0]
        start, stop = sl.start or 0, layout.padded_rows if sl.stop is None else sl.stop
        out = np.full((stop - start,) + tuple(tail), fill, dtype)
        hi = min(stop, n)
        if hi > start:
            out[: hi - start] = np.asarray(fetch(start, hi))
        return out

    return jax.make_array_from_callback((layout.padded_rows,) + tuple(tail), row_sharding(mesh), shard)


def place_rows(rows, mesh, layout: Optional[RowLayout] = None, *, num_rows: Optional[int] = None,
               fill=0) -> RowData:
    """Place ``[N, ...]`` rows on ``mesh`` as a :class:`RowData` (the one way to build one).

    Args:
        rows: host array ``[N, ...]``, or ``fetch(start, stop) -> [stop - start, ...]`` that
            produces the rows of a range (then ``num_rows`` or ``layout`` gives N). With
            several processes only the ranges held by this process's devices are fetched,
            so each process computes or reads only its own rows.
        mesh: mesh from :func:`make_mesh`.
        layout: chunking (default :func:`plan_rows` for N rows on the mesh's devices).
        fill: value of padding rows.

    Returns:
        ``RowData(x [padded_rows, ...], valid [padded_rows] float32, layout, mesh)``.
    """
    if layout is None:
        n = num_rows if callable(rows) else np.shape(rows)[0]
        if n is None:
            raise ValueError("place_rows(fetch, ...) needs num_rows= or layout=")
        layout = plan_rows(int(n), mesh.devices.size)
    elif num_rows is not None and num_rows != layout.num_rows:
        raise ValueError(f"num_rows={num_rows} does not match layout.num_rows={layout.num_rows}")
    x = _place(rows, mesh, layout, fill)
    valid = _place(lambda a, b: np.ones((b - a,), np.float32), mesh, layout, 0.0)
    return RowData(x=x, valid=valid, layout=layout, mesh=mesh)


# -- several processes (jax.distributed) ----------------------------------------------


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, local_devices: Optional[int] = None,
                           timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
    """Join a multi-process run with ``jax.distributed`` (call before anything touches a device).

    With all three of ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and
    ``process_id`` given, they are used; with none, JAX detects them from the cluster
    environment (SLURM, Open MPI, TPU pods, Kubernetes). On CPU the collectives go over
    gloo and ``local_devices`` simulated devices are created per process (the same
    ``XLA_FLAGS`` mechanism as :func:`simulate_cpu_devices`). A process that stops sending
    heartbeats for ``heartbeat_timeout_s`` seconds (killed, crashed, cut off) makes the
    coordination service stop every other process, which then exits with an error naming
    the lost task; rerun all processes with ``--resume``.

    Raises:
        DeviceError: partial arguments, or the coordinator cannot be reached in ``timeout_s``.
    """
    given = [a is not None for a in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise DeviceError("--coordinator, --num-processes and --process-id go together (or none of them, to "
                          "let JAX read them from the cluster environment)")
    if num_processes is not None and not (0 <= int(process_id) < int(num_processes)):
        raise DeviceError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if local_devices is not None:
        simulate_cpu_devices(int(local_devices))

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    kw = {} if coordinator is None else dict(coordinator_address=coordinator, num_processes=int(num_processes),
                                            process_id=int(process_id))
    try:
        jax.distributed.initialize(initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s), **kw)
    except Exception as e:  # noqa: BLE001 - jax raises RuntimeError/ValueError/XlaRuntimeError here
        where = f" at {coordinator}" if coordinator else ""
        raise DeviceError(f"could not join the distributed run{where} ({str(e).splitlines()[0][:300]}); check "
                          "that every process uses the same --coordinator and --num-processes and that process 0 "
                          "is running") from e


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op with one process)."""

    if jax.process_count() > 1:

        multihost_utils.sync_global_devices(name)
