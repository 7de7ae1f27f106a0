"""Fidelity settings: the clustering-space map (layer balance, PCA) and held-out IoU/ECoS."""

import json
import os

import jax
import numpy as np
import pytest

from gansem import sharding
from gansem.checkpoint import load_trajectory
from gansem.cluster import klish
from gansem.features import FeatureTransform, fit_feature_transform
from gansem.generators.base import FeatureLayer
from gansem.pipeline import KlishJobConfig, heldout_rows, run_klish_job
from gansem.segment import Segmenter

LAYERS = (FeatureLayer("a", 4, 6, 0), FeatureLayer("b", 8, 3, 1), FeatureLayer("c", 16, 2, 2))


def _features(rng, n=400):
    """Three 'layers' of very different scales (6, 3 and 2 channels)."""
    return np.concatenate([rng.standard_normal((n, 6)) * 10.0 + 3.0, rng.standard_normal((n, 3)),
                           rng.standard_normal((n, 2)) * 0.1], axis=1).astype(np.float32)


def test_layer_balance_gives_every_layer_the_same_variance(rng):
    x = _features(rng)
    tr = fit_feature_transform(x, LAYERS, balance="layer", pca_dim=None)
    z = tr.apply(x)
    shares = [z[:, s:e].var(0).sum() for s, e in ((0, 6), (6, 9), (9, 11))]
    np.testing.assert_allclose(shares, np.mean(shares), rtol=1e-4)


def test_raw_features_without_projection_are_the_identity(rng):
    x = _features(rng)
    tr = fit_feature_transform(x, LAYERS, balance="none", pca_dim=0)
    assert tr.basis is None and np.all(tr.mean == 0) and np.all(tr.scale == 1)
    np.testing.assert_array_equal(tr.apply(x), x)


def test_pca_basis_is_orthonormal_sorted_and_deterministic(rng):
    x = _features(rng)
    tr = fit_feature_transform(x, LAYERS, balance="layer", pca_dim=4)
    np.testing.assert_allclose(tr.basis.T @ tr.basis, np.eye(4), atol=1e-5)
    v = tr.apply(x).var(0)
    assert np.all(np.diff(v) <= 1e-5) and tr.dim == 4
    again = fit_feature_transform(x.copy(), LAYERS, balance="layer", pca_dim=4)
    np.testing.assert_array_equal(again.basis, tr.basis)
    assert fit_feature_transform(x, LAYERS, pca_dim=50).dim == 11  # at most D


def test_classifier_in_clustering_space_equals_its_raw_feature_form(rng, tmp_path):
    x = _features(rng)
    tr = fit_feature_transform(x, LAYERS, balance="layer", pca_dim=5)
    W, b = rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    Wr, br = tr.to_feature_space(W, b)
    assert Wr.shape == (7, 11)
    np.testing.assert_allclose(x @ Wr.T + br, tr.apply(x) @ W.T + b, rtol=1e-4, atol=1e-3)
    tr.save(str(tmp_path / "t.npz"))
    back = FeatureTransform.load(str(tmp_path / "t.npz"))
    for a, c in zip(back, tr):
        np.testing.assert_array_equal(a, c)


def test_bad_transform_arguments(rng):
    x = _features(rng)
    with pytest.raises(ValueError, match="balance"):
        fit_feature_transform(x, LAYERS, balance="pixel")
    with pytest.raises(ValueError, match="channels"):
        fit_feature_transform(x[:, :5], LAYERS)


