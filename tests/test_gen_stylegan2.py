"""StyleGAN2 / StyleGAN2-ADA port: parity with NVIDIA and rosinality references, shapes, layer choice, converters.

References (``tests/fixtures/stylegan2_ada``, ``tests/fixtures/rosinality_stylegan2``; see their READMEs) were made
by the original PyTorch code on CPU in float32 (NVIDIA: ``force_fp32=True``, ``noise_mode='const'``). Tolerance
``allclose(rtol=1e-4, atol=1e-4)`` as recommended in the fixtures README.
"""

import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem.features import select_feature_layers
from gansem.generators.base import GeneratorError, check_params, flatten_params, load_checkpoint, save_checkpoint
from gansem.generators.stylegan2 import StyleGAN2, mix_styles, nvidia_name
from weights_port import stylegan2 as conv
from weights_port.errors import CheckpointError
from weights_port.torch_reader import PersistentObject, load_any

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
ADA = os.path.join(FIX, "stylegan2_ada")
ROS = os.path.join(FIX, "rosinality_stylegan2")
TOL = dict(rtol=1e-4, atol=1e-4)
ADA_CASES = {"psi1.0": (1.0, None), "psi0.7": (0.7, None), "psi0.5_cutoff2": (0.5, 2)}


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def _convert(path):
    kind, obj = load_any(path)
    assert conv.matches(kind, obj)
    return conv.convert(kind, obj)


def _all_outputs(gen):
    return tuple(l.name for l in gen.feature_layers()) + gen.auxiliary_outputs()


@pytest.fixture(scope="module", params=[pytest.param("uncond32", marks=pytest.mark.slow), "cond16"])
def ada(request):
    """Converted NVIDIA fixture + its references + every output of every case (one jit per model)."""
    name = request.param
    gen, params, info = _convert(os.path.join(ADA, f"{name}.pkl"))
    refs = dict(np.load(os.path.join(ADA, f"refs_{name}.npz")))
    labels = np.argmax(refs["c"], axis=1) if "c" in refs else None
    synth = jax.jit(lambda p, ws: gen.synthesize_styles(p, ws, capture=_all_outputs(gen)))
    out = {}
    for case, (psi, cutoff) in ADA_CASES.items():
        ws = gen.map_latents(params, refs["z"], labels, truncation_psi=psi, truncation_cutoff=cutoff)
        out[case] = (ws,) + synth(params, ws)
    return name, gen, params, refs, labels, synth, out


@pytest.fixture(scope="module")
def ros():
    gen, params, info = _convert(os.path.join(ROS, "stylegan2_tiny32.pt"))
    return gen, params, info, dict(np.load(os.path.join(ROS, "refs.npz")))


# -- NVIDIA parity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(ADA_CASES))
def test_ada_parity_every_stored_array(ada, case):
    name, gen, params, refs, labels, synth, out = ada
    ws, img, feats = out[case]
    np.testing.assert_allclose(np.asarray(ws), refs[f"{case}/ws"], **TOL)
    np.testing.assert_allclose(_nchw(img), refs[f"{case}/img"], **TOL)
    stored = [k for k in refs if k.startswith(f"{case}/synthesis.")]
    assert len(stored) == 5 * gen.num_blocks - 1  # conv0 (R>=8), conv1, torgb, x, img per block
    for key in stored:
        ours = key.split("/", 1)[1][len("synthesis."):]  # 'b8.conv0', 'b8.torgb', 'b8.x', 'b8.img'
        np.testing.assert_allclose(_nchw(feats[ours]), refs[key], err_msg=key, **TOL)


