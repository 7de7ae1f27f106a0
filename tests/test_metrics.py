"""Tests for gansem.metrics against scikit-learn and independent numpy re-implementations."""

import itertools

import numpy as np
import pytest

skm = pytest.importorskip("sklearn.metrics")
try:  # private scikit-learn helper, used only as an independent reference
    from sklearn.metrics.cluster._expected_mutual_info_fast import expected_mutual_information
except ImportError:  # pragma: no cover
    expected_mutual_information = None

from gansem import metrics as gm  # noqa: E402


def reference_table(pred, ref, num_pred, num_ref, ignore=None):
    """Independent count: sklearn's confusion matrix over a common label range."""
    pred, ref = np.ravel(pred), np.ravel(ref)
    if ignore is not None:
        keep = ref != ignore
        pred, ref = pred[keep], ref[keep]
    n = max(num_pred, num_ref)
    return skm.confusion_matrix(ref, pred, labels=np.arange(n))[:num_ref, :num_pred]


def labels_from_table(t):
    """Expand a contingency table back into (ref, pred) label vectors."""
    m, k = np.nonzero(t)
    counts = t[m, k]
    return np.repeat(m, counts), np.repeat(k, counts)


# ------------------------------------------------------------------------------------
# contingency tables
# ------------------------------------------------------------------------------------


def test_contingency_matches_confusion_matrix_with_ignore(rng):
    pred = rng.integers(0, 7, (4, 9, 11))
    ref = rng.integers(0, 5, (4, 9, 11))
    ref[rng.random(ref.shape) < 0.2] = 255
    t = gm.contingency(pred, ref, 7, 6, ignore_label=255)  # class 5 exists but is empty
    np.testing.assert_array_equal(t, reference_table(pred, ref, 7, 6, ignore=255))
    assert t.dtype == np.int64 and t.shape == (6, 7) and t[5].sum() == 0
    per = gm.contingency(pred, ref, 7, 6, ignore_label=255, per_image=True)
    assert per.shape == (4, 6, 7)
    for i in range(4):
        np.testing.assert_array_equal(per[i], reference_table(pred[i], ref[i], 7, 6, ignore=255))


def test_contingency_minus_one_ignored_and_1d(rng):
    pred = rng.integers(0, 3, 500)
    ref = rng.integers(-1, 4, 500)
    t = gm.contingency(pred, ref, 3, 4, ignore_label=-1)
    np.testing.assert_array_equal(t, reference_table(pred, ref, 3, 4, ignore=-1))


def test_contingency_rejects_out_of_range_labels(rng):
    pred = rng.integers(0, 3, (2, 4, 4))
    ref = rng.integers(0, 3, (2, 4, 4))
    ref[0, 0, 0] = 255
    with pytest.raises(ValueError, match="ignore_label"):
        gm.contingency(pred, ref, 3, 3)
    pred[1, 1, 1] = 7
    with pytest.raises(ValueError, match="num_pred"):
        gm.contingency(pred, ref, 3, 3, ignore_label=255)
    with pytest.raises(TypeError, match="integer labels"):
        gm.contingency(pred.astype(np.float32) + 0.5, ref, 3, 3)
    with pytest.raises(ValueError, match="same shape"):
        gm.contingency(pred[:1], ref, 3, 3)


