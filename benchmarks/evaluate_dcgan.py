#!/usr/bin/env python
"""Time and memory of ``launch/evaluate.py`` on the bundled DCGAN: 1000 samples at 64×64, all baselines.

    python benchmarks/evaluate_dcgan.py                      # makes a small run first (launch/klish.py)
    python benchmarks/evaluate_dcgan.py --run runs/dcgan     # evaluate an existing run

Reference labels: there is no pretrained face parser offline, so the labels come
from :func:`colour_position_labels`, a deterministic **stand-in** segmenter
(luminance tercile × vertical third of the image: 9 classes). The scores are
therefore not semantic results; the point is the cost of the evaluation
(feature recomputation, baseline fits, 1000 generator passes, streamed
contingency tables, metrics). The run is made in a subprocess, so the peak RSS
printed is that of the evaluation alone.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gansem.evaluation import evaluate_run  # noqa: E402


def colour_position_labels(images) -> np.ndarray:
    """Stand-in reference segmenter: ``3 * vertical_third + luminance_tercile`` → 9 classes.

    Args:
        images: ``[B, H, W, 3]`` uint8.

    Returns:
        ``[B, H, W]`` int32.
    """
    x = np.asarray(images, np.float32)
    lum = x @ np.array([0.299, 0.587, 0.114], np.float32)
    tercile = np.digitize(lum, [85.0, 170.0])
    h = x.shape[1]
    third = np.minimum(np.arange(h) * 3 // h, 2)[None, :, None]
    return (3 * third + tercile).astype(np.int32)


colour_position_labels.class_names = tuple(f"{p}-{l}" for p in ("top", "mid", "bottom")
                                           for l in ("dark", "mid", "bright"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="existing DCGAN run (default: make one under --workdir)")
    p.add_argument("--workdir", default="runs/bench-evaluate-dcgan", help="where the run and the evaluation go")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="generated images scored by the evaluation (default 1000)")
    p.add_argument("--k", default="12,20,26", help="K values (the run made here keeps ~27 clusters after the initial filter)")
    p.add_argument("--baselines", default="kmeans,kmeans-arccos,ahc,ahc-cosine,kasp",
                   help="comma list of baselines evaluated beside KLiSH (default: all five)")
    p.add_argument("--run-images", type=int, default=16, help="images clustered by the run made here")
    p.add_argument("--run-k0", type=int, default=40, help="K0 of the run made here")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images generated per batch during the evaluation (default 8)")
    args = p.parse_args(argv)

    run = args.run
    if run is None:
        run = os.path.join(args.workdir, "run")
        if not os.path.isfile(os.path.join(run, "summary.json")):
            t = time.time()
            cmd = [sys.executable, os.path.join(ROOT, "launch", "klish.py"), "--out", run, "--num-images",
                   str(args.run_images), "--resolution", "32", "--k0", str(args.run_k0), "--no-progress", "--quiet"]
            if os.path.isdir(run):
                cmd.append("--resume")
            subprocess.run(cmd, check=True)
            print(f"[bench] KLiSH run ({args.run_images} images at 32², K0={args.run_k0}) in {time.time() - t:.0f}s")

    ks = [int(k) for k in args.k.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    t = time.time()
    res = evaluate_run(run, colour_position_labels, ks, baselines, args.num_samples, batch_size=args.batch_size,
                       out_dir=os.path.join(args.workdir, "eval"), progress=True, quiet=False)
    wall = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    out = {"num_samples": args.num_samples, "resolution": res["label_size"], "ks": ks, "methods": res["methods"],
           "wall_s": wall, "peak_rss_mib": peak, "timings": res["timings"],
           "labels": "stand-in colour/position segmenter (not semantic)"}
    with open(os.path.join(args.workdir, "eval", "benchmark.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"[bench] evaluation of {args.num_samples} samples at {res['label_size']}², methods {res['methods']}, "
          f"K={ks}: wall {wall:.0f}s (fit baselines {res['timings'].get('fit_baselines_s', 0):.0f}s, "
          f"evaluate {res['timings']['evaluate_s']:.0f}s), peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
