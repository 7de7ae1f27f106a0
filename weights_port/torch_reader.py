"""Safe, torch-free reader for PyTorch checkpoints and NVIDIA StyleGAN2-ADA / StyleGAN3 network pickles.

Formats:

* ``torch-zip``: `torch.save` of torch >= 1.6. ``<root>/data.pkl`` (protocol 2) names storages by persistent id
  ``('storage', torch.<X>Storage, key, location, numel)``; storage bytes are the ZIP_STORED members
  ``<root>/data/<key>`` and are read straight from the file when a tensor is materialised.
* ``torch-legacy``: `torch.save(..., _use_new_zipfile_serialization=False)` and torch < 1.6: pickled magic number,
  protocol version 1001, ``sys_info``, the main pickle, the sorted storage-key list, then per key an int64 element
  count and the raw bytes.
* ``nvidia-pickle``: a plain `pickle.dump` of ``{'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'}``
  whose networks are ``torch_utils.persistence`` objects. Each is returned as a `PersistentObject` holding the
  module ``__dict__``; ``module_src`` is kept as text and never executed. Each storage is a nested legacy
  ``torch.save`` blob (``torch.storage._load_from_bytes``); blobs of 64 KiB or more are not read while unpickling,
  only their file offsets are recorded, so memory stays bounded by what the caller materialises.

Every pickle is read by an allow-list unpickler (`weights_port._pickle_safe.SafeUnpickler`): a global outside the
list raises `UnsafeCheckpointError` naming it; nothing from the file is imported or executed. Corrupt, truncated
or unrecognised files raise `CheckpointError` naming the file and what was expected.

Memory bound. Reading a file of S bytes, whose tensors' storages hold T bytes (T <= S, except deflated zip members,
which may inflate to at most ``INFLATE_FACTOR x S + INFLATE_SLACK`` bytes in all), costs at most

* the unpickled Python objects themselves (Python's per-object overhead: at most a few hundred bytes per byte of
  pickle, and a real pickle is a small part of its file; allow-listed calls copy at most ``COPY_FACTOR x`` the
  pickle's length, and tuples nest at most ``MAX_DEPTH`` deep),
* ``VIEW_FACTOR x T + VIEW_SLACK`` for all tensors materialised together (stride-0 or overlapping views beyond that
  are refused when the pickle rebuilds them, before anything is read),
* one zip chunk (1 MiB) while streaming a member.

Zip members are checked against their CRC-32 when first read; object trees and NVIDIA module graphs are walked
memoised and refused when cyclic, shared (modules) or nested deeper than ``MAX_DEPTH``. The converters add at
most a small multiple of the parameter count of the config they validated against the tensors present.

Example:
  >>> nets = load_nvidia_pickle("network-snapshot-025000.pkl")
  >>> G = nets["G_ema"]
  >>> G.init_kwargs["z_dim"], G.named_tensors()["mapping.w_avg"].shape
"""

from __future__ import annotations

import contextlib
import os
import struct
import zipfile
from typing import Any

import numpy as np

from weights_port._pickle_safe import (
    MAX_DEPTH,
    BoundedReader,
    EasyDict,
    LazyArray,
    LazyBytes,
    Namespace,
    SafeUnpickler,
    Storage,
    file_source,
    file_stamp,
    make_reader_for_bytes,
    materialize,
    memory_source,
    plain_load,
    storage_dtype,
    torch_globals,
    zip_member_source,
)
from weights_port.errors import CheckpointError, UnsafeCheckpointError, short_repr

__all__ = [
    "CheckpointError",
    "EasyDict",
    "LazyArray",
    "Namespace",
    "PersistentObject",
    "UnsafeCheckpointError",
    "load_any",
    "load_nvidia_pickle",
    "load_torch_file",
    "materialize",
]

