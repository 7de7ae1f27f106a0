"""Allow-list unpickler and lazy tensor storage for the torch-free checkpoint reader.

Nothing here imports torch. The unpickler is the pure-Python `pickle._Unpickler` with the opcodes that can reach
arbitrary objects locked down:

* `find_class` (GLOBAL, STACK_GLOBAL, INST) only returns objects from an explicit allow-list mapping
  ``"module.name"`` to a stand-in written here; everything else raises `UnsafeCheckpointError` naming the global.
  Nothing is ever imported.
* REDUCE / INST / OBJ only call stand-ins from that allow-list; NEWOBJ only instantiates our own container
  classes; BUILD only reaches our containers and validated `numpy.dtype` states; extension codes (EXT1/2/4)
  are refused.
* Length-prefixed opcodes read through `BoundedReader`, so a corrupt length can neither run past the end of the
  file/region nor allocate more memory than the file holds.
* With ``lazy_bytes=True`` large BINBYTES payloads outside pickle frames are not read at all: they are recorded
  as `LazyBytes(path, offset, length)` (used for the per-storage blobs inside NVIDIA network pickles).
* Allow-listed calls and BUILDs may copy at most ``COPY_FACTOR`` times the pickle's own length in container
  items / bytes, so memo references (a few bytes each) cannot multiply one large container.

Tensors become `LazyArray` objects referencing a `Storage`; bytes are read from disk only when an array is
materialised, and then only the byte range the view covers. All tensors of one file together may materialise at
most ``VIEW_FACTOR`` times the tensor bytes the file stores, plus ``VIEW_SLACK`` (`ViewBudget`), so stride-0 or
overlapping views cannot expand a tiny storage. Zip members are streamed with their CRC-32 checked and never
inflate beyond their declared size. Loaded trees and NVIDIA module graphs are walked memoised, refusing cycles
and nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from typing import Any, Iterable

import numpy as np

from weights_port.errors import CheckpointError, UnsafeCheckpointError, short_repr

__all__ = [
    "BoundedReader",
    "EasyDict",
    "LazyArray",
    "LazyBytes",
    "Namespace",
    "SafeUnpickler",
    "Storage",
    "ViewBudget",
    "materialize",
    "torch_globals",
    "TORCH_DTYPES",
]

# Payloads at least this big (and outside a pickle frame) are left on disk when ``lazy_bytes=True``.
LAZY_BYTES_MIN = 1 << 16
# The tensors of one file may materialise VIEW_FACTOR x the tensor bytes it stores, plus VIEW_SLACK (a genuine
# shared-storage view or a stride-0 expansion of a tiny tensor stays far below that).
VIEW_FACTOR = 4
VIEW_SLACK = 1 << 20
# Allow-listed calls / BUILDs of one pickle may copy COPY_FACTOR x its length in items or bytes, plus COPY_SLACK.
COPY_FACTOR = 2
COPY_SLACK = 1 << 20
# Deepest nesting of a loaded object tree or NVIDIA module graph (real checkpoints stay below 20).
MAX_DEPTH = 100
# Zip members are streamed in chunks of this size.
_CHUNK = 1 << 20


def _bfloat16():
    import ml_dtypes  # a JAX dependency; imported lazily so plain float checkpoints never need it

    return np.dtype(ml_dtypes.bfloat16)


def _ml_dtype(name: str):
    def make():
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))

    return make


# torch dtype name -> numpy dtype (callables for ml_dtypes types, resolved on first use).
TORCH_DTYPES: dict[str, Any] = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": _bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": _ml_dtype("float8_e4m3fn"), "float8_e5m2": _ml_dtype("float8_e5m2"),
    "float8_e4m3fnuz": _ml_dtype("float8_e4m3fnuz"), "float8_e5m2fnuz": _ml_dtype("float8_e5m2fnuz"),
}

# torch.<Name>Storage -> torch dtype name. UntypedStorage counts bytes.
_STORAGE_TYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}

# Plain numpy dtype strings accepted from `numpy.dtype(...)` in a pickle (no structured/object dtypes).
_NUMPY_DTYPE_NAMES = frozenset(
    ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16", "?"]
)


def _np_dtype(spec) -> np.dtype:
    return np.dtype(spec() if callable(spec) and not isinstance(spec, type) else spec)


# --------------------------------------------------------------------------------------------- byte sources


class BoundedReader:
    """File-like view of ``[start, start + length)`` of a binary file object that refuses short reads.

    Every read that would cross the end of the region raises `CheckpointError` ("truncated"), so a corrupt length
    field never allocates more than the region holds.
    """

    def __init__(self, fobj, start: int, length: int, name: str):
        self._f = fobj
        self.start = start
        self.end = start + length
        self.name = name
        self._f.seek(start)

    def _pos(self) -> int:
        return self._f.tell()

    def remaining(self) -> int:
        return self.end - self._f.tell()

    def tell(self) -> int:
        """Position relative to the start of the region."""
        return self._f.tell() - self.start

    def abs_tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            target = self.start + offset
        elif whence == 1:
            target = self._f.tell() + offset
        else:
            target = self.end + offset
        if not self.start <= target <= self.end:
            raise CheckpointError(
                f"{self.name}: file is truncated or corrupt (seek to byte {target - self.start} outside the "
                f"{self.end - self.start}-byte region)"
            )
        self._f.seek(target)
        return target - self.start

    def read(self, n: int = -1) -> bytes:
        left = self.remaining()
        if n is None or n < 0:
            n = left
        if n > left:
            raise CheckpointError(
                f"{self.name}: file is truncated (needed {n} bytes at byte {self.tell()}, only {left} left)"
            )
        data = self._f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.name}: file is truncated (short read at byte {self.tell()})")
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:] = data
        return len(data)

    def readline(self) -> bytes:
        left = self.remaining()
        if left <= 0:
            raise CheckpointError(f"{self.name}: file is truncated (expected a text line at the end)")
        return self._f.readline(left)


def _file_stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class _FileSource:
    """Raw bytes at ``[offset, offset + nbytes)`` of a file on disk, read on demand."""

    def __init__(self, path: str, offset: int, nbytes: int, stamp: tuple[int, int]):
        self.path, self.offset, self.nbytes, self.stamp = path, offset, nbytes, stamp

    def read(self, start: int, nbytes: int) -> bytearray:
        if start < 0 or start + nbytes > self.nbytes:
            raise CheckpointError(f"{self.path}: tensor view reaches outside its storage")
        try:
            if _file_stamp(self.path) != self.stamp:
                raise CheckpointError(
                    f"{self.path}: file changed on disk since it was opened; load it again before reading tensors"
                )
            buf = bytearray(nbytes)
            with open(self.path, "rb") as f:
                f.seek(self.offset + start)
                got = f.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor data ({e})") from e
        if got != nbytes:
            raise CheckpointError(
                f"{self.path}: file is truncated (tensor data at byte {self.offset + start} needs {nbytes} bytes)"
            )
        return buf


class _MemorySource:
    """Raw bytes held in memory (small storage blobs inside a pickle)."""

    def __init__(self, data, offset: int, nbytes: int, name: str):
        self.data, self.offset, self.nbytes, self.name = memoryview(data), offset, nbytes, name
        if offset + nbytes > len(self.data):
            raise CheckpointError(f"{name}: storage blob is truncated")

    def read(self, start: int, nbytes: int) -> bytearray:
        if start < 0 or start + nbytes > self.nbytes:
            raise CheckpointError(f"{self.name}: tensor view reaches outside its storage")
        return bytearray(self.data[self.offset + start : self.offset + start + nbytes])


class _ZipMemberSource:
    """A STORED or DEFLATED zip member, streamed from the file in chunks with its CRC-32 checked.

    The first read streams the whole member, so a corrupt byte anywhere in it is reported whatever range was asked
    for; later reads stop at the end of their range (STORED ones seek straight to it). Inflating never yields
    more than the member's declared size, and memory stays at the requested range plus one chunk.
    """

    def __init__(self, path: str, info: zipfile.ZipInfo, data_offset: int, stamp: tuple[int, int]):
        self.path, self.member, self.offset, self.stamp = path, info.filename, data_offset, stamp
        self.method, self.compressed, self.nbytes = info.compress_type, info.compress_size, info.file_size
        self.crc = info.CRC
        self.verified = False

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: zip member {self.member} {what}; the file is corrupt (copy or "
                               "download it again)")

    def _chunks(self, f, stop: int):
        """Yields the member's bytes in order, from its start until at least ``stop`` bytes have been produced."""
        f.seek(self.offset)
        inflate = zlib.decompressobj(-15) if self.method == zipfile.ZIP_DEFLATED else None
        left, pending, produced = self.compressed, b"", 0
        while produced < stop:
            if not pending and left:
                pending = f.read(min(_CHUNK, left))
                if not pending:
                    raise self._error("is truncated")
                left -= len(pending)
            if inflate is None:
                data, pending = pending, b""
            else:
                data = inflate.decompress(pending, _CHUNK)
                pending = inflate.unconsumed_tail
            if not data:
                if inflate is not None and not inflate.eof and not pending and left:
                    continue  # the decompressor wants more input
                raise self._error(f"holds fewer than its declared {self.nbytes} bytes")
            if produced + len(data) > self.nbytes:
                raise self._error(f"inflates to more than its declared {self.nbytes} bytes")
            produced += len(data)
            yield data
        if stop == self.nbytes and inflate is not None and not inflate.eof:
            if inflate.decompress(pending or f.read(min(_CHUNK, left)), 1):
                raise self._error(f"inflates to more than its declared {self.nbytes} bytes")

    def read(self, start: int, nbytes: int) -> bytearray:
        if start < 0 or start + nbytes > self.nbytes:
            raise CheckpointError(f"{self.path}: tensor view reaches outside its storage")
        out = bytearray(nbytes)
        try:
            if _file_stamp(self.path) != self.stamp:
                raise CheckpointError(
                    f"{self.path}: file changed on disk since it was opened; load it again before reading tensors"
                )
            with open(self.path, "rb") as f:
                if self.verified and self.method == zipfile.ZIP_STORED:
                    f.seek(self.offset + start)
                    if f.readinto(out) != nbytes:
                        raise self._error("is truncated")
                    return out
                crc, pos = 0, 0
                for chunk in self._chunks(f, start + nbytes if self.verified else self.nbytes):
                    lo, hi = max(start, pos), min(start + nbytes, pos + len(chunk))
                    if lo < hi:
                        out[lo - start : hi - start] = chunk[lo - pos : hi - pos]
                    crc = zlib.crc32(chunk, crc)
                    pos += len(chunk)
        except (OSError, zlib.error) as e:
            raise self._error(f"cannot be read ({e})") from e
        if not self.verified:
            if crc != self.crc:
                raise self._error(f"fails its CRC-32 check (stored {self.crc:08x}, data {crc:08x})")
            self.verified = True
        return out


