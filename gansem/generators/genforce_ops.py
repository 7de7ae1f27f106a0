"""Building blocks shared by the genforce PGGAN and StyleGAN (v1) ports (NHWC, float32).

These reproduce the forward semantics of ``genforce/genforce`` (``models/pggan_generator.py``,
``models/stylegan_generator.py``), which in turn reproduce the official TensorFlow models of
Karras et al. (PGGAN, ICLR 2018; StyleGAN, CVPR 2019):

* equalised learning rate ("wscale"): weights are stored as drawn from N(0, 1/lr_mul²) and
  multiplied at run time by ``gain / sqrt(fan_in) * lr_mul``;
* pixel norm ``x / sqrt(mean_c(x²) + 1e-8)`` (PGGAN Eq. in Sec. 4.2);
* nearest ×2 upsampling, a fixed ``[1, 2, 1] ⊗ [1, 2, 1] / 16`` blur, instance norm;
* the "fused-scale" up-convolution (a stride-2 transposed convolution whose 4×4 kernel is
  the sum of the four shifts of the 3×3 kernel), used by StyleGAN for resolutions ≥ 128.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "WSCALE_GAIN",
    "LRELU_SLOPE",
    "wscale",
    "channels_at",
    "pixel_norm",
    "instance_norm",
    "leaky_relu",
    "upsample_nearest_2x",
    "blur_121",
    "conv2d",
    "fused_upsample_conv2d",
    "dense",
    "fill_params",
]

_HIGHEST = jax.lax.Precision.HIGHEST
WSCALE_GAIN = math.sqrt(2.0)
LRELU_SLOPE = 0.2


def wscale(fan_in: int, gain: float = WSCALE_GAIN, lr_mul: float = 1.0) -> np.float32:
    """Run-time weight multiplier of the equalised learning rate: ``gain / sqrt(fan_in) * lr_mul``."""
    return np.float32(gain / math.sqrt(fan_in) * lr_mul)


def channels_at(resolution: int, fmaps_base: int, fmaps_max: int) -> int:
    """genforce channel rule: ``min(fmaps_base // resolution, fmaps_max)``."""
    return min(fmaps_base // resolution, fmaps_max)


def pixel_norm(x, eps: float = 1e-8):
    """Normalise each feature vector over the last axis: ``x / sqrt(mean(x², -1) + eps)``.

    Args:
        x: ``[..., C]``.
    """
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def instance_norm(x, eps: float = 1e-8):
    """Per-sample, per-channel normalisation over space (no affine).

    Args:
        x: ``[N, H, W, C]``.
    """
    x = x - jnp.mean(x, axis=(1, 2), keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=(1, 2), keepdims=True) + eps)


def leaky_relu(x, slope: float = LRELU_SLOPE):
    """Leaky ReLU without gain (genforce folds the gain into ``wscale``)."""
    return jnp.where(x >= 0, x, x * slope)


def upsample_nearest_2x(x):
    """Nearest-neighbour ×2 upsampling: ``[N, H, W, C] -> [N, 2H, 2W, C]``."""
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


def blur_121(x):
    """Depthwise ``[1, 2, 1] ⊗ [1, 2, 1] / 16`` filter with zero padding 1 (size preserving).

    Args:
        x: ``[N, H, W, C]``.
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0)))
    x = (x[:, :-2] + 2.0 * x[:, 1:-1] + x[:, 2:]) * 0.25
    x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    return (x[:, :, :-2] + 2.0 * x[:, :, 1:-1] + x[:, :, 2:]) * 0.25


def conv2d(x, kernel, padding: int):
    """Stride-1 cross-correlation (PyTorch ``conv2d`` semantics).

    Args:
        x: ``[N, H, W, Cin]``.
        kernel: ``[kh, kw, Cin, Cout]`` (HWIO, already scaled).
        padding: zero padding on each side.
    """
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST,
    )


def fused_upsample_conv2d(x, kernel):
    """Upsample ×2 and convolve in one step (genforce/TF ``fused_scale``).

    The 3×3 kernel is zero-padded to 5×5 and its four one-pixel shifts are summed into a
    4×4 kernel, which is used in a transposed convolution with stride 2 and padding 1
    (output ``2H``). A transposed convolution equals a stride-1 convolution of the input
    dilated by 2, padded by ``4 - 1 - 1 = 2``, with the spatially flipped kernel.

    Args:
        x: ``[N, H, W, Cin]``.
        kernel: ``[3, 3, Cin, Cout]`` (HWIO, already scaled).

    Returns:
        ``[N, 2H, 2W, Cout]``.
    """
    k = jnp.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))
    k = k[1:, 1:] + k[:-1, 1:] + k[1:, :-1] + k[:-1, :-1]  # [4, 4, Cin, Cout]
    k = k[::-1, ::-1]
    return jax.lax.conv_general_dilated(
        x, k, window_strides=(1, 1), padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST,
    )


def dense(x, kernel, bias=None):
    """``x @ kernel + bias`` at highest precision.

    Args:
        x: ``[N, Din]``; kernel: ``[Din, Dout]`` (already scaled); bias: ``[Dout]`` or None.
    """
    y = jnp.matmul(x, kernel, precision=_HIGHEST)
    return y if bias is None else y + bias


def fill_params(key, abstract, leaf_init):
    """Random parameters for an abstract tree from a single normal draw.

    One ``jax.random.normal`` call for all leaves compiles far faster on CPU than one RNG
    call per parameter (as ``flax.linen.Module.init`` does), which matters for deep generators.

    Args:
        key: PRNG key.
        abstract: pytree of ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape(module.init, ...)``).
        leaf_init: ``f(path: str, unit_normal: array) -> array``; ``path`` is the ``/``-joined key path.

    Returns:
        The filled pytree (same structure as ``abstract``).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    sizes = [math.prod(leaf.shape) for _, leaf in leaves]
    draw = jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32)
    out, offset = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        out.append(leaf_init(name, draw[offset:offset + size].reshape(leaf.shape)))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)
