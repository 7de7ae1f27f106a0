"""GAN feature extraction for KLiSH: layer selection, resizing, concatenation (KLiSH Sec. 4.1).

The layer rule of the paper: scan the generator's layers from high resolution to
low; if several layers share a resolution only the last one counts; stop adding
layers before the accumulated channel count exceeds the budget (1,000). The
selected maps are bilinearly resized to one common resolution and concatenated
along channels, giving one D-dimensional feature per pixel.

Resizing follows the original implementation (``align_corners=True`` bilinear,
no antialiasing when downsampling): :func:`resize_bilinear_align_corners`.

Clustering space (:class:`FeatureTransform`). The paper clusters the raw
concatenated features. Two switchable, documented deviations make the small
default runs meaningful (README, "Fidelity"):

* *layer balance* -- each selected layer's channels are scaled so that every layer
  carries the same share of the total variance. Without it the lowest-resolution
  layer dominates Euclidean distances (the DCGAN's 4x4 map holds 512 of 960
  channels and 45 % of the variance; all pixels of one image share most of it), so
  K-means groups pixels by image rather than by part.
* *PCA* -- centred projection onto the top ``d`` principal directions (not
  whitened). An initial cluster of a few hundred pixels is trivially linearly
  separable in D = 960 dimensions whatever it means; with ``d`` well below the
  pixels per cluster, separability (Eq. 4) measures structure, not dimension.

Both are one affine map ``z = ((x - mu) * scale) @ basis``, so a classifier
``W z + b`` in the clustering space is the classifier
``(W basis^T * scale) x + (b - (W basis^T * scale) mu)`` on raw features
(:meth:`FeatureTransform.to_feature_space`): everything downstream (segmentation,
evaluation, datasets) keeps working on raw generator features.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding
from .batching import map_batches
from .generators.base import FeatureLayer, Generator, GeneratorError

__all__ = [
    "select_feature_layers",
    "resize_bilinear_align_corners",
    "concat_features",
    "feature_program",
    "make_feature_fn",
    "extract_features",
    "FeatureTransform",
    "fit_feature_transform",
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


def feature_program(generator: Generator, layers: Sequence[FeatureLayer], size: int):
    """Traceable ``f(params, latents, class_labels) -> (images [N,H,W,3], features [N,size,size,D])``."""
    names = tuple(l.name for l in layers)
    layers = tuple(layers)

    def feature_fn(params, latents, class_labels=None):
        img, feats = generator.synthesize(params, latents, class_labels, capture=names)
        return img, concat_features(feats, layers, size)

    return feature_fn


def make_feature_fn(generator: Generator, layers: Sequence[FeatureLayer], size: int):
    """:func:`feature_program` jitted."""
    return jax.jit(feature_program(generator, layers, size))


def extract_features(generator: Generator, params, latents, layers, size: int, class_labels=None,
                     batch_size: int = 16, progress: bool = False, desc: str = "features", mesh=None):
    """Features of many samples as a host array, batch by batch (:func:`gansem.batching.map_batches`).

    Args:
        latents: ``[N, *latent_shape]``.
        class_labels: ``[N]`` int or ``None``.
        mesh: split every batch over this mesh's devices (same bits on any device count);
            ``None``: one device.

    Returns:
        ``(images uint8 [N, H, W, 3], features float32 [N, size, size, D])`` on the host.
    """
    latents = np.asarray(latents)
    class_labels = None if class_labels is None else np.asarray(class_labels)
    imgs, feats = [], []
    for _, _, (img, f) in map_batches(feature_program(generator, layers, size), [latents, class_labels],
                                      batch_size=batch_size, mesh=mesh, bcast_args=(params,),
                                      progress=progress, desc=desc):
        imgs.append(to_uint8(img))
        feats.append(f)
    return np.concatenate(imgs), np.concatenate(feats)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images → uint8, as NVIDIA's scripts do: ``clip(x * 127.5 + 128, 0, 255)``."""
    return np.clip(np.asarray(images) * 127.5 + 128.0, 0, 255).astype(np.uint8)


class FeatureTransform(NamedTuple):
    """Affine map from raw features to the clustering space: ``z = ((x - mean) * scale) @ basis``.

    Attributes:
        mean: ``[D] float32`` feature mean of the clustered pixels.
        scale: ``[D] float32`` per-channel factor (layer balance; ones when off).
        basis: ``[D, d] float32`` orthonormal principal directions, or ``None`` (``d = D``, no projection).
    """

    mean: np.ndarray
    scale: np.ndarray
    basis: Optional[np.ndarray]

    FILE = "transform.npz"  # its name in a run directory

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0] if self.basis is None else self.basis.shape[1])

    def apply(self, x, chunk: int = 65536) -> np.ndarray:
        """``x: [N, D]`` raw features -> ``[N, d]`` float32 (host, in row chunks)."""
        x = np.asarray(x, np.float32)
        out = np.empty((x.shape[0], self.dim), np.float32)
        for s in range(0, x.shape[0], chunk):
            z = (x[s:s + chunk] - self.mean) * self.scale
            out[s:s + chunk] = z if self.basis is None else z @ self.basis
        return out

    def apply_rows(self, data):
        """The transform of row-sharded features: a :class:`~gansem.sharding.RowData` ``[N_pad, D]`` -> ``[N_pad, d]``.

        Runs chunk by chunk on the devices that hold the rows (fixed chunk shapes), so every
        row's result is the same for any device or process count.
        """
        mean, scale = jnp.asarray(self.mean), jnp.asarray(self.scale)
        basis = None if self.basis is None else jnp.asarray(self.basis)
        return data.replace(x=_apply_rows(data, mean, scale, basis))

    def to_feature_space(self, W, b):
        """A classifier ``W [K, d], b [K]`` on transformed features as ``(W' [K, D], b' [K])`` on raw ones."""
        W = np.asarray(W, np.float32)
        Wr = (W if self.basis is None else W @ self.basis.T) * self.scale
        return Wr.astype(np.float32), (np.asarray(b, np.float32) - Wr @ self.mean).astype(np.float32)

    def save(self, path: str):
        arrays = {"mean": self.mean, "scale": self.scale}
        if self.basis is not None:
            arrays["basis"] = self.basis
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "FeatureTransform":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["scale"], z["basis"] if "basis" in z.files else None)

    @classmethod
    def from_run(cls, run_dir: str) -> Optional["FeatureTransform"]:
        """The transform a run directory holds, or ``None`` (runs made without one clustered raw features)."""
        path = os.path.join(run_dir, cls.FILE)
        return cls.load(path) if os.path.isfile(path) else None


