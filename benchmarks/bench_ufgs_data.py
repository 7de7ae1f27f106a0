#!/usr/bin/env python
"""UFGS dataset writing speed: images/s end to end and for the generator + classifier alone, and its dominant ops.

    python benchmarks/bench_ufgs_data.py --run runs/dcgan --k 19 --out results/ufgs_data.json
    python benchmarks/bench_ufgs_data.py --run runs/dcgan --k 19 --devices 8 --batch-size 256

For the KLiSH classifier of ``--run`` at ``--k``:

* **end to end**: :func:`gansem.ufgs.dataset.write_dataset` of ``--num-samples`` pairs into a
  temporary folder (generation, classification, PNG encoding, array_record shards, checksums,
  index), images/s as its summary reports them (the first batch's compilation included);
* **segment only**: the jitted generator + classifier program
  (:func:`gansem.segment.segment_program`) on one batch already on the device, best of
  ``--repeats`` runs: the device's speed without encoding and writing;
* **profile**: a ``jax.profiler`` trace of ``--profile-batches`` batches of that program, read
  offline (:func:`common.dominant_ops`), op time summed by kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.segment import Segmenter, segment_program  # noqa: E402
from gansem.ufgs.dataset import shard_inputs, write_dataset  # noqa: E402


def segment_only(seg: Segmenter, batch: int, repeats: int, profile_batches: int) -> dict:
    """Best-of-``repeats`` time of the jitted generator + classifier on ``batch`` samples (one device), and a trace."""
    latents, classes = shard_inputs(seg.generator, 0, 0, batch)
    prog = jax.jit(segment_program(seg.generator, seg.layers))
    args = (seg.params, jnp.asarray(seg.W), jnp.asarray(seg.b), jnp.asarray(latents),
            None if classes is None else jnp.asarray(classes))
    _, times = common.time_call(lambda: prog(*args), repeats=repeats)  # the first (compiling) call excluded
    best = times["best_s"]
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(profile_batches):
                common.block(prog(*args))
        prof = common.dominant_ops(logdir)
    prof.pop("file", None)
    return {"batch": batch, "seconds": best, "images_per_s": batch / best, "profile": prof}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/dcgan", help="KLiSH run directory (default runs/dcgan)")
    p.add_argument("--k", type=int, default=None, help="K of the classifier (default: the run's φ* = 0.5 choice)")
    p.add_argument("--num-samples", type=int, default=1000, help="pairs written end to end (default 1000)")
    p.add_argument("--shard-size", type=int, default=500, help="pairs per shard (default 500)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per generator batch (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="segment-only runs; the best counts (default 3)")
    p.add_argument("--profile-batches", type=int, default=2, help="batches in the profiler trace (default 2)")
    p.add_argument("--devices", type=int, default=1, help="devices (simulated CPU devices if > the real count)")
    p.add_argument("--out", default=None, help="write results as JSON here (e.g. results/ufgs_data.json)")
    args = p.parse_args(argv)
    common.setup_devices(args.devices)
    mesh = sharding.make_mesh(args.devices)
    seg = (Segmenter.from_run(args.run, k=args.k, mesh=mesh) if args.k is not None
           else Segmenter.from_run(args.run, threshold=0.5, mesh=mesh))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = write_dataset(seg, os.path.join(tmp, "data"), num_samples=args.num_samples, seed=0,
                                shard_size=args.shard_size, batch_size=args.batch_size, progress=False, quiet=True)
        wall = time.perf_counter() - t
        folder = os.path.join(tmp, "data")
        size_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    end_to_end = {"num_samples": args.num_samples, "seconds": wall, "images_per_s": args.num_samples / wall,
                  "writer_images_per_s": summary["images_per_s"], "megabytes": size_mb}
    only = segment_only(seg, args.batch_size, args.repeats, args.profile_batches)
    common.print_table(
        f"UFGS dataset writing, {seg.generator.resolution} px, K={seg.k}, batch {args.batch_size}, "
        f"{mesh.devices.size} {jax.default_backend()} device(s)",
        ["pairs", "end-to-end img/s", "segment-only img/s", "MiB on disk"],
        [[args.num_samples, end_to_end["images_per_s"], only["images_per_s"], size_mb]])
    prof = only["profile"]
    if prof.get("by_kind"):
        common.print_table(f"dominant ops of the generator + classifier over {args.profile_batches} batches "
                           f"({prof['source']}; {prof['total_ms']:.1f} ms of op time)",
                           ["op kind", "ms", "share"], [[o["op"], o["ms"], o["share"]] for o in prof["by_kind"]])
    common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "k": seg.k,
                                 "end_to_end": end_to_end, "segment_only": only,
                                 "peak_rss_mib": common.peak_rss_mib()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
