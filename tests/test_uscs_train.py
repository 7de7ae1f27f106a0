"""USCS (SPADE) training: run directory, exact resumption, 1 vs 8 devices, refusals, the synthesizer, the CLI.

The cheap tests train nothing: refusals and input errors come before any compilation, and the
synthesizer is checked on a run directory written with a numpy generator (``uscs_runs``). The
tests that train (marked slow: compiling the GAN step takes XLA 10-20 s even at this size) use a
two-level SPADE (widths 2 to 4) on 16×16 colour-blob pairs; runs with the same settings and mesh
reuse the compiled programs (``train.gan_programs`` is cached).
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gansem import sharding
from gansem.training import read_metrics
from gansem.uscs.models import SpadeConfig, build_models, spade_config
from gansem.uscs.synth import Synthesizer, UscsRunError, load_synthesizer
from gansem.uscs.train import fit_uscs
from ufgs_pairs import Pairs, cli_error, colour_blobs, segment_npz
from uscs_runs import write_untrained_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

# what the CLI flags of _cli_model_args() give: the CLI test reuses the 8-device program of the in-process one
TINY_MODEL = spade_config("cpu", ngf=2, mults=(2, 1), spade_hidden=4, ndf=4, d_layers=2)
TINY = dict(config=TINY_MODEL, batch_size=8, steps=4, eval_samples=8, num_samples=4, sample_every=2,
            checkpoint_every=2, progress=False, quiet=True)
LOSSES = ("g_loss", "g_adv", "g_fm", "d_loss", "d_real", "d_fake")


def _losses(history):
    return [[r[k] for k in LOSSES] for r in history if "g_loss" in r]


def _same_tree(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.fixture(scope="module")
def blobs():
    images, labels = colour_blobs(40, 16, seed=1)
    return Pairs(images, labels, 3, meta={"kind": "colour blobs"})


@pytest.fixture(scope="module")
def straight(blobs, tmp_path_factory):
    """Four steps in one call on one device, checkpoints and sample grids at 2 and 4."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    synth = fit_uscs(blobs, out_dir=out, mesh=sharding.make_mesh(1), **TINY)
    return out, synth


@pytest.mark.slow
def test_run_directory_layout(straight):
    out, synth = straight
    assert sorted(os.listdir(out)) == ["checkpoints", "curves.png", "manifest.json", "metrics.jsonl", "model.json",
                                       "samples", "summary.json"]
    assert sorted(int(s) for s in os.listdir(os.path.join(out, "checkpoints"))) == [2, 4]
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "uscs-spade" and meta["num_classes"] == 3 and meta["resolution"] == 16
    assert np.asarray(meta["palette"]).shape == (3, 3) and meta["class_names"] is None
    assert meta["model"] == TINY_MODEL.to_dict() and meta["config"]["batch_size"] == 8
    assert meta["data"]["held_out"] == {"first": 32, "count": 8} and meta["data"]["train_items"] == 32
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(set(LOSSES) <= set(r) and all(np.isfinite(r[k]) for k in LOSSES) for r in recs)
    for r in recs:
        assert r["g_loss"] == pytest.approx(r["g_adv"] + 10.0 * r["g_fm"], rel=1e-5)
        assert r["d_loss"] == pytest.approx(r["d_real"] + r["d_fake"], rel=1e-5)
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000002.png", "step_000004.png"]
    from PIL import Image

    with Image.open(os.path.join(out, "samples", "step_000004.png")) as im:  # 3 rows x 4 pairs of 16 px, 2 px pad
        assert im.size == (4 * 18 + 2, 3 * 18 + 2)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 4 and summary["devices"] == 1 and summary["steps_per_s"] > 0
    with open(os.path.join(out, "manifest.json")) as f:
        assert set(json.load(f)["files"]) >= {"model.json", "metrics.jsonl", "curves.png", "summary.json"}
    assert synth.step == 4 and synth.run_dir == out and synth.history == recs
    loaded = load_synthesizer(out)
    assert _same_tree(loaded.variables, synth.variables) and loaded.history == recs
    np.testing.assert_array_equal(loaded.generate(np.zeros((2, 16, 16), np.int32)),
                                  synth.generate(np.zeros((2, 16, 16), np.int32)))


