"""Style-mixing segmentation (seed 003): colour conversion, foreground rules, summary tensor, devices, launch script."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem import sharding
from gansem.cluster.kmeans import kmeans_fit_batched
from gansem.generators import save_checkpoint
from gansem.generators.biggan import BigGANDeep
from gansem.generators.dcgan import DCGAN
from gansem.generators.pggan import PGGAN
from gansem.generators.stylegan import StyleGAN
from gansem.generators.stylegan2 import StyleGAN2
from gansem.methods import stylemix as sm
from gansem.methods.stylemix_run import run_stylemix
from gansem.ufgs.records import open_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = StyleGAN2(z_dim=8, w_dim=8, img_resolution=8, channel_base=64, channel_max=8, mapping_layers=1)
CFG = sm.StyleMixConfig(num_variants=3, cutoff=2, k=2, foreground="corner", corner_size=2)


def _numpy_params(gen, seed=0):
    """Random parameters without compiling an initialiser: shapes from eval_shape, values from NumPy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(gen.init_params, jax.random.key(0))
    return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _load_launch():
    spec = importlib.util.spec_from_file_location("stylemix_segment", os.path.join(ROOT, "launch",
                                                                                   "stylemix_segment.py"))
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    spec.loader.exec_module(mod)
    return mod


# -- colour -----------------------------------------------------------------------------


