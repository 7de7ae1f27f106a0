#!/usr/bin/env python
"""Sample a UFGS dataset: (image, KLiSH mask) pairs from a finished run, into array_record shards.

    python launch/make_dataset.py --run runs/dcgan --k 12 --num-samples 10000 --out data/ufgs-dcgan-k12
    python launch/make_dataset.py --run runs/dcgan --threshold 0.8 --num-samples 10000 --out data/ufgs-dcgan
    python launch/make_dataset.py ... --out data/ufgs-dcgan-k12 --resume        # after an interruption

On a GPU, 50,000 pairs at 256² with a large batch (micro-batches of batch-size / 8 per device):

    python launch/make_dataset.py --run runs/ffhq --k 24 --num-samples 50000 --batch-size 256 --out data/ffhq-k24

The directory holds index.json, the shards pairs-SSSSS-of-NNNNN.array_record (one record per
pair: PNG image, PNG mask, float32 latent), preview.png and manifest.json; read it with
``gansem.ufgs.records.open_dataset(DIR)`` (a random-access source for grain). The records are the
same on any device count dividing 8 and after --resume.
"""

import argparse
import shlex
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.segment import Segmenter
from gansem.ufgs.dataset import write_dataset


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/make_dataset.py",
        description="Sample N (image, mask) pairs from a GAN and the KLiSH classifier of a run at K clusters "
                    "and write them as a sharded, resumable UFGS dataset (array_record + index.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common.add_classifier_args(p)
    p.add_argument("--num-samples", type=int, required=True, help="number of pairs N to write")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the samples: shard s draws its latents from "
                        "fold_in(fold_in(key(seed), UFGS_STREAM), s), apart from the run's own samples")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard file (the last may hold fewer)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per generator call, split over the devices in micro-batches of "
                        "ceil(batch-size / 8); part of the dataset's settings (it fixes the bits). Use 256 or "
                        "more on a GPU")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted write into --out: finished shards are verified (SHA-256) and "
                        "kept, the others written again; the settings must be those of the dataset")
    _common.add_output_args(
        p, devices_help="split every batch over D devices (D simulated CPU devices if fewer exist); the records "
                        "are the same on any count dividing 8. Default: one device",
        out_help="dataset directory; must be absent or empty unless --resume", out_required=True)
    return p


def _command(argv) -> str:
    """The command line, without --resume (index.json tells how to finish an interrupted write)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    return shlex.join(["python", "launch/make_dataset.py", *args])


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    seg = Segmenter.from_run(args.run, k=args.k, threshold=args.threshold, mesh=mesh)
    write_dataset(seg, args.out, num_samples=args.num_samples, seed=args.seed, shard_size=args.shard_size,
                  batch_size=args.batch_size, resume=args.resume, progress=not args.no_progress, quiet=args.quiet,
                  run_info={"run_dir": args.run, "threshold": args.threshold, "command": _command(argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
