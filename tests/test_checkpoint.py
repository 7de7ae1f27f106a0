"""Run checkpoints (gansem.checkpoint): a record left without its state is replaced on resume."""

import numpy as np

from gansem.checkpoint import RunCheckpoints, load_trajectory


def test_rewriting_a_step_replaces_its_record(tmp_path):
    # A run killed after writing record 2 but before state 2 resumes from state 1 and writes step 2 again.
    ck = RunCheckpoints(str(tmp_path))
    state = {"W": np.zeros((2, 3), np.float32)}
    ck.save_step(1, {"k": np.int32(3), "x": np.arange(3.0)}, state)
    ck.save_step(2, {"k": np.int32(2), "x": np.full(3, -1.0)}, state)
    ck.save_step(2, {"k": np.int32(2), "x": np.arange(3.0) + 10}, state)
    ck.close()
    traj = load_trajectory(str(tmp_path))
    assert [int(r["k"]) for r in traj] == [3, 2]
    np.testing.assert_array_equal(traj[1]["x"], np.arange(3.0) + 10)
