#!/usr/bin/env python
"""The main job in 1, 2 and 4 processes (jax.distributed over loopback, CPU collectives on gloo).

    python benchmarks/bench_multihost.py --processes 1 2 4 --devices 4 --out results/multihost.json

Every run is ``launch/klish.py`` with the same flags and ``--devices`` devices in total, split
evenly over the processes (each simulates its share). Reported per process count: wall time
of the whole run (the processes start together), each process's peak resident memory (from
the run's ``summary.json``, ``peak_rss_mib``), and whether the trajectory equals the
single-process one bit for bit (merged pairs, ``W``, ``b``). The features are the largest
allocation of a run; each process extracts and holds only its own images' rows, so the
per-process peak falls with the process count (the JAX runtime and the generator are a
fixed cost per process). On one machine all processes share its cores, so wall time does
not show the speed-up separate hosts would give.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n_proc: int, devices: int, out: str, flags: list) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    base = [sys.executable, os.path.join(ROOT, "launch", "klish.py"), *flags, "--devices", str(devices),
            "--out", out, "--no-progress", "--quiet"]
    port = _free_port()
    cmds = [base] if n_proc == 1 else [
        base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n_proc), "--process-id", str(i)]
        for i in range(n_proc)]
    if n_proc == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    t = time.time()
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for c in cmds]
    errs = [p.communicate()[1] for p in procs]
    wall = time.time() - t
    for p, e in zip(procs, errs):
        if p.returncode != 0:
            raise SystemExit(f"{n_proc} process(es) failed (status {p.returncode}):\n{e[-3000:]}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {"processes": n_proc, "devices": devices, "wall_s": wall, "peak_rss_mib": summary["peak_rss_mib"],
            "steps": summary["steps"], "pixels": summary["pixels"], "timings": summary["timings"]}


def same_trajectory(a: str, b: str) -> bool:
    from gansem.checkpoint import load_trajectory

    ta, tb = load_trajectory(a), load_trajectory(b)
    return len(ta) == len(tb) and all(
        (ra.k, ra.p, ra.q) == (rb.k, rb.p, rb.q) and np.array_equal(ra.W, rb.W) and np.array_equal(ra.b, rb.b)
        for ra, rb in zip(ta, tb))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4], help="process counts to run")
    p.add_argument("--devices", type=int, default=4, help="devices in total (a multiple of every process count)")
    p.add_argument("--num-images", type=int, default=256, help="launch/klish.py --num-images")
    p.add_argument("--resolution", type=int, default=16, help="launch/klish.py --resolution")
    p.add_argument("--k0", type=int, default=20,
                   help="launch/klish.py --k0 (small: the merge loop's length does not change the memory peak)")
    p.add_argument("--workdir", default="runs/bench-multihost", help="where the run directories go (replaced)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    flags = ["--num-images", str(args.num_images), "--resolution", str(args.resolution), "--k0", str(args.k0)]
    rows, results = [], []
    for n in args.processes:
        d = os.path.join(args.workdir, f"p{n}")
        if os.path.isdir(d):
            import shutil

            shutil.rmtree(d)
        r = run(n, args.devices, d, flags)
        r["same_as_first"] = same_trajectory(d, os.path.join(args.workdir, f"p{args.processes[0]}"))
        results.append(r)
        rows.append([n, args.devices, r["wall_s"], max(r["peak_rss_mib"]), min(r["peak_rss_mib"]),
                     r["same_as_first"]])
    common.print_table(f"main job, {args.num_images} images × {args.resolution}², K0 = {args.k0}",
                       ["processes", "devices", "wall s", "peak RSS max MiB", "peak RSS min MiB",
                        "same trajectory"], rows)
    common.write_json(args.out, {"benchmark": "multihost", "machine": common.machine_info(), "args": vars(args),
                                 "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
