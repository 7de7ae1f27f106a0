#!/usr/bin/env python
"""Network-free foreground segmentation by style mixing (seed paper 003) on a StyleGAN2 / StyleGAN.

    python launch/stylemix_segment.py --generator checkpoints/ffhq --out runs/stylemix-ffhq
    python launch/stylemix_segment.py --generator checkpoints/ffhq --ablation --out runs/stylemix-ablation
    python launch/stylemix_segment.py --generator checkpoints/ffhq --dataset-samples 10000 --out runs/sm-data

Writes the run directory of :mod:`gansem.methods.stylemix_run` (config.json, stylemix.png, report.json,
report.md, manifest.json; ablation.png with --ablation; dataset/ with --dataset-samples, a UFGS mask
dataset for ``launch/train_segmenter.py --data``). Defaults follow the seed paper's FFHQ setting
(Tab. S1: n = 50, c = 8, LAB, k = 3, saliency rule).
"""

import argparse
import shlex
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.methods.stylemix import COLOR_SPACES, FOREGROUND_RULES, StyleMixConfig, num_style_layers
from gansem.methods.stylemix_run import run_stylemix
from gansem.references import resolve_labels_source
from gansem.zoo import load_generator


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/stylemix_segment.py",
        description="Foreground masks without any network or labels: n style-mixed variants of each image "
                    "(its styles below the cutoff layer, random styles above) are stacked per pixel into a style "
                    "summary tensor, its pixels are clustered per image with K-means, and the foreground "
                    "clusters are picked by the corner-minority or the saliency rule (seed paper 003, Sec. 3.2). "
                    "Needs a style-based generator (StyleGAN2 or StyleGAN).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--generator", required=True,
                   help="a gansem checkpoint directory (python -m weights_port convert ffhq.pkl checkpoints/ffhq) "
                        "or an original StyleGAN2 .pkl/.pt / StyleGAN .pth file (converted in memory)")
    p.add_argument("--num-images", type=int, default=8, help="images segmented for the report and the ablation")
    p.add_argument("--seed", type=int, default=0,
                   help="image i draws its structure latent, style latents and K-means seed from "
                        "fold_in(key(seed), i)")
    p.add_argument("--variants", type=int, default=50, help="n, style-mixed variants per image (paper: 50)")
    p.add_argument("--cutoff", type=int, default=8,
                   help="c, the mixing layer: styles of layers < c from the image, >= c from random latents "
                        "(paper: 8 of 18 for FFHQ-1024, 5 for AFHQ-cat / LSUN-horse)")
    p.add_argument("--color-space", choices=COLOR_SPACES, default="lab",
                   help="colour space of the style summary tensor (sRGB in [0, 1] or CIELAB, D65)")
    p.add_argument("--k", type=int, default=3, help="clusters of the per-image K-means (paper: 3 saliency, 2 corner)")
    p.add_argument("--foreground", choices=FOREGROUND_RULES, default="saliency",
                   help="foreground rule: 'corner' (clusters filling a b x b corner block are background) or "
                        "'saliency' (clusters whose mean centred-Gaussian saliency exceeds the threshold are "
                        "foreground)")
    p.add_argument("--corner-size", type=int, default=None,
                   help="b, the corner block side in pixels (default: an eighth of the clustered image side)")
    p.add_argument("--theta-corner", type=float, default=0.5,
                   help="θ_corner: a cluster with >= round(θ b²) pixels in a corner block is background")
    p.add_argument("--saliency-sigma", type=float, default=0.25,
                   help="width of the Gaussian saliency map, as a fraction of the image side")
    p.add_argument("--theta-saliency", type=float, default=0.5,
                   help="θ_saliency: a cluster whose mean saliency exceeds it is foreground")
    p.add_argument("--resolution", type=int, default=None,
                   help="cluster (and write masks) at this side; the variants are resized first "
                        "(default: the generator's resolution, as the paper)")
    p.add_argument("--truncation", type=float, default=None, help="truncation ψ of every latent (default: the "
                   "generator's, 1 for converted checkpoints)")
    p.add_argument("--kmeans-max-iter", type=int, default=50, help="Lloyd iteration cap (convergence is reported)")
    p.add_argument("--variant-chunk", type=int, default=None,
                   help="variants synthesised per generator call (must divide --variants; bounds memory at 1024 px)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per call, split over the devices in micro-batches of ceil(batch-size / 8)")
    p.add_argument("--ablation", action="store_true",
                   help="also run the seed paper's ablation (Tab. 4): every cutoff of --ablation-cutoffs with RGB "
                        "and LAB on the same images; scored against --labels if given, else as agreement with "
                        "the run's own setting")
    p.add_argument("--ablation-cutoffs", type=int, nargs="+", default=None,
                   help="cutoffs of the ablation (default: the paper's 4 6 8 12 14, those below the generator's "
                        "number of style layers)")
    p.add_argument("--labels", default=None,
                   help="reference labeller for scores: 'faces' (built-in face parts), or 'module:function' / "
                        "'file.py:function' mapping uint8 images [B,H,W,3] to int labels [B,H,W]; class 0 is "
                        "background, every other class foreground")
    p.add_argument("--ignore-label", type=int, default=None, help="reference label value the scores skip")
    p.add_argument("--dataset-samples", type=int, default=0,
                   help="also write this many (image, mask) pairs as a UFGS dataset into OUT/dataset")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per dataset shard")
    _common.add_output_args(
        p, devices_help="split every batch over D devices (D simulated CPU devices if fewer exist); the masks "
                        "are the same on any count dividing 8. Default: one device",
        out_help="run directory (must be absent or empty)", out_required=True, quiet=False)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    gen, params, meta = load_generator(args.generator)
    if args.truncation is not None:
        gen = gen.with_settings(truncation=args.truncation)
    config = StyleMixConfig(
        num_variants=args.variants, cutoff=args.cutoff, color_space=args.color_space, k=args.k,
        foreground=args.foreground, corner_size=args.corner_size, theta_corner=args.theta_corner,
        saliency_sigma=args.saliency_sigma, theta_saliency=args.theta_saliency, resolution=args.resolution,
        kmeans_max_iter=args.kmeans_max_iter, variant_chunk=args.variant_chunk)
    config.check(gen)  # before anything is created
    cutoffs = ()
    if args.ablation:
        layers = num_style_layers(gen)
        cutoffs = tuple(args.ablation_cutoffs or [c for c in (4, 6, 8, 12, 14) if c < layers] or [layers // 2])
    labels = resolve_labels_source(args.labels, args.ignore_label) if args.labels else None
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    info = {"name": meta.get("name"), "checkpoint": args.generator, "family": gen.family}
    command = shlex.join(["python", "launch/stylemix_segment.py", *(sys.argv[1:] if argv is None else argv)])
    summary = run_stylemix(
        gen, params, config, args.out, seed=args.seed, num_images=args.num_images, mesh=mesh,
        batch_size=args.batch_size, ablation_cutoffs=cutoffs, labels=labels,
        ignore_label=None if labels is None else labels.ignore_label, dataset_samples=args.dataset_samples,
        shard_size=args.shard_size, generator_info=info, command=command, progress=not args.no_progress)
    print(f"{args.out}: {summary['num_images']} images, mean foreground fraction "
          f"{summary['foreground_fraction']:.3f}, {summary['seconds']:.1f} s; see {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
