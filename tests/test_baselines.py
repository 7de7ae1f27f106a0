"""Baselines of the KLiSH paper (K-means, AHC, KASP) as pixel classifiers, checked against scikit-learn."""

import sys

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import adjusted_rand_score, pairwise_distances_argmin  # noqa: E402

import jax  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.cluster import baselines as bl  # noqa: E402


def _blobs(rng, n_per=60, k=4, d=5, spread=0.4, offset=3.0):
    centers = rng.normal(size=(k, d)) * 4.0 + offset
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    return x, y


def test_kmeans_euclidean_classifier_reproduces_sklearn_assignments(rng):
    x = rng.normal(size=(500, 6)).astype(np.float32) * [3, 1, 1, 2, 1, 1] + 2.0
    km = KMeans(7, n_init=2, random_state=0).fit(x)
    clf = bl.kmeans_classifier(km.cluster_centers_, "euclidean")
    assert clf.is_linear and clf.W.shape == (7, 6) and clf.b.shape == (7,)
    np.testing.assert_array_equal(np.asarray(clf.predict(x)), km.predict(x))


def test_kmeans_arccos_classifier_is_max_cosine(rng):
    x = rng.normal(size=(400, 5)).astype(np.float32) + 0.5
    c = rng.normal(size=(6, 5)).astype(np.float32) * rng.uniform(0.2, 5, size=(6, 1))
    clf = bl.kmeans_classifier(c, "cosine")
    np.testing.assert_array_equal(clf.b, 0)
    ref = pairwise_distances_argmin(x, c, metric="cosine")
    np.testing.assert_array_equal(np.asarray(clf.predict(x)), ref)
    # scale invariance in x: the arccos classifier segments features of any norm alike
    np.testing.assert_array_equal(np.asarray(clf.predict(x * 7.3)), ref)


@pytest.mark.slow
def test_fit_kmeans_on_sharded_rows_predicts_nearest_centroid(rng):
    x, _ = _blobs(rng)
    data = sharding.place_rows(x, sharding.make_mesh(8))
    for metric in ("euclidean", "cosine"):
        clf, res = bl.fit_kmeans(jax.random.key(0), data, 4, metric=metric)
        c = np.asarray(res.centroids)
        ref = pairwise_distances_argmin(x, c, metric="euclidean" if metric == "euclidean" else "cosine")
        assert np.mean(np.asarray(clf.predict(x)) == ref) > 0.995  # float ties aside


def test_group_max_matches_numpy(rng):
    s = rng.normal(size=(3, 4, 10)).astype(np.float32)
    groups = np.array([0, 2, 1, 1, 0, 2, 2, 3, 0, 1])
    out = np.asarray(bl.group_max(s, groups, 4))
    ref = np.stack([s[..., groups == g].max(-1) for g in range(4)], -1)
    np.testing.assert_array_equal(out, ref)


def test_kasp_groups_match_spectral_clustering_and_segment_by_nearest_centroid(rng):
    c = np.concatenate([rng.normal(size=(10, 4)) + m for m in (0.0, 6.0, 12.0)]).astype(np.float32)
    for k in (2, 3, 5):
        g = bl.kasp_groups(c, k, seed=3)
        ref = SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=3, assign_labels="discretize",
                                 random_state=3).fit_predict(c)
        assert adjusted_rand_score(ref, g) == pytest.approx(1.0)
        assert set(g.tolist()) == set(range(g.max() + 1))
    clf = bl.fit_kasp(c, [3])[3]
    x = (rng.normal(size=(300, 4)) * 5 + 6).astype(np.float32)
    ref = clf.groups[pairwise_distances_argmin(x, c)]
    np.testing.assert_array_equal(np.asarray(clf.predict(x)), ref)
    with pytest.raises(ValueError, match="kasp-k0"):
        bl.kasp_groups(c, 31)


@pytest.mark.parametrize("linkage", ["ward", "average-cosine"])
def test_ahc_tree_cut_equals_sklearn_per_k(rng, linkage):
    x, _ = _blobs(rng, n_per=40, k=5)
    ks = [2, 5, 9]
    got = bl.ahc_labels(x, ks, linkage=linkage)
    for k in ks:
        if linkage == "ward":
            ref = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        else:
            xn = x / np.linalg.norm(x, axis=1, keepdims=True)
            ref = AgglomerativeClustering(n_clusters=k, linkage="average", metric="cosine").fit_predict(xn)
        assert got[k].max() == k - 1
        assert adjusted_rand_score(ref, got[k]) == pytest.approx(1.0)


def test_cut_tree_hand_built():
    # samples 0..3; merges: (0,1)->4, (2,3)->5, (4,5)->6
    children = np.array([[0, 1], [2, 3], [4, 5]])
    np.testing.assert_array_equal(bl.cut_tree(children, 4, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(bl.cut_tree(children, 4, 3), [0, 0, 1, 2])
    np.testing.assert_array_equal(bl.cut_tree(children, 4, 2), [0, 0, 1, 1])
    np.testing.assert_array_equal(bl.cut_tree(children, 4, 1), [0, 0, 0, 0])


@pytest.mark.slow
@pytest.mark.parametrize("linkage", ["ward", "average-cosine"])
def test_ahc_readout_reproduces_ahc_labels_on_training_pixels(rng, linkage):
    x, _ = _blobs(rng, n_per=50, k=4, spread=0.6)
    fits = bl.fit_ahc(x, [4, 6], linkage=linkage, mesh=sharding.make_mesh(2))
    for k, (clf, lab, r) in fits.items():
        assert clf.is_linear and clf.W.shape == (k, x.shape[1])
        agree = np.mean(np.asarray(clf.predict(x)) == lab)
        assert agree >= 0.95, (k, agree)
        assert r.accuracy == pytest.approx(agree, abs=1e-6)
        if linkage == "average-cosine":
            np.testing.assert_array_equal(clf.b, 0)


@pytest.mark.slow
def test_softmax_regression_agrees_with_sklearn_logistic_regression(rng):
    x = rng.normal(size=(600, 4)).astype(np.float32) * [1, 2, 0.5, 1] + [3, -1, 0, 2]
    w = rng.normal(size=(3, 4))
    y = np.argmax((x - x.mean(0)) @ w.T + 0.8 * rng.normal(size=(600, 3)), axis=1)
    n = x.shape[0]
    l2 = 1e-2
    preds = []
    for ndev in (1, 8):
        data = sharding.place_rows(x, sharding.make_mesh(ndev))
        r = bl.train_softmax_regression(data, data.place(y.astype(np.int32)), 3, l2=l2, tol=1e-6, max_iter=2000)
        assert r.converged
        preds.append(np.argmax(x @ r.W.T + r.b, 1))
    np.testing.assert_array_equal(preds[0], preds[1])
    # the same objective in sklearn: mean CE + l2/2 |W|^2 on standardised features <=> C = 1 / (n l2)
    z = (x - x.mean(0)) / x.std(0)
    lr = LogisticRegression(C=1.0 / (n * l2), tol=1e-10, max_iter=10000).fit(z, y)
    ref = lr.predict(z)
    assert np.mean(preds[0] == ref) >= 0.995
    np.testing.assert_allclose(r.W * x.std(0), lr.coef_ - lr.coef_.mean(0), atol=2e-3)


def test_missing_sklearn_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[eval\]"):
        bl.require_sklearn()