def test_streaming_accumulator_equals_one_shot(rng):
    pred = rng.integers(0, 6, (10, 8, 8))
    ref = rng.integers(0, 4, (10, 8, 8))
    ref[ref == 3] = 255
    acc = gm.ContingencyAccumulator(6, 4, ignore_label=255, keep_per_image=True)
    for s in [slice(0, 3), slice(3, 4), slice(4, 10)]:
        acc.update(pred[s], ref[s])
    np.testing.assert_array_equal(acc.table, gm.contingency(pred, ref, 6, 4, ignore_label=255))
    np.testing.assert_array_equal(acc.table, reference_table(pred, ref, 6, 4, ignore=255))
    np.testing.assert_array_equal(
        acc.per_image_tables, gm.contingency(pred, ref, 6, 4, ignore_label=255, per_image=True)
    )
    assert acc.num_images == 10
    assert acc.num_ignored == int((ref == 255).sum())
    # single images [H, W] are accepted too
    acc2 = gm.ContingencyAccumulator(6, 4, ignore_label=255)
    for i in range(10):
        acc2.update(pred[i], ref[i])
    np.testing.assert_array_equal(acc2.table, acc.table)
    with pytest.raises(ValueError, match="keep_per_image"):
        acc2.per_image_tables


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [None, 1, 8])
def test_device_contingency_matches_host(rng, num_devices):
    from gansem import sharding

    mesh = None if num_devices is None else sharding.make_mesh(num_devices)
    pred = rng.integers(0, 7, (3, 13, 10))
    ref = rng.integers(0, 5, (3, 13, 10))
    ref[rng.random(ref.shape) < 0.1] = 255
    host = reference_table(pred, ref, 7, 5, ignore=255)
    np.testing.assert_array_equal(gm.contingency_device(pred, ref, 7, 5, ignore_label=255, mesh=mesh), host)
    per = gm.contingency_device(pred, ref, 7, 5, ignore_label=255, mesh=mesh, per_image=True)
    for i in range(3):
        np.testing.assert_array_equal(per[i], reference_table(pred[i], ref[i], 7, 5, ignore=255))
    acc = gm.ContingencyAccumulator(7, 5, ignore_label=255, backend="jax", mesh=mesh)
    acc.update(pred[:2], ref[:2])
    acc.update(pred[2:], ref[2:])
    np.testing.assert_array_equal(acc.table, host)
    with pytest.raises(ValueError, match="outside"):
        gm.contingency_device(pred, ref, 7, 5, mesh=mesh)


# ------------------------------------------------------------------------------------
# ARI / NMI / AMI vs scikit-learn
# ------------------------------------------------------------------------------------