# Deflated members of one zip may inflate to INFLATE_FACTOR x the file's size, plus INFLATE_SLACK (torch writes
# STORED members; weights re-zipped with deflate shrink by a few percent).
INFLATE_FACTOR = 16
INFLATE_SLACK = 1 << 20
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_TORCH_EXPECTED = "a torch.save checkpoint (zip format of torch >= 1.6, or the legacy pickle format)"
_NVIDIA_EXPECTED = "an NVIDIA stylegan2-ada-pytorch / stylegan3 network pickle"


# ------------------------------------------------------------------------------------------ PersistentObject


class PersistentObject:
    """A ``torch_utils.persistence`` network from an NVIDIA pickle, kept as data.

    Attributes:
      class_name: e.g. ``'Generator'``, ``'MappingNetwork'``, ``'SynthesisLayer'``.
      module_src: the pickled source of the defining module, as text. Never executed.
      state: the module ``__dict__``: ``'_parameters'``, ``'_buffers'``, ``'_modules'`` (children are
        `PersistentObject`s), ``'_init_kwargs'``, plain attributes (``weight_gain``, ``conv_clamp``, ...).
        Tensors are `LazyArray`s unless the file was loaded with ``lazy=False``.
      version: the persistence format version (6 for stylegan2-ada-pytorch and stylegan3).
      source: the file it was read from, for messages.
    """

    def __init__(self, class_name: str, module_src: str, state: dict, version: int, source: str = "NVIDIA pickle"):
        self.class_name = class_name
        self.module_src = module_src
        self.state = state
        self.version = version
        self.source = source

    @property
    def init_kwargs(self) -> dict:
        """Constructor kwargs (``state['_init_kwargs']``): ``z_dim, c_dim, w_dim, img_resolution, ...``."""
        kwargs = self.state.get("_init_kwargs") or {}
        return kwargs if isinstance(kwargs, dict) else {}

    @property
    def modules(self) -> dict[str, PersistentObject | None]:
        """Direct children (``state['_modules']``)."""
        return self._group("_modules")

    def _group(self, key: str) -> dict:
        group = self.state.get(key) or {}
        if not isinstance(group, dict) or not all(isinstance(k, str) for k in group):
            raise CheckpointError(f"{self.source}: {self.class_name}.{key} is not a dict with string keys")
        return group

    def child(self, dotted_name: str) -> PersistentObject:
        """The sub-network at ``dotted_name`` (e.g. ``'synthesis.b4.conv1'``)."""
        node = self
        for part in dotted_name.split("."):
            nxt = node.modules.get(part) if isinstance(node, PersistentObject) else None
            if not isinstance(nxt, PersistentObject):
                raise KeyError(f"{self.class_name} has no sub-module {dotted_name!r} (failed at {part!r})")
            node = nxt
        return node

    def named_modules(self) -> list[tuple[str, PersistentObject]]:
        """``[('', self), ('mapping', ...), ('mapping.fc0', ...), ...]``: every sub-network once, depth first.

        Raises:
          CheckpointError: a sub-network is reached twice (a shared or cyclic module graph, which NVIDIA's
            networks never have), or the graph is nested more than ``MAX_DEPTH`` levels deep.
        """
        out: list[tuple[str, PersistentObject]] = []
        seen: set[int] = set()
        stack = [("", self, 0)]
        while stack:
            path, node, depth = stack.pop()
            if id(node) in seen:
                raise CheckpointError(f"{self.source}: {self.class_name} reaches sub-module {path!r} a second time "
                                      "(shared or cyclic module graph); not a network NVIDIA's code saves")
            if depth > MAX_DEPTH:
                raise CheckpointError(f"{self.source}: {self.class_name} nests sub-modules more than {MAX_DEPTH} "
                                      "levels deep")
            seen.add(id(node))
            out.append((path, node))
            children = [(f"{path}.{k}" if path else k, v) for k, v in node.modules.items()
                        if isinstance(v, PersistentObject)]
            stack.extend((p, v, depth + 1) for p, v in reversed(children))
        return out

    def named_tensors(self, prefix: str = "", *, lazy: bool = False) -> dict[str, np.ndarray]:
        """Flat ``{'mapping.fc0.weight': array}`` of parameters and buffers, in `state_dict()` order.

        Non-persistent buffers are included (NVIDIA's networks register none that matter for inference).

        Args:
          prefix: prepended to every name.
          lazy: True to return tensors as stored (`LazyArray`s stay unread); by default each is read here into a
            fresh C-contiguous numpy array.

        Raises:
          CheckpointError: a parameter or buffer is not a tensor, or the module graph is not a tree
            (see `named_modules`).
        """
        out: dict[str, np.ndarray] = {}
        for path, module in self.named_modules():
            for group in ("_parameters", "_buffers"):
                for name, value in module._group(group).items():
                    if value is None:
                        continue
                    key = f"{prefix}{path}.{name}" if path else prefix + name
                    if not isinstance(value, (LazyArray, np.ndarray)):
                        raise CheckpointError(f"{self.source}: {key} is of type {type(value).__name__}, not a tensor")
                    out[key] = value if lazy or not isinstance(value, LazyArray) else value.numpy()
        return out

    def _materialize_children(self, walk) -> None:
        self.state = walk(self.state)

    def __repr__(self) -> str:
        modules = self.state.get("_modules")
        return f"PersistentObject({self.class_name!r}, modules={list(modules) if isinstance(modules, dict) else []})"


