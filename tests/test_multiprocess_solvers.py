"""K-means, the SVM working-set driver and the softmax read-out across two processes (jax.distributed, CPU).

Two processes with 2 CPU devices each must give the bits of one process with 4
devices: the solvers read back only replicated values, so no process needs rows
that its devices do not hold. The worker is ``tests/multiprocess_solvers.py``.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_solvers.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, process_id=0, num_processes=1, devices=4, port=0):
    cmd = [sys.executable, WORKER, str(out), "--process-id", str(process_id), "--num-processes",
           str(num_processes), "--devices", str(devices), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_give_the_bits_of_one(tmp_path):
    port = _free_port()
    procs = [_run(tmp_path / f"p{i}.npz", i, 2, devices=2, port=port) for i in range(2)]
    single = _run(tmp_path / "one.npz", devices=4)
    for p in procs + [single]:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-4000:]
    one = np.load(tmp_path / "one.npz")
    assert one["svm_lbfgs_rows"].max() < 3000  # working sets smaller than the data: selection exercised
    covered = []
    for i in range(2):
        part = np.load(tmp_path / f"p{i}.npz")
        start, stop = int(part["rows_start"]), int(part["rows_stop"])
        covered.append((start, stop))
        for key in one.files:
            if key.startswith("rows_"):
                continue
            want = one[key][start:stop] if key == "km_labels" else one[key]
            np.testing.assert_array_equal(part[key], want, err_msg=key)
    assert covered == [(0, covered[0][1]), (covered[0][1], 3000)]  # each process held its own half
