"""Progressive GAN generator (Karras et al., ICLR 2018) as converted by genforce.

Forward semantics of ``genforce/genforce`` ``models/pggan_generator.py`` at full level
of detail (lod 0, the published models), NHWC::

    z [N, z_dim] ──pixel norm──▶ 1×1 map ──layer0: 4×4 "dense" conv, pad 3──▶ [N, 4, 4, C4]
    layer1          pixel norm → conv3×3                        → [N, 4, 4, C4]
    layer{2b}       pixel norm → nearest ×2 → conv3×3            → [N, r, r, Cr]   r = 4·2^b
    layer{2b+1}     pixel norm → conv3×3                        → [N, r, r, Cr]
    torgb           pixel norm → conv1×1 (gain 1), linear        → image [N, R, R, 3]

Every conv is ``conv(x, W · sqrt(2)/sqrt(fan_in)) + b`` followed by leaky ReLU 0.2
(equalised learning rate); the first layer's fan-in is ``16 · z_dim``. Channels are
``min(fmaps_base // r, fmaps_max)`` (published: 16384 and 512, so 512 up to 32 px, then
256, 128, 64, 32, 16). There is no mapping network and no truncation: :meth:`map_latents`
is the identity and the latent is pixel-normalised inside the synthesis network.

Layer names and the KLiSH paper's layer indices: feature layer ``"layer{i}"`` is the output
of genforce's ``layer{i}`` (after the leaky ReLU), and its index ``i`` is the paper's layer
index (Tab. 2): layers ``2b`` and ``2b+1`` are at ``4·2^b`` px, so the paper's selection
for PGGAN-CelebAHQ 1024 ([9, 11, 13, 15, 17], 496 channels) is ``layer9 … layer17``
(64 … 1024 px) and for PGGAN bedroom/church 256 ([7, 9, 11, 13], 960 channels) is
``layer7 … layer13`` (32 … 256 px).

Parameters (``{"params": ...}``): ``layer0/kernel [4, 4, z_dim, C4]``,
``layer{k}/kernel [3, 3, Cin, Cout]``, ``layer{k}/bias``, ``torgb/kernel [1, 1, C, 3]``,
``torgb/bias [3]``; kernels are HWIO and unscaled (the run-time wscale is applied here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import genforce_ops as ops
from .base import MAX_RESOLUTION, MAX_SIZE, FeatureLayer, Generator, GeneratorError, check_range, register_family

__all__ = ["PGGAN", "PGGANSynthesis"]


class _WSConv(nn.Module):
    """Equalised-lr convolution + bias (genforce ``ConvBlock`` without norm/activation)."""

    features: int
    kernel_size: int
    padding: int
    gain: float = ops.WSCALE_GAIN

    @nn.compact
    def __call__(self, x):  # x: [N, H, W, Cin]
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        scale = ops.wscale(k * k * cin, self.gain)
        return ops.conv2d(x, kernel * scale, self.padding) + bias


class PGGANSynthesis(nn.Module):
    """Flax module: ``z [N, z_dim] -> (image [N, R, R, 3], [layer outputs, forward order])``."""

    resolution: int
    channels: tuple  # channels per block, 4 px first
    final_tanh: bool = False

    @nn.compact
    def __call__(self, z):
        x = ops.pixel_norm(z)[:, None, None, :]  # [N, 1, 1, z_dim]
        feats = []
        for b, ch in enumerate(self.channels):
            if b == 0:
                x = ops.pixel_norm(x)
                x = _WSConv(ch, kernel_size=4, padding=3, name="layer0")(x)  # 4×4 "Dense"
            else:
                x = ops.upsample_nearest_2x(ops.pixel_norm(x))
                x = _WSConv(ch, kernel_size=3, padding=1, name=f"layer{2 * b}")(x)
            x = ops.leaky_relu(x)
            feats.append(x)
            x = _WSConv(ch, kernel_size=3, padding=1, name=f"layer{2 * b + 1}")(ops.pixel_norm(x))
            x = ops.leaky_relu(x)
            feats.append(x)
        img = _WSConv(3, kernel_size=1, padding=0, gain=1.0, name="torgb")(ops.pixel_norm(x))
        if self.final_tanh:
            img = jnp.tanh(img)
        return img, feats


@register_family
@dataclasses.dataclass(frozen=True)
class PGGAN(Generator):
    """genforce PGGAN generator (unconditional, lod 0). Latents: z ~ N(0, I), ``[N, z_dim]``.

    Attributes:
        resolution: output size (power of two, 8 … 1024).
        z_dim: latent size (512 for the published models).
        fmaps_base, fmaps_max: channel rule ``min(fmaps_base // r, fmaps_max)``.
        final_tanh: apply tanh to the image (genforce default False: linear output).
    """

    family: ClassVar[str] = "pggan"
    resolution: int = 1024
    z_dim: int = 512
    fmaps_base: int = 16 << 10
    fmaps_max: int = 512
    final_tanh: bool = False

    def __post_init__(self):
        super().__post_init__()
        r = self.resolution
        if not (r >= 8 and r <= 1024 and r & (r - 1) == 0):
            raise GeneratorError(f"pggan: resolution must be a power of two in [8, 1024], got {r!r}")
        check_range(self, "z_dim", 1)
        check_range(self, "fmaps_max", 1)
        check_range(self, "fmaps_base", 1, MAX_SIZE * MAX_RESOLUTION)
        if min(self.channels) < 1:
            raise GeneratorError(
                f"pggan: fmaps_base={self.fmaps_base} gives zero channels at {r} px; increase fmaps_base"
            )

    # -- description ----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(math.log2(self.resolution)) - 1

    @property
    def channels(self) -> tuple:
        """Channels per resolution block, 4 px first."""
        return tuple(ops.channels_at(4 * 2 ** b, self.fmaps_base, self.fmaps_max) for b in range(self.num_blocks))

    @property
    def latent_shape(self):
        return (self.z_dim,)

    @property
    def module(self) -> PGGANSynthesis:
        return PGGANSynthesis(self.resolution, self.channels, self.final_tanh)

    def feature_layers(self):
        return tuple(
            FeatureLayer(name=f"layer{k}", resolution=4 * 2 ** (k // 2), channels=self.channels[k // 2], index=k)
            for k in range(2 * self.num_blocks)
        )

    # -- parameters / forward ----------------------------------------------------------
    def init_params(self, key):
        """Random parameters as genforce initialises them: kernels N(0, 1), biases 0."""
        return jax.jit(self._init_params)(key)

    def _init_params(self, key):
        abstract = jax.eval_shape(self.module.init, key, jnp.zeros((1, self.z_dim), jnp.float32))
        return ops.fill_params(key, abstract, lambda name, x: jnp.zeros_like(x) if name.endswith("bias") else x)

    def map_latents(self, params, latents, class_labels=None):
        """Identity: PGGAN has no mapping network (z is pixel-normalised in synthesis)."""
        if class_labels is not None:
            raise GeneratorError("pggan is unconditional; got class labels")
        if latents.ndim != 2 or latents.shape[1] != self.z_dim:
            raise GeneratorError(f"pggan: latents must be [N, {self.z_dim}], got {tuple(latents.shape)}")
        return latents

    def synthesize_styles(self, params, styles, capture=(), noise_key=None):
        """Run the generator on z.

        Args:
            params: ``{"params": ...}`` as produced by the converter or :meth:`init_params`.
            styles: z ``[N, z_dim]`` (output of :meth:`map_latents`).
            capture: layer names (``"layer{i}"``) or True for all.
            noise_key: unused (PGGAN has no noise inputs).

        Returns:
            ``(image [N, R, R, 3] float32, {name: [N, r, r, C]})``.
        """
        names = self._capture_names(capture)
        img, feats = self.module.apply(params, styles)
        return img, {l.name: f for l, f in zip(self.feature_layers(), feats) if l.name in names}
