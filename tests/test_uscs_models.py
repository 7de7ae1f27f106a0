"""USCS networks and losses: shapes, SPADE's use of the mask, spectral-norm state, losses by hand.

Inputs of 8×8 to 16×16 pixels and widths of 2 to 8 channels. No test compiles a network's
``init`` (XLA takes seconds for the random initialisers even at these sizes): shapes come from
``jax.eval_shape`` and variables from numpy (``uscs_runs.numpy_variables``); the few network calls are jitted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem.uscs import losses, models
from gansem.uscs.models import (SPADE, MultiscaleDiscriminator, SpadeConfig, SpadeGenerator, StyleEncoder,
                                build_models, config_from_dict, downsample_nearest, instance_norm, one_hot_masks)
from uscs_runs import numpy_variables

TINY = SpadeConfig(ngf=2, mults=(2, 1), blocks=None, spade_hidden=4, ndf=4, d_layers=2, num_d=2, e_ndf=2, z_dim=8)


def _masks(rng, n, size, k):
    return one_hot_masks(jnp.asarray(rng.integers(0, k, (n, size, size))), k)


def _shapes(module, *args, **kwargs):
    return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, train=False, **kwargs), *args)


def _apply(module, variables, *args, **kwargs):
    return jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(variables, *args)


def test_generator_discriminator_encoder_shapes():
    m = build_models(TINY, 3, 16)
    mask = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    image = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    gv = _shapes(m.generator, mask)
    assert set(gv) == {"params", "batch_stats"} and set(gv["params"]) == {"fc", "level0_block0", "level1_block0",
                                                                             "conv_img"}
    assert jax.eval_shape(lambda v, x: m.generator.apply(v, x, train=False), gv, mask).shape == (2, 16, 16, 3)
    dv = _shapes(m.discriminator, mask, image)
    out = jax.eval_shape(lambda v, x, y: m.discriminator.apply(v, x, y, train=False), dv, mask, image)
    # 2 scales x (d_layers + 1) outputs; kernel 4 with padding 2: stride 2 gives n/2 + 1, stride 1 gives n + 1
    assert [[f.shape for f in s] for s in out] == [[(2, 9, 9, 4), (2, 10, 10, 8), (2, 11, 11, 1)],
                                                   [(2, 5, 5, 4), (2, 6, 6, 8), (2, 7, 7, 1)]]
    vae = build_models(SpadeConfig(**{**TINY.__dict__, "use_vae": True}), 3, 16)
    ev = _shapes(vae.encoder, image)
    mu, logvar = jax.eval_shape(lambda v, x: vae.encoder.apply(v, x, train=False), ev, image)
    assert mu.shape == logvar.shape == (2, 8)
    z = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    vv = _shapes(vae.generator, mask, z)
    assert vv["params"]["fc"]["kernel"].shape == (8, 4 * 8 * 8)  # z -> s0 x s0 x (ngf mults[0]), s0 = 16 / 2
    assert jax.eval_shape(lambda v, x, y: vae.generator.apply(v, x, y, train=False), vv, mask, z).shape \
        == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="needs the style vectors"):
        jax.eval_shape(lambda v, x: vae.generator.apply(v, x, train=False), vv, mask)


def test_paper_config_is_the_spade_reference_size():
    """The paper preset at 256 px: SPADE's generator (~92 M parameters without the encoder), shapes only."""
    m = build_models(models.CONFIGS["paper"], 35, 256)
    mask = jax.ShapeDtypeStruct((1, 256, 256, 35), jnp.float32)
    shapes = jax.eval_shape(lambda x: m.generator.init(jax.random.key(0), x, train=False), mask)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    assert 90e6 < n < 100e6, n
    assert set(shapes["params"]) >= {"fc", "level0_block0", "level1_block0", "level1_block1", "level5_block0",
                                     "conv_img"}