@pytest.mark.slow
def test_resume_continues_exactly(blobs, straight, tmp_path):
    """2 steps, then a resumed call to 4: the same losses (bit for bit) and generator as 4 steps at once."""
    out, ref = straight
    run = str(tmp_path / "run")
    mesh = sharding.make_mesh(1)
    fit_uscs(blobs, out_dir=run, mesh=mesh, **{**TINY, "steps": 2})
    synth = fit_uscs(blobs, out_dir=run, mesh=mesh, resume=True, **TINY)
    assert synth.summary["resumed_from"] == 2 and synth.summary["steps_this_call"] == 2
    assert read_metrics(run) == read_metrics(out)
    assert _same_tree(synth.variables, ref.variables)


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_drops_later_records(blobs, straight, tmp_path):
    """A run killed after step 3 (records written, checkpoint 4 not): resumes at 2 and recomputes 3, 4."""
    out, ref = straight
    run = str(tmp_path / "run")
    shutil.copytree(out, run)
    shutil.rmtree(os.path.join(run, "checkpoints", "4"))
    synth = fit_uscs(blobs, out_dir=run, mesh=sharding.make_mesh(1), resume=True, **TINY)
    assert synth.summary["resumed_from"] == 2 and read_metrics(run) == read_metrics(out)


@pytest.mark.slow
def test_eight_devices_same_first_steps(blobs, straight):
    """The batch split over 8 devices: the same losses and generator as a 1-device mesh up to float summation order.

    (test_one_device_process_same_first_steps_as_eight_devices compares with a 1-device process.)
    """
    _, ref = straight
    synth = fit_uscs(blobs, mesh=sharding.make_mesh(8), **TINY)
    np.testing.assert_allclose(_losses(synth.history), _losses(ref.history), rtol=1e-4, atol=1e-4)
    # Adam divides by the gradient's scale: where a gradient is near zero, float-order noise can flip the sign of
    # a step of size ~lr (1e-4), so a few weights agree only to 2 x steps x lr; the rest to float rounding
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                           for a, b in zip(jax.tree.leaves(synth.variables), jax.tree.leaves(ref.variables))])
    assert np.median(diff) < 1e-6 and diff.max() <= 2 * 4 * 1e-4, (np.median(diff), diff.max())
    assert synth.summary["devices"] == 8


def test_resume_refusals_and_errors(blobs, tmp_path):
    """Every refusal comes before any compilation: checked on a run directory written without training."""
    out = str(tmp_path / "run")
    fixed = {"model": TINY_MODEL.to_dict(), "num_classes": 3, "resolution": 16, "batch_size": 8, "seed": 0,
             "g_lr": 1e-4, "d_lr": 4e-4, "beta1": 0.0, "beta2": 0.9, "lambda_fm": 10.0, "lambda_kl": 0.05,
             "source_items": 40, "train_items": 32}
    write_untrained_run(out, build_models(TINY_MODEL, 3, 16), fixed=fixed)
    before = sorted(os.listdir(out))
    with pytest.raises(UscsRunError, match="already holds a USCS training run.*resume=True"):
        fit_uscs(blobs, out_dir=out, **TINY)
    with pytest.raises(UscsRunError, match=r"batch_size=8.*batch_size=16"):
        fit_uscs(blobs, out_dir=out, resume=True, **{**TINY, "batch_size": 16})
    with pytest.raises(UscsRunError, match="seed=0.*seed=1"):
        fit_uscs(blobs, out_dir=out, resume=True, seed=1, **TINY)
    with pytest.raises(UscsRunError, match='model=.*"ngf": 2.*"ngf": 4'):
        fit_uscs(blobs, out_dir=out, resume=True, **{**TINY, "config": SpadeConfig(**{**TINY_MODEL.__dict__,
                                                                                         "ngf": 4})})
    with pytest.raises(UscsRunError, match="d_lr=0.0004.*d_lr=0.001"):
        fit_uscs(blobs, out_dir=out, resume=True, d_lr=1e-3, **TINY)
    with pytest.raises(UscsRunError, match="train_items=32.*train_items=30"):
        fit_uscs(blobs, out_dir=out, resume=True, **{**TINY, "eval_samples": 10})
    assert sorted(os.listdir(out)) == before  # nothing touched
    with pytest.raises(ValueError, match="batch size 4 cannot be split evenly over 8 devices"):
        fit_uscs(blobs, mesh=sharding.make_mesh(8), **{**TINY, "batch_size": 4})
    with pytest.raises(ValueError, match="leaves no training item"):
        fit_uscs(blobs, **{**TINY, "eval_samples": 40})
    with pytest.raises(ValueError, match="unknown SPADE configuration 'big'"):
        fit_uscs(blobs, **{**TINY, "config": "big"})
    with pytest.raises(ValueError, match="divisible by 2"):
        fit_uscs(Pairs(blobs.images[:, :15, :15], blobs.labels[:, :15, :15], 3), **TINY)
    bad = blobs.labels.copy()
    bad[:, 2, 2] = 5
    with pytest.raises(ValueError, match=r"class id 5 is outside \[0, 3\)"):
        fit_uscs(Pairs(blobs.images, bad, 3), out_dir=str(tmp_path / "bad"), **TINY)
    assert not os.path.exists(tmp_path / "bad")  # the held-out sample pairs are checked before the folder appears
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(UscsRunError, match="not a USCS run directory"):
        fit_uscs(blobs, out_dir=str(foreign), **TINY)


