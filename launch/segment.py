#!/usr/bin/env python
"""Segment fresh samples with a finished KLiSH run at a chosen K.

    python launch/segment.py --run runs/dcgan --k 12 --num-samples 64 --seed 1 --out seg.npz
    python launch/segment.py --run runs/dcgan --threshold 0.8 --num-samples 64 --seed 1 --out seg.npz

Writes an .npz with
    images   uint8   [N, H, W, 3]  generator output at full resolution
    latents  float32 [N, ...]      the generator inputs (z), so the samples can be regenerated
    labels   int32   [N, H, W]     cluster ids in [0, K): argmax of the trajectory's classifier at K
                                   applied to the sample's features upsampled to image resolution
    k        int32   []            the K used
 (+ class_labels int32 [N] for class-conditional generators)
"""

import argparse
import os
import sys

import _common  # first: puts gansem on the import path
import numpy as np

from gansem import sharding, viz
from gansem.segment import Segmenter


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/segment.py",
        description="Label new GAN samples with the KLiSH classifier of a run at a chosen number of clusters K.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common.add_classifier_args(p)
    p.add_argument("--num-samples", type=int, required=True, help="number of new samples N")
    p.add_argument("--seed", type=int, required=True,
                   help="seed of the samples: latents = generator.sample_latents(fold_in(key(seed), 0), N)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--batch-size", type=int, default=16,
                   help="generator batch size (with --devices: split over the devices, micro-batches of "
                        "ceil(batch-size / 8) samples)")
    p.add_argument("--devices", type=int, default=None,
                   help="split every batch over N devices (N simulated CPU devices if fewer exist); the masks "
                        "are the same on any count dividing 8. Default: one device")
    p.add_argument("--preview", action="store_true", help="also write <out>.png with the first samples and masks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_out(path: str):
    """``None`` if ``path`` can be written (its folder is created now), else the error message."""
    if os.path.isdir(path):
        return f"--out {path!r} is a directory; give a file name such as {os.path.join(path, 'seg.npz')!r}"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder {folder!r} of --out ({e.strerror or e}); choose a writable location"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write into the folder {folder!r} of --out (permission denied); choose a writable location"
    return None


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    err = _check_out(args.out)  # before any work: a run of many samples must not fail at the very end
    if err:
        return _common.fail(err)
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    seg = Segmenter.from_run(args.run, k=args.k, threshold=args.threshold, mesh=mesh)
    out = seg.sample(args.num_samples, args.seed, batch_size=args.batch_size, progress=not args.no_progress)
    try:
        np.savez_compressed(args.out, k=np.int32(seg.k), **out)
    except OSError as e:
        return _common.fail(f"cannot write --out {args.out!r} ({e.strerror or e})")
    if args.preview:
        n = min(8, args.num_samples)
        viz.cluster_map_figure(out["images"][:n], {f"K={seg.k}": out["labels"][:n]},
                               os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}: {args.num_samples} samples, K={seg.k}, labels {out['labels'].shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
