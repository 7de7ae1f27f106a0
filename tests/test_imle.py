"""Cluster-guided IMLE synthesis (seed 002): NN matching, T_c, vmapped training, resume, hierarchy, launch script."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gansem.generators.biggan import BigGANDeep
from gansem.generators.dcgan import DCGAN
from gansem.generators.base import save_checkpoint
from gansem.methods import imle
from gansem.methods.cluster_sampling import (ClusterSamplingConfig, collapse_check, load_clusters,
                                             mean_pairwise_distance, run_cluster_sampling)
from gansem.methods.latent_clusters import ClusterLevel, LevelSpec, leaf_labels
from kill_resume import kill_at_first_checkpoint

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
                           candidate_tile=16, latent_radius=2.0, lr_decay=0.9)


def _numpy_variables(config, c, rng):
    """Stacked ``T_c`` variables for ``c`` clusters, filled with numpy from the shapes (nothing to compile)."""
    shapes = jax.eval_shape(lambda k: imle.init_state(config, k, np.arange(c)), jax.random.key(0))
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) / 2).astype(np.float32), shapes.params)
    stats = jax.tree.map(lambda x: np.ones(x.shape, np.float32), shapes.batch_stats)
    return params, stats


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


def test_mapping_net_puts_its_outputs_on_the_sphere_of_the_latent_radius(rng):
    model = imle.MappingNet(out_dim=7, hidden=12, radius=3.5)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((4, 5), np.float32), train=False))
    variables = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) ** 2 + 0.1, shapes)
    for train in (True, False):
        out = model.apply(variables, rng.standard_normal((9, 5)).astype(np.float32), train=train,
                          mutable=["batch_stats"] if train else False)
        out = np.asarray(out[0] if train else out)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 3.5, rtol=1e-5)
    with pytest.raises(imle.IMLEError, match="latent_radius"):
        dataclasses.replace(TINY_CFG, latent_radius=0.0).check()
    with pytest.raises(imle.IMLEError, match="lr_decay"):
        dataclasses.replace(TINY_CFG, lr_decay=1.5).check()


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
        e_eval = imle.evaluation_draw(TINY_CFG, jax.random.key(8), t.cluster_ids)
        for e in range(2):
            s, m = step(s, t, jax.random.fold_in(key, e), e_eval)
        return s, m

    both, m_both = train(targets)
    for c in range(2):
        alone, m_alone = train(imle.ClusterTargets(targets.z[c:c + 1], targets.counts[c:c + 1],
                                                   targets.cluster_ids[c:c + 1]))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[c], np.asarray(b)[0], rtol=2e-5,
                                                             atol=1e-6), both.params, alone.params)
        for name in ("objective", "matching_objective", "max_in_degree", "matched_fraction"):
            np.testing.assert_allclose(np.asarray(m_both[name])[c], np.asarray(m_alone[name])[0], rtol=2e-5)


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


def test_epoch_metrics_hubness_and_objective_against_numpy(rng):
    """One epoch: the hubness metrics of the epoch's own draw and Eq. 2 on the fixed draw, by brute-force NumPy."""
    targets = _tiny_targets(rng, counts=(24, 9))
    k_ep = jax.random.key(6)
    params, stats = _numpy_variables(TINY_CFG, 2, rng)
    state = imle.IMLEState(epoch=np.int32(0), params=params, batch_stats=stats,
                           opt_state=jax.vmap(imle._optimizer(TINY_CFG).init)(params))
    e_eval = rng.standard_normal((2, 40, 3)).astype(np.float32)   # the fixed draw: any [C, G, aux] array
    # the epoch's draw, as the program makes it: Γ·aux normals, then M for the row order, per cluster
    noise = np.asarray(imle._cluster_noise(k_ep, targets.cluster_ids, 40 * 3 + targets.z.shape[1]))
    e = noise[:, :120].reshape(2, 40, 3)
    x = np.asarray(imle.map_auxiliary(TINY_CFG, state.params, state.batch_stats, e, train=True))
    new, m = imle.epoch_program(TINY_CFG)(state, targets, k_ep, e_eval)
    x_eval = np.asarray(imle.map_auxiliary(TINY_CFG, new.params, new.batch_stats, e_eval, train=True))
    for c in range(2):
        z = targets.z[c, :targets.counts[c]].astype(np.float64)
        d = ((z[:, None] - x[c][None]) ** 2).sum(-1)
        deg = np.bincount(d.argmin(1), minlength=40)
        assert m["max_in_degree"][c] == deg.max()
        np.testing.assert_allclose(m["matched_fraction"][c], (deg > 0).sum() / min(len(z), 40), rtol=1e-6)
        np.testing.assert_allclose(m["matching_objective"][c], d.min(1).mean(), rtol=1e-5)
        d_eval = ((z[:, None] - x_eval[c][None]) ** 2).sum(-1)
        np.testing.assert_allclose(m["objective"][c], d_eval.min(1).mean(), rtol=1e-5)
    assert int(new.epoch) == 1