def fit_feature_transform(x, layers: Sequence[FeatureLayer], *, balance: str = "layer",
                          pca_dim: Optional[int] = None) -> FeatureTransform:
    """Fit the clustering-space map of :class:`FeatureTransform` on ``x [N, D]`` (host, float64 moments).

    Args:
        x: raw features of the clustered pixels, channels ordered as ``layers``.
        layers: the selected layers (their channel counts split ``D``).
        balance: ``"layer"`` (every layer the same share of the total variance) or ``"none"``.
        pca_dim: keep this many principal directions (at most D); ``None`` or ``0``: no projection.

    Returns:
        The transform (``mean`` is zero without a projection, so balance ``"none"`` without PCA is
        the identity, bit for bit). Deterministic: eigenvectors are sign-fixed (largest-magnitude
        entry positive).
    """
    x = np.asarray(x, np.float32)
    mean, cov = feature_moments(x)
    return transform_from_moments(mean, cov, layers, balance=balance, pca_dim=pca_dim)


def feature_moments(x, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], cov [D, D])`` float64 of host rows ``x [N, D]`` (population covariance, ``chunk`` rows at a time)."""
    x = np.asarray(x, np.float32)
    n, d = x.shape
    mean = x.mean(0, dtype=np.float64)
    cov = np.zeros((d, d), np.float64)
    for s in range(0, n, chunk):
        c = x[s:s + chunk].astype(np.float64) - mean
        cov += c.T @ c
    return mean, cov / max(n, 1)


def row_moments(data) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], cov [D, D])`` of the valid rows of a :class:`~gansem.sharding.RowData` (population covariance).

    Two passes of :func:`gansem.sharding.row_reduce` (the mean, then the centred second
    moment), so the result is bit-identical for every device and process count that shares
    the row layout, and no host ever holds the rows of another. Sums are float32 per chunk;
    the moments come back as float64 host arrays.
    """
    total, n = _row_sums(data)
    mean = total / jnp.maximum(n, 1.0)
    return np.asarray(mean, np.float64), np.asarray(_row_cov(data, mean) / jnp.maximum(n, 1.0), np.float64)


@jax.jit
def _apply_rows(data, mean, scale, basis):
    def chunk(x, m, s, *rest):
        z = (x - m) * s
        return z if not rest else z @ rest[0]

    bcast = (mean, scale) if basis is None else (mean, scale, basis)
    return sharding.row_map(chunk, data.mesh, data.layout, (data.x,), bcast)


@jax.jit
def _row_sums(data):
    return sharding.row_reduce(lambda x, v: (v @ x, jnp.sum(v)), data.mesh, data.layout, (data.x, data.valid))


@jax.jit
def _row_cov(data, mean):
    def chunk(x, v, m):
        c = (x - m) * v[:, None]
        return sharding.rows_tdot(c, c)

    return sharding.row_reduce(chunk, data.mesh, data.layout, (data.x, data.valid), (mean,))


def transform_from_moments(mean, cov, layers: Sequence[FeatureLayer], *, balance: str = "layer",
                           pca_dim: Optional[int] = None) -> FeatureTransform:
    """The :class:`FeatureTransform` of features with these moments (see :func:`fit_feature_transform`).

    Rows held by several devices or processes are fitted by combining their moments in a fixed
    order first, so the transform depends on the data only (gansem.pipeline does this).
    """
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    d = mean.shape[0]
    if sum(l.channels for l in layers) != d:
        raise ValueError(f"layers hold {sum(l.channels for l in layers)} channels, features have {d}")
    if balance not in ("layer", "none"):
        raise ValueError(f"balance must be 'layer' or 'none', got {balance!r}")
    if pca_dim is not None and pca_dim < 0:
        raise ValueError(f"pca_dim must be >= 0, got {pca_dim}")
    scale = np.ones(d, np.float64)
    if balance == "layer":
        var = np.diag(cov)
        off, share = 0, var.sum() / len(layers)
        for layer in layers:
            v = var[off:off + layer.channels].sum()
            scale[off:off + layer.channels] = np.sqrt(share / v) if v > 0 else 1.0
            off += layer.channels
    basis = None
    if not pca_dim:
        mean = np.zeros(d)
    else:
        pca_dim = min(pca_dim, d)
        ev, evec = np.linalg.eigh(cov * scale[:, None] * scale[None, :])
        basis = evec[:, np.argsort(ev)[::-1][:pca_dim]]
        basis *= np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(pca_dim)])
        basis = basis.astype(np.float32)
    return FeatureTransform(mean.astype(np.float32), scale.astype(np.float32), basis)
