"""The 2-D toy of Fig. 2: KLiSH recovers linearly separable, non-centred clusters; K-means does not."""

import os
import re

_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.cluster import kmeans, klish  # noqa: E402
from gansem.toy import make_toy2d  # noqa: E402

metrics = pytest.importorskip("sklearn.metrics")
sk_cluster = pytest.importorskip("sklearn.cluster")
sk_svm = pytest.importorskip("sklearn.svm")


def test_toy_is_linearly_separable_one_vs_rest():
    x, y = make_toy2d(0, n=1500)
    for k in range(3):
        clf = sk_svm.LinearSVC(C=100.0, max_iter=100000).fit(x, y == k)
        assert clf.score(x, y == k) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_klish_beats_kmeans_on_toy(seed):
    x, y = make_toy2d(seed, n=1500)
    mesh = sharding.make_mesh(1)
    layout = sharding.plan_rows(len(x), 1, max_chunk_rows=512)
    xs, valid = sharding.shard_rows(x, mesh, multiple=layout.padded_rows)
    km3 = kmeans.kmeans(jax.random.key(seed), sharding.RowData(xs, valid, layout, mesh), 3, max_iter=100)
    ari_km = metrics.adjusted_rand_score(y, np.asarray(km3.labels)[: len(x)])
    ari_sk = metrics.adjusted_rand_score(y, sk_cluster.KMeans(3, n_init=10, random_state=seed).fit(x).labels_)
    recs = klish.run_klish(jax.random.key(seed), xs, valid, 16, mesh=mesh, layout=layout)
    rec3 = next(r for r in recs if r.k == 3)
    pred = np.argmax(x @ rec3.W.T + rec3.b, axis=1)
    ari_klish = metrics.adjusted_rand_score(y, pred)
    assert ari_km < 0.7 and ari_sk < 0.7
    assert ari_klish > 0.9
