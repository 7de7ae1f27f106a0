"""The main job end to end on the bundled DCGAN (tiny sizes): outputs, devices, resume, bad input, segmentation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gansem.checkpoint import load_trajectory
from gansem.generators import GeneratorError
from gansem.pipeline import ConfigError, KlishJobConfig, run_klish_job
from gansem.segment import SegmentError, Segmenter, k_for_threshold

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_images=3, resolution=8, k0=12, seed=3, svm_max_iter=500)


def _run(tmp, name, devices=8, **kw):
    cfg = KlishJobConfig(**{**SMALL, **kw})
    d = os.path.join(tmp, name)
    summary = run_klish_job(cfg, d, devices=devices, progress=False, quiet=True, vis_ks=None, num_vis=2)
    return d, summary


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    return _run(str(tmp_path_factory.mktemp("runs")), "d8", devices=8)


def _merges(traj):
    return [(r.k, r.p, r.q) for r in traj]


def _assert_same_weights(ta, tb):
    """Bitwise-equal classifiers at every step (the solver's decisions are device-invariant)."""
    for a, b in zip(ta, tb):
        np.testing.assert_array_equal(a.W, b.W)
        np.testing.assert_array_equal(a.b, b.b)


def test_run_directory_contents(run8):
    d, summary = run8
    assert summary["complete"]
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    for f in ("config.json", "latents.npy", "trajectory", "state", "clusters.png", "trajectory.png",
              "report.md", "trajectory.json", "summary.json", "init.json"):
        assert os.path.exists(os.path.join(d, f)), f
        assert f in manifest["files"], f
    report = open(os.path.join(d, "report.md")).read()
    assert "clusters.png" in report and "trajectory.png" in report
    traj = load_trajectory(d)
    ks = [r.k for r in traj]
    assert ks == list(range(ks[0], 0, -1)) and ks[0] <= SMALL["k0"]  # one stopping rule: K = 1 is the last record
    assert traj[-1].p == traj[-1].q == -1
    for r in traj[:-1]:
        k = r.k
        assert r.W.shape == (k, 960) and r.b.shape == (k,) and r.iou.shape == (k,)
        assert r.ecos.shape == (k, k) and r.sizes.shape == (k,)
        assert 0 <= r.p < k and 0 <= r.q < k and r.p != r.q
        assert int(np.asarray(r.sizes).sum()) == SMALL["num_images"] * SMALL["resolution"] ** 2
        # the merge rule of Algorithm 1, checked on the stored metrics
        assert r.p == int(np.argmin(r.iou))
        row = np.array(r.ecos[r.p], dtype=np.float64)
        row[r.p] = -np.inf
        assert r.q == int(np.argmax(row))
    latents = np.load(os.path.join(d, "latents.npy"))
    assert latents.shape == (SMALL["num_images"], 100) and latents.dtype == np.float32


def test_one_and_eight_devices_give_the_same_trajectory(run8, tmp_path):
    d8, _ = run8
    d1, _ = _run(str(tmp_path), "d1", devices=1)
    t1, t8 = load_trajectory(d1), load_trajectory(d8)
    assert _merges(t1) == _merges(t8)
    _assert_same_weights(t1, t8)


def test_resume_after_interruption_gives_the_same_trajectory(run8, tmp_path):
    d8, _ = run8
    cfg = KlishJobConfig(**SMALL)
    d = str(tmp_path / "r")
    s = run_klish_job(cfg, d, devices=8, progress=False, quiet=True, max_steps=3)
    assert not s["complete"] and len(load_trajectory(d)) == 3
    s = run_klish_job(cfg, d, devices=2, resume=True, progress=False, quiet=True, num_vis=2)
    assert s["complete"]
    t_resumed, t_full = load_trajectory(d), load_trajectory(d8)
    assert _merges(t_resumed) == _merges(t_full)
    _assert_same_weights(t_resumed, t_full)


def test_bad_arguments_get_clear_errors(run8, tmp_path):
    d8, _ = run8
    with pytest.raises(ConfigError, match="larger than the number of pixels"):
        KlishJobConfig(num_images=1, resolution=4, k0=17).validate()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_klish_job(KlishJobConfig(**SMALL), d8, devices=8, progress=False, quiet=True)
    with pytest.raises(ConfigError, match="different configuration.*k0"):
        run_klish_job(KlishJobConfig(**{**SMALL, "k0": 11}), d8, devices=8, resume=True, progress=False, quiet=True)
    with pytest.raises(GeneratorError, match="unknown generator"):
        run_klish_job(KlishJobConfig(**{**SMALL, "generator": "stylegan9"}), str(tmp_path / "x"), devices=1,
                      progress=False, quiet=True)


def test_segment_labels_are_the_classifier_argmax_at_full_resolution(run8):
    from gansem.features import extract_features

    d, _ = run8
    traj = load_trajectory(d)
    k = traj[len(traj) // 2].k
    seg = Segmenter.from_run(d, k=k)
    out = seg.sample(num_samples=3, seed=11, batch_size=2)
    assert out["images"].shape == (3, 64, 64, 3) and out["images"].dtype == np.uint8
    assert out["latents"].shape == (3, 100) and out["latents"].dtype == np.float32
    assert out["labels"].shape == (3, 64, 64) and out["labels"].dtype == np.int32
    assert out["labels"].min() >= 0 and out["labels"].max() < k
    # independent route: concatenated features at 64x64, then the classifier of the trajectory
    W, b = next((r.W, r.b) for r in traj if r.k == k)
    imgs, feats = extract_features(seg.generator, seg.params, out["latents"], seg.layers, 64, batch_size=3)
    scores = feats.reshape(-1, W.shape[1]) @ W.T + b
    ref = scores.argmax(-1).reshape(3, 64, 64)
    top2 = np.sort(scores, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]).reshape(3, 64, 64) > 1e-3  # ignore float near-ties
    assert np.mean(out["labels"][clear] == ref[clear]) == 1.0
    np.testing.assert_array_equal(imgs, out["images"])  # latents regenerate the same images
    # different seed → different samples; same seed → same samples
    assert not np.array_equal(seg.sample(1, seed=12)["latents"], out["latents"][:1])
    np.testing.assert_array_equal(seg.sample(1, seed=11)["latents"], out["latents"][:1])


def test_threshold_picks_first_k_reaching_phi(run8):
    d, _ = run8
    traj = load_trajectory(d)
    traj = [r for r in traj if r.k > 1]
    min_iou = {r.k: float(np.min(r.iou)) for r in traj}
    phi = sorted(min_iou.values())[len(min_iou) // 2]
    k = k_for_threshold(traj, phi)
    assert min_iou[k] >= phi and all(min_iou[j] < phi for j in min_iou if j > k)
    with pytest.raises(SegmentError, match="never reaches"):
        k_for_threshold(traj, 1.01)
    with pytest.raises(SegmentError, match="not in the trajectory"):
        Segmenter.from_run(d, k=SMALL["k0"] + 5)


def _cli(args, **kw):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_cli_help_explains_every_flag():
    r = _cli(["launch/klish.py", "--help"])
    assert r.returncode == 0
    for flag in ("--devices", "--generator", "--checkpoint", "--num-images", "--resolution", "--k0", "--out",
                 "--resume", "--no-filter", "--lam", "--tol", "--seed", "--retrain", "--channel-budget"):
        assert flag in r.stdout
    r = _cli(["launch/segment.py", "--help"])
    assert r.returncode == 0 and "--threshold" in r.stdout and "--num-samples" in r.stdout


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    r = _cli(["launch/klish.py", "--num-images", "1", "--resolution", "2", "--k0", "50",
              "--out", str(tmp_path / "a"), "--quiet", "--no-progress"])
    assert r.returncode == 2 and "larger than the number of pixels" in r.stderr and "Traceback" not in r.stderr
    r = _cli(["launch/klish.py", "--generator", "nope", "--out", str(tmp_path / "b"), "--quiet", "--no-progress"])
    assert r.returncode == 2 and "unknown generator" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04this is not a checkpoint")
    r = _cli(["launch/klish.py", "--checkpoint", str(bad), "--out", str(tmp_path / "c"), "--quiet", "--no-progress"])
    assert r.returncode == 2 and "bad.pkl" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_segment_contract(run8, tmp_path):
    d, _ = run8
    traj = load_trajectory(d)
    k = traj[-3].k
    out = tmp_path / "seg.npz"
    r = _cli(["launch/segment.py", "--run", d, "--k", str(k), "--num-samples", "5", "--seed", "4",
              "--out", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (5, 64, 64, 3)
    assert z["latents"].dtype == np.float32 and z["latents"].shape == (5, 100)
    assert z["labels"].dtype == np.int32 and z["labels"].shape == (5, 64, 64)
    assert 0 <= z["labels"].min() and z["labels"].max() < k
    ref = Segmenter.from_run(d, k=k).sample(5, seed=4)
    np.testing.assert_array_equal(ref["labels"], z["labels"])


@pytest.mark.slow
def test_sigkill_then_resume_from_the_cli_gives_the_same_trajectory(run8, tmp_path):
    import signal
    import time

    d8, _ = run8
    out = str(tmp_path / "killed")
    args = ["launch/klish.py", "--num-images", str(SMALL["num_images"]), "--resolution", str(SMALL["resolution"]),
            "--k0", str(SMALL["k0"]), "--seed", str(SMALL["seed"]), "--svm-max-iter", str(SMALL["svm_max_iter"]),
            "--devices", "8", "--out", out, "--no-progress", "--quiet"]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    traj_dir = os.path.join(out, "trajectory")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(traj_dir) and len([s for s in os.listdir(traj_dir) if s.isdigit()]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = _cli(args + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert _merges(load_trajectory(out)) == _merges(load_trajectory(d8))
    for a, b in zip(load_trajectory(out), load_trajectory(d8)):
        np.testing.assert_array_equal(a.W, b.W)
