"""The StyleGAN2 discriminator (Karras et al., CVPR 2020, Fig. 7b: ``resnet`` architecture) in Flax.

Trained from scratch as Labels4Free's "weak" discriminator (seed 001, Sec. 3.3 (a)); it reuses the
generator port's equalised-learning-rate ops (:mod:`gansem.generators.ops`). Layout, for an image
``[N, R, R, C_img]`` in ``[-1, 1]``::

    fromRGB   1×1 conv C_img → C(R), lrelu·√2
    b{r}      for r = R, R/2, ..., 8: conv0 3×3 C(r) → C(r), lrelu·√2;
              conv1 3×3 C(r) → C(r/2), lrelu·√2, then ×2 FIR down-sampling;
              skip  ×2 FIR down-sampling, 1×1 conv C(r) → C(r/2) without bias;
              output (skip + main)·√0.5
    b4        minibatch standard deviation (groups of ``mbstd_group`` images, 1 channel),
              conv 3×3 C(4)+1 → C(4), fc 16·C(4) → C(4) (lrelu·√2), out fc C(4) → 1 (the logit)

with ``C(r) = min(channel_base // r, channel_max)``. Every weight is drawn from N(0, 1) and
scaled at run time by ``1/sqrt(fan_in)`` (equalised learning rate). Differences from NVIDIA's
``training/networks.py`` that do not change the architecture: the down-sampling convolution
filters after its 3×3 convolution instead of before (both are linear; they differ only at the
border), and there is no ``conv_clamp`` / fp16. No pretrained discriminator is ever loaded:
Labels4Free fails to converge from one (Sec. 3.3 (a)).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..generators import ops

__all__ = ["StyleGAN2Discriminator", "discriminator_channels"]


def discriminator_channels(resolution: int, channel_base: int, channel_max: int) -> dict[int, int]:
    """``{r: min(channel_base // r, channel_max)}`` for r = resolution, ..., 4 (at least 1)."""
    out, r = {}, resolution
    while r >= 4:
        out[r] = max(1, min(channel_base // r, channel_max))
        r //= 2
    return out


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


class _Conv(nn.Module):
    """Equalised-lr conv ``[N, H, W, I] -> [N, H', W', O]``; params ``weight [O, I, k, k]`` (``bias [O]``)."""

    out_channels: int
    kernel: int
    bias: bool = True
    act: str = "lrelu"
    down: bool = False

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        w = self.param("weight", _normal, (self.out_channels, cin, self.kernel, self.kernel))
        y = ops.conv2d(x, w * (1.0 / math.sqrt(cin * self.kernel ** 2)), padding=self.kernel // 2)
        if self.down:  # ×2 FIR down-sampling with the [1, 3, 3, 1] filter: [N, H, W, O] -> [N, H/2, W/2, O]
            y = ops.upfirdn2d(y, ops.setup_filter((1, 3, 3, 1)), down=2, padding=(1, 1, 1, 1))
        b = self.param("bias", nn.initializers.zeros, (self.out_channels,)) if self.bias else None
        return ops.bias_act(y, b, act=self.act)


def minibatch_stddev(x, group_size: int):
    """Append the minibatch standard deviation as one channel (NVIDIA ``MinibatchStdLayer``, 1 channel).

    Images ``i, i + N/G, i + 2N/G, ...`` form a group of ``G = min(group_size, N)`` (N must be a
    multiple of G); the feature is the mean over ``(h, w, C)`` of the per-group standard deviation.

    Args:
        x: ``[N, h, w, C]``.

    Returns:
        ``[N, h, w, C + 1]``.
    """
    n, h, w, c = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch std: batch {n} is not a multiple of the group size {g}")
    y = x.reshape(g, n // g, h, w, c)
    y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)              # [N/G, h, w, C]
    y = jnp.mean(y, axis=(1, 2, 3))                      # [N/G]
    y = jnp.tile(y, g).reshape(n, 1, 1, 1)               # image j gets group j mod N/G
    return jnp.concatenate([x, jnp.broadcast_to(y, (n, h, w, 1))], axis=-1)


class StyleGAN2Discriminator(nn.Module):
    """Image ``[N, R, R, C_img]`` (in ``[-1, 1]``) → real/fake logit ``[N]``; see the module docstring."""

    resolution: int
    channel_base: int = 32768
    channel_max: int = 512
    mbstd_group: int = 4

    @nn.compact
    def __call__(self, img):
        r = self.resolution
        if img.shape[1:3] != (r, r):
            raise ValueError(f"discriminator: images must be {r}x{r}, got {img.shape[1]}x{img.shape[2]}")
        ch = discriminator_channels(r, self.channel_base, self.channel_max)
        x = _Conv(ch[r], 1, name="fromrgb")(img)
        while r > 4:
            y = _Conv(ch[r // 2], 1, bias=False, act="linear", down=True, name=f"b{r}_skip")(x)
            x = _Conv(ch[r], 3, name=f"b{r}_conv0")(x)
            x = _Conv(ch[r // 2], 3, down=True, name=f"b{r}_conv1")(x)
            x = (x + y) * math.sqrt(0.5)
            r //= 2
        x = minibatch_stddev(x, self.mbstd_group)
        x = _Conv(ch[4], 3, name="b4_conv")(x)                           # [N, 4, 4, C4]
        x = x.reshape(x.shape[0], -1)                                     # [N, 16·C4]
        w_fc = self.param("b4_fc_weight", _normal, (ch[4], x.shape[1]))
        x = ops.equalized_linear(x, w_fc, self.param("b4_fc_bias", nn.initializers.zeros, (ch[4],)),
                                 activation="lrelu")
        w_out = self.param("out_weight", _normal, (1, ch[4]))
        return ops.equalized_linear(x, w_out, self.param("out_bias", nn.initializers.zeros, (1,)))[:, 0]
