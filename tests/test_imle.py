"""Cluster-guided IMLE synthesis (seed 002): NN matching, T_c, vmapped training, resume, hierarchy, launch script."""

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gansem.generators.biggan import BigGANDeep
from gansem.generators.dcgan import DCGAN
from gansem.generators.base import save_checkpoint
from gansem.methods import imle
from gansem.methods.cluster_sampling import ClusterSamplingConfig, load_clusters, run_cluster_sampling
from gansem.methods.latent_clusters import ClusterLevel, LevelSpec, leaf_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

TINY_DCGAN = DCGAN(nz=16, ngf=8, num_blocks=2)
TINY_BIGGAN = BigGANDeep(z_dim=16, n_classes=10, channel_width=4,
                         layers=((False, 16, 16), (True, 16, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
                                 (True, 2, 1)),
                         attention_layer_position=3)


def _checkpoint(tmp_path, gen, name):
    """A random-weight checkpoint, parameters filled with numpy from the shapes (no RNG program to compile)."""
    rng = np.random.default_rng(3)
    shapes = jax.eval_shape(gen.init_params, jax.random.key(0))
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.abs(v) + 0.5 if "var" in jax.tree_util.keystr(p) else v, params)  # BN variances > 0
    return save_checkpoint(str(tmp_path / name), gen, params, name=name)


def _tiny_targets(rng, counts=(24, 24), dim=3):
    z = rng.standard_normal((sum(counts), dim)).astype(np.float32)
    labels = np.repeat(np.arange(len(counts)), counts)
    return imle.pack_targets(z + labels[:, None], labels, list(range(len(counts))))


TINY_CFG = imle.IMLEConfig(latent_dim=3, hidden=8, num_aux=40, batch_size=8, steps_per_epoch=3, query_tile=16,
                           candidate_tile=16)


# -- Eq. 2: nearest neighbours ------------------------------------------------------------------


def test_nearest_neighbours_match_brute_force_numpy(rng):
    q = rng.standard_normal((70, 5)).astype(np.float32)
    c = rng.standard_normal((150, 5)).astype(np.float32)
    c[17] = q[3]                                    # an exact match
    c[120] = c[20]                                  # a duplicate candidate: the lower index wins
    q[9] = c[20]
    idx, dist = imle.nearest_neighbours(q, c, query_tile=16, candidate_tile=32)   # tiles do not divide 70, 150
    d = ((q[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(idx), d.argmin(1))
    np.testing.assert_allclose(np.asarray(dist), d.min(1), rtol=1e-5, atol=1e-6)
    assert int(idx[3]) == 17 and int(idx[9]) == 20


# -- T_c architecture ---------------------------------------------------------------------------


def test_mapping_net_is_three_bias_free_dense_layers_with_batch_norm_between():
    model = imle.MappingNet(out_dim=7, hidden=12)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((4, 5), np.float32), train=False))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v.shape
            for path, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert flat == {
        "params/dense0/kernel": (5, 12), "params/bn0/scale": (12,), "params/bn0/bias": (12,),
        "params/dense1/kernel": (12, 12), "params/bn1/scale": (12,), "params/bn1/bias": (12,),
        "params/dense2/kernel": (12, 7),
        "batch_stats/bn0/mean": (12,), "batch_stats/bn0/var": (12,),
        "batch_stats/bn1/mean": (12,), "batch_stats/bn1/var": (12,)}
    out = jax.eval_shape(lambda v, e: model.apply(v, e, train=True, mutable=["batch_stats"])[0],
                         shapes, jax.ShapeDtypeStruct((9, 5), np.float32))
    assert out.shape == (9, 7)


def test_pack_targets_pads_and_refuses_empty_clusters():
    z = np.arange(10, dtype=np.float32).reshape(5, 2)
    t = imle.pack_targets(z, np.array([1, 0, 1, 1, 0]), [0, 1])
    assert t.z.shape == (2, 3, 2) and t.counts.tolist() == [2, 3]
    np.testing.assert_array_equal(t.z[0, :2], z[[1, 4]])
    with pytest.raises(imle.IMLEError, match="no latent"):
        imle.pack_targets(z, np.zeros(5, int), [0, 1])


