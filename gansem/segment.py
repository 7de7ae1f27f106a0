"""Segment fresh samples with a KLiSH classifier (KLiSH Sec. 5.1).

The label of a pixel at K clusters is ``argmax_k (W_K · f(pixel) + b_K)`` where
``f`` are the selected generator features bilinearly upsampled to the image
resolution. Because resizing is linear, this equals resizing the per-layer
scores ``feat_l · W_lᵀ`` (computed at each layer's native resolution) and
summing them — what the original ``SimpleLSE`` does — so no full-resolution
feature tensor is ever built: memory is ``[B, H, W, K]``, not ``[B, H, W, D]``.

Example::

    from gansem import segment
    seg = segment.Segmenter.from_run("runs/dcgan", k=12)
    out = seg.sample(num_samples=16, seed=1)     # images, latents, labels
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .features import resize_bilinear_align_corners, to_uint8
from .generators.base import FeatureLayer, Generator

__all__ = [
    "classifier_at",
    "k_for_threshold",
    "segment_scores",
    "make_segment_fn",
    "Segmenter",
    "SegmentError",
]


class SegmentError(ValueError):
    """Impossible segmentation request (K not in the trajectory, threshold never reached...)."""


def classifier_at(trajectory: Sequence[dict], k: int):
    """``(W [k, D], b [k])`` of the trajectory entry with ``k`` clusters."""
    for rec in trajectory:
        if int(rec["k"]) == int(k):
            return np.asarray(rec["W"]), np.asarray(rec["b"])
    ks = sorted({int(r["k"]) for r in trajectory})
    raise SegmentError(
        f"K={k} is not in the trajectory (available: {ks[0]}..{ks[-1]}"
        + ("" if len(ks) == ks[-1] - ks[0] + 1 else f", {len(ks)} values")
        + "); pick one of those, or resume the run if it is incomplete"
    )


def k_for_threshold(trajectory: Sequence[dict], phi: float) -> int:
    """The paper's φ*: the first K (scanning from K0 down) whose minimum IoU reaches ``phi``."""
    for rec in sorted(trajectory, key=lambda r: -int(r["k"])):
        if float(np.min(rec["iou"])) >= phi:
            return int(rec["k"])
    best = max(float(np.min(r["iou"])) for r in trajectory)
    raise SegmentError(
        f"the minimum IoU never reaches φ*={phi} in this trajectory (best {best:.3f}); choose a lower --threshold"
    )


def segment_scores(feats: dict, layers: Sequence[FeatureLayer], W, b, size: int):
    """Class scores at ``size`` × ``size``: ``Σ_l resize(feat_l · W_lᵀ) + b``.

    Args:
        feats: layer name → ``[N, h, w, C_l]``.
        layers: the selected layers, in the order their channels appear in ``W``.
        W: ``[K, D]`` with ``D = Σ_l C_l``.
        b: ``[K]``.

    Returns:
        ``[N, size, size, K]`` scores.
    """
    out, start = 0.0, 0
    for layer in layers:
        w = W[:, start:start + layer.channels]  # [K, C_l]
        s = jnp.einsum("nhwc,kc->nhwk", feats[layer.name], w, precision=jax.lax.Precision.HIGHEST)
        out = out + resize_bilinear_align_corners(s, size)
        start += layer.channels
    return out + b


def make_segment_fn(generator: Generator, layers: Sequence[FeatureLayer], size: Optional[int] = None):
    """Jitted ``f(params, latents, class_labels, W, b) -> (images [N,H,W,3] float, labels [N,size,size] int32)``."""
    layers = tuple(layers)
    names = tuple(l.name for l in layers)
    size = size or generator.resolution

    @jax.jit
    def fn(params, latents, class_labels, W, b):
        img, feats = generator.synthesize(params, latents, class_labels, capture=names)
        scores = segment_scores(feats, layers, W, b, size)
        return img, jnp.argmax(scores, axis=-1).astype(jnp.int32)

    return fn