# ------------------------------------------------------------------------------------------------- helpers


def _check_path(path) -> tuple[str, int, tuple[int, int]]:
    try:
        path = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"expected a checkpoint file path, got {type(path).__name__}") from None
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; expected a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: file is empty; expected a checkpoint")
    return path, size, file_stamp(path)


@contextlib.contextmanager
def _errors_as_checkpoint_error(path: str, expected: str):
    """Turns any parsing failure into a `CheckpointError` that names the file and the expected format."""
    try:
        yield
    except CheckpointError:
        raise
    except RecursionError as e:
        raise CheckpointError(f"{path}: not {expected}: pickle is nested too deeply") from e
    except Exception as e:  # noqa: BLE001 - every parser failure becomes one clear error
        raise CheckpointError(f"{path}: not {expected} or corrupt ({type(e).__name__}: {e})") from e


def _sniff(path: str, size: int) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if _is_legacy_magic(path, size):
        return "torch-legacy"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _is_legacy_magic(path: str, size: int) -> bool:
    with open(path, "rb") as f:
        try:
            return plain_load(BoundedReader(f, 0, min(size, 64), path), path) == _LEGACY_MAGIC
        except Exception:  # noqa: BLE001 - anything unreadable is simply "not the magic number"
            return False


def _unknown_format(path: str, kind: str, expected: str) -> CheckpointError:
    if kind == "tar":
        return CheckpointError(f"{path}: tar-based torch.save file (torch <= 0.3) is not supported; expected {expected}")
    if kind == "pickle":
        return CheckpointError(f"{path}: a plain pickle, not {expected}; try load_nvidia_pickle / load_any")
    if kind == "torch-zip" or kind == "torch-legacy":
        return CheckpointError(f"{path}: a torch.save file, not {expected}; use load_torch_file")
    return CheckpointError(f"{path}: unrecognised file format; expected {expected}")


# ---------------------------------------------------------------------------------------------- legacy format