# -- training -----------------------------------------------------------------------------------


@pytest.mark.slow  # two epoch programs to compile (C=2 and C=1): ~8 s on a busy 2-core CPU
def test_vmapped_training_equals_training_each_cluster_alone(rng):
    targets = _tiny_targets(rng)
    key = jax.random.key(5)
    step = imle.epoch_program(TINY_CFG)
    init = jax.jit(lambda k, ids: imle.init_state(TINY_CFG, k, ids))

    def train(t):
        s = init(key, t.cluster_ids)
        for e in range(2):
            s, m = step(s, t, jax.random.fold_in(key, e))
        return s, m

    both, m_both = train(targets)
    for c in range(2):
        alone, m_alone = train(imle.ClusterTargets(targets.z[c:c + 1], targets.counts[c:c + 1],
                                                   targets.cluster_ids[c:c + 1]))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[c], np.asarray(b)[0], rtol=2e-5,
                                                             atol=1e-6), both.params, alone.params)
        np.testing.assert_allclose(np.asarray(m_both["objective"])[c], np.asarray(m_alone["objective"])[0],
                                   rtol=2e-5)


def test_resume_n_then_2n_equals_2n_in_one_go(tmp_path, rng):
    targets = _tiny_targets(rng)
    key = jax.random.key(2)
    once = imle.train_imle(targets, key, TINY_CFG, epochs=4)
    first = imle.train_imle(targets, key, TINY_CFG, epochs=2, run_dir=str(tmp_path), checkpoint_every=1)
    assert first.resumed_from is None
    again = imle.train_imle(targets, key, TINY_CFG, epochs=4, run_dir=str(tmp_path), resume=True)
    assert again.resumed_from == 2 and [r["epoch"] for r in again.history] == [1, 2, 3, 4]
    assert [r["objective"] for r in again.history] == [r["objective"] for r in once.history]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 again.state.params, once.state.params)


# -- hierarchy ------------------------------------------------------------------------------------


def test_leaf_labels_follow_the_hierarchy_path():
    levels = (ClusterLevel("a", 0, -1, np.zeros((3, 1))), ClusterLevel("b", 0, 2, np.zeros((2, 1))))
    labels = np.array([[2, 0], [2, 1], [0, 1], [1, 0]])
    np.testing.assert_array_equal(leaf_labels(labels, levels), [0, 1, -1, -1])
    np.testing.assert_array_equal(leaf_labels(labels[:, :1], levels[:1]), [2, 2, 0, 1])


# -- the job and its launch script -----------------------------------------------------------------


