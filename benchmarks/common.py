"""Shared pieces of the speed benchmarks: data, timing, memory, JSON, tables.

Every benchmark builds its data once and times gansem against the alternative
in the same process, so ratios are measured under the same machine load.

Data sets (``--data``):
    ``gmm512`` / ``gmm960``: a Gaussian mixture of 100 components in D = 512 / 960
        (unequal component weights and spreads), ``--n`` rows (100k by default).
    ``dcgan``: pixel features of the bundled DCGAN (``dcgan-digiface``) at 32×32,
        the layers chosen by the paper's rule (D = 960), as many images as needed
        for ``--n`` pixels (rows beyond ``--n`` are dropped).

Timing: :func:`time_call` runs the function once (compile + first run, reported
as ``first_s``) and then ``repeats`` more times; ``best_s`` is the minimum of the
repeats and ``compile_s = first_s - best_s``. Minima are the most stable statistic
on a machine shared with other work.

Memory: :class:`PeakRSS` resets the kernel's high-water mark of this process
(``/proc/self/clear_refs``, Linux >= 4.0) at the start of a phase and reads
``VmHWM`` at its end, so each phase reports its own peak; where that is not
possible it falls back to ``resource.getrusage`` (peak of the whole process).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import platform
import re
import resource
import sys
import time
from typing import Callable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402  (importing JAX starts no backend: setup_devices still works after it)

from gansem import sharding  # noqa: E402
from gansem.features import extract_features, select_feature_layers  # noqa: E402
from gansem.run import jsonable  # noqa: E402
from gansem.zoo import load_generator  # noqa: E402

__all__ = [
    "DATASETS",
    "add_common_args",
    "setup_devices",
    "baseline_threads",
    "gaussian_mixture",
    "dcgan_features",
    "load_data",
    "place_data",
    "time_call",
    "block",
    "PeakRSS",
    "peak_rss_mib",
    "memory_maps_used",
    "machine_info",
    "write_json",
    "print_table",
    "ratio",
    "dominant_ops",
]

DATASETS = ("gmm512", "gmm960", "dcgan")


# -- command line ---------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, n_default: int = 100_000) -> argparse.ArgumentParser:
    parser.add_argument("--data", default="gmm512", choices=DATASETS,
                        help="data set (default gmm512)")
    parser.add_argument("--n", type=int, default=n_default, help=f"rows N (default {n_default})")
    parser.add_argument("--seed", type=int, default=0, help="data and init seed")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after the first call")
    parser.add_argument("--devices", type=int, default=1,
                        help="gansem devices (simulated CPU devices if > the real count)")
    parser.add_argument("--cache", default=None,
                        help="directory to cache DCGAN features in (default: no cache)")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    return parser


def setup_devices(n: int) -> None:
    """Ask for ``n`` CPU devices; must run before JAX starts its backends (before the first computation)."""
    if n > 1:
        sharding.simulate_cpu_devices(n)


@contextlib.contextmanager
def baseline_threads(n: int):
    """Within the block, limit the thread pools of the non-JAX baselines (OpenBLAS, OpenMP, faiss) to ``n``.

    ``n <= 0`` changes nothing. The previous limits come back on exit: they are
    process-wide, and jaxlib's CPU LAPACK kernels (Cholesky, triangular solves)
    run on scipy's OpenBLAS, so a limit left in place would also slow gansem's
    solvers and change the last bits of their results in whatever runs next.
    """
    if n <= 0:
        yield
        return
    stack = contextlib.ExitStack()
    try:  # optional: only the baselines' thread pools need it
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(n))
    except ImportError:  # pragma: no cover
        pass
    try:  # optional dependency of the K-means baseline
        import faiss

        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(n)
        stack.callback(faiss.omp_set_num_threads, before)
    except ImportError:
        pass
    with stack:
        yield


# -- data -----------------------------------------------------------------------------


def gaussian_mixture(n: int, d: int, k: int = 100, seed: int = 0):
    """Synthetic clustering data: a mixture of ``k`` Gaussians in ``d`` dimensions.

    Component means are N(0, I) (pairwise distance about sqrt(2d)); component
    weights are Dirichlet(2) (unequal sizes) and each component has its own
    isotropic spread in [0.5, 1.5] × sqrt(2) (so clusters overlap in the tails
    but K-means with K = k finds them).

    Returns:
        ``(x [n, d] float32, y [n] int64 component ids)``.
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 2.0))
    spread = (rng.uniform(0.5, 1.5, k) * np.sqrt(2.0)).astype(np.float32)
    y = rng.choice(k, size=n, p=weights)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= spread[y, None]
    x += means[y]
    return x, y


def dcgan_features(n: int, seed: int = 0, size: int = 32, cache: Optional[str] = None):
    """Pixel features of the bundled DCGAN, ``[n, 960] float32`` (Sec. 4.1 layer rule).

    ``ceil(n / size^2)`` images are generated from ``jax.random.key(seed)``;
    the first ``n`` pixels are returned.
    """
    n_img = -(-n // (size * size))
    path = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"dcgan_s{seed}_r{size}_i{n_img}.npy")
        if os.path.exists(path):
            return np.load(path)[:n]
    gen, params, _ = load_generator("dcgan-digiface")
    layers = select_feature_layers(gen.feature_layers())
    latents = np.asarray(gen.sample_latents(jax.random.key(seed), n_img), np.float32)
    _, feats = extract_features(gen, params, latents, layers, size, batch_size=16)
    x = np.ascontiguousarray(feats.reshape(-1, feats.shape[-1]), dtype=np.float32)
    if path:
        np.save(path, x)
    return x[:n]


