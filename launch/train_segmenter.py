#!/usr/bin/env python
"""Train a UFGS segmentation network on (generated image, KLiSH cluster mask) pairs (KLiSH Sec. 5).

    python launch/segment.py --run runs/dcgan --k 12 --num-samples 2000 --seed 1 --out pairs.npz
    python launch/train_segmenter.py --data pairs.npz --arch unet --steps 2000 --out runs/ufgs
    python launch/train_segmenter.py --data pairs.npz --arch unet --steps 4000 --out runs/ufgs --resume

``--data`` is a UFGS dataset directory (``gansem.ufgs.records``) or an ``.npz`` in the
layout ``launch/segment.py`` writes (``images`` uint8 [N, H, W, 3], ``labels`` int32
[N, H, W], ``k``). The run directory gets model.json, checkpoints/, metrics.jsonl,
curves.png, summary.json and manifest.json (see ``gansem.ufgs.predict``); label new
images with ``launch/predict.py --model RUN``.
"""

import argparse
import json
import os
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.ufgs import records
from gansem.ufgs.models import ARCHS
from gansem.ufgs.train import fit_segmenter


def _model_arg(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string, e.g. dtype=bfloat16


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/train_segmenter.py",
        description="Train a segmentation network (UNet or DeepLabV3) on generated images and their KLiSH masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="UFGS dataset directory, or an .npz written by launch/segment.py (images, labels, k)")
    p.add_argument("--arch", choices=ARCHS, default="unet", help="network")
    p.add_argument("--steps", type=int, required=True, help="train until this many steps are done")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (same settings and data)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, a multiple of --devices")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW decoupled weight decay (kernels only)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: 5%% of the schedule)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine learning-rate schedule (default: --steps of the first call); "
                        "give the total when training in several sessions")
    p.add_argument("--seed", type=int, default=0, help="data order, initialisation and dropout")
    p.add_argument("--val-samples", type=int, default=None,
                   help="hold out the last N items of --data for validation (default: 5%%, at most 200; 0: none)")
    p.add_argument("--eval-every", type=int, default=500, help="validate every N steps (and after the last)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (and after the last)")
    p.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="model option, repeatable, value as JSON: e.g. features=[16,32,64] (unet), depth=18, "
                        "output_stride=8, width=32 (deeplabv3), dtype=bfloat16")
    p.add_argument("--data-threads", type=int, default=2, help="threads reading batches ahead")
    _common.add_output_args(
        p, devices_help="train data-parallel over N devices (N simulated CPU devices if fewer exist). "
                        "Default: every device of the default backend",
        out_help="run directory (new, or an existing one with --resume)", out_required=True)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    source = records.load_pairs(args.data)
    mesh = sharding.make_mesh(args.devices)
    seg = fit_segmenter(
        source, arch=args.arch, steps=args.steps, batch_size=args.batch_size, out_dir=args.out, resume=args.resume,
        lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, schedule_steps=args.schedule_steps,
        seed=args.seed, mesh=mesh, val_samples=args.val_samples, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, model_kwargs=dict(args.model_arg), data_threads=args.data_threads,
        data_info={"path": os.path.abspath(args.data)}, progress=not args.no_progress, quiet=args.quiet)
    if not args.quiet:
        final = (seg.summary or {}).get("final_val") or {}
        val = f", validation mIoU {final['val_miou']:.4f}" if "val_miou" in final else ""
        print(f"trained {args.out}: step {seg.step}{val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
