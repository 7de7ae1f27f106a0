"""BigGAN-deep port: fixture parity, PyTorch parity, converter errors, latents, layer rule.

References:
* ``tests/fixtures/biggan/refs.npz``: outputs of ``pytorch-pretrained-biggan`` 0.1.1 (reduced config,
  random weights) for truncations 1.0 / 0.4 / 0.37 / 0.355, images and every ``generator.layers``
  output (NCHW); see ``fixtures/biggan/README.md`` in the shared fixtures.
* ``pytorch_pretrained_biggan.BigGAN`` itself, built with random weights in another reduced config.
"""

import math
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest

from gansem.generators.base import GeneratorError, load_checkpoint, save_checkpoint
from gansem.generators.biggan import (
    BigGANDeep,
    biggan_deep,
    bn_statistics_rows,
)
from weights_port import biggan as wb
from weights_port.errors import CheckpointError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "biggan")
TRUNCATIONS = (1.0, 0.4, 0.37, 0.355)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def converted():
    return wb.convert_file(FIX)


@pytest.fixture(scope="module")
def refs():
    with np.load(os.path.join(FIX, "refs.npz")) as z:
        return {k: z[k] for k in z.files}


def _torch_name(gen, layer: str) -> str:
    """Our feature name → the PyTorch module whose output the fixture stores."""
    if layer in ("gen_z", "bn", "conv_to_rgb"):
        return f"generator.{layer}"
    if layer == "attn":
        return f"generator.layers.{gen.attention_layer_position}"
    i = int(layer[len("block"):])
    return f"generator.layers.{i + (1 if i >= gen.attention_layer_position else 0)}"


def _to_nchw(name, x):
    x = np.asarray(x)
    if name == "gen_z":  # the reference is the Linear output before the NHWC reshape
        return x.reshape(x.shape[0], -1)
    return x.transpose(0, 3, 1, 2)


# -- fixture parity --------------------------------------------------------------------------

def test_fixture_config(converted):
    gen, params, info = converted
    assert gen.resolution == 64 and gen.num_classes == 10 and gen.latent_shape == (16,)
    assert info["config_file"].endswith("config.json")
    names = [l.name for l in gen.feature_layers()]
    assert names == ["gen_z", "block0", "block1", "block2", "attn", "block3", "block4", "block5"]


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_fixture_parity(converted, refs, truncation):
    """Images and every stored layer, for every truncation (0.355 alone detects the swapped BN lerp)."""
    gen, params, _ = converted
    gen = gen.replace(truncation=truncation)
    t = f"trunc{truncation}"
    z = refs[f"{t}/z"]
    img, feats = jax.jit(lambda p, z, y: gen.synthesize(p, z, y, capture=True))(params, z, refs["class_index"])
    np.testing.assert_allclose(np.asarray(img).transpose(0, 3, 1, 2), refs[f"{t}/img"], **TOL)
    assert set(feats) == {l.name for l in gen.feature_layers()}
    for layer in gen.feature_layers():
        ref = refs[f"{t}/{_torch_name(gen, layer.name)}"]
        got = _to_nchw(layer.name, feats[layer.name])
        assert feats[layer.name].shape[1:] == (layer.resolution, layer.resolution, layer.channels)
        np.testing.assert_allclose(got, ref, err_msg=layer.name, **TOL)


def test_fixture_final_bn_and_to_rgb(converted, refs):
    """The final unconditional BN and conv_to_rgb (all channels), stored for truncation 1.0 only."""
    gen, params, _ = converted
    cond = gen.map_latents(params, refs["trunc1.0/z"], refs["class_onehot"])  # one-hot class vectors
    syn = {k: v for k, v in params["params"].items() if k != "class_embedding"}
    img, feats = jax.jit(gen.synthesis_module({"bn", "conv_to_rgb"}).apply)({"params": syn}, cond)
    np.testing.assert_allclose(np.asarray(img).transpose(0, 3, 1, 2), refs["trunc1.0/img"], **TOL)
    for name in ("bn", "conv_to_rgb"):
        np.testing.assert_allclose(_to_nchw(name, feats[name]), refs[f"trunc1.0/generator.{name}"], **TOL)


def test_bn_statistics_rows_match_upstream_rule():
    # coef, i = modf(t / 0.02) as in BigGANBatchNorm; README table of the fixture.
    assert bn_statistics_rows(1.0, 51) == (50, 0.0)
    assert bn_statistics_rows(0.4, 51) == (20, 0.0)
    i, c = bn_statistics_rows(0.37, 51)
    assert i == 18 and math.isclose(c, 0.5, abs_tol=1e-9)
    i, c = bn_statistics_rows(0.355, 51)
    assert i == 17 and math.isclose(c, 0.75, abs_tol=1e-9)