def test_launch_help_and_bad_input(tmp_path, capsys):
    cli = importlib.import_module("cluster_sampling")
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in cli.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for flag in ("--layer", "--pool", "--clusters", "--refine", "--epochs", "--num-aux", "--resume", "--class-label",
                 "--transfer-classes", "--eval-samples", "--out", "--devices", "--no-progress"):
        assert flag in out

    def error(argv):
        assert cli.main(argv + ["--out", str(tmp_path / "r"), "--quiet", "--no-progress"]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    assert "at least 2 clusters" in error(["--clusters", "1"])
    assert "no layer 'nope'" in error(["--layer", "nope", "--num-latents", "64"])
    assert "unconditional" in error(["--class-label", "3", "--num-latents", "64"])
    assert "holds no cluster-sampling run" in error(["--resume"])
    with pytest.raises(SystemExit):
        cli.main(["--refine", "block16:3", "--out", str(tmp_path / "r")])
    assert not os.path.exists(tmp_path / "r")   # every check comes before the run directory


@pytest.mark.slow  # generator, K-means and IMLE programs to compile, figures: ~20 s
def test_tiny_end_to_end_with_hierarchy(tmp_path):
    ck = _checkpoint(tmp_path, TINY_DCGAN, "dcgan")
    out = str(tmp_path / "run")
    cfg = ClusterSamplingConfig(generator=ck, levels=(LevelSpec("block4", 2), LevelSpec("block8", 2, pool=2,
                                                                                      parent=0)),
                                num_latents=96, kmeans_iters=10, hidden=8, num_aux=32, imle_batch_size=8,
                                steps_per_epoch=2, epochs=2, eval_samples=8, grid_samples=2, batch_size=32)
    rep = run_cluster_sampling(cfg, out, progress=False, quiet=True)
    ev = rep["evaluation"]
    assert len(ev["per_cluster"]) == 2 and np.array(ev["confusion"]).shape == (2, 3)
    assert np.array(ev["confusion"]).sum() == 16 and rep["imle"]["epochs"] == 2
    levels, arrays = load_clusters(out)
    assert [lv.layer for lv in levels] == ["block4", "block8"] and levels[1].centroids.shape[1] == 2 * 2 * 8
    assert ((arrays["leaf"] >= 0) == (arrays["labels"][:, 0] == 0)).all()
    for f in ("report.json", "report.md", "manifest.json", "samples_tc.png", "imle_objective.png", "config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with pytest.raises(ValueError, match="--resume"):
        run_cluster_sampling(cfg, out, progress=False, quiet=True)
    with pytest.raises(ValueError, match="num_latents"):
        run_cluster_sampling(dataclasses.replace(cfg, num_latents=100), out, resume=True, progress=False, quiet=True)


@pytest.mark.slow
def test_biggan_cross_class_transfer_mechanics(tmp_path):
    ck = _checkpoint(tmp_path, TINY_BIGGAN, "biggan")
    layer = TINY_BIGGAN.feature_layers()[1].name
    cfg = ClusterSamplingConfig(generator=ck, levels=(LevelSpec(layer, 2, pool=1),), class_label=3,
                                transfer_classes=(5, 7), num_latents=48, kmeans_iters=10, hidden=8, num_aux=32,
                                imle_batch_size=8, steps_per_epoch=2, epochs=2, eval_samples=4, grid_samples=2,
                                batch_size=16)
    rep = run_cluster_sampling(cfg, str(tmp_path / "run"), progress=False, quiet=True)
    assert [t["class"] for t in rep["transfer"]] == [5, 7]
    assert all(len(t["tc_accuracy"]) == 2 for t in rep["transfer"])
    assert os.path.isfile(tmp_path / "run" / "transfer.png")
    with pytest.raises(ValueError, match="class-conditional"):
        run_cluster_sampling(ClusterSamplingConfig(generator=ck, levels=cfg.levels), str(tmp_path / "r2"),
                             progress=False, quiet=True)


@pytest.mark.slow
def test_launch_sigkill_then_resume_reproduces_the_loss_curve(tmp_path):
    ck = _checkpoint(tmp_path, TINY_DCGAN, "dcgan")
    common = ["--checkpoint", ck, "--layer", "block4", "--clusters", "2", "--num-latents", "96", "--hidden", "8",
              "--num-aux", "32", "--imle-batch-size", "8", "--steps-per-epoch", "40", "--eval-samples", "8",
              "--grid-samples", "2", "--checkpoint-every", "1", "--no-progress", "--quiet"]
    script = os.path.join(ROOT, "launch", "cluster_sampling.py")
    env = {**os.environ, "XLA_FLAGS": ""}
    one_go = str(tmp_path / "one")
    subprocess.run([sys.executable, script, *common, "--epochs", "30", "--out", one_go], check=True, env=env)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, script, *common, "--epochs", "30", "--out", killed], env=env)
    ckdir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.isfile(os.path.join(killed, "report.json")), "the run ended before it was killed"
    subprocess.run([sys.executable, script, *common, "--epochs", "30", "--out", killed, "--resume"], check=True,
                   env=env)
    with open(os.path.join(one_go, "report.json")) as f:
        a = json.load(f)
    with open(os.path.join(killed, "report.json")) as f:
        b = json.load(f)
    assert b["imle"]["resumed_from"] is not None
    assert a["imle"]["history"] == b["imle"]["history"]
    assert a["evaluation"] == b["evaluation"]