def _load_legacy(reader: BoundedReader, name: str, make_source, allowed: dict, newobj_classes=(Namespace,)):
    """Parses a legacy `torch.save` stream from ``reader``; storages get sources ``make_source(abs_offset, n)``."""
    if plain_load(reader, name) != _LEGACY_MAGIC:
        raise CheckpointError(f"{name}: missing the torch.save magic number; expected {_TORCH_EXPECTED}")
    protocol = plain_load(reader, name)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{name}: unsupported legacy torch.save protocol {short_repr(protocol)} (expected 1001)")
    sys_info = plain_load(reader, name)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    roots: dict[str, Storage] = {}
    views: dict[str, Storage] = {}

    def persistent_load(pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) != 6:
            raise CheckpointError(f"{name}: unsupported persistent id {short_repr(pid)} (expected a storage)")
        _, storage_type, root_key, _location, numel, view_metadata = pid
        root_key = _key(root_key, name)
        dtype = storage_dtype(storage_type, name)
        root = roots.get(root_key)
        if root is None:
            root = roots[root_key] = Storage(dtype, numel, f"{name} storage {root_key}", big_endian=not little)
        if view_metadata is None:
            return root
        view_key, offset, view_size = view_metadata
        view_key = _key(view_key, name)
        if view_key not in views:
            if not all(isinstance(v, int) and v >= 0 for v in (offset, view_size)) or offset + view_size > root.numel:
                raise CheckpointError(f"{name}: storage view {view_key} lies outside its storage")
            view = Storage(dtype, view_size, f"{name} storage view {view_key}", big_endian=not little)
            view.base = (root, offset)
            views[view_key] = view
        return views[view_key]

    obj = SafeUnpickler(
        reader, allowed, name, persistent_load=persistent_load, newobj_classes=newobj_classes
    ).load()
    keys = plain_load(reader, name)
    if not isinstance(keys, list):
        raise CheckpointError(f"{name}: storage key list is missing; expected {_TORCH_EXPECTED}")
    for key in keys:
        key = _key(key, name)
        storage = roots.get(key)
        if storage is None:
            raise CheckpointError(f"{name}: data for storage {key} that no tensor uses")
        (numel,) = struct.unpack("<q" if little else ">q", reader.read(8))
        if numel != storage.numel:
            raise CheckpointError(f"{name}: storage {key} holds {numel} elements, the pickle says {storage.numel}")
        offset = reader.abs_tell()
        reader.seek(storage.nbytes, 1)
        storage.source = make_source(offset, storage.nbytes)
    missing = [k for k, s in roots.items() if s.source is None]
    if missing:
        raise CheckpointError(f"{name}: file is truncated: no data for storages {missing[:5]}")
    return obj


def _key(key, name: str) -> str:
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not isinstance(key, (str, int)):
        raise CheckpointError(f"{name}: storage key {short_repr(key)} is not a string")
    return str(key)


def _load_legacy_file(path: str, size: int, stamp) -> Any:
    with open(path, "rb") as f:
        reader = BoundedReader(f, 0, size, path)
        return _load_legacy(
            reader, path, lambda off, n: file_source(path, off, n, stamp), torch_globals(path)
        )


# ------------------------------------------------------------------------------------------------ zip format


def _load_zip_file(path: str, size: int, stamp) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{path}: not a readable zip archive (truncated or corrupt: {e}); expected {_TORCH_EXPECTED}"
        ) from e
    with zf, open(path, "rb") as raw:
        names = zf.namelist()
        pkl_names = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise CheckpointError(
                f"{path}: zip archive without a single '<root>/data.pkl'; expected {_TORCH_EXPECTED}"
            )
        prefix = pkl_names[0][: -len("data.pkl")]
        inflated = 0

        def member(name: str):
            """A source for zip member ``name``, its declared inflated size charged to the file's budget."""
            nonlocal inflated
            source = _member_source(zf, raw, name, path, size, stamp)
            if source.method == zipfile.ZIP_DEFLATED:
                inflated += source.nbytes
                if inflated > INFLATE_FACTOR * size + INFLATE_SLACK:
                    raise CheckpointError(
                        f"{path}: zip member {name} declares {source.nbytes} bytes deflated into "
                        f"{source.compressed}: the archive's deflated members would inflate to more than "
                        f"{INFLATE_FACTOR}x the file's size (a zip bomb); re-save the checkpoint with torch.save"
                    )
            return source

        byteorder = "little"
        if prefix + "byteorder" in names:
            record = member(prefix + "byteorder")
            byteorder = bytes(record.read(0, record.nbytes)).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {short_repr(byteorder)}")
        pkl = member(pkl_names[0])
        data_pkl = bytes(pkl.read(0, pkl.nbytes))
        storages: dict[str, Storage] = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
                raise CheckpointError(f"{path}: unsupported persistent id {short_repr(pid)} (expected a storage)")
            _, storage_type, key, _location, numel = pid
            key = _key(key, path)
            if key in storages:
                return storages[key]
            storage = Storage(storage_dtype(storage_type, path), numel, f"{path} storage {key}",
                              big_endian=byteorder == "big")
            source = member(f"{prefix}data/{key}")
            if source.nbytes < storage.nbytes:
                raise CheckpointError(f"{path}: zip member {source.member} has {source.nbytes} bytes, "
                                      f"the pickle needs {storage.nbytes}")
            storage.source = source
            storages[key] = storage
            return storage

        return SafeUnpickler(
            make_reader_for_bytes(data_pkl, f"{path}:data.pkl"), torch_globals(path), f"{path}:data.pkl",
            persistent_load=persistent_load, newobj_classes=(Namespace,),
        ).load()


