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
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .batching import map_batches
from .features import resize_bilinear_align_corners, to_uint8
from .generators.base import FeatureLayer, Generator
from .run import Run, RunError, classifier_at, k_for_threshold

__all__ = [
    "classifier_at",
    "k_for_threshold",
    "segment_scores",
    "segment_program",
    "make_segment_fn",
    "Segmenter",
    "SegmentError",
]

#: Segmentation requests fail for the reasons a run does (K not in the trajectory, φ* never reached, ...);
#: ``classifier_at`` and ``k_for_threshold`` are the run's (:mod:`gansem.run`), re-exported as segmentation API.
SegmentError = RunError


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


def segment_program(generator: Generator, layers: Sequence[FeatureLayer], size: Optional[int] = None):
    """Traceable ``f(params, W, b, latents, class_labels) -> (images [N,H,W,3] float, labels [N,size,size] int32)``."""
    layers = tuple(layers)
    names = tuple(l.name for l in layers)
    size = size or generator.resolution

    def fn(params, W, b, latents, class_labels):
        img, feats = generator.synthesize(params, latents, class_labels, capture=names)
        scores = segment_scores(feats, layers, W, b, size)
        return img, jnp.argmax(scores, axis=-1).astype(jnp.int32)

    return fn


def make_segment_fn(generator: Generator, layers: Sequence[FeatureLayer], size: Optional[int] = None):
    """Jitted ``f(params, latents, class_labels, W, b) -> (images [N,H,W,3] float, labels [N,size,size] int32)``."""
    prog = segment_program(generator, layers, size)
    return jax.jit(lambda params, latents, class_labels, W, b: prog(params, W, b, latents, class_labels))


@dataclasses.dataclass
class Segmenter:
    """A generator plus the KLiSH classifier at one K, ready to label new samples.

    Attributes:
        mesh: split every batch over this mesh's devices (:func:`gansem.batching.map_batches`:
            the same masks on any device count); ``None``: one device.
    """

    generator: Generator
    params: object
    layers: tuple
    W: np.ndarray
    b: np.ndarray
    k: int
    run_config: dict = dataclasses.field(default_factory=dict)
    mesh: object = None

    @classmethod
    def from_run(cls, run: Union[str, Run], k: Optional[int] = None, threshold: Optional[float] = None,
                 mesh=None) -> "Segmenter":
        """The classifier of a run (a directory or an opened :class:`~gansem.run.Run`) at ``k`` or at φ* = ``threshold``."""
        if (k is None) == (threshold is None):
            raise SegmentError("give exactly one of k or threshold")
        if not isinstance(run, Run):
            run = Run.open(run)
        if k is None:
            k = run.k_for_threshold(threshold)
        W, b = run.classifier_at(k)
        return cls(run.generator, run.params, tuple(run.layers), W, b, int(k), run.config, mesh)

    def sample(self, num_samples: int, seed: int, batch_size: int = 16, size: Optional[int] = None,
               progress: bool = False):
        """Sample ``num_samples`` images with ``seed`` and label them.

        Latents are ``generator.sample_latents(fold_in(key(seed), 0), N)`` and, for
        conditional generators, class labels from ``fold_in(key(seed), 1)``.

        Returns:
            dict with ``images`` uint8 ``[N,H,W,3]``, ``latents`` float32, ``labels`` int32 ``[N,H,W]``
            (and ``class_labels`` int32 ``[N]`` for conditional generators).
        """
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
        """Label the samples of ``latents [N, ...]`` (and ``class_labels [N]``); same dict as :meth:`sample`."""
        latents = np.asarray(latents, np.float32)
        cl = None if class_labels is None else np.asarray(class_labels, np.int32)
        imgs, labs = [], []
        for _, _, (img, lab) in map_batches(segment_program(self.generator, self.layers, size), [latents, cl],
                                            batch_size=batch_size, mesh=self.mesh,
                                            bcast_args=(self.params, jnp.asarray(self.W), jnp.asarray(self.b)),
                                            progress=progress, desc=f"segment K={self.k}"):
            imgs.append(to_uint8(img))
            labs.append(lab)
        out = {"images": np.concatenate(imgs), "latents": latents, "labels": np.concatenate(labs).astype(np.int32)}
        if cl is not None:
            out["class_labels"] = cl
        return out