def test_spade_normalisation_formula_and_locality(rng):
    """norm(x)·(1 + γ(m)) + β(m): with γ = β = 0 it is the plain norm; a one-pixel mask change acts within 2 px."""
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 5)), jnp.float32)
    labels = rng.integers(0, 3, (2, 12, 12))
    mask = one_hot_masks(jnp.asarray(labels), 3)
    spade = SPADE(hidden=6, norm="instance")
    params = numpy_variables(spade, x, mask)["params"]
    out = _apply(spade, {"params": params}, x, mask, train=False)
    zero = dict(params, gamma=jax.tree.map(jnp.zeros_like, params["gamma"]),
                beta=jax.tree.map(jnp.zeros_like, params["beta"]))
    np.testing.assert_allclose(_apply(spade, {"params": zero}, x, mask, train=False), instance_norm(x), atol=1e-6)
    shifted = dict(zero, beta=dict(zero["beta"], bias=jnp.ones_like(zero["beta"]["bias"])))
    np.testing.assert_allclose(_apply(spade, {"params": shifted}, x, mask, train=False), instance_norm(x) + 1.0,
                               atol=1e-6)
    other = labels.copy()
    other[0, 6, 6] = (other[0, 6, 6] + 1) % 3
    out2 = _apply(spade, {"params": params}, x, one_hot_masks(jnp.asarray(other), 3), train=False)
    changed = np.abs(np.asarray(out2 - out)).max(-1) > 1e-6
    assert changed[0, 6, 6] and not changed[1].any()  # the mask is used, per sample
    rows, cols = np.nonzero(changed[0])
    assert rows.min() >= 4 and rows.max() <= 8 and cols.min() >= 4 and cols.max() <= 8  # two 3x3 convs


def test_generator_output_follows_the_mask(rng):
    gen = SpadeGenerator(TINY, 16)
    labels = rng.integers(0, 3, (2, 16, 16))
    labels[1] = (labels[0] + 1) % 3
    v = numpy_variables(gen, jnp.zeros((2, 16, 16, 3)))
    out = np.asarray(_apply(gen, v, one_hot_masks(jnp.asarray(labels), 3), train=False))
    assert out.shape == (2, 16, 16, 3) and np.abs(out).max() <= 1.0 and np.abs(out[0] - out[1]).max() > 1e-3
    # inference mode: each image depends on its own mask only (no batch statistics)
    swapped = np.asarray(_apply(gen, v, one_hot_masks(jnp.asarray(labels[::-1].copy()), 3), train=False))
    np.testing.assert_allclose(swapped, out[::-1], atol=1e-6)


