"""Labels4Free (seed 001): losses, composition, G_bg channel zeroing, analyses, networks, metrics, training runs."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gansem import sharding
from gansem.generators import save_checkpoint
from gansem.generators.base import GeneratorError
from gansem.generators.dcgan import DCGAN
from gansem.generators.stylegan import StyleGAN
from gansem.generators.stylegan2 import StyleGAN2
from gansem.methods import labels4free as l4f
from gansem.methods.labels4free_run import Labels4FreeError, _folder_reference, evaluate_masks, fit_labels4free
from gansem.methods.stylegan2_discriminator import StyleGAN2Discriminator, minibatch_stddev
from gansem.zoo import load_generator
from kill_resume import kill_at_first_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = StyleGAN2(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=8, mapping_layers=1)
SMALL = StyleGAN2(z_dim=8, w_dim=8, img_resolution=16, channel_base=64, channel_max=8, mapping_layers=1)
RUN_CFG = l4f.Labels4FreeConfig(alpha_start=8, alpha_channels=4, lambda_b=1.2, lambda_c=1.0, lambda_e=0.5,
                                batch_size=8, steps=4, d_channel_base=32, d_channel_max=4)


def _numpy_params(gen, seed=0):
    """Random parameters without compiling an initialiser: shapes from eval_shape, values from NumPy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(gen.init_params, jax.random.key(0))
    return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _numpy_module_params(module, *args, seed=0, scale=0.3):
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(s.dtype), shapes)


def _ws(gen, params, n=2, seed=1):
    z = np.random.default_rng(seed).standard_normal((n, gen.z_dim)).astype(np.float32)
    return gen.map_latents(params, z)


# -- losses and composition against NumPy -----------------------------------------------------------------


def test_losses_and_composite_match_numpy(rng):
    m = rng.uniform(size=(3, 4, 4)).astype(np.float32)
    m[0] = 0.9                                            # mean 0.9: C inactive, E active
    fg, bg = rng.normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(l4f.composite(m, fg, bg), m[..., None] * fg + (1 - m[..., None]) * bg, rtol=1e-6)
    np.testing.assert_allclose(l4f.binarization_loss(m), np.minimum(m, 1 - m).mean(), rtol=1e-6)
    phi = 0.3
    c_ref = np.maximum(phi - m.mean(axis=(1, 2)), 0).mean()
    e_ref = np.maximum(phi - (1 - m).mean(axis=(1, 2)), 0).mean()
    np.testing.assert_allclose(l4f.min_foreground_loss(m, phi), c_ref, rtol=1e-6)
    np.testing.assert_allclose(l4f.min_background_loss(m, phi), e_ref, rtol=1e-6)
    assert e_ref > 0                                       # the hinge is active for image 0
    assert float(l4f.min_foreground_loss(np.full((2, 3, 3), 0.5, np.float32), 0.25)) == 0.0
    real, fake = rng.normal(size=(2, 5)).astype(np.float32)
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    np.testing.assert_allclose(l4f.nonsaturating_g_loss(fake), softplus(-fake).mean(), rtol=1e-6)
    np.testing.assert_allclose(l4f.nonsaturating_d_loss(real, fake), softplus(fake).mean() + softplus(-real).mean(),
                               rtol=1e-6)


def test_composite_endpoints_and_gradient():
    fg, bg = np.ones((1, 2, 2, 3), np.float32), np.zeros((1, 2, 2, 3), np.float32)
    np.testing.assert_array_equal(l4f.composite(np.ones((1, 2, 2), np.float32), fg, bg), fg)
    np.testing.assert_array_equal(l4f.composite(np.zeros((1, 2, 2), np.float32), fg, bg), bg)
    g = jax.grad(lambda m: jnp.sum(l4f.composite(m, fg + 2.0, bg)))(np.full((1, 2, 2), 0.3, np.float32))
    np.testing.assert_allclose(g, np.full((1, 2, 2), 3 * 3.0))   # d/dM Σ (M fg + (1-M) bg) = Σ_c (fg - bg)


# -- G_bg: the port's layer edits -------------------------------------------------------------------------


