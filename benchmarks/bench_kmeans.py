#!/usr/bin/env python
"""K-means, K = 100: k-means++ init + 20 Lloyd iterations, gansem vs scikit-learn vs faiss.

    python benchmarks/bench_kmeans.py --data gmm512 --n 100000 --out results/kmeans_gmm512.json

All three run in this process on the same float32 data:

* gansem: ``kmeans_plusplus_init`` then ``lloyd(max_iter=20, tol=0)`` on a
  1-device mesh (``--devices``), run with each baseline's own init algorithm
  so that every comparison is equal work: ``gansem`` is greedy k-means++ with
  ``2 + ln K`` candidates per step (scikit-learn's rule, compared with
  scikit-learn), ``gansem-1`` is plain k-means++ (1 candidate, faiss's init,
  compared with faiss). ``--trials T`` runs only ``gansem`` with T candidates
  and compares it with every baseline.
* scikit-learn: ``KMeans(init='k-means++', n_init=1, max_iter=20,
  algorithm='lloyd', tol=0)``. Its init is timed separately with
  ``sklearn.cluster.kmeans_plusplus`` (the same routine ``KMeans`` calls);
  Lloyd time = fit time - init time.
* faiss: ``faiss.Kmeans(d, 100, niter=20, init_method=KMEANS_PLUS_PLUS,
  max_points_per_centroid=N)`` (no subsampling: every iteration sees all N rows,
  as the others do). Its init (plain k-means++, 1 trial) is timed separately
  with ``faiss.ClusteringInitialization``.

Final inertia is recomputed for every method the same way (float64 numpy,
nearest centroid); k-means++ inertia varies by ~0.4 % between seeds, so compare
means over ``--seeds 5``. The target line uses the faster baseline and its
equal-work gansem run; the line after it compares gansem's default (greedy)
init with the faster baseline as well. A second table ("same init") runs 20 Lloyd iterations of each
library from gansem's init: equal work, and the inertias should agree to ~1e-5.
Scikit-learn (like gansem) stops early at a fixed point (labels unchanged), faiss
always runs ``niter`` iterations; iterations run are reported.

Timing: minimum over ``--repeats`` calls after a first (compiling) call for
gansem; scikit-learn and faiss are timed over ``--repeats`` calls too (no
compile). ``cpu_s`` is process CPU time (user + system, all threads), a steadier
number than wall time on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def inertia64(x: np.ndarray, c: np.ndarray, block: int = 8192) -> float:
    """Sum over rows of the squared distance to the nearest centroid, in float64."""
    c = np.asarray(c, np.float64)
    c_sq = (c * c).sum(1)
    total = 0.0
    for s in range(0, x.shape[0], block):
        xb = x[s:s + block].astype(np.float64)
        d = (xb * xb).sum(1)[:, None] - 2.0 * xb @ c.T + c_sq[None, :]
        total += float(np.maximum(d.min(1), 0.0).sum())
    return total


def timed(fn, repeats, warm):
    """``common.time_call`` plus process CPU time of the best call."""
    cpu = []

    def wrapped():
        t = time.process_time()
        out = common.block(fn())
        cpu.append(time.process_time() - t)
        return out

    out, t = common.time_call(wrapped, repeats, warm=warm)
    times = t["times_s"]
    cpus = cpu[1:] if (warm and len(cpu) > 1) else cpu
    t["cpu_s"] = min(cpus)
    t["wall_s"] = min(times)
    return out, t


def run_gansem(x, args, seed, repeats, trials=None):
    import jax

    from gansem.cluster import kmeans as km

    with common.PeakRSS() as mem:
        t0 = time.perf_counter()
        rows = common.place_data(x, args.devices)
        layout = rows.layout
        place_s = time.perf_counter() - t0
        key = jax.random.key(seed)
        init, t_init = timed(lambda: km.kmeans_plusplus_init(key, rows, args.k, n_trials=trials), repeats, True)
        res, t_lloyd = timed(lambda: km.lloyd(rows, init, max_iter=args.iters, tol=0.0), repeats, True)
    n_iter = int(res.n_iter)
    out = {
        "init_s": t_init["wall_s"], "init_cpu_s": t_init["cpu_s"], "init_compile_s": t_init["compile_s"],
        "lloyd_s": t_lloyd["wall_s"], "lloyd_cpu_s": t_lloyd["cpu_s"], "lloyd_compile_s": t_lloyd["compile_s"],
        "n_iter": n_iter, "per_iter_s": t_lloyd["wall_s"] / max(n_iter, 1),
        "per_iter_cpu_s": t_lloyd["cpu_s"] / max(n_iter, 1),
        "total_s": t_init["wall_s"] + t_lloyd["wall_s"], "total_cpu_s": t_init["cpu_s"] + t_lloyd["cpu_s"],
        "inertia": inertia64(x, np.asarray(res.centroids)), "inertia_float32": float(res.inertia),
        "peak_rss_mib": mem.mib, "peak_rss_exact": mem.exact, "place_s": place_s,
        "layout": {"chunks": layout.num_chunks, "chunk_rows": layout.chunk_rows, "devices": args.devices},
        "trials": trials if trials is not None else 2 + int(np.log(args.k)),
    }
    return out, np.asarray(init)


def run_sklearn(x, args, seed, repeats, init=None):
    """``KMeans(init='k-means++')`` timed as its two parts: ``kmeans_plusplus`` (the routine
    ``KMeans`` calls, same default trials) and ``KMeans(init=those centres)`` (its Lloyd)."""
    from sklearn.cluster import KMeans, kmeans_plusplus

    with common.PeakRSS() as mem:
        if init is None:
            (init_c, _), t_init = timed(lambda: kmeans_plusplus(x, args.k, random_state=seed), repeats, False)
        else:
            init_c, t_init = init, {"wall_s": 0.0, "cpu_s": 0.0}
        km, t_fit = timed(lambda: KMeans(args.k, init=init_c, n_init=1, max_iter=args.iters, tol=0.0,
                                         algorithm="lloyd").fit(x), repeats, False)
    return _summary(x, t_init, t_fit, int(km.n_iter_), km.cluster_centers_, mem, trials=2 + int(np.log(args.k)))


def _summary(x, t_init, t_fit, n_iter, centroids, mem, **extra):
    lloyd_s, lloyd_cpu = t_fit["wall_s"], t_fit["cpu_s"]
    return {
        "init_s": t_init["wall_s"], "init_cpu_s": t_init["cpu_s"], "lloyd_s": lloyd_s, "lloyd_cpu_s": lloyd_cpu,
        "n_iter": n_iter, "per_iter_s": lloyd_s / max(n_iter, 1), "per_iter_cpu_s": lloyd_cpu / max(n_iter, 1),
        "total_s": t_init["wall_s"] + lloyd_s, "total_cpu_s": t_init["cpu_s"] + lloyd_cpu,
        "inertia": inertia64(x, centroids), "peak_rss_mib": mem.mib, "peak_rss_exact": mem.exact, **extra,
    }


def run_faiss(x, args, seed, repeats, init=None):
    """``faiss.Kmeans(init_method=KMEANS_PLUS_PLUS)`` timed as its two parts:
    ``ClusteringInitialization`` (plain k-means++) and ``Kmeans.train(init_centroids=...)``."""
    import faiss

    n, d = x.shape
    x = np.ascontiguousarray(x, np.float32)

    def faiss_init():
        ci = faiss.ClusteringInitialization(d, args.k)
        ci.method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
        ci.seed = seed
        c = np.empty((args.k, d), np.float32)
        ci.init_centroids(n, faiss.swig_ptr(x), faiss.swig_ptr(c))
        return c

    def fit(init_c):
        km = faiss.Kmeans(d, args.k, niter=args.iters, seed=seed, max_points_per_centroid=n + 1, verbose=False)
        km.train(x, init_centroids=init_c)
        return km

    with common.PeakRSS() as mem:
        if init is None:
            init_c, t_init = timed(faiss_init, repeats, False)
        else:
            init_c, t_init = np.ascontiguousarray(init, np.float32), {"wall_s": 0.0, "cpu_s": 0.0}
        km, t_fit = timed(lambda: fit(init_c), repeats, False)
    return _summary(x, t_init, t_fit, len(km.iteration_stats), km.centroids, mem, trials=1,
                    threads=faiss.omp_get_max_threads())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--k", type=int, default=100, help="clusters K (default 100)")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations (default 20)")
    p.add_argument("--trials", type=int, default=None,
                   help="run gansem once, with this many k-means++ candidates per step, against every baseline "
                        "(default: two equal-work runs, 2 + ln K candidates against scikit-learn and 1, plain "
                        "k-means++, against faiss)")
    p.add_argument("--skip", default="", help="comma list of baselines to skip: sklearn,faiss")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="threads for scikit-learn/OpenBLAS/OpenMP and faiss while they run (0: library "
                        "defaults; gansem always runs with the defaults). On a machine shared with other jobs "
                        "OpenBLAS/OpenMP spin-waiting can make 1 thread much faster than 2")
    p.add_argument("--seeds", type=int, default=1,
                   help="init seeds; the inertia reported is the mean over them (timings: first seed)")
    p.add_argument("--no-same-init", action="store_true", help="skip the same-init Lloyd comparison")
    args = p.parse_args(argv)
    common.setup_devices(args.devices)
    skip = {s for s in args.skip.split(",") if s}
    for lib, module in (("sklearn", "sklearn"), ("faiss", "faiss")):
        if lib not in skip and importlib.util.find_spec(module) is None:
            print(f"{lib} is not installed: skipped (bash scripts/setup.sh --bench installs the baselines)")
            skip.add(lib)

    x, data = common.load_data(args)
    print(f"data {data}")
    baselines = [n for n in ("sklearn", "faiss") if n not in skip]
    # gansem variants and the baseline each one is compared with at equal work.
    if args.trials is not None:
        variants = {"gansem": args.trials}
        pair = {b: "gansem" for b in baselines}
    else:
        variants = {"gansem": None}
        if "faiss" in baselines:
            variants["gansem-1"] = 1  # faiss's init: plain k-means++
        pair = {b: ("gansem-1" if b == "faiss" else "gansem") for b in baselines}
    runners = {"sklearn": run_sklearn, "faiss": run_faiss}
    for v, tr in variants.items():
        runners[v] = (lambda x_, a_, s_, r_, tr=tr: run_gansem(x_, a_, s_, r_, trials=tr))
    names = list(variants) + baselines
    seeds = [args.seed + i for i in range(args.seeds)]
    per_seed = {n: [] for n in names}
    init = None
    for i, seed in enumerate(seeds):
        # Timed repeats on the first seed; further seeds run once, for the inertia mean.
        reps = args.repeats if i == 0 else 0
        for n in names:
            with common.baseline_threads(0 if n in variants else args.baseline_threads):
                out = runners[n](x, args, seed, reps)
            if n in variants:
                out, init_s = out
                if n == "gansem" and init is None:
                    init = init_s
            per_seed[n].append(out)
    results = {}
    for n in names:
        r = dict(per_seed[n][0])
        r["inertia_seed0"] = r["inertia"]
        r["inertia_per_seed"] = [o["inertia"] for o in per_seed[n]]
        r["inertia"] = float(np.mean(r["inertia_per_seed"]))
        results[n] = r
    same = {}
    if not args.no_same_init and init is not None and baselines:
        same["gansem"] = {k: results["gansem"][k] for k in ("lloyd_s", "lloyd_cpu_s", "n_iter", "per_iter_s",
                                                            "per_iter_cpu_s")}
        same["gansem"]["inertia"] = results["gansem"]["inertia_seed0"]
        for n in baselines:
            with common.baseline_threads(args.baseline_threads):
                same[n] = runners[n](x, args, args.seed, args.repeats, init=init)

    rows = []
    for name, r in results.items():
        rows.append([name, r["trials"], r["init_s"], r["n_iter"], r["per_iter_s"], r["total_s"], r["total_cpu_s"],
                     r["inertia"], r["peak_rss_mib"]])
    common.print_table(f"K-means K={args.k}, {data['name']} N={data['n']} D={data['d']}: own init + "
                       f"{args.iters} Lloyd iterations (seconds, best of {max(args.repeats, 1)}; "
                       f"inertia: mean of {args.seeds} seed(s))",
                       ["method", "trials", "init_s", "iters", "s/iter", "total_s", "total_cpu_s", "inertia",
                        "peak_MiB"], rows)

    def ratios_of(g, r):
        return {
            "init": common.ratio(g["init_s"], r["init_s"]),
            "per_iter": common.ratio(g["per_iter_s"], r["per_iter_s"]),
            "total": common.ratio(g["total_s"], r["total_s"]),
            "total_cpu": common.ratio(g["total_cpu_s"], r["total_cpu_s"]),
            "inertia": common.ratio(g["inertia"], r["inertia"]),
            "peak_rss": common.ratio(g["peak_rss_mib"], r["peak_rss_mib"]),
        }

    ratios, cross = {}, {}
    rrows = []
    for b in baselines:
        ratios[b] = ratios_of(results[pair[b]], results[b])
        rrows.append([f"{pair[b]} / {b}"] + list(ratios[b].values()))
        if pair[b] != "gansem":  # gansem's default (greedy) init against this baseline too
            cross[b] = ratios_of(results["gansem"], results[b])
            rrows.append([f"gansem / {b}"] + list(cross[b].values()))
    if rrows:
        common.print_table("ratios (gansem / other, equal work first; < 1 is gansem faster, inertia < 1 is "
                           "gansem better)", ["", "init", "s/iter", "total", "total_cpu", "inertia", "peak_rss"],
                           rrows)
    target = None
    if baselines:
        fastest = min(baselines, key=lambda n: results[n]["total_s"])
        target = {
            "fastest_other": fastest,
            "gansem_run": pair[fastest],
            "total_ratio": ratios[fastest]["total"],
            "inertia_ratio": ratios[fastest]["inertia"],
            "met": bool(ratios[fastest]["total"] <= 0.8 and ratios[fastest]["inertia"] <= 1.005),
        }
        print(f"\nTARGET total <= 0.8 x fastest other ({fastest}) at equal work and inertia within +0.5 % "
              f"({pair[fastest]} vs {fastest}): ratio {target['total_ratio']:.3f}, inertia ratio "
              f"{target['inertia_ratio']:.4f} -> {'MET' if target['met'] else 'NOT MET'}")
        if fastest in cross:
            c = cross[fastest]
            target["default_init"] = {"total_ratio": c["total"], "inertia_ratio": c["inertia"]}
            print(f"gansem's default init ({results['gansem']['trials']} candidates per step) vs {fastest}: "
                  f"ratio {c['total']:.3f}, inertia ratio {c['inertia']:.4f}")
    if len(same) > 1:
        srows = [[n, r["n_iter"], r["lloyd_s"], r["per_iter_s"], r["per_iter_cpu_s"], r["inertia"],
                  common.ratio(same["gansem"]["per_iter_s"], r["per_iter_s"]),
                  common.ratio(same["gansem"]["inertia"], r["inertia"])] for n, r in same.items()]
        common.print_table(f"same init (gansem's), {args.iters} Lloyd iterations",
                           ["method", "iters", "lloyd_s", "s/iter", "cpu s/iter", "inertia", "gansem/x s/iter",
                            "gansem/x inertia"], srows)
    payload = {"benchmark": "kmeans", "machine": common.machine_info(), "data": data, "args": vars(args),
               "results": results, "pairs": pair, "ratios": ratios, "ratios_default_init": cross,
               "same_init": same, "target": target}
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
