#!/usr/bin/env python
"""Linear separability of GAN features (KLiSH Sec. 4.2, Tab. 3): SVM of Eq. 3 vs a cross-entropy LSE.

Both are linear classifiers of the generator features trained on the same pixels with reference labels; the
script reports their mIoU on held-out samples and the relative difference Δ = (SVM − LSE) / LSE.

Runbook:

    python launch/separability.py --run runs/ffhq --labels my_parser.py:segment --num-train 64 --num-test 256
    python launch/separability.py --generator dcgan-digiface --labels refs.npz --num-train 32 --num-test 32
    python launch/separability.py --run runs/synthetic --labels gansem.generators.synthetic:true_labels
    python launch/separability.py --run runs/dcgan --labels faces --num-train 64 --num-test 128

Writes separability.json and separability.md to --out.
"""

import argparse
import json
import os
import sys

import _common  # first: puts gansem on the import path

from gansem.evaluation import separability_experiment, separability_markdown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/separability.py",
        description=(
            "Train the one-vs-rest L2-loss SVMs of Eq. 3 (λ1 = 5000, L-BFGS, as KLiSH) and a linear semantic "
            "extractor with cross-entropy (softmax regression, full-batch L-BFGS) on generator features and "
            "reference labels, then compare their mIoU on held-out samples (Tab. 3 of the KLiSH paper)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a launch/klish.py run directory: its generator, truncation, layers and resolution")
    src.add_argument("--generator", help="a generator name or checkpoint (directory or original file)")
    p.add_argument("--labels", required=True,
                   help="reference labels: 'faces' (built-in face-part labeller from dlib's 68 landmarks; samples "
                        "without a detected face are skipped and counted), an .npz (images, latents, labels; first "
                        "--num-train samples train, the next --num-test test) or a callable 'module:function' / "
                        "'file.py:function' mapping uint8 images [B,H,W,3] to int labels [B,H,W]; 'faces' and "
                        "callables are applied to fresh samples")
    p.add_argument("--num-train", type=int, default=32, help="training samples")
    p.add_argument("--num-test", type=int, default=32, help="held-out test samples")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the samples (callable labels): train from fold_in(fold_in(key(seed), 1000003), 2), "
                        "test from the evaluation stream part 0; disjoint from each other and from the run")
    p.add_argument("--resolution", type=int, default=None,
                   help="feature resolution of the training pixels (default: the run's, else the generator's)")
    p.add_argument("--channel-budget", type=int, default=1000, help="layer rule budget (with --generator)")
    p.add_argument("--truncation", type=float, default=None, help="truncation ψ (with --generator)")
    p.add_argument("--lam", type=float, default=5000.0, help="λ1 of Eq. 3")
    p.add_argument("--svm-max-iter", type=int, default=2000, help="L-BFGS iteration limit of the SVM")
    p.add_argument("--lse-l2", type=float, default=1e-4, help="weight decay of the LSE (standardised features)")
    p.add_argument("--lse-max-iter", type=int, default=1000, help="L-BFGS iteration limit of the LSE")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="reference label value to leave out ('faces' sets 255 itself)")
    p.add_argument("--batch-size", type=int, default=8, help="generator batch size")
    _common.add_output_args(
        p, devices_help="devices to shard the training pixels and the generator batches over (default: all devices "
                        "for the pixels, one for the batches)",
        out_help="output folder (default: RUN/separability or ./separability)")
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    out = args.out or (os.path.join(args.run, "separability") if args.run else "separability")
    res = separability_experiment(
        args.labels, run_dir=args.run, generator=args.generator, num_train=args.num_train,
        num_test=args.num_test, seed=args.seed, resolution=args.resolution, channel_budget=args.channel_budget,
        truncation=args.truncation, lam=args.lam, svm_max_iter=args.svm_max_iter, lse_l2=args.lse_l2,
        lse_max_iter=args.lse_max_iter, ignore_label=args.ignore_label, batch_size=args.batch_size,
        devices=args.devices, batch_devices=args.devices, progress=not args.no_progress, quiet=args.quiet)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "separability.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = separability_markdown(res)
    with open(os.path.join(out, "separability.md"), "w") as f:
        f.write(md)
    if not args.quiet:
        print(md)
        print(f"[gansem] wrote {out}/separability.md and separability.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
