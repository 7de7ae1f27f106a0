"""The run object's trajectory helpers and generator settings."""

import numpy as np
import pytest

from gansem.cluster.klish import MergeRecord
from gansem.generators import GeneratorError
from gansem.generators.dcgan import DCGAN
from gansem.generators.stylegan2 import StyleGAN2
from gansem.run import RunError, classifier_at, jsonable, k_for_threshold, trajectory_ks
from gansem.segment import SegmentError
from gansem.segment import classifier_at as seg_classifier_at


def _records(d=3):
    rng = np.random.default_rng(0)
    out = []
    for k, miou in ((4, 0.2), (3, 0.6), (2, 0.9)):
        out.append(MergeRecord(k=k, W=rng.standard_normal((k, d)).astype(np.float32), b=np.zeros(k, np.float32),
                               iou=np.full(k, miou), ecos=np.eye(k), p=0, q=1, sizes=np.ones(k, np.int64),
                               svm_iters=3, svm_converged=True, svm_stop_reason="tol", objective=1.0,
                               merged_ids=(1, 0, k + 10)))
    return out


def test_trajectory_helpers_read_merge_records():
    traj = _records()
    assert trajectory_ks(traj) == [4, 3, 2]
    W, b = seg_classifier_at(traj, 3)  # segment's API is the run's
    assert W.shape == (3, 3) and b.shape == (3,)
    np.testing.assert_array_equal(W, traj[1].W)
    assert k_for_threshold(traj, 0.5) == 3 and k_for_threshold(traj, 0.1) == 4
    with pytest.raises(SegmentError, match="not in the trajectory"):
        classifier_at(traj, 7)
    with pytest.raises(RunError, match="never reaches"):
        k_for_threshold(traj, 0.95)


def test_jsonable_turns_arrays_and_numpy_scalars_into_python():
    import jax.numpy as jnp

    out = jsonable({"a": np.float32(1.5), 2: [np.int64(3), np.bool_(True)], "w": np.eye(2), "j": jnp.arange(2),
                    "s": jnp.float32(2.0), "t": (1, "x")})
    assert out == {"a": 1.5, "2": [3, True], "w": [[1.0, 0.0], [0.0, 1.0]], "j": [0, 1], "s": 2.0, "t": [1, "x"]}


def test_generator_settings_are_methods():
    g = StyleGAN2(z_dim=8, w_dim=8, img_resolution=8, img_channels=3, mapping_layers=1, channel_base=64,
                  channel_max=16)
    h = g.with_settings(truncation=0.7, noise_mode="random")
    assert h.truncation_psi == 0.7 and h.noise_mode == "random" and g.truncation_psi == 1.0
    assert h.settings() == {"truncation": 0.7, "noise_mode": "random"}
    assert g.with_settings() is g
    with pytest.raises(GeneratorError, match="--truncation is not supported by the dcgan generator"):
        DCGAN().with_settings(truncation=0.5)
    assert DCGAN().settings() == {}
