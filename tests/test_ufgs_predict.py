"""A trained UFGS segmenter: loading a run, prediction at any size, sharded prediction, the predict CLI."""

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gansem import sharding, viz
from gansem.ufgs.predict import SegmenterRunError, TrainedSegmenter
from gansem.ufgs.train import fit_segmenter
from ufgs_pairs import Pairs, colour_blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

# the tiny configuration of test_ufgs_train (its compiled programs are reused when both run)
TINY = dict(arch="unet", batch_size=8, lr=2e-2, steps=6, schedule_steps=6, val_samples=8, eval_every=3,
            checkpoint_every=2, model_kwargs={"features": (4, 8)}, progress=False, quiet=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    images, labels = colour_blobs(40, 16, seed=1)
    out = str(tmp_path_factory.mktemp("predict") / "run")
    seg = fit_segmenter(Pairs(images, labels, 3, class_names=("red", "green", "blue")), out_dir=out,
                        mesh=sharding.make_mesh(1), **TINY)
    return out, seg, images, labels


def test_load_a_run(trained, tmp_path):
    out, seg, _, _ = trained
    loaded = TrainedSegmenter.load(out)
    assert loaded.step == 6 and loaded.run_dir == out and loaded.arch == "unet"
    assert loaded.num_classes == 3 and loaded.resolution == 16 and loaded.class_names == ("red", "green", "blue")
    np.testing.assert_array_equal(loaded.palette, viz.palette(3))  # the data had no palette
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), loaded.variables, seg.variables)))
    assert [r["step"] for r in loaded.history if "loss" in r] == [1, 2, 3, 4, 5, 6]
    older = TrainedSegmenter.load(out, step=4)
    assert older.step == 4 and [r["step"] for r in older.history if "loss" in r] == [1, 2, 3, 4]
    with pytest.raises(SegmenterRunError, match="no checkpoint at step 3; kept steps: 4, 6"):
        TrainedSegmenter.load(out, step=3)
    with pytest.raises(SegmenterRunError, match="not a segmenter run directory"):
        TrainedSegmenter.load(str(tmp_path))


def test_predict_at_the_training_size_is_the_models_argmax(trained):
    _, seg, images, _ = trained
    pred = seg.predict(images[:10], batch_size=4)  # 3 batches, the last padded
    assert pred.shape == (10, 16, 16) and pred.dtype == np.int32
    logits = jax.jit(lambda v, x: seg.model.apply(v, x))(seg.variables, jnp.asarray(images[:10]))
    assert np.mean(pred == np.asarray(jnp.argmax(logits, -1))) > 0.999  # other program: ties may round apart


