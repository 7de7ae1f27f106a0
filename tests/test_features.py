"""Layer rule, align-corners resizing and the segmentation shortcut (per-layer scores then resize)."""

import numpy as np
import pytest

from gansem.features import concat_features, resize_bilinear_align_corners, select_feature_layers
from gansem.generators.base import FeatureLayer, GeneratorError
from gansem.segment import segment_scores


def _layers(spec):
    return tuple(FeatureLayer(f"l{i}", r, c, i) for i, (r, c) in enumerate(spec))


def test_layer_rule_keeps_last_layer_per_resolution_from_high_to_low():
    # StyleGAN2-FFHQ-like: two layers per resolution 4..1024 with config-f channels
    ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    spec = [(4, 512)] + [(r, ch[r]) for r in ch if r > 4 for _ in range(2)]
    sel = select_feature_layers(_layers(spec))
    assert [l.resolution for l in sel] == [64, 128, 256, 512, 1024]
    assert sum(l.channels for l in sel) == 992
    assert [l.index for l in sel] == [8, 10, 12, 14, 16]  # the second layer of each resolution


def test_layer_rule_budget_and_errors():
    sel = select_feature_layers(_layers([(4, 512), (8, 256), (16, 128), (32, 64)]))
    assert [l.resolution for l in sel] == [4, 8, 16, 32]  # 960 channels fit
    sel = select_feature_layers(_layers([(4, 512), (8, 256), (16, 128), (32, 64)]), channel_budget=500)
    assert [l.resolution for l in sel] == [8, 16, 32]
    with pytest.raises(GeneratorError, match="channel budget"):
        select_feature_layers(_layers([(4, 512)]), channel_budget=100)


def _numpy_resize(x, size):
    n, h, w, c = x.shape

    def coords(n_in):
        return np.arange(size) * (n_in - 1) / (size - 1) if size > 1 else np.zeros(1)

    ys, xs = coords(h), coords(w)
    out = np.zeros((n, size, size, c))
    for i, y in enumerate(ys):
        y0 = min(int(np.floor(y)), h - 2) if h > 1 else 0
        fy = y - y0
        for j, xx in enumerate(xs):
            x0 = min(int(np.floor(xx)), w - 2) if w > 1 else 0
            fx = xx - x0
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                            + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


@pytest.mark.parametrize("h,size", [(4, 16), (8, 8), (16, 5), (1, 4), (7, 12)])
def test_resize_matches_direct_bilinear(rng, h, size):
    x = rng.standard_normal((2, h, h, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(resize_bilinear_align_corners(x, size)), _numpy_resize(x, size),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_resize_matches_torch_interpolate(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 8, 8, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(29, 29),
                                          mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear_align_corners(x, 29)), ref, rtol=1e-5, atol=1e-5)


def test_segment_scores_equal_classifier_on_concatenated_upsampled_features(rng):
    layers = _layers([(4, 6), (8, 5), (16, 3)])
    feats = {l.name: rng.standard_normal((2, l.resolution, l.resolution, l.channels)).astype(np.float32)
             for l in layers}
    W = rng.standard_normal((7, 14)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    full = np.asarray(concat_features(feats, layers, 32))  # [2, 32, 32, 14]
    direct = full @ W.T + b
    np.testing.assert_allclose(np.asarray(segment_scores(feats, layers, W, b, 32)), direct, rtol=1e-4, atol=1e-4)


# -- batching: one loop, data-parallel over a mesh, the same bits on any device count ---------------------------


def _dcgan():
    from gansem.zoo import load_generator

    gen, params, _ = load_generator("dcgan-digiface")
    return gen, params, select_feature_layers(gen.feature_layers())


def test_map_batches_pads_the_last_batch_and_drops_padding():
    import jax.numpy as jnp

    from gansem import sharding
    from gansem.batching import batch_rows, map_batches

    x = np.arange(23, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    for mesh in (None, sharding.make_mesh(4)):
        seen, rows = [], batch_rows(5, mesh)
        for start, stop, out in map_batches(lambda s, a, c: (a * s, c), [x, None], batch_size=5, mesh=mesh,
                                            bcast_args=(jnp.float32(2.0),)):
            assert out[0].shape == (stop - start, 3) and out[1] is None
            seen.append(out[0])
            assert stop - start == min(rows, 23 - start)
        np.testing.assert_array_equal(np.concatenate(seen), 2 * x)
    assert batch_rows(5) == 5 and batch_rows(16, sharding.make_mesh(8)) == 16
    assert batch_rows(16, sharding.make_mesh(1)) == 16 and batch_rows(5, sharding.make_mesh(2)) == 8
    with pytest.raises(ValueError, match="different numbers of rows"):
        next(map_batches(lambda a, b: a, [x, x[:3]], batch_size=4))


@pytest.mark.slow
def test_features_and_masks_are_bitwise_equal_on_1_and_8_devices():
    import jax

    from gansem import sharding
    from gansem.features import extract_features
    from gansem.segment import Segmenter

    gen, params, layers = _dcgan()
    lat = np.asarray(gen.sample_latents(jax.random.key(3), 21), np.float32)  # 21: a padded last batch
    out = {}
    for n in (1, 2, 8):
        mesh = sharding.make_mesh(n)
        imgs, feats = extract_features(gen, params, lat, layers, 8, batch_size=16, mesh=mesh)
        d = feats.shape[-1]
        rng = np.random.default_rng(0)
        seg = Segmenter(gen, params, layers, rng.standard_normal((5, d)).astype(np.float32),
                        rng.standard_normal(5).astype(np.float32), 5, {}, mesh=mesh)
        out[n] = imgs, feats, seg.segment_latents(lat, batch_size=16)["labels"]
    for n in (2, 8):
        for a, b in zip(out[1], out[n]):
            assert np.array_equal(a, b), f"{n} devices differ from 1"
    # without a mesh: one call per batch on one device (another program: equal up to rounding)
    imgs, feats = extract_features(gen, params, lat, layers, 8, batch_size=16)
    assert np.abs(imgs.astype(int) - out[1][0]).max() <= 1
    np.testing.assert_allclose(feats, out[1][1], rtol=1e-4, atol=1e-4)
