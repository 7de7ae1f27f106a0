"""Latent-direction segmenter (seed 004): Eq. 1 terms against NumPy and finite differences, Eq. 2 masks, refinement,
the BCE identity of the 2-class segmenter, baselines, families, devices, resume, launch script."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem import sharding
from gansem.generators import save_checkpoint
from gansem.generators.biggan import BigGANDeep
from gansem.generators.dcgan import DCGAN
from gansem.generators.pggan import PGGAN
from gansem.generators.stylegan import StyleGAN
from gansem.generators.stylegan2 import StyleGAN2
from gansem.methods import latent_direction as ld
from gansem.methods import latent_direction_run as ldr
from gansem.ufgs.records import open_dataset
from gansem.ufgs.train import pixel_cross_entropy
from gansem.zoo import load_generator
from kill_resume import kill_at_first_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DCGAN = DCGAN(nz=8, ngf=4, num_blocks=2)  # 16 x 16
FAMILIES = {
    "dcgan": TINY_DCGAN,
    "pggan": PGGAN(resolution=16, z_dim=16, fmaps_base=256, fmaps_max=16),
    "biggan": BigGANDeep(z_dim=16, n_classes=10, channel_width=4,
                         layers=((False, 16, 16), (True, 16, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
                                 (True, 2, 1)), attention_layer_position=3),
    "stylegan": StyleGAN(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, mapping_fmaps=16, fmaps_base=256,
                         fmaps_max=16),
    "stylegan2": StyleGAN2(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=8, mapping_layers=1),
}
CFG = ld.DirectionConfig(steps=3, batch_size=8, min_component=0.0)


def _numpy_params(gen, seed=0, scale=0.5):
    """Random parameters without compiling an initialiser: shapes from eval_shape, values from NumPy.

    BatchNorm running variances (leaves named ``var``) are drawn positive.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(gen.init_params, jax.random.key(0))

    def fill(path, s):
        x = scale * rng.standard_normal(s.shape)
        return (np.abs(x) + 0.5 if "var" in jax.tree_util.keystr(path) else x).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _load_launch():
    spec = importlib.util.spec_from_file_location("latent_direction_launch",
                                                  os.path.join(ROOT, "launch", "latent_direction.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    spec.loader.exec_module(mod)
    return mod


# -- NumPy references --------------------------------------------------------------------


def _np_radial(h, w):
    r = np.zeros((h, w))
    alpha = 4.0 / np.sqrt((h - 1) ** 2 + (w - 1) ** 2)
    for i in range(h):
        for j in range(w):
            r[i, j] = 1.0 - alpha * np.hypot(i - (h - 1) / 2, j - (w - 1) / 2)
    return r


def _np_sobel(x):
    """Σ_c (g ⋆ x_c)² + (gᵀ ⋆ x_c)², g = [1 2 1]ᵀ[1 0 -1], correlation with replicated edges; x [B, H, W, C]."""
    g = np.outer([1, 2, 1], [1, 0, -1]).astype(np.float64)
    b, h, w, c = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros((b, h, w))
    for i in range(h):
        for j in range(w):
            patch = xp[:, i:i + 3, j:j + 3, :]  # [B, 3, 3, C]
            gx = np.einsum("bklc,kl->bc", patch, g)
            gy = np.einsum("bklc,kl->bc", patch, g.T)
            out[:, i, j] = np.sum(gx ** 2 + gy ** 2, axis=-1)
    return out


def _np_losses(x_shift, x):
    u, u0 = (x_shift + 1) / 2, (x + 1) / 2
    h, w = x.shape[1:3]
    lc = -np.mean(np.einsum("nhwc,hw->n", u, _np_radial(h, w))) / (h * w)
    ls = np.mean((_np_sobel(u) - _np_sobel(u0)) ** 2)
    return lc, ls


# -- Eq. 1 ---------------------------------------------------------------------------------


def test_radial_prior_is_one_at_the_centre_and_minus_one_at_the_corners():
    for h, w in ((5, 5), (4, 6)):
        r = np.asarray(ld.radial_prior(h, w))
        np.testing.assert_allclose(r, _np_radial(h, w), atol=1e-6)
        np.testing.assert_allclose(r[[0, 0, -1, -1], [0, -1, 0, -1]], -1.0, atol=1e-6)
    assert np.isclose(np.asarray(ld.radial_prior(5, 5))[2, 2], 1.0)


def test_sobel_energy_and_losses_match_numpy(rng):
    x = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
    xs = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ld.sobel_energy(x)), _np_sobel(x), rtol=1e-5, atol=1e-5)
    # a vertical step edge: |g ⋆ x| = 4 * step along it (one channel), nothing across it
    step = np.zeros((1, 4, 4, 1), np.float32)
    step[..., 2:, :] = 1.0
    np.testing.assert_allclose(np.asarray(ld.sobel_energy(step))[0], [[0, 16, 16, 0]] * 4)
    lc, ls = _np_losses(xs, x)
    prior = ld.radial_prior(5, 6)
    np.testing.assert_allclose(float(ld.brightness_loss(xs, prior)), lc, rtol=1e-5)
    np.testing.assert_allclose(float(ld.edge_loss(xs, x)), ls, rtol=1e-5)
    total, lc2, ls2 = ld.direction_objective(xs, x, -2.5, prior)
    np.testing.assert_allclose(float(total), -2.5 * lc + ls, rtol=1e-5)