def test_ada_style_mixing_and_noise_none(ada):
    name, gen, params, refs, labels, synth, out = ada
    ws = out["psi1.0"][0]
    src = refs["mix/src_of_layers_ge_cutoff"]
    mixed = gen.mix_styles(ws, ws[src], int(refs["mix/cutoff"]))
    np.testing.assert_allclose(np.asarray(mixed), refs["mix/ws"], **TOL)
    np.testing.assert_allclose(_nchw(synth(params, mixed)[0]), refs["mix/img"], **TOL)
    img, _ = jax.jit(lambda p, w: gen.synthesize_styles(p, w, noise_mode="none"))(params, ws)
    np.testing.assert_allclose(_nchw(img), refs["psi1.0_noise_none/img"], **TOL)


def test_ada_config_read_from_init_kwargs(ada):
    name, gen, params, *_ = ada
    if name == "uncond32":
        assert (gen.z_dim, gen.w_dim, gen.c_dim, gen.img_resolution, gen.num_ws) == (64, 64, 0, 32, 8)
        assert gen.block_channels == (64, 64, 64, 32) and gen.conv_clamp == 256.0
    else:
        assert (gen.z_dim, gen.w_dim, gen.c_dim, gen.img_resolution, gen.num_ws) == (32, 48, 4, 16, 6)
        assert gen.block_channels == (32, 32, 32) and gen.conv_clamp == 1.0
    assert gen.mapping_layers == 2 and gen.weights_convention == "nvidia"
    check_params(gen, params)


def test_class_labels_one_hot_and_errors(ada):
    name, gen, params, refs, labels, *_ = ada
    z = refs["z"]
    if gen.c_dim == 0:
        with pytest.raises(GeneratorError, match="unconditional"):
            gen.map_latents(params, z, np.zeros(4, np.int32))
        return
    ws_int = gen.map_latents(params, z, jnp.asarray(labels, jnp.int32))
    ws_vec = gen.map_latents(params, z, refs["c"])
    np.testing.assert_allclose(np.asarray(ws_int), np.asarray(ws_vec), rtol=0, atol=0)
    with pytest.raises(GeneratorError, match="conditional"):
        gen.map_latents(params, z)
    with pytest.raises(GeneratorError, match="class_labels"):
        gen.map_latents(params, z, np.zeros((4, gen.c_dim + 1), np.float32))


def test_ada_is_g_ema_not_g(ada):
    """The training G differs from G_ema; the converter must use G_ema (checked via a tensor)."""
    name, gen, params, *_ = ada
    kind, obj = load_any(os.path.join(ADA, f"{name}.pkl"))
    g_w = np.asarray(obj["G"].named_tensors()["synthesis.b4.conv1.weight"])
    ema_w = np.asarray(obj["G_ema"].named_tensors()["synthesis.b4.conv1.weight"])
    ours = params["params"]["synthesis"]["b4"]["conv1"]["weight"]
    assert np.array_equal(ours, ema_w) and not np.array_equal(ours, g_w)


# -- rosinality parity --------------------------------------------------------------------------------------

def _ros_to_ours():
    m = {"conv1": "b4.conv1", "to_rgb1": "b4.img"}  # rosinality ToRGB outputs include the upsampled skip
    for i in range(3):
        r = 8 * 2 ** i
        m.update({f"convs.{2 * i}": f"b{r}.conv0", f"convs.{2 * i + 1}": f"b{r}.conv1", f"to_rgbs.{i}": f"b{r}.img"})
    return m


@pytest.mark.parametrize("case,psi", [("trunc1.0", 1.0), ("trunc0.7", 0.7)])
def test_rosinality_parity_every_stored_array(ros, case, psi):
    gen, params, info, refs = ros
    ws = gen.map_latents(params, refs["z"], truncation_psi=psi)
    np.testing.assert_allclose(np.asarray(ws), refs[f"{case}/latent"], **TOL)
    img, feats = gen.synthesize_styles(params, ws, capture=_all_outputs(gen))
    np.testing.assert_allclose(_nchw(img), refs[f"{case}/img"], **TOL)
    mapping = _ros_to_ours()
    assert {k.split("/", 1)[1] for k in refs if k.startswith(case + "/")} == set(mapping) | {"img", "latent"}
    for theirs, ours in mapping.items():
        np.testing.assert_allclose(_nchw(feats[ours]), refs[f"{case}/{theirs}"], err_msg=theirs, **TOL)


