"""UFGS pair datasets on disk: ``array_record`` shards plus ``index.json``, and random-access readers.

A dataset directory (written by :func:`gansem.ufgs.dataset.write_dataset`,
``python launch/make_dataset.py``)::

    index.json                              what the dataset is (below); the reader starts here
    pairs-00000-of-00050.array_record       shard 0: samples [0, shard_size), one record per pair
    pairs-00001-of-00050.array_record       shard 1: samples [shard_size, 2 shard_size) ...
    preview.png                             the first samples: image | mask over the image
    manifest.json                           what is where

Shards are ``array_record`` files written with ``group_size:1`` (every record can be
read on its own, as grain's random access needs) and no compression of their own
(images and masks are already PNG-compressed).

**Record encoding** (``record_version`` 1). One record is one (image, mask) pair;
nothing is pickled. Little-endian::

    b"GSPR"                  4 bytes magic
    L                        uint32, length of the header
    header                   L bytes of UTF-8 JSON:
                               {"index": global sample index,
                                "image": [H, W],            image: PNG, 8-bit RGB, [H, W, 3] uint8
                                "label_bits": 8 | 16,       mask: PNG, 8-bit grey (K <= 256) or 16-bit grey
                                "sizes": [n_image, n_label, n_latent],   byte counts of the three parts
                                "latent_shape": [...] | null,            the latent, float32, C order
                                "class_label": int | null}               conditional generators only
    image PNG | label PNG | latent bytes        the parts, in that order, nothing after them

Everything is lossless: the decoded image and mask are the arrays that were encoded,
bit for bit, and the latent is the float32 generator input that regenerates the pair.

**index.json** (``format`` ``"gansem-ufgs-pairs"``, ``version`` 1):

=====================  ==============================================================
``complete``           ``false`` while writing (or after an interruption), ``true`` at the end
``num_samples``        N; ``shard_size``: samples per shard (the last may hold fewer)
``shards``             list of ``{"file", "first", "count", "bytes", "sha256"}``: the
                       shard's file name, its first global sample index, its number of
                       records, its size and the SHA-256 of its content (``null`` until
                       the shard is finished)
``k``, ``num_classes`` K, the number of clusters (labels are in ``[0, K)``)
``threshold``          φ* if K was chosen by the IoU threshold, else ``null``
``palette``            ``[K, 3]`` uint8 colours of the clusters (:func:`gansem.viz.palette`)
``resolution``         image (and mask) size; ``label_bits``: 8 or 16
``latent_shape``       shape of one latent; ``class_conditional``: whether records carry a class label
``seed``, ``batch_size``, ``sampling``   how the latents were drawn and batched (``sampling``
                       says it in words; see :mod:`gansem.ufgs.dataset`)
``generator``          ``{"name", "checkpoint", "family", "config"}``
``run_dir``, ``run_config``, ``classifier_sha256``   the KLiSH run and the classifier ``(W_K, b_K)``
``command``            the command line that wrote the dataset (when written by the launch script)
``software``           gansem / JAX versions and the platform of the writer
=====================  ==============================================================

**Versioning.** ``version`` is the version of this layout and of the record encoding.
Readers accept the versions they know (1) and refuse a newer one with a message to
upgrade gansem; fields may be added to ``index.json`` without a version change, never
removed or redefined.

Reading::

    ds = open_dataset("data/ufgs-dcgan")          # checks index and shards (sizes, record counts)
    item = ds[0]       # {"image": uint8 [H, W, 3], "label": int32 [H, W], "latent": float32 [...], "index": 0}
    pipeline = grain.MapDataset.source(ds).shuffle(seed=0).batch(32)

:class:`ArrayPairs` is the same kind of source over arrays in memory (labelled real
images, small experiments), with the same item keys. :func:`load_pairs` opens either a
dataset directory or the ``.npz`` that ``launch/segment.py`` writes (what the training
scripts take as ``--data``).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import struct
from typing import Optional, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from grain.sources import ArrayRecordDataSource
from PIL import Image

from .. import viz

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "WRITER_OPTIONS",
    "DatasetError",
    "shard_file_name",
    "label_bits",
    "encode_pair",
    "decode_pair",
    "file_sha256",
    "read_index",
    "PairDataset",
    "ArrayPairs",
    "open_dataset",
    "load_pairs",
]

FORMAT_NAME = "gansem-ufgs-pairs"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
#: ``array_record`` writer options: one record per group (random access), no compression (PNGs already are).
WRITER_OPTIONS = "group_size:1,uncompressed"

_MAGIC = b"GSPR"
_HEADER_LEN = struct.Struct("<I")
_PNG_LEVEL = 1  # zlib level: the fastest; the encoding is lossless at every level
_RESUME_HINT = "rerun launch/make_dataset.py with the same settings and --resume"


class DatasetError(ValueError):
    """A dataset directory, its index, a shard or a record cannot be used (the message says what to do)."""


def shard_file_name(shard: int, num_shards: int) -> str:
    """``pairs-00003-of-00050.array_record``: the file of shard ``shard`` of ``num_shards``."""
    return f"pairs-{shard:05d}-of-{num_shards:05d}.array_record"


def label_bits(num_classes: int) -> int:
    """Bits per mask pixel: 8 when ``num_classes <= 256``, else 16 (up to 65536 classes)."""
    if not 1 <= num_classes <= 1 << 16:
        raise DatasetError(f"num_classes must be in [1, 65536] to be stored as PNG masks, got {num_classes}")
    return 8 if num_classes <= 256 else 16


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=_PNG_LEVEL)
    return buf.getvalue()


def encode_pair(image: np.ndarray, label: np.ndarray, *, num_classes: int, index: int,
                latent: Optional[np.ndarray] = None, class_label: Optional[int] = None) -> bytes:
    """One record: a JSON header, the image and mask as PNG, the latent as float32 bytes.

    Args:
        image: ``[H, W, 3]`` uint8.
        label: ``[H, W]`` integer cluster ids in ``[0, num_classes)``.
        num_classes: K; masks are 8-bit PNG for K <= 256, 16-bit otherwise.
        index: the sample's global index in the dataset.
        latent: the generator input ``[...]`` (stored as float32), or ``None``.
        class_label: the class of a class-conditional generator's sample, or ``None``.

    Returns:
        The record bytes (layout in the module docstring).
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DatasetError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if label.shape != image.shape[:2] or label.dtype.kind not in "iu":
        raise DatasetError(f"label must be integer [H, W] = {list(image.shape[:2])}, got {label.dtype} "
                           f"{list(label.shape)}")
    bits = label_bits(num_classes)
    if label.size and (int(label.min()) < 0 or int(label.max()) >= num_classes):
        raise DatasetError(f"labels must be in [0, {num_classes}), got [{int(label.min())}, {int(label.max())}]")
    parts = [_png(np.ascontiguousarray(image)), _png(label.astype(np.uint8 if bits == 8 else np.uint16))]
    lat = None if latent is None else np.ascontiguousarray(np.asarray(latent, np.float32))
    parts.append(b"" if lat is None else lat.astype("<f4").tobytes())
    header = {"index": int(index), "image": [int(image.shape[0]), int(image.shape[1])], "label_bits": bits,
              "sizes": [len(p) for p in parts], "latent_shape": None if lat is None else list(lat.shape),
              "class_label": None if class_label is None else int(class_label)}
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return b"".join([_MAGIC, _HEADER_LEN.pack(len(head)), head, *parts])