def _cases():
    r = np.random.default_rng(1)
    cases = {}
    a = r.integers(0, 5, 2000)
    cases["random"] = (a, r.integers(0, 7, 2000), 5, 7)
    cases["permutation"] = (a, np.array([3, 0, 4, 1, 2])[a], 5, 5)
    cases["split"] = (a, a * 2 + r.integers(0, 2, a.size), 5, 10)  # every class split in two
    cases["merge"] = (a, a // 2, 5, 3)  # pairs of classes merged
    noisy = np.where(r.random(a.size) < 0.3, r.integers(0, 5, a.size), a)
    cases["noisy"] = (a, noisy, 5, 5)
    cases["one_cluster"] = (a, np.zeros_like(a), 5, 1)
    cases["one_class"] = (np.zeros(300, int), r.integers(0, 4, 300), 1, 4)
    cases["both_single"] = (np.zeros(300, int), np.zeros(300, int), 1, 1)
    ref = r.integers(0, 15, 30000)
    cases["many_100x15"] = (ref, (ref * 7 + r.integers(0, 12, ref.size)) % 100, 15, 100)
    cases["empty_classes"] = (r.choice([0, 2, 5], 1000), r.choice([1, 3, 4, 8], 1000), 7, 10)
    cases["each_own_cluster"] = (r.integers(0, 3, 200), np.arange(200), 3, 200)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_ari_nmi_ami_match_sklearn(name):
    ref, pred, m, k = CASES[name]
    t = gm.contingency(pred, ref, k, m)
    assert gm.adjusted_rand_index(t) == pytest.approx(skm.adjusted_rand_score(ref, pred), abs=1e-6)
    assert gm.normalized_mutual_info(t) == pytest.approx(skm.normalized_mutual_info_score(ref, pred), abs=1e-6)
    res = gm.adjusted_mutual_info(t)
    assert res.method == "exact"
    assert res.ami == pytest.approx(skm.adjusted_mutual_info_score(ref, pred), abs=1e-6)
    assert gm.mutual_info(t) == pytest.approx(skm.mutual_info_score(ref, pred), abs=1e-9)
    # per-image stacks are summed over images
    half = t // 2
    stack = np.stack([half, t - half])
    assert gm.adjusted_rand_index(stack) == gm.adjusted_rand_index(t)


def test_ari_exact_for_billions_of_pixels():
    """Integer pair counting; compare with a float128-free closed form in Python ints."""
    t = np.array([[2_000_000_000, 10_000_000], [30_000_000, 600_000_000]], np.int64)
    c2 = lambda x: x * (x - 1) // 2  # noqa: E731
    s_ij = sum(c2(int(v)) for v in t.ravel())
    s_a = sum(c2(int(v)) for v in t.sum(1))
    s_b = sum(c2(int(v)) for v in t.sum(0))
    n2 = c2(int(t.sum()))
    from fractions import Fraction

    exp = Fraction(s_a * s_b, n2)
    ari = (s_ij - exp) / (Fraction(s_a + s_b, 2) - exp)
    assert gm.adjusted_rand_index(t) == pytest.approx(float(ari), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_emi_matches_sklearn_for_large_counts(seed):
    if expected_mutual_information is None:
        pytest.skip("scikit-learn's private expected_mutual_information moved")
    r = np.random.default_rng(seed)
    t = r.multinomial(400_000, r.dirichlet(np.ones(12) * 0.5)).reshape(3, 4)
    ours = gm.expected_mutual_info(t, method="exact")
    theirs = expected_mutual_information(t, int(t.sum()))
    assert ours.method == "exact" and ours.error_bound == 0.0
    assert ours.value == pytest.approx(theirs, rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tol", [1e-2, 1e-5, 1e-12])
def test_truncated_emi_within_stated_bound(seed, tol):
    r = np.random.default_rng(seed)
    m, k = 3 + seed, 4 + 2 * seed
    t = r.multinomial(300_000, r.dirichlet(np.ones(m * k) * 0.7)).reshape(m, k)
    exact = gm.expected_mutual_info(t, method="exact")
    trunc = gm.expected_mutual_info(t, method="truncated", tol=tol)
    assert trunc.method == "truncated"
    assert trunc.work < exact.work / 3  # the windows really were cut
    assert trunc.error_bound <= tol * (1 + 1e-9)
    assert abs(trunc.value - exact.value) <= trunc.error_bound + 1e-12 * max(exact.value, 1e-3)
    a_exact = gm.adjusted_mutual_info(t, method="exact")
    a_trunc = gm.adjusted_mutual_info(t, method="truncated", tol=tol)
    assert abs(a_trunc.ami - a_exact.ami) <= a_trunc.ami_error_bound + 1e-12


def test_ami_auto_switches_and_reports_method(rng):
    t = rng.multinomial(200_000, np.ones(20) / 20).reshape(4, 5)
    ref, pred = labels_from_table(t)
    expected = skm.adjusted_mutual_info_score(ref, pred)
    small = gm.adjusted_mutual_info(t, exact_work_limit=10**9)
    big = gm.adjusted_mutual_info(t, exact_work_limit=10)
    assert small.method == "exact" and big.method == "truncated"
    assert big.emi_error_bound <= 1e-12
    assert small.ami == pytest.approx(expected, abs=1e-6)
    assert big.ami == pytest.approx(expected, abs=1e-6)


def test_ami_scaled_is_exact_ami_of_floored_table(rng):
    t = rng.multinomial(3_000_000, rng.dirichlet(np.ones(12))).reshape(3, 4)
    res = gm.adjusted_mutual_info(t, method="scaled", scale=1000)
    ref, pred = labels_from_table(t // 1000)
    assert res.method == "scaled" and res.scale == 1000 and np.isnan(res.emi_error_bound)
    assert res.ami == pytest.approx(skm.adjusted_mutual_info_score(ref, pred), abs=1e-6)


def test_metric_inputs_validated():
    with pytest.raises(ValueError, match="method"):
        gm.adjusted_mutual_info(np.eye(2, dtype=int), method="fast")
    with pytest.raises(ValueError, match="integer counts"):
        gm.adjusted_rand_index(np.array([[0.5, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="shape"):
        gm.normalized_mutual_info(np.ones(3, int))


# ------------------------------------------------------------------------------------
# greedy maximum-matching mIoU (Algorithm 2)
# ------------------------------------------------------------------------------------


def independent_iou(table, assignment, average):
    """Per-class IoU by explicit loops (images x classes), mean over images with union > 0."""
    t = np.asarray(table, float)
    if t.ndim == 2:
        t = t[None]
    if average == "dataset":
        t = t.sum(0, keepdims=True)
    M = t.shape[1]
    out = np.zeros(M)
    for m in range(M):
        vals = []
        members = [k for k, a in enumerate(assignment) if a == m]
        for img in t:
            inter = img[m, members].sum()
            union = img[m].sum() + img[:, members].sum() - inter
            if union > 0:
                vals.append(inter / union)
        out[m] = np.mean(vals) if vals else 0.0
    return out


def naive_algorithm2(table, average):
    """Algorithm 2 written directly: try every (cluster, class) pair, recompute J from scratch."""
    t = np.asarray(table)
    K = t.shape[-1]
    M = t.shape[-2]
    a = [-1] * K
    for _ in range(K):
        best, best_j = None, -np.inf
        for m in range(M):
            for k in range(K):
                if a[k] != -1:
                    continue
                cand = list(a)
                cand[k] = m
                j = independent_iou(t, cand, average).sum()
                if j > best_j + 1e-12:
                    best, best_j = (k, m), j
        a[best[0]] = best[1]
    return np.array(a), independent_iou(t, a, average).sum() / M


def test_greedy_recovers_permutation():
    perm = np.array([2, 0, 3, 1])
    t = np.zeros((4, 4), int)
    t[perm, np.arange(4)] = [50, 20, 70, 10]
    res = gm.greedy_matching_miou(t)
    np.testing.assert_array_equal(res.assignment, perm)
    assert res.miou == pytest.approx(1.0)
    assert res.average == "dataset"


def test_greedy_many_to_one():
    # class 0 is exactly clusters 0 + 1; class 1 is cluster 2 (with a little confusion)
    t = np.array([[40, 30, 2], [1, 3, 50]])
    res = gm.greedy_matching_miou(t)
    np.testing.assert_array_equal(res.assignment, [0, 0, 1])
    iou0 = 70 / (72 + 74 - 70)
    iou1 = 50 / (54 + 52 - 50)
    np.testing.assert_allclose(res.per_class_iou, [iou0, iou1])
    assert res.miou == pytest.approx((iou0 + iou1) / 2)


def test_greedy_assigns_every_cluster_even_when_it_hurts():
    # cluster 3 is noise spread over three classes: adding it to class m takes IoU_m from
    # 100/110 to 110/130, so every step that assigns it lowers J.
    t = np.array([[100, 0, 0, 10], [0, 100, 0, 10], [0, 0, 100, 10]])
    full = gm.greedy_matching_miou(t)
    assert (full.assignment >= 0).all()  # Algorithm 2 runs K steps
    a_ref, miou_ref = naive_algorithm2(t, "dataset")
    np.testing.assert_array_equal(full.assignment, a_ref)
    assert full.miou == pytest.approx(miou_ref)
    partial = gm.greedy_matching_miou(t, assign_all=False)
    np.testing.assert_array_equal(partial.assignment, [0, 1, 2, -1])
    assert partial.miou == pytest.approx(100 / 110)
    assert full.assignment[3] == 0  # ties go to the first class
    assert full.miou == pytest.approx((110 / 130 + 2 * 100 / 110) / 3)
    assert partial.miou > full.miou


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("average", ["dataset", "image"])
def test_greedy_equals_naive_algorithm2(seed, average):
    r = np.random.default_rng(seed)
    N, M, K = 4, 3, 6
    t = r.integers(0, 30, (N, M, K)) * (r.random((N, M, K)) < 0.6)
    res = gm.greedy_matching_miou(t, average)
    a_ref, miou_ref = naive_algorithm2(t, average)
    np.testing.assert_array_equal(res.assignment, a_ref)
    assert res.miou == pytest.approx(miou_ref, abs=1e-12)
    np.testing.assert_allclose(
        np.nan_to_num(res.per_class_iou), independent_iou(t, res.assignment, average), atol=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_greedy_reaches_brute_force_optimum_on_separable_tables(seed):
    # every cluster is dominated by one class: the optimum of Eq. 6 is clear and greedy finds it
    r = np.random.default_rng(seed)
    M, K = 3, 6
    owner = r.integers(0, M, K)
    t = r.integers(0, 3, (M, K))
    t[owner, np.arange(K)] += r.integers(50, 100, K)
    best = max(
        independent_iou(t, a, "dataset").sum() / M for a in itertools.product(range(-1, M), repeat=K)
    )
    res = gm.greedy_matching_miou(t)
    assert res.miou == pytest.approx(best, abs=1e-12)
    np.testing.assert_array_equal(res.assignment, owner)


def test_per_image_and_dataset_averaging_differ_as_expected():
    # image 0: big, class 0 perfectly predicted by cluster 0. image 1: tiny, cluster 0 covers
    # class 0 (2 px) plus 6 px of class 1. Cluster 1 is class 1 elsewhere.
    img0 = np.array([[1000, 0], [0, 1000]])
    img1 = np.array([[2, 0], [6, 2]])
    tables = np.stack([img0, img1])
    assign = np.array([0, 1])
    ds = gm.per_class_iou_after_matching(tables, assign, "dataset")
    im = gm.per_class_iou_after_matching(tables, assign, "image")
    np.testing.assert_allclose(ds, [1002 / 1008, 1002 / 1008])
    np.testing.assert_allclose(im, [(1 + 2 / 8) / 2, (1 + 2 / 8) / 2])
    assert (im < ds).all()  # the small bad image weighs as much as the big good one
    assert gm.greedy_matching_miou(tables).average == "image"  # default for [N, M, K]
    assert gm.greedy_matching_miou(tables).miou == pytest.approx(im.mean())
    assert gm.greedy_matching_miou(tables, "dataset").miou == pytest.approx(ds.mean())


def test_class_absent_from_an_image_is_skipped_in_image_average():
    # class 1 appears only in image 0; image 1 has union 0 for class 1 -> not counted
    tables = np.array([[[5, 0], [0, 5]], [[9, 0], [0, 0]]])
    iou = gm.per_class_iou_after_matching(tables, [0, 1], "image")
    np.testing.assert_allclose(iou, [1.0, 1.0])
    # a class with no pixels at all and nothing assigned: nan per class, counts 0 in the mean
    t = np.array([[10, 0], [0, 10], [0, 0]])
    res = gm.greedy_matching_miou(t)
    assert np.isnan(res.per_class_iou[2]) and res.miou == pytest.approx(2 / 3)


def test_greedy_input_validation():
    with pytest.raises(ValueError, match="per-image"):
        gm.greedy_matching_miou(np.ones((2, 3)), "image")
    with pytest.raises(ValueError, match="assignment"):
        gm.per_class_iou_after_matching(np.ones((2, 3)), [0, 1])


def test_clustering_scores_bundle(rng):
    ref = rng.integers(0, 4, (5, 10, 10))
    pred = (ref + (rng.random(ref.shape) < 0.2)) % 6
    per = gm.contingency(pred, ref, 6, 4, per_image=True)
    s = gm.clustering_scores(per)
    assert s.ari == pytest.approx(skm.adjusted_rand_score(ref.ravel(), pred.ravel()), abs=1e-6)
    assert s.ami == pytest.approx(skm.adjusted_mutual_info_score(ref.ravel(), pred.ravel()), abs=1e-6)
    assert s.nmi == pytest.approx(skm.normalized_mutual_info_score(ref.ravel(), pred.ravel()), abs=1e-6)
    assert s.miou == pytest.approx(gm.greedy_matching_miou(per, "image").miou)


# ------------------------------------------------------------------------------------
# foreground / background metrics
# ------------------------------------------------------------------------------------


def _masks(rng, n=6, h=12, w=10):
    ref = rng.random((n, h, w)) < 0.4
    pred = np.where(rng.random((n, h, w)) < 0.25, ~ref, ref)
    return pred, ref


def test_binary_metrics_dataset_match_sklearn(rng):
    pred, ref = _masks(rng)
    m = gm.binary_segmentation_metrics(pred, ref)
    p, r = pred.ravel(), ref.ravel()
    assert m.iou_fg == pytest.approx(skm.jaccard_score(r, p))
    assert m.iou_bg == pytest.approx(skm.jaccard_score(r, p, pos_label=0))
    assert m.miou == pytest.approx(skm.jaccard_score(r, p, average="macro"))
    assert m.f1 == pytest.approx(skm.f1_score(r, p))
    assert m.precision == pytest.approx(skm.precision_score(r, p))
    assert m.recall == pytest.approx(skm.recall_score(r, p))
    assert m.accuracy == pytest.approx(skm.accuracy_score(r, p))


def test_binary_metrics_image_average_and_ignore(rng):
    pred, ref = _masks(rng)
    ref_i = ref.astype(np.uint8)
    ign = rng.random(ref.shape) < 0.1
    ref_i[ign] = 255
    m = gm.binary_segmentation_metrics(pred, ref_i, average="image", ignore_label=255, images_per_chunk=4)
    per = {k: [] for k in ("iou_fg", "iou_bg", "f1", "precision", "recall", "accuracy", "miou")}
    for i in range(pred.shape[0]):
        keep = ~ign[i]
        p, r = pred[i][keep], ref[i][keep]
        per["iou_fg"].append(skm.jaccard_score(r, p))
        per["iou_bg"].append(skm.jaccard_score(r, p, pos_label=0))
        per["miou"].append(skm.jaccard_score(r, p, average="macro"))
        per["f1"].append(skm.f1_score(r, p))
        per["precision"].append(skm.precision_score(r, p))
        per["recall"].append(skm.recall_score(r, p))
        per["accuracy"].append(skm.accuracy_score(r, p))
    for k, v in per.items():
        assert getattr(m, k) == pytest.approx(np.mean(v)), k
    # dataset pooling differs from image averaging in general
    d = gm.binary_segmentation_metrics(pred, ref_i, ignore_label=255)
    assert d.accuracy == pytest.approx(skm.accuracy_score(ref[~ign], pred[~ign]))


def test_binary_metrics_skip_undefined_images():
    # image 1 has no foreground anywhere: its fg IoU/precision/recall are undefined and skipped
    pred = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], bool)
    ref = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], bool)
    m = gm.binary_segmentation_metrics(pred, ref, average="image")
    assert m.iou_fg == pytest.approx(0.5)
    assert m.precision == pytest.approx(1.0)
    assert m.recall == pytest.approx(0.5)
    assert m.iou_bg == pytest.approx((2 / 3 + 1.0) / 2)
    assert m.accuracy == pytest.approx((0.75 + 1.0) / 2)


def reference_max_f(scores, ref, beta2, thresholds, average):
    """Direct evaluation at every threshold, per image (authors' conventions) or pooled."""
    fs = []
    for t in thresholds:
        if average == "image":
            vals = []
            for s, g in zip(scores, ref):
                m = s > t
                tp = np.sum(m & g)
                p = tp / m.sum() if m.sum() else 1.0
                r = tp / g.sum() if g.sum() else 1.0
                vals.append((1 + beta2) * p * r / (beta2 * p + r) if (beta2 * p + r) > 0 else 0.0)
            fs.append(np.mean(vals))
        else:
            fs.append(skm.fbeta_score(ref.ravel(), (scores > t).ravel(), beta=np.sqrt(beta2), zero_division=1.0))
    return np.array(fs)


@pytest.mark.parametrize("average", ["image", "dataset"])
def test_max_f_beta_matches_direct_evaluation(rng, average):
    ref = rng.random((5, 9, 8)) < 0.35
    scores = np.clip(ref * 0.6 + rng.random(ref.shape) * 0.5, 0, 1)
    scores[:, 0, :] = np.arange(8) / 255  # exactly on thresholds: "score > threshold" is strict
    ref[4] = False  # an image with an empty reference
    res = gm.max_f_beta(scores, ref, thresholds=255, average=average, images_per_chunk=2)
    thr = np.arange(1, 255) / 255
    np.testing.assert_allclose(res.thresholds, thr)
    expected = reference_max_f(scores, ref, 0.3, thr, average)
    np.testing.assert_allclose(res.f_beta, expected, atol=1e-12)
    assert res.max_f_beta == pytest.approx(expected.max())
    assert res.threshold == thr[np.argmax(expected)]


def test_max_f_beta_explicit_thresholds_and_validation(rng):
    ref = rng.random((2, 5, 5)) < 0.5
    scores = rng.random((2, 5, 5))
    res = gm.max_f_beta(scores, ref, thresholds=[0.25, 0.5, 0.75], average="dataset")
    expected = reference_max_f(scores, ref, 0.3, [0.25, 0.5, 0.75], "dataset")
    np.testing.assert_allclose(res.f_beta, expected, atol=1e-12)
    with pytest.raises(TypeError, match="floating"):
        gm.max_f_beta(ref.astype(int), ref)
    with pytest.raises(ValueError, match="increasing"):
        gm.max_f_beta(scores, ref, thresholds=[0.5, 0.2])


def test_accumulator_grows_reference_classes_while_streaming():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (4, 5, 5))
    ref = rng.integers(0, 6, (4, 5, 5))
    ref[:2] = np.minimum(ref[:2], 1)  # the first batch only holds classes 0, 1
    ref[3, 0, 0] = 255
    acc = gm.ContingencyAccumulator(3, 1, ignore_label=255, keep_per_image=True, grow_ref=True)
    acc.update(pred[:2], ref[:2])
    assert acc.num_ref == 2
    acc.update(pred[2:], ref[2:])
    m = int(ref[ref != 255].max()) + 1
    assert acc.num_ref == m
    np.testing.assert_array_equal(acc.per_image_tables, gm.contingency(pred, ref, 3, m, per_image=True,
                                                                       ignore_label=255))
    np.testing.assert_array_equal(acc.table, acc.per_image_tables.sum(0))
    with pytest.raises(ValueError, match="outside"):
        gm.ContingencyAccumulator(3, 2).update(pred, ref)  # without grow_ref the classes are fixed
