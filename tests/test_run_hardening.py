"""Hardening of the run/evaluate/segment entry points: every bad input made here gets a one-line error (or is
repaired), found before any work is done and before a run directory is created.

A. tracebacks: klish.py --out FILE, segment.py --out under an uncreatable folder, evaluate.py with 0-d latents.
B. reference labels: huge ids, ids beyond int32, NaN/Inf latents; contingency tables bounded.
C. damaged checkpoints: a corrupt latest state or record falls back to the older kept state; damaged files named.
D. arguments: --tol/--lam NaN, --batch-size 0, --devices too many, --resume without a run / into a foreign folder.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gansem import evaluation as ev
from gansem import metrics, sharding
from gansem.checkpoint import CorruptCheckpointError, RunCheckpoints, load_trajectory
from gansem.generators import GeneratorError
from gansem.pipeline import ConfigError, KlishJobConfig, run_klish_job
from gansem.references import sources
from test_checkpoint import record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_images=3, resolution=8, k0=12, seed=3, svm_max_iter=500)


def _cli(args, timeout=120):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def _job(cfg, run_dir, **kw):
    return run_klish_job(cfg, run_dir, **{"devices": 1, "progress": False, "quiet": True, **kw})


# =============================================================================================== A: CLI tracebacks


def test_klish_cli_out_is_an_existing_file(tmp_path):
    f = tmp_path / "notadir"
    f.write_text("x")
    r = _cli(["launch/klish.py", "--out", str(f), "--num-images", "3", "--resolution", "8", "--k0", "12",
              "--quiet", "--no-progress"])
    _one_line_error(r, str(f), "existing file", "--out")
    assert f.read_text() == "x"


def test_segment_cli_checks_out_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub" / "seg.npz"  # its folder cannot be created: a file is in the way
    # --run does not even exist: the --out check comes first, before the run is opened or a sample drawn
    r = _cli(["launch/segment.py", "--run", str(tmp_path / "norun"), "--k", "3", "--num-samples", "2",
              "--seed", "0", "--out", str(out)])
    _one_line_error(r, "cannot create the folder", str(blocker / "sub"))
    d = tmp_path / "adir"
    d.mkdir()
    r = _cli(["launch/segment.py", "--run", str(tmp_path / "norun"), "--k", "3", "--num-samples", "2",
              "--seed", "0", "--out", str(d)])
    _one_line_error(r, "is a directory")


def _npz(path, **arrays):
    base = dict(images=np.zeros((2, 4, 4, 3), np.uint8), latents=np.zeros((2, 5), np.float32),
                labels=np.zeros((2, 4, 4), np.int32))
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def test_evaluate_cli_zero_dim_latents(tmp_path):
    p = _npz(tmp_path / "lab.npz", latents=np.float32(0.5))
    with pytest.raises(ev.EvaluationError, match="latents must be a float array"):
        sources.FileLabels.load(p)
    r = _cli(["launch/evaluate.py", "--run", str(tmp_path / "norun"), "--labels", p, "--k", "3",
              "--baselines", "none", "--quiet", "--no-progress"])
    _one_line_error(r, "lab.npz", "latents")


# =============================================================================================== B: labels


def test_huge_label_ids_are_refused_not_allocated(tmp_path):
    lab = np.zeros((2, 4, 4), np.int64)
    for big in (10**7, 2**31 - 1):
        lab[0, 0, 0] = big
        with pytest.raises(ev.EvaluationError, match=f"labels go up to {big}.*renumber"):
            sources.FileLabels.load(_npz(tmp_path / "big.npz", labels=lab))
    lab[0, 0, 0] = 2**32 + 1  # would wrap to 1 as int32
    with pytest.raises(ev.EvaluationError, match=f"up to {2**32 + 1}"):
        sources.FileLabels.load(_npz(tmp_path / "wrap.npz", labels=lab))
    lab[0, 0, 0] = -(2**32) + 3  # would wrap to 3
    with pytest.raises(ev.EvaluationError, match="negative labels"):
        sources.FileLabels.load(_npz(tmp_path / "neg.npz", labels=lab))
    # a documented bound, widened by class_names
    lab[0, 0, 0] = sources.MAX_REF_CLASSES - 1
    assert sources.FileLabels.load(_npz(tmp_path / "ok.npz", labels=lab)).labels.max() == sources.MAX_REF_CLASSES - 1
    lab[0, 0, 0] = 1500
    names = np.array([f"c{i}" for i in range(1501)])
    src = sources.FileLabels.load(_npz(tmp_path / "named.npz", labels=lab, class_names=names))
    assert src.labels.dtype == np.int32 and src.labels.max() == 1500
    # ignored pixels may hold any int32 value; the ignore value itself must be an int32
    lab[0, 0, 0] = 2**31 - 1
    src = sources.FileLabels.load(_npz(tmp_path / "ign.npz", labels=lab), ignore_label=2**31 - 1)
    assert src.labels[0, 0, 0] == 2**31 - 1
    with pytest.raises(ev.EvaluationError, match="--ignore-label .* int32"):
        sources.resolve_labels_source(_npz(tmp_path / "ign2.npz"), ignore_label=2**40)


def test_callable_labels_are_range_checked_before_casting():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    huge = sources.CallableLabels(lambda x: np.full(x.shape[:3], 2**32 + 1, np.int64), "huge")
    with pytest.raises(ev.EvaluationError, match="labels callable huge: labels go up to 4294967297"):
        huge(img)
    flt = sources.CallableLabels(lambda x: np.full(x.shape[:3], 1e10), "flt")
    with pytest.raises(ev.EvaluationError, match="returned dtype float64"):
        flt(img)
    nan = sources.CallableLabels(lambda x: np.full(x.shape[:3], np.nan), "nan")
    with pytest.raises(ev.EvaluationError, match="returned dtype float64"):
        nan(img)
    ok = sources.CallableLabels(lambda x: np.full(x.shape[:3], 3.0), "ok")
    assert ok(img).dtype == np.int32 and ok(img).max() == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39])
def test_non_finite_latents_are_refused(tmp_path, bad):
    lat = np.zeros((2, 5), np.float64)
    lat[1, 2] = bad
    with pytest.raises(ev.EvaluationError, match="latents of 1 of 2 samples are NaN/Inf"):
        sources.FileLabels.load(_npz(tmp_path / "lat.npz", latents=lat))


def test_contingency_tables_are_bounded():
    pred = np.zeros((2, 4), np.int32)
    ref = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="too large.*number the classes compactly"):
        metrics.contingency(pred, ref, 100, 2**31 - 1)
    with pytest.raises(ValueError, match="too large"):
        metrics.contingency(pred, ref, 100, 10**6, per_image=True)
    with pytest.raises(ValueError, match="too large"):
        metrics.ContingencyAccumulator(100, 2**31 - 1)
    assert metrics.contingency(pred, ref, 3, 2).sum() == 8


# =============================================================================================== C: checkpoints


def _tiny_run(d, steps=3):
    """A run directory of tiny records/states: record s has k = 5 - s, state s says step s."""
    ck = RunCheckpoints(str(d))
    ck.save_step(0, None, {"step": np.int32(0), "W": np.zeros((5, 2), np.float32)})
    for s in range(1, steps + 1):
        ck.save_step(s, record(5 - s, float(s)),
                     {"step": np.int32(s), "W": np.full((5 - s, 2), s, np.float32)})
    ck.close()
    return str(d)


def _truncate_data(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "*", "d", "*")) if os.path.getsize(f) > 1]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _resume_point(d):
    logs = []
    ck = RunCheckpoints(d)
    try:
        return ck.resume_point(log=logs.append), logs
    finally:
        ck.close()


def test_intact_run_resumes_from_the_latest_state(tmp_path):
    (step, arrays, _), logs = _resume_point(_tiny_run(tmp_path / "r"))
    assert step == 3 and int(arrays["step"]) == 3 and logs == []


def test_truncated_latest_state_falls_back_to_the_previous_one(tmp_path):
    d = _tiny_run(tmp_path / "r")
    _truncate_data(os.path.join(d, "state", "3"))
    with pytest.raises(CorruptCheckpointError, match=r"^state/3 is corrupt \(.*OUT_OF_RANGE"):
        RunCheckpoints(d).load_state(3)
    (step, arrays, _), logs = _resume_point(d)
    assert step == 2 and int(arrays["step"]) == 2
    assert len(logs) == 1 and logs[0].startswith("state/3 is corrupt (") and logs[0].endswith("resuming from step 2")


@pytest.mark.parametrize("name", ["meta/metadata", "state/_METADATA"])
def test_emptied_metadata_file_is_named(tmp_path, name):
    d = _tiny_run(tmp_path / "r")
    open(os.path.join(d, "state", "3", name), "w").close()
    (step, _, _), logs = _resume_point(d)
    assert step == 2
    assert f"state/3 is corrupt (state/3/{name} is not valid JSON: Expecting value" in logs[0]


def test_corrupt_record_falls_back_to_the_state_before_it(tmp_path):
    d = _tiny_run(tmp_path / "r")
    open(os.path.join(d, "trajectory", "3", "meta", "metadata"), "w").close()
    (step, _, _), logs = _resume_point(d)
    assert step == 2 and "trajectory/3 is corrupt (trajectory/3/meta/metadata" in logs[0]
    with pytest.raises(CorruptCheckpointError, match=r"trajectory/3 is corrupt .*--resume"):
        load_trajectory(d)
    # the resumed run rewrites step 3 and the run reads back whole
    ck = RunCheckpoints(d)
    ck.save_step(3, record(2, 3.0), {"step": np.int32(3), "W": np.full((2, 2), 3, np.float32)})
    ck.close()
    assert [r.k for r in load_trajectory(d)] == [4, 3, 2]


def test_unrecoverable_damage_says_what_to_do(tmp_path):
    d = _tiny_run(tmp_path / "early")
    open(os.path.join(d, "trajectory", "1", "meta", "metadata"), "w").close()  # before both kept states (2, 3)
    with pytest.raises(CorruptCheckpointError, match=r"trajectory/1 is corrupt .*no kept state .*delete .*--resume"):
        _resume_point(d)
    d = _tiny_run(tmp_path / "both")
    open(os.path.join(d, "state", "3", "meta", "metadata"), "w").close()
    open(os.path.join(d, "state", "2", "meta", "metadata"), "w").close()
    with pytest.raises(CorruptCheckpointError, match=r"state/3 is corrupt .*state/2 is corrupt .*no kept state"):
        _resume_point(d)


def test_pipeline_refuses_unrecoverable_damage_before_any_work(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    cfg = KlishJobConfig(**SMALL)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    _tiny_run(d)
    open(os.path.join(d, "trajectory", "1", "meta", "metadata"), "w").close()
    before = sorted(os.listdir(d))
    with pytest.raises(ConfigError, match=r"--resume .*trajectory/1 is corrupt .*no kept state"):
        _job(cfg, str(d), resume=True)
    assert sorted(os.listdir(d)) == before  # nothing was computed or written (no latents.npy, no transform.npz)


def test_damaged_config_json_is_named(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text("")
    with pytest.raises(ConfigError, match=r"config.json cannot be read as JSON"):
        _job(KlishJobConfig(**SMALL), str(d), resume=True)


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """The tiny main job stopped after 3 merges (states 2 and 3 kept), and its record 3."""
    d = str(tmp_path_factory.mktemp("partial") / "r")
    _job(KlishJobConfig(**SMALL), d, max_steps=3)
    return d, load_trajectory(d)[-1]


def _resume_copy(partial_run, tmp_path, damage, capsys):
    src, rec3 = partial_run
    d = str(tmp_path / "r")
    shutil.copytree(src, d)
    damage(d)
    s = _job(KlishJobConfig(**SMALL), d, resume=True, max_steps=1)
    err = capsys.readouterr().err
    return d, s, rec3, err


@pytest.mark.slow
def test_resume_past_a_truncated_latest_state_is_bit_identical(partial_run, tmp_path, capsys):
    d, s, rec3, err = _resume_copy(partial_run, tmp_path, lambda d: _truncate_data(os.path.join(d, "state", "3")),
                                   capsys)
    assert "state/3 is corrupt (" in err and "resuming from step 2" in err
    assert s["steps"] == 3  # step 3 recomputed from state 2
    new3 = load_trajectory(d)[-1]
    for key in ("k", "p", "q", "W", "b", "iou", "ecos", "sizes"):
        np.testing.assert_array_equal(np.asarray(new3[key]), np.asarray(rec3[key]))
    assert RunCheckpoints(d).state_steps() == [2, 3]


@pytest.mark.slow
def test_resume_past_a_corrupt_record_rebuilds_it(partial_run, tmp_path, capsys):
    def damage(d):
        open(os.path.join(d, "trajectory", "3", "meta", "metadata"), "w").close()

    d, s, rec3, err = _resume_copy(partial_run, tmp_path, damage, capsys)
    assert "trajectory/3 is corrupt (trajectory/3/meta/metadata" in err and "resuming from step 2" in err
    new3 = load_trajectory(d)[-1]  # the record loads again, and is the same
    for key in ("k", "p", "q", "W", "b", "iou", "ecos", "sizes"):
        np.testing.assert_array_equal(np.asarray(new3[key]), np.asarray(rec3[key]))


# =============================================================================================== D: arguments


@pytest.mark.parametrize("field,value,msg", [
    ("tol", float("nan"), "--tol must be a finite positive number"),
    ("tol", float("inf"), "--tol must be a finite positive number"),
    ("tol", 0.0, "--tol must be a finite positive number"),
    ("lam", float("nan"), "--lam must be a finite positive number"),
    ("lam", -1.0, "--lam must be a finite positive number"),
    ("truncation", float("inf"), "--truncation must be a finite positive number"),
    ("batch_size", 0, "--batch-size must be >= 1"),
    ("svm_max_iter", 0, "--svm-max-iter must be >= 1"),
    ("kmeans_iters", -1, "--kmeans-iters must be >= 0"),
    ("channel_budget", 0, "--channel-budget must be >= 1"),
])
def test_bad_numbers_are_refused_before_the_run_directory_exists(tmp_path, field, value, msg):
    d = tmp_path / "run"
    with pytest.raises(ConfigError, match=msg):
        _job(KlishJobConfig(**{**SMALL, field: value}), str(d))
    assert not d.exists()


def test_generator_and_device_errors_leave_no_run_directory(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(GeneratorError, match="unknown generator"):
        _job(KlishJobConfig(**{**SMALL, "generator": "stylegan9"}), str(d))
    with pytest.raises(ConfigError, match="--devices 200 is more than the 192 pixels"):
        _job(KlishJobConfig(**SMALL), str(d), devices=200)
    with pytest.raises(sharding.DeviceError, match="9 devices requested but only 8"):
        _job(KlishJobConfig(**SMALL), str(d), devices=9)
    assert not d.exists()


def test_too_many_devices_are_refused_upfront():
    msg = sharding.setup_devices_from_cli(1000)
    assert msg and "--devices 1000" in msg and f"at most {sharding.MAX_SIMULATED_CPU_DEVICES}" in msg


def test_resume_needs_a_run(tmp_path):
    cfg = KlishJobConfig(**SMALL)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="no run to resume in .*missing.*drop --resume to start one"):
        _job(cfg, str(missing), resume=True)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no run to resume in"):
        _job(cfg, str(empty), resume=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a gansem run .*refusing to write into it"):
        _job(cfg, str(foreign), resume=True)
    (foreign / "config.json").write_text(json.dumps({"name": "another tool"}))
    with pytest.raises(ConfigError, match="is not the configuration of a gansem KLiSH run"):
        _job(cfg, str(foreign), resume=True)
    assert sorted(os.listdir(foreign)) == ["config.json", "notes.txt"]


@pytest.mark.parametrize("flags,needles", [
    (["--tol", "nan"], ["--tol", "finite positive"]),
    (["--lam", "nan"], ["--lam", "finite positive"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--devices", "1000"], ["--devices 1000", "at most"]),
    (["--resume"], ["no run to resume", "drop --resume"]),
])
def test_klish_cli_argument_errors(tmp_path, flags, needles):
    out = tmp_path / "run"
    r = _cli(["launch/klish.py", "--num-images", "3", "--resolution", "8", "--k0", "12", "--quiet", "--no-progress",
              "--out", str(out)] + flags)
    _one_line_error(r, *needles)
    assert not out.exists()  # the retry starts clean
