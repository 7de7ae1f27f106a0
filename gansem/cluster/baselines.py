"""The clustering baselines of the KLiSH paper (Sec. 4.1, Tab. 4), as classifiers of new pixels.

Every method ends in a :class:`ClusterClassifier`: ``R`` affine scores
``s_r(x) = W_r · x + b_r`` and a map ``groups[r]`` of rows to clusters; the score
of cluster k is the max over its rows and a pixel's cluster is the argmax. With
one row per cluster (``groups = None``) it is a linear classifier, exactly the
form of a KLiSH trajectory entry, so baselines segment new samples the same way
KLiSH does (per-layer scores upsampled, :func:`gansem.segment.segment_scores`).

* **K-means, Euclidean** -- nearest centroid: ``w_k = c_k``, ``b_k = -½‖c_k‖²``
  (``argmin ‖x - c‖² = argmax c·x - ½‖c‖²``).
* **K-means, arccos** (spherical, on L2-normalised features) -- ``argmax cos(x, c)
  = argmax c·x / ‖c‖`` for any ``x ≠ 0``: ``w_k = c_k / ‖c_k‖``, ``b_k = 0``.
* **AHC** (ward on Euclidean features, or average linkage on cosine distances of
  L2-normalised features) with scikit-learn on a pixel subsample, as the paper
  (it used 16 images at 64×64), then a **linear read-out** trained on the AHC
  labels of the subsample with cross-entropy (softmax regression, full-batch
  L-BFGS, :func:`train_softmax_regression`) so that new pixels can be segmented.
  The cosine variant's read-out has no bias and is trained on normalised
  features, so it is a linear classifier of the raw features too.
* **KASP** (Yan et al. 2009, as the paper's ``script/cluster_kasp.py``): K-means
  with K0 centroids, then ``SpectralClustering(affinity="nearest_neighbors",
  n_neighbors=3, assign_labels="discretize")`` of the centroids into K groups; a
  pixel goes to the group of its nearest centroid, i.e. the max over the group's
  nearest-centroid scores -- a piecewise-linear classifier (``groups`` set).

Rows on devices travel as a :class:`gansem.sharding.RowData`; the read-out's loss
and gradient are row sums over it (any device count, any number of processes: only
replicated parameters come back to the host). Its L-BFGS is the library's one
adapter, :func:`gansem.cluster.optim.lbfgs_minimize`.

scikit-learn is an optional dependency (``pip install -e .[eval]``), imported
only by AHC and KASP.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gansem import sharding
from gansem.cluster import kmeans as km
from gansem.cluster import optim

__all__ = [
    "ClusterClassifier",
    "linear_classifier",
    "kmeans_classifier",
    "fit_kmeans",
    "kasp_groups",
    "fit_kasp",
    "cut_tree",
    "ahc_labels",
    "fit_ahc",
    "ReadoutResult",
    "train_softmax_regression",
    "require_sklearn",
]

_EPS = 1e-12


def require_sklearn():
    """Import scikit-learn or explain how to install it."""
    try:
        import sklearn  # noqa: F401  (optional dependency: imported only when a baseline needs it)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the AHC and KASP baselines use scikit-learn, an optional dependency of gansem; "
            "install it with `pip install -e .[eval]` (or `pip install scikit-learn`), "
            "or leave ahc/ahc-cosine/kasp out of --baselines"
        ) from e
    import sklearn

    return sklearn


class ClusterClassifier(NamedTuple):
    """Max-of-affine cluster classifier: ``cluster(x) = argmax_k max_{r: groups[r] = k} W_r·x + b_r``.

    Attributes:
        W: ``[R, D] float32`` rows.
        b: ``[R] float32`` offsets.
        groups: ``[R] int32`` cluster of each row, or ``None`` for one row per cluster
            (a linear classifier, ``R = K``).
        num_clusters: K.
    """

    W: np.ndarray
    b: np.ndarray
    groups: Optional[np.ndarray]
    num_clusters: int

    @property
    def is_linear(self) -> bool:
        return self.groups is None

    def row_scores(self, x):
        """``x: [..., D]`` → affine scores ``[..., R]``."""
        return jnp.einsum("...d,rd->...r", jnp.asarray(x, jnp.float32), jnp.asarray(self.W),
                          precision=jax.lax.Precision.HIGHEST) + jnp.asarray(self.b)

    def group_max(self, row_scores):
        """``[..., R]`` affine scores → cluster scores ``[..., K]`` (max over each cluster's rows)."""
        if self.groups is None:
            return row_scores
        return group_max(row_scores, self.groups, self.num_clusters)

    def scores(self, x):
        """``x: [..., D]`` → cluster scores ``[..., K]``."""
        return self.group_max(self.row_scores(x))

    def predict(self, x):
        """``x: [..., D]`` → cluster ids ``[...]`` int32."""
        return jnp.argmax(self.scores(x), axis=-1).astype(jnp.int32)


def group_max(row_scores, groups, num_clusters: int):
    """``[..., R]`` → ``[..., K]``: max over the rows of each group (empty groups score -inf)."""
    moved = jnp.moveaxis(row_scores, -1, 0)  # [R, ...]
    out = jax.ops.segment_max(moved, jnp.asarray(groups, jnp.int32), num_segments=int(num_clusters))
    return jnp.moveaxis(out, 0, -1)


def linear_classifier(W, b) -> ClusterClassifier:
    """A linear classifier ``argmax W·x + b`` (e.g. a KLiSH trajectory entry)."""
    W = np.asarray(W, np.float32)
    b = np.asarray(b, np.float32)
    if W.ndim != 2 or b.shape != (W.shape[0],):
        raise ValueError(f"W must be [K, D] and b [K], got {W.shape} and {b.shape}")
    return ClusterClassifier(W, b, None, int(W.shape[0]))


def kmeans_classifier(centroids, metric: str = "euclidean", groups=None, num_clusters=None) -> ClusterClassifier:
    """Nearest-centroid classifier of K-means centroids ``[K, D]`` as affine rows.

    ``euclidean``: ``w = c``, ``b = -½‖c‖²``. ``cosine`` (arccos / spherical K-means):
    ``w = c / ‖c‖``, ``b = 0``. With ``groups`` (``[K]`` → cluster), a KASP-style
    piecewise-linear classifier of ``num_clusters`` clusters.
    """
    c = np.asarray(centroids, np.float64)
    if metric == "euclidean":
        W, b = c, -0.5 * np.sum(c * c, axis=1)
    elif metric == "cosine":
        W, b = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), _EPS), np.zeros(c.shape[0])
    else:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if groups is None:
        return linear_classifier(W, b)
    groups = np.asarray(groups, np.int32)
    if groups.shape != (c.shape[0],):
        raise ValueError(f"groups must be [K0]={c.shape[0]}, got {groups.shape}")
    k = int(groups.max()) + 1 if num_clusters is None else int(num_clusters)
    return ClusterClassifier(W.astype(np.float32), b.astype(np.float32), groups, k)


