"""UFGS datasets: record encoding, the writer (devices, determinism, resume), the reader's errors, the CLI.

The run used here is a tiny synthetic one built in about a second: the synthetic
generator (its pixels' true classes are known) and a trajectory of two classifiers
(K = 3 fitted to the true classes by least squares, K = 2 merging two of them),
saved as a KLiSH run directory. The writer only reads ``(W_K, b_K)`` from a run, so
how they were trained does not matter here (tests/test_evaluation.py runs real KLiSH).
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from grain.sources import ArrayRecordDataSource

import gansem.generators.synthetic as syn
from gansem import sharding
from gansem.checkpoint import RunCheckpoints
from gansem.cluster.klish import MergeRecord
from gansem.generators import save_checkpoint
from gansem.pipeline import KlishJobConfig
from gansem.segment import Segmenter
from gansem.ufgs import records as R
from gansem.ufgs.dataset import shard_inputs, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "make_dataset.py")
N, SHARD, BATCH = 10, 4, 4  # 3 shards: 4 + 4 + 2 pairs
REF = dict(num_samples=N, seed=5, shard_size=SHARD, batch_size=BATCH, progress=False, quiet=True)  # the reference


def _record(k, W, b):
    return MergeRecord(k=k, W=W.astype(np.float32), b=b.astype(np.float32), iou=np.full(k, 0.9, np.float32),
                       ecos=np.eye(k, dtype=np.float32), p=k - 1, q=0, sizes=np.ones(k, np.int32), svm_iters=1,
                       svm_converged=True, svm_stop_reason="weight_change", objective=0.0,
                       merged_ids=(0, k - 1, 2 * k))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(run_dir, generator)``: a synthetic 16-px run directory whose trajectory holds K = 3 and K = 2."""
    root = tmp_path_factory.mktemp("ufgs_run")
    gen, params, _ = syn.builtin_generator("synthetic-bands")
    gen = gen.replace(size=16)
    ck = save_checkpoint(str(root / "ck"), gen, params, name="synthetic-bands-16")
    lat = gen.sample_latents(jax.random.key(0), 4)
    _, feats = gen.synthesize(params, lat, capture=True)
    x = np.asarray(feats["features"], np.float64).reshape(-1, gen.channels)
    y = gen.true_partition(lat).reshape(-1)
    sol, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], np.eye(3)[y], rcond=None)  # [D + 1, 3]
    W3, b3 = sol[:-1].T, sol[-1]
    run_dir = str(root / "run")
    os.makedirs(run_dir)
    cfg = KlishJobConfig.paper(generator=ck, num_images=4, resolution=16, k0=3, seed=0).to_dict()
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    ckpt = RunCheckpoints(run_dir)
    ckpt.save_step(1, _record(3, W3, b3), {"k": np.int32(3)})
    ckpt.save_step(2, _record(2, np.stack([W3[0] + W3[2], W3[1]]), np.array([b3[0] + b3[2], b3[1]])),
                   {"k": np.int32(2)})
    ckpt.close()
    return run_dir, gen


@pytest.fixture(scope="module")
def written(tiny_run, tmp_path_factory):
    """The reference dataset: N pairs at K = 3, written on 8 devices; ``(out_dir, segmenter, summary)``."""
    run_dir, _ = tiny_run
    seg = Segmenter.from_run(run_dir, k=3, mesh=sharding.make_mesh(8))
    out = str(tmp_path_factory.mktemp("ufgs_data") / "d8")
    summary = write_dataset(seg, out, **REF, run_info={"run_dir": run_dir})
    return out, seg, summary


def _raw_records(out_dir):
    """Every record's bytes, in order, read without gansem's reader."""
    meta = json.load(open(os.path.join(out_dir, R.INDEX_FILE)))
    src = ArrayRecordDataSource([os.path.join(out_dir, e["file"]) for e in meta["shards"]])
    return [src[i] for i in range(len(src))]


