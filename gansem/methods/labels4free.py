"""Labels4Free (Abdal, Zhu, Mitra, Wonka, ICCV 2021; seed 001): fg/bg masks from a frozen StyleGAN2.

The pieces of the paper, each a pure function or a Flax module; the training run (Orbax,
resumption, report) is :mod:`gansem.methods.labels4free_run`.

* **Alpha network** ``A`` (Sec. 3.1, Fig. 3; :class:`AlphaNetwork`): the frozen generator's
  feature maps from a start resolution up (``b{r}.conv0``, ``b{r}.conv1``), each compressed by a
  1×1 convolution; from the lowest resolution up, the running map is bilinearly up-sampled ×2,
  concatenated with the next resolution's compressions and mixed by a 1×1 convolution (leaky
  ReLU after every layer); a last 1×1 convolution and a sigmoid give ``M = A(z) [N, R, R]`` in
  ``(0, 1)``. Only 1×1 convolutions: neighbouring pixels do not interact (Sec. 3.1).
* **Layer analysis** (Sec. 3.1, "third"): :func:`trgb_noise_ssim` replaces one resolution's tRGB
  output by N(0, I) noise and measures the SSIM of the result with the original image;
  :func:`select_alpha_start` takes the first resolution whose SSIM is ``ratio`` (1.25) times
  lower than the previous one's (FFHQ: 32 px, the 4th tRGB).
* **Background generator** ``G_bg`` (Sec. 3.2): the pretrained generator with the channels of
  its first layer (``b4.conv1``: the 4×4 layer fed by the constant, the first one that reads
  ``w``) switched off, through the port's layer edits (:func:`background_edits`);
  :func:`layer_gradient_scores` is the paper's analysis that finds the layer: the gradient of
  ``‖G(w, n) − x‖²`` (``x``: up-sampled background crops, :func:`corner_backgrounds`) with
  respect to every layer's tensor, summed per layer over the channels' gradient norms.
* **Objective** (Sec. 3.3, Eq. 1): ``I = M ⊙ G(w) + (1 − M) ⊙ G_bg(w')`` (:func:`composite`);
  ``A`` minimises ``adv_weight · softplus(−D(I)) + λ1 B(M) + λ2 C(M) + λ3 E(M)`` with
  ``B(M) = min(M, 1 − M)`` (:func:`binarization_loss`), ``C(M) = ReLU(φ1 − mean M)``
  (:func:`min_foreground_loss`), ``E(M) = ReLU(φ2 − mean(1 − M))``
  (:func:`min_background_loss`); the discriminator minimises ``d_loss_weight ·
  (softplus(D(I)) + softplus(−D(G(w''))))`` (non-saturating loss, weight 0.1, Sec. 4.6); "real"
  images are samples of the same frozen generator. ``D`` is a StyleGAN2 discriminator trained
  from scratch (:mod:`gansem.methods.stylegan2_discriminator`).

Reading of the paper where its text is ambiguous (all settable): the extracted formulas of
C and E read ``ReLU(φ · mean)``, which would push the mask to zero, against their stated purpose
("does not converge to only using the background network"); we use the hinge ``ReLU(φ − mean)``
per image. "The weight of the non-saturating discriminator loss to 0.1" is applied to the
discriminator's loss (``d_loss_weight``); ``adv_weight`` (1) scales the alpha network's
adversarial term. Truncation ψ (Sec. 3.3 (b)) applies to ``G`` and to the real samples,
not to ``G_bg`` (whose backgrounds the paper says stay closer to the untruncated distribution).
Adam with StyleGAN2's betas (0, 0.99); no R1 or path regularisation (the paper mentions none);
noise inputs follow the generator's ``noise_mode``.

Families: only StyleGAN2 (NVIDIA and rosinality weights). StyleGAN (v1), PGGAN, DCGAN and
BigGAN are refused by :func:`check_generator`: the method needs the tRGB skip outputs and the
style-modulated first layer of StyleGAN2; the v1 port has neither tRGB outputs per resolution
nor the layer edits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..generators.base import GeneratorError
from ..generators.stylegan2 import StyleGAN2

__all__ = [
    "Labels4FreeConfig",
    "CONFIGS",
    "config_by_name",
    "check_generator",
    "alpha_layers",
    "AlphaNetwork",
    "composite",
    "binarization_loss",
    "min_foreground_loss",
    "min_background_loss",
    "nonsaturating_g_loss",
    "nonsaturating_d_loss",
    "background_edits",
    "ssim",
    "trgb_noise_ssim",
    "select_alpha_start",
    "corner_backgrounds",
    "layer_gradient_scores",
    "strongest_layer",
]


@dataclasses.dataclass(frozen=True)
class Labels4FreeConfig:
    """Hyper-parameters of a Labels4Free run (stored in the run's ``model.json``).

    Attributes:
        alpha_start: lowest feature resolution the alpha network reads (paper: FFHQ 32, i.e. the
            4th tRGB layer; LSUN-Horse / Cat 8 (2nd); LSUN-Car 16 (3rd)); ``None``: chosen by
            :func:`trgb_noise_ssim` + :func:`select_alpha_start` at the start of the run.
        alpha_channels: width of every 1×1 compression and mixing layer (the paper gives none).
        bg_layer: the layer switched off in ``G_bg`` (paper: the first layer, ``b4.conv1``).
        bg_channels: channels of ``bg_layer`` to switch off; ``None``: all (the paper's "safe strategy").
        lambda_b, lambda_c, lambda_e: weights λ1, λ2 (and E's) of the regularisers B, C, E.
        phi_c, phi_e: φ1 (minimum mean mask of C) and φ2 (minimum mean background of E).
        adv_weight: weight of the alpha network's non-saturating adversarial term.
        d_loss_weight: weight of the discriminator's non-saturating loss (paper: 0.1).
        truncation: ψ of ``G`` and of the real samples (1: none).
        lr: Adam learning rate of both networks (paper: 0.0002); beta1, beta2: Adam betas.
        batch_size: global batch (paper: 8 over 4 GPUs); steps: training iterations.
        mask_threshold: a pixel is foreground where ``M > mask_threshold`` (paper: 0.5; Tab. 2: 0.9).
        d_channel_base, d_channel_max, mbstd_group: discriminator widths and minibatch-std group.
        seed: initialisation and every latent of the run.
    """

    alpha_start: Optional[int] = 32
    alpha_channels: int = 32
    bg_layer: str = "b4.conv1"
    bg_channels: Optional[tuple] = None
    lambda_b: float = 1.2
    lambda_c: float = 0.0
    lambda_e: float = 0.0
    phi_c: float = 0.25
    phi_e: float = 0.25
    adv_weight: float = 1.0
    d_loss_weight: float = 0.1
    truncation: float = 1.0
    lr: float = 0.0002
    beta1: float = 0.0
    beta2: float = 0.99
    batch_size: int = 8
    steps: int = 1000
    mask_threshold: float = 0.5
    d_channel_base: int = 32768
    d_channel_max: int = 512
    mbstd_group: int = 4
    seed: int = 0

    def check(self, gen, num_devices: int = 1) -> None:
        """Raise ``ValueError`` for settings that cannot work with ``gen`` on ``num_devices`` devices."""
        check_generator(gen)
        for name in ("alpha_channels", "batch_size", "steps", "d_channel_base", "d_channel_max", "mbstd_group"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"labels4free: {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % num_devices:
            raise ValueError(f"labels4free: batch size {self.batch_size} cannot be split evenly over {num_devices} "
                             f"devices; use a multiple of {num_devices}")
        g = min(self.mbstd_group, self.batch_size)
        if self.batch_size % g:
            raise ValueError(f"labels4free: batch size {self.batch_size} must be a multiple of the minibatch-std "
                             f"group {g}")
        for name in ("lambda_b", "lambda_c", "lambda_e", "adv_weight", "d_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"labels4free: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("phi_c", "phi_e", "mask_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"labels4free: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.truncation <= 1:
            raise ValueError(f"labels4free: truncation ψ must be in [0, 1], got {self.truncation}")
        if not self.lr > 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"labels4free: need lr > 0 and Adam betas in [0, 1), got {self.lr}, "
                             f"{self.beta1}, {self.beta2}")
        if self.alpha_start is not None and self.alpha_start not in gen.block_resolutions:
            raise ValueError(f"labels4free: alpha_start must be one of the generator's resolutions "
                             f"{gen.block_resolutions}, got {self.alpha_start}")
        layers = {l.name: l for l in gen.feature_layers()}
        if self.bg_layer not in layers:
            raise ValueError(f"labels4free: bg_layer {self.bg_layer!r} is not a feature layer of the generator; "
                             f"choose one of {sorted(layers)}")
        if self.bg_channels is not None:
            c = layers[self.bg_layer].channels
            if not self.bg_channels or any(not 0 <= int(i) < c for i in self.bg_channels):
                raise ValueError(f"labels4free: bg_channels must be a non-empty list of channels in [0, {c}) "
                                 f"of {self.bg_layer}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"labels4free: seed must be in [0, 2**32), got {self.seed}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bg_channels"] = None if self.bg_channels is None else [int(i) for i in self.bg_channels]
        return d


#: The paper's per-dataset settings (Sec. 3.1 layer choice, Sec. 4.6 training details) and a CPU demo.
#: FFHQ: 1k iterations, λ1 = 1.2, no truncation; LSUN-Cat: 900, λ1 = λ2 = 3, ψ = 0.5; LSUN-Horse: 500,
#: λ1 = λ2 = 3, ψ = 1; LSUN-Car: 250, λ1 = λ2 = 20, ψ = 0.3; φ = 0.25 on LSUN; lr 0.0002, batch 8;
#: masks at threshold 0.9 on LSUN (Tab. 2).
CONFIGS: dict[str, Labels4FreeConfig] = {
    "ffhq": Labels4FreeConfig(alpha_start=32, lambda_b=1.2, lambda_c=0.0, truncation=1.0, steps=1000),
    "lsun-cat": Labels4FreeConfig(alpha_start=8, lambda_b=3.0, lambda_c=3.0, phi_c=0.25, truncation=0.5,
                                  steps=900, mask_threshold=0.9),
    "lsun-horse": Labels4FreeConfig(alpha_start=8, lambda_b=3.0, lambda_c=3.0, phi_c=0.25, truncation=1.0,
                                    steps=500, mask_threshold=0.9),
    "lsun-car": Labels4FreeConfig(alpha_start=16, lambda_b=20.0, lambda_c=20.0, phi_c=0.25, truncation=0.3,
                                  steps=250, mask_threshold=0.9),
    # mechanics only, for the random-weight 32 px fixture generators on a CPU
    "cpu-demo": Labels4FreeConfig(alpha_start=None, alpha_channels=16, lambda_b=1.2, lambda_c=1.0, phi_c=0.25,
                                  steps=60, d_channel_base=512, d_channel_max=32),
}


def config_by_name(name: str, **overrides) -> Labels4FreeConfig:
    """``CONFIGS[name]`` with some fields replaced (``None`` values are ignored)."""
    if name not in CONFIGS:
        raise ValueError(f"labels4free: unknown config {name!r}; choose one of {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


def check_generator(gen) -> None:
    """Raise ``GeneratorError`` unless ``gen`` is an unconditional StyleGAN2 with the skip architecture."""
    if not isinstance(gen, StyleGAN2):
        raise GeneratorError(
            f"labels4free needs a StyleGAN2 generator (tRGB outputs at every resolution and a style-modulated first "
            f"layer to switch off); got the {getattr(gen, 'family', type(gen).__name__)} family. StyleGAN (v1), "
            "PGGAN, DCGAN and BigGAN are not supported; convert a StyleGAN2 checkpoint "
            "(python -m weights_port convert ffhq.pkl checkpoints/ffhq)")
    if gen.architecture != "skip":
        raise GeneratorError("labels4free: the tRGB analysis needs the StyleGAN2 'skip' architecture (config F); "
                             f"this generator is {gen.architecture!r}")
    if gen.c_dim:
        raise GeneratorError("labels4free: this StyleGAN2 is class-conditional; the method (and this port of it) "
                             "is for unconditional generators")


def alpha_layers(gen: StyleGAN2, start: int) -> tuple[str, ...]:
    """The feature layers the alpha network reads: every conv layer at resolution ``>= start`` (forward order)."""
    return tuple(l.name for l in gen.feature_layers() if l.resolution >= start and not l.name.endswith(".const"))


# -- the alpha network --------------------------------------------------------------------------


class AlphaNetwork(nn.Module):
    """Features of the frozen generator → soft mask ``M [N, R, R]`` in (0, 1) (Fig. 3; module docstring).

    Attributes:
        channels: width of the 1×1 compressions and mixing layers.
    """

    channels: int = 32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]):
        """Args: features: ``[N, r, r, C_l]`` maps in non-decreasing resolution order. Returns ``[N, R, R]``."""
        by_res: dict[int, list] = {}
        for i, f in enumerate(features):
            c = nn.leaky_relu(nn.Dense(self.channels, name=f"compress{i}")(f), 0.2)   # 1×1 conv: [N, r, r, ch]
            by_res.setdefault(f.shape[1], []).append(c)
        h = None
        for k, r in enumerate(sorted(by_res)):
            parts = by_res[r]
            if h is not None:
                n, hr, _, ch = h.shape
                parts = [jax.image.resize(h, (n, r, r, ch), "bilinear")] + parts   # upsampling block
            h = nn.leaky_relu(nn.Dense(self.channels, name=f"mix{k}")(jnp.concatenate(parts, -1)), 0.2)
        return jax.nn.sigmoid(nn.Dense(1, name="out")(h)[..., 0])


# -- composition and losses ---------------------------------------------------------------------


def composite(mask, fg, bg):
    """Eq. 1: ``M ⊙ fg + (1 − M) ⊙ bg``. mask ``[N, R, R]``, fg and bg ``[N, R, R, 3]`` → ``[N, R, R, 3]``."""
    m = mask[..., None]
    return m * fg + (1.0 - m) * bg


def binarization_loss(mask):
    """B(M) = min(M, 1 − M), averaged over pixels and images (Sec. 3.3 (c)). mask ``[N, R, R]`` → ``[]``."""
    return jnp.mean(jnp.minimum(mask, 1.0 - mask))


def min_foreground_loss(mask, phi: float):
    """C(M) = ReLU(φ1 − mean_i M_i) per image, averaged over images (Sec. 3.3 (c)). ``[N, R, R]`` → ``[]``."""
    return jnp.mean(jax.nn.relu(phi - jnp.mean(mask, axis=(1, 2))))


def min_background_loss(mask, phi: float):
    """E(M) = ReLU(φ2 − mean_i (1 − M_i)) per image, averaged over images. ``[N, R, R]`` → ``[]``."""
    return jnp.mean(jax.nn.relu(phi - jnp.mean(1.0 - mask, axis=(1, 2))))


def nonsaturating_g_loss(fake_logits):
    """``mean softplus(−D(I))``: the non-saturating loss of the side that makes images. ``[N]`` → ``[]``."""
    return jnp.mean(jax.nn.softplus(-fake_logits))


def nonsaturating_d_loss(real_logits, fake_logits):
    """``mean softplus(D(I)) + mean softplus(−D(real))``: the discriminator's loss. ``[N], [N]`` → ``[]``."""
    return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))


# -- the background generator --------------------------------------------------------------------


def background_edits(gen: StyleGAN2, layer: str = "b4.conv1", channels: Optional[Sequence[int]] = None) -> dict:
    """Layer edits that turn ``gen`` into ``G_bg`` (Sec. 3.2): ``channels`` of ``layer`` set to 0 (None: all).

    Returns:
        ``{layer: (scale [C], 0.0)}`` for ``gen.synthesize_styles(..., edits=...)``.
    """
    layers = {l.name: l for l in gen.feature_layers()}
    if layer not in layers:
        raise GeneratorError(f"labels4free: {layer!r} is not a feature layer; choose one of {sorted(layers)}")
    c = layers[layer].channels
    scale = np.zeros(c, np.float32) if channels is None else np.ones(c, np.float32)
    if channels is not None:
        scale[np.asarray(channels, np.int64)] = 0.0
    return {layer: (jnp.asarray(scale), jnp.zeros((), jnp.float32))}


# -- analyses (Sec. 3.1 and 3.2) -----------------------------------------------------------------


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def ssim(a, b, data_range: float = 1.0, window: int = 11, sigma: float = 1.5):
    """Mean structural similarity (Wang et al. 2004; Gaussian window 11, σ 1.5, K1 0.01, K2 0.03) per image.

    The window shrinks to the image side for small images; statistics are taken over the valid
    positions only (as ``skimage.metrics.structural_similarity(..., gaussian_weights=True)``).

    Args:
        a, b: ``[N, H, W, C]`` images with values spanning ``data_range``.

    Returns:
        ``[N]`` SSIM averaged over pixels and channels.
    """
    size = min(window, a.shape[1], a.shape[2])
    g = jnp.asarray(_gaussian_window(size, sigma))
    k = jnp.outer(g, g)[:, :, None, None]

    def blur(x):  # [N, H, W, C] -> valid Gaussian filtering per channel
        n, h, w, c = x.shape
        y = x.transpose(0, 3, 1, 2).reshape(n * c, h, w, 1)
        y = jax.lax.conv_general_dilated(y, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        return y.reshape(n, c, y.shape[1], y.shape[2]).transpose(0, 2, 3, 1)

    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def trgb_noise_ssim(gen: StyleGAN2, params, ws, key) -> dict[int, float]:
    """Sec. 3.1: per resolution r, the mean SSIM between ``G(w)`` and ``G(w)`` with ``b{r}.torgb`` replaced by N(0, I).

    Args:
        ws: ``[N, num_ws, w_dim]`` styles; key: PRNG key of the noise.

    Returns:
        ``{r: mean SSIM over the N images}`` (images mapped from [-1, 1] to [0, 1], clipped).
    """
    check_generator(gen)
    unit = lambda x: jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)  # noqa: E731

    @jax.jit
    def run(params, ws, key):  # one program for every resolution: [num_blocks] mean SSIMs
        base, _ = gen.synthesize_styles(params, ws)
        out = []
        for i, r in enumerate(gen.block_resolutions):
            noise = jax.random.normal(jax.random.fold_in(key, i), (ws.shape[0], r, r, gen.img_channels))
            img, _ = gen.synthesize_styles(params, ws, edits={f"b{r}.torgb": (jnp.zeros(()), noise)})
            out.append(jnp.mean(ssim(unit(img), unit(base))))
        return jnp.stack(out)

    values = np.asarray(run(params, ws, key))
    return {int(r): float(v) for r, v in zip(gen.block_resolutions, values)}


def select_alpha_start(ssim_by_resolution: Mapping[int, float], ratio: float = 1.25) -> int:
    """The first resolution whose tRGB-noise SSIM is at least ``ratio`` times lower than the previous one's.

    Layers whose tRGB can be replaced by noise with a high SSIM contribute little and are discarded
    (Sec. 3.1: for FFHQ the 3rd tRGB's SSIM is about 25 % above the 4th's, so the 4th (32 px) and
    every later layer are kept). Without such a drop, the lowest resolution (everything kept).
    """
    res = sorted(int(r) for r in ssim_by_resolution)
    for prev, r in zip(res, res[1:]):
        if ssim_by_resolution[prev] >= ratio * ssim_by_resolution[r]:
            return r
    return res[0]


def corner_backgrounds(images, crop: int):
    """Generic background targets: each image's top-left ``crop × crop`` corner up-sampled to the full size.

    Sec. 3.2 collects in-domain backgrounds by cropping samples; a corner of an aligned face image
    is background. images ``[N, R, R, C]`` → ``[N, R, R, C]`` (bilinear).
    """
    images = jnp.asarray(images, jnp.float32)
    n, r, _, c = images.shape
    if not 1 <= crop <= r:
        raise ValueError(f"labels4free: crop must be in [1, {r}], got {crop}")
    return jax.image.resize(images[:, :crop, :crop], (n, r, r, c), "bilinear")


def layer_gradient_scores(gen: StyleGAN2, params, ws, targets, layers: Optional[Sequence[str]] = None
                          ) -> dict[str, tuple[float, np.ndarray]]:
    """Sec. 3.2: which layer's tensor moves the image most towards a background.

    For the objective ``L = Σ ‖G(w, n) − x‖²`` (x: ``targets``), the gradient ``g_l = ∂L/∂T_l``
    with respect to each layer's output tensor ``T_l [N, h, w, C]`` (a zero shift edit); the
    channel score is ``‖g_l[..., c]‖₂`` over (N, h, w) and the layer score their sum over channels.

    Args:
        ws: ``[N, num_ws, w_dim]``; targets: ``[N, R, R, 3]`` in the generator's range.
        layers: feature layers to score (default: every conv layer).

    Returns:
        ``{layer: (layer score, channel scores [C] float32)}``.
    """
    check_generator(gen)
    names = tuple(layers) if layers is not None else tuple(
        l.name for l in gen.feature_layers() if not l.name.endswith(".const"))
    info = {l.name: l for l in gen.feature_layers()}
    n = ws.shape[0]
    zeros = {k: jnp.zeros((n, info[k].resolution, info[k].resolution, info[k].channels), jnp.float32)
             for k in names}

    def objective(shifts):
        img, _ = gen.synthesize_styles(params, ws, edits={k: (jnp.ones(()), v) for k, v in shifts.items()})
        return jnp.sum((img - targets) ** 2)

    grads = jax.jit(jax.grad(objective))(zeros)
    out = {}
    for k in names:
        ch = np.asarray(jnp.sqrt(jnp.sum(grads[k] ** 2, axis=(0, 1, 2))))
        out[k] = (float(ch.sum()), ch)
    return out


def strongest_layer(scores: Mapping[str, tuple[float, Any]]) -> str:
    """The layer with the largest score of :func:`layer_gradient_scores` (the paper finds ``b4.conv1``)."""
    return max(scores, key=lambda k: scores[k][0])


def describe_alpha(gen: StyleGAN2, start: int, channels: int) -> dict:
    """What the alpha network reads (JSON-able): start resolution, layers, input channels, width."""
    layers = alpha_layers(gen, start)
    info = {l.name: l for l in gen.feature_layers()}
    return {"start_resolution": int(start), "layers": list(layers),
            "input_channels": int(sum(info[k].channels for k in layers)), "channels": int(channels),
            "pixels_interact": False, "log2_upsamplings": int(math.log2(gen.resolution // start))}