def _member_source(zf: zipfile.ZipFile, raw, name: str, path: str, size: int, stamp):
    """A CRC-checked source for member ``name`` of the zip at ``path`` (``raw``: the file, ``size`` bytes)."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: zip member {name} is missing (truncated archive?)") from None
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{path}: zip member {name} is encrypted; re-save the checkpoint with torch.save")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"{path}: zip member {name} uses compression method {info.compress_type}; only "
                              "stored and deflated members are supported (re-save the checkpoint with torch.save)")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise CheckpointError(f"{path}: stored zip member {name} claims {info.file_size} bytes but holds "
                              f"{info.compress_size}; the file is corrupt (copy or download it again)")
    return zip_member_source(path, info, _member_data_offset(raw, info, path, size), stamp)


def _member_data_offset(raw, info: zipfile.ZipInfo, path: str, size: int) -> int:
    """File offset of a member's (compressed) bytes, after its local header."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + info.compress_size > size:
        raise CheckpointError(f"{path}: file is truncated inside zip member {info.filename}")
    return offset


# ---------------------------------------------------------------------------------------------- public API


def load_torch_file(path, *, lazy: bool = False) -> Any:
    """Reads a `torch.save` file (zip or legacy format) without torch.

    Args:
      path: file path.
      lazy: if True, tensors stay `LazyArray`s (read on ``np.asarray``/``.numpy()``; the file must stay unchanged).

    Returns:
      The saved object with every tensor / parameter as a numpy array (float32, float16, bfloat16 and float8 via
      ml_dtypes, int64, bool, ...; views honour strides and storage offsets and do not share memory),
      ``OrderedDict`` -> ``dict``, ``torch.Size`` -> ``tuple``, ``argparse.Namespace`` -> `Namespace`.

    Raises:
      UnsafeCheckpointError: a pickle references a global outside the allow-list.
      CheckpointError: the file is not a torch.save file, or is corrupt/truncated.
    """
    path, size, stamp = _check_path(path)
    kind = _sniff(path, size)
    with _errors_as_checkpoint_error(path, _TORCH_EXPECTED):
        if kind == "torch-zip":
            obj = _load_zip_file(path, size, stamp)
        elif kind == "torch-legacy":
            obj = _load_legacy_file(path, size, stamp)
        else:
            raise _unknown_format(path, kind, _TORCH_EXPECTED)
        return materialize(obj, arrays=not lazy, name=path)


def load_nvidia_pickle(path, *, lazy: bool = True) -> dict:
    """Reads an NVIDIA stylegan2-ada-pytorch / stylegan3 network pickle without torch or NVIDIA's code.

    Args:
      path: the ``.pkl`` file (``network-snapshot-*.pkl`` or a released model).
      lazy: if True (default) tensors stay `LazyArray`s, read when `PersistentObject.named_tensors` (or
        `materialize`) asks for them, so loading a 1024 px snapshot only costs memory for ``G_ema``.

    Returns:
      ``{'G': PersistentObject, 'D': ..., 'G_ema': ..., 'augment_pipe': ..., 'training_set_kwargs': ...}``
      (whatever keys the file has). ``dnnlib.util.EasyDict`` -> `EasyDict` (a dict subclass).

    Raises:
      UnsafeCheckpointError: a pickle references a global outside the allow-list.
      CheckpointError: not such a pickle (e.g. a TensorFlow StyleGAN pickle), or corrupt/truncated.
    """
    path, size, stamp = _check_path(path)
    kind = _sniff(path, size)
    if kind != "pickle":
        raise _unknown_format(path, kind, _NVIDIA_EXPECTED)
    with _errors_as_checkpoint_error(path, _NVIDIA_EXPECTED):
        obj = _load_nvidia(path, size, stamp)
        if not isinstance(obj, dict) or not any(isinstance(v, PersistentObject) for v in obj.values()):
            raise CheckpointError(
                f"{path}: pickle holds no persistent networks (G / G_ema / D); expected {_NVIDIA_EXPECTED}"
            )
        return materialize(obj, arrays=not lazy, name=path)