def test_background_generator_zeroes_the_first_layer_like_zeroed_weights():
    params = _numpy_params(TINY)
    ws = _ws(TINY, params)
    img, feats = TINY.synthesize_styles(params, ws, capture=["b4.conv1"])
    bg, bfeats = TINY.synthesize_styles(params, ws, capture=["b4.conv1"], edits=l4f.background_edits(TINY))
    assert np.all(np.asarray(bfeats["b4.conv1"]) == 0)
    assert np.abs(np.asarray(bg - img)).max() > 1e-3
    # an independent construction of the same G_bg: b4.conv1's weight, bias and noise strength set to zero
    # (demodulation of a zero weight gives 0, so the layer outputs lrelu(0) = 0 everywhere)
    zp = jax.tree.map(np.array, params)
    conv = zp["params"]["synthesis"]["b4"]["conv1"]
    for k in ("weight", "bias", "noise_strength"):
        conv[k] = np.zeros_like(conv[k])
    ref, _ = TINY.synthesize_styles(zp, ws)
    np.testing.assert_allclose(bg, ref, atol=1e-5)


def test_background_generator_partial_channels_and_edit_names():
    params = _numpy_params(TINY)
    ws = _ws(TINY, params)
    _, feats = TINY.synthesize_styles(params, ws, capture=["b4.conv1"])
    _, part = TINY.synthesize_styles(params, ws, capture=["b4.conv1"],
                                     edits=l4f.background_edits(TINY, channels=[0, 2]))
    a, b = np.asarray(feats["b4.conv1"]), np.asarray(part["b4.conv1"])
    assert np.all(b[..., [0, 2]] == 0)
    keep = [c for c in range(a.shape[-1]) if c not in (0, 2)]
    np.testing.assert_allclose(b[..., keep], a[..., keep], rtol=1e-6)
    with pytest.raises(GeneratorError, match="cannot edit"):
        TINY.synthesize_styles(params, ws, edits={"b8.img": (0.0, 0.0)})
    with pytest.raises(GeneratorError, match="not a feature layer"):
        l4f.background_edits(TINY, "b4.torgb")


# -- analyses --------------------------------------------------------------------------------------------


def test_ssim_matches_skimage(rng):
    metrics = pytest.importorskip("skimage.metrics")
    a = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    b = np.clip(a + 0.2 * rng.normal(size=a.shape), 0, 1).astype(np.float32)
    ours = np.asarray(l4f.ssim(a, b))
    ref = [metrics.structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False) for i in range(2)]
    np.testing.assert_allclose(ours, ref, atol=2e-4)
    np.testing.assert_allclose(l4f.ssim(a, a), 1.0, atol=1e-5)


def test_select_alpha_start_follows_the_paper_rule():
    # FFHQ (Sec. 3.1): the 3rd tRGB's SSIM is ~25 % above the 4th's -> keep from the 4th (32 px) on
    assert l4f.select_alpha_start({4: 0.95, 8: 0.93, 16: 0.90, 32: 0.72, 64: 0.5}) == 32
    assert l4f.select_alpha_start({4: 0.9, 8: 0.6, 16: 0.3}) == 8
    assert l4f.select_alpha_start({4: 0.5, 8: 0.49, 16: 0.48}) == 4            # no drop: keep everything


def test_trgb_noise_ssim_covers_every_resolution():
    params = _numpy_params(TINY)
    out = l4f.trgb_noise_ssim(TINY, params, _ws(TINY, params), jax.random.key(0))
    assert set(out) == {4, 8} and all(-1 <= v < 0.999 for v in out.values())   # noise changes the image


def test_gradient_scores_vanish_at_the_image_and_rank_layers():
    params = _numpy_params(TINY)
    ws = _ws(TINY, params)
    img, _ = TINY.synthesize_styles(params, ws)
    zero = l4f.layer_gradient_scores(TINY, params, ws, img)          # ∂‖G − G‖²/∂T = 0
    assert set(zero) == {"b4.conv1", "b8.conv0", "b8.conv1"}
    assert all(v[0] < 1e-4 for v in zero.values())
    scores = l4f.layer_gradient_scores(TINY, params, ws, l4f.corner_backgrounds(img, 2))
    assert all(v[0] > 0 and v[1].shape == (8,) for v in scores.values())
    np.testing.assert_allclose(scores["b8.conv1"][0], scores["b8.conv1"][1].sum(), rtol=1e-5)
    assert l4f.strongest_layer(scores) in scores


