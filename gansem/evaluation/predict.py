"""Segment evaluation samples with many classifiers at once.

Every method (KLiSH at each K, the baselines) is a
:class:`gansem.cluster.baselines.ClusterClassifier`: affine rows ``W x + b`` on the
generator features upsampled to the label resolution, then an argmax (after a
group-max over rows for KASP). :func:`pack_classifiers` stacks the rows of all of
them (rows shared by several classifiers once), so one pass of the generator scores
every method; per-layer scores are computed at each layer's native resolution and
upsampled (resizing is linear, so this equals scoring the upsampled features).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from ..batching import map_batches
from ..cluster import baselines as bl
from ..features import to_uint8
from ..references.sources import EvaluationError, FileLabels
from ..segment import segment_scores

__all__ = ["pack_classifiers", "predict_program", "iterate_predictions"]


def pack_classifiers(classifiers: Sequence[bl.ClusterClassifier]):
    """Stack the rows of many classifiers (shared row blocks once).

    Returns:
        ``(W_all [R, D] float32, b_all [R] float32, spec)`` with ``spec`` a static tuple of
        ``(start, stop, groups or None, num_clusters)`` per classifier.
    """
    blocks, index, spec = [], {}, []
    start = 0
    for c in classifiers:
        key = id(c.W)
        if key not in index:
            index[key] = start
            blocks.append((c.W, c.b))
            start += c.W.shape[0]
        s = index[key]
        groups = None if c.groups is None else tuple(int(g) for g in c.groups)
        spec.append((s, s + c.W.shape[0], groups, int(c.num_clusters)))
    W = np.concatenate([b[0] for b in blocks]).astype(np.float32)
    bb = np.concatenate([b[1] for b in blocks]).astype(np.float32)
    return W, bb, tuple(spec)


def predict_program(generator, layers, size: int, spec):
    """Traceable ``f(params, W_all, b_all, latents, class_labels) -> (images, preds [B, C, size, size] int32)``."""
    layers = tuple(layers)
    names = tuple(l.name for l in layers)

    def fn(params, W, b, latents, class_labels):
        img, feats = generator.synthesize(params, latents, class_labels, capture=names)
        s = segment_scores(feats, layers, W, b, size)  # [B, size, size, R]
        preds = []
        for start, stop, groups, k in spec:
            sc = s[..., start:stop]
            if groups is not None:
                sc = bl.group_max(sc, np.asarray(groups, np.int32), k)
            preds.append(jnp.argmax(sc, axis=-1).astype(jnp.int32))
        return img, jnp.stack(preds, axis=1)

    return fn


def iterate_predictions(source, gen, params, layers, size, spec, W, b, latents, class_labels, batch_size,
                        progress, desc, mesh=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(images uint8 [B,H,W,3], ref [B,S,S], preds [C,B,S,S])`` batch by batch.

    ``source`` gives the reference labels: a :class:`FileLabels` (its stored images and
    labels) or a callable labeller applied to the generated images.
    """
    prog = predict_program(gen, layers, size, spec)
    for s, e, (img, preds) in map_batches(prog, [latents, class_labels], batch_size=batch_size, mesh=mesh,
                                          bcast_args=(params, jnp.asarray(W), jnp.asarray(b)),
                                          progress=progress, desc=desc):
        img = to_uint8(img)
        preds = np.moveaxis(preds, 1, 0)
        if isinstance(source, FileLabels):
            ref = source.labels[s:e]
            img_show = source.images[s:e]
        else:
            ref = source(img)
            img_show = img
            if ref.shape[1] != size:
                raise EvaluationError(f"labels callable returned {ref.shape[1:]} maps, expected {size}x{size}")
        yield img_show, ref, preds
