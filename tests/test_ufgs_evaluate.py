"""UFGS evaluation (Tab. 5/6): cluster → class matching, per-class IoU, M-image draws, labelled sets, the CLI."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import gansem.generators.synthetic as syn
from gansem.evaluation.streams import count_overlap, evaluation_latents
from gansem.features import select_feature_layers
from gansem.references.sources import CallableLabels, EvaluationError
from gansem.segment import Segmenter
from gansem.ufgs import evaluate as ue
from gansem.ufgs import labelled as ul

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")

# A synthetic UFGS task: K = 5 clusters, each drawn in its own colour; clusters are parts of C = 3 classes.
CLUSTER_COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230]])
CLUSTER_CLASS = np.array([2, 0, 1, 2, 0])  # class of every cluster (classes 0 and 2 are split in two)
CLASS_NAMES = ("sky", "grass", "road")


def _blocky(rng, n, size, values, cells=4, p=None):
    """``[n, size, size]`` maps of random ``values`` (probabilities ``p``) on a ``cells × cells`` grid."""
    grid = rng.choice(values, (n, cells, cells), p=p)
    return np.repeat(np.repeat(grid, size // cells, axis=1), size // cells, axis=2)


def _synthetic_set(rng, n, size=16, ignore=False):
    """``(LabelledImages, cluster maps [n, size, size])``: images show the cluster colour (plus noise).

    Cluster 3 is rare: one matching image often lacks it, and Algorithm 2 then gives it the first class.
    """
    clusters = _blocky(rng, n, size, np.arange(5), p=[0.28, 0.28, 0.27, 0.02, 0.15])
    noise = rng.integers(-15, 16, clusters.shape + (3,))
    images = np.clip(CLUSTER_COLOURS[clusters] + noise, 0, 255).astype(np.uint8)
    labels = CLUSTER_CLASS[clusters].astype(np.int32)
    if ignore:
        labels[:, :2, :2] = 255
    return ul.LabelledImages(images, labels, CLASS_NAMES, 255 if ignore else None, {"kind": "synthetic"}), clusters


def _nearest_colour(colours):
    colours = np.asarray(colours, np.float64)

    def predict(images):
        d = ((np.asarray(images, np.float64)[..., None, :] - colours) ** 2).sum(-1)
        return np.argmin(d, axis=-1).astype(np.int32)

    return predict


def _colour_trainer(calls=None):
    """Few-shot stand-in: nearest class-mean colour, fitted on the M images (labels -1 are skipped)."""

    def train(images, labels, num_classes, seed):
        imgs = np.concatenate([np.asarray(x).reshape(-1, 3) for x in images]).astype(np.float64)
        labs = np.concatenate([np.asarray(x).reshape(-1) for x in labels])
        if calls is not None:
            calls.append({"images": images, "labels": labs, "num_classes": num_classes, "seed": seed})
        means = np.full((num_classes, 3), 1e6)
        for c in range(num_classes):
            if np.any(labs == c):
                means[c] = imgs[labs == c].mean(0)
        return _nearest_colour(means)

    return train


# -- matching --------------------------------------------------------------------------------


def test_matching_recovers_a_known_permutation(rng):
    C = 4
    ref = _blocky(rng, 6, 16, np.arange(C))
    perm = rng.permutation(C)
    pred = perm[ref]
    split = (ref == 2) & (np.arange(16)[None, None, :] >= 8)
    pred[split] = C  # class 2 is cut into two clusters
    expected = np.empty(C + 1, np.int64)
    expected[perm] = np.arange(C)
    expected[C] = 2
    assert split.any() and (pred == perm[2]).any()
    for average in ("image", "dataset"):
        np.testing.assert_array_equal(ue.match_clusters(pred, ref, C + 1, C, average=average), expected)
    # pixels without a reference label do not mislead the matching
    ref_ig = ref.copy()
    ref_ig[:, :5] = 255
    pred_noisy = pred.copy()
    pred_noisy[:, :5] = rng.integers(0, C + 1, pred_noisy[:, :5].shape)
    np.testing.assert_array_equal(ue.match_clusters(pred_noisy, ref_ig, C + 1, C, ignore_label=255), expected)
    # one image holding every class and cluster is enough
    one = next(i for i in range(6) if len(np.unique(pred[i])) == C + 1)
    np.testing.assert_array_equal(ue.match_clusters(pred[one:one + 1], ref[one:one + 1], C + 1, C), expected)
    # maps of different sizes (a list) give the same result
    as_list = [pred[i] if i % 2 else pred[i, :, :12] for i in range(6)]
    ref_list = [ref[i] if i % 2 else ref[i, :, :12] for i in range(6)]
    np.testing.assert_array_equal(ue.match_clusters(as_list, ref_list, C + 1, C), expected)
    np.testing.assert_array_equal(ue.apply_assignment(pred, expected), ref)


def _direct_scores(mapped, ref, valid, C):
    """Per-class IoU (pooled and per image) and pixel accuracy by plain numpy on the pixels."""
    pooled, per_img = np.full(C, np.nan), np.full(C, np.nan)
    for m in range(C):
        inter = ((mapped == m) & (ref == m) & valid)
        union = ((mapped == m) | (ref == m)) & valid
        if union.sum():
            pooled[m] = inter.sum() / union.sum()
        ious = [inter[i].sum() / union[i].sum() for i in range(len(ref)) if union[i].sum()]
        if ious:
            per_img[m] = np.mean(ious)
    acc = (mapped == ref)[valid].mean()
    acc_img = np.mean([(mapped[i] == ref[i])[valid[i]].mean() for i in range(len(ref)) if valid[i].any()])
    return pooled, per_img, acc, acc_img


def test_per_class_iou_equals_a_direct_computation(rng):
    from sklearn.metrics import jaccard_score

    N, S, K, C = 5, 12, 6, 4
    pred = rng.integers(0, K, (N, S, S))
    ref = _blocky(rng, N, S, np.arange(C - 1), cells=3)  # class 3 never occurs in the reference
    ref[rng.random(ref.shape) < 0.1] = 255
    ref[4] = 255  # an image without labels
    assignment = np.array([0, 1, 2, 3, 1, -1])  # cluster 5 unmatched, class 3 predicted but absent
    test = ul.LabelledImages(np.zeros((N, S, S, 3), np.uint8), ref, ignore_label=255)
    s = ue.per_class_iou(pred, test, assignment, C)
    mapped = assignment[pred]
    valid = ref != 255
    pooled, per_img, acc, acc_img = _direct_scores(mapped, ref, valid, C)
    np.testing.assert_allclose(s.per_class_iou, pooled, rtol=1e-12)
    np.testing.assert_allclose(s.per_class_iou_image, per_img, rtol=1e-12)
    sk = jaccard_score(ref[valid], mapped[valid], labels=np.arange(C), average=None, zero_division=0)
    np.testing.assert_allclose(s.per_class_iou, sk, rtol=1e-12)
    assert s.per_class_iou[3] == 0.0  # predicted but absent: IoU 0, counted in the mIoU
    assert s.miou == pytest.approx(np.mean(pooled)) and s.miou_image == pytest.approx(np.nanmean(per_img))
    assert s.pixel_accuracy == pytest.approx(acc) and s.pixel_accuracy_image == pytest.approx(acc_img)
    assert s.num_images == N - 1

    # class predictions (no assignment): a class neither present nor predicted is left out of the mIoU
    cls = np.minimum(pred, C - 2)
    s2 = ue.per_class_iou(cls, test, None, C)
    assert np.isnan(s2.per_class_iou[3]) and s2.miou == pytest.approx(np.nanmean(s2.per_class_iou))
    np.testing.assert_allclose(s2.per_class_iou[:3], _direct_scores(cls, ref, valid, C)[0][:3], rtol=1e-12)


def test_streaming_a_predictor_over_images_of_different_sizes(rng):
    sizes = [(12, 12), (12, 12), (8, 10), (12, 12), (8, 10)]
    images = [rng.integers(0, 256, s + (3,)).astype(np.uint8) for s in sizes]
    labels = [rng.integers(0, 3, s) for s in sizes]
    test = ul.LabelledImages(images, labels)
    calls = []

    def predictor(x):
        calls.append(x.shape)
        return (x[..., 0] % 4).astype(np.int32)

    a = ue.per_class_iou(predictor, test, np.array([0, 1, 2, 0]), 3, batch_size=2)
    b = ue.per_class_iou([im[..., 0] % 4 for im in images], test, np.array([0, 1, 2, 0]), 3)
    np.testing.assert_array_equal(a.per_class_iou, b.per_class_iou)
    assert calls == [(2, 12, 12, 3), (1, 8, 10, 3), (1, 12, 12, 3), (1, 8, 10, 3)]
    with pytest.raises(EvaluationError, match=r"expected ids in \[0, 3\)"):
        ue.per_class_iou(predictor, test, None, 3)
    with pytest.raises(EvaluationError, match="at the size of the input images"):
        ue.per_class_iou(lambda x: x[:, :4, :4, 0] % 3, test, None, 3)


# -- draws of the M images --------------------------------------------------------------------


def test_repeats_draw_different_m_image_sets_deterministically_from_the_seed():
    a = ue.draw_match_sets(30, [1, 5, 30], 4, seed=3)
    b = ue.draw_match_sets(30, [5, 1, 30], 4, seed=3)
    for m in (1, 5, 30):
        assert len(a[m]) == 4 and all(len(d) == m and len(set(d.tolist())) == m for d in a[m])
        assert all(np.array_equal(x, y) for x, y in zip(a[m], b[m]))
    assert len({tuple(d) for d in a[5]}) == 4  # different images in every repeat
    assert all(np.array_equal(d, np.arange(30)) for d in a[30])
    c = ue.draw_match_sets(30, [5], 6, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a[5], c[5]))
    assert all(np.array_equal(x, y) for x, y in zip(ue.draw_match_sets(30, [5], 6, seed=3)[5], a[5]))
    with pytest.raises(EvaluationError, match="cannot draw M=31"):
        ue.draw_match_sets(30, [31], 1, seed=0)


# -- the Tab. 5 / Tab. 6 experiment --------------------------------------------------------------


def test_ufgs_table_end_to_end_with_stand_ins(rng, tmp_path):
    pool, pool_clusters = _synthetic_set(rng, 12)
    test, test_clusters = _synthetic_set(rng, 10, ignore=True)
    perm = np.array([3, 0, 4, 1, 2])  # the segmenter's cluster ids are a relabelling of the colours
    ufgs = _nearest_colour(CLUSTER_COLOURS[np.argsort(perm)])
    np.testing.assert_array_equal(ufgs(test.images), perm[test_clusters])
    calls = []
    table = ue.ufgs_table(pool, test, ufgs_predictor=ufgs, num_clusters=5, few_shot_trainer=_colour_trainer(calls),
                          klish_match_labels=pool_clusters, klish_test_labels=test_clusters,
                          num_match=(1, 4, 50), repeats=3, seed=7, num_examples=3)
    res = table.results
    assert res["num_match"] == [1, 4, 12] and res["num_match_requested"] == [1, 4, 50]
    assert res["num_classes"] == 3 and res["class_names"] == list(CLASS_NAMES) and res["num_clusters"] == 5
    assert [(r["method"], r["num_match"]) for r in res["rows"]] == [
        (m, k) for m in ("ufgs", "klish", "few_shot") for k in (1, 4, 12)]
    rows = {(r["method"], r["num_match"]): r for r in res["rows"]}
    draws = ue.draw_match_sets(12, [1, 4, 12], 3, seed=7)
    assert res["draws"] == {str(m): [d.tolist() for d in v] for m, v in draws.items()}
    # with the whole pool, matching recovers the relabelling and the clusters' classes: a perfect segmentation
    for method, want in (("ufgs", CLUSTER_CLASS[np.argsort(perm)]), ("klish", CLUSTER_CLASS)):
        r = rows[(method, 12)]
        assert r["miou"]["mean"] == 1.0 and r["pixel_accuracy"]["mean"] == 1.0 and r["miou"]["std"] == 0.0
        assert all(a == want.tolist() for a in r["assignments"])
        assert r["labelled_images"] == 12 and r["labelled_role"] == "cluster → class matching"
    # one image may lack the rare cluster 3: Algorithm 2 then gives it the first class, and the score drops
    r = rows[("ufgs", 1)]
    present = [bool((pool_clusters[d] == 3).any()) for d in draws[1]]
    assert set(present) == {True, False}
    for p, a, v in zip(present, r["assignments"], r["miou"]["values"]):
        assert a[perm[3]] == (CLUSTER_CLASS[3] if p else 0) and (v == 1.0) == p
    assert r["miou"]["std"] > 0
    # each row's repeat r equals scoring the r-th assignment directly
    for a, v in zip(r["assignments"], r["miou"]["values"]):
        direct = ue.per_class_iou(ufgs(test.images), test, np.array(a), 3)
        assert v == pytest.approx(direct.miou)
    # the few-shot trainer saw exactly the drawn images, ignored pixels as -1, a seed per (M, repeat)
    assert len(calls) == 9 and len({c["seed"] for c in calls}) == 9
    for c, (m, d) in zip(calls, [(m, d) for m in (1, 4, 12) for d in draws[m]]):
        np.testing.assert_array_equal(c["images"], pool.images[d])
        assert c["num_classes"] == 3
    fs = rows[("few_shot", 12)]
    assert fs["labelled_role"] == "training" and fs["miou"]["mean"] > 0.5 and "train_seeds" in fs
    assert len(fs["per_class_iou"]["mean"]) == 3 and len(fs["per_class_iou"]["std"]) == 3
    # the same inputs give the same table
    again = ue.ufgs_table(pool, test, ufgs_predictor=ufgs, num_clusters=5, few_shot_trainer=_colour_trainer(),
                          klish_match_labels=pool_clusters, klish_test_labels=test_clusters,
                          num_match=(1, 4, 50), repeats=3, seed=7, num_examples=3)
    assert [r["miou"] for r in again.results["rows"]] == [r["miou"] for r in res["rows"]]

    files = ue.write_report(table, str(tmp_path / "out"), {"inputs": {"model": "stand-in"}})
    assert sorted(os.path.basename(f) for f in files.values()) == sorted(ue.REPORT_FILES)
    md = open(files["tables.md"]).read()
    assert "## Tab. 5: mIoU" in md and "## Tab. 6" in md
    assert "| UFGS (K=5) | 12 | cluster → class matching | 3 |" in md
    assert "| sky | grass | road |" in md and "(asked [1, 4, 50]" in md
    saved = json.load(open(files["results.json"]))
    assert saved["rows"][0]["miou"] == res["rows"][0]["miou"]
    manifest = json.load(open(files["manifest.json"]))
    assert manifest["inputs"]["model"] == "stand-in" and set(manifest["files"]) == set(ue.REPORT_FILES)
    assert Image.open(files["examples.png"]).size[0] > 100
    assert list(table.examples["maps"]) == ["UFGS clusters (K=5)", "UFGS, M=12", "KLiSH, M=12", "few-shot, M=12"]
    first = table.examples["indices"][0]
    np.testing.assert_array_equal(table.examples["maps"]["UFGS, M=12"][0], CLUSTER_CLASS[test_clusters[first]])
    # ignored reference pixels are drawn black (-1)
    assert all((ref[:2, :2] == -1).all() for ref in table.examples["reference"])


def test_ufgs_table_checks_its_inputs(rng):
    pool, pc = _synthetic_set(rng, 4)
    test, tc = _synthetic_set(rng, 4)
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        ue.ufgs_table(pool, test)
    with pytest.raises(EvaluationError, match="num_clusters"):
        ue.ufgs_table(pool, test, ufgs_predictor=lambda x: x[..., 0] * 0)
    with pytest.raises(EvaluationError, match="both the matching and the test"):
        ue.ufgs_table(pool, test, klish_test_labels=tc, num_clusters=5)
    with pytest.raises(EvaluationError, match="repeats"):
        ue.ufgs_table(pool, test, few_shot_trainer=_colour_trainer(), repeats=0)


# -- labelled sets ---------------------------------------------------------------------------


def _write_folder(root, rng, sizes, classes=("bg", "a", "b")):
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    out = {}
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        mask = rng.integers(0, len(classes), (h, w)).astype(np.uint8)
        mask[0, 0] = 255
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
        out[f"s{i}"] = (img, mask)
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


def test_folder_loader_round_trip(rng, tmp_path):
    written = _write_folder(tmp_path / "d", rng, [(10, 12), (10, 12), (7, 9)])
    s = ul.from_folder(str(tmp_path / "d"), ignore_label=255)
    assert len(s) == 3 and s.class_names == ("bg", "a", "b") and s.num_classes == 3 and not s.uniform
    for i, name in enumerate(sorted(written)):
        np.testing.assert_array_equal(s.images[i], written[name][0])
        np.testing.assert_array_equal(s.labels[i], written[name][1])
        assert s.labels[i].dtype == np.int32
    assert s.description["kind"] == "folder" and s.description["num_pairs"] == 3
    part = ul.from_folder(str(tmp_path / "d"), indices=[2], ignore_label=255)
    np.testing.assert_array_equal(part.labels[0], written["s2"][1])
    # a palette PNG stores class ids as palette indices
    p = Image.fromarray(written["s0"][1], mode="P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (253 * 3))
    p.save(tmp_path / "d" / "masks" / "s0.png")
    np.testing.assert_array_equal(ul.from_folder(str(tmp_path / "d"), ignore_label=255).labels[0], written["s0"][1])
    # matching pool and test set from one folder: disjoint, seeded
    pool, test = ul.evaluation_sets(str(tmp_path / "d"), num_match_pool=1, seed=0, ignore_label=255)
    assert len(pool) == 1 and len(test) == 2
    ids = lambda x: {im.tobytes() for im in x.images}  # noqa: E731
    assert not ids(pool) & ids(test) and len(ids(pool) | ids(test)) == 3
    assert ids(ul.evaluation_sets(str(tmp_path / "d"), num_match_pool=1, seed=0, ignore_label=255)[0]) == ids(pool)


def test_folder_loader_errors(rng, tmp_path):
    d = tmp_path / "d"
    _write_folder(d, rng, [(8, 8), (8, 8)])
    with pytest.raises(EvaluationError, match=r"ids 0\.\.255.*ignore_label"):
        ul.from_folder(str(d))  # 255 is neither a class nor ignored
    os.rename(d / "masks" / "s1.png", d / "masks" / "other.png")
    with pytest.raises(EvaluationError, match=r"1 image\(s\) without a mask.*\['s1'\].*1 mask\(s\) without an image"):
        ul.folder_pairs(str(d))
    os.rename(d / "masks" / "other.png", d / "masks" / "s1.png")
    Image.fromarray(np.zeros((8, 7), np.uint8), mode="L").save(d / "masks" / "s1.png")
    with pytest.raises(EvaluationError, match="mask s1.png is 7x8 but its image is 8x8"):
        ul.from_folder(str(d), ignore_label=255)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "masks" / "s1.png")
    with pytest.raises(EvaluationError, match="mask mode RGB"):
        ul.from_folder(str(d), ignore_label=255)
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(d / "masks" / "s1.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "images" / "s1.jpg")
    with pytest.raises(EvaluationError, match="two images are named 's1'"):
        ul.folder_pairs(str(d))
    os.remove(d / "images" / "s1.jpg")
    (d / "classes.txt").write_text("bg\n\nb\n")
    with pytest.raises(EvaluationError, match=r"line\(s\) \[2\] are empty"):
        ul.from_folder(str(d), ignore_label=255)
    (d / "classes.txt").write_text("bg\n")
    with pytest.raises(EvaluationError, match=r"class ids must lie in \[0, 1\)"):
        ul.from_folder(str(d), ignore_label=255)
    with pytest.raises(EvaluationError, match="images' is not a folder"):
        ul.folder_pairs(str(tmp_path))
    with pytest.raises(EvaluationError, match="4 label maps for 3 images"):
        ul.LabelledImages(np.zeros((3, 4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.int32))


def test_tfds_loader_without_tensorflow_datasets_says_what_to_install():
    if importlib.util.find_spec("tensorflow_datasets") is not None:
        pytest.skip("tensorflow_datasets is installed")
    with pytest.raises(ImportError, match=r"pip install 'gansem\[tfds\]'"):
        ul.from_tfds("cityscapes", "validation")
    with pytest.raises(ImportError, match=r"pip install 'gansem\[tfds\]'"):
        ul.load_labelled("tfds:oxford_iiit_pet:test")


def test_tfds_spec_parsing():
    assert ul._tfds_spec("tfds:oxford_iiit_pet") == ("oxford_iiit_pet", "test")
    assert ul._tfds_spec("tfds:cityscapes/semantic_segmentation:validation") == (
        "cityscapes/semantic_segmentation", "validation")
    assert ul._tfds_spec("tfds:voc/2012:5.0.0") == ("voc/2012:5.0.0", "test")
    assert ul._tfds_spec("tfds:voc:5.*.*:train[:10]") == ("voc:5.*.*", "train[:10]")
    assert not ul.is_generator_labeller("tfds:voc") and ul.is_generator_labeller("faces")


def _labeller_skipping_red_corners(images):
    """True labels of synthetic-bands images; samples whose top-left pixel is red are skipped (all 255)."""
    lab = syn.true_labels(images)
    lab[lab[:, 0, 0] == 0] = 255
    return lab


def test_generated_sets_keep_latents_and_cluster_maps_and_drop_skipped_samples(tmp_path):
    gen, params, _ = syn.builtin_generator("synthetic-bands")
    gen = gen.replace(size=8)
    layers = tuple(select_feature_layers(gen.feature_layers(), 1000))
    W = np.asarray(jax.random.normal(jax.random.key(0), (4, gen.channels)), np.float32)
    seg = Segmenter(gen, params, layers, W, np.zeros(4, np.float32), 4)
    fn = CallableLabels(_labeller_skipping_red_corners, "skip-red", syn.CLASS_NAMES, 255)
    s = ul.from_generated(seg, fn, 24, seed=5, part="ufgs-match", batch_size=8)
    d = s.description
    assert d["num_drawn"] == 24 and d["num_labelled"] + d["num_skipped"] == 24 and 0 < d["num_skipped"] < 24
    assert len(s) == d["num_labelled"] and s.num_unlabelled() == 0 and s.num_clusters == 4
    lat, _ = evaluation_latents(gen, 5, 24, part="ufgs-match")
    full = seg.segment_latents(lat)
    keep = ~np.all(_labeller_skipping_red_corners(full["images"]) == 255, axis=(1, 2))
    np.testing.assert_array_equal(s.latents, lat[keep])
    np.testing.assert_array_equal(s.cluster_labels, full["labels"][keep])
    np.testing.assert_array_equal(s.images, full["images"][keep])
    np.testing.assert_array_equal(s.labels, syn.true_labels(full["images"][keep]))
    # matching and test sets come from disjoint stream parts
    t = ul.from_generated(seg, fn, 8, seed=5, part="ufgs-test", batch_size=8)
    assert count_overlap(s.latents, t.latents) == 0
    with pytest.raises(EvaluationError, match="equal excluded latents"):
        ul.from_generated(seg, fn, 8, seed=5, part="ufgs-test", batch_size=8, exclude_latents=t.latents)
    npz = str(tmp_path / "file.npz")
    np.savez(npz, images=s.images, latents=s.latents, labels=s.labels)
    with pytest.raises(EvaluationError, match="not a labeller"):
        ul.from_generated(seg, npz, 4, seed=0)
    # a labels file of the same generator gets the segmenter's cluster maps too
    f = ul.load_labelled(npz, segmenter=seg, ignore_label=255)
    np.testing.assert_array_equal(f.cluster_labels, s.cluster_labels)
    np.testing.assert_array_equal(f.latents, s.latents)


# -- the launch script -------------------------------------------------------------------------


def _load_cli():
    sys.path.insert(0, LAUNCH)
    try:
        spec = importlib.util.spec_from_file_location("_evaluate_segmenter_cli",
                                                      os.path.join(LAUNCH, "evaluate_segmenter.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(LAUNCH)
    return mod


class _StandInSegmenter:
    """What the merge-time wiring returns: ``.predict`` and ``.num_classes``."""

    num_classes = 5
    resolution = 16
    predict = staticmethod(_nearest_colour(CLUSTER_COLOURS))


def test_cli_on_a_labelled_folder_with_stand_in_networks(rng, tmp_path, monkeypatch, capsys):
    cli = _load_cli()
    d = tmp_path / "labels"
    os.makedirs(d / "images")
    os.makedirs(d / "masks")
    data, _ = _synthetic_set(rng, 9)
    for i in range(9):
        Image.fromarray(data.images[i]).save(d / "images" / f"{i:02d}.png")
        Image.fromarray(data.labels[i].astype(np.uint8), mode="L").save(d / "masks" / f"{i:02d}.png")
    (d / "classes.txt").write_text("\n".join(CLASS_NAMES))
    model = tmp_path / "model"
    os.makedirs(model)
    (model / "model.json").write_text(json.dumps({"arch": "stand-in"}))
    seen = {}
    monkeypatch.setattr(cli, "load_ufgs_predictor", lambda model_dir, mesh: _StandInSegmenter())

    def trainer(arch, steps, batch_size, resolution, mesh, model_kwargs=None):
        seen.update(arch=arch, steps=steps, batch_size=batch_size, resolution=resolution)
        return _colour_trainer()

    monkeypatch.setattr(cli, "make_few_shot_trainer", trainer)
    out = tmp_path / "eval"
    argv = ["--model", str(model), "--labels", str(d), "--num-match", "1,3", "--repeats", "2", "--match-pool", "4",
            "--few-shot-steps", "7", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert seen == {"arch": "stand-in", "steps": 7, "batch_size": 8, "resolution": 16}
    res = json.load(open(out / "results.json"))
    assert res["num_match"] == [1, 3] and res["match_pool"]["num_images"] == 4 and res["test_set"]["num_images"] == 5
    assert {r["method"] for r in res["rows"]} == {"ufgs", "few_shot"}
    assert next(r for r in res["rows"] if r["method"] == "ufgs" and r["num_match"] == 3)["miou"]["values"]
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["inputs"]["k"] == 5 and manifest["few_shot"]["steps"] == 7
    assert set(manifest["files"]) == set(ue.REPORT_FILES)
    assert "## Tab. 5: mIoU" in capsys.readouterr().out
    # user errors are one line and exit status 2
    assert cli.main(argv[:2] + ["--labels", str(d), "--k", "4", "--out", str(out), "--quiet"]) == 2
    assert "the UFGS segmenter predicts 5 clusters" in capsys.readouterr().err
    assert cli.main(["--model", str(model), "--labels", "faces", "--quiet", "--out", str(out)]) == 2
    assert "give the KLiSH run (--run)" in capsys.readouterr().err


def test_cli_help_and_missing_model(tmp_path):
    text = _load_cli().build_parser().format_help()
    for flag in ("--model", "--run", "--k", "--labels", "--match-labels", "--num-match", "--repeats", "--num-test",
                 "--few-shot-steps", "--few-shot-arch", "--seed", "--devices", "--out", "--no-progress", "--quiet"):
        assert flag in text, flag
    script = os.path.join(LAUNCH, "evaluate_segmenter.py")
    r = subprocess.run([sys.executable, script, "--model", str(tmp_path / "nope"), "--labels", "faces"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --model") and len(r.stderr.splitlines()) == 1


# -- slow: the bundled DCGAN with the faces labeller, the CLI on a synthetic KLiSH run ------------------------


@pytest.mark.slow
def test_faces_sets_from_the_bundled_dcgan():
    pytest.importorskip("dlib", reason="needs the faces extra: pip install 'gansem[faces]'")
    from gansem.references import faces
    from gansem.zoo import load_generator

    gen, params, _ = load_generator("dcgan-digiface")
    layers = tuple(select_feature_layers(gen.feature_layers(), 1000))
    W = np.asarray(jax.random.normal(jax.random.key(1), (6, sum(l.channels for l in layers))), np.float32)
    seg = Segmenter(gen, params, layers, W, np.zeros(6, np.float32), 6)
    pool, test = ul.evaluation_sets("faces", segmenter=seg, num_match_pool=16, num_test=24, seed=0, batch_size=8)
    for s, n in ((pool, 16), (test, 24)):
        d = s.description
        assert d["num_drawn"] == n and d["num_labelled"] + d["num_skipped"] == n and d["num_labelled"] >= 0.6 * n
        assert s.class_names == faces.CLASS_NAMES and s.ignore_label == faces.IGNORE and s.num_unlabelled() == 0
        assert s.images.shape[1:] == (64, 64, 3) and s.cluster_labels.shape == s.labels.shape
    assert count_overlap(pool.latents, test.latents) == 0
    table = ue.ufgs_table(pool, test, few_shot_trainer=_colour_trainer(), num_match=(1, 10), repeats=2, seed=0)
    res = table.results
    assert res["num_classes"] == 7 and res["methods"] == ["klish", "few_shot"] and res["num_clusters"] == 6
    for r in res["rows"]:
        assert 0.0 < r["miou"]["mean"] < 1.0 and len(r["miou"]["values"]) == 2
    assert res["test_set"]["num_skipped"] == test.description["num_skipped"]


def _true_labels_segmenter():
    class Net:
        num_classes = 3
        resolution = 16
        predict = staticmethod(syn.true_labels)

    return Net()


@pytest.mark.slow
def test_cli_with_generated_labels_on_a_synthetic_klish_run(tmp_path, monkeypatch):
    from gansem.generators import save_checkpoint
    from gansem.pipeline import KlishJobConfig, run_klish_job

    gen, params, _ = syn.builtin_generator("synthetic-bands")
    ck = save_checkpoint(str(tmp_path / "ck"), gen.replace(size=16), params, name="synthetic-bands-16")
    run_dir = str(tmp_path / "run")
    run_klish_job(KlishJobConfig.paper(generator=ck, num_images=2, resolution=8, k0=5, seed=0, svm_max_iter=200),
                  run_dir, devices=1, progress=False, quiet=True, num_vis=1)
    model = tmp_path / "model"
    os.makedirs(model)
    (model / "model.json").write_text(json.dumps({"klish_run": run_dir, "arch": "stand-in"}))
    cli = _load_cli()
    monkeypatch.setattr(cli, "load_ufgs_predictor", lambda model_dir, mesh: _true_labels_segmenter())
    monkeypatch.setattr(cli, "make_few_shot_trainer", lambda *a, **kw: _colour_trainer())
    out = tmp_path / "eval"
    assert cli.main(["--model", str(model), "--labels", "gansem.generators.synthetic:true_labels", "--num-match",
                     "1,4", "--repeats", "2", "--match-pool", "6", "--num-test", "10", "--few-shot-steps", "3",
                     "--out", str(out), "--no-progress", "--quiet"]) == 0
    res = json.load(open(out / "results.json"))
    assert res["methods"] == ["ufgs", "klish", "few_shot"] and res["num_clusters"] == 3
    rows = {(r["method"], r["num_match"]): r for r in res["rows"]}
    assert rows[("ufgs", 4)]["miou"]["mean"] == 1.0  # the stand-in predicts the true bands
    # the KLiSH rows, recomputed from the run's classifier on the same stream samples and draws
    seg = Segmenter.from_run(run_dir, k=3)
    pool = seg.segment_latents(evaluation_latents(seg.generator, 0, 6, part="ufgs-match")[0])
    test = seg.segment_latents(evaluation_latents(seg.generator, 0, 10, part="ufgs-test")[0])
    test_set = ul.LabelledImages(test["images"], syn.true_labels(test["images"]), syn.CLASS_NAMES)
    for m in (1, 4):
        for idx, value in zip(res["draws"][str(m)], rows[("klish", m)]["miou"]["values"]):
            a = ue.match_clusters(pool["labels"][idx], syn.true_labels(pool["images"][idx]), 3, 6)
            assert value == pytest.approx(ue.per_class_iou(test["labels"], test_set, a).miou, abs=1e-12)
    assert res["test_set"]["kind"] == "generated" and res["test_set"]["part"] == "ufgs-test"
    assert res["match_pool"]["part"] == "ufgs-match" and res["match_pool"]["num_images"] == 6
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["inputs"]["klish_run"] == os.path.abspath(run_dir)
    assert manifest["inputs"]["klish_run_from"] == "model.json 'klish_run'"


def test_the_few_shot_trainer_trains_the_real_network_on_m_images_with_ignored_pixels(rng):
    """The launch script's trainer: ``fit_segmenter`` on M labelled images (-1 = unlabelled), other sizes resized."""
    cli = _load_cli()
    data, _ = _synthetic_set(rng, 3, ignore=True)
    images = [data.images[0], data.images[1], np.asarray(Image.fromarray(data.images[2]).resize((24, 24)))]
    maps = np.where(data.labels == 255, -1, data.labels)  # how ufgs_table hands unlabelled pixels to a trainer
    labels = [maps[0], maps[1], np.asarray(Image.fromarray(maps[2]).resize((24, 24), Image.NEAREST))]
    assert min(int(np.min(lab)) for lab in labels) == -1
    train = cli.make_few_shot_trainer("unet", 2, 2, 16, None, model_kwargs={"features": [4, 8]})
    predict = train(images, labels, data.num_classes, 0)
    out = predict(np.stack(images[:2]))
    assert out.shape == (2, 16, 16) and out.dtype == np.int32
    assert out.min() >= 0 and out.max() < data.num_classes