def test_brightness_term_prefers_a_bright_centre_for_positive_lambda():
    prior = ld.radial_prior(8, 8)
    centre = -np.ones((1, 8, 8, 3), np.float32)
    centre[:, 2:6, 2:6] = 1.0
    border = -centre
    assert float(ld.brightness_loss(centre, prior)) < float(ld.brightness_loss(border, prior))
    # an edge-preserving shift costs nothing in L_s
    assert float(ld.edge_loss(centre, centre)) == 0.0


def test_gradients_match_finite_differences(rng):
    x = rng.uniform(-0.8, 0.8, (2, 6, 6, 3)).astype(np.float32)
    xs = rng.uniform(-0.8, 0.8, (2, 6, 6, 3)).astype(np.float32)
    prior = ld.radial_prior(6, 6)
    fns = {"brightness": lambda a: ld.brightness_loss(a, prior), "sobel": lambda a: ld.edge_loss(a, x)}
    for name, f in fns.items():
        grad = np.asarray(jax.grad(f)(xs))
        for _ in range(3):
            d = rng.standard_normal(xs.shape).astype(np.float32)
            d /= np.linalg.norm(d)
            h = 1e-2
            fd = (float(f(xs + h * d)) - float(f(xs - h * d))) / (2 * h)
            np.testing.assert_allclose(float(np.sum(grad * d)), fd, rtol=2e-2, atol=1e-5, err_msg=name)
    # through the normalisation v = u / ||u||: the gradient is tangent to the sphere
    u = jnp.asarray(rng.standard_normal(5), jnp.float32)
    target = jnp.asarray(rng.standard_normal(5), jnp.float32)
    g = np.asarray(jax.grad(lambda a: jnp.sum(ld.unit(a) * target))(u))
    assert abs(float(np.dot(g, np.asarray(u)))) < 1e-5


# -- masks and refinement -----------------------------------------------------------------


def test_remove_small_components_on_a_hand_made_mask():
    m = np.zeros((8, 8), bool)
    m[1:6, 1:6] = True      # a 25-pixel blob
    m[3, 3] = False          # a 1-pixel hole in it
    m[7, 6:8] = True         # a 2-pixel speck
    m[0, 7] = True           # touches the speck only diagonally: its own component with 4-connectivity
    out = ld.remove_small_components(m, 3)
    want = np.zeros((8, 8), bool)
    want[1:6, 1:6] = True
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(ld.remove_small_components(m, 1), m)  # nothing is smaller than 1 pixel
    # a 2-pixel speck survives a limit of 2
    assert ld.remove_small_components(m, 2)[7, 6:8].all()