def test_truncation_must_be_in_unit_interval():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(GeneratorError, match="truncation"):
            BigGANDeep(truncation=bad)


# -- latents and labels --------------------------------------------------------------------------

def test_sample_latents_truncated_normal():
    from scipy.stats import truncnorm

    gen = BigGANDeep(truncation=0.5)
    z = np.asarray(gen.sample_latents(jax.random.key(0), 4000))
    assert z.shape == (4000, 128) and z.dtype == np.float32
    assert np.abs(z).max() <= 2 * 0.5 + 1e-6
    assert abs(z.std() - 0.5 * truncnorm(-2, 2).std()) < 5e-3
    assert abs(z.mean()) < 5e-3
    np.testing.assert_array_equal(z, np.asarray(gen.sample_latents(jax.random.key(0), 4000)))


def test_class_labels_required_and_forms(converted, refs):
    gen, params, _ = converted
    z = refs["trunc1.0/z"]
    with pytest.raises(GeneratorError, match="class-conditional"):
        gen.map_latents(params, z, None)
    with pytest.raises(GeneratorError, match="class_labels"):
        gen.synthesize(params, z)
    with pytest.raises(GeneratorError, match="class_labels must be"):
        gen.map_latents(params, z, np.zeros((4, 3), np.float32))
    with pytest.raises(GeneratorError, match="latents"):
        gen.map_latents(params, z[:, :8], refs["class_index"])
    a = gen.map_latents(params, z, refs["class_index"])
    b = gen.map_latents(params, z, refs["class_onehot"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    emb = params["params"]["class_embedding"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a)[:, :16], z)
    np.testing.assert_array_equal(np.asarray(a)[:, 16:], emb[refs["class_index"]])
    y = gen.sample_class_labels(jax.random.key(1), 64)
    assert y.shape == (64,) and int(y.min()) >= 0 and int(y.max()) < 10


# -- feature-layer rule --------------------------------------------------------------------------

def _klish_rule(layers, budget=1000):
    """Independent statement of the paper's rule: last layer per resolution, high → low, within budget."""
    last = {}
    for l in layers:
        last[l.resolution] = l.name
    chans = {l.name: l.channels for l in layers}
    picked, total = [], 0
    for res in sorted(last, reverse=True):
        if total + chans[last[res]] > budget:
            break
        picked.append(last[res])
        total += chans[last[res]]
    return sorted(picked, key=[l.name for l in layers].index), total


@pytest.mark.parametrize("resolution,expected,total", [
    (128, [("block6", 32), ("block8", 64), ("block9", 128)], 896),
    (256, [("block8", 64), ("block10", 128), ("block11", 256)], 896),
    (512, [("block10", 128), ("block12", 256), ("block13", 512)], 512),
])
def test_published_feature_layers_rule(resolution, expected, total):
    from gansem.features import select_feature_layers

    gen = biggan_deep(resolution)
    assert gen.resolution == resolution and gen.num_classes == 1000
    layers = gen.feature_layers()
    assert [l.index for l in layers] == list(range(len(layers)))
    # block i's resolution follows the config's upsampling flags; channels are out_mult · ch
    res = 4
    for i, (up, _, out) in enumerate(gen.layers):
        res *= 2 if up else 1
        layer = next(l for l in layers if l.name == f"block{i}")
        assert (layer.resolution, layer.channels) == (res, out * 128)
    chosen = select_feature_layers(layers)
    assert [(l.name, l.resolution) for l in chosen] == expected
    assert sum(l.channels for l in chosen) == total
    assert _klish_rule(layers) == ([n for n, _ in expected], total)
    # each pick is the last GenBlock at its resolution
    for l in chosen:
        same = [m for m in layers if m.resolution == l.resolution]
        assert same[-1] is l and l.name.startswith("block")


@pytest.mark.parametrize("resolution,n_keys,n_elems", [(128, 506, 52.7e6), (256, 602, 58.6e6), (512, 698, 58.9e6)])
def test_published_state_dict_layout(resolution, n_keys, n_elems):
    """Key counts / sizes of the published state dicts (measured on the real files, porting.md §4)."""
    shapes = wb.torch_shapes(biggan_deep(resolution))
    assert len(shapes) == n_keys
    assert abs(sum(int(np.prod(s)) for s in shapes.values()) - n_elems) < 0.05e6
    assert shapes["embeddings.weight"] == (128, 1000)
    assert shapes["generator.gen_z.weight_orig"] == (32768, 256)
    assert shapes["generator.layers.8.snconv1x1_theta.weight_orig"][:2] == ((256 if resolution == 128 else 512) // 8,
                                                                          256 if resolution == 128 else 512)
    assert shapes["generator.conv_to_rgb.weight_orig"] == (128, 128, 3, 3)
    # the published config is recognised from shapes alone (no config.json), without materialising tensors
    fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    info = wb.describe("torch-legacy", fake)
    assert info["resolution"] == resolution and info["model"] == f"biggan-deep-{resolution}"
    assert info["num_classes"] == 1000 and info["num_tensors"] == n_keys


# -- converter errors ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_sd():
    kind, obj, config, _ = wb.load(FIX)
    return kind, obj, config


def test_converter_contract(fixture_sd):
    kind, obj, config = fixture_sd
    assert kind == "torch-legacy" and wb.matches(kind, obj)
    assert not wb.matches(kind, {"main.0.weight": np.zeros(3, np.float32)})
    info = wb.describe(kind, obj, path=FIX)
    assert info["family"] == "biggan" and info["resolution"] == 64 and info["num_classes"] == 10
    assert info["num_parameters"] == 113315 and info["num_tensors"] == 314
    gen, params, _ = wb.convert(kind, obj, path=os.path.join(FIX, "pytorch_model.bin"))
    assert gen.resolution == 64
    # the generic dispatcher (python -m weights_port) finds config.json through path=
    from weights_port.convert import convert_file, inspect_file

    assert inspect_file(FIX)["resolution"] == 64
    gen2, params2, info2 = convert_file(FIX)
    assert gen2 == gen and info2["converter"] == "weights_port.biggan"
    # without config.json a non-published config cannot be guessed
    with pytest.raises(CheckpointError, match="config.json"):
        wb.convert(kind, obj)


def test_converter_rejects_mismatched_content(fixture_sd):
    kind, obj, config = fixture_sd
    missing = {k: v for k, v in obj.items() if k != "generator.layers.4.conv_1.weight_orig"}
    with pytest.raises(CheckpointError, match="missing tensor 'generator.layers.4.conv_1.weight_orig'"):
        wb.convert(kind, missing, config)
    wrong = dict(obj, **{"generator.layers.0.bn_0.running_means": np.zeros((51, 7), np.float32)})
    with pytest.raises(CheckpointError, match="shape"):
        wb.convert(kind, wrong, config)
    extra = dict(obj, **{"generator.layers.9.gamma": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="does not have"):
        wb.convert(kind, extra, config)
    zero_u = dict(obj, **{"generator.gen_z.weight_u": np.zeros(obj["generator.gen_z.weight_u"].shape, np.float32)})
    with pytest.raises(CheckpointError, match="weight_u/weight_v"):
        wb.convert(kind, zero_u, config)
    nan = dict(obj, **{"generator.bn.bias": np.full(obj["generator.bn.bias"].shape, np.nan, np.float32)})
    with pytest.raises(CheckpointError, match="NaN"):
        wb.convert(kind, nan, config)
    # a config that does not belong to the file
    other = dict(config, layers=[[False, 16, 16], [True, 16, 8], [True, 8, 4], [True, 4, 2], [True, 2, 1]],
                 attention_layer_position=2)
    with pytest.raises(CheckpointError):
        wb.convert(kind, obj, other)
    with pytest.raises(CheckpointError, match="output_dim"):
        wb.convert(kind, obj, dict(config, output_dim=128))
    with pytest.raises(CheckpointError, match="not a valid"):
        wb.convert(kind, obj, dict(config, layers=[[False, 8, 8]]))
    with pytest.raises(CheckpointError, match="torch files"):
        wb.convert("nvidia-pickle", obj, config)
    with pytest.raises(CheckpointError, match="state dict"):
        wb.convert(kind, [1, 2], config)


def test_converter_rejects_corrupt_files(tmp_path):
    d = tmp_path / "trunc"
    d.mkdir()
    shutil.copy(os.path.join(FIX, "config.json"), d / "config.json")
    data = open(os.path.join(FIX, "pytorch_model.bin"), "rb").read()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        wb.convert_file(str(d))
    (d / "pytorch_model.bin").write_bytes(data)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config"):
        wb.convert_file(str(d))
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        wb.convert_file(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such"):
        wb.convert_file(str(tmp_path / "nope.bin"))
    # S3 naming: biggan-deep-XXX-pytorch_model.bin next to biggan-deep-XXX-config.json
    e = tmp_path / "s3"
    e.mkdir()
    shutil.copy(os.path.join(FIX, "pytorch_model.bin"), e / "tiny-pytorch_model.bin")
    shutil.copy(os.path.join(FIX, "config.json"), e / "tiny-config.json")
    gen, _, info = wb.convert_file(str(e / "tiny-pytorch_model.bin"))
    assert gen.resolution == 64 and info["config_file"].endswith("tiny-config.json")


def test_checkpoint_roundtrip(converted, refs, tmp_path):
    gen, params, _ = converted
    gen = gen.replace(truncation=0.355)
    save_checkpoint(str(tmp_path / "ck"), gen, params, name="biggan-tiny")
    gen2, params2, meta = load_checkpoint(str(tmp_path / "ck"))
    assert gen2 == gen and meta["family"] == "biggan"
    z, y = refs["trunc0.355/z"], refs["class_index"]
    run = jax.jit(lambda g, p: g.synthesize(p, z, y)[0], static_argnums=0)  # gen2 == gen: one compile
    a, b = run(gen, params), run(gen2, params2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(b).transpose(0, 3, 1, 2), refs["trunc0.355/img"], **TOL)


# -- parity with the PyTorch module itself -------------------------------------------------------------

def _import_upstream():
    """Import pytorch_pretrained_biggan offline: stub the download-only dependencies it imports."""
    for name in ("boto3", "botocore", "botocore.exceptions", "requests", "tqdm"):
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__path__ = []
            if name == "botocore.exceptions":
                mod.ClientError = type("ClientError", (Exception,), {})
            if name == "tqdm":
                mod.tqdm = lambda *a, **k: None
            sys.modules[name] = mod
    if "botocore" in sys.modules and "botocore.exceptions" in sys.modules:
        sys.modules["botocore"].exceptions = sys.modules["botocore.exceptions"]
    return pytest.importorskip("pytorch_pretrained_biggan")


@pytest.mark.slow
@pytest.mark.torch
def test_pytorch_module_parity(tmp_path):
    """Random-weight BigGAN from the upstream package (a config unlike the fixture's: attention
    before an upsampling block, an upsampling block that keeps its channels, ch=8), saved in the
    legacy format, converted by our converter, compared image and layer by layer."""
    torch = pytest.importorskip("torch")
    pb = _import_upstream()
    F, T = False, True
    cfg = pb.BigGANConfig(output_dim=32, z_dim=12, class_embed_dim=12, channel_width=8, num_classes=7,
                          layers=[(F, 16, 16), (T, 16, 8), (T, 8, 8), (F, 8, 4), (T, 4, 2), (F, 2, 1)],
                          attention_layer_position=2, eps=1e-4, n_stats=51)
    torch.manual_seed(0)
    model = pb.BigGAN(cfg)
    g = torch.Generator().manual_seed(3)
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith("running_means"):
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_vars"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("gamma"):
                t.fill_(0.8)
            elif name == "generator.bn.weight":
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("weight_orig") or name == "embeddings.weight":
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
        for name, t in sd.items():  # u, v by power iteration on the filled weights
            if name.endswith("weight_u"):
                w = sd[name[: -len("u")] + "orig"].reshape(t.shape[0], -1)
                u = torch.nn.functional.normalize(torch.randn(w.shape[0], generator=g), dim=0)
                for _ in range(30):
                    v = torch.nn.functional.normalize(w.t() @ u, dim=0)
                    u = torch.nn.functional.normalize(w @ v, dim=0)
                t.copy_(u)
                sd[name[: -len("u")] + "v"].copy_(v)
    assert all(torch.isfinite(t).all() for t in sd.values())
    model.eval()
    d = tmp_path / "tiny"
    d.mkdir()
    torch.save(model.state_dict(), str(d / "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    (d / "config.json").write_text(cfg.to_json_string())

    gen, params, _ = wb.convert_file(str(d))
    assert gen.resolution == 32 and gen.num_classes == 7

    captured = {}
    targets = {"gen_z": model.generator.gen_z, "bn": model.generator.bn, "conv_to_rgb": model.generator.conv_to_rgb}
    for layer in gen.feature_layers():
        if layer.name != "gen_z":
            targets[layer.name] = model.generator.layers[int(_torch_name(gen, layer.name).split(".")[-1])]
    for name, mod in targets.items():
        mod.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach().numpy()))

    labels = np.array([0, 3, 6, 2, 5])
    rng = np.random.default_rng(0)
    for truncation in (0.355, 0.73):
        z = (truncation * rng.uniform(-2, 2, size=(5, 12))).astype(np.float32)
        onehot = np.eye(7, dtype=np.float32)[labels]
        with torch.no_grad():
            ref = model(torch.from_numpy(z), torch.from_numpy(onehot), truncation).numpy()
        g2 = gen.replace(truncation=truncation)
        cond = g2.map_latents(params, z, labels)
        syn = {k: v for k, v in params["params"].items() if k != "class_embedding"}
        names = {l.name for l in gen.feature_layers()} | {"bn", "conv_to_rgb"}
        img, feats = jax.jit(g2.synthesis_module(names).apply)({"params": syn}, cond)
        np.testing.assert_allclose(np.asarray(img).transpose(0, 3, 1, 2), ref, **TOL)
        for name in names:
            np.testing.assert_allclose(_to_nchw(name, feats[name]), captured[name], err_msg=name, **TOL)
