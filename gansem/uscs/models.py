"""SPADE / GauGAN in Flax linen: the mask-to-image generator and discriminators of USCS (KLiSH Sec. 5).

Park, Liu, Wang, Zhu, *Semantic Image Synthesis with Spatially-Adaptive Normalization*
(CVPR 2019; "SPADE"). KLiSH Sec. 5 (Unsupervised Semantic-Conditional Synthesis) trains
this generator on the (cluster mask, generated image) pairs of a KLiSH run, so a painted
layout of the discovered classes becomes an image.

**SPADE normalisation** (SPADE Eq. 1). An activation ``x`` ``[B, H, W, C]`` is normalised
without learned affine parameters (BatchNorm over ``(B, H, W)`` or InstanceNorm over
``(H, W)``), then modulated per pixel by the mask ``m`` (one-hot ``[B, H, W, K]``, resized
to ``H × W`` by nearest neighbour)::

    a = ReLU(conv3x3(m))                     # [B, H, W, hidden], shared
    γ = conv3x3(a),  β = conv3x3(a)          # [B, H, W, C] each
    SPADE(x, m) = norm(x) · (1 + γ) + β

**Generator.** From the mask downsampled to ``s0 × s0`` (a 3×3 convolution; or, with
``use_vae``, from a style vector ``z`` through a linear layer, as in SPADE), resolution
levels ``s0, 2 s0, ..., R``; each level upsamples by 2 (nearest) and applies ``blocks[i]``
SPADE residual blocks with ``ngf · mults[i]`` channels. A block with ``fin`` inputs and
``fout`` outputs computes (``lrelu`` = leaky ReLU, slope 0.2)::

    dx  = conv3x3(lrelu(SPADE(x, m)))        # fin -> min(fin, fout)
    dx  = conv3x3(lrelu(SPADE(dx, m)))       # -> fout
    out = x + dx                 if fin == fout
    out = conv1x1(SPADE(x, m)) + dx          otherwise (learned shortcut, no bias)

and the image is ``tanh(conv3x3(lrelu(x)))`` in ``[-1, 1]``. The block convolutions carry
spectral normalisation (``spectral=True``), the SPADE and output convolutions do not.

**Discriminator.** ``num_d`` PatchGANs (Isola et al. 2017) on the image concatenated with
the one-hot mask, at full size, 1/2, 1/4, ... (3×3 average pooling, stride 2, padding not
counted). Each is ``n_layers`` 4×4 convolutions (stride 2 except the last, channels
``ndf, 2 ndf, ... ≤ 512``; all but the first spectrally normalised and followed by a
parameter-free InstanceNorm; leaky ReLU 0.2) and a 4×4 convolution to one logit per patch.
Every layer's output is returned, for the feature-matching loss (pix2pixHD).

**Style encoder** (``use_vae``). Stride-2 3×3 convolutions (spectral norm, InstanceNorm,
leaky ReLU) from ``R`` down to 4×4, then two linear layers to the mean ``μ`` and log-variance
``log σ²`` of ``q(z | image)``; training samples ``z = μ + σ ε`` (reparameterisation) and adds
the KL divergence to N(0, I) to the generator loss; synthesis draws ``z ~ N(0, I)``.

**State.** BatchNorm running averages and the spectral-norm power-iteration vectors
(``u``, ``σ`` of each normalised kernel; flax ``nn.SpectralNorm``) live in the
``"batch_stats"`` collection. ``train=True`` uses batch statistics and runs one power
iteration whose result is stored (apply with ``mutable=["batch_stats"]``); ``train=False``
uses the running averages and the stored ``u`` (deterministic, nothing written).

Kernels are drawn from Xavier-normal with gain 0.02, as the SPADE reference initialises them.
Arrays are NHWC; masks enter as one-hot float ``[B, R, R, K]`` (:func:`one_hot_masks`),
images as float ``[B, R, R, 3]`` in ``[-1, 1]`` (:func:`images_to_unit`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "SpadeConfig",
    "CONFIGS",
    "config_from_dict",
    "spade_config",
    "SPADE",
    "SpadeResBlock",
    "SpadeGenerator",
    "PatchDiscriminator",
    "MultiscaleDiscriminator",
    "StyleEncoder",
    "SpadeModels",
    "build_models",
    "synthesize",
    "one_hot_masks",
    "images_to_unit",
    "unit_to_images",
    "downsample_nearest",
    "upsample_nearest",
    "instance_norm",
]

LRELU_SLOPE = 0.2
_init = nn.initializers.variance_scaling(0.02 ** 2, "fan_avg", "normal")  # Xavier-normal, gain 0.02 (SPADE)


@dataclasses.dataclass(frozen=True)
class SpadeConfig:
    """Architecture of the generator, discriminator and (optional) style encoder.

    Attributes:
        ngf: generator width; level ``i`` has ``ngf * mults[i]`` channels.
        mults: channel multiplier of each resolution level, lowest first; there are
            ``len(mults)`` levels, the lowest at ``s0 = R / 2 ** (len(mults) - 1)``.
        blocks: SPADE residual blocks per level (default one each).
        spade_hidden: channels of the shared SPADE convolution (128 in SPADE).
        norm: the parameter-free normalisation inside SPADE: ``"batch"`` (SPADE's synchronised
            BatchNorm) or ``"instance"``.
        spectral: spectral normalisation on the generator's block convolutions, the
            discriminator's inner convolutions and the encoder.
        use_vae: style encoder + KL term; the generator starts from ``z`` instead of the mask.
        z_dim: length of the style vector (with ``use_vae``).
        ndf: discriminator width (first layer); ``d_layers``: its stride-2/1 4×4 convolutions
            before the logit layer; ``num_d``: number of scales.
        e_ndf: encoder width (with ``use_vae``).
    """

    ngf: int = 64
    mults: tuple = (16, 16, 8, 4, 2, 1)
    blocks: Optional[tuple] = (1, 2, 1, 1, 1, 1)
    spade_hidden: int = 128
    norm: str = "batch"
    spectral: bool = True
    use_vae: bool = False
    z_dim: int = 256
    ndf: int = 64
    d_layers: int = 4
    num_d: int = 2
    e_ndf: int = 64

    def level_blocks(self) -> tuple:
        """Blocks per level (``blocks`` or one per level)."""
        return tuple(self.blocks) if self.blocks is not None else (1,) * len(self.mults)

    def check(self, resolution: int) -> None:
        """Raise ``ValueError`` for options that cannot build a network for ``R × R`` images."""
        for name in ("ngf", "spade_hidden", "ndf", "d_layers", "num_d", "z_dim", "e_ndf"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.mults or min(self.mults) < 1:
            raise ValueError(f"mults must be positive channel multipliers, got {self.mults}")
        blocks = self.level_blocks()
        if len(blocks) != len(self.mults) or min(blocks) < 1:
            raise ValueError(f"blocks must give >= 1 block for each of the {len(self.mults)} levels, got {blocks}")
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {self.norm!r}")
        ups = len(self.mults) - 1
        if resolution % (1 << ups) or resolution < (1 << ups):
            raise ValueError(f"{len(self.mults)} generator levels need a resolution divisible by {1 << ups}, "
                             f"got {resolution}")
        if self.use_vae and (resolution < 8 or resolution & (resolution - 1)):
            raise ValueError(f"the style encoder needs a power-of-two resolution >= 8, got {resolution}")

    def to_dict(self) -> dict:
        """JSON values (tuples as lists), as ``model.json`` stores them."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


