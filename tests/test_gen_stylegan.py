"""genforce StyleGAN (v1) port: parity with genforce's PyTorch outputs, converter, API.

References: ``tests/fixtures/genforce_stylegan/refs_stylegan_tiny{32,128}.npz`` (NCHW),
produced by genforce's own ``StyleGANGenerator`` (``generator_smooth``) with
``randomize_noise=False``; cases ``psi1.0`` (no truncation) and ``psi0.7_layers8``. The
128-px model exercises the fused-scale up-conv (``layer10``). Tolerances (fixtures README):
images ``atol=2e-4, rtol=1e-4``; layer outputs ``rtol=atol=1e-3`` (the float32 reference is
itself up to 1.1e-4 from a float64 run); mapping outputs and styles ``rtol=atol=1e-4``.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem.features import select_feature_layers
from gansem.generators.base import GeneratorError, check_params, load_checkpoint, save_checkpoint
from gansem.generators.stylegan import StyleGAN
from weights_port import genforce
from weights_port.errors import CheckpointError

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "genforce_stylegan")
MODELS = {
    "tiny32": ("stylegan_tiny32.pth", "refs_stylegan_tiny32.npz"),
    "tiny128": ("stylegan_tiny128.pth", "refs_stylegan_tiny128.npz"),
}
CASES = {"psi1.0": (1.0, 0), "psi0.7_layers8": (0.7, 8)}
IMG_TOL = dict(rtol=1e-4, atol=2e-4)
LAYER_TOL = dict(rtol=1e-3, atol=1e-3)
VEC_TOL = dict(rtol=1e-4, atol=1e-4)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _synth(gen, params, ws, capture=True, noise_key=None):
    return gen.synthesize_styles(params, ws, capture=capture, noise_key=noise_key)


@functools.partial(jax.jit, static_argnums=0)
def _mapping_outputs(gen, params, z):
    """(w, truncated w+, per-layer styles) in one compiled call."""
    ws = gen.map_latents(params, z)
    return gen.mapping(params, z), ws, gen.layer_styles(params, ws)


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _load(name):
    from weights_port.torch_reader import load_any

    return load_any(os.path.join(HERE, MODELS[name][0]))


@pytest.fixture(scope="module")
def raw32():
    return _load("tiny32")


@pytest.fixture(scope="module")
def model32(raw32):
    return genforce.convert(*raw32)


def _refs(name):
    with np.load(os.path.join(HERE, MODELS[name][1])) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def refs32():
    return _refs("tiny32")


def _check_case(gen0, params, refs, case):
    psi, cutoff = CASES[case]
    gen = gen0.replace(truncation_psi=psi, truncation_cutoff=cutoff)
    z = jnp.asarray(refs["z"])
    w, ws, styles = _mapping_outputs(gen, params, z)
    np.testing.assert_allclose(np.asarray(w), refs[f"{case}/w"], **VEC_TOL)
    np.testing.assert_allclose(np.asarray(ws), refs[f"{case}/wp"], **VEC_TOL)
    assert len(styles) == gen.num_layers
    for k in range(gen.num_layers):
        np.testing.assert_allclose(np.asarray(styles[f"layer{k}"]), refs[f"{case}/style{k:02d}"], **VEC_TOL)
        np.testing.assert_array_equal(refs[f"{case}/style{k:02d}"], refs[f"{case}/synthesis.layer{k}.style"])
    img, feats = _synth(gen0, params, ws)  # truncation only affects map_latents: one compile for all cases
    np.testing.assert_allclose(_nchw(img), refs[f"{case}/image"], **IMG_TOL)
    stored = sorted(k.split("/")[1][len("synthesis."):] for k in refs
                    if k.startswith(f"{case}/synthesis.") and not k.endswith(".style"))
    assert stored == sorted(l.name for l in gen.feature_layers())
    for name in stored:
        np.testing.assert_allclose(_nchw(feats[name]), refs[f"{case}/synthesis.{name}"], err_msg=name, **LAYER_TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_tiny32(model32, refs32, case):
    gen, params, _ = model32
    _check_case(gen, params, refs32, case)


@pytest.mark.slow
def test_parity_tiny128_fused_scale():
    gen, params, info = genforce.convert(*_load("tiny128"))
    assert gen.resolution == 128 and gen.num_layers == 12 and gen.fused_from == 128
    assert gen.channels == (16, 16, 16, 16, 8, 4)  # README: 4:16 … 64:8, 128:4
    refs = _refs("tiny128")
    for case in sorted(CASES):
        _check_case(gen, params, refs, case)


def test_latent_is_pixel_normalised(refs32):
    z = refs32["z"].astype(np.float64)
    for case in CASES:
        np.testing.assert_allclose(z / np.sqrt(np.mean(z**2, axis=1, keepdims=True) + 1e-8), refs32[f"{case}/z"],
                                   rtol=1e-6)


def test_sniff_describe_and_config(raw32, model32):
    kind, obj = raw32
    assert genforce.matches(kind, obj)
    d = genforce.describe(kind, obj)
    assert d["family"] == "stylegan" and d["resolution"] == 32 and d["latent_dim"] == 64
    assert d["num_parameters"] == 120205 and d["entry"] == "generator_smooth"
    gen, params, info = model32
    assert gen == StyleGAN(resolution=32, z_dim=64, w_dim=64, mapping_fmaps=64, fmaps_base=512, fmaps_max=32)
    assert gen.channels == (32, 32, 32, 16) and gen.num_layers == 8
    assert info["assumed"]["mapping_lr_mul"] == 0.01 and not info["warnings"]
    check_params(gen, params)


def test_truncation_all_layers_numpy(model32, refs32):
    gen, params, _ = model32
    w = refs32["psi1.0/w"]
    w_avg = np.asarray(params["params"]["truncation"]["w_avg"])
    _, ws, _ = _mapping_outputs(gen.replace(truncation_psi=0.5, truncation_cutoff=None), params,
                                jnp.asarray(refs32["z"]))
    expect = np.broadcast_to((w_avg + 0.5 * (w - w_avg))[:, None], ws.shape)
    np.testing.assert_allclose(np.asarray(ws), expect, **VEC_TOL)
    ws3 = gen.truncate(params, jnp.asarray(np.repeat(w[:, None], 8, 1)), psi=0.5, cutoff=3)
    np.testing.assert_allclose(np.asarray(ws3[:, :3]), expect[:, :3], **VEC_TOL)
    np.testing.assert_allclose(np.asarray(ws3[:, 3:]), np.repeat(w[:, None], 5, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_mix_styles(model32, refs32):
    gen, params, _ = model32
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 8, 64)).astype(np.float32)
    for cutoff in (0, 3, 8):
        np.testing.assert_array_equal(np.asarray(gen.mix_styles(a, b, cutoff)),
                                      np.concatenate([a[:, :cutoff], b[:, cutoff:]], 1))
    per_sample = np.array([1, 4, 7])
    mixed = np.asarray(gen.mix_styles(a, b, per_sample))
    for i, c in enumerate(per_sample):
        np.testing.assert_array_equal(mixed[i], np.concatenate([a[i, :c], b[i, c:]], 0))
    # layers before the cutoff only see ws_a's rows: their outputs are unchanged by mixing
    ws_a = gen.map_latents(params, jnp.asarray(refs32["z"][:2]))
    ws_b = gen.map_latents(params, jnp.asarray(refs32["z"][2:]))
    _, fa = _synth(gen, params, ws_a)
    img_m, fm = _synth(gen, params, gen.mix_styles(ws_a, ws_b, 4))
    for k in range(4):
        np.testing.assert_allclose(np.asarray(fm[f"layer{k}"]), np.asarray(fa[f"layer{k}"]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(fm["layer4"]) - np.asarray(fa["layer4"])).max() > 1e-2


@pytest.mark.slow
def test_noise_modes(model32, refs32):
    gen, params, _ = model32
    z = jnp.asarray(np.repeat(refs32["z"][:1], 2, axis=0))  # two identical samples
    ws = gen.map_latents(params, z)
    # 'none' == 'const' with every noise strength zeroed
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "noise_strength" in jax.tree_util.keystr(p) else x, params)
    img_none, _ = _synth(gen.replace(noise_mode="none"), params, ws)
    img_zero, _ = _synth(gen, zeroed, ws)
    np.testing.assert_allclose(np.asarray(img_none), np.asarray(img_zero), rtol=1e-6, atol=1e-6)
    # 'random': needs a key, deterministic per key, independent per sample and per key
    rnd = gen.replace(noise_mode="random")
    with pytest.raises(GeneratorError, match="noise_key"):
        rnd.synthesize_styles(params, ws)
    i1, _ = _synth(rnd, params, ws, (), jax.random.key(1))
    i1b, _ = _synth(rnd, params, ws, (), jax.random.key(1))
    i2, _ = _synth(rnd, params, ws, (), jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i1b))
    assert np.abs(np.asarray(i1[0] - i1[1])).max() > 1e-3
    assert np.abs(np.asarray(i1 - i2)).max() > 1e-3
    img_const, _ = _synth(gen, params, ws)
    np.testing.assert_allclose(np.asarray(img_const[0]), refs32["psi1.0/image"][0].transpose(1, 2, 0), **IMG_TOL)


def test_bad_inputs(model32):
    gen, params, _ = model32
    with pytest.raises(GeneratorError, match="w\\+"):
        gen.synthesize_styles(params, jnp.zeros((1, 64)))
    with pytest.raises(GeneratorError):
        gen.map_latents(params, jnp.zeros((1, 64)), class_labels=jnp.zeros((1,), jnp.int32))
    with pytest.raises(GeneratorError):
        gen.mapping(params, jnp.zeros((1, 32)))
    with pytest.raises(GeneratorError):
        StyleGAN(resolution=32, noise_mode="spatial")
    with pytest.raises(GeneratorError):
        StyleGAN(resolution=32, fused_scale="yes")


@pytest.mark.parametrize(
    "resolution, names, res, channels",
    [
        # KLiSH Tab. 2: StyleGAN-CelebAHQ 1024 -> [9,11,13,15,17], 496 channels
        (1024, ["layer9", "layer11", "layer13", "layer15", "layer17"], [64, 128, 256, 512, 1024], 496),
        # StyleGAN bedroom / church 256 -> [7,9,11,13], 960 channels
        (256, ["layer7", "layer9", "layer11", "layer13"], [32, 64, 128, 256], 960),
    ],
)
def test_paper_layer_selection(resolution, names, res, channels):
    gen = StyleGAN(resolution=resolution)  # published config
    layers = gen.feature_layers()
    assert len(layers) == gen.num_layers == 2 * int(np.log2(resolution)) - 2
    sel = select_feature_layers(layers)
    assert [l.name for l in sel] == names
    assert [l.index for l in sel] == [int(n[5:]) for n in names]  # our index == paper index
    assert [l.resolution for l in sel] == res
    assert sum(l.channels for l in sel) == channels


# -- corrupt / mismatched checkpoints ------------------------------------------------------

def _copy(raw):
    kind, obj = raw
    return kind, {**obj, "generator_smooth": dict(obj["generator_smooth"])}


def test_missing_and_wrong_shape(raw32):
    kind, obj = _copy(raw32)
    del obj["generator_smooth"]["synthesis.layer3.apply_noise.noise"]
    with pytest.raises(CheckpointError, match="layer3.apply_noise.noise"):
        genforce.convert(kind, obj)
    kind, obj = _copy(raw32)
    obj["generator_smooth"]["synthesis.layer5.style.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(CheckpointError, match="layer5.style.weight"):
        genforce.convert(kind, obj)
    kind, obj = _copy(raw32)
    obj["generator_smooth"]["synthesis.layer4.blur.kernel"] = np.ones((32, 1, 3, 3), np.float32) / 9
    with pytest.raises(CheckpointError, match="blur"):
        genforce.convert(kind, obj)


def test_unsupported_variants(raw32):
    kind, obj = _copy(raw32)
    obj["generator_smooth"]["mapping.label_weight"] = np.zeros((3, 64), np.float32)
    with pytest.raises(CheckpointError, match="conditional"):
        genforce.convert(kind, obj)
    kind, obj = _copy(raw32)
    obj["generator_smooth"]["synthesis.lod"] = np.array(2.0, np.float32)
    with pytest.raises(CheckpointError, match="lod"):
        genforce.convert(kind, obj)
    old = {"mapping.dense0.linear.weight": np.zeros((4, 4), np.float32)}
    assert genforce.matches(kind, {"generator_smooth": old})
    with pytest.raises(CheckpointError, match="older genforce"):
        genforce.convert(kind, {"generator_smooth": old})


def test_genforce_stylegan2_refused():
    sd = {
        "mapping.dense0.weight": np.zeros((8, 8), np.float32),
        "truncation.w_avg": np.zeros(8, np.float32),
        "synthesis.early_layer.const": np.zeros((1, 8, 4, 4), np.float32),
        "synthesis.layer0.noise_strength": np.zeros((), np.float32),
    }
    obj = {"generator": sd, "discriminator": {}, "generator_smooth": sd}
    assert genforce.matches("torch-zip", obj)
    assert genforce.detect_variant(sd) == "stylegan2"
    for fn in (genforce.describe, genforce.convert):
        with pytest.raises(CheckpointError, match="StyleGAN2.*not supported.*NVIDIA.*rosinality"):
            fn("torch-zip", obj)


def test_pggan_and_stylegan_told_apart(raw32):
    from weights_port.torch_reader import load_any

    pg = load_any(os.path.join(os.path.dirname(HERE), "genforce_pggan", "pggan_tiny32.pth"))
    assert genforce.describe(*pg)["family"] == "pggan"
    assert genforce.describe(*raw32)["family"] == "stylegan"


def test_checkpoint_roundtrip(tmp_path, model32, refs32):
    gen, params, info = model32
    path = save_checkpoint(str(tmp_path / "sg"), gen, params, name="stylegan_tiny32", source=info)
    gen2, params2, meta = load_checkpoint(path)
    assert gen2 == gen and meta["family"] == "stylegan"
    z = jnp.asarray(refs32["z"])
    ws, ws2 = gen.map_latents(params, z), gen2.map_latents(params2, z)
    np.testing.assert_array_equal(np.asarray(ws), np.asarray(ws2))
    out, out2 = _synth(gen, params, ws), _synth(gen2, params2, ws2)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out2[0]))
    np.testing.assert_array_equal(np.asarray(out[1]["layer7"]), np.asarray(out2[1]["layer7"]))
    np.testing.assert_allclose(_nchw(out2[0]), refs32["psi1.0/image"], **IMG_TOL)


@pytest.mark.slow
def test_init_params_matches_converted_tree(model32):
    gen, params, _ = model32
    fresh = gen.init_params(jax.random.key(0))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_map(np.shape, fresh) == jax.tree_util.tree_map(np.shape, params)
    img, _ = _synth(gen, fresh, gen.map_latents(fresh, gen.sample_latents(jax.random.key(1), 2)))
    assert img.shape == (2, 32, 32, 3) and np.all(np.isfinite(np.asarray(img)))