def fit_kmeans(key, data: sharding.RowData, k: int, *, metric: str = "euclidean", max_iter: int = 20,
               tol: float = 1e-4):
    """K-means++ and Lloyd (:func:`gansem.cluster.kmeans.kmeans`) → ``(ClusterClassifier, KMeansResult)``. Host-level.

    Args:
        key: PRNG key.
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        k: number of clusters.
        metric: ``"euclidean"`` or ``"cosine"`` (the paper's arccos K-means).
    """
    res = km.kmeans(key, data, k, max_iter=max_iter, tol=tol, metric=metric)
    return kmeans_classifier(np.asarray(res.centroids), metric), res


# -- KASP --------------------------------------------------------------------------------


def kasp_groups(centroids, k: int, *, n_neighbors: int = 3, seed: int = 0) -> np.ndarray:
    """Spectral clustering of K-means centroids into ``k`` groups (KASP, as the paper's script).

    ``sklearn.cluster.SpectralClustering(k, affinity="nearest_neighbors",
    n_neighbors=n_neighbors, assign_labels="discretize", random_state=seed)``.

    Args:
        centroids: ``[K0, D]``.
        k: number of groups (``2 <= k <= K0``).

    Returns:
        ``[K0] int32`` group of each centroid, in ``0..k-1``.
    """
    require_sklearn()
    from sklearn.cluster import SpectralClustering  # optional dependency

    c = np.asarray(centroids, np.float64)
    if not 1 <= k <= c.shape[0]:
        raise ValueError(f"KASP: K={k} groups need at least K centroids, got K0={c.shape[0]}; raise --kasp-k0")
    if k == c.shape[0]:
        return np.arange(k, dtype=np.int32)
    if k == 1:
        return np.zeros(c.shape[0], np.int32)
    sc = SpectralClustering(n_clusters=int(k), affinity="nearest_neighbors", n_neighbors=int(min(n_neighbors, c.shape[0] - 1)),
                            assign_labels="discretize", random_state=int(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        lab = sc.fit_predict(c)
    # Renumber 0..k'-1 (discretize may leave a group empty).
    _, lab = np.unique(lab, return_inverse=True)
    return lab.astype(np.int32)


def fit_kasp(centroids, ks: Sequence[int], *, metric: str = "euclidean", n_neighbors: int = 3,
             seed: int = 0) -> dict:
    """KASP classifiers for every K in ``ks`` from one set of K-means centroids.

    Returns:
        ``{k: ClusterClassifier}``; all share the same rows (the centroids'
        nearest-centroid scores), only ``groups`` differ. A group left empty by
        the discretisation makes that classifier have fewer than k clusters
        (``num_clusters`` says how many).
    """
    out = {}
    base = kmeans_classifier(centroids, metric)
    for k in ks:
        g = kasp_groups(centroids, int(k), n_neighbors=n_neighbors, seed=seed)
        out[int(k)] = ClusterClassifier(base.W, base.b, g, int(g.max()) + 1)
    return out


# -- AHC ---------------------------------------------------------------------------------


def cut_tree(children, n_samples: int, k: int) -> np.ndarray:
    """Flat labels of an agglomerative merge tree cut at ``k`` clusters.

    Args:
        children: ``[n_samples - 1, 2]`` merges in order (scikit-learn's ``children_``:
            node ``i < n_samples`` is a sample, node ``n_samples + j`` the j-th merge).
        n_samples: number of leaves.
        k: clusters wanted (the state after ``n_samples - k`` merges).

    Returns:
        ``[n_samples] int64`` labels in ``0..k-1`` numbered by first appearance.
    """
    children = np.asarray(children, np.int64)
    if not 1 <= k <= n_samples:
        raise ValueError(f"cannot cut {n_samples} samples into {k} clusters")
    parent = np.arange(2 * n_samples - 1)
    for j in range(n_samples - k):
        a, b = children[j]
        parent[a] = parent[b] = n_samples + j
    root = parent.copy()
    # Compress: follow parents to the top node that exists after the cut.
    for _ in range(64):
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    else:  # pragma: no cover - trees deeper than 2**64 do not exist
        raise RuntimeError("tree compression did not converge")
    _, first, lab = np.unique(root[:n_samples], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[lab].astype(np.int64)


def ahc_labels(x, ks: Sequence[int], *, linkage: str = "ward") -> dict:
    """Agglomerative clustering of ``x`` (one full tree), cut at every K in ``ks``.

    Args:
        x: ``[n, D]`` host features (a subsample: memory and time grow as n²).
        ks: cluster counts.
        linkage: ``"ward"`` (Euclidean) or ``"average-cosine"`` (average linkage on
            cosine distances of L2-normalised features, the paper's "arccos" AHC).

    Returns:
        ``{k: [n] int64 labels}``, equal to ``AgglomerativeClustering(n_clusters=k, ...)``'s
        up to label order.
    """
    require_sklearn()
    from sklearn.cluster import AgglomerativeClustering  # optional dependency

    x = np.asarray(x, np.float64)
    if linkage == "ward":
        model = AgglomerativeClustering(n_clusters=1, linkage="ward", compute_full_tree=True)
    elif linkage == "average-cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        model = AgglomerativeClustering(n_clusters=1, linkage="average", metric="cosine", compute_full_tree=True)
    else:
        raise ValueError(f"linkage must be 'ward' or 'average-cosine', got {linkage!r}")
    for k in ks:
        if not 1 <= int(k) <= x.shape[0]:
            raise ValueError(f"AHC: K={k} is more than the {x.shape[0]} subsampled pixels; raise --ahc-samples")
    model.fit(x)
    return {int(k): cut_tree(model.children_, x.shape[0], int(k)) for k in ks}


class ReadoutResult(NamedTuple):
    """Output of :func:`train_softmax_regression`.

    Attributes:
        W: ``[K, D] float32`` weights on the raw features.
        b: ``[K] float32`` biases (zeros when trained without bias).
        loss: ``()`` final objective (mean cross-entropy + ½ l2 ‖W̃‖² in standardised units).
        n_iter: L-BFGS iterations run.
        converged: gradient norm fell below ``tol`` before ``max_iter``.
        accuracy: training accuracy of ``argmax`` (valid rows).
    """

    W: np.ndarray
    b: np.ndarray
    loss: float
    n_iter: int
    converged: bool
    accuracy: float


def _moments_chunk(xc, vc):
    return jnp.sum(xc * vc[:, None], 0), jnp.sum(xc * xc * vc[:, None], 0), jnp.sum(vc)


@jax.jit
def _moments(data):
    """Per-feature sums and sums of squares over the valid rows, and their count (replicated)."""
    return sharding.row_reduce(_moments_chunk, data.mesh, data.layout, (data.x, data.valid))


def _ce_chunk(xc, vc, lc, W, b, mu, inv_sd, normalize):
    """Sum of cross-entropies over one chunk and its gradient wrt (W, b), in standardised units."""

    def loss(params):
        Wt, bt = params
        z = _standardise(xc, mu, inv_sd, normalize)
        s = z @ Wt.T + bt  # [n, K]
        logp = jax.nn.log_softmax(s, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.clip(lc, 0, Wt.shape[0] - 1)[:, None], axis=-1)[:, 0]
        return jnp.sum(nll * vc)

    val, (gW, gb) = jax.value_and_grad(loss)((W, b))
    return val, gW, gb


def _standardise(xc, mu, inv_sd, normalize):
    if normalize:
        return xc / jnp.maximum(jnp.linalg.norm(xc, axis=-1, keepdims=True), _EPS)
    return (xc - mu) * inv_sd


@functools.partial(jax.jit, static_argnames=("normalize", "bias", "max_iter"))
def _fit_readout(data, labels, W0, b0, mu, inv_sd, l2, tol, *, normalize, bias, max_iter):
    mesh, layout, rows = data.mesh, data.layout, (data.x, data.valid, labels)
    n = sharding.row_reduce(lambda v: jnp.sum(v), mesh, layout, (data.valid,))

    def fun(params):
        W, b = params
        val, gW, gb = sharding.row_reduce(
            lambda xc, vc, lc, W, b, mu, s: _ce_chunk(xc, vc, lc, W, b, mu, s, normalize),
            mesh, layout, rows, (W, b, mu, inv_sd))
        f = val / n + 0.5 * l2 * jnp.sum(W * W)
        gW = gW / n + l2 * W
        gb = gb / n if bias else jnp.zeros_like(gb)
        return (f, jnp.sqrt(jnp.sum(gW * gW) + jnp.sum(gb * gb))), (gW, gb)

    res = optim.lbfgs_minimize(fun, (W0, b0), stop_fn=lambda old, new, gnorm: gnorm <= tol, max_iter=max_iter,
                               history_size=10, min_iter=1, guarded=False)
    W, b = res.params
    correct = sharding.row_reduce(
        lambda xc, vc, lc, W, b: jnp.sum((jnp.argmax(_standardise(xc, mu, inv_sd, normalize) @ W.T + b, -1) == lc)
                                         * vc),
        mesh, layout, rows, (W, b))
    return W, b, res.value, res.n_iter, res.aux, correct / n


def train_softmax_regression(data: sharding.RowData, labels, num_classes: int, *, bias: bool = True,
                             normalize_rows: bool = False, l2: float = 1e-4, tol: float = 1e-4,
                             max_iter: int = 500, init: Optional[tuple] = None) -> ReadoutResult:
    """Linear softmax classifier (multinomial logistic regression) by full-batch L-BFGS. Host-level driver.

    Minimises ``mean_i CE(softmax(W̃ z_i + b̃), y_i) + ½ l2 ‖W̃‖²`` over the valid
    rows, where ``z`` are the features standardised per dimension (mean/std of the
    valid rows; or, with ``normalize_rows``, divided by their L2 norm) and the
    result is mapped back to the raw features: ``W = W̃ / sd``, ``b = b̃ - W·mu``.
    This is the linear read-out of the AHC baseline and the LSE of the
    separability experiment (Sec. 4.2; the paper trains it with Adam, lr 1e-3,
    for one epoch -- we solve the same objective to convergence with L-BFGS,
    :func:`gansem.cluster.optim.lbfgs_minimize`, stopping when the gradient norm is at
    most ``tol``). Loss and gradient are row sums through
    :func:`gansem.sharding.row_reduce` (any device count, bounded memory).

    Args:
        data: rows ``x [N_pad, D]`` and mask ``valid`` (:class:`gansem.sharding.RowData`).
        labels: ``[N_pad] int32`` row-sharded classes in ``0..num_classes-1``.
        num_classes: K.
        bias: learn ``b`` (False: ``b = 0``, with ``normalize_rows`` this makes the
            classifier ``argmax W·x`` independent of the feature norm).
        normalize_rows: train on L2-normalised features (cosine variants).
        l2: weight decay in standardised units (keeps separable problems bounded).
        tol: L-BFGS stops when the gradient norm is below this.
        max_iter: iteration cap (hitting it: ``converged=False``).
        init: optional ``(W0 [K, D], b0 [K])`` in *standardised* units.

    Returns:
        :class:`ReadoutResult` on the raw features.
    """
    if normalize_rows and bias:
        raise ValueError("normalize_rows=True needs bias=False (otherwise the classifier depends on the feature norm)")
    d = data.x.shape[1]
    s1, s2, n = _moments(data)
    n = jnp.maximum(n, 1.0)
    mu = s1 / n
    sd = jnp.sqrt(jnp.maximum(s2 / n - mu * mu, 0.0))
    inv_sd = 1.0 / jnp.maximum(sd, 1e-6 * jnp.maximum(jnp.max(sd), _EPS))
    if normalize_rows:
        mu, inv_sd = jnp.zeros_like(mu), jnp.ones_like(inv_sd)
    if init is None:
        W0, b0 = jnp.zeros((num_classes, d), jnp.float32), jnp.zeros((num_classes,), jnp.float32)
    else:
        W0, b0 = jnp.asarray(init[0], jnp.float32), jnp.asarray(init[1], jnp.float32)
        if not bias:
            b0 = jnp.zeros_like(b0)
    W, b, loss, it, err, acc = _fit_readout(
        data, jnp.asarray(labels, jnp.int32), W0, b0, mu, inv_sd, jnp.float32(l2), jnp.float32(tol),
        normalize=bool(normalize_rows), bias=bool(bias), max_iter=int(max_iter))
    W_raw = np.asarray(W * inv_sd[None, :], np.float32)
    b_raw = np.asarray(b - W_raw @ np.asarray(mu), np.float32) if not normalize_rows else np.zeros(num_classes, np.float32)
    return ReadoutResult(W_raw, b_raw, float(loss), int(it), bool(float(err) <= tol), float(acc))


def fit_ahc(x, ks: Sequence[int], *, linkage: str = "ward", mesh=None, l2: float = 1e-4, tol: float = 1e-4,
            max_iter: int = 500) -> dict:
    """AHC on a pixel subsample and a cross-entropy linear read-out per K.

    The read-out for K starts from the AHC centroids (``w = c``, ``b = -½‖c‖²`` in
    standardised units for ward; ``w = c/‖c‖`` for the cosine variant) and is
    trained on the subsample's AHC labels with :func:`train_softmax_regression`.

    Args:
        x: ``[n, D]`` host features of the subsample.
        ks: numbers of clusters.
        linkage: ``"ward"`` or ``"average-cosine"``.
        mesh: mesh for the read-out (default: one device).

    Returns:
        ``{k: (ClusterClassifier, ahc_labels [n] int64, ReadoutResult)}``.
    """
    x = np.asarray(x, np.float32)
    labels = ahc_labels(x, ks, linkage=linkage)
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    data = sharding.place_rows(x, mesh)
    cosine = linkage == "average-cosine"
    if cosine:
        z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
    else:
        z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6 * max(float(x.std(0).max()), _EPS))
    out = {}
    for k, lab in labels.items():
        c = np.stack([z[lab == j].mean(0) for j in range(k)])
        if cosine:
            W0, b0 = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), _EPS), np.zeros(k)
        else:
            W0, b0 = c, -0.5 * np.sum(c * c, axis=1)
        r = train_softmax_regression(data, data.place(lab.astype(np.int32)), k, bias=not cosine,
                                     normalize_rows=cosine, l2=l2, tol=tol, max_iter=max_iter, init=(W0, b0))
        out[int(k)] = (linear_classifier(r.W, r.b), lab, r)
    return out
