"""Image-level clusters of a generator's intermediate representation ``G_[n](z)``, and their hierarchy.

Cluster-guided synthesis (seed paper 002, Sec. 3.2, Fig. 1 a-b): latent codes are pushed
through the first ``n`` layers of the generator and the representations are clustered
with K-means into ``C`` clusters; since ``z -> G_[n](z)`` is deterministic, each latent
code gets a cluster. One representation is one image: the layer's feature map
``[h, w, C_n]`` flattened (the paper's setting, ``pool=0``), or first average-pooled to
``pool × pool`` cells (``pool=1``: the channel means) when the flattened map is too wide.

Hierarchical clusters (Sec. 4.3, Fig. 4): a cluster of one level is refined at a later
layer by clustering again only the latents that fall in it. A clustering is a tuple of
:class:`ClusterLevel`; level ``i > 0`` refines cluster ``parent`` of level ``i - 1``, and
the clusters of the last level are the ones sampled from. A latent belongs to leaf cluster
``c`` when it follows the path (level-``i`` cluster = level ``i + 1``'s ``parent`` for every
level) and lands in ``c`` at the last level (:func:`leaf_labels`).

K-means runs on the sharded engine (:func:`gansem.cluster.kmeans.kmeans` over a
:class:`gansem.sharding.RowData`); representations are computed batch by batch, split over
the mesh's devices (:func:`gansem.batching.map_batches`), and XLA drops every generator layer
after ``n``, so clustering an early layer costs a fraction of a full forward pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding
from ..batching import map_batches
from ..cluster import kmeans as km
from ..generators.base import Generator, GeneratorError

__all__ = [
    "ClusterLevel",
    "LevelSpec",
    "representation_program",
    "layer_representations",
    "representation_dim",
    "kmeans_clusters",
    "fit_cluster_levels",
    "assign_levels",
    "leaf_labels",
    "hierarchy_description",
]


class LevelSpec(NamedTuple):
    """How to build one level: cluster ``layer`` (pooled to ``pool``; 0 = flattened) into ``num_clusters``.

    ``parent``: the cluster of the previous level this level refines (-1 for the first level).
    """

    layer: str
    num_clusters: int
    pool: int = 0
    parent: int = -1


class ClusterLevel(NamedTuple):
    """One fitted level: its spec and the K-means centroids ``[num_clusters, D] float32``."""

    layer: str
    pool: int
    parent: int
    centroids: np.ndarray


def _pool(x, pool: int):
    """``x [N, h, w, C]`` -> ``[N, D]``: flattened (``pool=0``) or averaged over ``pool × pool`` cells first."""
    n, h, w, c = x.shape
    if pool:
        x = x.reshape(n, pool, h // pool, pool, w // pool, c).mean(axis=(2, 4))
    return x.reshape(n, -1)


def _check_layer(generator: Generator, layer: str, pool: int):
    known = {l.name: l for l in generator.feature_layers()}
    if layer not in known:
        raise GeneratorError(f"{generator.family}: no layer {layer!r}; layers: {', '.join(known)}")
    res = known[layer].resolution
    if pool < 0 or (pool and res % pool):
        raise ValueError(f"pool={pool} must be 0 (flatten) or divide {layer}'s resolution {res}")
    return known[layer]


def representation_dim(generator: Generator, layer: str, pool: int = 0) -> int:
    """Length D of one representation of ``layer`` (``h·w·C`` flattened, ``pool²·C`` pooled)."""
    fl = _check_layer(generator, layer, pool)
    cells = pool or fl.resolution
    return cells * cells * fl.channels


def representation_program(generator: Generator, layer: str, pool: int = 0):
    """Traceable ``f(params, latents [N, ...], class_labels [N] | None) -> G_[n](z) [N, D] float32``."""
    _check_layer(generator, layer, pool)

    def rep(params, latents, class_labels=None):
        return _pool(generator.synthesize(params, latents, class_labels, capture=(layer,))[1][layer], pool)

    return rep


def layer_representations(generator: Generator, params, latents, class_labels=None, *, layer: str, pool: int = 0,
                          batch_size: int = 256, mesh=None, progress: bool = False) -> np.ndarray:
    """``G_[n](z)`` of many latents as a host array ``[N, D] float32`` (batches split over ``mesh``)."""
    out = np.empty((len(latents), representation_dim(generator, layer, pool)), np.float32)
    for a, b, r in map_batches(representation_program(generator, layer, pool),
                               [np.asarray(latents), None if class_labels is None else np.asarray(class_labels)],
                               batch_size=batch_size, mesh=mesh, bcast_args=(params,), progress=progress,
                               desc=f"G_[{layer}](z)"):
        out[a:b] = r
    return out


def kmeans_clusters(key, reps, num_clusters: int, *, mesh=None, max_iter: int = 50):
    """K-means on representations with the sharded engine.

    Args:
        key: PRNG key of the K-means++ seeding.
        reps: ``[N, D]`` host array.
        mesh: the rows are sharded over it (default: one device).

    Returns:
        ``(centroids [C, D] float32, labels [N] int32, info)``; ``info`` holds the Lloyd
        iterations, the converged flag and the inertia.
    """
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    data = sharding.place_rows(np.asarray(reps, np.float32), mesh)
    res = km.kmeans(key, data, int(num_clusters), max_iter=int(max_iter))
    labels = np.asarray(res.labels)[: data.num_rows].astype(np.int32)
    info = {"n_iter": int(res.n_iter), "converged": bool(res.converged), "inertia": float(res.inertia)}
    return np.asarray(res.centroids, np.float32), labels, info


def fit_cluster_levels(key, generator: Generator, params, latents, class_labels=None, *,
                       specs: Sequence[LevelSpec], batch_size: int = 256, mesh=None, max_iter: int = 50,
                       progress: bool = False):
    """Fit a (possibly hierarchical) clustering of latents by their representations (Sec. 3.2, 4.3).

    Args:
        key: PRNG key; level ``i`` seeds K-means with ``fold_in(key, i)``.
        latents: ``[N, *latent_shape]``; ``class_labels [N]`` or ``None``.
        specs: the levels, first to last; level ``i > 0`` clusters only the latents on the
            path to its ``parent`` (at a later layer, as the paper does).

    Returns:
        ``(levels, labels, infos)``: a tuple of :class:`ClusterLevel`, ``labels [N, L] int32``
        (a latent's cluster at each level, -1 where it left the path) and K-means info per level.

    Raises:
        ValueError: a parent that does not exist, or fewer latents on a path than clusters.
    """
    latents = np.asarray(latents)
    n = len(latents)
    on_path = np.ones(n, bool)
    labels = np.full((n, len(specs)), -1, np.int32)
    levels, infos = [], []
    for i, spec in enumerate(specs):
        if i == 0 and spec.parent != -1:
            raise ValueError("the first level has no parent (parent=-1)")
        if i > 0:
            prev_c = len(levels[-1].centroids)
            if not 0 <= spec.parent < prev_c:
                raise ValueError(f"level {i} refines cluster {spec.parent}, but level {i - 1} has clusters "
                                 f"0..{prev_c - 1}")
            on_path &= labels[:, i - 1] == spec.parent
        rows = np.flatnonzero(on_path)
        if len(rows) < spec.num_clusters:
            raise ValueError(f"level {i} ({spec.layer}) has {len(rows)} latents on its path, fewer than its "
                             f"{spec.num_clusters} clusters; sample more latents")
        reps = layer_representations(generator, params, latents[rows],
                                     None if class_labels is None else np.asarray(class_labels)[rows],
                                     layer=spec.layer, pool=spec.pool, batch_size=batch_size, mesh=mesh,
                                     progress=progress)
        centroids, lab, info = kmeans_clusters(jax.random.fold_in(key, i), reps, spec.num_clusters, mesh=mesh,
                                               max_iter=max_iter)
        labels[rows, i] = lab
        levels.append(ClusterLevel(layer=spec.layer, pool=int(spec.pool), parent=int(spec.parent),
                                   centroids=centroids))
        infos.append({"layer": spec.layer, "latents": len(rows), **info,
                      "sizes": np.bincount(lab, minlength=spec.num_clusters).tolist()})
    return tuple(levels), labels, infos


def assign_levels(generator: Generator, params, latents, class_labels=None, *, levels: Sequence[ClusterLevel],
                  batch_size: int = 256, mesh=None) -> np.ndarray:
    """The nearest centroid of new latents at every level: ``labels [N, L] int32`` (no path rule applied).

    The representation and its assignment run in one program per level, so the ``[N, D]``
    representations never reach the host.
    """
    latents = np.asarray(latents)
    cl = None if class_labels is None else np.asarray(class_labels)
    out = np.empty((len(latents), len(levels)), np.int32)
    for i, lv in enumerate(levels):
        fn = _assign_program(generator, lv.layer, lv.pool)
        for a, b, lab in map_batches(fn, [latents, cl], batch_size=batch_size, mesh=mesh,
                                     bcast_args=(params, jnp.asarray(lv.centroids))):
            out[a:b, i] = lab
    return out


@functools.lru_cache(maxsize=16)
def _assign_program(generator: Generator, layer: str, pool: int):
    rep = representation_program(generator, layer, pool)

    def fn(params, centroids, latents, class_labels=None):
        x = rep(params, latents, class_labels)
        d = jnp.sum(centroids * centroids, -1)[None] - 2.0 * jnp.dot(x, centroids.T,
                                                                     precision=jax.lax.Precision.HIGHEST)
        return jnp.argmin(d, axis=1).astype(jnp.int32)  # |x|² is the same for every centroid

    return fn


def leaf_labels(labels, levels: Sequence[ClusterLevel]) -> np.ndarray:
    """Leaf cluster of each latent from its per-level labels ``[N, L]``: ``[N] int32``, -1 off the path."""
    labels = np.asarray(labels)
    ok = np.ones(len(labels), bool)
    for i in range(1, len(levels)):
        ok &= labels[:, i - 1] == levels[i].parent
    return np.where(ok, labels[:, -1], -1).astype(np.int32)


def hierarchy_description(levels: Optional[Sequence[ClusterLevel]]) -> str:
    """``"block4 (C=2) > cluster 1 > block16 (C=3)"``: the path of a clustering, for reports."""
    parts = []
    for i, lv in enumerate(levels or ()):
        if i:
            parts.append(f"cluster {lv.parent}")
        parts.append(f"{lv.layer}{'' if not lv.pool else f'/pool{lv.pool}'} (C={len(lv.centroids)})")
    return " > ".join(parts)