class LazyBytes:
    """A large ``bytes`` payload of a pickle left on disk: ``length`` bytes at ``offset`` of ``path``."""

    def __init__(self, path: str, offset: int, length: int, stamp: tuple[int, int]):
        self.path, self.offset, self.length, self.stamp = path, offset, length, stamp

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        return bytes(_FileSource(self.path, self.offset, self.length, self.stamp).read(0, self.length))

    def __repr__(self) -> str:
        return f"LazyBytes({self.path!r}, offset={self.offset}, length={self.length})"


# ------------------------------------------------------------------------------------------ storages, tensors


class Storage:
    """A flat torch storage: ``numel`` elements of ``dtype`` whose bytes live in ``source`` (set later for legacy)."""

    def __init__(self, dtype: np.dtype, numel: int, name: str, *, big_endian: bool = False):
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{name}: storage has an invalid element count {short_repr(numel)}")
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.name = name
        self.big_endian = big_endian
        self.source = None  # object with .read(start, nbytes) -> bytearray
        self.base: tuple[Storage, int] | None = None  # legacy storage views: (root, element offset)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read_bytes(self, start: int, nbytes: int) -> bytearray:
        if self.base is not None:
            root, elem_offset = self.base
            return root.read_bytes(elem_offset * self.dtype.itemsize + start, nbytes)
        if self.source is None:
            raise CheckpointError(f"{self.name}: storage data missing from the file")
        return self.source.read(start, nbytes)


