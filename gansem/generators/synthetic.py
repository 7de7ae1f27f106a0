"""A synthetic "generator" whose true pixel partition is known: the KLiSH toy (Fig. 2) as images.

KLiSH's premise (Sec. 1, Fig. 2) is that GAN features are *linearly separable
but not centred*: each semantic class is separable from the others by a
hyperplane, yet its pixels do not gather around a centroid, so K-means (and
AHC) cut classes apart. :class:`SyntheticBands` builds images and one feature
map with exactly that structure, as a deterministic function of the latents, so
every part of gansem (``launch/klish.py``, the evaluation, the separability
experiment) can be checked against the truth.

Geometry of one image (latent ``z = (z0, z1, z2, z3)``; image coordinates
``(u, v)`` in ``[-1, 1]``):

* **Classes are stripes.** The image is cut into ``num_bands`` parallel
  stripes of direction ``θ = z0·π/2`` and offset ``0.3·tanh(z1)``; the stripe of
  a pixel is its true class ``m``.
* **Features are long thin tubes.** The raw feature of a pixel is
  ``r = [t, p_m + j, e]`` (``channels`` dims):

  - ``t ∈ [0, length]``: the position along the stripe (plus a per-image shift
    from ``z2``) -- the long, class-independent direction that dominates the
    variance, so K-means at K = ``num_bands`` cuts across classes;
  - ``p_m``: vertex ``m`` of a regular polygon with neighbouring vertices
    ``separation`` apart (the tube's axis), ``j``: a smooth in-image wobble of
    norm at most ``radius`` (phase from ``z3``). Every vertex of a convex polygon
    is separable from the others by a line, so with ``radius`` below half the
    margin **each class is linearly separable from all the others** (one-vs-rest,
    Definition 1) -- but its centroid is the tube's midpoint, far from most of
    its pixels;
  - ``e``: ``channels - 3`` smooth low-amplitude (``noise``) nuisance dims.

  The feature map is ``embed · r + offset`` with a fixed orthogonal ``embed``
  and an ``offset`` (the parameters), so no axis is special and the data are
  not centred at the origin.
* **The image shows the class as its colour**: hue from a six-colour palette
  (red, green, blue, yellow, cyan, magenta), brightness growing with ``t``.
  :func:`true_labels` recovers the partition from images alone (nearest palette
  direction), so it can be passed to the evaluation as a reference-label
  callable: ``--labels gansem.generators.synthetic:true_labels``.

Example::

    gen, params, meta = builtin_generator("synthetic-bands")
    img, feats = gen.synthesize(params, gen.sample_latents(jax.random.key(0), 4), capture=True)
    labels = true_labels(to_uint8(img))          # [4, 32, 32] in {0, 1, 2}
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .base import MAX_RESOLUTION, MAX_SIZE, FeatureLayer, Generator, GeneratorError, check_range, register_family

__all__ = [
    "SyntheticBands",
    "PALETTE",
    "CLASS_NAMES",
    "true_labels",
    "BUILTIN_SYNTHETIC",
    "builtin_generator",
]

#: Class colours (RGB in [0, 1]); class m is drawn with ``PALETTE[m]`` times a brightness.
PALETTE = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], np.float32
)
CLASS_NAMES = ("red", "green", "blue", "yellow", "cyan", "magenta")
_MIN_BRIGHTNESS = 0.45
_FEATURE_LAYER = "features"


@register_family
@dataclasses.dataclass(frozen=True)
class SyntheticBands(Generator):
    """Stripes in the image, thin tubes in feature space (module docstring).

    Attributes:
        size: image and feature-map resolution.
        num_bands: true classes M (2..6); unconditional generator (``num_classes`` stays 0).
        channels: feature dimension D (at least 3).
        length: extent of the class-independent direction ``t``.
        separation: distance between neighbouring tube axes.
        radius: maximum wobble of a pixel around its tube axis (< separation / 2).
        noise: amplitude of the nuisance dimensions.
    """

    family: ClassVar[str] = "synthetic-bands"
    size: int = 32
    num_bands: int = 3
    channels: int = 8
    length: float = 8.0
    separation: float = 1.5
    radius: float = 0.3
    noise: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.num_bands <= len(PALETTE):
            raise GeneratorError(f"synthetic-bands: num_bands must be in 2..{len(PALETTE)}, got {self.num_bands}")
        check_range(self, "channels", 3, MAX_SIZE)
        check_range(self, "size", 2, MAX_RESOLUTION)
        if not 0 <= self.radius < self.separation / 2:
            raise GeneratorError(
                f"synthetic-bands: radius {self.radius} must be in [0, separation/2 = {self.separation / 2}) "
                "or the classes stop being linearly separable"
            )

    # -- description -----------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return int(self.size)

    @property
    def latent_shape(self):
        return (4,)

    def feature_layers(self):
        return (FeatureLayer(_FEATURE_LAYER, int(self.size), int(self.channels), 0),)

    def init_params(self, key):
        k1, k2 = jax.random.split(key)
        q, r = jnp.linalg.qr(jax.random.normal(k1, (self.channels, self.channels), jnp.float32))
        q = q * jnp.sign(jnp.diagonal(r))[None, :]  # a proper Haar-random orthogonal matrix
        return {"params": {"embed": q, "offset": 2.0 * jax.random.normal(k2, (self.channels,), jnp.float32)}}

    # -- geometry ----------------------------------------------------------------------
    def tube_axes(self) -> np.ndarray:
        """``[M, 2]`` cross-section positions ``p_m``: a regular M-gon, neighbours ``separation`` apart."""
        m = self.num_bands
        circ = self.separation / (2.0 * math.sin(math.pi / m))
        ang = 2.0 * math.pi * np.arange(m) / m
        return np.stack([circ * np.cos(ang), circ * np.sin(ang)], -1).astype(np.float32)

    def _fields(self, latents):
        """Per-pixel class ``[N,H,W]`` int32, t ``[N,H,W]``, raw features ``[N,H,W,D]``."""
        n = latents.shape[0]
        g = jnp.linspace(-1.0, 1.0, self.size, dtype=jnp.float32)
        v, u = jnp.meshgrid(g, g, indexing="ij")  # rows: v (down), columns: u (right); [H, W]
        z = latents.astype(jnp.float32)
        theta = (z[:, 0] * (math.pi / 2))[:, None, None]
        off = (0.3 * jnp.tanh(z[:, 1]))[:, None, None]
        shift = jax.nn.sigmoid(z[:, 2])[:, None, None]
        phase = z[:, 3][:, None, None]
        s = u * jnp.cos(theta) + v * jnp.sin(theta) + off  # across the stripes
        w = -u * jnp.sin(theta) + v * jnp.cos(theta)  # along the stripes, in [-√2, √2]
        m = self.num_bands
        a = 0.9
        bounds = jnp.asarray(-a + 2 * a * np.arange(1, m) / m, jnp.float32)
        cls = jnp.sum(s[..., None] >= bounds, axis=-1).astype(jnp.int32)  # [N, H, W]
        t = self.length * (0.8 * (w / math.sqrt(2.0) + 1.0) / 2.0 + 0.2 * shift)
        axes = jnp.asarray(self.tube_axes())[cls]  # [N, H, W, 2]
        amp = self.radius / math.sqrt(2.0)
        j1 = amp * jnp.sin(math.pi * (2 * u + v) + 3.0 * phase)
        j2 = amp * jnp.cos(math.pi * (u - 2 * v) + 2.0 * phase)
        parts = [t[..., None], axes + jnp.stack([j1, j2], -1)]
        for k in range(self.channels - 3):
            a_k, b_k = math.cos(1.3 * k + 0.4), math.sin(1.3 * k + 0.4)
            parts.append((self.noise * jnp.sin(math.pi * (k + 1) * (a_k * u + b_k * v) + (k + 1) * phase))[..., None])
        raw = jnp.concatenate([jnp.broadcast_to(p, (n, self.size, self.size, p.shape[-1])) for p in parts], -1)
        return cls, t, raw

    # -- synthesis ---------------------------------------------------------------------
    def synthesize_styles(self, params, styles, capture=(), noise_key=None):
        """Images ``[N, H, W, 3]`` in [-1, 1] and ``{"features": [N, H, W, D]}``."""
        names = self._capture_names(capture)
        cls, t, raw = self._fields(styles)
        p = params["params"]
        feats = jnp.einsum("nhwc,dc->nhwd", raw, p["embed"], precision=jax.lax.Precision.HIGHEST) + p["offset"]
        bright = _MIN_BRIGHTNESS + (1.0 - _MIN_BRIGHTNESS) * jnp.clip(t / self.length, 0.0, 1.0)
        rgb = jnp.asarray(PALETTE)[cls] * bright[..., None]
        img = 2.0 * rgb - 1.0
        return img, ({_FEATURE_LAYER: feats} if _FEATURE_LAYER in names else {})

    def true_partition(self, latents) -> np.ndarray:
        """The true class of every pixel, ``[N, H, W]`` int32, computed from the latents."""
        return np.asarray(self._fields(jnp.asarray(latents))[0])


def true_labels(images) -> np.ndarray:
    """The true partition of :class:`SyntheticBands` images, from the images alone.

    Args:
        images: ``[B, H, W, 3]`` uint8 (as written by ``launch/segment.py`` or passed
            by the evaluation).

    Returns:
        ``[B, H, W]`` int32: index of the palette colour whose direction is closest
        (cosine) to the pixel's colour. Pixels of a synthetic image are always one
        palette colour times a brightness >= 0.45, so this is exact.
    """
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"true_labels expects uint8 images [B, H, W, 3], got shape {x.shape}")
    pal = PALETTE / np.linalg.norm(PALETTE, axis=-1, keepdims=True)
    return np.argmax(x @ pal.T, axis=-1).astype(np.int32)


true_labels.class_names = CLASS_NAMES  # lets evaluation tools name the classes


#: Built-in synthetic generators: name → (config, description). Parameters come from ``key(0)``.
BUILTIN_SYNTHETIC = {
    "synthetic-bands": (
        dict(size=32, num_bands=3, channels=8),
        "32×32 synthetic toy (KLiSH Fig. 2 as images): 3 linearly separable but non-centred classes, "
        "true labels from gansem.generators.synthetic:true_labels",
    ),
}


def builtin_generator(name: str):
    """``(generator, params, metadata)`` of a built-in synthetic generator (see :data:`BUILTIN_SYNTHETIC`)."""
    if name not in BUILTIN_SYNTHETIC:
        raise GeneratorError(f"unknown synthetic generator {name!r}; known: {sorted(BUILTIN_SYNTHETIC)}")
    cfg, _ = BUILTIN_SYNTHETIC[name]
    gen = SyntheticBands(**cfg)
    params = jax.tree.map(np.asarray, gen.init_params(jax.random.key(0)))
    return gen, params, {"name": name, "family": gen.family, "source": {"builtin": name, "params_key": 0}}