def test_refinement_rules():
    cfg = ld.DirectionConfig(min_foreground=0.1, max_foreground=0.7, min_change=0.05, min_component=0.05)
    masks = np.zeros((4, 10, 10), bool)
    masks[0, 2:8, 2:8] = True                  # 36 %: kept
    masks[0, 0, 9] = True                      # one stray pixel (< 5 pixels): removed
    masks[1, 4:6, 4:6] = True                  # 4 % of the image, and below 5 pixels: removed -> empty: too small
    masks[2, :, :8] = True                     # 80 %: too large
    masks[3, 2:8, 2:8] = True                  # fine, but no brightness change
    change = np.array([0.1, 0.1, 0.1, 0.01])
    refined, keep, why = ld.refine_masks(masks, change, cfg)
    np.testing.assert_array_equal(keep, [True, False, False, False])
    np.testing.assert_array_equal(why["too_small"], [False, True, False, False])
    np.testing.assert_array_equal(why["too_large"], [False, False, True, False])
    np.testing.assert_array_equal(why["no_change"], [False, False, False, True])
    assert not refined[0, 0, 9] and refined[0].sum() == 36 and refined[1].sum() == 0


def test_masks_follow_eq_2_and_the_sample_stream():
    gen, params = TINY_DCGAN, _numpy_params(TINY_DCGAN)
    rng = np.random.default_rng(1)
    vl, vd = (ld.unit(jnp.asarray(rng.standard_normal(8), jnp.float32)) for _ in range(2))
    z = np.asarray(jax.random.normal(jax.random.key(0), (3, 8)))
    out = jax.jit(lambda p, z: ld.direction_masks(gen, p, vl, vd, 2.0, z))(params, z)
    xl = np.asarray(gen.synthesize(params, z + 2.0 * np.asarray(vl))[0])
    xd = np.asarray(gen.synthesize(params, z + 2.0 * np.asarray(vd))[0])
    diff = ((xl + 1) / 2 - (xd + 1) / 2).mean(-1)
    np.testing.assert_allclose(np.asarray(out["difference"]), diff, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["mask"]), diff > 0)
    np.testing.assert_allclose(np.asarray(out["change"]), np.abs(diff).mean((1, 2)), atol=1e-6)


# -- families ---------------------------------------------------------------------------------


def test_latent_space_per_family_and_refusals():
    assert {f: ld.latent_space(g) for f, g in FAMILIES.items()} == {
        "dcgan": "z", "pggan": "z", "biggan": "z", "stylegan": "w", "stylegan2": "w"}
    assert ld.direction_dim(FAMILIES["stylegan2"]) == 8 and ld.direction_dim(FAMILIES["biggan"]) == 16
    assert CFG.shift(FAMILIES["dcgan"]) == 2.0 and CFG.shift(FAMILIES["stylegan2"]) == 0.2
    synth, _, _ = load_generator("synthetic-bands")
    with pytest.raises(ld.LatentDirectionError, match="no such code to shift"):
        CFG.check(synth)
    for bad, match in ((dict(lam=0.0), "lam"), (dict(epsilon=-1.0), "epsilon"), (dict(batch_size=6), "multiple"),
                       (dict(min_foreground=0.9), "min_foreground"), (dict(min_component=1.0), "min_component")):
        with pytest.raises(ld.LatentDirectionError, match=match):
            CFG.replace(**bad).check(TINY_DCGAN, 4)


def test_w_shift_moves_every_layer_and_z_shift_the_input():
    shift = jnp.arange(3.0)
    ws = jnp.zeros((2, 4, 3))
    out = np.asarray(ld.shift_codes(FAMILIES["stylegan2"], ws, shift))
    np.testing.assert_array_equal(out, np.broadcast_to(np.arange(3.0), (2, 4, 3)))
    z = jnp.zeros((2, 3))
    np.testing.assert_array_equal(np.asarray(ld.shift_codes(TINY_DCGAN, z, shift)), np.broadcast_to(np.arange(3.0),
                                                                                                   (2, 3)))


# -- segmenter loss, baselines, metrics -------------------------------------------------------------