def _shard_hashes(out_dir):
    meta = json.load(open(os.path.join(out_dir, R.INDEX_FILE)))
    return [R.file_sha256(os.path.join(out_dir, e["file"])) for e in meta["shards"]]


def _copy(src, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_index(out_dir, fn):
    p = os.path.join(out_dir, R.INDEX_FILE)
    meta = json.load(open(p))
    fn(meta)
    json.dump(meta, open(p, "w"))


# -- records ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [12, 300])
def test_record_round_trip_is_lossless(rng, k):
    image = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    label = rng.integers(0, k, (9, 7))
    label[0, 0] = k - 1
    latent = rng.normal(size=(2, 5)).astype(np.float32)
    data = R.encode_pair(image, label, num_classes=k, index=41, latent=latent, class_label=7)
    out = R.decode_pair(data)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["label"], label)
    np.testing.assert_array_equal(out["latent"], latent)
    assert out["label"].dtype == np.int32 and out["latent"].dtype == np.float32
    assert out["index"] == 41 and out["class_label"] == 7
    head = json.loads(data[8:8 + int.from_bytes(data[4:8], "little")])
    assert head["label_bits"] == (8 if k <= 256 else 16)
    bare = R.decode_pair(R.encode_pair(image, label, num_classes=k, index=0))
    assert set(bare) == {"image", "label", "index"}


def test_bad_records_are_refused(rng):
    image = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    label = np.zeros((4, 4), np.int64)
    data = R.encode_pair(image, label, num_classes=3, index=0, latent=np.zeros(4, np.float32))
    for bad, why in ((b"PK\x03\x04" + data[4:], "magic"), (data[:-3], "do not match"),
                     (data[:12] + b"\x00" * 4 + data[16:], "damaged header")):
        with pytest.raises(R.DatasetError, match=why):
            R.decode_pair(bad)
    n = int.from_bytes(data[4:8], "little")
    broken_png = bytearray(data)
    broken_png[8 + n + 20] ^= 0xFF  # inside the image's PNG (its IHDR chunk)
    with pytest.raises(R.DatasetError, match="not a readable PNG"):
        R.decode_pair(bytes(broken_png))
    with pytest.raises(R.DatasetError, match=r"labels must be in \[0, 3\)"):
        R.encode_pair(image, label + 3, num_classes=3, index=0)
    with pytest.raises(R.DatasetError, match="65536"):
        R.encode_pair(image, label, num_classes=70000, index=0)


def test_array_pairs_is_a_grain_source(rng):
    images = rng.integers(0, 256, (5, 6, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (5, 6, 8)).astype(np.uint8)
    ds = R.ArrayPairs(images, labels, 4, class_names=list("abcd"), latents=np.ones((5, 3)))
    assert len(ds) == 5 and ds.resolution == (6, 8) and ds.palette.shape == (4, 3) and ds.class_names == list("abcd")
    item = ds[-1]
    assert item["index"] == 4 and item["label"].dtype == np.int32 and item["latent"].dtype == np.float32
    np.testing.assert_array_equal(item["image"], images[4])
    batches = list(grain.MapDataset.source(ds).batch(2))
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels.astype(np.int32))
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(5))
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(R.DatasetError, match=r"labels must be in \[0, 4\)"):
        R.ArrayPairs(images, labels + 1, 4)
    with pytest.raises(R.DatasetError, match="images must be uint8"):
        R.ArrayPairs(images.astype(np.float32), labels, 4)
    with pytest.raises(R.DatasetError, match="latents must have one row per image"):
        R.ArrayPairs(images, labels, 4, latents=np.ones((4, 3)))
    with pytest.raises(R.DatasetError, match="class_names has 2 names"):
        R.ArrayPairs(images, labels, 4, class_names=["a", "b"])


# -- writing and reading -------------------------------------------------------------------------------


