"""USCS evaluation: mask recovery by a segmenter, and the Fréchet distance in its feature space."""

import os
import sys

import jax
import numpy as np
import pytest
import scipy.linalg

from gansem.ufgs.models import build_model
from gansem.ufgs.predict import TrainedSegmenter
from gansem.ufgs.records import ArrayPairs
from gansem.ufgs.train import fit_segmenter
from gansem.uscs.evaluate import (evaluate_synthesizers, evaluate_uscs_run, examples_figure, frechet_distance,
                                  initial_synthesizer, mask_recovery, report_markdown, segmenter_features,
                                  write_report)
from gansem.uscs.models import spade_config
from gansem.uscs.synth import load_synthesizer
from gansem.uscs.train import fit_uscs
from ufgs_pairs import cli_error, colour_blobs, segment_npz
from uscs_fake import FakeSynthesizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))

K, R = 4, 16


class NearestColourSegmenter:
    """Labels each pixel with the palette colour nearest to it (a perfect reader of the fake's images)."""

    def __init__(self, palette):
        self.palette = np.asarray(palette, np.float32)
        self.num_classes, self.resolution = len(palette), R

    def predict(self, images, batch_size=64):
        d = ((np.asarray(images, np.float32)[..., None, :] - self.palette) ** 2).sum(-1)   # [N, R, R, K]
        return d.argmin(-1).astype(np.int32)


class ShuffledSynthesizer(FakeSynthesizer):
    """Draws the image of another mask than the one it is given (ignores its input's layout)."""

    def generate(self, masks, *, seed=0):
        m = self._check(masks)
        return super().generate(np.roll(m, R // 2, axis=-1), seed=seed)


def _masks(n):
    synth = FakeSynthesizer(num_classes=K, resolution=R, num_examples=n)
    return synth, np.stack([synth.example_mask(i) for i in range(n)])


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) * 2 + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
           - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :3])


def test_recovery_is_high_for_a_generator_that_follows_the_mask_and_low_for_one_that_does_not():
    synth, masks = _masks(12)
    seg = NearestColourSegmenter(synth.palette)
    good = mask_recovery(synth, seg, masks, batch_size=5)
    bad = mask_recovery(ShuffledSynthesizer(num_classes=K, resolution=R), seg, masks, batch_size=5)
    assert good.images == 12 and good.table.sum() == 12 * R * R
    assert good.pixel_accuracy > 0.9 and good.miou > 0.8
    assert bad.miou < good.miou - 0.3
    with pytest.raises(ValueError, match="ids must be in"):
        mask_recovery(synth, seg, masks + K)


def test_report_of_a_trained_and_an_initial_generator(tmp_path):
    """The whole report on a real (random-weight) UNet segmenter: rows, FD floor, files."""
    model = build_model("unet", K, features=(4, 8))
    # numpy-filled variables of the right shapes (compiling the random initialisers costs seconds)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, R, R, 3), np.uint8))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])   # positive running variances
    seg = TrainedSegmenter(model=model, variables=dict(variables), step=0,
                           meta={"arch": "unet", "num_classes": K, "resolution": R, "model_kwargs": {"features": [4, 8]}})
    synth, masks = _masks(8)
    images = np.stack([synth.example(i)[0] for i in range(8)])
    feats = segmenter_features(seg, images, batch_size=4)
    assert feats.shape == (8, 8) and np.isfinite(feats).all()
    report = evaluate_synthesizers({"fake": synth, "shuffled": ShuffledSynthesizer(num_classes=K, resolution=R)},
                                   seg, images, masks, batch_size=4)
    assert set(report["rows"]) == {"fake", "shuffled"} and report["pairs"] == 8
    for row in [report["real"], *report["rows"].values()]:
        assert np.isfinite(row["fd"]) and len(row["recovery"]["iou"]) == K
    md = report_markdown(report, ["a", "b", "c", "d"])
    assert "generated: fake" in md and "ceiling" in md and "not Inception FID" in md
    write_report(report, str(tmp_path))
    assert (tmp_path / "report.json").exists() and (tmp_path / "report.md").exists()
    png = examples_figure(images, masks, report["samples"], seg, synth.palette, str(tmp_path / "ex.png"), num=4,
                           batch_size=4)
    assert png.endswith("ex.png")
    with pytest.raises(ValueError, match="same classes"):
        evaluate_synthesizers({"x": FakeSynthesizer(num_classes=3, resolution=R)}, seg, images, masks)


# -- the run-level driver and its command line ------------------------------------------------------


def test_cli_help_and_a_missing_run(tmp_path, capsys):
    import evaluate_uscs
    with pytest.raises(SystemExit):
        evaluate_uscs.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--segmenter", "--out", "--step", "--num-pairs", "--seed", "--batch-size",
                 "--num-examples", "--no-progress"):
        assert flag in out
    line = cli_error(evaluate_uscs, ["--model", str(tmp_path / "none"), "--segmenter", str(tmp_path),
                                     "--out", str(tmp_path / "o")], capsys)
    assert "none" in line and "Traceback" not in line
    assert "--num-pairs must be >= 1" in cli_error(
        evaluate_uscs, ["--model", "m", "--segmenter", "s", "--out", "o", "--num-pairs", "0"], capsys)


@pytest.mark.slow
def test_a_trained_run_against_its_initial_weights(tmp_path):
    """Tiny SPADE and UNet runs on the same pairs: the report has both generators, the ceiling and the figure."""
    images, labels = colour_blobs(24, 16, seed=2)
    data = segment_npz(tmp_path / "pairs.npz", images, labels, 3)
    pairs = ArrayPairs(images, labels, 3)
    tiny = spade_config("cpu", ngf=2, mults=(2, 1), spade_hidden=4, ndf=4, d_layers=2)
    fit_uscs(pairs, config=tiny, steps=2, batch_size=4, eval_samples=8, num_samples=4, sample_every=2,
             checkpoint_every=2, out_dir=str(tmp_path / "uscs"), progress=False, quiet=True,
             data_info={"path": data})
    fit_segmenter(pairs, arch="unet", model_kwargs={"features": [4, 8]}, steps=2, batch_size=4, val_samples=8,
                  out_dir=str(tmp_path / "seg"), progress=False, quiet=True)
    synth = load_synthesizer(str(tmp_path / "uscs"))
    initial = initial_synthesizer(synth)
    assert initial.step == 0 and not np.array_equal(initial.generate(labels[:1]), synth.generate(labels[:1]))
    report = evaluate_uscs_run(str(tmp_path / "uscs"), str(tmp_path / "seg"), str(tmp_path / "eval"),
                               batch_size=4, num_examples=2, progress=False)
    assert report["pairs"] == 8 and report["step"] == 2
    assert set(report["rows"]) == {"trained (2 steps)", "initial weights (0 steps)"}
    for name in ("report.json", "report.md", "examples.png", "manifest.json"):
        assert (tmp_path / "eval" / name).exists()