def test_two_class_softmax_cross_entropy_is_the_papers_bce(rng):
    logits = rng.normal(0, 3, (2, 4, 4, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (2, 4, 4))
    s = logits[..., 1] - logits[..., 0]
    sigma = 1 / (1 + np.exp(-s.astype(np.float64)))
    bce = -np.mean(labels * np.log(sigma) + (1 - labels) * np.log(1 - sigma))  # -log p(m | s), Sec. 3.2
    np.testing.assert_allclose(float(pixel_cross_entropy(logits, labels)), bce, rtol=1e-5)


def test_ellipse_baseline_and_metric_table():
    ref = np.zeros((3, 9, 9), np.uint8)
    ref[0, 2:7, 1:8] = 1    # box 5 x 7
    ref[1, 1:8, 2:7] = 1    # box 7 x 5
    ref[2] = 255            # skipped by the labeller
    assert ldr.mean_box_size(ref, 255) == (6.0, 6.0)
    e = ldr.ellipse_mask(9, 9, 5.0, 7.0)
    assert e[4, 4] and e[4, 1] and e[4, 7] and not e[4, 0] and e[2, 4] and not e[1, 4]
    np.testing.assert_array_equal(e, e[::-1]) and np.testing.assert_array_equal(e, e[:, ::-1])
    table = ldr.evaluate_masks({"ref": ref[:2].astype(bool), "all": np.ones((2, 9, 9), bool)}, ref[:2])
    assert table["ref"]["iou_fg"] == 1.0 and table["ref"]["max_f_beta"] == pytest.approx(1.0)
    assert table["all"]["iou_fg"] == pytest.approx(35 / 81) and table["all"]["iou_bg"] == 0.0
    assert table["all"]["recall"] == 1.0 and table["all"]["accuracy"] == pytest.approx(35 / 81)
    with pytest.raises(ValueError, match="no foreground"):
        ldr.mean_box_size(np.zeros((2, 4, 4), np.uint8))


# -- launch script -----------------------------------------------------------------------------


def test_launch_help_explains_every_flag(capsys):
    mod = _load_launch()
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--generator", "--lam", "--epsilon", "--steps", "--min-foreground", "--max-foreground",
                 "--min-change", "--min-component", "--dataset-samples", "--train-steps", "--labels", "--resume",
                 "--devices", "--out"):
        assert flag in text
    assert all(a.help for a in mod.build_parser()._actions)