@dataclasses.dataclass
class Segmenter:
    """A generator plus the KLiSH classifier at one K, ready to label new samples."""

    generator: Generator
    params: object
    layers: tuple
    W: np.ndarray
    b: np.ndarray
    k: int
    run_config: dict

    @classmethod
    def from_run(cls, run_dir: str, k: Optional[int] = None, threshold: Optional[float] = None):
        from .checkpoint import load_trajectory
        from .features import select_feature_layers
        from .generators import load_generator

        cfg_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise SegmentError(f"{run_dir!r} is not a KLiSH run directory (no config.json); run launch/klish.py first")
        with open(cfg_path) as f:
            cfg = json.load(f)
        traj = load_trajectory(run_dir)
        if not traj:
            raise SegmentError(f"{run_dir!r} has no merge steps yet; let launch/klish.py run (or --resume it)")
        if (k is None) == (threshold is None):
            raise SegmentError("give exactly one of k or threshold")
        if k is None:
            k = k_for_threshold(traj, threshold)
        W, b = classifier_at(traj, k)
        from .pipeline import apply_generator_settings

        gen, params, _ = load_generator(cfg["generator"])
        gen = apply_generator_settings(gen, cfg)
        layers = select_feature_layers(gen.feature_layers(), cfg["channel_budget"])
        if sum(l.channels for l in layers) != W.shape[1]:
            raise SegmentError(
                f"the trajectory's classifier has {W.shape[1]} inputs but the generator's selected layers give "
                f"{sum(l.channels for l in layers)} channels: the generator changed since the run"
            )
        return cls(gen, params, layers, W, b, int(k), cfg)

    def sample(self, num_samples: int, seed: int, batch_size: int = 16, size: Optional[int] = None,
               progress: bool = False):
        """Sample ``num_samples`` images with ``seed`` and label them.

        Latents are ``generator.sample_latents(fold_in(key(seed), 0), N)`` and, for
        conditional generators, class labels from ``fold_in(key(seed), 1)``.

        Returns:
            dict with ``images`` uint8 ``[N,H,W,3]``, ``latents`` float32, ``labels`` int32 ``[N,H,W]``
            (and ``class_labels`` int32 ``[N]`` for conditional generators).
        """
        from tqdm.auto import tqdm

        if num_samples < 1:
            raise SegmentError(f"--num-samples must be >= 1, got {num_samples}")
        gen = self.generator
        key = jax.random.key(seed)
        latents = np.asarray(gen.sample_latents(jax.random.fold_in(key, 0), num_samples), np.float32)
        cls_labels = gen.sample_class_labels(jax.random.fold_in(key, 1), num_samples)
        cls_labels = None if cls_labels is None else np.asarray(cls_labels, np.int32)
        return self.segment_latents(latents, cls_labels, batch_size=batch_size, size=size, progress=progress)

    def segment_latents(self, latents, class_labels=None, batch_size: int = 16, size: Optional[int] = None,
                        progress: bool = False):
        from tqdm.auto import tqdm

        fn = make_segment_fn(self.generator, self.layers, size)
        W, b = jnp.asarray(self.W), jnp.asarray(self.b)
        latents = np.asarray(latents, np.float32)
        n = latents.shape[0]
        imgs, labs = [], []
        for s in tqdm(range(0, n, batch_size), desc=f"segment K={self.k}", disable=not progress, unit="batch"):
            lat = latents[s:s + batch_size]
            cl = None if class_labels is None else np.asarray(class_labels)[s:s + batch_size]
            m = lat.shape[0]
            if m < batch_size:  # one compiled shape
                lat = np.concatenate([lat, np.repeat(lat[-1:], batch_size - m, 0)])
                cl = None if cl is None else np.concatenate([cl, np.repeat(cl[-1:], batch_size - m, 0)])
            img, lab = fn(self.params, lat, cl, W, b)
            imgs.append(to_uint8(np.asarray(img)[:m]))
            labs.append(np.asarray(lab)[:m])
        out = {"images": np.concatenate(imgs), "latents": latents, "labels": np.concatenate(labs).astype(np.int32)}
        if class_labels is not None:
            out["class_labels"] = np.asarray(class_labels, np.int32)
        return out
