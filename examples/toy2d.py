"""Fig. 2 of the KLiSH paper on the 2-D toy: ground truth, K-means (K=3), KLiSH (K=3).

    python examples/toy2d.py --out toy2d.png [--seed 0] [--k0 16]

Runs in well under a minute on one CPU core (mostly compilation) and writes a
three-panel PNG with each method's clusters and linear decision boundaries.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from gansem import sharding
from gansem.cluster import kmeans, klish
from gansem.toy import make_toy2d


def _fit_truth_svm(x, y, mesh, layout):
    from gansem.cluster import svm

    data = sharding.place_rows(x, mesh, layout)
    res = svm.train_ovr_svm(data, data.place(y.astype(np.int32)), np.zeros((3, 2)), np.zeros(3))
    return np.asarray(res.W), np.asarray(res.b)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k0", type=int, default=16, help="initial K-means clusters of KLiSH")
    ap.add_argument("--n", type=int, default=1500, help="number of points")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import adjusted_rand_score

    x, y = make_toy2d(args.seed, n=args.n)
    mesh = sharding.make_mesh(1)
    layout = sharding.plan_rows(len(x), 1, max_chunk_rows=512)
    data = sharding.place_rows(x, mesh, layout)

    km3 = kmeans.kmeans(jax.random.key(args.seed), data, 3, max_iter=100)
    cents = np.asarray(km3.centroids)
    W_km, b_km = (np.asarray(a) for a in klish.linear_init(cents))
    recs = klish.run_klish(jax.random.key(args.seed), data, args.k0)
    rec3 = next(r for r in recs if r.k == 3)
    W_t, b_t = _fit_truth_svm(x, y, mesh, layout)

    panels = [
        ("ground truth (+ SVM on truth)", y, W_t, b_t, None),
        ("K-means, K=3", np.asarray(km3.labels)[: len(x)], W_km, b_km, cents),
        ("KLiSH, K=3", np.argmax(x @ rec3.W.T + rec3.b, axis=1), rec3.W, rec3.b, None),
    ]
    lo, hi = x.min(0) - 1.0, x.max(0) + 1.0
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 400), np.linspace(lo[1], hi[1], 200))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, lab, W, b, c) in zip(axes, panels):
        region = np.argmax(grid @ W.T + b, axis=1).reshape(gx.shape)
        ax.contourf(gx, gy, region, levels=np.arange(-0.5, W.shape[0]), cmap="Pastel1", alpha=0.6)
        ax.contour(gx, gy, region, levels=np.arange(0.5, W.shape[0] - 1), colors="k", linewidths=1.2)
        ax.scatter(x[:, 0], x[:, 1], c=lab, cmap="Set1", s=3, vmin=0, vmax=8)
        if c is not None:
            ax.scatter(c[:, 0], c[:, 1], marker="x", c="k", s=80)
        ari = adjusted_rand_score(y, lab)
        ax.set_title(f"{title}  ARI={ari:.2f}")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
