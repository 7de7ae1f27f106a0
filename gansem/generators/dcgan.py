"""DCGAN generator (the PyTorch DCGAN-tutorial architecture), as shipped by ``gan-face-generate``.

The embedded default model of gansem: a 64×64 face generator trained on
DigiFace-1M whose weights ship inside the PyPI package ``gan-face-generate``
(``gan_face_generate/weights.tar``). Architecture (``nz=100, ngf=64, nc=3``)::

    z [N,1,1,100] → ConvT(100→8g, 4, 1, 0) BN ReLU   → block4  [N, 4, 4, 512]
                  → ConvT(8g→4g, 4, 2, 1) BN ReLU    → block8  [N, 8, 8, 256]
                  → ConvT(4g→2g, 4, 2, 1) BN ReLU    → block16 [N,16,16, 128]
                  → ConvT(2g→g, 4, 2, 1)  BN ReLU    → block32 [N,32,32,  64]
                  → ConvT(g→3, 4, 2, 1) tanh         → image   [N,64,64,   3]

All convolutions are bias-free; BatchNorm runs in inference mode (running
statistics, eps 1e-5). ``block*`` names are the feature layers; they are the
outputs of the ReLUs at ``main.{2,5,8,11}`` of the PyTorch module.

A PyTorch ``ConvTranspose2d(k, stride s, padding p)`` equals a stride-1
convolution of the input dilated by ``s`` with the spatially flipped kernel and
padding ``k-1-p`` on each side; kernels are stored here as HWIO in that
(already flipped) form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import MAX_RESOLUTION, MAX_SIZE, FeatureLayer, Generator, check_range, register_family

__all__ = ["DCGAN", "DCGANModule"]

_HIGHEST = jax.lax.Precision.HIGHEST


class _ConvTranspose(nn.Module):
    features: int
    stride: int
    padding: int
    kernel_size: int = 4

    @nn.compact
    def __call__(self, x):  # x: [N, H, W, Cin]
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.normal(0.02), (k, k, x.shape[-1], self.features))
        pad = k - 1 - self.padding
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
            lhs_dilation=(self.stride, self.stride),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST,
        )


class _BatchNormEval(nn.Module):
    """Inference-mode BatchNorm; running statistics are stored as parameters."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class DCGANModule(nn.Module):
    """Flax module; returns ``(image [N,H,W,3], [block outputs low→high res])``."""

    nz: int = 100
    ngf: int = 64
    nc: int = 3
    num_blocks: int = 4

    @nn.compact
    def __call__(self, z):  # z: [N, nz]
        x = z[:, None, None, :]
        feats = []
        for i in range(self.num_blocks):
            ch = self.ngf * 2 ** (self.num_blocks - 1 - i)
            x = _ConvTranspose(ch, stride=1 if i == 0 else 2, padding=0 if i == 0 else 1, name=f"convT{i}")(x)
            x = _BatchNormEval(name=f"bn{i}")(x)
            x = nn.relu(x)
            feats.append(x)
        x = _ConvTranspose(self.nc, stride=2, padding=1, name=f"convT{self.num_blocks}")(x)
        return jnp.tanh(x), feats


@register_family
@dataclasses.dataclass(frozen=True)
class DCGAN(Generator):
    """DCGAN generator. Latents are z ~ N(0, I) of shape ``[N, nz]``."""

    family: ClassVar[str] = "dcgan"
    nz: int = 100
    ngf: int = 64
    nc: int = 3
    num_blocks: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "num_blocks", 1, int(math.log2(MAX_RESOLUTION)) - 2)
        for name in ("nz", "nc"):
            check_range(self, name, 1)
        check_range(self, "ngf", 1, MAX_SIZE >> (self.num_blocks - 1))

    @property
    def module(self) -> DCGANModule:
        return DCGANModule(self.nz, self.ngf, self.nc, self.num_blocks)

    @property
    def resolution(self) -> int:
        return 4 * 2 ** self.num_blocks

    @property
    def latent_shape(self):
        return (self.nz,)

    def feature_layers(self):
        return tuple(
            FeatureLayer(
                name=f"block{4 * 2 ** i}", resolution=4 * 2 ** i,
                channels=self.ngf * 2 ** (self.num_blocks - 1 - i), index=i,
            )
            for i in range(self.num_blocks)
        )

    def init_params(self, key):
        return self.module.init(key, jnp.zeros((1, self.nz), jnp.float32))

    def synthesize_styles(self, params, styles, capture=(), noise_key=None):
        names = self._capture_names(capture)
        img, feats = self.module.apply(params, styles)
        layers = self.feature_layers()
        return img, {l.name: f for l, f in zip(layers, feats) if l.name in names}