def test_srgb_to_lab_matches_published_values():
    # sRGB primaries, white and mid grey in CIELAB (D65, 2°), as tabulated for the sRGB space
    rgb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5]], np.float32)
    ref = np.array([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602],
                    [100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.3890, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(sm.srgb_to_lab(rgb)), ref, atol=0.02)


def test_srgb_to_lab_matches_skimage(rng):
    color = pytest.importorskip("skimage.color")
    rgb = rng.uniform(size=(64, 3)).astype(np.float32)
    rgb[:4] = [[0.01, 0.02, 0.03], [0.04, 0.0404, 0.041], [1, 1, 0], [0.2, 0.7, 0.9]]  # the linear segment too
    np.testing.assert_allclose(np.asarray(sm.srgb_to_lab(rgb)), color.rgb2lab(rgb.astype(np.float64)), atol=2e-3)


# -- foreground rules on hand-made cluster maps -------------------------------------------


def _hand_map():
    """8x8: cluster 0 the border ring, 1 a centre square, 2 one pixel in the top-left corner block."""
    m = np.zeros((8, 8), np.int32)
    m[2:6, 2:6] = 1
    m[0, 1] = 2
    return m


def test_corner_rule_on_a_hand_made_map():
    maps = jnp.asarray(_hand_map()[None])
    rule = jax.jit(sm.corner_foreground, static_argnums=(1, 2, 3))
    # b = 2, θ = 0.5: a cluster needs round(0.5 * 4) = 2 pixels of one 2x2 corner block to be background
    fg = np.asarray(rule(maps, 3, 2, 0.5))
    np.testing.assert_array_equal(fg, [[False, True, True]])
    # θ = 0.25: one pixel suffices, so cluster 2 (1 pixel of the top-left block) is background too
    np.testing.assert_array_equal(np.asarray(rule(maps, 3, 2, 0.25)), [[False, True, False]])
    # θ = 1 needs a full block: the border ring fills the bottom-right 2x2 block, so it stays background
    np.testing.assert_array_equal(np.asarray(rule(maps, 3, 2, 1.0)), [[False, True, True]])
    mask = np.asarray(jax.jit(sm.foreground_mask)(maps, jnp.asarray(fg)))[0]
    np.testing.assert_array_equal(mask, _hand_map() > 0)


def test_saliency_rule_on_a_hand_made_map():
    s = np.asarray(sm.gaussian_saliency(8, 8, 0.25))
    assert s.shape == (8, 8) and np.isclose(s.max(), s[3, 3]) and np.allclose(s, s[::-1, ::-1])
    assert 0 < s.min() < s.max() <= 1
    maps = jnp.asarray(_hand_map()[None])
    # centre square: mean saliency > 0.5; ring: lower; cluster 3 is empty (never foreground)
    fg = np.asarray(sm.saliency_foreground(maps, 4, s, 0.5))
    np.testing.assert_array_equal(fg, [[False, True, False, False]])
    means = [s[_hand_map() == m].mean() for m in range(3)]
    assert means[1] > 0.5 > means[0]
    # Eq. 3 is a strict inequality: at θ equal to the centre's mean it is background
    theta = float(np.float32(means[1])) + 1e-6
    assert not np.asarray(sm.saliency_foreground(maps, 4, s, theta))[0, 1]


# -- the summary tensor, refusals, settings ------------------------------------------------


def test_summary_tensor_shape():
    params = _numpy_params(TINY)
    z0 = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    zs = jax.ShapeDtypeStruct((2, 3, 8), jnp.float32)
    for cfg, size in ((CFG, 8), (CFG.replace(resolution=4, variant_chunk=1, color_space="rgb"), 4)):
        out = jax.eval_shape(lambda p, a, b, c=cfg: sm.style_summary(TINY, p, a, b, c), params, z0, zs)
        assert out.summary.shape == (2, size, size, 9)  # [B, h, w, 3n]
        assert out.variants.shape == (2, 3, size, size, 3) and out.image.shape == (2, size, size, 3)


def test_mixed_styles_keep_the_image_below_the_cutoff(rng):
    ws0 = rng.standard_normal((2, 4, 8)).astype(np.float32)
    style = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    mixed = np.asarray(sm.mixed_styles(TINY, ws0, style, 2))
    np.testing.assert_array_equal(mixed[:, :, :2], np.broadcast_to(ws0[:, None, :2], (2, 3, 2, 8)))
    np.testing.assert_array_equal(mixed[:, :, 2:], style[:, :, 2:])


@pytest.mark.parametrize("gen", [DCGAN(nz=16, ngf=8, num_blocks=2), PGGAN(resolution=16, z_dim=16, fmaps_base=256,
                                                                           fmaps_max=16),
                                 BigGANDeep(z_dim=16, n_classes=10, channel_width=4,
                                            layers=((False, 16, 16), (True, 16, 8), (True, 8, 4), (False, 4, 4),
                                                    (True, 4, 2), (True, 2, 1)), attention_layer_position=3)],
                         ids=["dcgan", "pggan", "biggan"])
def test_refuses_generators_without_styles(gen):
    with pytest.raises(sm.StyleMixError, match="needs a style-based generator .*no per-layer styles"):
        CFG.check(gen)


def test_accepts_both_style_families_and_checks_settings():
    sm.StyleMixConfig(cutoff=3, num_variants=2).check(
        StyleGAN(resolution=16, z_dim=16, w_dim=16, mapping_layers=2, mapping_fmaps=16, fmaps_base=256, fmaps_max=16))
    assert sm.num_style_layers(TINY) == 4
    for bad, match in ((dict(cutoff=4), r"cutoff c must be in \[1, 3\]"), (dict(k=1), "k must be"),
                       (dict(variant_chunk=2), "must divide"), (dict(color_space="hsv"), "color space"),
                       (dict(corner_size=5), "corner size b"), (dict(theta_saliency=2.0), "theta_saliency")):
        with pytest.raises(sm.StyleMixError, match=match):
            CFG.replace(**bad).check(TINY)


def test_batched_kmeans_matches_sklearn_and_ignores_its_batch(rng):
    from sklearn.cluster import KMeans
    centres = rng.normal(size=(3, 2, 4)) * 6
    x = np.stack([np.concatenate([c + rng.normal(size=(20, 4)) for c in cs]) for cs in centres]).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    fit = jax.jit(lambda k, a: kmeans_fit_batched(k, a, 2))
    res = fit(keys, x)
    assert res.labels.shape == (3, 40) and bool(np.all(res.converged))
    for b in range(3):
        sk = KMeans(2, n_init=5, random_state=0).fit(x[b])
        np.testing.assert_allclose(float(res.inertia[b]), sk.inertia_, rtol=1e-4)
    perm = np.array([2, 0, 1])  # the same problems in other places of the batch: the same bits (threefry keys)
    moved = fit(keys[perm], x[perm])
    np.testing.assert_array_equal(np.asarray(moved.centroids), np.asarray(res.centroids)[perm])


# -- launch script --------------------------------------------------------------------


def test_launch_help_explains_every_flag(capsys):
    mod = _load_launch()
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--generator", "--variants", "--cutoff", "--color-space", "--k", "--foreground", "--corner-size",
                 "--theta-corner", "--saliency-sigma", "--theta-saliency", "--ablation", "--dataset-samples",
                 "--devices", "--out"):
        assert flag in text
    parser = mod.build_parser()
    assert all(a.help for a in parser._actions)


