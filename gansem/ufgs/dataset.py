"""Write a UFGS dataset: (image, KLiSH mask) pairs sampled from a generator, streamed into array_record shards.

:func:`write_dataset` samples ``num_samples`` latents, runs the generator and the
KLiSH classifier at K on them (:class:`gansem.segment.Segmenter`: the label of a pixel
is ``argmax_k (W_K · f(pixel) + b_K)``, KLiSH Sec. 5.1) batch by batch, and writes
every pair as one record (:mod:`gansem.ufgs.records`) straight into its shard.

**Which samples.** Shard ``s`` holds the samples ``[s · shard_size, s · shard_size + count_s)``.
Its inputs are drawn for the whole shard, whatever ``num_samples`` is::

    key_s = fold_in(fold_in(key(seed), UFGS_STREAM), s)
    latents_s = generator.sample_latents(fold_in(key_s, 0), shard_size)[:count_s]
    classes_s = generator.sample_class_labels(fold_in(key_s, 1), shard_size)[:count_s]   # conditional only

so a sample's latent depends on ``(seed, shard_size, its index)`` only: a dataset is a
prefix of any larger one with the same seed and shard size, and a shard regenerated
on resume is the shard an uninterrupted write produces. ``UFGS_STREAM`` keeps these
draws apart from the run's own samples (``fold_in(key(seed), 0 | 1 | 2)``, the
clustering latents, class labels and K-means) and from the evaluation streams
(:mod:`gansem.evaluation.streams`), whatever seed is chosen.

**Devices.** Each batch is split over the segmenter's mesh with
:func:`gansem.batching.map_batches` (one device when the segmenter has no mesh). The
unit of work is a micro-batch of ``ceil(batch_size / 8)`` samples on any device count,
so the records are byte-identical on 1, 2, 4 or 8 devices; the batch size is part of
the dataset's settings. On a GPU prefer a large ``batch_size`` (256: micro-batches of 32).

**Memory.** One batch of images and masks (and their encodings, while the next batch
runs on the devices) plus one shard's latents and the open shard writer, for any N.

**Interruptions.** ``index.json`` is written first, with the plan and ``complete: false``.
A shard is written under a temporary name, closed, synced and renamed; then its
size and SHA-256 go into the index (replaced atomically). ``complete: true`` comes
last. A write killed at any moment leaves finished shards (listed with their checksum),
at most one temporary file and perhaps one renamed shard the index does not list yet;
``resume=True`` checks the settings against the index, verifies the finished shards'
checksums and writes every other shard again (deterministically: the same bytes on
the same platform and software).

Example::

    from gansem.segment import Segmenter
    from gansem.sharding import make_mesh
    from gansem.ufgs.dataset import write_dataset
    seg = Segmenter.from_run("runs/dcgan", k=12, mesh=make_mesh())     # all devices
    write_dataset(seg, "data/ufgs-dcgan-k12", num_samples=50_000, seed=1, batch_size=256)
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm.auto import tqdm

from .. import sharding, viz
from ..batching import map_batches
from ..features import to_uint8
from ..segment import Segmenter, segment_program
from .records import (FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, WRITER_OPTIONS, DatasetError, encode_pair,
                      file_sha256, label_bits, open_dataset, read_index, shard_file_name)

__all__ = [
    "UFGS_STREAM",
    "PREVIEW_FILE",
    "MANIFEST_FILE",
    "RESUME_KEYS",
    "shard_key",
    "shard_inputs",
    "plan_shards",
    "classifier_sha256",
    "write_dataset",
    "ShardSink",
]

#: Stream offset of UFGS samples (module docstring).
UFGS_STREAM = 2_000_003
PREVIEW_FILE = "preview.png"
MANIFEST_FILE = "manifest.json"
#: Settings that define a dataset's bytes: ``resume`` refuses to continue when one of them differs.
RESUME_KEYS = ("num_samples", "shard_size", "seed", "batch_size", "k", "classifier_sha256", "generator.config",
               "resolution", "latent_shape", "class_conditional", "label_bits", "version")
_RUN_INFO_KEYS = ("run_dir", "threshold", "command")
_NUM_PREVIEW = 8
_TMP_SUFFIX = ".tmp"


def shard_key(seed: int, shard: int):
    """``fold_in(fold_in(key(seed), UFGS_STREAM), shard)``: the key of one shard's samples."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seed)), UFGS_STREAM), int(shard))