def test_launch_refuses_bad_input_in_one_line(tmp_path, capsys):
    mod = _load_launch()
    assert mod.main(["--generator", "synthetic-bands", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the latent-direction segmenter shifts a generator's latent code") and \
        err.count("\n") == 1
    ck = save_checkpoint(str(tmp_path / "dcgan"), TINY_DCGAN, jax.tree.map(np.asarray, _numpy_params(TINY_DCGAN)))
    assert mod.main(["--generator", ck, "--lam", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "lam (λ) must be > 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


# -- the optimisation: families, devices, resume, the run (compiles generators: seconds each) ---------------


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_directions_and_masks_on_every_family(family):
    gen = FAMILIES[family]
    params = _numpy_params(gen, scale=0.2)
    res = ld.optimise_directions(gen, params, CFG, jax.random.key(0), log_every=1)
    assert res.steps == 3 and len(res.history) == 3
    assert all(np.isfinite(v) for r in res.history for v in r.values())
    for v in (res.v_light, res.v_dark):
        assert v.shape == (ld.direction_dim(gen),) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    out = ld.sample_masks(gen, params, CFG, res.v_light, res.v_dark, jax.random.key(1), np.arange(3))
    assert out["mask"].shape == (3, gen.resolution, gen.resolution) and out["mask"].dtype == bool
    assert ("class_label" in out) == bool(gen.num_classes)


@pytest.mark.slow
def test_one_and_eight_devices_agree():
    gen, params = TINY_DCGAN, _numpy_params(TINY_DCGAN)
    runs = [ld.optimise_directions(gen, params, CFG, jax.random.key(3), mesh=sharding.make_mesh(n), log_every=1)
            for n in (1, 8)]
    np.testing.assert_allclose(runs[0].v_light, runs[1].v_light, atol=2e-5)
    np.testing.assert_allclose(runs[0].v_dark, runs[1].v_dark, atol=2e-5)
    for a, b in zip(runs[0].history, runs[1].history):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    masks = [ld.sample_masks(gen, params, CFG, runs[0].v_light, runs[0].v_dark, jax.random.key(4), np.arange(5),
                             mesh=sharding.make_mesh(n), batch_size=8) for n in (1, 8)]
    for name in masks[0]:
        np.testing.assert_array_equal(masks[0][name], masks[1][name], err_msg=name)


_KILL_SCRIPT = """
import sys, jax, numpy as np
from gansem.generators.base import load_checkpoint
from gansem.methods import latent_direction as ld
gen, params, _ = load_checkpoint(sys.argv[1])
cfg = ld.DirectionConfig(steps=int(sys.argv[3]), batch_size=8)
res = ld.optimise_directions(gen, params, cfg, jax.random.key(5), run_dir=sys.argv[2], resume=True,
                             checkpoint_every=2, log_every=1)
np.save(sys.argv[2] + "/v.npy", np.stack([res.v_light, res.v_dark]))
"""


@pytest.mark.slow
def test_direction_search_resumes_after_a_kill(tmp_path):
    ck = save_checkpoint(str(tmp_path / "dcgan"), TINY_DCGAN, jax.tree.map(np.asarray, _numpy_params(TINY_DCGAN)))
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    run = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, ck, run, "100000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = os.path.join(run, "checkpoints")
    kill_at_first_checkpoint(proc, ckpts, timeout=240, settle=1.0, poll=0.5)
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert steps, "no checkpoint before the kill"
    target = steps[-1] + 4
    subprocess.run([sys.executable, "-c", _KILL_SCRIPT, ck, run, str(target)], env=env, check=True)
    straight = str(tmp_path / "straight")
    subprocess.run([sys.executable, "-c", _KILL_SCRIPT, ck, straight, str(target)], env=env, check=True)
    np.testing.assert_array_equal(np.load(run + "/v.npy"), np.load(straight + "/v.npy"))


@pytest.mark.slow
def test_run_end_to_end_with_a_reference_and_resume(tmp_path):
    gen, params = TINY_DCGAN, _numpy_params(TINY_DCGAN, scale=0.3)
    cfg = ld.DirectionConfig(steps=4, batch_size=8, min_foreground=0.0, max_foreground=1.0, min_change=0.0,
                             min_component=0.0)
    centre = np.zeros((16, 16), np.int32)
    centre[4:12, 4:12] = 1
    labels = lambda images: np.broadcast_to(centre, images.shape[:3]).copy()  # noqa: E731
    out = str(tmp_path / "run")
    kw = dict(seed=2, dataset_samples=12, shard_size=5, mask_batch_size=8, train_steps=3, train_batch_size=8,
              eval_samples=6, labels=labels, checkpoint_every=2, model_kwargs={"features": [4, 8]}, progress=False,
              quiet=True)
    s = ldr.run_latent_direction(gen, params, cfg, out, **kw)
    for f in ("config.json", "directions.png", "directions-loss.png", "evaluation.png", "report.md", "report.json",
              "manifest.json", "directions/directions.npz", "segmenter/model.json", "dataset/preview.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert set(s["evaluation"]["table"]) == {"segmenter", "M(z)", "all foreground", "centred ellipse"}
    assert s["evaluation"]["table"]["all foreground"]["iou_fg"] == pytest.approx(64 / 256)
    assert s["evaluation"]["ellipse"] == [8.0, 8.0]
    ds = open_dataset(os.path.join(out, "dataset"), verify=True)
    assert len(ds) == 12 and ds.num_classes == 2 and ds[11]["latent"].shape == (8,)
    ds.close()
    assert "| M(z) |" in open(os.path.join(out, "report.md")).read()
    with pytest.raises(ld.LatentDirectionError, match="already holds a latent-direction run"):
        ldr.run_latent_direction(gen, params, cfg, out, **kw)
    with pytest.raises(ld.LatentDirectionError, match="cannot resume"):
        ldr.run_latent_direction(gen, params, cfg.replace(lam=2.0), out, resume=True, **kw)
    again = ldr.run_latent_direction(gen, params, cfg, out, resume=True, **kw)
    assert again["directions"]["resumed_from"] == 4 and again["segmenter"]["resumed_from"] == 3
    assert again["evaluation"]["table"] == s["evaluation"]["table"]
    assert json.load(open(os.path.join(out, "report.json")))["dataset"]["samples"] == 12
