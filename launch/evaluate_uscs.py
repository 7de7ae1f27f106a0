#!/usr/bin/env python
"""Evaluate a USCS generator: does it draw what the mask says? (KLiSH Sec. 5; SPADE's segmentation score)

Runbook (the K = 8 default chain of the README):

    python launch/evaluate_uscs.py --model runs/uscs-k8 --segmenter runs/ufgs-unet --out runs/uscs-k8/eval

For every held-out pair of the USCS run (the pairs its training never saw) the generator draws
an image of the KLiSH mask, the UFGS segmenter labels that image, and the labels are compared
with the mask (pixel accuracy, mIoU and IoU per class, pooled over images). The same numbers
for the real generated images are the ceiling (the segmenter's own agreement with KLiSH); the
same generator at its initial weights (0 steps) is the floor. A Fréchet distance in the
segmenter's pooled features stands in for FID (no Inception weights are available offline).
Writes to --out: report.json, report.md, examples.png, manifest.json.
"""

import argparse
import sys

import _common  # first: puts gansem on the import path

from gansem.uscs.evaluate import evaluate_uscs_run, report_markdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/evaluate_uscs.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="USCS run directory (written by launch/train_uscs.py)")
    p.add_argument("--segmenter", required=True,
                   help="UFGS segmenter run (launch/train_segmenter.py) trained on pairs of the same KLiSH classes")
    p.add_argument("--out", required=True, help="directory for report.json, report.md, examples.png, manifest.json")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of the USCS run (default: the latest)")
    p.add_argument("--num-pairs", type=int, default=None, help="held-out pairs to use (default: all of them)")
    p.add_argument("--seed", type=int, default=0, help="style seed of the first batch (only with a style encoder)")
    p.add_argument("--batch-size", type=int, default=32, help="images per generator / segmenter call")
    p.add_argument("--num-examples", type=int, default=8, help="held-out pairs shown in examples.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("num_pairs", "batch_size", "num_examples"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            return _common.fail(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    report = evaluate_uscs_run(args.model, args.segmenter, args.out, step=args.step, num_pairs=args.num_pairs,
                               seed=args.seed, batch_size=args.batch_size, num_examples=args.num_examples,
                               progress=not args.no_progress)
    print(report_markdown(report))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