class ViewBudget:
    """Bounds the bytes all tensors of one file can materialise by the tensor bytes the file stores.

    Every tensor the pickle rebuilds is charged its materialised size; each distinct root storage it views adds
    its size to what is stored. A tensor that takes the total past ``VIEW_FACTOR x stored + VIEW_SLACK`` (stride-0
    or overlapping views of a small storage, or many tensors over one storage) is refused before anything is read.
    Storage sizes are the declared ones; every loader checks that the file really holds them before returning.
    """

    def __init__(self, name: str):
        self.name = name
        self.stored = 0
        self.viewed = 0
        self._roots: dict[int, Storage] = {}

    def charge(self, tensor: LazyArray) -> LazyArray:
        root = tensor.storage.base[0] if tensor.storage.base is not None else tensor.storage
        if id(root) not in self._roots:
            self._roots[id(root)] = root
            self.stored += root.nbytes
        self.viewed += tensor.nbytes
        if self.viewed > VIEW_FACTOR * self.stored + VIEW_SLACK:
            raise CheckpointError(
                f"{self.name}: tensor of size {tensor.shape}, stride {tensor.strides} would bring the tensors to "
                f"{self.viewed} bytes, more than {VIEW_FACTOR}x the {self.stored} bytes of tensor data the file "
                "stores (stride-0 or overlapping views: a memory bomb); refusing to load it"
            )
        return tensor