def test_other_sizes_get_labels_at_their_own_size(trained):
    _, seg, images, _ = trained
    big = np.stack([np.asarray(Image.fromarray(im).resize((40, 24), Image.BILINEAR)) for im in images[:3]])
    pred = seg.predict(big)
    assert pred.shape == (3, 24, 40) and pred.min() >= 0 and pred.max() < 3
    odd = [images[0], big[1], images[2, :9, :13], big[0, :5, :31]]
    out = seg.predict_list(odd, batch_size=2)
    assert [o.shape for o in out] == [(16, 16), (24, 40), (9, 13), (5, 31)]
    np.testing.assert_array_equal(out[0], seg.predict(images[:1])[0])
    np.testing.assert_array_equal(out[1], pred[1])
    # an image upsampled to 2.5x gets nearly the labels of the original, upsampled
    small = seg.predict(images[:3])
    up = small[:, (np.arange(24) * 16) // 24][:, :, (np.arange(40) * 16) // 40]
    assert np.mean(pred == up) > 0.8


def test_prediction_split_over_eight_devices(trained):
    out, seg, images, _ = trained
    sharded = TrainedSegmenter.load(out, mesh=sharding.make_mesh(8))
    one = seg.predict(images[:11], batch_size=8)
    eight = sharded.predict(images[:11], batch_size=4)  # rounded up to 8 rows, two batches
    assert eight.shape == one.shape and np.mean(eight == one) > 0.999


def test_predict_rejects_other_inputs(trained):
    _, seg, images, _ = trained
    with pytest.raises(ValueError, match="uint8 images"):
        seg.predict(images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        seg.predict(images[0])
    with pytest.raises(ValueError, match="image 1"):
        seg.predict_list([images[0], images[1, ..., 0]])


# -- command line -----------------------------------------------------------------------------


def _cli():
    return importlib.import_module("predict")


def test_cli_npz_round_trip(trained, tmp_path, capsys):
    out, seg, images, labels = trained
    data = tmp_path / "seg.npz"
    np.savez_compressed(data, images=images[:6], labels=labels[:6], k=np.int32(3))
    dest = tmp_path / "pred"
    assert _cli().main(["--model", out, "--images", str(data), "--out", str(dest), "--batch-size", "4",
                        "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    with np.load(dest / "predictions.npz", allow_pickle=False) as z:
        pred = z["labels"]
    assert pred.dtype == np.int32 and pred.shape == labels[:6].shape  # compares pixel for pixel with the npz
    np.testing.assert_array_equal(pred, seg.predict(images[:6], batch_size=4))
    names = [f"{i:05d}" for i in range(6)]
    assert sorted(os.listdir(dest / "masks")) == [n + ".png" for n in names]
    mask = np.asarray(Image.open(dest / "masks" / "00003.png"))
    np.testing.assert_array_equal(mask, pred[3])
    overlay = np.asarray(Image.open(dest / "overlays" / "00003.png"))
    np.testing.assert_array_equal(overlay, viz.overlay(images[3], pred[3], colors=seg.palette))
    assert Image.open(dest / "preview.png").size[0] > 128
    with open(dest / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["count"] == 6 and manifest["step"] == 6 and "predictions.npz" in manifest["files"]
    agree = float(np.mean(pred == labels[:6]))  # the npz's own labels have the model's K: agreement reported
    assert manifest["pixel_agreement_with_npz_labels"] == pytest.approx(agree)


def test_cli_image_folder(trained, tmp_path):
    out, seg, images, _ = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    rgba = np.concatenate([images[1], np.full((16, 16, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    Image.fromarray(images[2, ..., 0]).resize((30, 21)).save(folder / "c.png")  # greyscale, another size
    Image.fromarray(images[3]).resize((20, 20)).save(folder / "d.jpeg")
    (folder / "notes.txt").write_text("not an image")
    dest = tmp_path / "pred"
    assert _cli().main(["--model", out, "--images", str(folder), "--out", str(dest), "--quiet",
                        "--no-progress", "--step", "4"]) == 0
    assert sorted(os.listdir(dest / "masks")) == ["a.png", "b.png", "c.png", "d.png"]
    assert np.asarray(Image.open(dest / "masks" / "c.png")).shape == (21, 30)
    assert np.asarray(Image.open(dest / "overlays" / "d.png")).shape == (20, 20, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(dest / "masks" / "b.png")),
                                  TrainedSegmenter.load(out, step=4).predict(images[1:2])[0])  # alpha dropped
    assert not os.path.exists(dest / "predictions.npz")


def test_cli_help_and_errors(trained, tmp_path, capsys):
    out, _, images, _ = trained
    cli = _cli()
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--images", "--out", "--step", "--batch-size", "--devices"):
        assert flag in text

    def error(argv):
        assert cli.main(argv) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1
        return lines[0]

    data = tmp_path / "x.npz"
    np.savez(data, images=images[:2])
    assert "not a segmenter run" in error(["--model", str(tmp_path), "--images", str(data), "--out",
                                           str(tmp_path / "o1")])
    assert "kept steps: 4, 6" in error(["--model", out, "--images", str(data), "--out", str(tmp_path / "o2"),
                                        "--step", "5"])
    assert "does not exist" in error(["--model", out, "--images", str(tmp_path / "none"), "--out",
                                      str(tmp_path / "o3")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert "not an empty folder" in error(["--model", out, "--images", str(data), "--out", str(tmp_path / "full")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no" in error(["--model", out, "--images", str(empty), "--out", str(tmp_path / "o4")])