def test_launch_refuses_a_dcgan_in_one_line(tmp_path, capsys):
    gen = DCGAN(nz=16, ngf=8, num_blocks=2)
    ck = save_checkpoint(str(tmp_path / "dcgan"), gen, jax.tree.map(np.asarray, _numpy_params(gen)))
    mod = _load_launch()
    assert mod.main(["--generator", ck, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: style-mixing segmentation needs a style-based generator") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run")
    ck2 = save_checkpoint(str(tmp_path / "sg2"), TINY, jax.tree.map(np.asarray, _numpy_params(TINY)))
    assert mod.main(["--generator", ck2, "--cutoff", "9", "--out", str(tmp_path / "run")]) == 2
    assert "cutoff c must be in [1, 3]" in capsys.readouterr().err


# -- devices and the run end to end (compile the whole method: seconds each) -------------------


@pytest.mark.slow
def test_masks_do_not_depend_on_the_device_count():
    params = _numpy_params(TINY)
    key = jax.random.key(3)
    outs = [sm.segment_samples(TINY, params, CFG, key, np.arange(5), mesh=sharding.make_mesh(n), batch_size=8)
            for n in (1, 8)]
    for name in outs[0]:
        np.testing.assert_array_equal(outs[0][name], outs[1][name], err_msg=name)
    assert outs[0]["mask"].shape == (5, 8, 8) and outs[0]["clusters"].max() <= 1


@pytest.mark.slow
def test_run_writes_report_pictures_and_a_ufgs_dataset(tmp_path):
    params = _numpy_params(TINY)
    out = str(tmp_path / "run")
    summary = run_stylemix(TINY, params, CFG, out, seed=1, num_images=3, mesh=sharding.make_mesh(8),
                           ablation_cutoffs=(2,), dataset_samples=5, shard_size=3, progress=False)
    for f in ("config.json", "stylemix.png", "ablation.png", "report.json", "report.md", "manifest.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert [(r["cutoff"], r["color_space"]) for r in summary["ablation"]] == [(2, "rgb"), (2, "lab")]
    assert next(r for r in summary["ablation"] if r["cutoff"] == 2 and r["color_space"] == "lab")[
        "agreement_miou"] == 1.0
    ds = open_dataset(os.path.join(out, "dataset"), verify=True)
    assert len(ds) == 5 and ds.num_classes == 2
    item = ds[4]
    assert item["image"].shape == (8, 8, 3) and item["label"].shape == (8, 8) and item["latent"].shape == (8,)
    assert set(np.unique(item["label"])) <= {0, 1}
    # the dataset's first samples are the report's images: the same stream
    report = json.load(open(os.path.join(out, "report.json")))
    first = ds[0]["label"].astype(bool).mean()
    assert np.isclose(first, report["images"][0]["foreground_fraction"])
    ds.close()
