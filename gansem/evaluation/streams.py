"""Evaluation samples: PRNG streams disjoint from a run's clustering samples.

A run draws its latents from ``fold_in(key(seed), 0)`` (class labels ``1``,
K-means ``2``). Evaluation samples come from
``fold_in(fold_in(key(eval_seed), EVAL_STREAM), j)`` with ``EVAL_STREAM =
1_000_003``: ``j = 0`` (latents) / ``1`` (class labels) for evaluation samples and
``j = 2 / 3`` for the training samples of the separability experiment, ``j = 4 / 5``
for the images that name the clusters of a UFGS segmenter (cluster → class matching)
and ``j = 6 / 7`` for the UFGS test images (:mod:`gansem.ufgs.labelled`). The
derivation paths differ, so the streams are independent whatever ``eval_seed`` is;
:func:`evaluation_latents` also checks that no evaluation latent equals a
clustering latent and raises otherwise.
"""

from __future__ import annotations

import jax
import numpy as np

from ..references.sources import EvaluationError

__all__ = ["EVAL_STREAM", "STREAM_PARTS", "evaluation_latents", "count_overlap", "stream_key"]

#: Stream offset of evaluation samples (see module docstring).
EVAL_STREAM = 1_000_003
#: Stream part ``j`` of each kind of evaluation sample (latents; class labels use ``j + 1``).
STREAM_PARTS = {"eval": 0, "train": 2, "ufgs-match": 4, "ufgs-test": 6}


def stream_key(seed: int, j: int):
    """``fold_in(fold_in(key(seed), EVAL_STREAM), j)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seed)), EVAL_STREAM), j)


def evaluation_latents(gen, seed: int, n: int, *, training_latents=None, part: str = "eval"):
    """Latents (and class labels) of the evaluation stream, disjoint from the clustering samples.

    Args:
        gen: the generator.
        seed: evaluation seed (the run's seed by default in :func:`evaluate_run`).
        n: number of samples.
        training_latents: the run's ``latents.npy``; if any sampled latent equals one of
            them exactly, raise (cannot happen with distinct PRNG streams; checked anyway).
        part: ``"eval"`` (stream parts 0/1), ``"train"`` (parts 2/3, separability training set),
            ``"ufgs-match"`` (4/5, UFGS matching images) or ``"ufgs-test"`` (6/7, UFGS test images).

    Returns:
        ``(latents [n, ...] float32, class_labels [n] int32 or None)``.
    """
    if part not in STREAM_PARTS:
        raise EvaluationError(f"unknown evaluation stream part {part!r}; choose from {', '.join(STREAM_PARTS)}")
    j = STREAM_PARTS[part]
    lat = np.asarray(gen.sample_latents(stream_key(seed, j), n), np.float32)
    cl = gen.sample_class_labels(stream_key(seed, j + 1), n)
    cl = None if cl is None else np.asarray(cl, np.int32)
    if training_latents is not None:
        overlap = count_overlap(lat, training_latents)
        if overlap:
            raise EvaluationError(f"{overlap} evaluation latents equal clustering latents; use another --eval-seed")
    return lat, cl


def count_overlap(a, b) -> int:
    """Number of rows of ``a`` that also occur (bit-exactly) in ``b``."""
    a = np.ascontiguousarray(np.asarray(a, np.float32).reshape(len(a), -1))
    b = np.ascontiguousarray(np.asarray(b, np.float32).reshape(len(b), -1))
    if a.shape[1] != b.shape[1]:
        return 0
    sb = {r.tobytes() for r in b}
    return int(sum(r.tobytes() in sb for r in a))