def test_spectral_norm_state_and_padded_convolutions(rng):
    """Power-iteration vectors live in batch_stats: training updates them (σ converges to the top singular value),
    inference does not; the padded 4×4 convolutions (pad, then VALID) are lax's padded convolutions."""
    disc = MultiscaleDiscriminator(ndf=4, n_layers=2, num_d=1)
    mask, image = _masks(rng, 2, 8, 3), jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    v = numpy_variables(disc, mask, image)
    stats = v["batch_stats"]["scale0"]["conv1"]["sn"]
    assert set(stats) == {"conv/kernel/u", "conv/kernel/sigma"}
    assert set(v["batch_stats"]["scale0"]) == {"conv1"}  # the first and the logit layers are not normalised

    @jax.jit
    def run(state):
        feats, frozen = disc.apply({"params": v["params"], "batch_stats": state}, mask, image, train=False,
                                   mutable=["batch_stats"])
        for _ in range(30):
            _, upd = disc.apply({"params": v["params"], "batch_stats": state}, mask, image, train=True,
                                mutable=["batch_stats"])
            state = upd["batch_stats"]
        return feats, frozen["batch_stats"], state

    feats, frozen, state = run(v["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, frozen, v["batch_stats"])
    kernel = np.asarray(v["params"]["scale0"]["conv1"]["conv"]["kernel"]).reshape(-1, 8)
    sigma = float(state["scale0"]["conv1"]["sn"]["conv/kernel/sigma"])
    assert sigma == pytest.approx(np.linalg.svd(kernel, compute_uv=False)[0], rel=1e-3)
    conv0 = v["params"]["scale0"]["conv0"]["conv"]
    want = jax.lax.conv_general_dilated(jnp.concatenate([mask, image], -1), conv0["kernel"], (2, 2),
                                        ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(feats[0][0], jax.nn.leaky_relu(want + conv0["bias"], 0.2), atol=1e-5)


def test_downsample_nearest_matches_jax_image_resize(rng):
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    for size in (16, 8, 4, 2):
        np.testing.assert_array_equal(downsample_nearest(x, size), jax.image.resize(x, (2, size, size, 3), "nearest"))


def test_config_checks():
    with pytest.raises(ValueError, match="divisible by 32"):
        build_models(models.CONFIGS["paper"], 3, 48)
    with pytest.raises(ValueError, match="blocks must give"):
        build_models(SpadeConfig(mults=(2, 1), blocks=(1,)), 3, 16)
    with pytest.raises(ValueError, match="norm must be"):
        build_models(SpadeConfig(mults=(2, 1), blocks=None, norm="group"), 3, 16)
    with pytest.raises(ValueError, match="no option.*depth"):
        config_from_dict({"depth": 3})
    with pytest.raises(ValueError, match="unknown SPADE configuration 'big'"):
        models.spade_config("big")
    assert config_from_dict(TINY.to_dict()) == TINY
    assert models.spade_config("cpu", mults=(2, 1)).blocks is None  # the preset's 6 block counts do not fit 2 levels
    assert models.spade_config("paper", ngf=None).ngf == 64 and StyleEncoder().z_dim == 256


# -- losses ------------------------------------------------------------------------------------


def test_losses_by_hand():
    real = [jnp.array([[2.0, 0.5]]), jnp.array([[-1.0]])]  # relu(1 - x): [0, 0.5] -> 0.25 ; [2] -> 2
    fake = [jnp.array([[-2.0, 0.0]]), jnp.array([[1.0]])]  # relu(1 + x): [0, 1] -> 0.5 ; [2] -> 2
    d_real, d_fake = losses.hinge_d_loss(real, fake)
    assert float(d_real) == pytest.approx((0.25 + 2.0) / 2) and float(d_fake) == pytest.approx((0.5 + 2.0) / 2)
    assert float(losses.hinge_g_loss(fake)) == pytest.approx(-(-1.0 + 1.0) / 2)

    fake_f = [[jnp.array([1.0, 2.0]), jnp.array([5.0])], [jnp.array([0.0]), jnp.array([9.0])]]
    real_f = [[jnp.array([0.0, 0.0]), jnp.array([0.0])], [jnp.array([3.0]), jnp.array([0.0])]]
    # scale 0: mean |[1, 2]| = 1.5 ; scale 1: |0 - 3| = 3 ; the logits (last) are not matched
    assert float(losses.feature_matching_loss(fake_f, real_f)) == pytest.approx((1.5 + 3.0) / 2)
    g = jax.grad(lambda r: losses.feature_matching_loss(fake_f, [[r, real_f[0][1]], real_f[1]]))(real_f[0][0])
    np.testing.assert_array_equal(g, 0.0)  # the real features are constants

    mu, logvar = jnp.array([[0.0, 1.0], [0.0, 0.0]]), jnp.array([[0.0, 0.0], [np.log(2.0), 0.0]])
    # sample 0: 1/2 mu^2 = 0.5 ; sample 1: 1/2 (2 - 1 - log 2) ; mean over the batch
    want = (0.5 + 0.5 * (1.0 - np.log(2.0))) / 2
    assert float(losses.kl_divergence(mu, logvar)) == pytest.approx(want, rel=1e-6)
