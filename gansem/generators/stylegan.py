"""StyleGAN (v1) generator (Karras et al., CVPR 2019) as converted by genforce.

Forward semantics of ``genforce/genforce`` ``models/stylegan_generator.py`` at full level
of detail (lod 0, the published models), NHWC.

Mapping (:meth:`StyleGAN.map_latents`)::

    z [N, z_dim] → pixel norm → 8 × (dense with W·sqrt(2)/sqrt(fan_in)·lr_mul, b·lr_mul, lrelu 0.2)
      → w [N, w_dim] → repeat → w+ [N, L, w_dim]
      → truncation on layers l < cutoff: w_avg + ψ (w+ − w_avg)       (StyleGAN Sec. 2 / App. B)

with ``lr_mul = 0.01`` and ``L = 2 log2(R) − 2`` style inputs, one per synthesis layer.

Synthesis (:meth:`StyleGAN.synthesize_styles`), layer ``k`` at ``r = 4·2^(k//2)`` px::

    layer0          const [4, 4, C]
    layer{2b}       nearest ×2 → conv3×3            (r < 128, or fused_scale=False)
                    fused conv-transpose ×2          (r ≥ 128 with fused_scale='auto', or True)
                    → blur [1,2,1]⊗[1,2,1]/16
    layer{2b+1}     conv3×3
    every layer:    + noise·strength[C] → + bias → lrelu 0.2 → instance norm
                    → AdaIN: x·(s_scale + 1) + s_shift,  s = w+[:, k] · (A/sqrt(w_dim)) + b_A
    torgb           conv1×1 (gain 1) on the last layer, linear → image [N, R, R, 3]

Noise (``noise_mode``): ``"const"`` uses the per-layer noise maps stored in the checkpoint
(genforce ``randomize_noise=False``), ``"random"`` draws N(0, 1) maps per sample from
``noise_key`` (``randomize_noise=True``, what KLiSH samples with), ``"none"`` adds nothing.

Layer names and the KLiSH paper's layer indices: feature layer ``"layer{i}"`` is the output of
genforce's ``synthesis.layer{i}`` (after the AdaIN style modulation) and ``i`` is the paper's
layer index (Tab. 2). The paper's selection for StyleGAN-CelebAHQ 1024 ([9, 11, 13, 15, 17],
496 channels) is ``layer9 … layer17`` (64 … 1024 px); for StyleGAN bedroom/church 256
([7, 9, 11, 13], 960 channels) it is ``layer7 … layer13`` (32 … 256 px). The w+ row ``k``
(``ws[:, k]``) drives ``layer{k}``; its affine style is :meth:`StyleGAN.layer_styles`.

Parameters (``{"params": ...}``)::

    mapping/dense{i}/{kernel [Din, Dout], bias [Dout]}
    truncation/w_avg [w_dim]
    synthesis/layer0/{const [1, 4, 4, C], bias, noise_strength [C], noise [4, 4], style/{kernel [w_dim, 2C], bias [2C]}}
    synthesis/layer{k}/{kernel [3, 3, Cin, Cout], bias, noise_strength, noise [r, r], style/{kernel, bias}}
    synthesis/torgb/{kernel [1, 1, C, 3], bias [3]}

Kernels are HWIO / [in, out] and unscaled: the equalised-lr multipliers are applied at run time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import genforce_ops as ops
from .base import MAX_RESOLUTION, MAX_SIZE, FeatureLayer, Generator, GeneratorError, check_range, register_family

__all__ = ["StyleGAN", "StyleGANMapping", "StyleGANSynthesis", "style_affine", "NOISE_MODES"]

NOISE_MODES = ("const", "random", "none")
_FIELD = object()  # "use the generator's field" default


def style_affine(w, kernel, bias):
    """The per-layer AdaIN style ``w · (A / sqrt(w_dim)) + b``.

    Args:
        w: ``[N, w_dim]`` (one row of w+).
        kernel: ``[w_dim, 2C]`` unscaled; bias: ``[2C]``.

    Returns:
        ``[N, 2C]``: ``[:, :C]`` is the scale (applied as ``scale + 1``), ``[:, C:]`` the shift.
    """
    return ops.dense(w, kernel * ops.wscale(kernel.shape[0], gain=1.0), bias)


class _Dense(nn.Module):
    features: int
    lr_mul: float

    @nn.compact
    def __call__(self, x):
        din = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(1.0 / self.lr_mul), (din, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return ops.dense(x, kernel * ops.wscale(din, lr_mul=self.lr_mul), bias * np.float32(self.lr_mul))


class _Affine(nn.Module):
    features: int

    @nn.compact
    def __call__(self, w):
        kernel = self.param("kernel", nn.initializers.normal(1.0), (w.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return style_affine(w, kernel, bias)


class _ToRGB(nn.Module):
    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(1.0), (1, 1, cin, 3))
        bias = self.param("bias", nn.initializers.zeros, (3,))
        return ops.conv2d(x, kernel * ops.wscale(cin, gain=1.0), 0) + bias


class StyleGANMapping(nn.Module):
    """``z [N, z_dim] -> w [N, w_dim]`` (pixel norm, then dense + lrelu layers with lr_mul)."""

    z_dim: int
    w_dim: int
    hidden: int
    num_layers: int
    lr_mul: float

    @nn.compact
    def __call__(self, z):
        x = ops.pixel_norm(z)
        for i in range(self.num_layers):
            dout = self.w_dim if i == self.num_layers - 1 else self.hidden
            x = _Dense(dout, self.lr_mul, name=f"dense{i}")(x)
            x = ops.leaky_relu(x)
        return x


class _StyleLayer(nn.Module):
    """One synthesis layer: [const | (fused) up-conv + blur | conv] → noise → bias → lrelu → IN → AdaIN."""

    features: int
    resolution: int
    kind: str  # "const" | "up" | "fused_up" | "conv"
    noise_mode: str

    @nn.compact
    def __call__(self, x, w, noise=None):
        """x: [N, h, w, Cin] (ignored for const); w: [N, w_dim]; noise: [N, r, r, 1] for mode random."""
        c, r = self.features, self.resolution
        if self.kind == "const":
            const = self.param("const", nn.initializers.ones, (1, r, r, c))
            x = jnp.broadcast_to(const, (w.shape[0], r, r, c))
        else:
            cin = x.shape[-1]
            kernel = self.param("kernel", nn.initializers.normal(1.0), (3, 3, cin, c))
            kernel = kernel * ops.wscale(9 * cin)
            if self.kind == "fused_up":
                x = ops.fused_upsample_conv2d(x, kernel)
            elif self.kind == "up":
                x = ops.conv2d(ops.upsample_nearest_2x(x), kernel, 1)
            else:
                x = ops.conv2d(x, kernel, 1)
            if self.kind in ("up", "fused_up"):
                x = ops.blur_121(x)
        bias = self.param("bias", nn.initializers.zeros, (c,))
        strength = self.param("noise_strength", nn.initializers.zeros, (c,))
        const_noise = self.param("noise", nn.initializers.normal(1.0), (r, r))
        if self.noise_mode == "const":
            x = x + const_noise[None, :, :, None] * strength
        elif self.noise_mode == "random":
            x = x + noise * strength
        x = ops.instance_norm(ops.leaky_relu(x + bias))
        style = _Affine(2 * c, name="style")(w)  # [N, 2C]
        x = x * (style[:, None, None, :c] + 1.0) + style[:, None, None, c:]
        return x


class StyleGANSynthesis(nn.Module):
    """``w+ [N, L, w_dim] -> (image [N, R, R, 3], [layer outputs, forward order])``."""

    channels: tuple  # per block, 4 px first
    fused_from: int  # resolutions >= this use the fused up-conv
    noise_mode: str = "const"
    final_tanh: bool = False

    @nn.compact
    def __call__(self, ws, noises: Optional[Sequence] = None):
        feats = []
        x = None
        for b, ch in enumerate(self.channels):
            r = 4 * 2 ** b
            if b == 0:
                kind = "const"
            else:
                kind = "fused_up" if r >= self.fused_from else "up"
            for j, k in enumerate((2 * b, 2 * b + 1)):
                noise = None if noises is None else noises[k]
                x = _StyleLayer(ch, r, kind if j == 0 else "conv", self.noise_mode, name=f"layer{k}")(
                    x, ws[:, k], noise
                )
                feats.append(x)
        img = _ToRGB(name="torgb")(x)
        if self.final_tanh:
            img = jnp.tanh(img)
        return img, feats


@register_family
@dataclasses.dataclass(frozen=True)
class StyleGAN(Generator):
    """genforce StyleGAN (v1) generator (unconditional, lod 0). Latents: z ~ N(0, I), ``[N, z_dim]``.

    Styles (the space :meth:`synthesize_styles` consumes) are w+ ``[N, num_layers, w_dim]``.

    Attributes:
        resolution: output size (power of two, 8 … 1024).
        z_dim, w_dim: latent and intermediate latent sizes.
        mapping_layers, mapping_fmaps, mapping_lr_mul: mapping network (8, 512, 0.01 published).
        fmaps_base, fmaps_max: channel rule ``min(fmaps_base // r, fmaps_max)``.
        fused_scale: ``"auto"`` (fused up-conv at ≥ 128 px, genforce default), True or False.
        final_tanh: apply tanh to the image (genforce default False).
        truncation_psi: ψ of the truncation trick applied by :meth:`map_latents` (1 = off;
            genforce's synthesis default is 0.7, KLiSH samples with 0.5).
        truncation_cutoff: truncate w+ rows ``< cutoff`` (genforce ``trunc_layers``, default 8);
            None truncates every layer.
        noise_mode: ``"const"`` (stored noise maps), ``"random"`` (needs ``noise_key``) or ``"none"``.
    """

    family: ClassVar[str] = "stylegan"
    resolution: int = 1024
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_fmaps: int = 512
    mapping_lr_mul: float = 0.01
    fmaps_base: int = 16 << 10
    fmaps_max: int = 512
    fused_scale: Union[str, bool] = "auto"
    final_tanh: bool = False
    truncation_psi: float = 1.0
    truncation_cutoff: Optional[int] = 8
    noise_mode: str = "const"

    def __post_init__(self):
        super().__post_init__()
        r = self.resolution
        if not (8 <= r <= 1024 and r & (r - 1) == 0):
            raise GeneratorError(f"stylegan: resolution must be a power of two in [8, 1024], got {r!r}")
        for name in ("z_dim", "w_dim", "mapping_fmaps", "fmaps_max"):
            check_range(self, name, 1)
        check_range(self, "mapping_layers", 1, 64)
        check_range(self, "fmaps_base", 1, MAX_SIZE * MAX_RESOLUTION)
        check_range(self, "truncation_cutoff", 0)
        if not self.mapping_lr_mul > 0:
            raise GeneratorError(f"stylegan: mapping_lr_mul must be positive, got {self.mapping_lr_mul}")
        if self.fused_scale not in ("auto", True, False):
            raise GeneratorError(f"stylegan: fused_scale must be 'auto', True or False, got {self.fused_scale!r}")
        if self.noise_mode not in NOISE_MODES:
            raise GeneratorError(f"stylegan: noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        if min(self.channels) < 1:
            raise GeneratorError(
                f"stylegan: fmaps_base={self.fmaps_base} gives zero channels at {r} px; increase fmaps_base"
            )

    # -- description ----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(math.log2(self.resolution)) - 1

    @property
    def num_layers(self) -> int:
        """Synthesis layers = rows of w+ (18 at 1024 px, 14 at 256 px)."""
        return 2 * self.num_blocks

    @property
    def channels(self) -> tuple:
        """Channels per resolution block, 4 px first."""
        return tuple(ops.channels_at(4 * 2 ** b, self.fmaps_base, self.fmaps_max) for b in range(self.num_blocks))

    @property
    def fused_from(self) -> int:
        """Smallest resolution whose upsampling layer uses the fused conv-transpose."""
        return {"auto": 128, True: 8, False: 2 * self.resolution}[self.fused_scale]

    @property
    def latent_shape(self):
        return (self.z_dim,)

    @property
    def style_shape(self):
        """Shape of one w+ sample: ``(num_layers, w_dim)``."""
        return (self.num_layers, self.w_dim)

    def feature_layers(self):
        return tuple(
            FeatureLayer(name=f"layer{k}", resolution=4 * 2 ** (k // 2), channels=self.channels[k // 2], index=k)
            for k in range(self.num_layers)
        )

    @property
    def mapping_module(self) -> StyleGANMapping:
        return StyleGANMapping(self.z_dim, self.w_dim, self.mapping_fmaps, self.mapping_layers, self.mapping_lr_mul)

    @property
    def synthesis_module(self) -> StyleGANSynthesis:
        return StyleGANSynthesis(self.channels, self.fused_from, self.noise_mode, self.final_tanh)

    # -- parameters -----------------------------------------------------------------
    def init_params(self, key):
        """Random parameters as genforce initialises them.

        Kernels N(0, 1) (mapping kernels N(0, 1/lr_mul²)), biases, noise strengths and
        ``w_avg`` 0, ``const`` 1, stored noise maps N(0, 1).
        """
        return jax.jit(self._init_params)(key)

    def _init_params(self, key):
        def leaf(name, x):
            if name.endswith(("bias", "noise_strength", "w_avg")):
                return jnp.zeros_like(x)
            if name.endswith("const"):
                return jnp.ones_like(x)
            if name.startswith("params/mapping/"):
                return x / np.float32(self.mapping_lr_mul)
            return x

        def structure(key):
            mapping = self.mapping_module.init(key, jnp.zeros((1, self.z_dim), jnp.float32))["params"]
            synthesis = self.synthesis_module.init(key, jnp.zeros((1,) + self.style_shape, jnp.float32))["params"]
            return {"params": {
                "mapping": mapping,
                "truncation": {"w_avg": jnp.zeros((self.w_dim,), jnp.float32)},
                "synthesis": synthesis,
            }}

        return ops.fill_params(key, jax.eval_shape(structure, key), leaf)

    # -- latent spaces --------------------------------------------------------------
    def mapping(self, params, latents):
        """z ``[N, z_dim]`` → w ``[N, w_dim]`` (no truncation)."""
        if latents.ndim != 2 or latents.shape[1] != self.z_dim:
            raise GeneratorError(f"stylegan: latents must be [N, {self.z_dim}], got {tuple(latents.shape)}")
        return self.mapping_module.apply({"params": params["params"]["mapping"]}, latents)

    def truncate(self, params, ws, psi: Optional[float] = None, cutoff=_FIELD):
        """Truncation trick on w+: rows ``l < cutoff`` become ``w_avg + ψ (w − w_avg)``.

        Args:
            ws: ``[N, L, w_dim]``.
            psi: ψ; default ``self.truncation_psi``.
            cutoff: number of leading rows to truncate (None = all); default ``self.truncation_cutoff``.
        """
        psi = self.truncation_psi if psi is None else psi
        cutoff = self.truncation_cutoff if cutoff is _FIELD else cutoff
        if psi == 1.0 or cutoff == 0:
            return ws
        cutoff = ws.shape[1] if cutoff is None else cutoff
        w_avg = params["params"]["truncation"]["w_avg"]
        coef = np.where(np.arange(ws.shape[1]) < cutoff, np.float32(psi), np.float32(1.0)).astype(np.float32)
        return w_avg + (ws - w_avg) * coef[None, :, None]

    def map_latents(self, params, latents, class_labels=None):
        """z ``[N, z_dim]`` → truncated w+ ``[N, num_layers, w_dim]`` (settings from the fields)."""
        if class_labels is not None:
            raise GeneratorError("stylegan is unconditional; got class labels")
        w = self.mapping(params, latents)
        ws = jnp.broadcast_to(w[:, None, :], (w.shape[0], self.num_layers, self.w_dim))
        return self.truncate(params, ws)

    def mix_styles(self, ws_a, ws_b, cutoff):
        """Style mixing: rows ``< cutoff`` from ``ws_a``, the rest from ``ws_b``.

        Args:
            ws_a, ws_b: ``[N, L, w_dim]``.
            cutoff: int, or ``[N]`` int array (a cutoff per sample); genforce's training-time
                mixing is ``w[:, cutoff:] = new_w[:, cutoff:]``.
        """
        cutoff = jnp.asarray(cutoff)
        rows = jnp.arange(ws_a.shape[1])
        take_a = rows[None, :] < (cutoff[:, None] if cutoff.ndim == 1 else cutoff)
        return jnp.where(take_a[:, :, None], ws_a, ws_b)

    def layer_styles(self, params, styles) -> dict:
        """The per-layer AdaIN styles ``{"layer{k}": [N, 2C]}`` (scale | shift), from w+ ``[N, L, w_dim]``."""
        syn = params["params"]["synthesis"]
        return {
            f"layer{k}": style_affine(styles[:, k], syn[f"layer{k}"]["style"]["kernel"], syn[f"layer{k}"]["style"]["bias"])
            for k in range(self.num_layers)
        }

    # -- synthesis ------------------------------------------------------------------
    def synthesize_styles(self, params, styles, capture=(), noise_key=None):
        """Run the synthesis network on w+.

        Args:
            params: ``{"params": ...}`` from the converter or :meth:`init_params`.
            styles: w+ ``[N, num_layers, w_dim]`` (output of :meth:`map_latents`).
            capture: layer names (``"layer{i}"``) or True for all.
            noise_key: PRNG key, required for ``noise_mode="random"``.

        Returns:
            ``(image [N, R, R, 3] float32, {name: [N, r, r, C]})``.
        """
        if styles.ndim != 3 or tuple(styles.shape[1:]) != self.style_shape:
            raise GeneratorError(
                f"stylegan: styles must be w+ [N, {self.num_layers}, {self.w_dim}], got {tuple(styles.shape)}; "
                "use map_latents(params, z) to get them"
            )
        names = self._capture_names(capture)
        noises = None
        if self.noise_mode == "random":
            if noise_key is None:
                raise GeneratorError("stylegan: noise_mode='random' needs noise_key (or use noise_mode='const')")
            keys = jax.random.split(noise_key, self.num_layers)
            n = styles.shape[0]
            noises = [jax.random.normal(keys[l.index], (n, l.resolution, l.resolution, 1), jnp.float32)
                      for l in self.feature_layers()]
        img, feats = self.synthesis_module.apply({"params": params["params"]["synthesis"]}, styles, noises)
        return img, {l.name: f for l, f in zip(self.feature_layers(), feats) if l.name in names}