def _bad(why: str) -> DatasetError:
    return DatasetError(f"undecodable record ({why})")


def _decode_png(data: bytes, what: str, modes: Sequence[str], shape: tuple) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.load()
            if im.mode not in modes:
                raise _bad(f"{what} PNG has mode {im.mode}, expected {' or '.join(modes)}")
            arr = np.asarray(im)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on damaged data
        raise _bad(f"{what} is not a readable PNG: {e}") from e
    if arr.shape != shape:
        raise _bad(f"{what} has shape {list(arr.shape)}, the header says {list(shape)}")
    return arr


def decode_pair(data: bytes) -> dict:
    """Inverse of :func:`encode_pair`.

    Returns:
        ``{"image": uint8 [H, W, 3], "label": int32 [H, W], "index": int}``, plus
        ``"latent"`` float32 when the record holds one and ``"class_label"`` int when it
        holds one.

    Raises:
        DatasetError: the bytes are not a record of this format (wrong magic, damaged
            header, part sizes that do not add up, a PNG that does not decode).
    """
    data = bytes(data)
    if len(data) < 8 or data[:4] != _MAGIC:
        raise _bad("no GSPR magic: not a gansem UFGS pair record")
    (n,) = _HEADER_LEN.unpack_from(data, 4)
    if 8 + n > len(data):
        raise _bad(f"header of {n} bytes in a record of {len(data)}")
    try:
        h = json.loads(data[8:8 + n].decode())
        index, (height, width), bits, sizes = int(h["index"]), h["image"], int(h["label_bits"]), h["sizes"]
        lat_shape, cls = h["latent_shape"], h["class_label"]
        sizes = [int(s) for s in sizes]
        height, width = int(height), int(width)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise _bad(f"damaged header: {e}") from e
    if bits not in (8, 16) or len(sizes) != 3 or min(sizes) < 0 or 8 + n + sum(sizes) != len(data):
        raise _bad(f"header part sizes {sizes} do not match the record's {len(data) - 8 - n} payload bytes")
    a, b = 8 + n, 8 + n + sizes[0]
    c = b + sizes[1]
    out = {
        "image": _decode_png(data[a:b], "image", ("RGB",), (height, width, 3)),
        "label": _decode_png(data[b:c], "label", ("L",) if bits == 8 else ("I;16", "I"),
                             (height, width)).astype(np.int32),
        "index": index,
    }
    if lat_shape is not None:
        shape = tuple(int(d) for d in lat_shape)
        if sizes[2] != 4 * int(np.prod(shape, dtype=np.int64)):
            raise _bad(f"latent of {sizes[2]} bytes for shape {list(shape)}")
        out["latent"] = np.frombuffer(data[c:], "<f4").reshape(shape).astype(np.float32)
    elif sizes[2]:
        raise _bad(f"{sizes[2]} latent bytes without a latent shape")
    if cls is not None:
        out["class_label"] = int(cls)
    return out


