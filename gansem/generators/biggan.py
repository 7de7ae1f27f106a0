"""BigGAN-deep generator, as ported by ``pytorch-pretrained-biggan`` 0.1.1 (Brock et al., 2019).

The published models ``biggan-deep-{128,256,512}`` (ImageNet, 1000 classes) and
any :class:`BigGANDeep` config with the same key scheme. Forward pass, NHWC::

    z [N, z_dim] (truncated normal × truncation), class label y
    cond  = concat(z, E·onehot(y))                              [N, 2·z_dim]
    gen_z = Dense(cond) reshaped NHWC                            [N, 4, 4, 16·ch]   ("gen_z")
    for each config layer i (up?, a, b):
        [SelfAttn before layer i == attention_layer_position]    ("attn")
        GenBlock(a·ch → b·ch, up?)                               ("block{i}")
    BN(weight, bias) → ReLU → Conv3×3(ch → ch)[..., :3] → tanh   image [N, R, R, 3]

GenBlock: ``CBN-ReLU-conv0 (1×1, a·ch → a·ch/4) → CBN-ReLU-[nearest ×2]-conv1 (3×3)
→ CBN-ReLU-conv2 (3×3) → CBN-ReLU-conv3 (1×1, → b·ch)``; skip = input, first half of
its channels if ``a ≠ b``, nearest ×2 if upsampling; output = sum.

Conditional BatchNorm (CBN): ``(x - mean) / sqrt(var + eps) · (1 + cond·S) + cond·O``.
The statistics are tables of ``n_stats = 51`` rows tabulated for truncations
0, 0.02, …, 1; with ``coef, i = modf(truncation / 0.02)`` the upstream code uses
row ``i`` if ``coef == 0`` and otherwise ``m[i]·coef + m[i+1]·(1 - coef)`` — the
weights are swapped relative to an ordinary linear interpolation. This port
replicates that (it matters: at truncation 0.355 the images move by ~0.7 if an
ordinary lerp is used). The truncation therefore is a generator setting
(:attr:`BigGANDeep.truncation`, in (0, 1]); it scales the sampled latents and
selects the statistics. The final BN is unconditional (stored weight and bias)
with the same truncation-indexed statistics.

Spectral normalisation is folded into the weights by the converter
(``W = W_orig / (u · W_mat v)`` with the stored u, v: eval-mode PyTorch
``spectral_norm``, no power iteration), so every layer here is a plain
convolution or dense layer. Note that upstream ``BigGAN.from_pretrained`` leaves
the module in training mode, where each forward pass first runs one power
iteration and mutates u, v; call ``.eval()`` on the PyTorch module to compare.

Self-attention (SAGAN): ``theta = 1×1(x)`` (C/8), ``phi = maxpool2(1×1(x))`` (C/8),
``g = maxpool2(1×1(x))`` (C/2), ``attn = softmax(theta · phiᵀ)`` over the pooled
positions, ``out = x + gamma · 1×1(attn · g)`` (all convs bias-free).

Feature layers and the KLiSH layer rule
---------------------------------------
:meth:`BigGANDeep.feature_layers` lists, in forward order, ``gen_z`` (index 0),
then every GenBlock output ``block{i}`` (``i`` = position in ``config.layers``) and
the attention output ``attn``. Feature index ``j`` is the output of PyTorch's
``generator.layers[j - 1]`` (the attention module occupies one slot of that
ModuleList), ``j = 0`` is the reshaped ``generator.gen_z`` output.

BigGAN is not in Tab. 2 of the KLiSH paper. Its rule (last layer of each
resolution, scan from high to low resolution, stop before the channel total
exceeds 1000) gives for the published models:

* deep-128: ``block6`` (32 px, 512 ch), ``block8`` (64 px, 256), ``block9`` (128 px, 128): 896 channels;
* deep-256: ``block8`` (64 px, 512), ``block10`` (128 px, 256), ``block11`` (256 px, 128): 896 channels;
* deep-512: ``block10`` (128 px, 256), ``block12`` (256 px, 128), ``block13`` (512 px, 128): 512 channels

(the next candidate, at half the lowest selected resolution, has 1024 channels
for 128/256 and 512 channels for 512, which would exceed the budget). The
attention output (64 px) is never selected because a GenBlock follows it at the
same resolution.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .base import MAX_SIZE, FeatureLayer, Generator, GeneratorError, check_range, register_family

__all__ = [
    "BigGANDeep",
    "BigGANDeepSynthesis",
    "BIGGAN_DEEP_CONFIGS",
    "biggan_deep",
    "bn_statistics_rows",
]

_HIGHEST = jax.lax.Precision.HIGHEST

_F, _T = False, True
_LAYERS_128 = ((_F, 16, 16), (_T, 16, 16), (_F, 16, 16), (_T, 16, 8), (_F, 8, 8), (_T, 8, 4),
               (_F, 4, 4), (_T, 4, 2), (_F, 2, 2), (_T, 2, 1))
_LAYERS_256 = ((_F, 16, 16), (_T, 16, 16), (_F, 16, 16), (_T, 16, 8), (_F, 8, 8), (_T, 8, 8),
               (_F, 8, 8), (_T, 8, 4), (_F, 4, 4), (_T, 4, 2), (_F, 2, 2), (_T, 2, 1))
_LAYERS_512 = _LAYERS_256 + ((_F, 1, 1), (_T, 1, 1))

#: Configs of the published ``biggan-deep-{128,256,512}`` models (``convert_tf_to_pytorch.py``).
BIGGAN_DEEP_CONFIGS = {
    res: dict(z_dim=128, n_classes=1000, channel_width=128, layers=layers,
              attention_layer_position=8, n_stats=51, eps=1e-4)
    for res, layers in ((128, _LAYERS_128), (256, _LAYERS_256), (512, _LAYERS_512))
}


def bn_statistics_rows(truncation: float, n_stats: int) -> tuple[int, float]:
    """Which rows of the BN statistics tables a truncation uses (upstream ``BigGANBatchNorm``).

    Returns:
        ``(i, coef)``: statistics ``m[i]`` if ``coef == 0`` else ``m[i]·coef + m[i+1]·(1 - coef)``
        (sic: swapped relative to an ordinary lerp).
    """
    coef, start = math.modf(truncation / (1.0 / (n_stats - 1)))
    return int(start), float(coef)


def _select_stats(table, truncation: float):
    """table: ``[n_stats, C]`` → ``[C]`` for this truncation (see :func:`bn_statistics_rows`)."""
    i, coef = bn_statistics_rows(truncation, table.shape[0])
    if coef == 0.0:
        return table[i]
    return table[i] * coef + table[i + 1] * (1.0 - coef)


def _upsample2(x):
    """Nearest-neighbour ×2 on ``[N, H, W, C]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _maxpool2(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _conv(features: int, k: int, name: str, bias: bool = True):
    pad = (k - 1) // 2
    return nn.Conv(features, (k, k), padding=((pad, pad), (pad, pad)), use_bias=bias,
                   precision=_HIGHEST, name=name)


class _BNStats(nn.Module):
    """Truncation-indexed BN statistics tables ``running_means``/``running_vars`` ``[n_stats, C]``."""

    n_stats: int
    truncation: float

    @nn.compact
    def __call__(self, c: int):
        means = self.param("running_means", nn.initializers.zeros, (self.n_stats, c))
        vars_ = self.param("running_vars", nn.initializers.ones, (self.n_stats, c))
        return _select_stats(means, self.truncation), _select_stats(vars_, self.truncation)


class ConditionalBatchNorm(nn.Module):
    """``(x - mean)/sqrt(var + eps) · (1 + cond·S) + cond·O`` with truncation-indexed mean/var."""

    n_stats: int
    truncation: float
    eps: float

    @nn.compact
    def __call__(self, x, cond):  # x: [N, H, W, C], cond: [N, D]
        c = x.shape[-1]
        mean, var = _BNStats(self.n_stats, self.truncation, name="stats")(c)
        scale = 1.0 + nn.Dense(c, use_bias=False, precision=_HIGHEST, name="scale")(cond)
        offset = nn.Dense(c, use_bias=False, precision=_HIGHEST, name="offset")(cond)
        return (x - mean) / jnp.sqrt(var + self.eps) * scale[:, None, None, :] + offset[:, None, None, :]


class GenBlock(nn.Module):
    """BigGAN-deep residual block (bottleneck 1×1 / 3×3 / 3×3 / 1×1, conditional BN)."""

    out_channels: int
    up_sample: bool
    n_stats: int
    truncation: float
    eps: float
    reduction: int = 4

    @nn.compact
    def __call__(self, x, cond):  # x: [N, H, W, Cin] → [N, H', W', Cout]
        cin = x.shape[-1]
        mid = cin // self.reduction
        bn = lambda i: ConditionalBatchNorm(self.n_stats, self.truncation, self.eps, name=f"bn_{i}")
        h = _conv(mid, 1, "conv_0")(nn.relu(bn(0)(x, cond)))
        h = nn.relu(bn(1)(h, cond))
        if self.up_sample:
            h = _upsample2(h)
        h = _conv(mid, 3, "conv_1")(h)
        h = _conv(mid, 3, "conv_2")(nn.relu(bn(2)(h, cond)))
        h = _conv(self.out_channels, 1, "conv_3")(nn.relu(bn(3)(h, cond)))
        skip = x
        if cin != self.out_channels:
            skip = skip[..., : cin // 2]
        if self.up_sample:
            skip = _upsample2(skip)
        return h + skip


class SelfAttention(nn.Module):
    """SAGAN self-attention with 2×2 max-pooled keys/values; ``x + gamma · o(attn · g)``."""

    @nn.compact
    def __call__(self, x):  # x: [N, H, W, C]
        n, h, w, c = x.shape
        theta = _conv(c // 8, 1, "theta", bias=False)(x).reshape(n, h * w, c // 8)
        phi = _maxpool2(_conv(c // 8, 1, "phi", bias=False)(x)).reshape(n, h * w // 4, c // 8)
        g = _maxpool2(_conv(c // 2, 1, "g", bias=False)(x)).reshape(n, h * w // 4, c // 2)
        attn = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", theta, phi, precision=_HIGHEST), axis=-1)
        attn_g = jnp.einsum("nqk,nkc->nqc", attn, g, precision=_HIGHEST).reshape(n, h, w, c // 2)
        gamma = self.param("gamma", nn.initializers.zeros, (1,))
        return x + gamma * _conv(c, 1, "o_conv", bias=False)(attn_g)


class BigGANDeepSynthesis(nn.Module):
    """Flax module: ``cond [N, 2·z_dim]`` → ``(image [N, R, R, 3] in (-1, 1), {name: [N, h, w, C]})``.

    ``capture`` may name any feature layer of :class:`BigGANDeep` plus ``"bn"`` (final BN
    output, before the ReLU) and ``"conv_to_rgb"`` (all ``channel_width`` channels before
    ``[..., :3]`` and tanh).
    """

    channel_width: int
    layers: tuple
    attention_layer_position: int
    n_stats: int
    eps: float
    truncation: float
    capture: frozenset = frozenset()

    @nn.compact
    def __call__(self, cond):
        ch = self.channel_width
        feats = {}

        def keep(name, value):
            if name in self.capture:
                feats[name] = value
            return value

        n = cond.shape[0]
        x = nn.Dense(4 * 4 * 16 * ch, precision=_HIGHEST, name="gen_z")(cond)
        x = keep("gen_z", x.reshape(n, 4, 4, 16 * ch))  # upstream reshapes NHWC (TF layout)
        for i, (up, _, cout) in enumerate(self.layers):
            if i == self.attention_layer_position:
                x = keep("attn", SelfAttention(name="attn")(x))
            x = GenBlock(cout * ch, bool(up), self.n_stats, self.truncation, self.eps,
                         name=f"block{i}")(x, cond)
            keep(f"block{i}", x)
        mean, var = _BNStats(self.n_stats, self.truncation, name="bn_stats")(ch)
        weight = self.param("bn_weight", nn.initializers.ones, (ch,))
        bias = self.param("bn_bias", nn.initializers.zeros, (ch,))
        x = keep("bn", (x - mean) / jnp.sqrt(var + self.eps) * weight + bias)
        x = keep("conv_to_rgb", _conv(ch, 3, "conv_to_rgb")(nn.relu(x)))
        return jnp.tanh(x[..., :3]), feats


@register_family
@dataclasses.dataclass(frozen=True)
class BigGANDeep(Generator):
    """BigGAN-deep (class-conditional). Defaults: the published 128×128 ImageNet model.

    Attributes:
        z_dim: latent size (the class embedding has the same size).
        n_classes: number of classes (1000 for ImageNet).
        channel_width: base channel count ``ch``.
        layers: ``((up_sample, in_mult, out_mult), ...)``, channels are multiples of ``ch``.
        attention_layer_position: self-attention is applied before this layer.
        n_stats: rows of the truncation-indexed BN statistics tables.
        eps: BatchNorm epsilon.
        truncation: in (0, 1]; scales sampled latents and selects the BN statistics.
    """

    family: ClassVar[str] = "biggan"
    z_dim: int = 128
    n_classes: int = 1000
    channel_width: int = 128
    layers: tuple = _LAYERS_128
    attention_layer_position: int = 8
    n_stats: int = 51
    eps: float = 1e-4
    truncation: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("z_dim", "n_classes", "channel_width"):
            check_range(self, name, 1)
        check_range(self, "n_stats", 2)
        if not self.eps > 0:
            raise GeneratorError(f"biggan: eps must be positive; got {self.eps}")
        if not 0.0 < float(self.truncation) <= 1.0:
            raise GeneratorError(
                f"biggan: truncation must be in (0, 1] (BN statistics are tabulated on [0, 1]); "
                f"got {self.truncation}"
            )
        if not 1 <= len(self.layers) <= 64:
            raise GeneratorError(f"biggan: config must have 1 to 64 layers; got {len(self.layers)}")
        prev = 16
        for i, layer in enumerate(self.layers):
            if not (isinstance(layer, tuple) and len(layer) == 3 and isinstance(layer[0], (bool, int))
                    and all(isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= MAX_SIZE for m in layer[1:])):
                raise GeneratorError(f"biggan: layers[{i}] must be (up_sample, in_mult, out_mult) with positive "
                                     f"integer multipliers; got {layer!r:.60}")
            up, cin, cout = layer
            if cin != prev:
                raise GeneratorError(
                    f"biggan: layers[{i}] takes {cin}·ch channels but the previous stage gives {prev}·ch "
                    "(the first layer must take 16·ch, the gen_z output)"
                )
            if 2 * cout not in (2 * cin, cin) or (cin * self.channel_width) // 4 < 1:
                raise GeneratorError(
                    f"biggan: layers[{i}] = {layer}: out must equal in or in/2, and in·ch must be >= 4"
                )
            prev = cout
        if prev != 1:
            raise GeneratorError(
                f"biggan: the last layer must output 1·ch channels (the final BN and conv_to_rgb have ch); "
                f"got {prev}·ch"
            )
        if not 0 <= self.attention_layer_position < len(self.layers):
            raise GeneratorError(
                f"biggan: attention_layer_position {self.attention_layer_position} is not a layer index "
                f"(0..{len(self.layers) - 1})"
            )
        if (self.layers[self.attention_layer_position][1] * self.channel_width) % 8:
            raise GeneratorError("biggan: attention input channels must be divisible by 8")

    # -- description -------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return 4 * 2 ** sum(1 for up, _, _ in self.layers if up)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.z_dim,)

    @property
    def num_classes(self) -> int:
        return self.n_classes

    @property
    def cond_dim(self) -> int:
        """Size of the conditioning vector ``cat(z, class embedding)``."""
        return 2 * self.z_dim

    def feature_layers(self) -> tuple[FeatureLayer, ...]:
        ch = self.channel_width
        out = [FeatureLayer("gen_z", 4, 16 * ch, 0)]
        res = 4
        for i, (up, cin, cout) in enumerate(self.layers):
            if i == self.attention_layer_position:
                out.append(FeatureLayer("attn", res, cin * ch, len(out)))
            res = res * 2 if up else res
            out.append(FeatureLayer(f"block{i}", res, cout * ch, len(out)))
        return tuple(out)

    # -- parameters -------------------------------------------------------------
    def synthesis_module(self, capture=frozenset()) -> BigGANDeepSynthesis:
        """The Flax synthesis module (``capture`` also accepts ``"bn"`` and ``"conv_to_rgb"``)."""
        return BigGANDeepSynthesis(
            channel_width=self.channel_width, layers=tuple(tuple(l) for l in self.layers),
            attention_layer_position=self.attention_layer_position, n_stats=self.n_stats,
            eps=float(self.eps), truncation=float(self.truncation), capture=frozenset(capture),
        )

    def init_params(self, key):
        """Random parameters: ``{"params": {"class_embedding": {"kernel": [n_classes, z_dim]}, "gen_z", "block{i}", ...}}``."""
        k_syn, k_emb = jax.random.split(key)
        syn = self.synthesis_module().init(k_syn, jnp.zeros((1, self.cond_dim), jnp.float32))["params"]
        emb = jax.random.normal(k_emb, (self.n_classes, self.z_dim), jnp.float32)
        return {"params": {"class_embedding": {"kernel": emb}, **syn}}

    # -- sampling ---------------------------------------------------------------
    def sample_latents(self, key, n: int):
        """``truncation · TruncatedNormal(-2, 2)``, ``[n, z_dim]`` float32 (upstream ``truncated_noise_sample``)."""
        z = jax.random.truncated_normal(key, -2.0, 2.0, (n, self.z_dim), jnp.float32)
        return self.truncation * z

    def map_latents(self, params, latents, class_labels=None):
        """Conditioning vectors ``cond = cat(z, embedding(y))``.

        Args:
            params: parameter pytree.
            latents: ``[N, z_dim]`` float32.
            class_labels: ``[N]`` int class indices, or ``[N, n_classes]`` float class vectors
                (one-hot or mixtures, as upstream accepts). Required.

        Returns:
            ``[N, 2·z_dim]`` float32.
        """
        if class_labels is None:
            raise GeneratorError(
                f"biggan is class-conditional: pass class_labels ([N] ints in 0..{self.n_classes - 1} or "
                f"[N, {self.n_classes}] class vectors), e.g. gen.sample_class_labels(key, n)"
            )
        z = jnp.asarray(latents, jnp.float32)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise GeneratorError(f"biggan: latents must be [N, {self.z_dim}]; got shape {z.shape}")
        table = params["params"]["class_embedding"]["kernel"]  # [n_classes, z_dim]
        labels = jnp.asarray(class_labels)
        if labels.ndim == 1 and jnp.issubdtype(labels.dtype, jnp.integer):
            embed = jnp.take(table, labels, axis=0)
        elif labels.ndim == 2 and labels.shape[1] == self.n_classes:
            embed = jnp.matmul(labels.astype(jnp.float32), table, precision=_HIGHEST)
        else:
            raise GeneratorError(
                f"biggan: class_labels must be [N] ints or [N, {self.n_classes}] floats; got "
                f"shape {labels.shape} dtype {labels.dtype}"
            )
        if embed.shape[0] != z.shape[0]:
            raise GeneratorError(f"biggan: {z.shape[0]} latents but {embed.shape[0]} class labels")
        return jnp.concatenate([z, embed], axis=1)

    def synthesize_styles(self, params, styles, capture=(), noise_key: Optional[jax.Array] = None):
        """``cond [N, 2·z_dim]`` → ``(images [N, R, R, 3], {layer: [N, h, w, C]})``; ``noise_key`` unused."""
        names = self._capture_names(capture)
        syn = {k: v for k, v in params["params"].items() if k != "class_embedding"}
        return self.synthesis_module(names).apply({"params": syn}, styles)


def biggan_deep(resolution: int = 128, truncation: float = 1.0) -> BigGANDeep:
    """The published BigGAN-deep config at 128, 256 or 512 px."""
    if resolution not in BIGGAN_DEEP_CONFIGS:
        raise GeneratorError(f"biggan: published resolutions are {sorted(BIGGAN_DEEP_CONFIGS)}; got {resolution}")
    return BigGANDeep(truncation=truncation, **BIGGAN_DEEP_CONFIGS[resolution])