@pytest.mark.slow  # 2 × 50 epochs of a 32-d problem, two configs to compile: ~30 s on a busy 2-core CPU
def test_unconstrained_imle_shrinks_in_high_dimension_and_the_sphere_does_not(rng):
    """The collapse the sphere fixes, on Gaussian targets in d = 32 (s* = sqrt(2 ln Γ / d) ≈ 0.59 for Γ = 256)."""
    d = 32
    z = rng.standard_normal((256, d)).astype(np.float32)
    targets = imle.pack_targets(z, np.zeros(256, int), [0])
    base = imle.IMLEConfig(latent_dim=d, hidden=64, num_aux=256, batch_size=64, lr=3e-3, lr_decay=0.97)
    radius = float(np.sqrt((z ** 2).sum(1).mean()))
    checks = {}
    for name, cfg in (("free", base), ("sphere", dataclasses.replace(base, latent_radius=radius))):
        res = imle.train_imle(targets, jax.random.key(1), cfg, epochs=50)
        obj = np.array([r["objective"][0] for r in res.history])
        assert obj[-1] < obj[0]
        s = np.asarray(imle.sample_cluster_latents(res.config, res.state, jax.random.key(2), [0], 512))[0]
        checks[name] = collapse_check([s], [z])[0]
    assert checks["free"]["norm_ratio"] < 0.8 and checks["free"]["collapsed"]
    assert abs(checks["sphere"]["norm_ratio"] - 1) < 0.05 and not checks["sphere"]["collapsed"]
    assert checks["sphere"]["latent_diversity_ratio"] > 0.8


# -- the collapse check ----------------------------------------------------------------------------


def test_mean_pairwise_distance_matches_brute_force(rng):
    x = rng.standard_normal((13, 2, 3))
    flat = x.reshape(13, -1)
    ref = np.mean([np.linalg.norm(flat[i] - flat[j]) for i in range(13) for j in range(13) if i != j])
    np.testing.assert_allclose(mean_pairwise_distance(x), ref, rtol=1e-10)
    assert mean_pairwise_distance(x[:1]) == 0.0


def test_collapse_check_flags_shrunk_and_degenerate_mappings(rng):
    targets = [rng.standard_normal((300, 50)) + 0.3 for _ in range(4)]
    good = rng.standard_normal((300, 50)) + 0.3                       # the same distribution
    shrunk = 0.4 * (rng.standard_normal((300, 50))) + 0.3             # IMLE's unconstrained fixed point
    sphere = good / np.linalg.norm(good, axis=1, keepdims=True) * np.linalg.norm(targets[2], axis=1).mean()
    clump = np.linalg.norm(targets[3], axis=1).mean() * (np.ones((300, 50)) + 0.05 * rng.standard_normal((300, 50))
                                                         ) / np.sqrt(50)   # right norm, no diversity
    out = collapse_check([good, shrunk, sphere, clump], targets)
    assert [o["collapsed"] for o in out] == [False, True, False, True]
    assert out[1]["norm_ratio"] < 0.5 and out[3]["latent_diversity_ratio"] < 0.1
    assert abs(out[2]["norm_ratio"] - 1) < 0.01 and out[0]["image_diversity_ratio"] is None
    imgs = rng.integers(0, 256, (4, 6, 8, 8, 3))
    flat = np.full((6, 8, 8, 3), 120)                                 # a texture: every image the same
    out = collapse_check([good, good], targets[:2], [imgs[0], flat], [imgs[1], imgs[2]])
    assert [o["collapsed"] for o in out] == [False, True] and out[1]["image_diversity_ratio"] == 0.0


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
                 "--transfer-classes", "--eval-samples", "--out", "--devices", "--no-progress", "--lr-decay",
                 "--no-sphere", "--diversity-samples"):
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
    assert len(rep["collapse"]) == 2 and all(abs(k["norm_ratio"] - 1) < 0.2 for k in rep["collapse"])
    assert rep["imle"]["latent_radius"] > 0 and len(rep["imle"]["cluster_objective_rises_at_epochs"]) == 2
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
    kill_at_first_checkpoint(proc, ckdir, timeout=120, settle=0.3)
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