# -- the synthesizer ---------------------------------------------------------------------------


def test_synthesizer_from_a_run_directory(blobs, tmp_path):
    """The painting page's object on a run directory (generator weights from numpy): generation and examples."""
    data = segment_npz(tmp_path / "seg.npz", blobs.images, blobs.labels, 3)
    out = str(tmp_path / "run")
    item = write_untrained_run(out, build_models(TINY_MODEL, 3, 16), step=4,
                               data={"path": data, "held_out": {"first": 32, "count": 8}})
    synth = load_synthesizer(out)
    assert isinstance(synth, Synthesizer) and synth.step == 4 and synth.run_dir == out
    assert (synth.num_classes, synth.resolution) == (3, 16) and synth.palette.tolist() == [[0, 1, 2], [3, 4, 5],
                                                                                          [6, 7, 8]]
    assert synth.class_names == ("class 0", "class 1", "class 2") and synth.meta["kind"] == "uscs-spade"
    assert _same_tree(synth.variables, item)
    images = synth.generate(blobs.labels[32:33], seed=3)  # batches of 1 here: one compiled program
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(synth.generate(blobs.labels[32]), images[0])  # one [R, R] mask -> [R, R, 3]
    assert not np.array_equal(images[0], synth.generate(blobs.labels[0]))  # the image follows the mask
    assert synth.num_examples == 8  # the held-out pairs of the dataset in model.json
    image, mask = synth.example(7)
    np.testing.assert_array_equal(image, blobs.images[39])
    np.testing.assert_array_equal(mask, blobs.labels[39])
    with pytest.raises(IndexError):
        synth.example(8)
    with pytest.raises(ValueError, match=r"masks must be \[N, 16, 16\]"):
        synth.generate(np.zeros((2, 8, 8), np.int32))
    with pytest.raises(ValueError, match=r"class id 3 is outside \[0, 3\)"):
        synth.generate(np.full((16, 16), 3))
    with pytest.raises(ValueError, match="integer class ids"):
        synth.generate(np.zeros((16, 16), np.float32))
    with pytest.raises(UscsRunError, match="no checkpoint at step 3; kept steps: 4"):
        load_synthesizer(out, step=3)
    with pytest.raises(UscsRunError, match="not a USCS run directory"):
        load_synthesizer(str(tmp_path))
    os.remove(data)
    assert load_synthesizer(out).num_examples == 0  # the dataset is gone: no examples, no error


# -- command line --------------------------------------------------------------------------------


def _cli_model_args():
    return ["--ngf", "2", "--mults", "2,1", "--spade-hidden", "4", "--ndf", "4", "--d-layers", "2"]


def test_cli_help_and_errors(tmp_path, capsys, blobs):
    cli = importlib.import_module("train_uscs")
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--steps", "--out", "--resume", "--config", "--batch-size", "--g-lr", "--d-lr", "--seed",
                 "--devices", "--eval-samples", "--sample-every", "--checkpoint-every", "--no-progress", "--quiet",
                 "--ngf", "--use-vae"):
        assert flag in out
    base = ["--steps", "2", "--out", str(tmp_path / "r"), "--no-progress", "--quiet"]

    def error(argv):
        return cli_error(cli, argv, capsys)

    assert "does not exist" in error(["--data", str(tmp_path / "none")] + base)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=blobs.images)
    assert "has no labels, k" in error(["--data", str(bad)] + base)
    good = segment_npz(tmp_path / "seg.npz", blobs.images, blobs.labels, 3)
    assert "multiple of 8" in error(["--data", good, "--batch-size", "4", "--devices", "8"] + base)
    assert "divisible by 32" in error(["--data", good, "--config", "paper"] + base)
    with pytest.raises(SystemExit) as e:  # argparse's own one-line error and usage
        cli.main(["--data", good, "--mults", "2,x"] + base)
    assert e.value.code == 2 and "--mults: expected comma-separated integers" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")  # every check comes before the run directory is created