class LazyArray:
    """A tensor whose data is read only when needed.

    Attributes:
      shape: tuple of ints.
      dtype: numpy dtype (bfloat16/float8 via ml_dtypes).

    ``np.asarray(x)`` or ``x.numpy()`` reads the bytes the view covers and returns a fresh C-contiguous array
    (writable, not shared with other tensors).
    """

    __slots__ = ("storage", "offset", "shape", "strides", "dtype")

    def __init__(self, storage: Storage, offset: int, shape: tuple, strides: tuple, dtype: np.dtype, name: str):
        if not isinstance(storage, Storage):
            raise CheckpointError(f"{name}: tensor rebuilt from a {type(storage).__name__}, expected a storage")
        if not _is_int(offset) or offset < 0:
            raise CheckpointError(f"{name}: invalid tensor storage offset {short_repr(offset)}")
        shape, strides = _int_tuple(shape, name, "size"), _int_tuple(strides, name, "stride")
        if len(shape) != len(strides):
            raise CheckpointError(f"{name}: tensor size {shape} and stride {strides} have different lengths")
        dtype = np.dtype(dtype)
        if math.prod(n for n in shape if n) * dtype.itemsize >= 1 << 62:
            raise CheckpointError(f"{name}: tensor size {shape} is too large for any array")
        storage_bytes = storage.nbytes
        if storage.dtype != dtype and storage.dtype.itemsize != dtype.itemsize and storage_bytes % dtype.itemsize:
            raise CheckpointError(f"{name}: storage of {storage_bytes} bytes cannot hold {dtype} elements")
        if all(n > 0 for n in shape):
            last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
            if (last + 1) * dtype.itemsize > storage_bytes:
                raise CheckpointError(
                    f"{name}: tensor of size {shape}, stride {strides}, offset {offset} reaches outside its "
                    f"storage of {storage_bytes} bytes"
                )
        self.storage, self.offset, self.shape, self.strides, self.dtype = storage, offset, shape, strides, dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """Reads the tensor: [*shape] dtype, C-contiguous, writable."""
        shape, strides, dtype = self.shape, self.strides, self.dtype
        if any(n == 0 for n in shape):
            return np.empty(shape, dtype)
        isz = dtype.itemsize
        span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1  # elements from first to last
        buf = self.storage.read_bytes(self.offset * isz, span * isz)
        flat = np.frombuffer(buf, dtype=dtype.newbyteorder(">") if self.storage.big_endian else dtype)
        if self.storage.big_endian:
            flat = flat.astype(dtype)
        if span == self.size and strides == _contiguous_strides(shape, strides):
            return flat.reshape(shape)
        # as_strided goes through __array_interface__, which cannot describe ml_dtypes: stride over raw uints.
        raw = flat.view(f"u{isz}") if isz in (1, 2, 4, 8) else flat
        view = np.lib.stride_tricks.as_strided(raw, shape, [s * isz for s in strides], writeable=False)
        return np.ascontiguousarray(view).view(dtype)

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"


def _contiguous_strides(shape: tuple, strides: tuple) -> tuple:
    """C-order strides for ``shape``; size-1 dims keep the given stride (torch leaves them arbitrary)."""
    out, acc = [], 1
    for n, s in zip(reversed(shape), reversed(strides)):
        out.append(s if n == 1 else acc)
        acc *= n
    return tuple(reversed(out))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_tuple(x, name: str, what: str) -> tuple:
    if not isinstance(x, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in x):
        raise CheckpointError(f"{name}: invalid tensor {what} {short_repr(x)}")
    return tuple(x)


# ------------------------------------------------------------------------------------------- plain containers