def shard_inputs(generator, seed: int, shard: int, shard_size: int):
    """The generator inputs of every slot of shard ``shard`` (module docstring).

    Returns:
        ``(latents [shard_size, *latent_shape] float32, class_labels [shard_size] int32 or None)``;
        a shard of ``count`` samples uses the first ``count`` rows.
    """
    key = shard_key(seed, shard)
    latents = np.asarray(generator.sample_latents(jax.random.fold_in(key, 0), shard_size), np.float32)
    cl = generator.sample_class_labels(jax.random.fold_in(key, 1), shard_size)
    return latents, None if cl is None else np.asarray(cl, np.int32)


def plan_shards(num_samples: int, shard_size: int) -> list[dict]:
    """Index entries of the shards of ``num_samples`` pairs: ``{"file", "first", "count", "bytes", "sha256"}``."""
    n = -(-num_samples // shard_size)
    return [{"file": shard_file_name(s, n), "first": s * shard_size,
             "count": min(shard_size, num_samples - s * shard_size), "bytes": None, "sha256": None}
            for s in range(n)]


def classifier_sha256(W, b) -> str:
    """SHA-256 of the classifier ``W [K, D]``, ``b [K]`` as float32 (tells whether a run changed)."""
    h = hashlib.sha256()
    for a in (np.asarray(W, np.float32), np.asarray(b, np.float32)):
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).astype("<f4").tobytes())
    return h.hexdigest()