@pytest.mark.slow
def test_cli_trains_and_the_synthesizer_offers_held_out_examples(tmp_path, capsys, blobs):
    cli = importlib.import_module("train_uscs")
    data = segment_npz(tmp_path / "seg.npz", blobs.images, blobs.labels, 3)
    out = str(tmp_path / "run")
    argv = ["--data", data, "--steps", "4", "--out", out, "--batch-size", "8", "--eval-samples", "8",
            "--num-samples", "4", "--sample-every", "2", "--checkpoint-every", "2", "--devices", "8",
            "--no-progress", *_cli_model_args()]
    assert cli.main(argv) == 0
    assert "trained" in capsys.readouterr().out
    synth = load_synthesizer(out)
    assert synth.meta["data"]["path"] == os.path.abspath(data) and synth.meta["model"] == TINY_MODEL.to_dict()
    assert synth.num_examples == 8
    image, mask = synth.example(7)  # the last held-out pair
    np.testing.assert_array_equal(image, blobs.images[39])
    np.testing.assert_array_equal(mask, blobs.labels[39])
    assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert cli.main(argv + ["--resume", "--quiet"]) == 0  # already at step 4: nothing to train


@pytest.mark.slow
def test_style_encoder_variant_trains_resumes_and_synthesizes(blobs, tmp_path):
    """use_vae (encoder + KL), InstanceNorm and no spectral norm: no BatchNorm or power-iteration state at all."""
    cfg = SpadeConfig(**{**TINY_MODEL.__dict__, "use_vae": True, "norm": "instance", "spectral": False,
                         "z_dim": 4, "e_ndf": 2})
    kw = {**TINY, "config": cfg, "steps": 2, "sample_every": 1, "checkpoint_every": 1}
    out = str(tmp_path / "vae")
    first = fit_uscs(blobs, out_dir=out, mesh=sharding.make_mesh(1), **{**kw, "steps": 1})
    synth = fit_uscs(blobs, out_dir=out, mesh=sharding.make_mesh(1), resume=True, **kw)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["g_kl"]) and r["g_kl"] >= 0 for r in recs)
    assert recs[0]["g_loss"] == pytest.approx(recs[0]["g_adv"] + 10 * recs[0]["g_fm"] + 0.05 * recs[0]["g_kl"],
                                              rel=1e-5)
    assert set(synth.variables["params"]) == {"generator", "encoder"} and first.step == 1
    loaded = load_synthesizer(out)
    mask = blobs.labels[0]
    a, b = loaded.generate(mask, seed=0), loaded.generate(mask, seed=1)
    np.testing.assert_array_equal(a, loaded.generate(mask, seed=0))  # the seed draws the style vector
    assert not np.array_equal(a, b)


# -- slow: processes -----------------------------------------------------------------------------


def _child_env(devices=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _cli_argv(data, out, steps, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "train_uscs.py"), "--data", data, "--steps", str(steps),
            "--out", out, "--batch-size", "8", "--eval-samples", "8", "--num-samples", "4", "--no-progress",
            "--quiet", *_cli_model_args(), *extra]


@pytest.mark.slow
def test_cli_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """launch/train_uscs.py killed (SIGKILL) after its first checkpoint, then --resume: the same loss curve."""
    images, labels = colour_blobs(48, 16, seed=2)
    data = segment_npz(tmp_path / "seg.npz", images, labels, 3)
    env = _child_env()
    argv = lambda out, *extra: _cli_argv(data, out, 120, "--checkpoint-every", "10", "--sample-every", "60",  # noqa
                                         *extra)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(argv(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpts = os.path.join(killed, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(s.isdigit() and int(s) >= 20 for s in os.listdir(ckpts)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
    assert kept and kept[-1] < 120, f"not killed mid-run (checkpoints {kept})"
    r = subprocess.run(argv(killed, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ref = str(tmp_path / "ref")
    r = subprocess.run(argv(ref), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert read_metrics(killed) == read_metrics(ref)
    assert _same_tree(load_synthesizer(killed).variables, load_synthesizer(ref).variables)


@pytest.mark.slow
def test_one_device_process_same_first_steps_as_eight_devices(tmp_path, blobs):
    """A process with a single CPU device (XLA_FLAGS device count 1) and the 8-device mesh of this process:
    the same first steps to float tolerance. (A 1-device mesh inside an 8-device process is not bit-identical
    to a 1-device process: XLA's CPU backend splits work over threads by the device count.)"""
    data = segment_npz(tmp_path / "seg.npz", blobs.images, blobs.labels, 3)
    out = str(tmp_path / "one")
    r = subprocess.run(_cli_argv(data, out, 4, "--devices", "1", "--sample-every", "2", "--checkpoint-every", "2"),
                       env=_child_env(devices=1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    eight = fit_uscs(Pairs(blobs.images, blobs.labels, 3), mesh=sharding.make_mesh(8), **TINY)
    np.testing.assert_allclose(_losses(read_metrics(out)), _losses(eight.history), rtol=1e-4, atol=1e-4)