def test_corner_backgrounds_upsamples_the_corner():
    img = np.zeros((1, 8, 8, 3), np.float32)
    img[0, :2, :2] = 0.7
    out = np.asarray(l4f.corner_backgrounds(img, 2))
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


# -- networks --------------------------------------------------------------------------------------------


def test_alpha_network_range_shape_and_pixel_independence(rng):
    net = l4f.AlphaNetwork(channels=4)
    feats = [rng.normal(size=(2, 4, 4, 3)).astype(np.float32), rng.normal(size=(2, 8, 8, 5)).astype(np.float32),
             rng.normal(size=(2, 8, 8, 5)).astype(np.float32)]
    params = _numpy_module_params(net, feats)
    apply = jax.jit(lambda p, f: net.apply({"params": p}, f))
    m = np.asarray(apply(params, feats))
    assert m.shape == (2, 8, 8) and np.all((m > 0) & (m < 1))
    # only 1x1 convolutions after the up-sampling: a change of the full-resolution features at one pixel
    # changes the mask at that pixel only
    moved = [f.copy() for f in feats]
    moved[2][0, 3, 5] += 5.0
    m2 = np.asarray(apply(params, moved))
    diff = np.abs(m2 - m) > 1e-7
    assert diff[0, 3, 5] and diff.sum() == 1


def test_minibatch_stddev_matches_numpy(rng):
    x = rng.normal(size=(8, 2, 2, 3)).astype(np.float32)
    y = np.asarray(minibatch_stddev(x, 4))
    groups = x.reshape(4, 2, 2, 2, 3)
    ref = np.sqrt(groups.var(axis=0) + 1e-8).mean(axis=(1, 2, 3))    # [2]
    np.testing.assert_allclose(y[:, 0, 0, 3], np.tile(ref, 4), rtol=1e-5)
    np.testing.assert_array_equal(y[..., :3], x)


def test_discriminator_gives_one_logit_per_image(rng):
    disc = StyleGAN2Discriminator(8, channel_base=32, channel_max=4, mbstd_group=2)
    img = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    params = _numpy_module_params(disc, img)
    assert set(params) >= {"fromrgb", "b8_conv0", "b8_conv1", "b8_skip", "b4_conv", "out_weight"}
    out = np.asarray(jax.jit(lambda p, x: disc.apply({"params": p}, x))(params, img))
    assert out.shape == (4,) and np.all(np.isfinite(out))


# -- configuration and families -------------------------------------------------------------------------


def test_only_stylegan2_is_accepted():
    for gen in (StyleGAN(), DCGAN()):
        with pytest.raises(GeneratorError, match="needs a StyleGAN2"):
            l4f.check_generator(gen)
    with pytest.raises(GeneratorError, match="conditional"):
        l4f.check_generator(StyleGAN2(c_dim=3, img_resolution=8, channel_base=64, channel_max=8))
    l4f.check_generator(TINY)


def test_named_configs_carry_the_papers_values():
    c = l4f.CONFIGS
    assert (c["ffhq"].steps, c["ffhq"].lambda_b, c["ffhq"].truncation, c["ffhq"].alpha_start) == (1000, 1.2, 1.0, 32)
    assert (c["lsun-cat"].steps, c["lsun-cat"].lambda_b, c["lsun-cat"].lambda_c, c["lsun-cat"].truncation) == \
        (900, 3.0, 3.0, 0.5)
    assert (c["lsun-horse"].steps, c["lsun-horse"].truncation, c["lsun-horse"].alpha_start) == (500, 1.0, 8)
    assert (c["lsun-car"].steps, c["lsun-car"].lambda_b, c["lsun-car"].truncation, c["lsun-car"].alpha_start) == \
        (250, 20.0, 0.3, 16)
    assert all(v.lr == 0.0002 and v.batch_size == 8 and v.d_loss_weight == 0.1 for v in c.values())
    with pytest.raises(ValueError, match="multiple of 3"):
        RUN_CFG.check(SMALL, num_devices=3)
    with pytest.raises(ValueError, match="alpha_start"):
        l4f.Labels4FreeConfig(alpha_start=64).check(SMALL)
    assert l4f.alpha_layers(SMALL, 8) == ("b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1")