#: Named configurations. ``paper``: the SPADE reference generator ("normal" upsampling: levels
#: R/32 .. R, widths 1024 .. 64, two blocks at R/16, 128 hidden SPADE channels) and discriminator
#: (ndf 64, 4 layers, 2 scales), for a GPU at 256 px (any R divisible by 32). ``cpu``: the same
#: layout at 1/8 of the widths (ngf 8, 16 hidden SPADE channels, ndf 16) with a 3-layer
#: discriminator, for the 64 px DCGAN pairs on a CPU (about 18 GFLOP per step of 16 pairs).
CONFIGS = {
    "cpu": SpadeConfig(ngf=8, spade_hidden=16, ndf=16, d_layers=3, e_ndf=16, z_dim=64),
    "paper": SpadeConfig(),
}


def config_from_dict(options: Mapping) -> SpadeConfig:
    """A :class:`SpadeConfig` from ``model.json``'s ``model`` entry (lists back to tuples).

    Raises:
        ValueError: an option :class:`SpadeConfig` does not have.
    """
    fields = {f.name for f in dataclasses.fields(SpadeConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"SPADE has no option(s) {', '.join(unknown)}; its options are {', '.join(sorted(fields))}")
    return SpadeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def spade_config(name: str = "cpu", **overrides) -> SpadeConfig:
    """The named configuration of :data:`CONFIGS` with some fields replaced (``None`` values are left as they are).

    New ``mults`` of another length than the configuration's ``blocks`` (and no new ``blocks``)
    get one block per level.

    Raises:
        ValueError: an unknown name or field.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown SPADE configuration {name!r}; choose one of {', '.join(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(SpadeConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"SPADE has no option(s) {', '.join(unknown)}; its options are {', '.join(sorted(fields))}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = CONFIGS[name]
    if "mults" in overrides and "blocks" not in overrides and base.blocks is not None \
            and len(base.blocks) != len(overrides["mults"]):
        overrides["blocks"] = None
    return dataclasses.replace(base, **overrides)


# -- tensor helpers ------------------------------------------------------------------------------


def one_hot_masks(labels: jax.Array, num_classes: int, dtype=jnp.float32) -> jax.Array:
    """``[B, H, W]`` int class ids -> ``[B, H, W, K]`` one-hot ``dtype``."""
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def images_to_unit(images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` uint8 in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def unit_to_images(x: jax.Array) -> jax.Array:
    """Inverse of :func:`images_to_unit`, rounded and clipped to uint8."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def downsample_nearest(x: jax.Array, size: int) -> jax.Array:
    """``[B, H, H, C] -> [B, size, size, C]`` by nearest neighbour (``H`` a multiple of ``size``).

    Picks pixel ``f // 2 + i f`` (``f = H / size``), which is what ``jax.image.resize(...,
    "nearest")`` picks (half-pixel centres), as a strided slice.
    """
    f = x.shape[1] // size
    return x if f == 1 else x[:, f // 2::f, f // 2::f, :]


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """``[B, H, W, C] -> [B, fH, fW, C]``, each pixel repeated ``f × f`` (broadcast and reshape)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Parameter-free InstanceNorm: ``(x - mean) / sqrt(var + eps)`` over ``(H, W)`` per sample and channel."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _lrelu(x):
    return nn.leaky_relu(x, LRELU_SLOPE)


class _Conv(nn.Module):
    """A convolution, spectrally normalised if ``spectral`` (its ``u``, ``σ`` in ``"batch_stats"``)."""

    features: int
    kernel: int = 3
    stride: int = 1
    padding: Any = "SAME"
    use_bias: bool = True
    spectral: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        padding = self.padding
        if not isinstance(padding, str):
            # explicit zero padding, then a VALID convolution: the same numbers, but XLA's CPU backend
            # computes the kernel gradient of a padded stride-1 4x4 convolution ~20x slower than this
            x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
            padding = "VALID"
        conv = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride, padding=padding,
                       use_bias=self.use_bias, kernel_init=_init, name="conv")
        if self.spectral:
            return nn.SpectralNorm(conv, name="sn")(x, update_stats=train)
        return conv(x)


# -- generator ------------------------------------------------------------------------------------


class SPADE(nn.Module):
    """Spatially-adaptive normalisation (SPADE Eq. 1): ``norm(x) · (1 + γ(m)) + β(m)``.

    Attributes:
        hidden: channels of the shared convolution on the mask.
        norm: ``"batch"`` (statistics over ``(B, H, W)``; running averages with ``train=False``)
            or ``"instance"`` (over ``(H, W)`` per sample).
    """

    hidden: int = 128
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        """
        Args:
            x: ``[B, H, W, C]`` activations.
            mask: ``[B, H, W, K]`` one-hot mask already at ``H × W``.

        Returns:
            ``[B, H, W, C]``.
        """
        if self.norm == "batch":
            xn = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False, momentum=0.9,
                              epsilon=1e-5, name="bn")(x)
        else:
            xn = instance_norm(x)
        a = nn.relu(nn.Conv(self.hidden, (3, 3), padding="SAME", kernel_init=_init, name="shared")(mask))
        gamma = nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=_init, name="gamma")(a)
        beta = nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=_init, name="beta")(a)
        return xn * (1.0 + gamma) + beta


class SpadeResBlock(nn.Module):
    """SPADE residual block with a learned 1×1 shortcut when the width changes (see the module docstring)."""

    features: int
    hidden: int = 128
    norm: str = "batch"
    spectral: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        """``x [B, H, W, fin]``, ``mask [B, H, W, K]`` -> ``[B, H, W, features]``."""
        fin, fout = x.shape[-1], self.features
        fmid = min(fin, fout)
        spade = dict(hidden=self.hidden, norm=self.norm)
        if fin != fout:
            shortcut = _Conv(fout, 1, use_bias=False, spectral=self.spectral, name="conv_s")(
                SPADE(**spade, name="norm_s")(x, mask, train=train), train=train)
        else:
            shortcut = x
        dx = _Conv(fmid, 3, spectral=self.spectral, name="conv_0")(
            _lrelu(SPADE(**spade, name="norm_0")(x, mask, train=train)), train=train)
        dx = _Conv(fout, 3, spectral=self.spectral, name="conv_1")(
            _lrelu(SPADE(**spade, name="norm_1")(dx, mask, train=train)), train=train)
        return shortcut + dx


class SpadeGenerator(nn.Module):
    """The SPADE generator: one-hot mask (and, with ``use_vae``, a style vector) -> image in [-1, 1].

    Attributes:
        config: the architecture (:class:`SpadeConfig`).
        resolution: output size R.
    """

    config: SpadeConfig
    resolution: int

    @nn.compact
    def __call__(self, mask: jax.Array, z: Optional[jax.Array] = None, *, train: bool) -> jax.Array:
        """
        Args:
            mask: ``[B, R, R, K]`` one-hot float.
            z: ``[B, z_dim]`` style vectors; required with ``use_vae``, ignored otherwise.
            train: batch statistics and power-iteration updates (``mutable=["batch_stats"]``).

        Returns:
            ``[B, R, R, 3]`` float32 in ``[-1, 1]``.
        """
        cfg = self.config
        levels = len(cfg.mults)
        s0 = self.resolution >> (levels - 1)
        if mask.shape[1] != self.resolution:
            raise ValueError(f"the generator was built for {self.resolution}px masks, got {mask.shape[1]}")
        c0 = cfg.ngf * cfg.mults[0]
        if cfg.use_vae:
            if z is None:
                raise ValueError("a generator with use_vae needs the style vectors z [B, z_dim]")
            x = nn.Dense(c0 * s0 * s0, kernel_init=_init, name="fc")(z).reshape(-1, s0, s0, c0)
        else:
            x = nn.Conv(c0, (3, 3), padding="SAME", kernel_init=_init, name="fc")(downsample_nearest(mask, s0))
        for i, (mult, nblocks) in enumerate(zip(cfg.mults, cfg.level_blocks())):
            if i:
                x = upsample_nearest(x)
            m = downsample_nearest(mask, x.shape[1])
            for j in range(nblocks):
                x = SpadeResBlock(cfg.ngf * mult, cfg.spade_hidden, cfg.norm, cfg.spectral,
                                  name=f"level{i}_block{j}")(x, m, train=train)
        x = nn.Conv(3, (3, 3), padding="SAME", kernel_init=_init, name="conv_img")(_lrelu(x))
        return jnp.tanh(x)


# -- discriminator ----------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """One PatchGAN: ``[B, H, W, K + 3] -> [feature maps of every layer]``, the last one ``[B, h, w, 1]`` logits."""

    ndf: int = 64
    n_layers: int = 4
    spectral: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> list:
        pad = ((2, 2), (2, 2))  # kernel 4, padding ceil(3 / 2) = 2, as the SPADE reference
        feats = []
        x = _lrelu(_Conv(self.ndf, 4, 2, pad, name="conv0")(x, train=train))
        feats.append(x)
        nf = self.ndf
        for n in range(1, self.n_layers):
            nf = min(nf * 2, 512)
            stride = 1 if n == self.n_layers - 1 else 2
            x = _Conv(nf, 4, stride, pad, spectral=self.spectral, name=f"conv{n}")(x, train=train)
            x = _lrelu(instance_norm(x))
            feats.append(x)
        feats.append(_Conv(1, 4, 1, pad, name="logits")(x, train=train))
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs on the (mask, image) pair at full size, 1/2, 1/4, ...

    Attributes:
        ndf, n_layers, spectral: of each :class:`PatchDiscriminator`.
        num_d: number of scales.
    """

    ndf: int = 64
    n_layers: int = 4
    num_d: int = 2
    spectral: bool = True

    @nn.compact
    def __call__(self, mask: jax.Array, image: jax.Array, *, train: bool) -> list:
        """
        Args:
            mask: ``[B, R, R, K]`` one-hot float.
            image: ``[B, R, R, 3]`` in ``[-1, 1]``.
            train: run (and store) a power iteration of the spectral norms.

        Returns:
            One list per scale (full size first) of the layers' outputs ``[B, h_l, w_l, C_l]``;
            the last of each list is the patch logits ``[B, h, w, 1]``.
        """
        x = jnp.concatenate([mask.astype(image.dtype), image], axis=-1)
        out = []
        for i in range(self.num_d):
            if i:
                x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=False)
            out.append(PatchDiscriminator(self.ndf, self.n_layers, self.spectral, name=f"scale{i}")(x, train=train))
        return out


class StyleEncoder(nn.Module):
    """The VAE encoder of SPADE: image ``[B, R, R, 3]`` in [-1, 1] -> ``(μ, log σ²)``, each ``[B, z_dim]``."""

    ndf: int = 64
    z_dim: int = 256
    spectral: bool = True

    @nn.compact
    def __call__(self, image: jax.Array, *, train: bool):
        n = int(math.log2(image.shape[1] // 4))  # stride-2 layers down to 4 x 4
        x = image
        for i in range(n):
            if i:
                x = _lrelu(x)
            x = _Conv(self.ndf * min(2 ** i, 8), 3, 2, ((1, 1), (1, 1)), spectral=self.spectral,
                      name=f"conv{i}")(x, train=train)
            x = instance_norm(x)
        x = _lrelu(x).reshape(x.shape[0], -1)
        mu = nn.Dense(self.z_dim, kernel_init=_init, name="fc_mu")(x)
        logvar = nn.Dense(self.z_dim, kernel_init=_init, name="fc_var")(x)
        return mu, logvar


@dataclasses.dataclass(frozen=True)
class SpadeModels:
    """The networks of one USCS model (hashable: the jitted programs are cached on it).

    Attributes:
        config: the architecture.
        num_classes: K; ``resolution``: R.
        generator, discriminator: the Flax modules; ``encoder``: the style encoder or ``None``.
    """

    config: SpadeConfig
    num_classes: int
    resolution: int
    generator: SpadeGenerator
    discriminator: MultiscaleDiscriminator
    encoder: Optional[StyleEncoder]


def build_models(config: SpadeConfig, num_classes: int, resolution: int) -> SpadeModels:
    """Generator, discriminator and (with ``use_vae``) encoder for K classes at ``R × R``.

    Raises:
        ValueError: K < 1, or a configuration that does not fit R (:meth:`SpadeConfig.check`).
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    config.check(int(resolution))
    gen = SpadeGenerator(config, int(resolution))
    disc = MultiscaleDiscriminator(config.ndf, config.d_layers, config.num_d, config.spectral)
    enc = StyleEncoder(config.e_ndf, config.z_dim, config.spectral) if config.use_vae else None
    return SpadeModels(config, int(num_classes), int(resolution), gen, disc, enc)



def synthesize(models: SpadeModels, variables: Mapping, labels: jax.Array, key: jax.Array) -> jax.Array:
    """Images from label maps with a trained generator (inference mode; jittable).

    Args:
        models: the networks.
        variables: the generator's ``{"params", "batch_stats"}``.
        labels: ``[B, R, R]`` int class ids in ``[0, K)``.
        key: PRNG key of the style vector (with ``use_vae``): one ``z ~ N(0, I)`` drawn from it is
            used for every image of the batch, so an image depends only on its mask and the key.

    Returns:
        ``[B, R, R, 3]`` uint8.
    """
    mask = one_hot_masks(labels, models.num_classes)
    z = None
    if models.config.use_vae:
        z = jnp.broadcast_to(jax.random.normal(key, (models.config.z_dim,)), (labels.shape[0], models.config.z_dim))
    return unit_to_images(models.generator.apply(dict(variables), mask, z, train=False))
