"""DCGAN port: parity with the reference outputs of the original PyTorch module and with the module itself."""

import os

import numpy as np
import pytest

from gansem.zoo import load_generator
from gansem.generators.base import GeneratorError, load_checkpoint, save_checkpoint

REFS = os.path.join(os.path.dirname(__file__), "fixtures", "dcgan_digiface", "refs.npz")
LAYERS = {"block4": "relu/main.2", "block8": "relu/main.5", "block16": "relu/main.8", "block32": "relu/main.11"}


@pytest.fixture(scope="module")
def dcgan():
    return load_generator("dcgan-digiface")


def _nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def test_bundled_weights_are_the_expected_file():
    from weights_port.convert import sha256
    from weights_port.dcgan import BUNDLED_SHA256, bundled_weights_path

    assert sha256(bundled_weights_path()) == BUNDLED_SHA256


def test_parity_with_fixture_references(dcgan):
    gen, params, _ = dcgan
    refs = np.load(REFS)
    img, feats = gen.synthesize(params, refs["z"][:, :, 0, 0], capture=True)
    np.testing.assert_allclose(_nchw(img), refs["img"], rtol=1e-4, atol=1e-4)
    for ours, theirs in LAYERS.items():
        np.testing.assert_allclose(_nchw(feats[ours]), refs[theirs], rtol=1e-4, atol=1e-4)


def test_feature_layers_describe_the_outputs(dcgan):
    gen, params, _ = dcgan
    z = np.zeros((1, 100), np.float32)
    _, feats = gen.synthesize(params, z, capture=True)
    for layer in gen.feature_layers():
        assert feats[layer.name].shape == (1, layer.resolution, layer.resolution, layer.channels)


@pytest.mark.torch
def test_parity_with_the_packages_own_pytorch_module(dcgan):
    torch = pytest.importorskip("torch")
    from gan_face_generate.models import Generator as TorchGenerator
    from weights_port.dcgan import bundled_weights_path

    net = TorchGenerator(ngpu=0, nc=3, nz=100, ngf=64)
    sd = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)["netG_state_dict"]
    net.load_state_dict(sd)
    net.eval()
    z = np.random.default_rng(123).standard_normal((5, 100)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(z)[:, :, None, None]).numpy()
    gen, params, _ = dcgan
    img, _ = gen.synthesize(params, z)
    np.testing.assert_allclose(_nchw(img), ref, rtol=1e-4, atol=1e-4)


def test_checkpoint_roundtrip(dcgan, tmp_path):
    gen, params, _ = dcgan
    save_checkpoint(str(tmp_path / "ck"), gen, params, name="dcgan-digiface")
    gen2, params2, meta = load_checkpoint(str(tmp_path / "ck"))
    assert gen2 == gen and meta["family"] == "dcgan"
    z = np.random.default_rng(1).standard_normal((2, 100)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(gen.synthesize(params, z)[0]), np.asarray(gen2.synthesize(params2, z)[0]))


def test_corrupt_and_mismatched_checkpoints_are_refused(dcgan, tmp_path):
    gen, params, _ = dcgan
    d = str(tmp_path / "ck")
    save_checkpoint(d, gen, params)
    with open(os.path.join(d, "params.npz"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(GeneratorError, match="corrupt or truncated"):
        load_checkpoint(d)
    save_checkpoint(d, gen.replace(ngf=32), params)  # config says ngf=32, params are ngf=64
    with pytest.raises(GeneratorError, match="wrong shapes"):
        load_checkpoint(d)
    with pytest.raises(GeneratorError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(GeneratorError, match="unknown generator"):
        load_generator("no-such-model")