# -- metrics ---------------------------------------------------------------------------------------------


def test_evaluate_masks_matches_numpy(rng):
    soft = rng.uniform(size=(3, 6, 6)).astype(np.float32)
    ref = (rng.uniform(size=(3, 6, 6)) > 0.4).astype(np.uint8)
    s = evaluate_masks(soft, ref, 0.5)
    p = soft > 0.5
    tp, fp = np.sum(p & (ref == 1)), np.sum(p & (ref == 0))
    fn, tn = np.sum(~p & (ref == 1)), np.sum(~p & (ref == 0))
    np.testing.assert_allclose(s["acc"], (tp + tn) / p.size)
    np.testing.assert_allclose(s["iou_fg"], tp / (tp + fp + fn))
    np.testing.assert_allclose(s["iou_bg"], tn / (tn + fp + fn))
    np.testing.assert_allclose(s["f1"], 2 * tp / (2 * tp + fp + fn))
    np.testing.assert_allclose(s["precision"], tp / (tp + fp))
    np.testing.assert_allclose(s["recall"], tp / (tp + fn))
    assert 0 < s["max_f_beta"] <= 1
    assert evaluate_masks(ref.astype(np.float32), ref, 0.5)["miou"] == 1.0


def test_folder_reference_reads_a_labelled_folder(tmp_path):
    for d in ("images", "masks"):
        os.makedirs(tmp_path / d)
    masks = []
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"eval_{i:05d}.png")
        m = np.zeros((4, 4), np.uint8)
        m[: i + 1, 1:3] = 2                              # class 2: foreground
        Image.fromarray(m).save(tmp_path / "masks" / f"eval_{i:05d}.png")
        masks.append(m)
    ref, desc = _folder_reference(str(tmp_path), 3, 4)
    np.testing.assert_array_equal(ref, (np.stack(masks) != 0).astype(np.uint8))
    assert desc["kind"] == "folder"
    with pytest.raises(Labels4FreeError, match="eval_00003"):
        _folder_reference(str(tmp_path), 4, 4)
    with pytest.raises(Labels4FreeError, match="8x8"):
        _folder_reference(str(tmp_path), 3, 8)


# -- training runs (slow: each compiles the training step) ------------------------------------------------


def _fit(out, mesh=None, **kw):
    kw.setdefault("analysis_samples", 0)
    kw.setdefault("eval_samples", 4)
    kw.setdefault("num_panels", 2)
    return fit_labels4free(SMALL, _numpy_params(SMALL), kw.pop("cfg", RUN_CFG), out, mesh=mesh,
                           progress=False, quiet=True, checkpoint_every=2, log_every=1, **kw)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    one = _fit(str(tmp_path / "one"))
    _fit(str(tmp_path / "two"), stop_after=2)
    two = _fit(str(tmp_path / "two"), resume=True)
    assert two.summary["resumed_from"] == 2
    jax.tree.map(np.testing.assert_array_equal, one.alpha_params, two.alpha_params)
    assert [r["a_loss"] for r in one.history] == [r["a_loss"] for r in two.history]
    with pytest.raises(Labels4FreeError, match="lambda_b|config"):
        _fit(str(tmp_path / "two"), resume=True, cfg=l4f.Labels4FreeConfig(**{**RUN_CFG.to_dict(), "lambda_b": 2.0}))
    with pytest.raises(Labels4FreeError, match="already holds"):
        _fit(str(tmp_path / "one"))
    for f in ("report.md", "panels.png", "curves.png", "manifest.json", "eval/images/eval_00003.png"):
        assert os.path.isfile(tmp_path / "one" / f), f
    # label the run's evaluation images (made-up masks), resume the finished run with the folder: scores + table
    folder = tmp_path / "labelled"
    os.makedirs(folder / "masks")
    os.symlink(tmp_path / "one" / "eval" / "images", folder / "images")
    ref = np.zeros((4, 16, 16), np.uint8)
    for i in range(4):
        ref[i, 4:12, 2 + i:10 + i] = 1
        Image.fromarray(ref[i] * 3).save(folder / "masks" / f"eval_{i:05d}.png")
    scored = _fit(str(tmp_path / "one"), resume=True, eval_folder=str(folder))
    soft = np.load(tmp_path / "one" / "eval" / "soft_masks.npy")
    assert scored.summary["evaluation"]["scores"] == evaluate_masks(soft, ref, RUN_CFG.mask_threshold)
    report = open(tmp_path / "one" / "report.md").read()
    assert "| Acc | IoU fg | IoU bg | mIoU | F1 | Prec | Rec | maxFβ (β²=0.3) |" in report


