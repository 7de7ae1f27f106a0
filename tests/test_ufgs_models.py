"""UFGS segmentation networks: output shapes, atrous strides and rates, options and errors.

Tiny widths throughout; the shapes of the full-size networks are checked with ``jax.eval_shape``
(nothing computed).
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gansem.ufgs.models import (ARCHS, DeepLabV3, UNet, build_model, images_to_float, max_pool_2x2,
                                stage_strides_and_dilations)

TINY_DEEPLAB = dict(depth=10, width=4, aspp_features=8)
KEY = jax.random.key(0, impl="rbg")  # compiles much faster than threefry on a CPU


def _images(n, h, w, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3)), jnp.uint8)


def _conv_dilations(model, variables, x):
    """The ``rhs_dilation`` of every convolution in the jaxpr of ``model.apply`` (sorted, distinct)."""
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    found = set()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.add(tuple(eqn.params["rhs_dilation"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return sorted(found)


def test_unet_logits_at_input_size_for_odd_sizes():
    model = build_model("unet", 5, features=(4, 8, 8))
    x = _images(2, 13, 18)
    variables = jax.jit(lambda x: model.init(KEY, x))(x)
    assert set(variables) == {"params", "batch_stats"}
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    assert logits.shape == (2, 13, 18, 5) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # train mode: batch statistics are used and the running averages move
    _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], upd["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_deeplab_output_stride_and_atrous_rates():
    """OS16 keeps the last stage at H/16 with dilation 2 and ASPP rates 6/12/18; OS8 doubles all of them.

    ResNet-18 layout (two blocks per stage: the first block of a dilated stage keeps the previous
    dilation, the second dilates), tiny width; traced and shape-evaluated only. The two output
    strides share one set of parameters (train at 16, evaluate at 8).
    """
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
    kw = dict(depth=18, width=4, aspp_features=8)
    os16 = build_model("deeplabv3", 3, output_stride=16, **kw)
    os8 = build_model("deeplabv3", 3, output_stride=8, **kw)
    init = lambda m: jax.eval_shape(lambda x: m.init_with_output(KEY, x, mutable=True), x)  # noqa: E731
    (out16, v16), (out8, v8) = init(os16), init(os8)
    shapes = lambda v: jax.tree.map(lambda a: a.shape, {k: v[k] for k in ("params", "batch_stats")})  # noqa: E731
    assert shapes(v16) == shapes(v8)
    for out, v, stride in ((out16, v16, 16), (out8, v8, 8)):
        assert out.shape == (2, 64, 64, 3)
        assert v["intermediates"]["backbone_features"][0].shape == (2, 64 // stride, 64 // stride, 4 * 8)

    variables = {k: v16[k] for k in ("params", "batch_stats")}
    assert _conv_dilations(os16, variables, x) == [(1, 1), (2, 2), (6, 6), (12, 12), (18, 18)]
    assert _conv_dilations(os8, variables, x) == [(1, 1), (2, 2), (4, 4), (12, 12), (24, 24), (36, 36)]


def test_deeplab_runs_in_train_and_eval_mode():
    """A real forward pass (ResNet-10, tiny widths): logits at the input size, dropout and BatchNorm in train mode."""
    model = build_model("deeplabv3", 3, **TINY_DEEPLAB)
    x = _images(2, 40, 24)

    @jax.jit
    def run(x):
        v = model.init(KEY, x)
        ev = model.apply(v, x)
        tr, upd = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
        return ev, tr, v["batch_stats"], upd["batch_stats"]

    ev, tr, before, after = run(x)
    assert ev.shape == tr.shape == (2, 40, 24, 3)
    assert np.isfinite(np.asarray(ev)).all() and not np.allclose(ev, tr)
    assert not np.allclose(before["aspp"]["project"]["bn"]["mean"], after["aspp"]["project"]["bn"]["mean"])


def test_stage_strides_and_dilations():
    assert stage_strides_and_dilations(32) == [(1, 1), (2, 1), (2, 1), (2, 1)]
    assert stage_strides_and_dilations(16) == [(1, 1), (2, 1), (2, 1), (1, 2)]
    assert stage_strides_and_dilations(8) == [(1, 1), (2, 1), (1, 2), (1, 4)]
    with pytest.raises(ValueError, match="output_stride"):
        stage_strides_and_dilations(4)


@pytest.mark.parametrize("depth,block_channels,expansion", [(18, 512, 1), (50, 2048, 4)])
def test_standard_resnet_backbones_by_shape(depth, block_channels, expansion):
    """ResNet-18 (basic blocks) and ResNet-50 (bottlenecks) at full width: shapes only."""
    model = build_model("deeplabv3", 21, depth=depth)
    x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.uint8)
    out, shapes = jax.eval_shape(lambda x: model.init_with_output(KEY, x, mutable=True), x)
    assert out.shape == (1, 65, 65, 21)
    assert shapes["intermediates"]["backbone_features"][0].shape == (1, 5, 5, block_channels)
    params = shapes["params"]["backbone"]
    assert ("conv3" in params["stage1_block0"]) == (expansion == 4)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
    # torchvision-equivalent trunks: ResNet-18 11.2M, ResNet-50 23.5M (no fc), plus ASPP and head
    assert (11e6 < n_params < 17e6) if depth == 18 else (38e6 < n_params < 42e6)


def test_build_model_options_and_errors():
    assert ARCHS == ("unet", "deeplabv3")
    assert isinstance(build_model("unet", 4, features=[8, 16]), UNet)
    assert build_model("unet", 4, features=[8, 16]).features == (8, 16)
    assert build_model("deeplabv3", 4, dtype="bfloat16").dtype == jnp.bfloat16
    assert isinstance(build_model("deeplabv3", 4, depth=18), DeepLabV3)
    with pytest.raises(ValueError, match="unknown architecture 'pspnet'"):
        build_model("pspnet", 4)
    with pytest.raises(ValueError, match="no option"):
        build_model("unet", 4, depth=18)
    with pytest.raises(ValueError, match="depth"):
        build_model("deeplabv3", 4, depth=20)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3", 4, output_stride=32)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet", 0)


def test_images_are_uint8_mapped_to_minus_one_one():
    x = jnp.asarray([[[[0, 255, 127]]]], jnp.uint8)
    np.testing.assert_allclose(np.asarray(images_to_float(x)), [[[[-1.0, 1.0, 127 / 127.5 - 1]]]], atol=1e-7)
    with pytest.raises(TypeError, match="uint8"):
        images_to_float(x.astype(jnp.float32))


@pytest.mark.parametrize("h,w", [(6, 8), (5, 7)])
def test_max_pool_2x2_is_same_padded_max_pooling(rng, h, w):
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
    want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(want))