class Namespace:
    """Stand-in for `argparse.Namespace`: attribute access plus read-only mapping access."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError("argparse.Namespace state is not a dict of str keys")
        self.__dict__.update(state)

    def __getitem__(self, key):
        return self.__dict__[key]

    def __contains__(self, key) -> bool:
        return key in self.__dict__

    def __iter__(self):
        return iter(self.__dict__)

    def __len__(self) -> int:
        return len(self.__dict__)

    def keys(self):
        return self.__dict__.keys()

    def values(self):
        return self.__dict__.values()

    def items(self):
        return self.__dict__.items()

    def get(self, key, default=None):
        return self.__dict__.get(key, default)

    def __eq__(self, other) -> bool:
        return isinstance(other, Namespace) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return "Namespace(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


class EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict`: a dict whose items are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]

    def __setstate__(self, state):
        if state is None:
            return
        if not isinstance(state, dict):
            raise CheckpointError("EasyDict state is not a dict")
        self.update(state)


# --------------------------------------------------------------------------------------------- the unpickler


class _Marker:
    """A non-callable value returned by `find_class` for type-like globals (storage classes, torch dtypes)."""

    def __init__(self, kind: str, value, qualname: str):
        self.kind, self.value, self.qualname = kind, value, qualname

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


# Argument types whose length counts towards `SafeUnpickler`'s copy limit.
_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset, LazyBytes)


def _normalize_global(module: str, name: str) -> str:
    # Python 2 spellings (protocol <= 2 pickles written by Python 2).
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    return f"{module}.{name}"


class SafeUnpickler(pickle._Unpickler):
    """Pure-Python unpickler restricted to ``allowed`` globals.

    Args:
      reader: a `BoundedReader`.
      allowed: ``{"module.name": stand_in}``; callables may be REDUCEd, `_Marker`s are plain values.
      name: file name for messages.
      persistent_load: callable for BINPERSID/PERSID; without it persistent ids are refused.
      lazy_bytes: `(path, stamp)` to leave large BINBYTES payloads on disk as `LazyBytes`, or None.
      newobj_classes: classes NEWOBJ may instantiate (our containers only).
    """

    def __init__(self, reader: BoundedReader, allowed: dict, name: str, *, persistent_load=None,
                 lazy_bytes: tuple[str, tuple[int, int]] | None = None, newobj_classes: Iterable[type] = (),
                 encoding: str = "utf-8"):
        super().__init__(reader, encoding=encoding)
        self._reader = reader
        self._allowed = allowed
        self._callables = {id(v) for v in allowed.values() if callable(v) and not isinstance(v, _Marker)}
        self._name = name
        self._persistent = persistent_load
        self._lazy = lazy_bytes
        self._newobj = tuple(newobj_classes)
        self._copied = 0
        self._copy_limit = COPY_FACTOR * (reader.end - reader.start) + COPY_SLACK
        self._tuple_depths: dict[int, int] = {}  # id -> nesting, for tuples holding tuples

    # -- globals -----------------------------------------------------------------------------------
    def find_class(self, module, name):
        qual = f"{module}.{name}"
        key = _normalize_global(str(module), str(name))
        if key == "dnnlib.tflib.network.Network":
            raise CheckpointError(
                f"{self._name}: this is a TensorFlow StyleGAN pickle (dnnlib.tflib.network.Network). Convert it "
                "to a PyTorch pickle with NVIDIA's stylegan2-ada-pytorch legacy.py first."
            )
        if key not in self._allowed:
            raise UnsafeCheckpointError(
                f"{self._name}: refusing to load global '{qual}': it is not on the allow-list of the torch-free "
                "checkpoint reader (nothing from the file was imported or executed)"
            )
        return self._allowed[key]

    def get_extension(self, code):
        raise UnsafeCheckpointError(f"{self._name}: pickle uses the copyreg extension registry (code {code})")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise CheckpointError(f"{self._name}: unexpected persistent id {short_repr(pid)} in a plain pickle")
        return self._persistent(pid)

    def _check_callable(self, func, what: str):
        if id(func) not in self._callables:
            raise UnsafeCheckpointError(
                f"{self._name}: pickle tries to call a non-allow-listed object ({type(func).__name__}) via {what}"
            )

    def _charge_copies(self, values: Iterable) -> None:
        """Counts the items / bytes a call or BUILD may copy out of ``values`` (memo references cost a few bytes
        each, so without a limit one large container could be copied over and over)."""
        self._copied += sum(len(v) for v in values if isinstance(v, _SIZED))
        if self._copied > self._copy_limit:
            raise CheckpointError(
                f"{self._name}: pickle copies its containers into more than {COPY_FACTOR}x its own size "
                "(repeated references to one large object: a memory bomb); refusing to load it"
            )

    # -- opcodes that call or build objects --------------------------------------------------------
    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        self._check_callable(func, "REDUCE")
        if not isinstance(args, tuple):
            raise CheckpointError(f"{self._name}: REDUCE arguments are not a tuple")
        self._charge_copies(args)
        stack[-1] = func(*args)

    def _instantiate(self, klass, args):
        self._check_callable(klass, "INST/OBJ")
        self._charge_copies(args)
        self.append(klass(*args))

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in self._newobj or not isinstance(args, tuple):
            raise UnsafeCheckpointError(f"{self._name}: NEWOBJ of a non-allow-listed class {short_repr(cls)}")
        self._charge_copies(args)
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in self._newobj or not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise UnsafeCheckpointError(f"{self._name}: NEWOBJ_EX of a non-allow-listed class {short_repr(cls)}")
        self._charge_copies(args + tuple(kwargs.values()))
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        self._charge_copies((state,))
        if type(inst) in (Namespace, EasyDict):
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype):
            _set_numpy_dtype_state(inst, state, self._name)
        elif type(inst) is dict:
            # OrderedDict.__reduce__ state: instance attributes such as state_dict()._metadata; dropped.
            if state is not None and not isinstance(state, dict):
                raise CheckpointError(f"{self._name}: unexpected dict state {type(state).__name__}")
        else:
            raise UnsafeCheckpointError(f"{self._name}: BUILD on a non-allow-listed object {type(inst).__name__}")

    # -- container fills: only real lists / dicts / sets (no .extend/.append/__setitem__ lookups on others) ----
    def _target(self, kinds: tuple, what: str):
        target = self.stack[-1]
        if not isinstance(target, kinds):
            raise UnsafeCheckpointError(f"{self._name}: {what} on a {type(target).__name__}, not a container")
        return target

    def load_append(self):
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        dict.__setitem__(self._target((dict,), "SETITEM"), key, value)

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target((dict,), "SETITEMS")
        for i in range(0, len(items), 2):
            dict.__setitem__(target, items[i], items[i + 1])

    def load_additems(self):
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(items)

    # -- tuples: nesting bounded, since hashing a deeply nested tuple (a dict key) overflows the C stack --------
    def _track_tuple(self):
        t = self.stack[-1]
        depth = 1 + max((self._tuple_depths.get(id(v), 1) for v in t if type(v) is tuple), default=0)
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{self._name}: pickle nests tuples more than {MAX_DEPTH} levels deep")
        if depth > 1:
            self._tuple_depths[id(t)] = depth
        else:
            self._tuple_depths.pop(id(t), None)

    def load_tuple(self):
        pickle._Unpickler.load_tuple(self)
        self._track_tuple()

    def load_tuple1(self):
        pickle._Unpickler.load_tuple1(self)
        self._track_tuple()

    def load_tuple2(self):
        pickle._Unpickler.load_tuple2(self)
        self._track_tuple()

    def load_tuple3(self):
        pickle._Unpickler.load_tuple3(self)
        self._track_tuple()

    # -- large byte payloads -------------------------------------------------------------------------
    def _bytes_payload(self, n: int):
        frame = getattr(getattr(self, "_unframer", None), "current_frame", 0)
        if self._lazy is not None and n >= LAZY_BYTES_MIN and frame is None:
            if n > self._reader.remaining():
                raise CheckpointError(f"{self._name}: file is truncated (bytes payload of {n} bytes)")
            path, stamp = self._lazy
            pos = self._reader.abs_tell()
            self._reader.seek(n, 1)
            self.append(LazyBytes(path, pos, n, stamp))
        else:
            self.append(self.read(n))

    def load_binbytes(self):
        (n,) = struct.unpack("<I", self.read(4))
        self._bytes_payload(n)

    def load_binbytes8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self._bytes_payload(n)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple1
    dispatch[pickle.TUPLE2[0]] = load_tuple2
    dispatch[pickle.TUPLE3[0]] = load_tuple3


def _set_numpy_dtype_state(inst: np.dtype, state, name: str) -> None:
    """BUILD for `numpy.dtype`: only plain (non-structured) states with a byte order are accepted."""
    ok = (
        isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")
        and state[2] is None and state[3] is None and state[4] is None
        and all(_is_int(v) for v in state[5:])
    )
    if not ok:
        raise CheckpointError(f"{name}: unsupported numpy dtype state {short_repr(state)}")
    native = "<" if sys.byteorder == "little" else ">"
    if state[1] not in ("|", "=", native):
        inst.__setstate__((3, state[1], None, None, None, -1, -1, 0))


def plain_load(reader: BoundedReader, name: str):
    """Unpickles a header pickle (ints, dicts, lists of str) with no globals and no persistent ids allowed."""
    return SafeUnpickler(reader, {}, name).load()


# --------------------------------------------------------------------------------------- allow-listed stand-ins


def torch_globals(name: str) -> dict[str, Any]:
    """Allow-list shared by torch zip/legacy files and NVIDIA pickles: ``"module.name" -> stand-in``.

    Use one allow-list per file: its tensor rebuilders share one `ViewBudget`.
    """
    budget = ViewBudget(name)

    def ordered_dict(*args):
        if len(args) > 1:
            raise CheckpointError(f"{name}: OrderedDict called with {len(args)} arguments")
        return dict(*args)

    def torch_size(*args):
        if len(args) != 1:
            raise CheckpointError(f"{name}: torch.Size needs one argument")
        return _int_tuple(args[0], name, "size")

    def rebuild_tensor(storage, storage_offset, size, stride, *_unused):
        dtype = storage.dtype if isinstance(storage, Storage) else np.float32
        return budget.charge(LazyArray(storage, storage_offset, size, stride, dtype, name))

    def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                          metadata=None):
        if not isinstance(dtype, _Marker) or dtype.kind != "dtype":
            raise CheckpointError(f"{name}: _rebuild_tensor_v3 dtype is not a torch dtype")
        return budget.charge(LazyArray(storage, storage_offset, size, stride, dtype.value(), name))

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, LazyArray):
            raise CheckpointError(f"{name}: parameter data is a {type(data).__name__}, expected a tensor")
        return data

    def rebuild_from_type(func, new_type, args, state=None):
        if not isinstance(new_type, _Marker) or new_type.kind != "tensor-type":
            raise UnsafeCheckpointError(f"{name}: tensor subclass {short_repr(new_type)} is not on the allow-list")
        if func not in (rebuild_tensor, rebuild_tensor_v3, rebuild_parameter) or not isinstance(args, tuple):
            raise UnsafeCheckpointError(f"{name}: _rebuild_from_type_v2 with a non-allow-listed rebuild function")
        return func(*args)

    def numpy_scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or data is None:
            raise CheckpointError(f"{name}: unsupported numpy scalar of dtype {short_repr(dtype)}")
        if isinstance(data, str):  # protocol-2 / Python-2 byte strings
            data = data.encode("latin1")
        if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
            raise CheckpointError(f"{name}: numpy scalar payload does not match dtype {dtype}")
        return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]

    def numpy_dtype(spec, align=False, copy=False):
        if not isinstance(spec, str) or spec not in _NUMPY_DTYPE_NAMES or align not in (False, True, 0, 1):
            raise CheckpointError(f"{name}: unsupported numpy dtype {short_repr(spec)}")
        return np.dtype(spec, copy=True)  # fresh instance, so BUILD may set its byte order

    def codecs_encode(obj, encoding="utf-8", errors="strict"):
        # Python 3 writes bytes in protocol <= 2 as _codecs.encode(latin-1 text, 'latin1').
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1") or errors != "strict":
            raise CheckpointError(f"{name}: unsupported _codecs.encode call")
        return obj.encode("latin1")

    def safe_bytes(*args):
        if not args:
            return b""
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return bytes(args[0])
        raise CheckpointError(f"{name}: unsupported bytes(...) call in pickle")

    def safe_set(*args):
        return set(*args) if len(args) <= 1 else _bad("set")

    def safe_frozenset(*args):
        return frozenset(*args) if len(args) <= 1 else _bad("frozenset")

    def safe_slice(*args):
        if not 1 <= len(args) <= 3 or not all(a is None or _is_int(a) for a in args):
            _bad("slice")
        return slice(*args)

    def safe_complex(real=0.0, imag=0.0):
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            _bad("complex")
        return complex(real, imag)

    def _bad(what):
        raise CheckpointError(f"{name}: unsupported {what}(...) call in pickle")

    allowed: dict[str, Any] = {
        "collections.OrderedDict": ordered_dict,
        "torch.Size": torch_size,
        "torch._utils._rebuild_tensor": rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": rebuild_from_type,
        "torch._tensor._rebuild_from_type": rebuild_from_type,
        "torch.Tensor": _Marker("tensor-type", None, "torch.Tensor"),
        "torch.nn.parameter.Parameter": _Marker("tensor-type", None, "torch.nn.parameter.Parameter"),
        "numpy.core.multiarray.scalar": numpy_scalar,
        "numpy._core.multiarray.scalar": numpy_scalar,
        "numpy.dtype": numpy_dtype,
        "_codecs.encode": codecs_encode,
        "builtins.bytes": safe_bytes,
        "builtins.set": safe_set,
        "builtins.frozenset": safe_frozenset,
        "builtins.slice": safe_slice,
        "builtins.complex": safe_complex,
        "argparse.Namespace": Namespace,
    }
    for storage_name, dtype_name in _STORAGE_TYPES.items():
        marker = _Marker("storage", TORCH_DTYPES[dtype_name], f"torch.{storage_name}")
        allowed[f"torch.{storage_name}"] = marker
        allowed[f"torch.cuda.{storage_name}"] = marker
    allowed["torch.storage.UntypedStorage"] = allowed["torch.UntypedStorage"]
    for dtype_name, spec in TORCH_DTYPES.items():
        allowed[f"torch.{dtype_name}"] = _Marker("dtype", lambda spec=spec: _np_dtype(spec), f"torch.{dtype_name}")
    return allowed


def storage_dtype(storage_type, name: str) -> np.dtype:
    """numpy dtype of a ``torch.<X>Storage`` marker from a persistent id."""
    if not isinstance(storage_type, _Marker) or storage_type.kind != "storage":
        # torch >= 2 zip files may name a torch dtype here instead of a storage class.
        if isinstance(storage_type, _Marker) and storage_type.kind == "dtype":
            return storage_type.value()
        raise CheckpointError(f"{name}: persistent id names {short_repr(storage_type)}, expected a torch storage type")
    return _np_dtype(storage_type.value)


# ------------------------------------------------------------------------------------------------ tree walk


def materialize(obj, *, arrays: bool = True, name: str = "checkpoint"):
    """Replaces every `LazyArray` (and leftover `LazyBytes`) in a loaded tree, in place where possible.

    The walk is memoised (shared sub-objects are visited once and stay shared) and bounded: a container that
    contains itself, or nesting deeper than ``MAX_DEPTH``, is refused, so every later walk over the tree (module
    graphs, messages, JSON) terminates quickly.

    Args:
      obj: what a loader returned (dicts, lists, tuples, sets, `Namespace`, `PersistentObject`, ...).
      arrays: False to keep `LazyArray`s and only resolve `LazyBytes`.
      name: the file, for messages.

    Returns:
      The same tree with numpy arrays.

    Raises:
      CheckpointError: a cycle, or nesting deeper than ``MAX_DEPTH``.
    """
    memo: dict[int, Any] = {}
    active: set[int] = set()

    def walk(x, depth: int):
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:
            raise CheckpointError(f"{name}: the pickled object graph has a cycle (a container inside itself); "
                                  "torch.save and NVIDIA's pickles never write one")
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{name}: the pickled object tree is nested more than {MAX_DEPTH} levels deep")
        if isinstance(x, LazyArray):
            out = x.numpy() if arrays else x
        elif isinstance(x, LazyBytes):
            out = x.read()
        elif isinstance(x, (dict, list, tuple, set, frozenset, Namespace)) or hasattr(x, "_materialize_children"):
            active.add(key)
            out = _walk_children(x, lambda v: walk(v, depth + 1))
            active.discard(key)
        else:
            out = x
        memo[key] = out
        return out

    return walk(obj, 0)


def _walk_children(x, walk):
    """Applies ``walk`` to the members of container ``x``; mutable containers are updated in place."""
    if isinstance(x, dict):
        for k in list(x):
            x[k] = walk(x[k])
    elif isinstance(x, list):
        x[:] = [walk(v) for v in x]
    elif isinstance(x, tuple):
        return tuple(walk(v) for v in x)
    elif isinstance(x, (set, frozenset)):  # members are hashable scalars / tuples: checked, not replaced
        for v in x:
            walk(v)
    elif isinstance(x, Namespace):
        for k in list(vars(x)):
            setattr(x, k, walk(getattr(x, k)))
    else:  # PersistentObject
        x._materialize_children(walk)
    return x


def make_reader_for_bytes(data, name: str) -> BoundedReader:
    return BoundedReader(io.BytesIO(data), 0, len(data), name)


def file_source(path: str, offset: int, nbytes: int, stamp) -> _FileSource:
    return _FileSource(path, offset, nbytes, stamp)


def memory_source(data, offset: int, nbytes: int, name: str) -> _MemorySource:
    return _MemorySource(data, offset, nbytes, name)


def zip_member_source(path: str, info: zipfile.ZipInfo, data_offset: int, stamp) -> _ZipMemberSource:
    return _ZipMemberSource(path, info, data_offset, stamp)


def file_stamp(path: str) -> tuple[int, int]:
    return _file_stamp(path)