def test_written_pairs_are_the_segmenters_masks(written):
    out, seg, summary = written
    assert summary["written"] == N and summary["num_shards"] == 3 and summary["shards_kept"] == 0
    ds = R.open_dataset(out, verify=True)
    meta = ds.meta
    assert len(ds) == N and ds.num_classes == 3 and ds.resolution == 16 and ds.class_names is None
    assert meta["complete"] is True and meta["k"] == 3 and meta["label_bits"] == 8 and meta["seed"] == 5
    assert [(e["first"], e["count"]) for e in meta["shards"]] == [(0, 4), (4, 4), (8, 2)]
    assert meta["generator"]["family"] == "synthetic-bands" and meta["generator"]["checkpoint"]
    np.testing.assert_array_equal(ds.palette, np.asarray(meta["palette"], np.uint8))
    # the inputs of each shard, and the segmenter's own labelling of them
    lat = np.concatenate([shard_inputs(seg.generator, 5, s, SHARD)[0][:c] for s, c in enumerate((4, 4, 2))])
    ref = seg.segment_latents(lat, batch_size=BATCH)
    items = [ds[i] for i in range(N)]
    np.testing.assert_array_equal(np.stack([it["latent"] for it in items]), lat)
    np.testing.assert_array_equal(np.stack([it["image"] for it in items]), ref["images"])
    np.testing.assert_array_equal(np.stack([it["label"] for it in items]), ref["labels"])
    assert [it["index"] for it in items] == list(range(N))
    assert set(items[0]) == {"image", "label", "latent", "index"}  # no class label: unconditional generator
    assert len(np.unique(ref["labels"])) == 3  # a real segmentation, not a constant mask
    # the same through grain, shuffled and batched
    pipe = grain.MapDataset.source(ds).shuffle(seed=0).batch(4)
    got = {int(i): lab for b in pipe for i, lab in zip(b["index"], b["label"])}
    assert sorted(got) == list(range(N))
    for i, lab in got.items():
        np.testing.assert_array_equal(lab, ref["labels"][i])
    for f in ("preview.png", "manifest.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    assert set(json.load(open(os.path.join(out, "manifest.json")))["shards"]) == {e["file"] for e in meta["shards"]}


def test_one_device_two_devices_and_a_smaller_n_give_the_same_records(written, tiny_run, tmp_path):
    out8, seg8, _ = written
    run_dir, _ = tiny_run
    one = Segmenter.from_run(run_dir, k=3)  # no mesh: the writer uses one device
    out1 = str(tmp_path / "d1")
    write_dataset(one, out1, **REF)
    assert _shard_hashes(out1) == _shard_hashes(out8)  # byte-identical shard files
    two = Segmenter.from_run(run_dir, k=3, mesh=sharding.make_mesh(2))
    out2 = str(tmp_path / "d2")
    write_dataset(two, out2, num_samples=6, seed=5, shard_size=SHARD, batch_size=BATCH, progress=False, quiet=True)
    assert _raw_records(out2) == _raw_records(out8)[:6]  # a prefix: samples do not depend on N
    gen = seg8.generator
    a, b, c = (shard_inputs(gen, seed, s, SHARD)[0] for seed, s in ((5, 0), (6, 0), (5, 1)))
    assert not np.isclose(a, b).any() and not np.isclose(a, c).any()  # other seeds and shards: other samples


def test_labels_above_256_classes_are_written_as_16_bit(tiny_run, tmp_path):
    run_dir, gen = tiny_run
    base = Segmenter.from_run(run_dir, k=3)
    ids = np.array([0, 150, 299])  # the K = 3 classifier's rows among 300 classes; the others never win
    W = np.zeros((300, base.W.shape[1]), np.float32)
    b = np.full(300, -1e6, np.float32)
    W[ids], b[ids] = base.W, base.b
    seg = Segmenter(base.generator, base.params, base.layers, W, b, 300)
    out = str(tmp_path / "k300")
    write_dataset(seg, out, num_samples=3, seed=0, shard_size=2, batch_size=8, progress=False, quiet=True)
    ds = R.open_dataset(out)
    assert ds.meta["label_bits"] == 16 and ds.palette.shape == (300, 3)
    ref = ids[base.segment_latents(shard_inputs(gen, 0, 0, 2)[0], batch_size=8)["labels"]]
    assert ref.max() == 299
    np.testing.assert_array_equal(np.stack([ds[0]["label"], ds[1]["label"]]), ref)


class _ClassConditionalBands(syn.SyntheticBands):
    """The synthetic generator made to draw class labels (the images ignore them): the conditional path."""

    @property
    def num_classes(self) -> int:
        return 5


def test_class_conditional_generators_store_the_class_labels(tiny_run, tmp_path):
    run_dir, gen = tiny_run
    base = Segmenter.from_run(run_dir, k=3)
    cond = _ClassConditionalBands(**gen.to_config())
    seg = Segmenter(cond, base.params, base.layers, base.W, base.b, 3)
    out = str(tmp_path / "cond")
    write_dataset(seg, out, num_samples=3, seed=0, shard_size=2, batch_size=8, progress=False, quiet=True)
    ds = R.open_dataset(out)
    classes = np.concatenate([shard_inputs(cond, 0, s, 2)[1][:c] for s, c in ((0, 2), (1, 1))])
    assert ds.meta["class_conditional"] is True and len(set(classes.tolist())) > 1
    assert [ds[i]["class_label"] for i in range(3)] == classes.tolist()


# -- resuming --------------------------------------------------------------------------------------


def test_resume_rewrites_only_unfinished_or_damaged_shards(written, tmp_path):
    out, seg, _ = written
    ref = _shard_hashes(out)
    d = _copy(out, tmp_path)
    meta = json.load(open(os.path.join(d, R.INDEX_FILE)))
    files = [os.path.join(d, e["file"]) for e in meta["shards"]]
    # as if killed while writing shard 2: shard 1 finished but unlisted, shard 2 half written
    os.rename(files[2], files[2] + ".tmp")
    with open(files[2] + ".tmp", "r+b") as f:
        f.truncate(1000)
    _edit_index(d, lambda m: (m.update(complete=False), m["shards"][1].update(sha256=None, bytes=None),
                              m["shards"][2].update(sha256=None, bytes=None)))
    with pytest.raises(R.DatasetError, match=r"incomplete \(1 of 3 shards finished\).*--resume"):
        R.open_dataset(d)
    with pytest.raises(R.DatasetError, match="not empty; use --resume"):
        write_dataset(seg, d, **REF)
    stat0 = os.stat(files[0])
    s = write_dataset(seg, d, **REF, resume=True)
    assert (s["written"], s["shards_written"], s["shards_kept"]) == (6, 2, 1)
    assert _shard_hashes(d) == ref and not os.path.exists(files[2] + ".tmp")
    assert os.stat(files[0]).st_mtime_ns == stat0.st_mtime_ns  # the finished shard was kept, not rewritten
    assert R.open_dataset(d, verify=True).meta["complete"] is True
    # a finished shard damaged later is found by its checksum and written again; nothing else is
    with open(files[1], "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(R.DatasetError, match="does not match its SHA-256"):
        R.open_dataset(d, verify=True)
    s = write_dataset(seg, d, **REF, resume=True)
    assert (s["written"], s["shards_damaged"]) == (4, 1) and _shard_hashes(d) == ref


def test_resume_refuses_other_settings(written, tiny_run, tmp_path):
    out, seg, _ = written
    d = _copy(out, tmp_path)
    kw = dict(REF, resume=True)
    for change, needle in ((dict(seed=6), r"seed 6 \(now\) vs 5 \(dataset\)"), (dict(num_samples=11), "num_samples"),
                           (dict(shard_size=5), "shard_size"), (dict(batch_size=8), "batch_size")):
        with pytest.raises(R.DatasetError, match=r"--resume: the settings differ.*" + needle):
            write_dataset(seg, d, **{**kw, **change})
    k2 = Segmenter.from_run(tiny_run[0], k=2)
    with pytest.raises(R.DatasetError, match="k 2 .now. vs 3 .dataset.*classifier_sha256"):
        write_dataset(k2, d, **kw)
    other_gen = Segmenter(seg.generator.replace(noise=0.06), seg.params, seg.layers, seg.W, seg.b, 3)
    with pytest.raises(R.DatasetError, match="the settings differ.*generator.config"):
        write_dataset(other_gen, d, **kw)
    assert _shard_hashes(d) == _shard_hashes(out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(R.DatasetError, match="not a UFGS dataset directory"):
        write_dataset(seg, str(foreign), **kw)


# -- reader errors ---------------------------------------------------------------------------------


def test_damaged_datasets_give_clear_errors(written, tmp_path):
    out, _, _ = written
    with pytest.raises(R.DatasetError, match="does not exist"):
        R.open_dataset(str(tmp_path / "nothing"))
    with pytest.raises(R.DatasetError, match="no index.json"):
        R.open_dataset(str(tmp_path))
    d = _copy(out, tmp_path, "version")
    _edit_index(d, lambda m: m.update(version=R.FORMAT_VERSION + 1))
    with pytest.raises(R.DatasetError, match="format version 2; .*upgrade gansem"):
        R.open_dataset(d)
    _edit_index(d, lambda m: m.update(version=1, format="something-else"))
    with pytest.raises(R.DatasetError, match="not the index of a gansem UFGS dataset"):
        R.open_dataset(d)
    d = _copy(out, tmp_path, "missing")
    os.remove(os.path.join(d, "pairs-00001-of-00003.array_record"))
    with pytest.raises(R.DatasetError, match="pairs-00001-of-00003.array_record of .* is missing.*--resume"):
        R.open_dataset(d)
    d = _copy(out, tmp_path, "truncated")
    p = os.path.join(d, "pairs-00000-of-00003.array_record")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(R.DatasetError, match="bytes, index.json says.*truncated"):
        R.open_dataset(d)
    _edit_index(d, lambda m: m["shards"][0].update(bytes=os.path.getsize(p)))  # the size check alone is passed
    with pytest.raises(R.DatasetError, match="not a readable array_record file .truncated or damaged"):
        R.open_dataset(d)
    d = _copy(out, tmp_path, "count")
    shutil.copyfile(os.path.join(d, "pairs-00002-of-00003.array_record"), p := os.path.join(d, os.path.basename(p)))
    _edit_index(d, lambda m: m["shards"][0].update(bytes=os.path.getsize(p)))
    with pytest.raises(R.DatasetError, match="holds 2 records, index.json says 4"):
        R.open_dataset(d)


def test_corrupt_and_undecodable_records_are_reported_when_read(written, tmp_path):
    out, _, _ = written
    d = _copy(out, tmp_path, "flipped")
    p = os.path.join(d, "pairs-00001-of-00003.array_record")
    data = bytearray(open(p, "rb").read())
    at = data.find(b"IDAT") + 40  # inside the first record's image (shards are not compressed)
    data[at] ^= 0xFF
    open(p, "wb").write(bytes(data))
    ds = R.open_dataset(d)  # sizes and record counts still agree
    assert ds[0]["index"] == 0
    with pytest.raises(R.DatasetError, match=r"record 4 \(shard pairs-00001-of-00003.array_record, position 0\)"
                                             r".*damaged"):
        ds[4]
    with pytest.raises(R.DatasetError, match="SHA-256"):
        R.open_dataset(d, verify=True)
    # a valid array_record file whose records are not pairs (index.json updated to match it)
    d = _copy(out, tmp_path, "foreign_records")
    p = os.path.join(d, "pairs-00002-of-00003.array_record")
    os.remove(p)
    w = ArrayRecordWriter(p, R.WRITER_OPTIONS)
    for _ in range(2):
        w.write(b"not a pair")
    w.close()
    _edit_index(d, lambda m: m["shards"][2].update(bytes=os.path.getsize(p), sha256=R.file_sha256(p)))
    ds = R.open_dataset(d, verify=True)
    with pytest.raises(R.DatasetError, match="record 8 .*undecodable record .no GSPR magic"):
        ds[8]
    # shards swapped: every record is valid but belongs elsewhere
    d = _copy(out, tmp_path, "swapped")
    a, b = (os.path.join(d, f"pairs-0000{s}-of-00003.array_record") for s in (0, 1))
    os.rename(a, a + ".x"), os.rename(b, a), os.rename(a + ".x", b)
    with pytest.raises(R.DatasetError, match="holds sample 4 .* not sample 0.*do not belong"):
        R.open_dataset(d)[0]


# -- the command line ------------------------------------------------------------------------------


def _main():
    spec = importlib.util.spec_from_file_location("make_dataset_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return mod.main


def test_cli_help_writes_and_user_errors(written, tiny_run, tmp_path, capsys):
    main = _main()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--run", "--k", "--threshold", "--num-samples", "--out", "--seed", "--shard-size", "--batch-size",
                 "--devices", "--resume", "--no-progress", "--quiet"):
        assert flag in text
    run_dir, _ = tiny_run
    out = str(tmp_path / "cli")
    args = ["--run", run_dir, "--threshold", "0.85", "--num-samples", "3", "--out", out, "--seed", "5",
            "--shard-size", "4", "--batch-size", str(BATCH), "--no-progress", "--quiet"]
    assert main(args) == 0
    ds = R.open_dataset(out)
    assert ds.meta["k"] == 3 and ds.meta["threshold"] == 0.85 and "--threshold 0.85" in ds.meta["command"]
    assert _raw_records(out) == _raw_records(written[0])[:3]
    capsys.readouterr()
    cases = [(args, "not empty; use --resume"),
             (["--run", str(tmp_path / "norun"), "--k", "3", "--num-samples", "2", "--out", str(tmp_path / "o")],
              "not a KLiSH run directory"),
             (["--run", run_dir, "--k", "7", "--num-samples", "2", "--out", str(tmp_path / "o")],
              "K=7 is not in the trajectory"),
             (["--run", run_dir, "--k", "3", "--num-samples", "0", "--out", str(tmp_path / "o")],
              "--num-samples must be an integer >= 1"),
             (args[:-4] + ["--shard-size", "5", "--resume"], "--resume: the settings differ")]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_dataset(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    n, shard = 3000, 100  # 30 shards: the writer is still busy when the first one appears
    common = ["--run", run_dir, "--k", "3", "--num-samples", str(n), "--seed", "2", "--shard-size", str(shard),
              "--batch-size", "16", "--no-progress", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, SCRIPT, *common, "--devices", "2", "--out", out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = os.path.join(out, R.shard_file_name(0, n // shard))
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    meta = json.load(open(os.path.join(out, R.INDEX_FILE)))
    finished = sum(1 for e in meta["shards"] if e["sha256"])
    assert meta["complete"] is False and 0 <= finished < n // shard
    with pytest.raises(R.DatasetError, match="writing was interrupted.*--resume"):
        R.open_dataset(out)
    kept = {e["file"]: os.stat(os.path.join(out, e["file"])).st_mtime_ns for e in meta["shards"] if e["sha256"]}
    r = subprocess.run([sys.executable, SCRIPT, *common, "--devices", "8", "--out", out, "--resume"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    seg = Segmenter.from_run(run_dir, k=3)
    ref = str(tmp_path / "uninterrupted")
    write_dataset(seg, ref, num_samples=n, seed=2, shard_size=shard, batch_size=16, progress=False, quiet=True)
    assert _shard_hashes(out) == _shard_hashes(ref)
    assert _raw_records(out) == _raw_records(ref)
    assert R.open_dataset(out, verify=True).meta["resumed"]
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in kept} == kept  # finished shards were kept


def _load_script(name):
    path = os.path.join(os.path.dirname(SCRIPT), name)
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_cli"), path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(path))
    return mod


def test_a_written_dataset_trains_a_segmenter_that_knows_its_klish_run(written, tiny_run, tmp_path):
    """The UFGS chain from the dataset folder: train_segmenter reads it, evaluate_segmenter finds the run."""
    out_dir, _, _ = written
    run_dir, _ = tiny_run
    model = str(tmp_path / "unet")
    train = _load_script("train_segmenter.py")
    assert train.main(["--data", out_dir, "--arch", "unet", "--steps", "2", "--batch-size", "2", "--devices", "1",
                       "--val-samples", "2", "--model-arg", "features=[4,8]", "--out", model, "--no-progress",
                       "--quiet"]) == 0
    with open(os.path.join(model, "model.json")) as f:
        meta = json.load(f)
    assert meta["num_classes"] == 3 and meta["resolution"] == 16
    assert meta["data"]["meta"]["classifier_sha256"] == R.read_index(out_dir)["classifier_sha256"]
    evaluate = _load_script("evaluate_segmenter.py")
    assert evaluate.klish_run_of(meta) == os.path.abspath(run_dir)


@pytest.mark.slow
def test_the_ufgs_chain_end_to_end_through_the_scripts(tiny_run, tmp_path):
    """make_dataset → train_segmenter → predict → evaluate_segmenter on a tiny run, each as a user runs it."""
    run_dir, _ = tiny_run
    data, model, pred, ev = (str(tmp_path / n) for n in ("data", "unet", "pred", "eval"))
    assert _main()(["--run", run_dir, "--k", "3", "--num-samples", "24", "--shard-size", "8", "--batch-size", "8",
                    "--out", data, "--no-progress", "--quiet"]) == 0
    assert len(R.open_dataset(data, verify=True)) == 24
    assert _load_script("train_segmenter.py").main(
        ["--data", data, "--arch", "unet", "--steps", "40", "--batch-size", "8", "--lr", "3e-3", "--val-samples", "8",
         "--eval-every", "40", "--model-arg", "features=[8,16]", "--out", model, "--no-progress", "--quiet"]) == 0
    with open(os.path.join(model, "summary.json")) as f:
        assert json.load(f)["final_val"]["val_pixel_accuracy"] > 0.8  # three bands: learned from 16 pairs
    seg = Segmenter.from_run(run_dir, k=3)
    fresh = seg.sample(6, seed=11)
    npz = str(tmp_path / "fresh.npz")
    np.savez(npz, images=fresh["images"], labels=fresh["labels"], latents=fresh["latents"], k=np.int32(3))
    assert _load_script("predict.py").main(["--model", model, "--images", npz, "--out", pred, "--no-progress",
                                            "--quiet"]) == 0
    with open(os.path.join(pred, "manifest.json")) as f:
        assert json.load(f)["pixel_agreement_with_npz_labels"] > 0.8
    assert _load_script("evaluate_segmenter.py").main(
        ["--model", model, "--labels", "gansem.generators.synthetic:true_labels", "--num-match", "1,4",
         "--repeats", "2", "--match-pool", "6", "--num-test", "8", "--few-shot-steps", "5", "--devices", "1",
         "--out", ev, "--no-progress", "--quiet"]) == 0
    with open(os.path.join(ev, "results.json")) as f:
        res = json.load(f)
    assert res["methods"] == ["ufgs", "klish", "few_shot"]
    best = max(r["miou"]["mean"] for r in res["rows"] if r["method"] == "ufgs")
    assert best > 0.5  # the bands, named by matching
