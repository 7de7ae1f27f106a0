"""StyleGAN2 / StyleGAN2-ADA generator (Karras et al., CVPR 2020; NeurIPS 2020) in Flax.

One module serves checkpoints of NVIDIA's ``stylegan2-ada-pytorch`` / ``stylegan3``
(StyleGAN2 configs, ``.pkl``) and of ``rosinality/stylegan2-pytorch`` (``.pt``); both
are converted by :mod:`weights_port.stylegan2` into the same parameter tree. The forward
pass reproduces NVIDIA's ``training/networks.py`` in float32 (fp16 blocks of ADA-trained
networks run in float32, as NVIDIA's ``force_fp32=True``):

* mapping: ``z / rms(z)`` [+ ``normalize(embed(c))``] → ``mapping_layers`` equalised FC layers
  (lr multiplier 0.01, lrelu·√2) → w, broadcast to ``w+ [N, num_ws, w_dim]``; truncation
  ``w_avg + ψ (w − w_avg)`` on layers ``< truncation_cutoff`` (all if None);
* synthesis: per resolution R a block ``bR`` with ``conv0`` (×2 up-sampling modulated conv,
  R ≥ 8), ``conv1`` (modulated conv), ``torgb`` (1×1 modulated conv without demodulation);
  noise is added after the convolution and before the bias; ``bias_act`` = lrelu·√2 then the
  optional clamp ``±conv_clamp``; the skip architecture sums the up-sampled running image
  with every ``torgb`` output (``resnet`` is also implemented, not parity-tested).

Parameter tree (PyTorch layouts, so conversion is a pure rename)::

    params/mapping/{fc{i}/{weight [out,in], bias [out]}, embed/{weight, bias} (c_dim>0), w_avg [w_dim]}
    params/synthesis/b4/const [C4, 4, 4]
    params/synthesis/b{R}/{conv0 (R≥8), conv1}/{weight [C,Cin,3,3], bias [C], noise_strength [],
                                               noise_const [R,R], affine/{weight [Cin,w_dim], bias [Cin]}}
    params/synthesis/b{R}/torgb/{weight [3,C,1,1], bias [3], affine/{weight [C,w_dim], bias [C]}}
    params/synthesis/b{R}/skip/weight [C, Cin, 1, 1]                              (resnet only)

Name mapping to NVIDIA's ``G_ema.state_dict()``: drop the leading ``params/`` and replace
``/`` by ``.`` (``params/synthesis/b8/conv0/affine/weight`` ↔ ``synthesis.b8.conv0.affine.weight``);
shapes are identical. The only NVIDIA entries without a counterpart are the constant
``*.resample_filter`` buffers (the normalised ``[1,3,3,1]`` filter, recorded in the
``resample_filter`` field instead). See :func:`nvidia_name` and :mod:`weights_port.stylegan2`
for the rosinality mapping.

Feature layers and the KLiSH paper's layer indices: ``feature_layers()`` lists, in forward
order, ``b4.const`` (index 0, the learned 4×4 input), ``b4.conv1`` (1), then
``b{R}.conv0`` (2k) and ``b{R}.conv1`` (2k+1) for ``R = 4·2^k``. These indices are exactly
the ones of the KLiSH paper's Tab. 2 (genforce numbering): the last layer of resolution
``R`` is ``b{R}.conv1`` with index ``2·log2(R/4)+1``, e.g. FFHQ 1024 → [9, 11, 13, 15, 17]
(64…1024 px, 512+256+128+64+32 = 992 channels). Besides the feature layers,
``synthesize_styles`` can also capture the auxiliary outputs ``b{R}.torgb`` (toRGB output
before the skip sum), ``b{R}.img`` (running skip image) and ``b{R}.x`` (block output).

Layer edits: ``synthesize_styles(..., edits={name: (scale, shift)})`` replaces the output ``x`` of
a feature layer or of ``b{R}.torgb`` by ``x · scale + shift`` before the next layer reads it (and
before it is captured); ``scale`` and ``shift`` broadcast against ``[N, h, w, C]``. Zeroing
channels (``scale`` a 0/1 ``[C]`` vector) gives Labels4Free's background generator; the gradient
with respect to a zero ``shift`` is the gradient with respect to that layer's tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import ClassVar, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import ops
from .base import MAX_RESOLUTION, MAX_SIZE, FeatureLayer, Generator, GeneratorError, check_range, register_family

__all__ = ["StyleGAN2", "StyleGAN2Network", "MappingNetwork", "SynthesisNetwork", "nvidia_name", "mix_styles"]

_ARCHITECTURES = ("skip", "resnet")
_NOISE_MODES = ("const", "random", "none")
_CONVENTIONS = ("nvidia", "rosinality")


# -- Flax modules ---------------------------------------------------------------------------

def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


class FullyConnected(nn.Module):
    """Equalised-lr linear layer; params ``weight [out, in]``, ``bias [out]``."""

    in_features: int
    out_features: int
    lr_multiplier: float = 1.0
    bias_init: float = 0.0
    activation: str = "linear"

    @nn.compact
    def __call__(self, x):  # x: [N, in] -> [N, out]
        weight = self.param(
            "weight", lambda k, s: _normal(k, s) / self.lr_multiplier, (self.out_features, self.in_features)
        )
        bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.out_features,))
        return ops.equalized_linear(x, weight, bias, self.lr_multiplier, self.activation)


class MappingNetwork(nn.Module):
    """z [, c] → w ``[N, w_dim]`` (no broadcast, no truncation); also holds ``w_avg``."""

    z_dim: int
    c_dim: int
    w_dim: int
    num_layers: int
    embed_features: Optional[int]
    layer_features: Optional[int]
    lr_multiplier: float

    @nn.compact
    def __call__(self, z, c=None):
        embed = self.embed_features if self.embed_features is not None else (self.w_dim if self.c_dim else 0)
        layer = self.layer_features if self.layer_features is not None else self.w_dim
        feats = [self.z_dim + embed] + [layer] * (self.num_layers - 1) + [self.w_dim]
        self.param("w_avg", nn.initializers.zeros, (self.w_dim,))
        xs = []
        if self.z_dim > 0:
            xs.append(ops.normalize_2nd_moment(z.astype(jnp.float32)))
        if self.c_dim > 0:
            y = FullyConnected(self.c_dim, embed, name="embed")(c.astype(jnp.float32))
            xs.append(ops.normalize_2nd_moment(y))
        x = xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1)
        for i in range(self.num_layers):
            x = FullyConnected(feats[i], feats[i + 1], lr_multiplier=self.lr_multiplier,
                               activation="lrelu", name=f"fc{i}")(x)
        return x


def _edit(x, edits, name):
    """``x · scale + shift`` for the layer ``name`` of ``edits`` (``{name: (scale, shift)}``), else ``x``."""
    if not edits or name not in edits:
        return x
    scale, shift = edits[name]
    return x * scale + shift


def _noise(noise_mode, noise_key, x, noise_const, strength):
    if noise_mode == "const":
        return noise_const[None, :, :, None] * strength
    if noise_mode == "random":
        if noise_key is None:
            raise GeneratorError("noise_mode='random' needs a noise_key (a jax.random key)")
        n, h, w, _ = x.shape
        return jax.random.normal(noise_key, (n, h, w, 1), x.dtype) * strength
    return None


class SynthesisLayer(nn.Module):
    """Modulated 3×3 conv (+ optional ×2 up-sampling), noise, bias, lrelu·√2, clamp."""

    in_channels: int
    out_channels: int
    w_dim: int
    resolution: int
    up: int = 1
    use_noise: bool = True
    conv_clamp: Optional[float] = None
    resample_filter: tuple = (1, 3, 3, 1)
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x, w, noise_mode="const", noise_key=None, gain=1.0):
        # x: [N, R/up, R/up, Cin], w: [N, w_dim] -> [N, R, R, Cout]
        styles = FullyConnected(self.w_dim, self.in_channels, bias_init=1.0, name="affine")(w)
        k = self.kernel_size
        weight = self.param("weight", _normal, (self.out_channels, self.in_channels, k, k))
        if self.use_noise:
            noise_const = self.param("noise_const", _normal, (self.resolution, self.resolution))
            strength = self.param("noise_strength", nn.initializers.zeros, ())
        bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
        x = ops.modulated_conv2d(x, weight, styles, demodulate=True, up=self.up, padding=k // 2,
                                 resample_filter=ops.setup_filter(self.resample_filter))
        if self.use_noise:
            noise = _noise(noise_mode, noise_key, x, noise_const, strength)
            if noise is not None:
                x = x + noise
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return ops.bias_act(x, bias, act="lrelu", gain=math.sqrt(2.0) * gain, clamp=clamp)


class ToRGBLayer(nn.Module):
    """1×1 modulated conv without demodulation (styles × 1/sqrt(Cin)), bias, clamp."""

    in_channels: int
    out_channels: int
    w_dim: int
    conv_clamp: Optional[float] = None

    @nn.compact
    def __call__(self, x, w):  # x: [N, R, R, Cin] -> [N, R, R, 3]
        styles = FullyConnected(self.w_dim, self.in_channels, bias_init=1.0, name="affine")(w)
        styles = styles * (1.0 / math.sqrt(self.in_channels))
        weight = self.param("weight", _normal, (self.out_channels, self.in_channels, 1, 1))
        bias = self.param("bias", nn.initializers.zeros, (self.out_channels,))
        x = ops.modulated_conv2d(x, weight, styles, demodulate=False)
        return ops.bias_act(x, bias, act="linear", clamp=self.conv_clamp)


class SkipLayer(nn.Module):
    """ResNet-architecture shortcut: ×2 FIR up-sampling 1×1 conv (no bias), gain √0.5."""

    in_channels: int
    out_channels: int
    resample_filter: tuple = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x):  # [N, R/2, R/2, Cin] -> [N, R, R, Cout]
        weight = self.param("weight", _normal, (self.out_channels, self.in_channels, 1, 1))
        y = ops.conv2d_resample(x, weight * (1.0 / math.sqrt(self.in_channels)),
                                f=ops.setup_filter(self.resample_filter), up=2)
        return y * math.sqrt(0.5)


class SynthesisBlock(nn.Module):
    """One resolution: [const] conv0 (up) conv1 [torgb]; returns (x, img, outputs)."""

    in_channels: int  # 0 for the 4×4 block
    out_channels: int
    w_dim: int
    resolution: int
    img_channels: int
    is_last: bool
    architecture: str
    conv_clamp: Optional[float]
    use_noise: bool
    resample_filter: tuple

    @nn.compact
    def __call__(self, x, img, ws, noise_mode="const", noise_key=None, edits=None):
        # ws: [N, num_conv + num_torgb, w_dim]; edits: {layer name: (scale, shift)} (see the module docstring)
        r = self.resolution
        f = ops.setup_filter(self.resample_filter)
        keys = [None, None] if noise_key is None else list(jax.random.split(noise_key, 2))
        out = {}
        layer_kw = dict(w_dim=self.w_dim, resolution=r, use_noise=self.use_noise,
                        conv_clamp=self.conv_clamp, resample_filter=self.resample_filter)
        wi = 0
        if self.in_channels == 0:
            const = self.param("const", _normal, (self.out_channels, r, r))
            x = jnp.broadcast_to(jnp.transpose(const, (1, 2, 0))[None], (ws.shape[0], r, r, self.out_channels))
            x = out[f"b{r}.const"] = _edit(x, edits, f"b{r}.const")
            x = SynthesisLayer(self.out_channels, self.out_channels, name="conv1", **layer_kw)(
                x, ws[:, wi], noise_mode, keys[1])
            x = out[f"b{r}.conv1"] = _edit(x, edits, f"b{r}.conv1")
            wi += 1
        else:
            if self.architecture == "resnet":
                y = SkipLayer(self.in_channels, self.out_channels, self.resample_filter, name="skip")(x)
            x = SynthesisLayer(self.in_channels, self.out_channels, up=2, name="conv0", **layer_kw)(
                x, ws[:, wi], noise_mode, keys[0])
            x = out[f"b{r}.conv0"] = _edit(x, edits, f"b{r}.conv0")
            gain = math.sqrt(0.5) if self.architecture == "resnet" else 1.0
            x = SynthesisLayer(self.out_channels, self.out_channels, name="conv1", **layer_kw)(
                x, ws[:, wi + 1], noise_mode, keys[1], gain=gain)
            x = out[f"b{r}.conv1"] = _edit(x, edits, f"b{r}.conv1")
            wi += 2
            if self.architecture == "resnet":
                x = y + x
        out[f"b{r}.x"] = x
        if img is not None:
            img = ops.upsample2d(img, f)
        if self.is_last or self.architecture == "skip":
            y = ToRGBLayer(self.out_channels, self.img_channels, self.w_dim, self.conv_clamp, name="torgb")(
                x, ws[:, wi])
            y = out[f"b{r}.torgb"] = _edit(y, edits, f"b{r}.torgb")
            img = y if img is None else img + y
        out[f"b{r}.img"] = img
        return x, img, out


class SynthesisNetwork(nn.Module):
    """w+ ``[N, num_ws, w_dim]`` → image ``[N, R, R, 3]`` and every named intermediate output."""

    w_dim: int
    img_resolution: int
    img_channels: int
    channels: tuple  # one per resolution 4, 8, ..., img_resolution
    architecture: str = "skip"
    conv_clamp: Optional[float] = None
    use_noise: bool = True
    resample_filter: tuple = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, ws, noise_mode="const", noise_key=None, edits=None):
        x = img = None
        outputs = {}
        w_idx = 0
        n_blocks = len(self.channels)
        for k in range(n_blocks):
            r = 4 * 2 ** k
            is_last = k == n_blocks - 1
            num_conv = 1 if k == 0 else 2
            num_torgb = 1 if (is_last or self.architecture == "skip") else 0
            block_key = None if noise_key is None else jax.random.fold_in(noise_key, r)
            x, img, out = SynthesisBlock(
                in_channels=0 if k == 0 else self.channels[k - 1], out_channels=self.channels[k],
                w_dim=self.w_dim, resolution=r, img_channels=self.img_channels, is_last=is_last,
                architecture=self.architecture, conv_clamp=self.conv_clamp, use_noise=self.use_noise,
                resample_filter=self.resample_filter, name=f"b{r}",
            )(x, img, ws[:, w_idx:w_idx + num_conv + num_torgb], noise_mode, block_key, edits)
            outputs.update(out)
            w_idx += num_conv
        return img, outputs


class StyleGAN2Network(nn.Module):
    """Mapping + synthesis; ``init`` runs both so every parameter is created."""

    mapping_cfg: dict
    synthesis_cfg: dict

    def setup(self):
        self.mapping = MappingNetwork(**self.mapping_cfg)
        self.synthesis = SynthesisNetwork(**self.synthesis_cfg)

    def __call__(self, z, c, num_ws: int):
        w = self.mapping(z, c)
        ws = jnp.broadcast_to(w[:, None], (w.shape[0], num_ws, w.shape[1]))
        return self.synthesis(ws, "const", None)

    def map(self, z, c):
        return self.mapping(z, c)

    def synthesize(self, ws, noise_mode, noise_key, edits=None):
        return self.synthesis(ws, noise_mode, noise_key, edits)


@functools.lru_cache(maxsize=64)
def _init_fn(gen):
    """Jitted ``key -> {"params": ...}`` (cached per config)."""
    net = gen.network()
    z = jnp.zeros((1, gen.z_dim), jnp.float32)
    c = jnp.zeros((1, gen.c_dim), jnp.float32) if gen.c_dim else None
    return jax.jit(lambda key: {"params": net.init(key, z, c, gen.num_ws)["params"]})


@functools.lru_cache(maxsize=64)
def _mapping_fn(gen):
    """Jitted ``(params, z [N, z_dim], c [N, c_dim] | None) -> w [N, w_dim]`` (cached per config)."""
    net = gen.network()
    return jax.jit(lambda params, z, c: net.apply(params, z, c, method=StyleGAN2Network.map))


@functools.lru_cache(maxsize=64)
def _synthesis_fn(gen, names: frozenset, noise_mode: str):
    """Jitted ``(params, ws, noise_key, edits) -> (img, {name: map})`` (cached per config/capture/noise mode).

    Jitting here keeps eager calls fast; inside a caller's ``jax.jit`` it simply inlines.
    """
    net = gen.network()

    def run(params, ws, noise_key, edits):
        img, outputs = net.apply(params, ws, noise_mode, noise_key, edits, method=StyleGAN2Network.synthesize)
        return img, {k: outputs[k] for k in names}

    return jax.jit(run)


# -- style mixing -------------------------------------------------------------------------

def mix_styles(ws_a, ws_b, cutoff):
    """Style mixing: layers ``< cutoff`` from ``ws_a``, layers ``>= cutoff`` from ``ws_b``.

    Args:
        ws_a, ws_b: ``[N, num_ws, w_dim]``.
        cutoff: int, or ``[N]`` int array (one crossover layer per sample).

    Returns:
        ``[N, num_ws, w_dim]``.
    """
    num_ws = ws_a.shape[1]
    cutoff = jnp.asarray(cutoff)
    layer = jnp.arange(num_ws)
    take_a = (layer[None, :] < cutoff.reshape(-1, 1))[:, :, None]  # [N or 1, num_ws, 1]
    return jnp.where(take_a, ws_a, ws_b)


def nvidia_name(flat_name: str) -> str:
    """Our flattened parameter name (``params/a/b``) → NVIDIA ``G_ema.state_dict()`` key (``a.b``)."""
    parts = flat_name.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    return ".".join(parts)


# -- the Generator ------------------------------------------------------------------------

@register_family
@dataclasses.dataclass(frozen=True)
class StyleGAN2(Generator):
    """StyleGAN2(-ADA) generator config + generation settings.

    Architecture fields mirror NVIDIA's ``Generator`` init kwargs (``z_dim, c_dim, w_dim,
    img_resolution, img_channels``, ``mapping_kwargs.{num_layers, embed_features,
    layer_features, lr_multiplier}``, ``synthesis_kwargs.{channel_base, channel_max,
    conv_clamp, architecture, use_noise, resample_filter}``). ``channels`` (one per
    resolution 4…img_resolution) overrides ``min(channel_base // R, channel_max)`` for
    networks whose widths do not follow that rule (e.g. shrunk rosinality models).

    Settings: ``truncation_psi`` / ``truncation_cutoff`` (None = all layers),
    ``noise_mode`` (``'const'`` stored noise maps, ``'random'`` fresh noise from
    ``noise_key``, ``'none'``), ``weights_convention`` (``'nvidia'`` or ``'rosinality'``:
    provenance of the weights; rosinality checkpoints truncate towards ``latent_avg`` on all
    layers, have no ``conv_clamp`` and no conditioning — the converter sets the fields so).

    Example::

        gen, params, _ = gansem.generators.base.load_checkpoint("ckpt/ffhq")
        z = gen.sample_latents(jax.random.key(0), 4)
        ws = gen.map_latents(params, z)                       # [4, 18, 512]
        img, feats = gen.synthesize_styles(params, ws, capture=["b64.conv1"])
    """

    family: ClassVar[str] = "stylegan2"

    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_resolution: int = 1024
    img_channels: int = 3
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    embed_features: Optional[int] = None
    layer_features: Optional[int] = None
    channel_base: int = 32768
    channel_max: int = 512
    channels: Optional[tuple] = None
    conv_clamp: Optional[float] = None
    architecture: str = "skip"
    use_noise: bool = True
    resample_filter: tuple = (1, 3, 3, 1)
    # generation settings
    truncation_psi: float = 1.0
    truncation_cutoff: Optional[int] = None
    noise_mode: str = "const"
    weights_convention: str = "nvidia"

    def __post_init__(self):
        super().__post_init__()
        r = self.img_resolution
        if r < 4 or r > MAX_RESOLUTION or r & (r - 1):
            raise GeneratorError(f"stylegan2: img_resolution must be a power of two in [4, {MAX_RESOLUTION}], got {r}")
        for name in ("z_dim", "w_dim", "img_channels", "channel_max", "embed_features", "layer_features"):
            check_range(self, name, 1)
        check_range(self, "c_dim", 0)
        check_range(self, "mapping_layers", 1, 64)
        check_range(self, "channel_base", 1, MAX_SIZE * MAX_RESOLUTION)
        if not self.mapping_lr_multiplier > 0 or self.conv_clamp is not None and not self.conv_clamp > 0:
            raise GeneratorError("stylegan2: mapping_lr_multiplier and conv_clamp (unless None) must be positive")
        f = self.resample_filter
        if not 1 <= len(f) <= 16 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in f) or not sum(f):
            raise GeneratorError("stylegan2: resample_filter must be 1 to 16 finite taps with a non-zero sum")
        if self.architecture not in _ARCHITECTURES:
            raise GeneratorError(
                f"stylegan2: architecture {self.architecture!r} is not supported; use one of {_ARCHITECTURES}"
            )
        if self.noise_mode not in _NOISE_MODES:
            raise GeneratorError(f"stylegan2: noise_mode must be one of {_NOISE_MODES}, got {self.noise_mode!r}")
        if self.weights_convention not in _CONVENTIONS:
            raise GeneratorError(
                f"stylegan2: weights_convention must be one of {_CONVENTIONS}, got {self.weights_convention!r}"
            )
        if self.channels is not None and len(self.channels) != self.num_blocks:
            raise GeneratorError(
                f"stylegan2: channels must list {self.num_blocks} widths (4…{r} px), got {len(self.channels)}"
            )
        widths = self.channels or ()
        if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and 1 <= c <= MAX_SIZE for c in widths):
            raise GeneratorError(f"stylegan2: channels must be integers in [1, {MAX_SIZE}]")
        if min(self.block_channels) < 1:
            raise GeneratorError(
                f"stylegan2: channel_base={self.channel_base} gives zero channels at {r} px; increase channel_base"
            )
        if self.truncation_cutoff is not None and not 0 <= self.truncation_cutoff <= self.num_ws:
            raise GeneratorError(f"stylegan2: truncation_cutoff must be in [0, {self.num_ws}] or None")

    # -- description ------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(round(math.log2(self.img_resolution))) - 1

    @property
    def block_resolutions(self) -> tuple[int, ...]:
        return tuple(4 * 2 ** k for k in range(self.num_blocks))

    @property
    def block_channels(self) -> tuple[int, ...]:
        if self.channels is not None:
            return tuple(int(c) for c in self.channels)
        return tuple(min(self.channel_base // r, self.channel_max) for r in self.block_resolutions)

    @property
    def num_ws(self) -> int:
        """Number of per-layer styles: 2·log2(R) − 2 (18 at 1024 px)."""
        return 2 * self.num_blocks

    @property
    def resolution(self) -> int:
        return self.img_resolution

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.z_dim,)

    @property
    def num_classes(self) -> int:
        return self.c_dim

    def feature_layers(self) -> tuple[FeatureLayer, ...]:
        layers = [FeatureLayer("b4.const", 4, self.block_channels[0], 0),
                  FeatureLayer("b4.conv1", 4, self.block_channels[0], 1)]
        for k, (r, c) in enumerate(zip(self.block_resolutions, self.block_channels)):
            if k == 0:
                continue
            layers.append(FeatureLayer(f"b{r}.conv0", r, c, 2 * k))
            layers.append(FeatureLayer(f"b{r}.conv1", r, c, 2 * k + 1))
        return tuple(layers)

    def auxiliary_outputs(self) -> tuple[str, ...]:
        """Capturable names that are not feature layers: ``b{R}.x``, ``b{R}.torgb``, ``b{R}.img``."""
        names = []
        for k, r in enumerate(self.block_resolutions):
            names.append(f"b{r}.x")
            if self.architecture == "skip" or k == self.num_blocks - 1:
                names.append(f"b{r}.torgb")
            names.append(f"b{r}.img")
        return tuple(names)

    def _capture_names(self, capture) -> frozenset:
        if capture is True:
            return frozenset(l.name for l in self.feature_layers())
        if not capture:
            return frozenset()
        if isinstance(capture, str):
            capture = (capture,)
        names = frozenset(capture)
        known = {l.name for l in self.feature_layers()} | set(self.auxiliary_outputs())
        missing = names - known
        if missing:
            raise GeneratorError(f"stylegan2: no layer(s) named {sorted(missing)}; available: {sorted(known)}")
        return names

    # -- modules ------------------------------------------------------------------------
    def network(self) -> StyleGAN2Network:
        """The Flax module (mapping + synthesis) for this config."""
        mapping_cfg = dict(z_dim=self.z_dim, c_dim=self.c_dim, w_dim=self.w_dim, num_layers=self.mapping_layers,
                           embed_features=self.embed_features, layer_features=self.layer_features,
                           lr_multiplier=self.mapping_lr_multiplier)
        synthesis_cfg = dict(w_dim=self.w_dim, img_resolution=self.img_resolution, img_channels=self.img_channels,
                             channels=self.block_channels, architecture=self.architecture,
                             conv_clamp=self.conv_clamp, use_noise=self.use_noise,
                             resample_filter=tuple(self.resample_filter))
        return StyleGAN2Network(mapping_cfg=mapping_cfg, synthesis_cfg=synthesis_cfg)

    def init_params(self, key):
        """Random parameters (NVIDIA's initialisation) with the converted checkpoints' tree."""
        return _init_fn(self)(key)

    # -- sampling ---------------------------------------------------------------------
    def class_vectors(self, class_labels, n: int):
        """Class labels → conditioning vectors ``c [N, c_dim]``.

        Args:
            class_labels: ``[N]`` ints (→ one-hot), or ``[N, c_dim]`` floats (used as given), or None.
            n: batch size.
        """
        if self.c_dim == 0:
            if class_labels is not None:
                raise GeneratorError("stylegan2: this generator is unconditional (c_dim=0); pass class_labels=None")
            return None
        if class_labels is None:
            raise GeneratorError(
                f"stylegan2: this generator is conditional ({self.c_dim} classes); pass class_labels "
                "([N] ints or [N, c_dim] vectors), e.g. gen.sample_class_labels(key, n)"
            )
        labels = jnp.asarray(class_labels)
        if labels.ndim == 1:
            if jnp.issubdtype(labels.dtype, jnp.floating):
                raise GeneratorError("stylegan2: 1-D class_labels must be integers (class indices)")
            return jax.nn.one_hot(labels, self.c_dim, dtype=jnp.float32)
        if labels.ndim == 2 and labels.shape == (n, self.c_dim):
            return labels.astype(jnp.float32)
        raise GeneratorError(
            f"stylegan2: class_labels must be [N] ints or [N, {self.c_dim}] vectors, got shape {labels.shape}"
        )

    def map_latents(self, params, latents, class_labels=None, truncation_psi=None, truncation_cutoff=None):
        """z (and class labels) → w+ ``[N, num_ws, w_dim]`` with truncation.

        ``ws = w_avg + ψ (w − w_avg)`` on layers ``< truncation_cutoff`` (all layers if None).

        Args:
            params: parameter tree.
            latents: ``[N, z_dim]`` float32.
            class_labels: see :meth:`class_vectors`.
            truncation_psi, truncation_cutoff: override the generator's settings.

        Returns:
            ``[N, num_ws, w_dim]`` float32.
        """
        latents = jnp.asarray(latents, jnp.float32)
        if latents.ndim != 2 or latents.shape[1] != self.z_dim:
            raise GeneratorError(f"stylegan2: latents must be [N, {self.z_dim}], got shape {latents.shape}")
        c = self.class_vectors(class_labels, latents.shape[0])
        w = _mapping_fn(self)(params, latents, c)
        ws = jnp.broadcast_to(w[:, None], (w.shape[0], self.num_ws, self.w_dim))
        psi = self.truncation_psi if truncation_psi is None else truncation_psi
        cutoff = self.truncation_cutoff if truncation_cutoff is None else truncation_cutoff
        return self.truncate(params, ws, psi, cutoff)

    def w_avg(self, params):
        """The tracked average w ``[w_dim]`` (NVIDIA ``mapping.w_avg``, rosinality ``latent_avg``)."""
        return jnp.asarray(params["params"]["mapping"]["w_avg"])

    def truncate(self, params, ws, psi: float, cutoff: Optional[int] = None):
        """``w_avg + psi·(ws − w_avg)`` on layers ``< cutoff`` (all if None). ws: ``[N, num_ws, w_dim]``."""
        if isinstance(psi, (int, float)) and psi == 1:
            return ws
        w_avg = self.w_avg(params)
        trunc = w_avg + psi * (ws - w_avg)
        if cutoff is None:
            return trunc
        return mix_styles(trunc, ws, cutoff)

    def mix_styles(self, ws_a, ws_b, cutoff):
        """Style mixing (layers ``< cutoff`` from ``ws_a``, the rest from ``ws_b``); see :func:`mix_styles`."""
        return mix_styles(ws_a, ws_b, cutoff)

    def synthesize_styles(self, params, styles, capture: Sequence[str] | bool = (), noise_key=None,
                          noise_mode: Optional[str] = None, edits: Optional[Mapping] = None):
        """Synthesis network: w+ → image and captured layers.

        Args:
            params: parameter tree.
            styles: ``[N, num_ws, w_dim]`` (or ``[N, w_dim]``, broadcast to every layer).
            capture: feature-layer / auxiliary names, or True for every feature layer.
            noise_key: PRNG key, required for ``noise_mode='random'``.
            noise_mode: overrides the generator's setting.
            edits: ``{layer name: (scale, shift)}``: the output ``x`` of that feature layer or
                ``b{R}.torgb`` becomes ``x · scale + shift`` (both broadcast against ``[N, h, w, C]``)
                before the network goes on; e.g. ``{"b4.conv1": (jnp.zeros(C), 0.0)}`` switches off
                the first layer (Labels4Free's background generator).

        Returns:
            ``(images [N, R, R, img_channels] float32 (not clamped), {name: [N, h, w, C]})``.
        """
        names = self._capture_names(capture)
        mode = self.noise_mode if noise_mode is None else noise_mode
        if mode not in _NOISE_MODES:
            raise GeneratorError(f"stylegan2: noise_mode must be one of {_NOISE_MODES}, got {mode!r}")
        if mode == "random" and noise_key is None:
            raise GeneratorError("stylegan2: noise_mode='random' needs noise_key (e.g. jax.random.key(0))")
        ws = jnp.asarray(styles, jnp.float32)
        if ws.ndim == 2:
            ws = jnp.broadcast_to(ws[:, None], (ws.shape[0], self.num_ws, ws.shape[1]))
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise GeneratorError(
                f"stylegan2: styles must be [N, {self.num_ws}, {self.w_dim}] (w+), got shape {tuple(ws.shape)}"
            )
        edits = None if not edits else dict(edits)
        if edits:
            editable = {l.name for l in self.feature_layers()} | {n for n in self.auxiliary_outputs()
                                                                  if n.endswith(".torgb")}
            if set(edits) - editable:
                raise GeneratorError(f"stylegan2: cannot edit {sorted(set(edits) - editable)}; editable layers: "
                                     f"{sorted(editable)}")
            edits = {k: (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) for k, (a, b) in edits.items()}
        return _synthesis_fn(self, names, mode)(params, ws, noise_key if mode == "random" else None, edits)