def _load_nvidia(path: str, size: int, stamp) -> Any:
    tensor_globals = torch_globals(path)

    def reconstruct_persistent_obj(meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError(f"{path}: persistent object meta is not a 'class' record")
        class_name, module_src = meta.get("class_name"), meta.get("module_src")
        state = meta.get("state")
        if not isinstance(class_name, str) or not isinstance(module_src, str):
            raise CheckpointError(f"{path}: persistent object without class_name / module_src")
        if state is not None and not isinstance(state, dict):
            raise CheckpointError(f"{path}: persistent object {class_name} has a non-dict state")
        return PersistentObject(class_name, module_src, state or {}, meta.get("version"), path)

    with open(path, "rb") as f, open(path, "rb") as aux:
        blob_name = f"{path} (storage blob)"

        def load_from_bytes(data):
            if isinstance(data, LazyBytes):
                reader = BoundedReader(aux, data.offset, data.length, blob_name)
                make_source = lambda off, n: file_source(path, off, n, stamp)  # noqa: E731
            elif isinstance(data, (bytes, bytearray)):
                reader = make_reader_for_bytes(data, blob_name)
                make_source = lambda off, n: memory_source(data, off, n, blob_name)  # noqa: E731
            else:
                raise CheckpointError(f"{path}: _load_from_bytes argument is a {type(data).__name__}")
            storage = _load_legacy(reader, blob_name, make_source, tensor_globals, newobj_classes=())
            if not isinstance(storage, Storage):
                raise CheckpointError(f"{path}: storage blob holds a {type(storage).__name__}, not a storage")
            return storage

        allowed = dict(tensor_globals)
        allowed["torch_utils.persistence._reconstruct_persistent_obj"] = reconstruct_persistent_obj
        allowed["torch.storage._load_from_bytes"] = load_from_bytes
        allowed["dnnlib.util.EasyDict"] = EasyDict
        reader = BoundedReader(f, 0, size, path)
        return SafeUnpickler(
            reader, allowed, path, lazy_bytes=(path, stamp), newobj_classes=(EasyDict, Namespace)
        ).load()


def load_any(path, *, lazy: bool | None = None) -> tuple[str, Any]:
    """Sniffs the format and loads the file.

    Args:
      path: file path.
      lazy: passed on; default False for torch files and True for NVIDIA pickles (as the loaders).

    Returns:
      ``(kind, obj)`` with kind ``'torch-zip'``, ``'torch-legacy'`` or ``'nvidia-pickle'``.

    Raises:
      CheckpointError: empty file, directory, truncated zip, random bytes, TensorFlow pickle, tar-based
        torch <= 0.3 file, or any other unsupported format; `UnsafeCheckpointError` for disallowed globals.
    """
    expected = f"{_TORCH_EXPECTED} or {_NVIDIA_EXPECTED}"
    path, size, _ = _check_path(path)
    kind = _sniff(path, size)
    if kind in ("torch-zip", "torch-legacy"):
        return kind, load_torch_file(path, lazy=bool(lazy))
    if kind == "pickle":
        return "nvidia-pickle", load_nvidia_pickle(path, lazy=True if lazy is None else lazy)
    raise _unknown_format(path, kind, expected)