class _PlannedRows:
    """The inputs of the shards still to write as rows ``[0, n)``, sampled shard by shard when sliced.

    :func:`gansem.batching.map_batches` reads ``shape`` and slices ``[start:stop]`` in
    increasing order; only the shards a slice touches are sampled and the last one is
    kept, so memory is one shard's inputs whatever N is.
    """

    def __init__(self, shards: list[dict], sample: Callable[[int], np.ndarray], row_shape: tuple, shard_size: int):
        self._shards = shards
        self._sample = sample
        self._size = shard_size
        self._starts = np.cumsum([0] + [e["count"] for e in shards])
        self.shape = (int(self._starts[-1]),) + tuple(row_shape)
        self._cached = (None, None)

    def _shard(self, j: int) -> np.ndarray:
        if self._cached[0] != j:
            self._cached = (j, self._sample(self._shards[j]["first"] // self._size))
        return self._cached[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        while start < stop:
            j = int(np.searchsorted(self._starts, start, side="right")) - 1
            hi = min(stop, int(self._starts[j + 1]))
            off = start - int(self._starts[j])
            parts.append(self._shard(j)[off:off + hi - start])
            start = hi
        return np.concatenate(parts)  # map_batches never asks for an empty slice

    def global_indices(self, start: int, stop: int) -> np.ndarray:
        """Dataset indices of the rows ``[start, stop)``."""
        rows = np.arange(start, stop)
        j = np.searchsorted(self._starts, rows, side="right") - 1
        firsts = np.asarray([e["first"] for e in self._shards])
        return firsts[j] + rows - self._starts[j]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _fsync(path: str) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_json(out_dir: str, name: str, obj: dict) -> None:
    """Write ``out_dir/name`` atomically: a synced temporary file renamed over it."""
    path = os.path.join(out_dir, name)
    tmp = path + _TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(out_dir)


def _generator_name(path: str) -> str:
    """The model name a gansem checkpoint directory records (``generator.json``), else the file's name."""
    try:
        with open(os.path.join(path, "generator.json"), encoding="utf-8") as f:
            name = json.load(f).get("name")
        if isinstance(name, str) and name:
            return name
    except (OSError, ValueError, AttributeError):
        pass
    return os.path.basename(os.path.normpath(path))


def _new_index(seg: Segmenter, mesh, num_samples: int, seed: int, shard_size: int, batch_size: int,
               run_info: dict) -> dict:
    gen = seg.generator
    spec = str(seg.run_config.get("generator", "")) or None
    is_path = spec is not None and os.path.exists(spec)
    k = int(seg.k)
    name = _generator_name(spec) if is_path else spec
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "complete": False,
        "num_samples": int(num_samples),
        "shard_size": int(shard_size),
        "shards": plan_shards(int(num_samples), int(shard_size)),
        "k": k,
        "num_classes": k,
        "threshold": run_info.get("threshold"),
        "palette": viz.palette(k).tolist(),
        "resolution": int(gen.resolution),
        "label_bits": label_bits(k),
        "latent_shape": [int(d) for d in gen.latent_shape],
        "class_conditional": bool(gen.num_classes > 0),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "sampling": (f"shard s: generator.sample_latents(fold_in(fold_in(fold_in(key({int(seed)}), {UFGS_STREAM}), "
                     f"s), 0), {int(shard_size)})[:count_s]; class labels with fold_in(..., 1); micro-batches of "
                     f"ceil({int(batch_size)} / 8) samples per device"),
        "generator": {"name": name,
                      "checkpoint": os.path.abspath(spec) if is_path else None, "family": gen.family,
                      "config": json.loads(json.dumps(gen.to_config()))},
        "run_dir": None if run_info.get("run_dir") is None else os.path.abspath(run_info["run_dir"]),
        "run_config": json.loads(json.dumps(seg.run_config, default=str)),
        "classifier_sha256": classifier_sha256(seg.W, seg.b),
        "command": run_info.get("command"),
        "software": {"jax": jax.__version__, "platform": jax.default_backend(),
                     "python": platform.python_version(), "devices": int(mesh.devices.size)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _setting(meta: dict, key: str):
    for part in key.split("."):
        meta = meta.get(part) if isinstance(meta, dict) else None
    return meta


def _settings_diff(old: dict, new: dict) -> list[str]:
    """``"seed 1 (now) vs 0 (dataset)"`` for every :data:`RESUME_KEYS` setting that differs."""
    return [f"{k} {_setting(new, k)!r} (now) vs {_setting(old, k)!r} (dataset)" for k in RESUME_KEYS
            if _setting(old, k) != _setting(new, k)]


def _manifest(meta: dict) -> dict:
    files = {
        INDEX_FILE: "what the dataset is: settings, generator, run, K, palette, the shard list with counts and "
                    "SHA-256, and `complete` (false while writing)",
        "pairs-SSSSS-of-NNNNN.array_record": "the shards: one record per (image, mask) pair, in sample order "
                                             "(encoding: gansem.ufgs.records)",
        PREVIEW_FILE: "the first samples: image | cluster mask over the image",
        MANIFEST_FILE: "this file",
    }
    return {"format": f"{FORMAT_NAME} version {FORMAT_VERSION}", "files": files,
            "shards": [e["file"] for e in meta["shards"]],
            "read": "gansem.ufgs.records.open_dataset(DIR) -> random-access source; grain.MapDataset.source(ds)"}


def _write_preview(out_dir: str, meta: dict) -> str:
    """``preview.png``: the first samples as image | mask-over-image tiles, read back from the shards."""
    ds = open_dataset(out_dir)
    n = min(_NUM_PREVIEW, len(ds))
    items = [ds[i] for i in range(n)]
    ds.close()
    images = np.stack([it["image"] for it in items])
    labels = np.stack([it["label"] for it in items])
    over = viz.overlay(images, labels, alpha=0.5, colors=np.asarray(meta["palette"], np.uint8))
    tiles = np.stack([images, over], axis=1).reshape((2 * n,) + images.shape[1:])
    scale = max(1, 64 // images.shape[1])  # tiny generators: enlarge so the masks can be seen
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    return viz.save_png(os.path.join(out_dir, PREVIEW_FILE), viz.image_grid(tiles, ncols=8))


def _finished_shards(out_dir: str, meta: dict, quiet: bool) -> tuple[list[bool], int]:
    """Which shards of a dataset being resumed are finished and intact; the count of damaged ones (reset)."""
    done, damaged = [], 0
    for e in meta["shards"]:
        p = os.path.join(out_dir, e["file"])
        if os.path.exists(p + _TMP_SUFFIX):
            os.remove(p + _TMP_SUFFIX)  # an interrupted shard
        ok = bool(e.get("sha256")) and os.path.isfile(p) and os.path.getsize(p) == e.get("bytes") \
            and file_sha256(p) == e["sha256"]
        if e.get("sha256") and not ok:
            damaged += 1
            _log(f"shard {e['file']} is missing or damaged (size/SHA-256): writing it again", quiet)
            e["sha256"] = e["bytes"] = None
        done.append(ok)
    return done, damaged


def _check_args(num_samples, seed, shard_size, batch_size, run_info) -> None:
    for flag, v, lo in (("--num-samples", num_samples, 1), ("--shard-size", shard_size, 1),
                        ("--batch-size", batch_size, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise DatasetError(f"{flag} must be an integer >= {lo}, got {v!r}")
    if not isinstance(seed, (int, np.integer)):
        raise DatasetError(f"--seed must be an integer, got {seed!r}")
    unknown = set(run_info) - set(_RUN_INFO_KEYS)
    if unknown:
        raise DatasetError(f"run_info: unknown keys {sorted(unknown)} (known: {list(_RUN_INFO_KEYS)})")
    if -(-num_samples // shard_size) > 99_999:
        raise DatasetError(f"{num_samples} samples in shards of {shard_size} make more than 99999 shards; "
                           "raise --shard-size")


def write_dataset(segmenter: Segmenter, out_dir: str, *, num_samples: int, seed: int, shard_size: int = 1000,
                  batch_size: int = 64, resume: bool = False, progress: bool = True, quiet: bool = False,
                  run_info: Optional[dict] = None) -> dict:
    """Sample ``num_samples`` (image, KLiSH mask) pairs into the dataset directory ``out_dir``.

    Args:
        segmenter: the generator and the classifier at K (its ``mesh`` splits every batch
            over devices; ``None``: one device).
        out_dir: the dataset directory (created; must be empty or absent unless ``resume``).
        num_samples: N, the number of pairs.
        seed: seed of the samples (module docstring).
        shard_size: pairs per shard file (the last may hold fewer).
        batch_size: samples per generator call (micro-batches of ``ceil(batch_size / 8)`` per device).
        resume: continue an interrupted write into ``out_dir`` (same settings required);
            an absent or empty ``out_dir`` starts a new one.
        progress: show a progress bar (pairs).
        quiet: no log lines.
        run_info: where the classifier comes from, stored in the index: ``run_dir``,
            ``threshold`` (φ* if K was chosen by it), ``command`` (the command line).

    Returns:
        ``{"out_dir", "num_samples", "num_shards", "written", "shards_written", "shards_kept",
        "shards_damaged", "seconds", "images_per_s", "k", "files"}``: ``written`` pairs were
        generated now (the others were kept from an earlier, interrupted write).

    Raises:
        DatasetError: bad settings; ``out_dir`` not empty without ``resume``; with ``resume``,
            ``out_dir`` is not a UFGS dataset or was written with other settings.
    """
    run_info = dict(run_info or {})
    _check_args(num_samples, seed, shard_size, batch_size, run_info)
    num_samples, seed, shard_size, batch_size = int(num_samples), int(seed), int(shard_size), int(batch_size)
    if jax.process_count() > 1:
        raise DatasetError("write_dataset runs in a single process; start launch/make_dataset.py on one host "
                           "(its --devices split every batch over that host's devices)")
    t0 = time.perf_counter()
    mesh = segmenter.mesh if segmenter.mesh is not None else sharding.make_mesh(1)
    new = _new_index(segmenter, mesh, num_samples, seed, shard_size, batch_size, run_info)
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DatasetError(f"--out {out_dir!r} is a file; give a directory for the dataset")
    # a write killed before its first index.json was in place leaves at most index.json.tmp: nothing to resume
    existing = os.path.isdir(out_dir) and bool(set(os.listdir(out_dir)) - {INDEX_FILE + _TMP_SUFFIX})
    if existing and not resume:
        raise DatasetError(f"--out {out_dir!r} is not empty; use --resume to continue writing the dataset there, "
                           "or choose another --out")
    if existing:
        meta = read_index(out_dir, require_complete=False)
        diff = _settings_diff(meta, new)
        if diff:
            raise DatasetError(f"--resume: the settings differ from those of the dataset in {out_dir!r}: "
                               f"{'; '.join(diff)}. Resume with the dataset's settings, or write to another --out")
        done, damaged = _finished_shards(out_dir, meta, quiet)
        meta["complete"] = all(done)
        meta.setdefault("resumed", []).append({"at": new["created"], "software": new["software"]})
        _save_json(out_dir, INDEX_FILE, meta)
        _log(f"resuming {out_dir}: {sum(done)} of {len(done)} shards finished", quiet)
    else:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create --out {out_dir!r} ({e.strerror or e}); choose a writable "
                               "location") from e
        meta, damaged = new, 0
        done = [False] * len(meta["shards"])
        _save_json(out_dir, INDEX_FILE, meta)
    _save_json(out_dir, MANIFEST_FILE, _manifest(meta))
    todo = [e for e, d in zip(meta["shards"], done) if not d]
    written = sum(e["count"] for e in todo)
    _log(f"{num_samples} pairs, K={segmenter.k}, {segmenter.generator.resolution}px, {len(meta['shards'])} "
         f"shard(s) of {shard_size} into {out_dir}; {written} to write on {mesh.devices.size} device(s)", quiet)
    if todo:
        _write_shards(segmenter, mesh, out_dir, meta, todo, progress)
    meta["complete"] = True
    _save_json(out_dir, INDEX_FILE, meta)
    preview = _write_preview(out_dir, meta)
    seconds = time.perf_counter() - t0
    summary = {"out_dir": out_dir, "num_samples": num_samples, "num_shards": len(meta["shards"]),
               "written": written, "shards_written": len(todo), "shards_kept": len(meta["shards"]) - len(todo),
               "shards_damaged": damaged, "seconds": round(seconds, 3),
               "images_per_s": round(written / seconds, 2) if written else 0.0, "k": int(segmenter.k),
               "files": {"index": os.path.join(out_dir, INDEX_FILE), "preview": preview,
                         "manifest": os.path.join(out_dir, MANIFEST_FILE)}}
    _log(f"wrote {written} pairs ({len(todo)} shards) in {seconds:.1f}s ({summary['images_per_s']} images/s); "
         f"preview {preview}", quiet)
    return summary


class ShardSink:
    """Writes the records of the shards in ``todo``, in order, each to a temporary file renamed when finished.

    A finished shard is synced, its record count checked, its size and SHA-256 entered in its
    entry of ``meta["shards"]`` and ``index.json`` rewritten atomically. Every writer of the
    UFGS format (:mod:`gansem.ufgs.records`) streams its records through one.

    Args:
        out_dir: the dataset directory; meta: its index (saved as ``index.json``);
        todo: the ``meta["shards"]`` entries to write, in order.
        retry: what the error messages tell the user to do once the disk is fixed.
    """

    def __init__(self, out_dir: str, meta: dict, todo: list[dict], retry: str = "then rerun with --resume"):
        self.out_dir, self.meta, self.todo, self.retry = out_dir, meta, todo, retry
        self.j, self.offset, self.writer = 0, 0, None

    def _path(self) -> str:
        return os.path.join(self.out_dir, self.todo[self.j]["file"])

    def write(self, record: bytes) -> None:
        if self.writer is None:
            try:
                self.writer = ArrayRecordWriter(self._path() + _TMP_SUFFIX, WRITER_OPTIONS)
            except (RuntimeError, OSError) as e:
                raise DatasetError(f"cannot create {self._path() + _TMP_SUFFIX} ({e}); check the permissions and "
                                   f"free space of --out, {self.retry}") from e
        try:
            self.writer.write(record)
        except RuntimeError as e:
            raise DatasetError(f"cannot write {self._path() + _TMP_SUFFIX} ({e}); check the free space of --out, "
                               f"{self.retry}") from e
        self.offset += 1
        if self.offset == self.todo[self.j]["count"]:
            self._finish()

    def _finish(self) -> None:
        """Close, sync, check, rename the shard; record its size and checksum in the index (atomically)."""
        entry, path = self.todo[self.j], self._path()
        tmp = path + _TMP_SUFFIX
        ok = self.writer.ok()
        self.writer.close()
        self.writer = None
        reader = ArrayRecordReader(tmp)
        count = reader.num_records()
        reader.close()
        if not ok or count != entry["count"]:
            raise DatasetError(f"{tmp} holds {count} records after writing {entry['count']}; check the free space "
                               f"of --out, {self.retry}")
        _fsync(tmp)
        entry["bytes"], entry["sha256"] = os.path.getsize(tmp), file_sha256(tmp)
        os.replace(tmp, path)
        _fsync(self.out_dir)
        _save_json(self.out_dir, INDEX_FILE, self.meta)
        self.j, self.offset = self.j + 1, 0

    def close(self) -> None:
        """Flush an unfinished shard's temporary file (left for ``resume`` to discard)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_shards(seg: Segmenter, mesh, out_dir: str, meta: dict, todo: list[dict], progress: bool) -> None:
    """Generate the shards of ``todo`` batch by batch; encoding overlaps the next batch's device work."""
    gen, size, k = seg.generator, int(meta["shard_size"]), int(meta["k"])
    seed = int(meta["seed"])
    cache = {}

    def inputs(shard: int):
        if cache.get("shard") != shard:
            cache.update(shard=shard, value=shard_inputs(gen, seed, shard, size))
        return cache["value"]

    latents = _PlannedRows(todo, lambda s: inputs(s)[0], tuple(gen.latent_shape), size)
    classes = None if gen.num_classes == 0 else _PlannedRows(todo, lambda s: inputs(s)[1], (), size)
    batches = map_batches(segment_program(gen, seg.layers), [latents, classes], batch_size=int(meta["batch_size"]),
                          mesh=mesh, bcast_args=(seg.params, np.asarray(seg.W, np.float32),
                                                 np.asarray(seg.b, np.float32)))
    sink = ShardSink(out_dir, meta, todo)
    bar = tqdm(total=int(meta["num_samples"]), initial=int(meta["num_samples"]) - len(latents), unit="pair",
               desc=f"UFGS pairs K={k}", disable=not progress)
    pending = collections.deque()
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))

    def drain(futures):
        for f in futures:
            sink.write(f.result())
        bar.update(len(futures))

    try:
        for start, stop, (img, lab) in batches:
            img = to_uint8(img)
            lat = latents[start:stop]
            cls = None if classes is None else classes[start:stop]
            idx = latents.global_indices(start, stop)
            pending.append([pool.submit(encode_pair, img[r], lab[r], num_classes=k, index=int(idx[r]),
                                        latent=lat[r], class_label=None if cls is None else int(cls[r]))
                            for r in range(stop - start)])
            while len(pending) > 1:  # keep one batch encoding while the devices compute the next
                drain(pending.popleft())
        while pending:
            drain(pending.popleft())
    finally:
        for futures in pending:
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True)
        sink.close()
        bar.close()
    if sink.j != len(todo):  # cannot happen unless map_batches skipped rows
        raise DatasetError(f"wrote {sink.j} of {len(todo)} shards; rerun with --resume")
