"""Run checkpoints (gansem.checkpoint): a record left without its state is replaced on resume."""

import numpy as np

from gansem.checkpoint import RunCheckpoints, load_trajectory
from gansem.cluster.klish import MergeRecord


def record(k: int, fill: float) -> MergeRecord:
    """A merge record of ``k`` clusters in 3 dimensions, every weight ``fill``."""
    return MergeRecord(k=k, W=np.full((k, 3), fill, np.float32), b=np.zeros(k, np.float32),
                       iou=np.ones(k, np.float32), ecos=np.eye(k, dtype=np.float32), p=k - 1, q=0,
                       sizes=np.ones(k, np.int32), svm_iters=1, svm_converged=True, svm_stop_reason="weight_change",
                       objective=0.5, merged_ids=(0, k - 1, 2 * k))


def test_rewriting_a_step_replaces_its_record(tmp_path):
    # A run killed after writing record 2 but before state 2 resumes from state 1 and writes step 2 again.
    ck = RunCheckpoints(str(tmp_path))
    state = {"W": np.zeros((2, 3), np.float32)}
    ck.save_step(1, record(3, 1.0), state)
    ck.save_step(2, record(2, -1.0), state)
    ck.save_step(2, record(2, 10.0), state)
    ck.close()
    traj = load_trajectory(str(tmp_path))
    assert [r.k for r in traj] == [3, 2] and all(isinstance(r, MergeRecord) for r in traj)
    np.testing.assert_array_equal(traj[1].W, np.full((2, 3), 10.0, np.float32))
    assert traj[0].merged_ids == (0, 2, 6) and traj[0].svm_stop_reason == "weight_change"
