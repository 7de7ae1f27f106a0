"""Built-in face-part reference labels (dlib 68 landmarks) on bundled-DCGAN samples, and ``--labels faces``."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("dlib", reason="needs the faces extra: pip install 'gansem[faces]'")

from gansem import evaluation as ev  # noqa: E402
from gansem import metrics  # noqa: E402
from gansem.features import to_uint8  # noqa: E402
from gansem.references import faces, sources  # noqa: E402
from gansem.zoo import load_generator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BG, SKIN, BROWS, EYES, NOSE, LIPS, MOUTH = range(7)


@pytest.fixture(scope="module")
def dcgan():
    return load_generator("dcgan-digiface")[:2]


@pytest.fixture(scope="module")
def samples(dcgan):
    gen, params = dcgan
    images = to_uint8(np.asarray(gen.synthesize(params, gen.sample_latents(jax.random.key(1), 8))[0]))
    return images, faces.segment_faces(images)


def _labelled(labels):
    return ~np.all(labels == faces.IGNORE, axis=(1, 2))


def _centroid(mask):
    r, c = np.nonzero(mask)
    return r.mean(), c.mean()


def test_most_samples_are_labelled_and_skipped_ones_are_all_ignore(samples):
    images, labels = samples
    assert labels.shape == images.shape[:3] and labels.dtype == np.int32
    ok = _labelled(labels)
    assert ok.sum() >= 5
    assert set(np.unique(labels[ok]).tolist()) <= set(range(len(faces.CLASS_NAMES)))
    assert np.all(labels[~ok] == faces.IGNORE)
    lm = faces.detect_landmarks(images)
    np.testing.assert_array_equal(lm.labelled, ok)
    assert np.all(np.isnan(lm.points[~ok])) and np.all(np.isfinite(lm.points[ok]))
    assert np.all(lm.scores[ok] >= -0.5)


def test_parts_lie_where_a_person_would_find_them(samples):
    images, labels = samples
    h, w = labels.shape[1:]
    for lab in labels[_labelled(labels)]:
        for c in (SKIN, BROWS, EYES, NOSE, LIPS):
            assert (lab == c).sum() > 0, faces.CLASS_NAMES[c]
        brow_r, _ = _centroid(lab == BROWS)
        eye_r, _ = _centroid(lab == EYES)
        nose_r, nose_c = _centroid(lab == NOSE)
        mouth_r, _ = _centroid((lab == LIPS) | (lab == MOUTH))
        assert brow_r < eye_r < nose_r < mouth_r
        # one eye on each side of the nose, at similar heights and (for near-frontal faces) distances
        er, ec = np.nonzero(lab == EYES)
        left, right = ec < nose_c, ec > nose_c
        assert left.any() and right.any()
        d_left, d_right = nose_c - ec[left].mean(), ec[right].mean() - nose_c
        assert min(d_left, d_right) / max(d_left, d_right) > 0.25
        assert abs(er[left].mean() - er[right].mean()) < 0.1 * h
        # skin surrounds the inner parts (a brow may reach the face outline on a turned face)
        bg = lab == BG
        near_bg = np.zeros_like(bg)
        near_bg[1:] |= bg[:-1]
        near_bg[:-1] |= bg[1:]
        near_bg[:, 1:] |= bg[:, :-1]
        near_bg[:, :-1] |= bg[:, 1:]
        assert not np.any(near_bg & (lab >= EYES))
        assert (near_bg & (lab == BROWS)).sum() <= 0.2 * (lab == BROWS).sum()
        assert (lab == SKIN).sum() > sum((lab == c).sum() for c in range(BROWS, MOUTH + 1))
        for r, c in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            assert lab[r, c] == BG


def test_blank_and_noise_images_are_skipped():
    rng = np.random.default_rng(0)
    images = np.stack([np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 128, np.uint8),
                       rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    assert np.all(faces.segment_faces(images) == faces.IGNORE)


def test_rasterize_parts_from_landmarks(samples):
    images, labels = samples
    lm = faces.detect_landmarks(images)
    np.testing.assert_array_equal(faces.rasterize_parts(lm.points, 64, 64), labels)
    # twice the resolution: the same parts at twice the coordinates, about four times the area
    big = faces.rasterize_parts((lm.points + 0.5) * 2 - 0.5, 128, 128)
    ok = lm.labelled
    for c in range(1, 6):
        ratio = (big[ok] == c).sum() / (labels[ok] == c).sum()
        assert 3.5 < ratio < 4.5, faces.CLASS_NAMES[c]
    with pytest.raises(ValueError, match="uint8"):
        faces.segment_faces(images.astype(np.float32))


def test_labels_faces_resolves_to_the_builtin_labeller(samples):
    images, labels = samples
    src = sources.resolve_labels_source("faces")
    assert isinstance(src, sources.CallableLabels)
    assert src.ignore_label == faces.IGNORE and src.class_names == faces.CLASS_NAMES
    np.testing.assert_array_equal(src(images), labels)
    assert sources.resolve_labels_source("faces", ignore_label=faces.IGNORE).ignore_label == faces.IGNORE
    with pytest.raises(ev.EvaluationError, match="leave --ignore-label unset"):
        sources.resolve_labels_source("faces", ignore_label=0)
    # the short callable name works as module:function too
    src2 = sources.resolve_labels_source("gansem.references.faces:segment")
    assert src2.class_names == faces.CLASS_NAMES


def test_skipped_samples_do_not_contribute_to_any_score(samples):
    """An all-ignored image adds no pixel to the tables and no image to the per-image mIoU average."""
    _, labels = samples
    ok = _labelled(labels)
    ref = labels[ok]
    pred = np.random.default_rng(0).integers(0, 5, ref.shape).astype(np.int32)
    skipped = np.full_like(ref[:2], faces.IGNORE)
    with_skipped = (np.concatenate([pred, pred[:2]]), np.concatenate([ref, skipped]))
    tables = [metrics.contingency(p, r, 5, 7, per_image=True, ignore_label=faces.IGNORE)
              for p, r in ((pred, ref), with_skipped)]
    assert np.all(tables[1][len(ref):] == 0)
    for average in ("image", "dataset"):
        a, b = (metrics.clustering_scores(t, average=average) for t in tables)
        assert (a.miou, a.ari, a.ami) == (b.miou, b.ari, b.ami)
        np.testing.assert_array_equal(a.assignment, b.assignment)
    assert sources.num_skipped(with_skipped[1], faces.IGNORE) == 2


@pytest.mark.slow
def test_labelled_fraction_and_speed(dcgan):
    import time

    gen, params = dcgan
    lat, _ = ev.evaluation_latents(gen, 0, 200)
    images = np.concatenate([to_uint8(np.asarray(gen.synthesize(params, lat[i:i + 50])[0]))
                             for i in range(0, 200, 50)])
    t = time.time()
    labels = faces.segment_faces(images)
    assert time.time() - t < 30
    assert _labelled(labels).mean() >= 0.75


@pytest.mark.slow
def test_evaluate_and_separability_clis_with_faces(tmp_path):
    from gansem.pipeline import KlishJobConfig, run_klish_job

    run_dir = str(tmp_path / "run")
    run_klish_job(KlishJobConfig(num_images=2, resolution=8, k0=6, svm_max_iter=300), run_dir, devices=1,
                  progress=False, quiet=True, num_vis=1)
    out = str(tmp_path / "eval")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--run", run_dir, "--labels",
                        "faces", "--k", "3", "--baselines", "none", "--num-samples", "12", "--out", out,
                        "--no-progress", "--devices", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["num_labelled"] + res["num_skipped"] == 12 and res["num_labelled"] >= 8
    assert res["ignore_label"] == faces.IGNORE and res["class_names"] == list(faces.CLASS_NAMES)
    line = f"{res['num_labelled']} labelled, {res['num_skipped']} skipped"
    assert line in open(os.path.join(out, "table.md")).read() and line in r.stdout
    out = str(tmp_path / "sep")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "separability.py"), "--run", run_dir,
                        "--labels", "faces", "--num-train", "8", "--num-test", "8", "--out", out, "--no-progress",
                        "--devices", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.load(open(os.path.join(out, "separability.json")))
    assert res["num_train_labelled"] + res["num_train_skipped"] == 8 and res["num_test_labelled"] >= 5
    assert res["num_classes"] >= 6
    assert "Samples with reference labels" in open(os.path.join(out, "separability.md")).read()