def test_heldout_rows_mark_the_odd_images():
    m = heldout_rows(2, 0, 16)  # 4 images at 2²
    np.testing.assert_array_equal(m, [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(heldout_rows(2, 3, 9), m[3:9])  # any range of rows, as a process places it


def _blobs(rng, n_per=60):
    centres = np.array([[0, 0], [8, 0], [0, 8], [8, 8]], np.float32)
    x = np.concatenate([c + rng.standard_normal((n_per, 2)).astype(np.float32) for c in centres])
    return x, np.repeat(np.arange(4), n_per)


def _place(x, holdout=None, n_dev=8):
    mesh = sharding.make_mesh(n_dev)
    layout = sharding.plan_rows(x.shape[0], n_dev, max_chunk_rows=64)
    data = sharding.place_rows(x, mesh, layout)
    return data, None if holdout is None else data.place(holdout.astype(np.float32))


def test_cluster_without_heldout_pixels_has_iou_zero_and_merges_first(rng):
    """Held-out statistics: IoU counts only held-out rows, so an unseen cluster has no evidence of separability."""
    x, y = _blobs(rng)
    holdout = (np.arange(x.shape[0]) % 2 == 1) & (y != 3)  # blob 3 never held out
    data, ho = _place(x, holdout)
    state, _ = klish.klish_init(jax.random.key(0), data, 4,
                                filter_clusters=False, holdout=ho)
    _, rec = klish.klish_step(state, data, holdout=ho)
    sizes = np.asarray(rec.sizes)
    unseen = int(np.argmin([np.sum(holdout[np.asarray(state.labels)[: x.shape[0]] == k]) for k in range(4)]))
    assert sizes.sum() == x.shape[0]  # sizes count every pixel
    assert rec.iou[unseen] == 0.0 and rec.p == unseen
    assert np.all(np.delete(rec.iou, unseen) > 0.9)  # the other blobs generalise to their held-out rows


def test_heldout_trajectory_is_device_invariant(rng):
    x, y = _blobs(rng)
    holdout = (np.arange(x.shape[0]) // 20) % 2 == 1
    out = []
    for n_dev in (1, 8):
        data, ho = _place(x, holdout, n_dev)
        recs = klish.run_klish(jax.random.key(3), data, 6, holdout=ho,
                               filter_clusters=False)
        out.append(recs)
    assert [(r.k, r.p, r.q) for r in out[0]] == [(r.k, r.p, r.q) for r in out[1]]
    for a, b in zip(*out):
        np.testing.assert_array_equal(a.W, b.W)
        np.testing.assert_array_equal(a.iou, b.iou)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("fidelity") / "run")
    cfg = KlishJobConfig(num_images=4, resolution=8, k0=12, seed=5, svm_max_iter=500, pca_dim=16)
    summary = run_klish_job(cfg, d, devices=2, progress=False, quiet=True, num_vis=2)
    return d, summary


def test_run_stores_raw_feature_classifiers_of_its_clustering_space(small_run):
    d, summary = small_run
    assert summary["complete"] and summary["clustering_dim"] == 16 and summary["feature_dim"] == 960
    tr = FeatureTransform.load(os.path.join(d, "transform.npz"))
    assert tr.basis.shape == (960, 16)
    traj = load_trajectory(d)
    assert all(np.asarray(r.W).shape == (r.k, 960) for r in traj)
    # the stored classifier is the clustering-space one mapped back: W lies in the span of scale * basis
    W = np.asarray(traj[0].W) / tr.scale
    resid = W - (W @ tr.basis) @ tr.basis.T
    assert np.abs(resid).max() <= 1e-4 * np.abs(W).max()
    seg = Segmenter.from_run(d, k=traj[3].k)
    out = seg.sample(2, seed=9)
    assert out["labels"].shape == (2, 64, 64) and out["labels"].max() < traj[3].k


def test_report_presents_the_selected_k(small_run):
    d, summary = small_run
    report = open(os.path.join(d, "report.md")).read()
    assert "## Selected K" in report and "held-out images" in report
    rows = json.load(open(os.path.join(d, "trajectory.json")))
    k_sel = summary["selected_k"]
    if k_sel is not None:
        first = next(r["k"] for r in rows if r["k"] > 1 and r["min_iou"] >= summary["select_threshold"])
        assert k_sel == first and f"**K = {k_sel}**" in report
        assert k_sel in summary["vis_ks"]
    assert all(0 < r["largest_share"] <= 1 for r in rows)


def test_paper_preset_turns_every_deviation_off():
    cfg = KlishJobConfig.paper(num_images=4)
    assert (cfg.feature_balance, cfg.pca_dim, cfg.holdout) == ("none", 0, False)
    with pytest.raises(ValueError, match="2 images"):
        KlishJobConfig(num_images=1, resolution=8, k0=4).validate()