def load_data(args) -> tuple[np.ndarray, dict]:
    """Build the data set named by ``args.data``; returns ``(x [N, D] float32, description)``."""
    t = time.perf_counter()
    if args.data == "dcgan":
        x = dcgan_features(args.n, seed=args.seed, cache=args.cache)
        desc = {"name": "dcgan", "source": "dcgan-digiface pixel features, 32x32, paper layer rule"}
    else:
        d = 512 if args.data == "gmm512" else 960
        x, _ = gaussian_mixture(args.n, d, 100, seed=args.seed)
        desc = {"name": args.data, "source": "Gaussian mixture, 100 components"}
    desc.update(n=int(x.shape[0]), d=int(x.shape[1]), build_s=round(time.perf_counter() - t, 3))
    return x, desc


# -- timing ---------------------------------------------------------------------------


def place_data(x: np.ndarray, n_devices: int = 1, max_chunk_rows: Optional[int] = None):
    """Row-shard ``x`` as a :class:`gansem.sharding.RowData` (rows, mask, layout, mesh)."""
    mesh = sharding.make_mesh(n_devices)
    kw = {} if max_chunk_rows is None else {"max_chunk_rows": max_chunk_rows}
    return sharding.place_rows(x, mesh, sharding.plan_rows(x.shape[0], mesh.devices.size, **kw))


def block(out):
    """Wait for every JAX array in ``out`` (a pytree); returns ``out``."""
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)
    return out


def time_call(fn: Callable, repeats: int = 2, warm: bool = True):
    """Time ``fn()``: ``(result, {"first_s", "best_s", "compile_s", "times_s"})``.

    With ``warm`` the first call (which compiles JAX code) is excluded from
    ``best_s`` and ``compile_s = first_s - best_s`` is reported; without it (for
    non-JAX code) every call counts.
    """
    times = []
    t = time.perf_counter()
    out = block(fn())
    first = time.perf_counter() - t
    for _ in range(max(0, repeats)):
        t = time.perf_counter()
        out = block(fn())
        times.append(time.perf_counter() - t)
    if not warm or not times:
        times = [first] + times
    best = min(times)
    return out, {"first_s": first, "best_s": best, "compile_s": max(0.0, first - best) if warm else 0.0,
                 "times_s": times}


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, in MiB.

    Attributes after exit: ``mib`` (peak during the block; whole-process peak if
    the high-water mark could not be reset) and ``exact`` (whether it could).
    """

    def __enter__(self):
        self.exact = _reset_hwm()
        return self

    def __exit__(self, *exc):
        self.mib = peak_rss_mib()
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """High-water mark of the resident set (``VmHWM``), MiB; getrusage as a fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_maps_used() -> Optional[float]:
    """Fraction of the kernel's per-process memory-map limit (``vm.max_map_count``) in use; None off Linux.

    XLA keeps every compiled program mapped for the life of the process (several maps each),
    so a run that compiles one program per K (the faithful joint solve) can reach the limit,
    after which LLVM fails with "Cannot allocate memory" and the process dies.
    """
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return used / limit if limit > 0 else None


# -- reporting ------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "python": platform.python_version(),
    }


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(jsonable(payload), f, indent=2)
    print(f"wrote {path}")


def ratio(a, b):
    """``a / b`` or ``None`` when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.4g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def print_table(title: str, header: list, rows: list) -> None:
    """Print a plain text table (first column left-aligned, others right-aligned)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(header)]
    print(f"\n{title}")
    line = "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def dominant_ops(logdir: str, top: int = 12) -> dict:
    """Op time by name and by kind from the ``.xplane.pb`` that ``jax.profiler.trace(logdir)`` wrote."""
    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        return {"source": None, "note": "no .xplane.pb written"}
    profile = jax.profiler.ProfileData.from_file(paths[-1])
    by_name: collections.Counter = collections.Counter()
    source = None
    for plane in profile.planes:  # accelerators: the device plane's "XLA Ops" line
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                if line.name == "XLA Ops":
                    source = "device plane, line 'XLA Ops'"
                    for e in line.events:
                        by_name[e.name] += e.duration_ns
    if not by_name:  # CPU: the thunks run on the XLA executor threads of the host plane
        source = "host plane, XLA executor threads (tf_XLA*)"
        skip = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")  # markers and waits
        for plane in profile.planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                for e in line.events:
                    if e.duration_ns > 0 and not e.name.startswith(skip):
                        by_name[e.name] += e.duration_ns
    total = sum(by_name.values())
    by_kind: collections.Counter = collections.Counter()
    for name, ns in by_name.items():
        by_kind[re.sub(r"[._]\d+$", "", name)] += ns

    def table(counter):
        return [{"op": n, "ms": ns / 1e6, "share": ns / total if total else None} for n, ns in counter.most_common(top)]

    return {"source": source, "file": paths[-1], "total_ms": total / 1e6, "ops": len(by_name),
            "by_kind": table(by_kind), "by_name": table(by_name)}