@pytest.mark.slow
def test_runs_on_rosinality_weights(tmp_path):
    gen, params, _ = load_generator(os.path.join(ROOT, "tests", "fixtures", "rosinality_stylegan2",
                                                 "stylegan2_tiny32.pt"))
    assert gen.weights_convention == "rosinality"
    cfg = l4f.Labels4FreeConfig(alpha_start=16, alpha_channels=4, steps=2, d_channel_base=64, d_channel_max=4)
    out = fit_labels4free(gen, params, cfg, None, analysis_samples=0, eval_samples=2, num_panels=2,
                          progress=False, quiet=True)
    assert len(out.history) == 2 and np.isfinite(out.history[-1]["a_loss"])


@pytest.mark.slow
def test_one_and_eight_devices_agree(tmp_path):
    one = _fit(None, mesh=sharding.make_mesh(1))
    eight = _fit(None, mesh=sharding.make_mesh(8))
    for a, b in zip(one.history, eight.history):
        for k in ("a_loss", "d_loss", "mask_mean"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), one.alpha_params,
                 eight.alpha_params)


@pytest.mark.slow
def test_launch_sigkill_then_resume(tmp_path):
    ck = save_checkpoint(str(tmp_path / "sg2"), SMALL, jax.tree.map(np.asarray, _numpy_params(SMALL)))
    common = ["--generator", ck, "--config", "cpu-demo", "--alpha-start", "8", "--batch-size", "8",
              "--analysis-samples", "2", "--eval-samples", "4", "--panels", "2", "--checkpoint-every", "1",
              "--log-every", "1", "--no-progress", "--quiet"]
    script = os.path.join(ROOT, "launch", "labels4free.py")
    env = {**os.environ, "XLA_FLAGS": ""}
    one_go = str(tmp_path / "one")
    subprocess.run([sys.executable, script, *common, "--steps", "12", "--out", one_go], check=True, env=env)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, script, *common, "--steps", "12", "--out", killed], env=env)
    ckdir = os.path.join(killed, "checkpoints")
    kill_at_first_checkpoint(proc, ckdir, timeout=300)
    assert not os.path.isfile(os.path.join(killed, "report.json")), "the run ended before it was killed"
    subprocess.run([sys.executable, script, *common, "--steps", "12", "--out", killed, "--resume"], check=True,
                   env=env)
    a, b = (json.load(open(os.path.join(d, "report.json"))) for d in (one_go, killed))
    assert b["summary"]["resumed_from"] is not None
    assert a["summary"]["evaluation"] == b["summary"]["evaluation"]
    la = [json.loads(line)["a_loss"] for line in open(os.path.join(one_go, "metrics.jsonl"))]
    lb = [json.loads(line)["a_loss"] for line in open(os.path.join(killed, "metrics.jsonl"))]
    assert la == lb


def _load_launch():
    spec = importlib.util.spec_from_file_location("labels4free_launch", os.path.join(ROOT, "launch", "labels4free.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    spec.loader.exec_module(mod)
    return mod


def test_launch_help_explains_every_flag():
    parser = _load_launch().build_parser()
    out = parser.format_help()
    assert all(a.help for a in parser._actions), "a flag without help"
    assert "StyleGAN2" in out and "refused" in out and "--resume" in out and "lsun-car" in out