def test_rosinality_mixing_and_settings(ros):
    gen, params, info, refs = ros
    assert gen.weights_convention == "rosinality" and gen.conv_clamp is None and gen.c_dim == 0
    assert gen.truncation_cutoff is None  # latent_avg truncation on every layer
    np.testing.assert_array_equal(np.asarray(gen.w_avg(params)), refs["latent_avg"])
    z = refs["z"]
    ws_a = gen.map_latents(params, z)
    ws_b = gen.map_latents(params, z[refs["mix/second_z_index"]])
    mixed = mix_styles(ws_a, ws_b, int(refs["mix/inject_index"]))
    np.testing.assert_allclose(np.asarray(mixed), refs["mix/latent"], **TOL)
    img, _ = gen.synthesize_styles(params, mixed)
    np.testing.assert_allclose(_nchw(img), refs["mix/img"], **TOL)


def test_rosinality_without_latent_avg_estimates_w_avg(ros):
    gen, params, info, refs = ros
    kind, obj = load_any(os.path.join(ROS, "stylegan2_tiny32.pt"))
    gen2, params2, info2 = conv.convert(kind, {"g_ema": obj["g_ema"]})
    assert "estimated" in info2["w_avg"]
    # The fixture's latent_avg is the mean over 10,000 z; ours over 4,096: close, not equal.
    np.testing.assert_allclose(params2["params"]["mapping"]["w_avg"], refs["latent_avg"], atol=0.05)