def _item_index(i, n: int) -> int:
    """``i`` (any integer, negative from the end) as an index into ``n`` pairs; ``IndexError`` outside."""
    i = int(i.__index__())
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise IndexError(f"index {i} out of range for {n} pairs")
    return j


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


_REQUIRED = ("complete", "num_samples", "shard_size", "shards", "num_classes", "palette", "resolution",
             "latent_shape", "class_conditional")


def _dataset_dir(path: str) -> str:
    """The dataset directory of ``path`` (the directory itself or its ``index.json``)."""
    path = os.fspath(path)
    if os.path.basename(path) == INDEX_FILE and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise DatasetError(f"dataset {path!r} does not exist; write one with launch/make_dataset.py --out {path}")
    if not os.path.isdir(path):
        raise DatasetError(f"{path!r} is not a directory; give the dataset directory written by "
                           "launch/make_dataset.py")
    return path


def read_index(path: str, *, require_complete: bool = True) -> dict:
    """``index.json`` of the dataset directory ``path``, checked.

    Args:
        path: the dataset directory (or its ``index.json``).
        require_complete: refuse a dataset whose writing was interrupted.

    Raises:
        DatasetError: no index, not a gansem UFGS index, an unknown (newer) version,
            missing fields, inconsistent shard list, or ``complete: false``.
    """
    root = _dataset_dir(path)
    ipath = os.path.join(root, INDEX_FILE)
    if not os.path.isfile(ipath):
        raise DatasetError(f"{root!r} is not a UFGS dataset directory (no {INDEX_FILE}); write one with "
                           "launch/make_dataset.py")
    try:
        with open(ipath, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{ipath} cannot be read as JSON ({e}): the index is damaged; write the dataset again "
                           "into a new directory") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DatasetError(f"{ipath} is not the index of a gansem UFGS dataset (format {got!r}, expected "
                           f"{FORMAT_NAME!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise DatasetError(f"{ipath} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise DatasetError(f"{ipath} was written in format version {version}; this gansem reads version "
                           f"{FORMAT_VERSION}: upgrade gansem")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise DatasetError(f"{ipath} lacks the fields {missing}: damaged or not written by gansem")
    _check_plan(meta, ipath)
    if require_complete and meta["complete"] is not True:
        done = sum(1 for s in meta["shards"] if s.get("sha256"))
        cmd = meta.get("command")
        raise DatasetError(f"{root!r} is incomplete ({done} of {len(meta['shards'])} shards finished): writing was "
                           f"interrupted: {_RESUME_HINT}" + (f" ({cmd} --resume)" if cmd else ""))
    return meta


def _check_plan(meta: dict, where: str) -> None:
    """The shard list covers ``[0, num_samples)`` in order, in files named by :func:`shard_file_name`."""
    try:
        n, size, shards = int(meta["num_samples"]), int(meta["shard_size"]), list(meta["shards"])
        expect, first = [], 0
        for s in range(len(shards)):
            count = min(size, n - first)
            expect.append((shard_file_name(s, len(shards)), first, count))
            first += count
        got = [(str(e["file"]), int(e["first"]), int(e["count"])) for e in shards]
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: the shard list is damaged ({e!r})") from e
    if got != expect or first != n or n < 1 or size < 1:
        raise DatasetError(f"{where}: the shard list does not cover samples [0, {n}) in shards of {size}: "
                           "the index is damaged")


class PairDataset:
    """A UFGS dataset directory as a random-access source of (image, mask) pairs.

    ``ds[i]`` is ``{"image": uint8 [H, W, 3], "label": int32 [H, W], "latent": float32
    [*latent_shape], "index": i}`` (plus ``"class_label"`` int for class-conditional
    generators). Works with ``grain.MapDataset.source(ds)`` and grain's data loaders
    (the object pickles; readers are reopened in each worker). Built by :func:`open_dataset`.

    Attributes:
        path: the dataset directory.
        meta: ``index.json`` as a dict.
        num_classes: K; labels are in ``[0, K)``.
        resolution: image (and mask) size.
        palette: ``[K, 3]`` uint8 cluster colours.
        class_names: ``None`` (clusters have no names; matching them to classes is the evaluation's job).
    """

    def __init__(self, path: str, meta: dict, files: Sequence[str]):
        self.path = path
        self.meta = meta
        self.num_classes = int(meta["num_classes"])
        self.resolution = int(meta["resolution"])
        self.palette = np.asarray(meta["palette"], np.uint8).reshape(self.num_classes, 3)
        self.class_names = None
        self._files = list(files)
        self._firsts = [int(s["first"]) for s in meta["shards"]]
        self._source = ArrayRecordDataSource(self._files)
        if len(self._source) != int(meta["num_samples"]):  # counted per shard in open_dataset already
            raise DatasetError(f"{path!r}: the shards hold {len(self._source)} records, index.json says "
                               f"{meta['num_samples']}; {_RESUME_HINT}")

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def __repr__(self) -> str:
        return (f"PairDataset({self.path!r}, {len(self)} pairs, K={self.num_classes}, "
                f"{self.resolution}x{self.resolution}, {len(self._files)} shards)")

    def _where(self, i: int) -> str:
        s = bisect.bisect_right(self._firsts, i) - 1
        return f"record {i} (shard {self.meta['shards'][s]['file']}, position {i - self._firsts[s]}) of {self.path!r}"

    def __getitem__(self, i) -> dict:
        i = _item_index(i, len(self))
        try:
            raw = self._source[i]
        except RuntimeError as e:  # riegeli: chunk hash mismatch, truncated chunk...
            raise DatasetError(f"{self._where(i)} cannot be read ({str(e).splitlines()[0]}): the shard is damaged; "
                               f"{_RESUME_HINT} (it regenerates damaged shards)") from e
        try:
            item = decode_pair(raw)
        except DatasetError as e:
            raise DatasetError(f"{self._where(i)}: {e}; the shard is damaged; {_RESUME_HINT}") from e
        if item["index"] != i or item["image"].shape[:2] != (self.resolution, self.resolution):
            raise DatasetError(f"{self._where(i)} holds sample {item['index']} of shape "
                               f"{list(item['image'].shape)}, not sample {i} at {self.resolution}x"
                               f"{self.resolution}: the shards do not belong to this index")
        return item

    def close(self) -> None:
        """Close the open shard readers (they reopen on the next read)."""
        self._source.__exit__(None, None, None)


def _check_shards(root: str, meta: dict, verify: bool) -> list[str]:
    """Paths of the shards, after checking that each exists, has its size, record count (and checksum)."""
    files = []
    for e in meta["shards"]:
        p = os.path.join(root, e["file"])
        if not os.path.isfile(p):
            raise DatasetError(f"shard {e['file']} of {root!r} is missing; {_RESUME_HINT} to regenerate it")
        size = os.path.getsize(p)
        if e.get("bytes") is not None and size != int(e["bytes"]):
            raise DatasetError(f"shard {p} has {size} bytes, index.json says {e['bytes']}: the file is truncated "
                               f"or was replaced; {_RESUME_HINT} to regenerate it")
        if verify and e.get("sha256") and file_sha256(p) != e["sha256"]:
            raise DatasetError(f"shard {p} does not match its SHA-256 in index.json: the file is damaged; "
                               f"{_RESUME_HINT} to regenerate it")
        try:
            reader = ArrayRecordReader(p)
            count = int(reader.num_records()) if reader.ok() else 0
            reader.close()
        except RuntimeError as e2:
            raise DatasetError(f"shard {p} is not a readable array_record file ({str(e2) or 'truncated or damaged'}); "
                               f"{_RESUME_HINT} to regenerate it") from e2
        if count != int(e["count"]):
            raise DatasetError(f"shard {p} holds {count} records, index.json says {e['count']}: the file is "
                               f"truncated or damaged; {_RESUME_HINT} to regenerate it")
        files.append(p)
    return files


def open_dataset(path: str, *, verify: bool = False) -> PairDataset:
    """Open a UFGS dataset directory for random access.

    Args:
        path: the directory written by :func:`gansem.ufgs.dataset.write_dataset` (or its ``index.json``).
        verify: also compare every shard's SHA-256 with the index (reads every byte once).
            Without it the sizes and record counts are checked; a damaged record is still
            reported when it is read (array_record checks a hash of every chunk).

    Returns:
        A :class:`PairDataset`.

    Raises:
        DatasetError: see :func:`read_index`; a shard is missing, has another size,
            checksum or record count than the index says.
    """
    root = _dataset_dir(path)
    meta = read_index(root)
    return PairDataset(root, meta, _check_shards(root, meta, verify))


class ArrayPairs:
    """(image, mask) pairs held in memory, as a random-access source with :class:`PairDataset`'s items.

    ``ds[i]`` is ``{"image": uint8 [H, W, 3], "label": int32 [H, W], "index": int}``
    (``index`` = ``indices[i]`` or ``i``), plus ``"latent"`` / ``"class_label"`` when
    given. Works with ``grain.MapDataset.source(ds)``.

    Args:
        images: ``[N, H, W, 3]`` uint8.
        labels: ``[N, H, W]`` integer class ids in ``[0, num_classes)``.
        num_classes: number of classes K.
        palette: ``[K, 3]`` uint8 colours; default :func:`gansem.viz.palette` ``(K)``.
        class_names: K names, or ``None``.
        latents: ``[N, ...]`` generator inputs, or ``None``.
        indices: ``[N]`` global sample indices, or ``None`` (``0 .. N-1``).
        class_labels: ``[N]`` classes of a class-conditional generator, or ``None``.
        ignore_label: a label value outside ``[0, num_classes)`` allowed for unlabelled pixels
            (e.g. 255: what :func:`gansem.ufgs.train.fit_segmenter` ignores by default), or ``None``.

    Attributes:
        meta: a small description (``format: "in-memory"``, sizes).
        num_classes, palette, class_names: as given.
        resolution: ``H`` for square images, else ``(H, W)``.
    """

    def __init__(self, images, labels, num_classes: int, palette=None, class_names=None, *, latents=None,
                 indices=None, class_labels=None, ignore_label: Optional[int] = None):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DatasetError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        if labels.shape != images.shape[:3] or labels.dtype.kind not in "iu":
            raise DatasetError(f"labels must be integer [N, H, W] = {list(images.shape[:3])}, got {labels.dtype} "
                               f"{list(labels.shape)}")
        num_classes = int(num_classes)
        if num_classes < 1:
            raise DatasetError(f"num_classes must be >= 1, got {num_classes}")
        labelled = labels if ignore_label is None else labels[labels != ignore_label]
        if labelled.size and (int(labelled.min()) < 0 or int(labelled.max()) >= num_classes):
            also = "" if ignore_label is None else f" (or {ignore_label}: unlabelled)"
            raise DatasetError(f"labels must be in [0, {num_classes}){also}, got [{int(labelled.min())}, "
                               f"{int(labelled.max())}]")
        n = images.shape[0]
        extra = {"latents": latents, "indices": indices, "class_labels": class_labels}
        extra = {k: None if v is None else np.asarray(v) for k, v in extra.items()}
        for k, v in extra.items():
            if v is not None and (v.ndim < 1 or v.shape[0] != n):
                raise DatasetError(f"{k} must have one row per image ({n}), got shape {list(v.shape)}")
        if palette is None:
            palette = viz.palette(num_classes)
        palette = np.asarray(palette)
        if palette.shape != (num_classes, 3):
            raise DatasetError(f"palette must be [{num_classes}, 3], got {list(palette.shape)}")
        if class_names is not None:
            class_names = [str(c) for c in class_names]
            if len(class_names) != num_classes:
                raise DatasetError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.images, self.labels = images, labels
        self.latents = None if extra["latents"] is None else extra["latents"].astype(np.float32)
        self.indices, self.class_labels = extra["indices"], extra["class_labels"]
        self.num_classes = num_classes
        self.palette = palette.astype(np.uint8)
        self.class_names = class_names
        h, w = images.shape[1:3]
        self.resolution = int(h) if h == w else (int(h), int(w))
        self.meta = {"format": "in-memory", "num_samples": int(n), "num_classes": num_classes,
                     "resolution": self.resolution}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"ArrayPairs({len(self)} pairs, K={self.num_classes}, images {list(self.images.shape[1:])})"

    def __getitem__(self, i) -> dict:
        i = _item_index(i, len(self))
        item = {"image": self.images[i], "label": self.labels[i].astype(np.int32),
                "index": i if self.indices is None else int(self.indices[i])}
        if self.latents is not None:
            item["latent"] = self.latents[i]
        if self.class_labels is not None:
            item["class_label"] = int(self.class_labels[i])
        return item


def load_pairs(path: str):
    """The pairs in ``path``: a dataset directory (:func:`open_dataset`) or a ``launch/segment.py`` ``.npz``.

    The ``.npz`` holds ``images`` uint8 ``[N, H, W, 3]``, ``labels`` int ``[N, H, W]`` and ``k``
    (other arrays, e.g. ``latents``, are ignored); it is read into an :class:`ArrayPairs`.

    Raises:
        DatasetError: ``path`` does not exist, is a damaged dataset, or an ``.npz`` without those
            arrays or with other shapes.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return open_dataset(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path!r} does not exist (give a UFGS dataset folder or an .npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "labels", "k") if k in z.files}
    except (OSError, EOFError, ValueError) as e:
        raise DatasetError(f"{path!r} cannot be read as an .npz ({e})") from e
    missing = [k for k in ("images", "labels", "k") if k not in arrays]
    if missing:
        raise DatasetError(f"{path!r} has no {', '.join(missing)}: expected the .npz of launch/segment.py "
                           "(images, labels, k)")
    images, labels, k = arrays["images"], arrays["labels"], int(arrays["k"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{path!r}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:3]:
        raise DatasetError(f"{path!r}: labels must be [N, H, W] = {images.shape[:3]}, got {labels.shape}")
    return ArrayPairs(images, labels.astype(np.int32), k)
