"""Several processes on jax.distributed (CPU collectives over gloo on 127.0.0.1).

Each process runs ``launch/klish.py`` with its share of the devices; the trajectory must be
the one a single process computes with the same device count, bit for bit, and a killed
process must be reported by the others and the run must continue with ``--resume``.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gansem.checkpoint import load_trajectory
from gansem.pipeline import KlishJobConfig, run_klish_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_images=3, resolution=8, k0=12, seed=3, svm_max_iter=500)
FLAGS = ["--num-images", "3", "--resolution", "8", "--k0", "12", "--seed", "3", "--svm-max-iter", "500"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n_proc: int, devices: int, out: str, extra=(), heartbeat: int = 100):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each process simulates its own share of --devices
    port = _free_port()
    procs = []
    for i in range(n_proc):
        args = [sys.executable, "launch/klish.py", *FLAGS, "--devices", str(devices), "--out", out,
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n_proc), "--process-id", str(i),
                "--heartbeat-timeout", str(heartbeat), "--no-progress", "--quiet", *extra]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _wait(procs, timeout=900):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, err))
    return outs


@pytest.fixture(scope="module")
def single4(tmp_path_factory):
    """The reference: one process, 4 devices."""
    d = str(tmp_path_factory.mktemp("mh") / "one")
    run_klish_job(KlishJobConfig(**SMALL), d, devices=4, progress=False, quiet=True, vis_ks=None, num_vis=2)
    return load_trajectory(d)


def _assert_same(t, ref):
    assert [(r.k, r.p, r.q) for r in t] == [(r.k, r.p, r.q) for r in ref]
    for a, b in zip(t, ref):
        np.testing.assert_array_equal(a.W, b.W)
        np.testing.assert_array_equal(a.b, b.b)
        np.testing.assert_array_equal(a.iou, b.iou)


@pytest.mark.parametrize("n_proc", [2, 4])
def test_processes_give_the_single_process_trajectory(single4, tmp_path, n_proc):
    out = str(tmp_path / f"p{n_proc}")
    for rc, err in _wait(_spawn(n_proc, 4, out)):
        assert rc == 0, err[-3000:]
    _assert_same(load_trajectory(out), single4)
    import json

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["processes"] == n_proc and summary["devices"] == 4 and summary["complete"]
    assert len(summary["peak_rss_mib"]) == n_proc


@pytest.mark.slow
def test_killed_process_is_reported_and_the_run_resumes(single4, tmp_path):
    out = str(tmp_path / "killed")
    procs = _spawn(2, 4, out, heartbeat=10)
    traj_dir = os.path.join(out, "trajectory")
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.isdir(traj_dir) and len([s for s in os.listdir(traj_dir) if s.isdigit()]) >= 2:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "the run finished before it could be interrupted"
    procs[1].send_signal(signal.SIGKILL)
    (rc0, err0), _ = _wait(procs, timeout=300)
    assert rc0 == 3, err0[-3000:]
    assert "lost contact with the other processes" in err0 and "--resume" in err0
    for rc, err in _wait(_spawn(2, 4, out, extra=["--resume"])):
        assert rc == 0, err[-3000:]
    _assert_same(load_trajectory(out), single4)


def test_process_flags_are_checked(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "launch/klish.py", *FLAGS, "--out", str(tmp_path / "x"),
                        "--coordinator", "127.0.0.1:1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "go together" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "launch/klish.py", *FLAGS, "--out", str(tmp_path / "x"), "--devices", "3",
                        "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "split evenly" in r.stderr and "Traceback" not in r.stderr
