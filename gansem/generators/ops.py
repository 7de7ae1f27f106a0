"""Shared StyleGAN2-style operations in JAX (NHWC, float32).

These reproduce the forward semantics of NVIDIA's ``torch_utils/ops`` and
``training/networks.py`` (stylegan2-ada-pytorch; Karras et al., "Analyzing and
Improving the Image Quality of StyleGAN", CVPR 2020, and "Training Generative
Adversarial Networks with Limited Data", NeurIPS 2020):

* :func:`upfirdn2d` — upsample (zero insertion), pad (negative = crop), FIR filter, downsample;
* :func:`bias_act` — bias, activation, gain, optional clamp (the ``conv_clamp`` of ADA);
* :func:`equalized_linear` — the equalised-learning-rate fully connected layer
  (``W · lr/sqrt(fan_in)``, ``b · lr``);
* :func:`modulated_conv2d` — weight (de)modulation of StyleGAN2 (Eq. 1–3 of Karras et al. 2020),
  optionally fused with a ×2 up-sampling through the ``[1, 3, 3, 1]`` filter;
* :func:`conv2d_resample` — plain convolution with optional ×2 FIR up-sampling.

Weights are kept in PyTorch's layouts (``[out, in, kh, kw]`` for convolutions,
``[out, in]`` for linear layers) so converted checkpoints need no transposes.
Every convolution and matrix product runs at ``Precision.HIGHEST`` so that GPU
results match the float32 references.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "HIGHEST",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
    "bias_act",
    "normalize_2nd_moment",
    "equalized_linear",
    "conv2d",
    "conv2d_resample",
    "modulated_conv2d",
]

HIGHEST = jax.lax.Precision.HIGHEST

_ACT_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0), "relu": math.sqrt(2.0)}


def setup_filter(f: Sequence[float] = (1, 3, 3, 1)) -> np.ndarray:
    """Separable FIR filter as a normalised 2-D array.

    Args:
        f: 1-D taps, e.g. ``(1, 3, 3, 1)``.

    Returns:
        ``[k, k]`` float32, ``outer(f, f) / sum(outer(f, f))`` (sums to 1).
    """
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"resample filter must be a non-empty 1-D tap list, got shape {f.shape}")
    f2 = np.outer(f, f)
    return (f2 / f2.sum()).astype(np.float32)


def upfirdn2d(x, f, up: int = 1, down: int = 1, padding=(0, 0, 0, 0), gain: float = 1.0,
              flip_filter: bool = False):
    """Upsample, pad, FIR-filter and downsample a batch of images.

    Same semantics as NVIDIA's ``upfirdn2d`` reference: insert ``up-1`` zeros after
    every pixel, pad by ``padding = (x0, x1, y0, y1)`` (negative values crop),
    convolve with ``f * gain**(f.ndim/2)`` (a true convolution unless ``flip_filter``)
    and keep every ``down``-th pixel.

    Args:
        x: ``[N, H, W, C]`` float32.
        f: ``[kh, kw]`` filter (numpy or jax array).
        up, down: integer factors.
        padding: ``(x0, x1, y0, y1)``.
        gain: overall scale (``up**2`` keeps the mean when upsampling).
        flip_filter: correlate instead of convolve.

    Returns:
        ``[N, H', W', C]`` with ``H' = (H*up + y0 + y1 - kh) // down + 1``.
    """
    x0, x1, y0, y1 = (int(p) for p in padding)
    f = jnp.asarray(f, dtype=x.dtype) * (gain ** (f.ndim / 2))
    c = x.shape[-1]
    # Zero insertion after every pixel (interior + trailing), then pad/crop.
    x = jax.lax.pad(
        x, jnp.zeros((), x.dtype),
        [(0, 0, 0), (y0, y1 + up - 1, up - 1), (x0, x1 + up - 1, up - 1), (0, 0, 0)],
    )
    if not flip_filter:
        f = f[::-1, ::-1]  # lax convolutions correlate; flip for a true convolution
    kernel = jnp.broadcast_to(f[:, :, None, None], f.shape + (1, c))  # HWIO, depthwise
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(down, down), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c, precision=HIGHEST,
    )


def upsample2d(x, f, up: int = 2):
    """×``up`` FIR upsampling that keeps the image centred (NVIDIA ``upsample2d``).

    Args:
        x: ``[N, H, W, C]``.
        f: ``[k, k]`` filter, e.g. :func:`setup_filter` of ``(1, 3, 3, 1)``.

    Returns:
        ``[N, up*H, up*W, C]``.
    """
    k = f.shape[0]
    p0 = (k + up - 1) // 2
    p1 = (k - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up ** 2)


def bias_act(x, b=None, act: str = "linear", alpha: float = 0.2, gain: Optional[float] = None,
             clamp: Optional[float] = None):
    """``clamp(act(x + b) * gain, -clamp, clamp)`` over the last (channel) axis.

    Args:
        x: ``[..., C]``.
        b: ``[C]`` or None.
        act: ``'linear'``, ``'lrelu'`` (slope ``alpha``) or ``'relu'``.
        gain: defaults to the activation's gain (``sqrt(2)`` for (l)relu, 1 for linear).
        clamp: clamp magnitude applied after the gain, or None.
    """
    if act not in _ACT_GAIN:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(_ACT_GAIN)}")
    if b is not None:
        x = x + b
    if act == "lrelu":
        x = jnp.where(x >= 0, x, x * alpha)
    elif act == "relu":
        x = jnp.maximum(x, 0)
    g = _ACT_GAIN[act] if gain is None else gain
    if g != 1:
        x = x * g
    if clamp is not None and clamp >= 0:
        x = jnp.clip(x, -clamp, clamp)
    return x


def normalize_2nd_moment(x, eps: float = 1e-8):
    """``x / sqrt(mean(x², axis=-1) + eps)`` (pixel norm of the latent; x: ``[N, D]``)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def equalized_linear(x, weight, bias=None, lr_multiplier: float = 1.0, activation: str = "linear"):
    """Equalised-learning-rate fully connected layer (NVIDIA ``FullyConnectedLayer``).

    ``y = act(x · (W·lr/sqrt(in))ᵀ + b·lr) · gain(act)``.

    Args:
        x: ``[N, in]``.
        weight: ``[out, in]`` (stored, i.e. not yet scaled).
        bias: ``[out]`` or None.
        lr_multiplier: learning-rate multiplier of the layer (0.01 in the mapping network).
        activation: ``'linear'`` or ``'lrelu'``.

    Returns:
        ``[N, out]``.
    """
    w = weight * (lr_multiplier / math.sqrt(weight.shape[1]))
    y = jnp.matmul(x, w.T, precision=HIGHEST)
    b = None if bias is None else bias * lr_multiplier
    return bias_act(y, b, act=activation)


