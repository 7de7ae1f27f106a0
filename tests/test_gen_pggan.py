"""genforce PGGAN port: parity with genforce's PyTorch outputs, converter, layer selection.

References: ``tests/fixtures/genforce_pggan/refs_pggan_tiny32.npz`` (NCHW), produced by
genforce's own ``PGGANGenerator`` (``generator_smooth`` of ``pggan_tiny32.pth``), see the
fixture README. Tolerance ``allclose(rtol=1e-4, atol=1e-4)`` (fixtures README).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem.features import select_feature_layers
from gansem.generators.base import GeneratorError, load_checkpoint, save_checkpoint
from gansem.generators.pggan import PGGAN
from weights_port import genforce
from weights_port.errors import CheckpointError

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "genforce_pggan")
CKPT = os.path.join(HERE, "pggan_tiny32.pth")
REFS = os.path.join(HERE, "refs_pggan_tiny32.npz")
TOL = dict(rtol=1e-4, atol=1e-4)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _synth(gen, params, z, capture=True):
    return gen.synthesize(params, z, capture=capture)


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def raw():
    from weights_port.torch_reader import load_any

    return load_any(CKPT)


@pytest.fixture(scope="module")
def converted(raw):
    return genforce.convert(*raw)


@pytest.fixture(scope="module")
def refs():
    with np.load(REFS) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def outputs(converted, refs):
    gen, params, _ = converted
    return _synth(gen, params, jnp.asarray(refs["z"]))


def test_sniff_and_describe(raw):
    kind, obj = raw
    assert genforce.matches(kind, obj)
    d = genforce.describe(kind, obj)
    assert d["family"] == "pggan" and d["resolution"] == 32 and d["latent_dim"] == 64
    assert d["entry"] == "generator_smooth" and d["conditional"] is False
    assert d["num_parameters"] == 86333  # README: 25 tensors, 86,333 elements
    assert d["config"] == {"resolution": 32, "z_dim": 64, "fmaps_base": 512, "fmaps_max": 32}


def test_converter_reads_config(converted):
    gen, params, info = converted
    assert gen == PGGAN(resolution=32, z_dim=64, fmaps_base=512, fmaps_max=32)
    assert gen.channels == (32, 32, 32, 16)  # README: 4:32, 8:32, 16:32, 32:16
    assert info["entry"] == "generator_smooth" and not info["warnings"]
    from gansem.generators.base import check_params

    check_params(gen, params)  # names and shapes == init_params


def test_parity_image_and_every_layer(converted, outputs, refs):
    gen, _, _ = converted
    img, feats = outputs
    np.testing.assert_allclose(_nchw(img), refs["default/image"], **TOL)
    stored = sorted(k.split("/")[1] for k in refs if k.startswith("default/layer"))
    assert stored == sorted(l.name for l in gen.feature_layers())
    for name in stored:
        np.testing.assert_allclose(_nchw(feats[name]), refs[f"default/{name}"], err_msg=name, **TOL)


def test_latent_is_pixel_normalised(refs):
    z = refs["z"].astype(np.float64)
    np.testing.assert_allclose(z / np.sqrt(np.mean(z**2, axis=1, keepdims=True) + 1e-8), refs["default/z"], rtol=1e-6)


def test_map_latents_is_identity(converted, refs):
    gen, params, _ = converted
    z = jnp.asarray(refs["z"])
    assert gen.map_latents(params, z) is z
    with pytest.raises(GeneratorError):
        gen.map_latents(params, z, class_labels=jnp.zeros((4,), jnp.int32))
    with pytest.raises(GeneratorError):
        gen.map_latents(params, z[:, :10])


def test_capture_subset_and_unknown(converted, refs):
    gen, params, _ = converted
    _, feats = _synth(gen, params, jnp.asarray(refs["z"][:1]), ("layer7",))
    assert set(feats) == {"layer7"} and feats["layer7"].shape == (1, 32, 32, 16)
    with pytest.raises(GeneratorError):
        gen.synthesize(params, jnp.asarray(refs["z"][:1]), capture=("b32",))


@pytest.mark.parametrize(
    "resolution, names, res, channels",
    [
        # KLiSH Tab. 2: PGGAN-CelebAHQ 1024 -> [9,11,13,15,17], 496 channels
        (1024, ["layer9", "layer11", "layer13", "layer15", "layer17"], [64, 128, 256, 512, 1024], 496),
        # PGGAN bedroom / church 256 -> [7,9,11,13], 960 channels
        (256, ["layer7", "layer9", "layer11", "layer13"], [32, 64, 128, 256], 960),
    ],
)
def test_paper_layer_selection(resolution, names, res, channels):
    gen = PGGAN(resolution=resolution)  # published config: z 512, fmaps 16384 / 512
    layers = gen.feature_layers()
    assert [l.index for l in layers] == list(range(2 * (int(np.log2(resolution)) - 1)))
    sel = select_feature_layers(layers)
    assert [l.name for l in sel] == names
    assert [l.index for l in sel] == [int(n[5:]) for n in names]  # our index == paper index
    assert [l.resolution for l in sel] == res
    assert sum(l.channels for l in sel) == channels


def test_bad_config():
    with pytest.raises(GeneratorError):
        PGGAN(resolution=48)


# -- corrupt / mismatched checkpoints ------------------------------------------------------

def _smooth(raw):
    kind, obj = raw
    obj = dict(obj)
    obj["generator_smooth"] = dict(obj["generator_smooth"])
    return kind, obj


def test_missing_tensor(raw):
    kind, obj = _smooth(raw)
    del obj["generator_smooth"]["output3.bias"]
    with pytest.raises(CheckpointError, match="output3.bias"):
        genforce.convert(kind, obj)


def test_wrong_shape(raw):
    kind, obj = _smooth(raw)
    obj["generator_smooth"]["layer5.weight"] = obj["generator_smooth"]["layer5.weight"][:, :8]
    with pytest.raises(CheckpointError, match="layer5.weight"):
        genforce.convert(kind, obj)


def test_lower_lod_snapshot_refused(raw):
    kind, obj = _smooth(raw)
    obj["generator_smooth"]["lod"] = np.array(1.0, np.float32)
    with pytest.raises(CheckpointError, match="lod"):
        genforce.convert(kind, obj)


def test_legacy_naming_refused():
    sd = {"layer1.conv.weight": np.zeros((8, 8, 4, 4), np.float32), "layer1.wscale.bias": np.zeros(8, np.float32)}
    assert genforce.matches("torch-zip", {"generator_smooth": sd})
    with pytest.raises(CheckpointError, match="older genforce"):
        genforce.convert("torch-zip", {"generator_smooth": sd})


def test_foreign_content_not_matched(raw):
    kind, obj = raw
    assert not genforce.matches("nvidia-pickle", obj)
    assert not genforce.matches(kind, {"g_ema": {"style.1.weight": np.zeros((2, 2), np.float32)}})
    assert not genforce.matches(kind, [1, 2, 3])
    with pytest.raises(CheckpointError):
        genforce.convert(kind, {"g_ema": {}})


def test_falls_back_to_generator_entry_with_warning(raw, refs):
    kind, obj = raw
    gen, params, info = genforce.convert(kind, {"generator": obj["generator"]})
    assert info["entry"] == "generator" and info["warnings"]
    img, _ = _synth(gen, params, jnp.asarray(refs["z"]), ())
    # README: 'generator' = smooth + noise; the image differs by up to 0.72
    assert np.abs(_nchw(img) - refs["default/image"]).max() > 1e-2


def test_truncated_file(tmp_path):
    from weights_port.torch_reader import load_any

    data = open(CKPT, "rb").read()
    bad = tmp_path / "half.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        genforce.convert(*load_any(str(bad)))


def test_checkpoint_roundtrip(tmp_path, converted, outputs, refs):
    gen, params, info = converted
    path = save_checkpoint(str(tmp_path / "pggan"), gen, params, name="pggan_tiny32", source=info)
    gen2, params2, meta = load_checkpoint(path)
    assert gen2 == gen and meta["family"] == "pggan"
    img, feats = _synth(gen2, params2, jnp.asarray(refs["z"]))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(outputs[0]))
    np.testing.assert_array_equal(np.asarray(feats["layer7"]), np.asarray(outputs[1]["layer7"]))
    # a mismatched params file is refused
    flat = dict(np.load(os.path.join(path, "params.npz")))
    flat["params/layer3/kernel"] = flat["params/layer3/kernel"][:, :, :4]
    np.savez(os.path.join(path, "params.npz"), **flat)
    with pytest.raises(GeneratorError, match="layer3"):
        load_checkpoint(path)


@pytest.mark.slow
def test_init_params_runs():
    gen = PGGAN(resolution=16, z_dim=8, fmaps_base=64, fmaps_max=8)
    params = gen.init_params(jax.random.key(0))
    img, feats = _synth(gen, params, gen.sample_latents(jax.random.key(1), 2))
    assert img.shape == (2, 16, 16, 3) and np.all(np.isfinite(np.asarray(img)))
    assert {k: v.shape[1:] for k, v in feats.items()} == {
        l.name: (l.resolution, l.resolution, l.channels) for l in gen.feature_layers()}
