"""Network-free segmentation by style mixing (seed paper 003, Sec. 3.1-3.2 and supplement Sec. 1, 3).

A style-based generator ``G = G_s(G_m(z))`` maps ``z`` to per-layer styles
``w [l, d]`` (w+). Style mixing at cutoff ``c`` (Sec. 3.1) takes layers ``< c``
from the *structure latent* ``w_0`` and layers ``>= c`` from a *style latent*
``w_i``; with a suitable ``c`` the mixed image ``X_0i = G_s(w_0i)`` keeps the
layout of ``X_0`` and changes its colours, and pixels of one semantic segment
change together. For a query image ``X_0`` (Sec. 3.2):

1. ``n`` style-mixed variants ``X_01 .. X_0n`` (the paper: ``n = 50``) are
   concatenated per pixel into the *style summary tensor*
   ``X_s [h, w, 3n]``, in RGB or CIELAB (Tab. 4: LAB is less sensitive to highlights);
2. ``Y' = kmeans(X_s, k)`` (Eq. 2) clusters the pixels of each image on its own
   (``k = 2`` or ``3``; ``8`` for face parts);
3. foreground identification maps the cluster map ``Y'`` to a binary mask ``Y``
   (Eq. 1): the *corner-minority* rule (a cluster filling at least
   ``round(θ_corner b²)`` pixels of a ``b × b`` corner block is background) or the
   *saliency* rule (Eq. 3: cluster ``m`` is foreground when the mean of a saliency
   map ``S`` over its pixels exceeds ``θ_saliency``; ``S`` is a Gaussian peaked at
   the image centre, supplement Fig. S1).

The paper gives no values for ``b``, ``θ_corner``, the Gaussian's width or
``θ_saliency``; the defaults of :class:`StyleMixConfig` are ours (stated there).
Our reading of the corner rule: the count is taken per corner block, and a cluster
is background when it reaches the threshold in any of the four.

Every image is processed on its own: its latents and K-means seed come from
``fold_in(key, index)`` (:func:`image_inputs`), so an image's mask does not depend
on the batch it is in, and :func:`segment_samples` splits batches over a mesh with
:func:`gansem.batching.map_batches` (micro-batches of a fixed shape: the same bits
on 1 or 8 devices). The variants of one image share the generator's stored noise
maps (``noise_mode="const"``), so pixels change with the styles only.

Example::

    gen, params, _ = gansem.zoo.load_generator("checkpoints/ffhq")
    cfg = StyleMixConfig(num_variants=50, cutoff=8, color_space="lab", k=3, foreground="saliency")
    out = segment_samples(gen, params, cfg, jax.random.key(0), np.arange(16), mesh=sharding.make_mesh())
    out["mask"]      # [16, R, R] bool foreground masks
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..batching import map_batches
from ..cluster.kmeans import kmeans_fit_batched
from ..generators.base import Generator

__all__ = [
    "STYLE_FAMILIES",
    "COLOR_SPACES",
    "FOREGROUND_RULES",
    "StyleMixError",
    "StyleMixConfig",
    "check_style_generator",
    "num_style_layers",
    "srgb_to_lab",
    "to_color_space",
    "mixed_styles",
    "StyleSummary",
    "style_summary",
    "cluster_summary",
    "gaussian_saliency",
    "corner_foreground",
    "saliency_foreground",
    "foreground_mask",
    "image_inputs",
    "prepare_generator",
    "segment_batch",
    "iter_segments",
    "segment_samples",
]

#: Generator families with per-layer styles that can be mixed.
STYLE_FAMILIES = ("stylegan2", "stylegan")
COLOR_SPACES = ("rgb", "lab")
FOREGROUND_RULES = ("corner", "saliency")

# CIE 1931 XYZ of linear sRGB primaries and the D65 white point (IEC 61966-2-1; the values scikit-image uses).
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]], np.float32)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], np.float32)


class StyleMixError(ValueError):
    """The generator or the settings cannot be used for style-mixing segmentation (the message says why)."""


@dataclasses.dataclass(frozen=True)
class StyleMixConfig:
    """Settings of style-mixing segmentation (names of the seed paper, Sec. 3.2 and Tab. S1).

    Attributes:
        num_variants: ``n``, style-mixed variants per image (the paper: 50).
        cutoff: ``c``, the mixing layer: styles ``< c`` from the image, ``>= c`` from the
            style latents (Sec. 3.1; FFHQ-1024 uses 8 of 18 layers, Tab. S1).
        color_space: ``"lab"`` (CIELAB, D65) or ``"rgb"`` (sRGB in [0, 1]) for the summary tensor.
        k: clusters of the per-image K-means (Eq. 2; 2 with corner, 3 with saliency, 8 for face parts).
        foreground: ``"corner"`` (corner minority) or ``"saliency"`` (Eq. 3).
        corner_size: ``b``, side of the corner blocks in pixels of the clustered image
            (``None``: an eighth of the side; the paper gives no value).
        theta_corner: ``θ_corner``; a cluster with ``>= round(θ_corner b²)`` pixels in a corner
            block is background (ours: 0.5).
        saliency_sigma: standard deviation of the Gaussian saliency map, as a fraction of the
            image side (ours: 0.25).
        theta_saliency: ``θ_saliency``; a cluster whose mean saliency exceeds it is foreground (ours: 0.5).
        resolution: side of the clustered images and masks (``None``: the generator's); the
            variants are resized (antialiased bilinear) before the colour conversion.
        kmeans_max_iter: Lloyd iteration cap (convergence is reported per image).
        variant_chunk: variants synthesised per generator call (must divide ``num_variants``;
            ``None``: all at once). Bounds memory at high resolution.
    """

    num_variants: int = 50
    cutoff: int = 8
    color_space: str = "lab"
    k: int = 3
    foreground: str = "saliency"
    corner_size: Optional[int] = None
    theta_corner: float = 0.5
    saliency_sigma: float = 0.25
    theta_saliency: float = 0.5
    resolution: Optional[int] = None
    kmeans_max_iter: int = 50
    variant_chunk: Optional[int] = None

    def replace(self, **changes) -> "StyleMixConfig":
        return dataclasses.replace(self, **changes)

    def out_resolution(self, gen: Generator) -> int:
        return int(gen.resolution if self.resolution is None else self.resolution)

    def corner_block(self, gen: Generator) -> int:
        return int(max(1, self.out_resolution(gen) // 8) if self.corner_size is None else self.corner_size)

    def check(self, gen: Generator) -> None:
        """Raises :class:`StyleMixError` naming the first setting that cannot work with ``gen``."""
        check_style_generator(gen)
        layers = num_style_layers(gen)
        res = self.out_resolution(gen)
        if not 1 <= self.num_variants <= 4096:
            raise StyleMixError(f"num_variants (n) must be in [1, 4096], got {self.num_variants}")
        if not 1 <= self.cutoff <= layers - 1:
            raise StyleMixError(f"cutoff c must be in [1, {layers - 1}] for this {gen.family} generator "
                                f"({layers} style layers; c = 0 would keep none of the image's styles and c = "
                                f"{layers} all of them), got {self.cutoff}")
        if self.color_space not in COLOR_SPACES:
            raise StyleMixError(f"color space must be one of {COLOR_SPACES}, got {self.color_space!r}")
        if self.foreground not in FOREGROUND_RULES:
            raise StyleMixError(f"foreground rule must be one of {FOREGROUND_RULES}, got {self.foreground!r}")
        if not 2 <= res <= 4 * gen.resolution:
            raise StyleMixError(f"resolution must be in [2, {4 * gen.resolution}], got {res}")
        if not 2 <= self.k <= min(64, res * res):
            raise StyleMixError(f"k must be in [2, {min(64, res * res)}], got {self.k}")
        if not 1 <= self.corner_block(gen) <= res // 2:
            raise StyleMixError(f"corner size b must be in [1, {res // 2}] (half the side of {res} px), "
                                f"got {self.corner_block(gen)}")
        for name in ("theta_corner", "theta_saliency"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise StyleMixError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.saliency_sigma > 0:
            raise StyleMixError(f"saliency_sigma must be > 0, got {self.saliency_sigma}")
        if self.kmeans_max_iter < 1:
            raise StyleMixError(f"kmeans_max_iter must be >= 1, got {self.kmeans_max_iter}")
        chunk = self.variant_chunk
        if chunk is not None and (chunk < 1 or self.num_variants % chunk):
            raise StyleMixError(f"variant_chunk must divide num_variants = {self.num_variants}, got {chunk}")


def check_style_generator(gen: Generator) -> None:
    """Refuse generators without per-layer styles (the method mixes them, Sec. 3.1 and its limitations).

    Raises:
        StyleMixError: ``gen`` is not a StyleGAN2 / StyleGAN, or is class-conditional.
    """
    if gen.family not in STYLE_FAMILIES:
        raise StyleMixError(
            f"style-mixing segmentation needs a style-based generator ({', '.join(STYLE_FAMILIES)}): it keeps an "
            f"image's styles w below the cutoff layer and swaps in other samples' styles above it. A {gen.family} "
            "generator takes one latent vector at its input and has no per-layer styles to mix (seed paper, "
            "Sec. 3.1 and its limitations). Use a StyleGAN2 or StyleGAN checkpoint "
            "(python -m weights_port convert SRC DST)")
    if gen.num_classes:
        raise StyleMixError(f"class-conditional {gen.family} generators ({gen.num_classes} classes) are not "
                            "supported by style-mixing segmentation yet; use an unconditional model")


def num_style_layers(gen: Generator) -> int:
    """``l``: the number of per-layer styles of a style-based generator (w+ is ``[l, w_dim]``)."""
    check_style_generator(gen)
    return int(gen.num_ws if gen.family == "stylegan2" else gen.num_layers)


# -- colour -----------------------------------------------------------------------------


def srgb_to_lab(rgb):
    """sRGB (D65) to CIELAB (D65, 2° observer).

    ``rgb`` is companded sRGB in [0, 1]; linearised with the sRGB curve, mapped to XYZ
    by the sRGB primaries, normalised by the D65 white and mapped to L*a*b* with the
    CIE 1976 formulas (the conventions of ``skimage.color.rgb2lab``).

    Args:
        rgb: ``[..., 3]`` float in [0, 1].

    Returns:
        ``[..., 3]`` float32 ``(L* in [0, 100], a*, b*)``.
    """
    rgb = jnp.asarray(rgb, jnp.float32)
    lin = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = (lin @ _RGB_TO_XYZ.T) / _D65_WHITE  # [..., 3] / white
    eps = (6.0 / 29.0) ** 3
    f = jnp.where(xyz > eps, jnp.cbrt(jnp.maximum(xyz, eps)), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def to_color_space(images, color_space: str):
    """Generator images ``[..., 3]`` in [-1, 1] to ``"rgb"`` ([0, 1], clipped as saved images are) or ``"lab"``."""
    rgb = jnp.clip(jnp.asarray(images, jnp.float32) * (127.5 / 255.0) + (128.0 / 255.0), 0.0, 1.0)
    if color_space == "rgb":
        return rgb
    if color_space == "lab":
        return srgb_to_lab(rgb)
    raise StyleMixError(f"color space must be one of {COLOR_SPACES}, got {color_space!r}")


# -- the style summary tensor (Sec. 3.2) ---------------------------------------------------


def mixed_styles(gen: Generator, ws0, style_ws, cutoff: int):
    """``w_0i``: layers ``< cutoff`` of the structure styles, the rest from each style latent (Sec. 3.1).

    Args:
        gen: a style-based generator (its ``mix_styles``).
        ws0: ``[B, l, d]`` structure styles ``w_0``.
        style_ws: ``[B, n, l, d]`` style styles ``w_1 .. w_n``.
        cutoff: ``c``.

    Returns:
        ``[B, n, l, d]``.
    """
    b, n = style_ws.shape[:2]
    base = jnp.broadcast_to(ws0[:, None], style_ws.shape).reshape((b * n,) + ws0.shape[1:])
    return gen.mix_styles(base, style_ws.reshape((b * n,) + style_ws.shape[2:]), cutoff).reshape(style_ws.shape)


class StyleSummary(NamedTuple):
    """Output of :func:`style_summary`.

    Attributes:
        summary: ``[B, h, w, 3n]`` float32 style summary tensor ``X_s``, variant-major per pixel
            (``[X_01 colour, X_02 colour, ...]``).
        image: ``[B, h, w, 3]`` float32 query images ``X_0`` in [-1, 1] (resized to ``h``).
        variants: ``[B, n, h, w, 3]`` float32 style-mixed images in [-1, 1] (resized).
    """

    summary: jax.Array
    image: jax.Array
    variants: jax.Array


def _resize(images, size: int):
    if images.shape[-2] == size:
        return images
    shape = images.shape[:-3] + (size, size, images.shape[-1])
    return jax.image.resize(images, shape, "linear", antialias=True)


def style_summary(gen: Generator, params, z0, z_styles, config: StyleMixConfig) -> StyleSummary:
    """The style summary tensor ``X_s`` of each query latent (Sec. 3.2). Traceable.

    Args:
        gen: a style-based generator.
        params: its parameters.
        z0: ``[B, *latent_shape]`` structure latents ``z_0``.
        z_styles: ``[B, n, *latent_shape]`` style latents ``z_1 .. z_n``.
        config: ``cutoff``, ``color_space``, ``resolution``, ``variant_chunk`` are used.

    Returns:
        :class:`StyleSummary`.
    """
    b, n = z_styles.shape[:2]
    size = config.out_resolution(gen)
    ws0 = gen.map_latents(params, z0)  # [B, l, d]
    ws = gen.map_latents(params, z_styles.reshape((b * n,) + z_styles.shape[2:]))
    mixed = mixed_styles(gen, ws0, ws.reshape((b, n) + ws.shape[1:]), config.cutoff)  # [B, n, l, d]
    chunk = n if config.variant_chunk is None else int(config.variant_chunk)
    # [n/v, B*v, l, d]: one generator call per chunk of v variants of every image
    per_call = mixed.reshape((b, n // chunk, chunk) + mixed.shape[2:]).swapaxes(0, 1)
    per_call = per_call.reshape((n // chunk, b * chunk) + mixed.shape[2:])
    images = jax.lax.map(lambda w: _resize(gen.synthesize_styles(params, w)[0], size), per_call)
    variants = images.reshape((n // chunk, b, chunk) + images.shape[2:]).swapaxes(0, 1)
    variants = variants.reshape((b, n) + images.shape[2:])  # [B, n, h, w, 3]
    query = _resize(gen.synthesize_styles(params, ws0)[0], size)
    colour = to_color_space(variants, config.color_space)  # [B, n, h, w, 3]
    summary = jnp.moveaxis(colour, 1, 3).reshape((b, size, size, 3 * n))  # BNHWC -> BHWNC -> BHW(N·C)
    return StyleSummary(summary=summary, image=query, variants=variants)


def cluster_summary(keys, summary, k: int, *, max_iter: int = 50):
    """``Y' = kmeans(X_s, k)`` per image (Eq. 2), all images at once (:func:`kmeans_fit_batched`).

    Args:
        keys: ``[B]`` PRNG keys (K-means++ seeding).
        summary: ``[B, h, w, D]`` style summary tensors.
        k: clusters.
        max_iter: Lloyd iteration cap.

    Returns:
        ``(cluster_maps [B, h, w] int32, KMeansResult with a leading [B] axis)``.
    """
    b, h, w, d = summary.shape
    res = kmeans_fit_batched(keys, summary.reshape(b, h * w, d), k, max_iter=max_iter)
    return res.labels.reshape(b, h, w), res


# -- foreground identification (Sec. 3.2) ------------------------------------------------


def gaussian_saliency(height: int, width: int, sigma: float = 0.25):
    """The pre-defined saliency map ``S`` (supplement Fig. S1): a Gaussian peaked at the image centre.

    ``S(i, j) = exp(-((y_i - 1/2)² + (x_j - 1/2)²) / (2 σ²))`` at pixel centres
    ``y_i = (i + 1/2) / height``, ``x_j = (j + 1/2) / width``; ``S`` is in (0, 1].

    Returns:
        ``[height, width]`` float32.
    """
    y = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    x = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    r2 = y[:, None] ** 2 + x[None, :] ** 2
    return jnp.asarray(np.exp(-r2 / (2.0 * float(sigma) ** 2)).astype(np.float32))


def _cluster_counts(maps, k: int):
    """``[B, k]`` pixels per cluster of ``maps [B, ...]`` int."""
    flat = maps.reshape(maps.shape[0], -1)
    return jnp.sum(jax.nn.one_hot(flat, k, dtype=jnp.int32), axis=1)


def corner_foreground(cluster_maps, k: int, b: int, theta: float):
    """Corner-minority rule: which clusters are foreground.

    A cluster is background when it fills at least ``round(θ_corner b²)`` pixels of one of
    the four ``b × b`` corner blocks of ``Y'``; every other cluster is foreground (Sec. 3.2).

    Args:
        cluster_maps: ``[B, h, w]`` int cluster ids in ``[0, k)``.
        k: number of clusters.
        b: corner block side in pixels.
        theta: ``θ_corner`` in [0, 1].

    Returns:
        ``[B, k]`` bool, True for foreground clusters.
    """
    need = int(round(float(theta) * b * b))
    corners = jnp.stack([cluster_maps[:, :b, :b], cluster_maps[:, :b, -b:],
                         cluster_maps[:, -b:, :b], cluster_maps[:, -b:, -b:]], axis=1)  # [B, 4, b, b]
    per_corner = jax.vmap(lambda c: _cluster_counts(c, k), in_axes=1, out_axes=1)(corners)  # [B, 4, k]
    return ~jnp.any(per_corner >= need, axis=1)


def saliency_foreground(cluster_maps, k: int, saliency, theta: float):
    """Saliency rule (Eq. 3): cluster ``m`` is foreground when ``(1/N_m) Σ_{Y'=m} S > θ_saliency``.

    Args:
        cluster_maps: ``[B, h, w]`` int cluster ids in ``[0, k)``.
        k: number of clusters.
        saliency: ``[h, w]`` map ``S`` with values in [0, 1].
        theta: ``θ_saliency``.

    Returns:
        ``[B, k]`` bool, True for foreground clusters (empty clusters are background).
    """
    onehot = jax.nn.one_hot(cluster_maps, k, dtype=jnp.float32)  # [B, h, w, k]
    total = jnp.einsum("bhwk,hw->bk", onehot, jnp.asarray(saliency, jnp.float32))
    count = jnp.sum(onehot, axis=(1, 2))
    return (count > 0) & (total > theta * count)


def foreground_mask(cluster_maps, foreground):
    """``Y``: pixels of foreground clusters (``cluster_maps [B, h, w]``, ``foreground [B, k]``) as ``[B, h, w]`` bool."""
    b = cluster_maps.shape[0]
    flat = jnp.take_along_axis(foreground, cluster_maps.reshape(b, -1), axis=1)
    return flat.reshape(cluster_maps.shape)


# -- one batch of images, many batches over a mesh ----------------------------------------


def image_inputs(gen: Generator, key, index, num_variants: int):
    """The random inputs of image ``index``: all drawn from ``fold_in(key, index)``.

    Returns:
        ``(z0 [*latent_shape], z_styles [n, *latent_shape], kmeans_key)``: the structure latent
        (``fold_in(., 0)``), the style latents (``fold_in(., 1)``) and the K-means key (``fold_in(., 2)``).
    """
    ki = jax.random.fold_in(key, index)
    z0 = gen.sample_latents(jax.random.fold_in(ki, 0), 1)[0]
    zs = gen.sample_latents(jax.random.fold_in(ki, 1), num_variants)
    return z0, zs, jax.random.fold_in(ki, 2)


def segment_batch(gen: Generator, config: StyleMixConfig, params, key, indices, *, variants: bool = False) -> dict:
    """Style-mixing segmentation of the images ``indices``. Traceable (a :func:`map_batches` program).

    Args:
        gen: a style-based generator (checked by the caller: :meth:`StyleMixConfig.check`).
        config: the settings.
        params: generator parameters.
        key: PRNG key of the image stream (:func:`image_inputs`).
        indices: ``[B]`` int32 image indices.
        variants: also return the style-mixed images.

    Returns:
        ``{"image": [B, h, w, 3] float32 in [-1, 1], "latent": [B, *latent_shape], "clusters": [B, h, w] int32,
        "foreground": [B, k] bool, "mask": [B, h, w] bool, "kmeans_iters": [B] int32, "kmeans_converged": [B] bool}``
        (and ``"variants": [B, n, h, w, 3]`` when asked).
    """
    z0, zs, kkeys = jax.vmap(lambda i: image_inputs(gen, key, i, config.num_variants))(indices)
    s = style_summary(gen, params, z0, zs, config)
    maps, res = cluster_summary(kkeys, s.summary, config.k, max_iter=config.kmeans_max_iter)
    size = config.out_resolution(gen)
    if config.foreground == "corner":
        fg = corner_foreground(maps, config.k, config.corner_block(gen), config.theta_corner)
    else:
        fg = saliency_foreground(maps, config.k, gaussian_saliency(size, size, config.saliency_sigma),
                                 config.theta_saliency)
    out = {"image": s.image, "latent": z0, "clusters": maps, "foreground": fg, "mask": foreground_mask(maps, fg),
           "kmeans_iters": res.n_iter, "kmeans_converged": res.converged}
    if variants:
        out["variants"] = s.variants
    return out


def prepare_generator(gen: Generator) -> Generator:
    """``gen`` with ``noise_mode="const"`` where it draws random noise: an image's variants then share noise maps."""
    if gen.settings().get("noise_mode") == "random":
        return gen.with_settings(noise_mode="const")
    return gen


def iter_segments(gen: Generator, params, config: StyleMixConfig, key, indices, *, mesh=None,
                  batch_size: int = 8, variants: bool = False, progress: bool = False,
                  desc: str = "style mixing") -> Iterator[tuple[int, int, dict]]:
    """:func:`segment_batch` over many images, batch by batch, split over ``mesh``; one compiled program.

    Batches go through :func:`gansem.batching.map_batches` (micro-batches of
    ``ceil(batch_size / 8)`` images per device program), so the outputs are the same on
    any device count dividing 8.

    Args:
        gen: a style-based generator.
        params: its parameters (host or device arrays).
        config: the settings (checked here).
        key: PRNG key of the image stream; image ``i``'s inputs come from ``fold_in(key, i)``.
        indices: ``[N]`` image indices.
        mesh: a 1-D mesh (:func:`gansem.sharding.make_mesh`) or ``None`` (one device).
        batch_size: images per call (see :func:`gansem.batching.map_batches`).
        variants: also return the style-mixed images (memory: ``batch n h w 3`` floats).
        progress: show a progress bar.

    Yields:
        ``(start, stop, outputs)``: positions ``[start, stop)`` in ``indices`` and the dict of
        :func:`segment_batch` for them as host numpy arrays.

    Raises:
        StyleMixError: the generator is not style-based, or a setting does not fit it.
    """
    config.check(gen)
    gen = prepare_generator(gen)
    indices = np.asarray(indices, np.int32).reshape(-1)
    if indices.size == 0:
        raise StyleMixError("no images to segment")
    fn = lambda p, k, i: segment_batch(gen, config, p, k, i, variants=variants)  # noqa: E731
    yield from map_batches(fn, [indices], batch_size=batch_size, mesh=mesh, bcast_args=(params, key),
                           progress=progress, desc=desc)


def segment_samples(gen: Generator, params, config: StyleMixConfig, key, indices, *, mesh=None,
                    batch_size: int = 8, variants: bool = False, progress: bool = False,
                    desc: str = "style mixing") -> dict:
    """:func:`iter_segments` gathered: the dict of :func:`segment_batch` as host arrays with ``N`` rows."""
    parts = [out for _, _, out in iter_segments(gen, params, config, key, indices, mesh=mesh, batch_size=batch_size,
                                                variants=variants, progress=progress, desc=desc)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