def conv2d(x, weight, padding: int = 0, flip_weight: bool = True):
    """2-D convolution of NHWC images with a PyTorch-layout kernel.

    Args:
        x: ``[N, H, W, I]``.
        weight: ``[O, I, kh, kw]``.
        padding: symmetric zero padding.
        flip_weight: True = cross-correlation (``torch.nn.functional.conv2d``);
            False = true convolution (kernel flipped), as NVIDIA uses for up-sampling convs.
    """
    w = jnp.transpose(weight, (2, 3, 1, 0))  # OIHW -> HWIO
    if not flip_weight:
        w = w[::-1, ::-1]
    p = int(padding)
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST,
    )


def conv2d_resample(x, weight, f=None, up: int = 1, padding: int = 0):
    """Convolution with optional ×``up`` FIR up-sampling (NVIDIA ``conv2d_resample``, down=1).

    For ``up > 1`` the input is zero-inserted, padded by
    ``(padding + (k_f+up-1)//2, padding + (k_f-up)//2)`` and filtered with ``f·up²``,
    then convolved (true convolution, ``flip_weight = (up == 1)`` as in NVIDIA's code)
    without padding. This equals NVIDIA's transposed-convolution fast path.

    Args:
        x: ``[N, H, W, I]``.
        weight: ``[O, I, kh, kw]`` (already scaled).
        f: ``[k_f, k_f]`` resampling filter (needed when ``up > 1``).
        up: 1 or 2.
        padding: the layer's padding (``kernel_size // 2`` for synthesis convs, 0 for 1×1).

    Returns:
        ``[N, up*H, up*W, O]``.
    """
    if up == 1:
        return conv2d(x, weight, padding=padding, flip_weight=True)
    if f is None:
        raise ValueError("conv2d_resample with up > 1 needs a resample filter")
    k = f.shape[0]
    p0 = padding + (k + up - 1) // 2
    p1 = padding + (k - up) // 2
    x = upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up ** 2)
    return conv2d(x, weight, padding=0, flip_weight=False)


def modulated_conv2d(x, weight, styles, demodulate: bool = True, up: int = 1, padding: int = 0,
                     resample_filter=None):
    """StyleGAN2 modulated convolution (Karras et al. 2020, Eq. 1–3).

    ``w'_{n,o,i,k} = w_{o,i,k} · s_{n,i}``; with demodulation
    ``w''_{n,o,i,k} = w'_{n,o,i,k} / sqrt(Σ_{i,k} w'²_{n,o,i,k} + 1e-8)``. Computed in the
    equivalent batched form ``conv(x · s, w) · d`` (scale the input channels by the styles,
    convolve with the shared kernel, scale the output channels by the demodulation
    coefficients), which is exactly the per-sample convolution of NVIDIA's fused path.

    Args:
        x: ``[N, H, W, I]``.
        weight: ``[O, I, kh, kw]``, the raw stored kernel (demodulation makes its scale irrelevant).
        styles: ``[N, I]`` per-sample input-channel scales.
        demodulate: divide each output channel by its per-sample weight norm.
        up: 1 or 2 (FIR up-sampling through ``resample_filter`` before the convolution).
        padding: ``kh // 2`` for 3×3 convs, 0 for 1×1.
        resample_filter: ``[k, k]`` filter for ``up > 1``.

    Returns:
        ``[N, up*H, up*W, O]``.
    """
    x = x * styles[:, None, None, :].astype(x.dtype)
    x = conv2d_resample(x, weight, f=resample_filter, up=up, padding=padding)
    if demodulate:
        # d_{n,o} = rsqrt(Σ_{i,k} (w_{o,i,k} s_{n,i})²) = rsqrt(Σ_i s_{n,i}² Σ_k w_{o,i,k}²)
        wsq = jnp.sum(jnp.square(weight), axis=(2, 3))  # [O, I]
        dcoefs = jax.lax.rsqrt(jnp.matmul(jnp.square(styles), wsq.T, precision=HIGHEST) + 1e-8)  # [N, O]
        x = x * dcoefs[:, None, None, :]
    return x
