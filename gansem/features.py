"""GAN feature extraction for KLiSH: layer selection, resizing, concatenation (KLiSH Sec. 4.1).

The layer rule of the paper: scan the generator's layers from high resolution to
low; if several layers share a resolution only the last one counts; stop adding
layers before the accumulated channel count exceeds the budget (1,000). The
selected maps are bilinearly resized to one common resolution and concatenated
along channels, giving one D-dimensional feature per pixel.

Resizing follows the original implementation (``align_corners=True`` bilinear,
no antialiasing when downsampling), see ``docs``: :func:`resize_bilinear_align_corners`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .generators.base import FeatureLayer, Generator, GeneratorError

__all__ = [
    "select_feature_layers",
    "resize_bilinear_align_corners",
    "concat_features",
    "make_feature_fn",
    "extract_features",
]


def select_feature_layers(layers: Sequence[FeatureLayer], channel_budget: int = 1000) -> tuple[FeatureLayer, ...]:
    """The paper's layer rule.

    Args:
        layers: every capturable layer in forward order (``Generator.feature_layers()``).
        channel_budget: maximum total channels (1,000 in the paper).

    Returns:
        Selected layers in forward order (low → high resolution).
    """
    last_per_res: dict[int, FeatureLayer] = {}
    for layer in layers:
        last_per_res[layer.resolution] = layer  # later layers overwrite: keep the last one
    chosen, total = [], 0
    for res in sorted(last_per_res, reverse=True):
        layer = last_per_res[res]
        if total + layer.channels > channel_budget:
            break
        chosen.append(layer)
        total += layer.channels
    if not chosen:
        smallest = min(l.channels for l in last_per_res.values())
        raise GeneratorError(
            f"no layer fits the channel budget {channel_budget} (smallest candidate has {smallest} channels); "
            "raise --channel-budget"
        )
    return tuple(sorted(chosen, key=lambda l: l.index))


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights, align_corners=True."""
    m = np.zeros((n_out, n_in), np.float64)
    if n_in == 1:
        m[:, 0] = 1.0
        return m.astype(np.float32)
    if n_out == 1:
        m[0, 0] = 1.0
        return m.astype(np.float32)
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m.astype(np.float32)


def resize_bilinear_align_corners(x, size: int):
    """Bilinear resize with ``align_corners=True`` (PyTorch ``F.interpolate`` semantics).

    Args:
        x: ``[N, h, w, C]``.
        size: output height and width.

    Returns:
        ``[N, size, size, C]``. Separable: two small matmuls, exact for any scale.
    """
    n, h, w, c = x.shape
    if h == size and w == size:
        return x
    mh = jnp.asarray(_interp_matrix(h, size))
    mw = jnp.asarray(_interp_matrix(w, size))
    y = jnp.einsum("oh,nhwc->nowc", mh, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,nowc->nopc", mw, y, precision=jax.lax.Precision.HIGHEST)


def concat_features(feats: dict, layers: Sequence[FeatureLayer], size: int):
    """Resize each selected map to ``size`` and concatenate channels: ``[N, size, size, D]``."""
    return jnp.concatenate([resize_bilinear_align_corners(feats[l.name], size) for l in layers], axis=-1)


def make_feature_fn(generator: Generator, layers: Sequence[FeatureLayer], size: int):
    """A jitted ``f(params, latents, class_labels) -> (images [N,H,W,3], features [N,size,size,D])``."""
    names = tuple(l.name for l in layers)
    layers = tuple(layers)

    @jax.jit
    def feature_fn(params, latents, class_labels=None):
        img, feats = generator.synthesize(params, latents, class_labels, capture=names)
        return img, concat_features(feats, layers, size)

    return feature_fn


def extract_features(generator: Generator, params, latents, layers, size: int, class_labels=None,
                     batch_size: int = 16, progress: bool = False, desc: str = "features"):
    """Features of many samples as a host array, batch by batch.

    Args:
        latents: ``[N, *latent_shape]``.
        class_labels: ``[N]`` int or ``None``.

    Returns:
        ``(images uint8 [N, H, W, 3], features float32 [N, size, size, D])`` on the host.
    """
    from tqdm.auto import tqdm

    fn = make_feature_fn(generator, layers, size)
    latents = np.asarray(latents)
    n = latents.shape[0]
    imgs, feats = [], []
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        lat = latents[s:s + batch_size]
        cl = None if class_labels is None else np.asarray(class_labels)[s:s + batch_size]
        pad = batch_size - lat.shape[0]
        if pad:  # keep one compiled shape
            lat = np.concatenate([lat, np.repeat(lat[-1:], pad, 0)])
            if cl is not None:
                cl = np.concatenate([cl, np.repeat(cl[-1:], pad, 0)])
        img, f = fn(params, lat, cl)
        imgs.append(to_uint8(np.asarray(img)[: batch_size - pad]))
        feats.append(np.asarray(f)[: batch_size - pad])
    return np.concatenate(imgs), np.concatenate(feats)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images → uint8, as NVIDIA's scripts do: ``clip(x * 127.5 + 128, 0, 255)``."""
    return np.clip(np.asarray(images) * 127.5 + 128.0, 0, 255).astype(np.uint8)