# -- noise, mixing API, jit -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_random_noise_uses_the_key(ros):
    gen, params, _, refs = ros
    ws = gen.map_latents(params, refs["z"][:2])
    ws = jnp.concatenate([ws[:1], ws[:1]])  # two identical styles
    run = jax.jit(lambda p, w, k: gen.synthesize_styles(p, w, noise_key=k, noise_mode="random")[0])
    a, b, c = run(params, ws, jax.random.key(1)), run(params, ws, jax.random.key(1)), run(params, ws, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(a, c, atol=1e-3)
    assert not np.allclose(a[0], a[1], atol=1e-3)  # fresh noise per sample
    const, _ = gen.synthesize_styles(params, ws)
    assert not np.allclose(a, const, atol=1e-3)
    with pytest.raises(GeneratorError, match="noise_key"):
        gen.synthesize_styles(params, ws, noise_mode="random")


def test_mix_styles_per_sample_cutoff():
    a = jnp.zeros((3, 6, 2))
    b = jnp.ones((3, 6, 2))
    m = np.asarray(mix_styles(a, b, jnp.array([0, 2, 6])))
    np.testing.assert_array_equal(m[:, :, 0], [[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 6])


def test_jit_with_generator_static_and_checkpoint_roundtrip(ros, tmp_path):
    gen, params, info, refs = ros
    hash(gen)

    @jax.jit
    def run(p, z):
        return gen.synthesize(p, z, capture=["b32.conv1"])

    img, feats = run(params, refs["z"][:2])
    save_checkpoint(str(tmp_path / "ck"), gen, params, name="ros-tiny", source=info)
    gen2, params2, meta = load_checkpoint(str(tmp_path / "ck"))
    assert gen2 == gen and meta["family"] == "stylegan2"
    img2, feats2 = run(params2, refs["z"][:2])
    np.testing.assert_array_equal(np.asarray(img), np.asarray(img2))
    np.testing.assert_array_equal(np.asarray(feats["b32.conv1"]), np.asarray(feats2["b32.conv1"]))


def test_feature_layers_match_captured_maps(ada):
    name, gen, params, refs, labels, synth, out = ada
    ws, img, feats = out["psi1.0"]
    layers = gen.feature_layers()
    assert [l.index for l in layers] == list(range(len(layers)))
    assert len(layers) == 2 * gen.num_blocks
    for l in layers:
        assert feats[l.name].shape == (4, l.resolution, l.resolution, l.channels), l.name
    const = params["params"]["synthesis"]["b4"]["const"]
    np.testing.assert_array_equal(np.asarray(feats["b4.const"][1]), const.transpose(1, 2, 0))
    with pytest.raises(GeneratorError, match="no layer"):
        gen.synthesize_styles(params, ws, capture=["b4.conv0"])
    with pytest.raises(GeneratorError, match="styles must be"):
        gen.synthesize_styles(params, ws[:, :-1])


# -- official configs: shapes and Tab. 2 ---------------------------------------------------------------------

class _FakeGEma:
    """Stands in for a reader PersistentObject: init kwargs only (no tensors)."""

    class_name = "Generator"
    module_src = "<no source>"

    def __init__(self, init_kwargs):
        self.init_kwargs = init_kwargs
        self.state = {"_init_kwargs": init_kwargs}

    def named_tensors(self):
        return {}


def _official():
    import json

    with open(os.path.join(ADA, "shapes_official.json")) as f:
        return json.load(f)["configs"]


def _official_generator(cfg):
    fields, _ = conv.nvidia_generator_config(_FakeGEma(cfg["init_kwargs"]))
    return StyleGAN2(**fields)


@pytest.mark.parametrize("name", sorted(_official()))
def test_param_names_and_shapes_equal_nvidia_official(name):
    """Our tree, renamed with ``nvidia_name`` ('params/a/b' -> 'a.b'), equals G_ema's state_dict exactly,
    except NVIDIA's constant ``*.resample_filter`` buffers, which we do not store."""
    cfg = _official()[name]
    gen = _official_generator(cfg)
    assert gen.num_ws == cfg["num_ws"]
    assert {str(r): c for r, c in zip(gen.block_resolutions, gen.block_channels)} == cfg["channels"]
    tree = jax.eval_shape(gen.init_params, jax.random.key(0))
    ours = {nvidia_name(k): tuple(v.shape) for k, v in _flat_shapes(tree).items()}
    theirs = {k: tuple(v) for k, v in {**cfg["parameters"], **cfg["buffers"]}.items()}
    dropped = {k for k in theirs if k.endswith(".resample_filter")}
    assert ours == {k: v for k, v in theirs.items() if k not in dropped}
    assert all(theirs[k] == (4, 4) for k in dropped)
    n_params = sum(int(np.prod(v)) for k, v in cfg["parameters"].items())
    assert n_params == cfg["n_params"]


def _flat_shapes(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out.update(_flat_shapes(v, key) if isinstance(v, dict) else {key: v})
    return out


# KLiSH paper Tab. 2 (docs/reference-klish.md §1.1): selected layer indices and total channels.
TAB2 = {
    "ffhq1024_config_f": ([9, 11, 13, 15, 17], [64, 128, 256, 512, 1024], 992),
    "metfaces1024_paper1024": ([9, 11, 13, 15, 17], [64, 128, 256, 512, 1024], 992),
    "lsun_car512_config_f": ([9, 11, 13, 15], [64, 128, 256, 512], 960),
    "afhq512_paper512": ([9, 11, 13, 15], [64, 128, 256, 512], 960),
    "lsun_church_cat_horse256_config_f": ([9, 11, 13], [64, 128, 256], 896),
}


@pytest.mark.parametrize("name", sorted(TAB2))
def test_layer_selection_reproduces_klish_tab2(name):
    gen = _official_generator(_official()[name])
    indices, resolutions, channels = TAB2[name]
    sel = select_feature_layers(gen.feature_layers())
    assert [l.index for l in sel] == indices
    assert [l.resolution for l in sel] == resolutions
    assert sum(l.channels for l in sel) == channels
    assert all(l.name.endswith(".conv1") for l in sel)


# -- StyleGAN3 refusal, corrupt and mismatched files ----------------------------------------------------------

def _write_fake_sg3_pickle(path, monkeypatch):
    """A tiny NVIDIA-format pickle whose G_ema has StyleGAN3's ``synthesis.input.affine.weight``."""
    torch = pytest.importorskip("torch")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only its pickled name matters
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg = types.ModuleType("torch_utils")
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    class P:
        def __init__(self, class_name, params=None, modules=None, **attrs):
            self.meta = dict(type="class", version=6, module_src="<source omitted>", class_name=class_name,
                             state=dict(_parameters=params or {}, _buffers={}, _modules=modules or {}, **attrs))

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    fc = lambda o, i: P("FullyConnectedLayer", params={"weight": torch.randn(o, i), "bias": torch.zeros(o)})  # noqa
    g = P("Generator", modules={
        "mapping": P("MappingNetwork", modules={"fc0": fc(8, 8)}),
        "synthesis": P("SynthesisNetwork", modules={
            "input": P("SynthesisInput", params={"freqs": torch.randn(4, 2)}, modules={"affine": fc(4, 8)}),
            "L0_36_16": P("SynthesisLayer", params={"weight": torch.randn(16, 4, 3, 3)}),
        }),
    }, _init_kwargs={"z_dim": 8, "c_dim": 0, "w_dim": 8, "img_resolution": 16, "img_channels": 3,
                     "mapping_kwargs": {"num_layers": 1}, "synthesis_kwargs": {"channel_base": 256}})
    with open(path, "wb") as f:
        pickle.dump({"G": g, "D": None, "G_ema": g, "augment_pipe": None}, f, protocol=4)


@pytest.mark.torch
def test_stylegan3_pickle_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "sg3.pkl")
    _write_fake_sg3_pickle(path, monkeypatch)
    from weights_port.convert import convert_file, inspect_file

    kind, obj = load_any(path)
    assert kind == "nvidia-pickle" and conv.matches(kind, obj) and conv.is_stylegan3(obj["G_ema"])
    with pytest.raises(CheckpointError, match="StyleGAN3.*not supported"):
        convert_file(path)
    with pytest.raises(CheckpointError, match="StyleGAN3"):
        inspect_file(path)


def test_stylegan3_detected_from_module_src():
    g = _FakeGEma({})
    g.module_src = "class SynthesisInput(torch.nn.Module):\n    pass\n"
    assert conv.is_stylegan3(g)
    with pytest.raises(CheckpointError, match="StyleGAN3"):
        conv.convert("nvidia-pickle", {"G_ema": g})


def test_rosinality_missing_or_misshapen_tensor_is_named(ros):
    kind, obj = load_any(os.path.join(ROS, "stylegan2_tiny32.pt"))
    sd = dict(obj["g_ema"])
    del sd["convs.3.conv.modulation.weight"]
    with pytest.raises(CheckpointError, match=r"convs\.3\.conv\.modulation\.weight"):
        conv.convert(kind, {"g_ema": sd, "latent_avg": obj["latent_avg"]})
    sd = dict(obj["g_ema"])
    sd["to_rgbs.1.conv.weight"] = np.zeros((1, 3, 16, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=r"to_rgbs\.1\.conv\.weight.*shape"):
        conv.convert(kind, {"g_ema": sd, "latent_avg": obj["latent_avg"]})
    sd = dict(obj["g_ema"])
    sd["convs.0.conv.blur.kernel"] = np.ones((4, 4), np.float32)
    with pytest.raises(CheckpointError, match="blur.kernel"):
        conv.convert(kind, {"g_ema": sd, "latent_avg": obj["latent_avg"]})


def test_nvidia_kwargs_that_disagree_with_tensors_are_refused():
    kind, obj = load_any(os.path.join(ADA, "cond16.pkl"))
    g = obj["G_ema"]
    kwargs = dict(g.init_kwargs)
    kwargs["synthesis_kwargs"] = dict(kwargs["synthesis_kwargs"], channel_max=16)
    bad = PersistentObject(g.class_name, g.module_src, dict(g.state, _init_kwargs=kwargs), g.version)
    with pytest.raises(CheckpointError, match="shape"):
        conv.convert(kind, {"G_ema": bad})
    kwargs = dict(g.init_kwargs, mapping_kwargs={"num_layers": 2, "activation": "relu"})
    bad = PersistentObject(g.class_name, g.module_src, dict(g.state, _init_kwargs=kwargs), g.version)
    with pytest.raises(CheckpointError, match="activation"):
        conv.convert(kind, {"G_ema": bad})
    with pytest.raises(CheckpointError, match="G_ema"):
        conv.convert(kind, {"G": g})


def test_truncated_pickle_raises_checkpoint_error(tmp_path):
    with open(os.path.join(ADA, "cond16.pkl"), "rb") as f:
        data = f.read()
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    from weights_port.convert import convert_file

    with pytest.raises(CheckpointError):
        convert_file(str(path))


def test_describe_without_converting():
    kind, obj = load_any(os.path.join(ADA, "uncond32.pkl"))
    d = conv.describe(kind, obj)
    assert d["family"] == "stylegan2" and d["resolution"] == 32 and d["num_classes"] == 0
    gen, params, _ = conv.convert(kind, obj)
    assert d["num_parameters"] == sum(v.size for v in flatten_params(params).values())
    kind, obj = load_any(os.path.join(ROS, "stylegan2_tiny32.pt"))
    d = conv.describe(kind, obj)
    assert d["weights_convention"] == "rosinality" and d["resolution"] == 32


@pytest.mark.slow
def test_resnet_architecture_builds_and_runs():
    gen = StyleGAN2(z_dim=8, w_dim=8, img_resolution=16, channel_base=128, channel_max=16, mapping_layers=1,
                    architecture="resnet", conv_clamp=256.0)
    params = gen.init_params(jax.random.key(0))
    flat = flatten_params(params)
    assert flat["params/synthesis/b8/skip/weight"].shape == (16, 16, 1, 1)
    assert "params/synthesis/b8/torgb/weight" not in flat and "params/synthesis/b16/torgb/weight" in flat
    z = gen.sample_latents(jax.random.key(1), 2)
    img, feats = gen.synthesize(params, z, capture=["b16.x"])
    assert img.shape == (2, 16, 16, 3) and np.isfinite(np.asarray(img)).all()


def _upfirdn_numpy(x, f, up, down, pad):
    """Direct definition: zero-insert, pad (negative crops), true 2-D convolution with f, subsample."""
    n, h, w, c = x.shape
    z = np.zeros((n, h * up, w * up, c))
    z[:, ::up, ::up] = x
    x0, x1, y0, y1 = pad
    z = np.pad(z, ((0, 0), (max(y0, 0), max(y1, 0)), (max(x0, 0), max(x1, 0)), (0, 0)))
    z = z[:, max(-y0, 0): z.shape[1] - max(-y1, 0), max(-x0, 0): z.shape[2] - max(-x1, 0)]
    kh, kw = f.shape
    oh, ow = z.shape[1] - kh + 1, z.shape[2] - kw + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(kh):
        for j in range(kw):
            out += f[kh - 1 - i, kw - 1 - j] * z[:, i:i + oh, j:j + ow]
    return out[:, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (2, 2, (-1, 2, 0, -1))])
def test_upfirdn2d_matches_direct_definition(rng, up, down, pad):
    from gansem.generators import ops

    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    f = rng.standard_normal((4, 3)).astype(np.float32)  # asymmetric: checks the flip
    ours = np.asarray(ops.upfirdn2d(jnp.asarray(x), f, up=up, down=down, padding=pad))
    np.testing.assert_allclose(ours, _upfirdn_numpy(x, f, up, down, pad), rtol=1e-5, atol=1e-5)
