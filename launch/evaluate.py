#!/usr/bin/env python
"""Compare KLiSH with the K-means, AHC and KASP baselines on reference labels (KLiSH Tab. 4, Fig. 5).

Runbook:

    # reference labels from a pretrained segmenter you plug in (images uint8 [B,H,W,3] -> labels int [B,H,W]);
    # evaluation samples are drawn from the run's generator on a stream disjoint from the clustering samples
    python launch/evaluate.py --run runs/ffhq --labels my_parser.py:segment --k 20,26,30 --num-samples 1000

    # or from the built-in face-part labeller (dlib 68-point landmarks: background, skin, brows, eyes, nose,
    # lips, mouth); samples without a detected face are skipped and counted
    python launch/evaluate.py --run runs/dcgan --labels faces --k 12,20 --num-samples 200

    # or from a labels file in the layout launch/segment.py writes (images, latents, labels [, class_names])
    python launch/evaluate.py --run runs/ffhq --labels refs.npz --k 26

    # the synthetic toy whose truth is known (KLiSH ahead of K-means at the true K = 3)
    python launch/evaluate.py --run runs/synthetic --labels gansem.generators.synthetic:true_labels \
        --k 3,5 --num-samples 64

Writes to --out (default RUN/eval): table.md (methods × K × AMI/ARI/mIoU, as Tab. 4, and how many samples had
reference labels and how many were skipped), results.json (all numbers, both mIoU averagings, fit statistics,
num_labelled / num_skipped) and clusters_k<K>.png (cluster maps of every method side by
side for the same samples, as Fig. 5).
"""

import argparse
import os
import sys

import _common  # first: puts gansem on the import path

from gansem.evaluation import BASELINES as _BASELINES
from gansem.evaluation import evaluate_run


def _int_list(s: str):
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one K")
    return out


def _baselines(s: str):
    if s.strip().lower() in ("", "none"):
        return []
    out = [v.strip() for v in s.split(",") if v.strip()]
    bad = [v for v in out if v not in _BASELINES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {bad}; choose from {','.join(_BASELINES)} or 'none'")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/evaluate.py",
        description=(
            "Evaluate a KLiSH run against reference labels and compare it with clustering baselines fitted on the "
            "same clustering samples (K-means euclidean/arccos, AHC ward/arccos with a cross-entropy linear "
            "read-out, KASP). Every method segments evaluation samples as argmax of a (piecewise-)linear "
            "classifier of the upsampled generator features; scores are AMI, ARI, NMI and the greedy "
            "maximum-matching mIoU (Algorithm 2), from contingency tables streamed batch by batch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory written by launch/klish.py")
    p.add_argument("--labels", required=True,
                   help="reference labels: 'faces' (built-in face-part labeller from dlib's 68 landmarks: "
                        "background, skin, brows, eyes, nose, lips, mouth; samples without a detected face are "
                        "skipped and counted; needs the faces extra, installed by scripts/setup.sh); an .npz with "
                        "images uint8 [N,H,W,3], latents [N,...] (generator inputs) and labels int [N,H,W] (optional "
                        "class_names, class_labels), e.g. from launch/segment.py; or a callable 'module:function' / "
                        "'path/to/file.py:function' mapping uint8 images [B,H,W,3] to int labels [B,H,W]; "
                        "'faces' and callables are applied to fresh samples of the run's generator")
    p.add_argument("--k", type=_int_list, required=True,
                   help="comma-separated numbers of clusters, each in the run's trajectory (e.g. 20,26,30)")
    p.add_argument("--baselines", type=_baselines, default=list(_BASELINES),
                   help=f"comma-separated subset of {','.join(_BASELINES)}, or 'none' (KLiSH only)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="evaluation samples; required with 'faces' or a callable, default all samples of a labels file")
    p.add_argument("--eval-seed", type=int, default=None,
                   help="seed of the evaluation samples (callable labels); default the run's seed. The samples "
                        "come from fold_in(fold_in(key(seed), 1000003), 0), a stream disjoint from the run's "
                        "clustering samples fold_in(key(seed), 0); overlap is checked")
    p.add_argument("--miou-average", choices=("image", "dataset"), default="image",
                   help="mIoU shown in the table: per-class IoU averaged over images (original KLiSH evaluation) "
                        "or pooled over the dataset; results.json has both")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="reference label value to leave out (e.g. 255; 'faces' sets 255 itself); samples made only "
                        "of it are counted as skipped")
    p.add_argument("--ahc-samples", type=int, default=4000,
                   help="pixels subsampled from the clustering data for AHC (memory and time grow as n²; the "
                        "paper used 16 images at 64×64)")
    p.add_argument("--kasp-k0", type=int, default=None,
                   help="K-means centroids that KASP groups by spectral clustering (default: the run's K0)")
    p.add_argument("--kmeans-iters", type=int, default=20, help="maximum Lloyd iterations of the K-means baselines")
    p.add_argument("--batch-size", type=int, default=8, help="generator batch size of the evaluation pass")
    p.add_argument("--num-vis", type=int, default=4, help="samples shown in the cluster-map figures")
    _common.add_output_args(
        p, devices_help="devices for fitting the baselines and for the generator batches (split over the devices, "
                        "same results on any count dividing 8; N simulated CPU devices if fewer exist); default: all "
                        "devices for the baselines, one for the batches",
        out_help="output folder (default: RUN/eval)")
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    out = args.out or os.path.join(args.run, "eval")
    res = evaluate_run(
        args.run, args.labels, args.k, args.baselines, args.num_samples, args.eval_seed,
        batch_size=args.batch_size, devices=args.devices, batch_devices=args.devices,
        miou_average=args.miou_average, ahc_samples=args.ahc_samples, kasp_k0=args.kasp_k0,
        kmeans_iters=args.kmeans_iters, ignore_label=args.ignore_label, num_vis=args.num_vis, out_dir=out,
        progress=not args.no_progress, quiet=args.quiet)
    if not args.quiet:
        with open(res["files"]["table"]) as f:
            print(f.read())
        print(f"[gansem] done in {res['timings']['total_s']:.0f}s: {res['files']['table']}, {res['files']['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
