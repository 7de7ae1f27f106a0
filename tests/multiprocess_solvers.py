"""One process of a multi-process run of the solvers (K-means, SVM, softmax read-out) on CPU.

    python tests/multiprocess_solvers.py OUT.npz --process-id I --num-processes P --port PORT --devices D

starts JAX with ``D`` CPU devices in this process, joins a ``P``-process
``jax.distributed`` group on ``127.0.0.1:PORT`` (gloo collectives; ``P = 1``: no
group), places the same synthetic rows on the global mesh (each process builds
only its own shards) and runs :func:`gansem.cluster.kmeans.kmeans`,
:func:`gansem.cluster.svm.train_ovr_svm` and
:func:`gansem.cluster.baselines.train_softmax_regression` on them. It writes the
replicated results and this process's rows of the row-sharded ones to ``OUT.npz``
(``rows_start``/``rows_stop`` say which rows). ``tests/test_multiprocess.py`` runs
two such processes and one process with the same global device count and compares.
"""

from __future__ import annotations

import argparse
import os
import sys


def _problem(n=3000, d=6, k=5, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3.0
    y = rng.integers(0, k, n)
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y.astype(np.int32)


def _local_rows(arr, start, stop):
    """Rows ``[start, stop)`` of a row-sharded array, read from this process's shards only."""
    import numpy as np

    parts = sorted(((s.index[0].start or 0, np.asarray(s.data)) for s in arr.addressable_shards),
                   key=lambda p: p[0])
    first = parts[0][0]
    return np.concatenate([p[1] for p in parts])[start - first: stop - first]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=12355)
    ap.add_argument("--devices", type=int, default=2, help="CPU devices of this process")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    import numpy as np

    from gansem import sharding
    from gansem.cluster import baselines, kmeans, svm

    x, y = _problem()
    mesh = sharding.make_mesh()
    layout = sharding.plan_rows(x.shape[0], mesh.devices.size, max_chunk_rows=256)
    data = sharding.place_rows(x, mesh, layout)
    start, stop = data.local_range()
    out = {"rows_start": start, "rows_stop": stop}

    km = kmeans.kmeans(jax.random.key(1), data, 5, max_iter=30)
    out.update(km_centroids=np.asarray(km.centroids), km_iters=np.asarray(km.n_iter),
               km_labels=_local_rows(km.labels, start, stop))
    for solver in ("lbfgs", "newton"):
        res = svm.train_ovr_svm(data, km.labels, np.zeros((5, 6), np.float32), np.zeros(5, np.float32),
                                solver=solver, ws_margin=0.1, min_rows=128)
        out.update({f"svm_{solver}_W": np.asarray(res.W), f"svm_{solver}_b": np.asarray(res.b),
                    f"svm_{solver}_iters": np.asarray(res.class_iters),
                    f"svm_{solver}_rows": np.asarray(res.working_rows),
                    f"svm_{solver}_objective": np.asarray(res.objective)})
    labels = data.place(y)
    lse = baselines.train_softmax_regression(data, labels, 5, tol=1e-5, max_iter=200)
    out.update(lse_W=lse.W, lse_b=lse.b)
    np.savez(args.out, **out)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
