#!/usr/bin/env python
"""UFGS segmenter training speed: steps/s and images/s, and the ops that dominate a step.

    python benchmarks/bench_ufgs_train.py --out results/ufgs_train.json
    python benchmarks/bench_ufgs_train.py --archs unet --resolution 128 --batch-size 16 --devices 8

For each architecture (``unet`` with ``--unet-features``; ``deeplabv3`` with a small ResNet,
``--deeplab-depth/-width/-aspp``) on synthetic colour-blob pairs held in memory:

* **end to end**: :func:`gansem.ufgs.train.fit_segmenter` for ``--steps`` steps (grain
  batches read ahead by ``--data-threads`` threads, host label checks, batch placement, no
  validation or checkpoints); steps/s over the steps after the first (compiling) one, as its
  ``summary.json`` reports them.
* **step only**: the same compiled step (:func:`gansem.ufgs.train.training_programs`) on one
  batch already on the devices, ``--steps`` steps, best of ``--repeats`` runs: the device's
  speed without the input pipeline. ``cost_analysis`` of the compiled step gives its FLOPs,
  hence the achieved GFLOP/s.
* **profile**: a ``jax.profiler`` trace of ``--profile-steps`` steps, read back offline from
  its ``.xplane.pb`` with ``jax.profiler.ProfileData``; the op events (GPU/TPU: the device
  plane's "XLA Ops" line; CPU: the XLA executor threads of the host plane) are summed by name
  and by kind (the name without its ``.N`` suffix) and the largest shares printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from gansem import sharding  # noqa: E402
from gansem.ufgs.models import build_model  # noqa: E402
from gansem.ufgs.train import fit_segmenter, training_programs  # noqa: E402

LR, WEIGHT_DECAY, IGNORE = 1e-3, 1e-4, 255


class BlobPairs:
    """``n`` smooth random colour fields at ``size`` px, labelled by a colour quantisation into ``k`` classes."""

    def __init__(self, n: int, size: int, k: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        coarse = rng.uniform(0, 255, (n, 6, 6, 3)).astype(np.float32)
        smooth = np.stack([np.stack([np.asarray(Image.fromarray(c[..., ch]).resize((size, size), Image.BILINEAR))
                                     for ch in range(3)], -1) for c in coarse])
        self.labels = (smooth.sum(-1) * k / (3 * 256)).astype(np.int32).clip(0, k - 1)
        self.images = np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)
        self.num_classes, self.resolution, self.palette, self.class_names = k, size, None, None
        self.meta = {"kind": "benchmark colour blobs"}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def model_kwargs(arch: str, args) -> dict:
    if arch == "unet":
        return {"features": tuple(int(f) for f in args.unet_features.split(","))}
    return {"depth": args.deeplab_depth, "width": args.deeplab_width, "aspp_features": args.deeplab_aspp,
            "output_stride": args.deeplab_os}


def bench_arch(arch: str, data: BlobPairs, mesh, args) -> dict:
    kwargs = model_kwargs(arch, args)
    n_dev = mesh.devices.size
    # -- end to end: the library's loop, with grain reading ahead -----------------------------
    seg = fit_segmenter(data, arch=arch, steps=args.steps, batch_size=args.batch_size, lr=LR,
                        weight_decay=WEIGHT_DECAY, seed=args.seed, mesh=mesh, val_samples=0,
                        model_kwargs=kwargs, data_threads=args.data_threads, progress=False, quiet=True)
    e2e = seg.summary
    # -- step only: the same compiled step on a batch already on the devices --------------------
    model = build_model(arch, data.num_classes, **kwargs)
    warmup = args.steps // 20
    progs = training_programs(model, data.resolution, LR, WEIGHT_DECAY, warmup, args.steps, IGNORE, mesh)
    batch = sharding.place_batch({"image": data.images[:args.batch_size], "label": data.labels[:args.batch_size]},
                                 mesh)
    state = progs.init(np.uint32(args.seed))
    compiled = progs.step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, m = progs.step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = progs.step(state, batch)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - t) / args.steps)
    step_s = min(times)
    # -- profile a few steps ----------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(args.profile_steps):
                state, m = progs.step(state, batch)
            jax.block_until_ready((state, m))
        ops = common.dominant_ops(logdir)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    return {
        "arch": arch, "model_kwargs": kwargs, "params": params, "devices": n_dev,
        "end_to_end": {"steps_per_s": e2e["steps_per_s"], "images_per_s": e2e["images_per_s"],
                       "seconds_with_compile": e2e["seconds"], "final_loss": e2e["final_loss"]},
        "step_only": {"step_s": step_s, "steps_per_s": 1 / step_s, "images_per_s": args.batch_size / step_s,
                      "times_s": times, "flops_per_step": flops,
                      "gflops_per_s": flops / step_s / 1e9 if flops else None},
        "profile": ops,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["unet", "deeplabv3"], choices=["unet", "deeplabv3"])
    p.add_argument("--resolution", type=int, default=64, help="image size R (default 64)")
    p.add_argument("--num-classes", type=int, default=12, help="K (default 12)")
    p.add_argument("--items", type=int, default=64, help="pairs in the in-memory data set (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (default 8)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--repeats", type=int, default=2, help="step-only runs; the best counts (default 2)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps in the profiler trace (default 3)")
    p.add_argument("--unet-features", default="32,64,128", help="UNet widths (default 32,64,128)")
    p.add_argument("--deeplab-depth", type=int, default=18, help="DeepLabV3 ResNet depth (default 18)")
    p.add_argument("--deeplab-width", type=int, default=16, help="DeepLabV3 stem width (default 16; 64 is standard)")
    p.add_argument("--deeplab-aspp", type=int, default=64, help="DeepLabV3 ASPP channels (default 64; 256 standard)")
    p.add_argument("--deeplab-os", type=int, default=16, choices=[8, 16], help="DeepLabV3 output stride")
    p.add_argument("--data-threads", type=int, default=2, help="grain read-ahead threads (default 2)")
    p.add_argument("--devices", type=int, default=1, help="devices (simulated CPU devices if > the real count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results as JSON here (e.g. results/ufgs_train.json)")
    args = p.parse_args(argv)
    common.setup_devices(args.devices)
    mesh = sharding.make_mesh(args.devices)
    data = BlobPairs(args.items, args.resolution, args.num_classes, args.seed)
    results = [bench_arch(arch, data, mesh, args) for arch in args.archs]

    common.print_table(
        f"UFGS training, {args.resolution} px, K={args.num_classes}, batch {args.batch_size}, "
        f"{mesh.devices.size} {jax.default_backend()} device(s)",
        ["arch", "params", "e2e steps/s", "e2e img/s", "step-only steps/s", "step-only img/s", "GFLOP/s"],
        [[r["arch"], r["params"], r["end_to_end"]["steps_per_s"], r["end_to_end"]["images_per_s"],
          r["step_only"]["steps_per_s"], r["step_only"]["images_per_s"], r["step_only"]["gflops_per_s"]]
         for r in results])
    for r in results:
        prof = r["profile"]
        if not prof.get("by_kind"):
            print(f"\n{r['arch']}: no op events in the trace ({prof.get('note') or prof.get('source')})")
            continue
        common.print_table(f"{r['arch']}: dominant ops over {args.profile_steps} steps ({prof['source']}; "
                           f"{prof['total_ms']:.1f} ms of op time)",
                           ["op kind", "ms", "share"], [[o["op"], o["ms"], o["share"]] for o in prof["by_kind"]])
    common.write_json(args.out, {"machine": common.machine_info(), "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
