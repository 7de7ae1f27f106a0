"""2-D toy data for KLiSH (Fig. 2 of Xu et al.): linearly separable, not centred.

Three clusters, each separable from the union of the others by one line
(binary linear separability, Definition 1 of the paper), whose shapes defeat
the centroid assumption of K-means:

* a long thin band along the bottom (its centroid is far from its ends);
* two arcs (crescents opening downwards) above the band, left and right.

With the true K = 3, K-means splits the long band and attaches its ends to the
arcs (the band's ends are closer to the arcs' centroids than to its own), while
the clusters remain linearly separable.
"""

from __future__ import annotations

import numpy as np

__all__ = ["make_toy2d"]


def make_toy2d(seed: int = 0, n: int = 3000):
    """Sample the toy data set.

    Args:
        seed: numpy seed.
        n: total number of points (half on the band, a quarter on each arc).

    Returns:
        ``(x [n, 2] float32, y [n] int32)`` points and their true clusters
        (0 band, 1 left arc, 2 right arc).
    """
    rng = np.random.default_rng(seed)
    n_band = n // 2
    n_arc = (n - n_band) // 2
    n_arc2 = n - n_band - n_arc
    band = np.stack([rng.uniform(-6.0, 18.0, n_band), rng.uniform(0.0, 0.8, n_band)], 1)

    def arc(cx, m):
        t = rng.uniform(0.15 * np.pi, 0.85 * np.pi, m)
        r = rng.uniform(1.6, 2.4, m)
        return np.stack([cx + r * np.cos(t), 6.0 + r * np.sin(t)], 1)

    x = np.concatenate([band, arc(2.5, n_arc), arc(9.5, n_arc2)]).astype(np.float32)
    y = np.concatenate([np.zeros(n_band), np.ones(n_arc), np.full(n_arc2, 2)]).astype(np.int32)
    perm = rng.permutation(n)
    return x[perm], y[perm]
