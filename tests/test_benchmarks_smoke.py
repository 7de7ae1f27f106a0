"""The speed benchmarks (benchmarks/*.py) run end to end at tiny sizes, so they cannot rot.

Timings at these sizes mean nothing; the tests check that every script runs,
prints its tables and writes JSON with the fields the README refers to, and that
the shared helpers compute what they claim (against numpy / scikit-learn).
"""

import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import common  # noqa: E402


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_maps_used_is_a_fraction_of_the_limit():
    used = common.memory_maps_used()
    with open("/proc/self/maps") as f:
        n = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    assert 0 < used < 1 and abs(used - n / limit) < 50 / limit


def test_baseline_thread_limit_ends_with_its_block():
    """The limit for the baselines must not outlive them: jaxlib's CPU LAPACK runs on scipy's OpenBLAS."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS)
    from threadpoolctl import threadpool_info

    def threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info()}

    before = threads()
    if max(before.values()) < 2:
        pytest.skip("every thread pool already has one thread; a leaked limit would not show")
    with common.baseline_threads(1):
        assert set(threads().values()) == {1}
    after = threads()  # may list more libraries (faiss's, loaded by the block when installed)
    assert {lib: after[lib] for lib in before} == before
    with common.baseline_threads(0):
        assert {lib: threads()[lib] for lib in before} == before


def test_common_helpers(tmp_path, capsys):
    x, y = common.gaussian_mixture(500, 7, k=5, seed=1)
    assert x.shape == (500, 7) and x.dtype == np.float32 and y.shape == (500,)
    assert set(np.unique(y)) <= set(range(5))
    x2, _ = common.gaussian_mixture(500, 7, k=5, seed=1)
    np.testing.assert_array_equal(x, x2)  # deterministic

    calls = []
    out, t = common.time_call(lambda: calls.append(1) or 3, repeats=2)
    assert out == 3 and len(calls) == 3 and len(t["times_s"]) == 2
    assert t["best_s"] == min(t["times_s"]) and t["compile_s"] >= 0
    _, t = common.time_call(lambda: 1, repeats=1, warm=False)
    assert len(t["times_s"]) == 2 and t["compile_s"] == 0

    with common.PeakRSS() as mem:
        blob = np.ones(8 << 20, np.uint8)  # 8 MiB touched
        blob[::4096] = 2
    assert mem.mib > 8
    assert common.ratio(1.0, 4.0) == 0.25 and common.ratio(1.0, 0) is None

    common.print_table("t", ["a", "b"], [["x", 1.5], ["y", None]])
    assert "x" in capsys.readouterr().out
    common.write_json(str(tmp_path / "o.json"), {"a": np.float32(1.5), "b": np.arange(2), "c": np.bool_(True)})
    assert _load(tmp_path / "o.json") == {"a": 1.5, "b": [0, 1], "c": True}


def test_float64_scoring_helpers_match_references(rng):
    import bench_kmeans
    import bench_svm
    from sklearn.cluster import KMeans

    x = rng.standard_normal((300, 5)).astype(np.float32)
    km = KMeans(4, n_init=1, random_state=0).fit(x)
    np.testing.assert_allclose(bench_kmeans.inertia64(x, km.cluster_centers_, block=64), km.inertia_, rtol=1e-5)

    labels = rng.integers(0, 3, 300)
    W = rng.standard_normal((3, 5))
    b = rng.standard_normal(3)
    f = bench_svm.class_objectives64(x, labels, W, b, lam=50.0, block=64)
    s = x.astype(np.float64) @ W.T + b
    for k in range(3):
        y = np.where(labels == k, 1.0, -1.0)
        ref = 50.0 / 300 * np.sum(np.maximum(0, 1 - y * s[:, k]) ** 2) + 0.5 * W[k] @ W[k]
        np.testing.assert_allclose(f[k], ref, rtol=1e-12)


@pytest.mark.slow
def test_bench_kmeans_smoke(tmp_path, capsys):
    import bench_kmeans

    out = tmp_path / "k.json"
    bench_kmeans.main(["--n", "600", "--k", "5", "--iters", "3", "--repeats", "0", "--baseline-threads", "1",
                       "--out", str(out)])
    res = _load(out)
    # Equal work: gansem's greedy init against scikit-learn's, plain k-means++ ("gansem-1") against faiss's.
    if "faiss" in res["results"]:
        assert set(res["results"]) == {"gansem", "gansem-1", "sklearn", "faiss"}
        assert res["pairs"] == {"sklearn": "gansem", "faiss": "gansem-1"}
        assert res["results"]["gansem-1"]["trials"] == 1 == res["results"]["faiss"]["trials"]
        assert set(res["ratios_default_init"]) == {"faiss"}
    else:
        assert set(res["results"]) == {"gansem", "sklearn"} and res["pairs"] == {"sklearn": "gansem"}
    assert res["results"]["gansem"]["trials"] == res["results"]["sklearn"]["trials"] == 2 + int(np.log(5))
    for r in res["results"].values():
        assert r["total_s"] > 0 and r["inertia"] > 0 and 1 <= r["n_iter"] <= 3
    assert res["target"]["gansem_run"] == res["pairs"][res["target"]["fastest_other"]]
    # Same init, same data: every library's Lloyd lands on the same inertia.
    same = res["same_init"]
    for name in same:
        np.testing.assert_allclose(same[name]["inertia"], same["gansem"]["inertia"], rtol=1e-4)
    assert "TARGET" in capsys.readouterr().out
    # --trials: one gansem run, compared with every baseline.
    bench_kmeans.main(["--n", "600", "--k", "5", "--iters", "3", "--repeats", "0", "--trials", "2", "--skip",
                       "sklearn", "--no-same-init", "--out", str(out)])
    res = _load(out)
    assert set(res["results"]) <= {"gansem", "faiss"} and res["results"]["gansem"]["trials"] == 2
    assert all(g == "gansem" for g in res["pairs"].values())


@pytest.mark.slow
def test_bench_matmul_smoke(tmp_path):
    import bench_matmul

    out = tmp_path / "m.json"
    bench_matmul.main(["--n", "512", "--k", "4", "--repeats", "1", "--lloyd-iters", "1", "--out", str(out)])
    res = _load(out)
    assert set(res["results"]) == {"lloyd", "svm_grad", "scores", "svm_hessian"}
    for r in res["results"].values():
        assert r["flops"] > 0 and r["peak_gflops"] > 0


@pytest.mark.slow
def test_bench_svm_smoke(tmp_path):
    import bench_svm

    out = tmp_path / "s.json"
    bench_svm.main(["--n", "400", "--k", "3", "--solvers", "lbfgs", "--max-iter", "50", "--sklearn-classes", "2",
                    "--sklearn-max-iter", "50", "--baseline-threads", "1", "--out", str(out)])
    res = _load(out)
    sk = res["results"]["sklearn"]
    assert sk["extrapolated"] and sk["classes_fitted"] == 2
    assert sk["C"] == pytest.approx(5000.0 / 400)
    assert res["results"]["gansem-lbfgs"]["objective"] > 0
    assert len(res["sklearn_classes"]) == 2


@pytest.mark.slow
def test_bench_trajectory_smoke(tmp_path):
    import bench_trajectory

    out = tmp_path / "t.json"
    bench_trajectory.main(["--n", "300", "--k0", "3", "--no-filter", "--max-iter", "100", "--faithful-steps", "1",
                           "--out", str(out)])
    res = _load(out)
    assert len(res["gansem"]["merges"]) == res["init"]["k_init"]
    assert res["faithful"]["steps_run"] == 1 and not res["faithful"]["complete"]
    assert res["merge_sequences"]["compared_steps"] == 1
    ref = res["exact_reference"]  # the untimed Newton run to tol 1e-7, compared with both procedures
    assert len(ref["merges"]) == res["init"]["k_init"] and len(ref["converged"]) == len(ref["merges"])
    assert 0 <= ref["faithful_agreeing_prefix"] <= 1
    assert ref["gansem_agreeing_prefix"] <= len(ref["merges"])
    assert ref["shared_steps"] == min(ref["gansem_agreeing_prefix"], ref["faithful_agreeing_prefix"])
    if ref["shared_steps"]:
        assert ref["max_w_err_gansem"] >= 0 and ref["max_w_err_faithful"] >= 0
