"""UFGS segmenter training: learning, data order, 1 vs 8 devices, exact resumption, run directory, errors, CLI.

Every run uses a tiny UNet on 16×16 images; runs with the same settings and mesh reuse the
compiled programs (``train.training_programs`` is cached), so most tests cost only their steps.
"""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gansem import sharding
from gansem.ufgs import train
from gansem.ufgs.predict import SegmenterRunError, TrainedSegmenter, read_metrics
from gansem.ufgs.train import (confusion_scores, default_val_samples, fit_segmenter, learning_rate_schedule,
                               pixel_cross_entropy, training_batches)
from ufgs_pairs import Pairs, cli_error, colour_blobs, segment_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

# one tiny configuration shared by the tests below (and by test_ufgs_predict): compiled once per mesh
TINY = dict(arch="unet", batch_size=8, lr=2e-2, steps=6, schedule_steps=6, val_samples=8, eval_every=3,
            checkpoint_every=2, model_kwargs={"features": (4, 8)}, progress=False, quiet=True)


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


@pytest.fixture(scope="module")
def blobs():
    images, labels = colour_blobs(40, 16, seed=1)
    return Pairs(images, labels, 3, meta={"kind": "colour blobs"})


@pytest.fixture(scope="module")
def straight(blobs, tmp_path_factory):
    """Six steps in one call on one device, checkpoints at 2, 4, 6."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    seg = fit_segmenter(blobs, out_dir=out, mesh=sharding.make_mesh(1), **TINY)
    return out, seg


# -- learning ---------------------------------------------------------------------------------


def test_tiny_unet_learns_colour_blobs():
    """Label = the largest colour channel of a smooth field: > 90 % of held-out pixels right (chance: 1/3)."""
    images, labels = colour_blobs(96, 16, seed=0)
    seg = fit_segmenter(Pairs(images, labels, 3), arch="unet", steps=60, batch_size=8, lr=2e-2, val_samples=16,
                        eval_every=30, model_kwargs={"features": (8, 16)}, progress=False, quiet=True)
    final = seg.summary["final_val"]
    assert final["val_items"] == 16
    assert final["val_pixel_accuracy"] > 0.9 and final["val_miou"] > 0.8, final
    losses = _losses(seg.history)
    assert len(losses) == 60 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # the metrics are those of the returned model on the held-out items
    pred = seg.predict(images[80:])
    assert np.mean(pred == labels[80:]) == pytest.approx(final["val_pixel_accuracy"], abs=1e-6)


# -- data order -------------------------------------------------------------------------------


class _Indexed:
    num_classes, resolution, palette, class_names, meta = 12, 1, None, None, {}

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"image": np.full((1, 1, 3), i, np.uint8), "label": np.full((1, 1), i, np.int32)}


def test_batches_are_a_pure_function_of_seed_and_step():
    src = _Indexed()
    ds = training_batches(src, batch_size=4, seed=3, num_items=10)
    ids = lambda b: b["label"][:, 0, 0].tolist()  # noqa: E731
    first = [ids(ds[t]) for t in range(10)]
    again = training_batches(src, batch_size=4, seed=3, num_items=10)
    assert first == [ids(again[t]) for t in range(10)]
    stream = np.concatenate(first)
    epochs = stream.reshape(4, 10)  # 40 items = 4 epochs of the 10 training items
    for e in epochs:
        assert sorted(e) == list(range(10))  # items 10, 11 (held out) never appear
    assert len({tuple(e) for e in epochs}) == 4  # a new permutation each epoch
    other = training_batches(src, batch_size=4, seed=4, num_items=10)
    assert [ids(other[t]) for t in range(10)] != first
    # a resumed run reads on from its step: the iterator over ds[start:] is ds[start], ds[start + 1], ...
    import grain

    it = iter(ds[5:].to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
    assert [ids(next(it)) for _ in range(5)] == first[5:]


def test_default_val_split():
    assert default_val_samples(10) == 0 and default_val_samples(100) == 5 and default_val_samples(10_000) == 200


# -- pieces -----------------------------------------------------------------------------------


def test_pixel_cross_entropy_ignores_label_and_matches_numpy(rng):
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 3, 4)).astype(np.int32)
    labels[0, 0, :2] = 255
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    keep = labels != 255
    want = -np.log(p[keep, labels[keep]]).mean()
    assert float(pixel_cross_entropy(logits, labels)) == pytest.approx(want, rel=1e-5)
    assert float(pixel_cross_entropy(logits, np.full_like(labels, 7), ignore_index=7)) == 0.0


def test_confusion_scores():
    table = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2 absent from labels and predictions
    s = confusion_scores(table)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    np.testing.assert_allclose(s["iou"][:2], [5 / 8, 2 / 5])
    assert np.isnan(s["iou"][2]) and s["miou"] == pytest.approx((5 / 8 + 2 / 5) / 2)


def test_learning_rate_schedule():
    lr = learning_rate_schedule(1.0, 4, 12)
    got = [float(lr(t)) for t in range(13)]
    np.testing.assert_allclose(got[:4], [0.25, 0.5, 0.75, 1.0])  # warmup, no step at 0
    assert got[4] == pytest.approx(1.0) and got[8] == pytest.approx(0.5) and got[12] == pytest.approx(0.0, abs=1e-7)
    assert all(a >= b for a, b in zip(got[4:], got[5:]))


# -- run directory, resumption, devices -------------------------------------------------------


def test_run_directory_layout(straight):
    out, seg = straight
    assert sorted(os.listdir(out)) == ["checkpoints", "curves.png", "manifest.json", "metrics.jsonl", "model.json",
                                       "summary.json"]
    assert sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints"))) == [4, 6]  # the latest 2
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["arch"] == "unet" and meta["num_classes"] == 3 and meta["resolution"] == 16
    assert meta["model_kwargs"] == {"features": [4, 8]} and meta["palette"] is None
    assert meta["data"]["items"] == 40 and meta["data"]["train_items"] == 32 and meta["data"]["meta"]["kind"]
    assert meta["config"]["schedule_steps"] == 6 and meta["config"]["warmup"] == 0
    recs = read_metrics(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "val_miou" in r] == [3, 6]
    assert all(0 <= r["val_miou"] <= 1 and r["val_items"] == 8 for r in recs if "val_miou" in r)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 6 and summary["steps_this_call"] == 6 and summary["devices"] == 1
    assert summary["steps_per_s"] > 0 and summary["images_per_s"] == pytest.approx(8 * summary["steps_per_s"])
    assert summary["final_val"]["val_miou"] == recs[-1]["val_miou"]
    with open(os.path.join(out, "manifest.json")) as f:
        assert set(json.load(f)["files"]) >= {"model.json", "metrics.jsonl", "curves.png", "summary.json"}
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert seg.step == 6 and seg.run_dir == out


def test_resume_continues_exactly(blobs, straight, tmp_path):
    """3 steps, then a resumed call to 6: the same parameters, losses and evaluations as 6 steps at once."""
    out, ref = straight
    run = str(tmp_path / "run")
    mesh = sharding.make_mesh(1)
    fit_segmenter(blobs, out_dir=run, mesh=mesh, **{**TINY, "steps": 3})
    assert sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints"))) == [2, 3]
    seg = fit_segmenter(blobs, out_dir=run, mesh=mesh, resume=True, **TINY)
    assert seg.summary["resumed_from"] == 3 and seg.summary["steps_this_call"] == 3
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), ref.variables, seg.variables)
    assert all(jax.tree.leaves(same))
    assert read_metrics(run) == read_metrics(out)  # every loss, lr and evaluation, bit for bit
    loaded = TrainedSegmenter.load(run)
    assert loaded.step == 6
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), loaded.variables, ref.variables)))


def test_resume_from_an_older_checkpoint_drops_later_records(blobs, straight, tmp_path):
    """A run killed after step 5 (records written, checkpoint 6 not): resumes at 4 and recomputes 5, 6."""
    import shutil

    out, ref = straight
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "6"))
    seg = fit_segmenter(blobs, out_dir=run, mesh=sharding.make_mesh(1), resume=True, **TINY)
    assert seg.summary["resumed_from"] == 4
    assert read_metrics(run) == read_metrics(out)


def test_eight_devices_same_loss_curve(blobs, straight):
    """The global batch split over 8 devices: the same curve up to float summation order."""
    _, ref = straight
    seg = fit_segmenter(blobs, mesh=sharding.make_mesh(8), **TINY)
    np.testing.assert_allclose(_losses(seg.history), _losses(ref.history), rtol=1e-5)
    evals = lambda h: [r["val_miou"] for r in h if "val_miou" in r]  # noqa: E731
    np.testing.assert_allclose(evals(seg.history), evals(ref.history), atol=1e-6)
    for a, b in zip(jax.tree.leaves(seg.variables), jax.tree.leaves(ref.variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    assert seg.summary["devices"] == 8



@pytest.mark.slow
def test_deeplab_with_dropout_one_vs_eight_devices():
    """DeepLabV3 (ResNet-10, tiny widths, dropout 0.1): the dropout masks do not depend on the device split."""
    images, labels = colour_blobs(16, 32, seed=3)
    kw = dict(arch="deeplabv3", steps=4, batch_size=8, lr=1e-2, val_samples=0, progress=False, quiet=True,
              model_kwargs={"depth": 10, "width": 4, "aspp_features": 8, "dropout": 0.1})
    one = fit_segmenter(Pairs(images, labels, 3), mesh=sharding.make_mesh(1), **kw)
    eight = fit_segmenter(Pairs(images, labels, 3), mesh=sharding.make_mesh(8), **kw)
    np.testing.assert_allclose(_losses(eight.history), _losses(one.history), rtol=1e-5)
    # Adam divides by the gradient's scale: float-order noise in a near-zero gradient can move a weight
    # by a fraction of the learning rate (1e-2), so a few weights agree less closely than the losses
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(jax.tree.leaves(eight.variables), jax.tree.leaves(one.variables))])
    assert np.median(diff) < 2e-5 and diff.max() < 0.2 * 1e-2  # measured: median 3e-6, max 7e-4

# -- errors -----------------------------------------------------------------------------------


def test_resume_refusals(blobs, straight, tmp_path):
    out, _ = straight
    before = sorted(os.listdir(out)), read_metrics(out)
    with pytest.raises(SegmenterRunError, match="already holds a segmenter training run.*resume=True"):
        fit_segmenter(blobs, out_dir=out, **TINY)
    with pytest.raises(SegmenterRunError, match=r"batch_size=8.*batch_size=16"):
        fit_segmenter(blobs, out_dir=out, resume=True, **{**TINY, "batch_size": 16})
    with pytest.raises(SegmenterRunError, match="seed=0.*seed=1"):
        fit_segmenter(blobs, out_dir=out, resume=True, seed=1, **TINY)
    with pytest.raises(SegmenterRunError, match="arch"):
        fit_segmenter(blobs, out_dir=out, resume=True, **{**TINY, "arch": "deeplabv3", "model_kwargs": {}})
    four = Pairs(blobs.images, np.minimum(blobs.labels, 3), 4)
    with pytest.raises(SegmenterRunError, match="num_classes=3.*num_classes=4"):
        fit_segmenter(four, out_dir=out, resume=True, **TINY)
    small = Pairs(blobs.images[:, :8, :8], blobs.labels[:, :8, :8], 3)
    with pytest.raises(SegmenterRunError, match="resolution=16.*resolution=8"):
        fit_segmenter(small, out_dir=out, resume=True, **TINY)
    with pytest.raises(ValueError, match="schedule_steps=6"):
        fit_segmenter(blobs, out_dir=out, resume=True, **{**TINY, "steps": 12, "schedule_steps": None})
    assert (sorted(os.listdir(out)), read_metrics(out)) == before  # nothing touched


def test_errors_before_any_work(blobs, tmp_path):
    with pytest.raises(ValueError, match="batch size 4 cannot be split evenly over 8 devices"):
        fit_segmenter(blobs, mesh=sharding.make_mesh(8), **{**TINY, "batch_size": 4})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(SegmenterRunError, match="not a segmenter run directory"):
        fit_segmenter(blobs, out_dir=str(foreign), **TINY)
    with pytest.raises(ValueError, match="leaves no training item"):
        fit_segmenter(blobs, **{**TINY, "val_samples": 40})
    with pytest.raises(ValueError, match="resume=True needs the out_dir"):
        fit_segmenter(blobs, resume=True, **TINY)
    with pytest.raises(ValueError, match="goes past the learning-rate schedule"):
        fit_segmenter(blobs, out_dir=str(tmp_path / "new"), **{**TINY, "steps": 7})
    assert not os.path.exists(tmp_path / "new")
    with pytest.raises(ValueError, match="square uint8"):
        fit_segmenter(Pairs(blobs.images.astype(np.float32), blobs.labels, 3), **TINY)


def test_out_of_range_labels_are_reported(blobs):
    labels = blobs.labels.copy()
    labels[:, 3, 3] = 7  # in every item: the first batch has one
    labels[:, 0, 0] = 255  # the ignore value is fine
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 3\)"):
        fit_segmenter(Pairs(blobs.images, labels, 3), mesh=sharding.make_mesh(1), **{**TINY, "val_samples": 0})


# -- command line -----------------------------------------------------------------------------


def test_cli_help_and_errors(tmp_path, capsys, blobs):
    cli = importlib.import_module("train_segmenter")
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--arch", "--steps", "--out", "--resume", "--batch-size", "--lr", "--seed", "--devices",
                 "--val-samples", "--eval-every", "--checkpoint-every", "--no-progress", "--quiet", "--model-arg",
                 "--schedule-steps"):
        assert flag in out
    base = ["--arch", "unet", "--steps", "2", "--out", str(tmp_path / "r"), "--no-progress", "--quiet"]

    def error(argv):
        return cli_error(cli, argv, capsys)

    assert "does not exist" in error(["--data", str(tmp_path / "none.npz")] + base)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=blobs.images)
    assert "has no labels, k" in error(["--data", str(bad)] + base)
    good = segment_npz(tmp_path / "seg.npz", blobs.images, blobs.labels, 3)
    assert "multiple of 8" in error(["--data", good, "--batch-size", "4", "--devices", "8"] + base)
    assert "no option" in error(["--data", good, "--model-arg", "depth=3"] + base)
    assert not os.path.exists(tmp_path / "r")  # every check comes before the run directory is created


def test_cli_trains_on_asegment_npz(tmp_path, capsys, blobs):
    cli = importlib.import_module("train_segmenter")
    data = segment_npz(tmp_path / "seg.npz", blobs.images, blobs.labels, 3)
    out = str(tmp_path / "run")
    argv = ["--data", data, "--arch", "unet", "--steps", "6", "--schedule-steps", "6", "--out", out,
            "--batch-size", "8", "--lr", "0.02", "--val-samples", "8", "--eval-every", "3", "--checkpoint-every",
            "2", "--model-arg", "features=[4, 8]", "--devices", "8", "--no-progress"]
    assert cli.main(argv) == 0
    assert "trained" in capsys.readouterr().out
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["data"]["path"] == os.path.abspath(data) and meta["model_kwargs"] == {"features": [4, 8]}
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert cli.main(argv + ["--resume", "--quiet"]) == 0  # already at step 6: nothing to train


@pytest.mark.slow
def test_cli_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """launch/train_segmenter.py killed (SIGKILL) after its first checkpoint, then --resume: the same run."""
    images, labels = colour_blobs(64, 32, seed=2)
    data = segment_npz(tmp_path / "seg.npz", images, labels, 3)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"

    def argv(out, *extra):
        return [sys.executable, os.path.join(ROOT, "launch", "train_segmenter.py"), "--data", data, "--steps", "150",
                "--out", out, "--batch-size", "8", "--checkpoint-every", "10", "--eval-every", "50",
                "--val-samples", "8", "--model-arg", "features=[8, 16]", "--no-progress", "--quiet", *extra]

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(argv(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
    assert kept and kept[-1] < 150, f"not killed mid-run (checkpoints {kept})"
    r = subprocess.run(argv(killed, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ref = str(tmp_path / "ref")
    r = subprocess.run(argv(ref), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert read_metrics(killed) == read_metrics(ref)
    a, b = TrainedSegmenter.load(killed), TrainedSegmenter.load(ref)
    assert a.step == b.step == 150
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a.variables, b.variables)))


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, capsys):
    """benchmarks/bench_ufgs_train.py at tiny sizes: its tables and JSON (timings mean nothing here)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    bench = importlib.import_module("bench_ufgs_train")
    out = tmp_path / "ufgs.json"
    assert bench.main(["--resolution", "16", "--steps", "3", "--repeats", "1", "--profile-steps", "2", "--items", "16",
                       "--unet-features", "4,8", "--deeplab-depth", "10", "--deeplab-width", "4", "--deeplab-aspp", "8",
                       "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dominant ops" in text and "step-only steps/s" in text
    with open(out) as f:
        results = json.load(f)["results"]
    assert [r["arch"] for r in results] == ["unet", "deeplabv3"]
    for r in results:
        assert r["end_to_end"]["steps_per_s"] > 0 and r["step_only"]["flops_per_step"] > 0
        prof = r["profile"]
        assert prof["total_ms"] > 0 and 0 < sum(o["share"] for o in prof["by_kind"]) <= 1 + 1e-9
