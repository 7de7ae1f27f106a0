#!/usr/bin/env python
"""The latent-direction segmenter (seed paper 004) end to end: directions -> mask dataset -> segmenter -> evaluation.

    python launch/latent_direction.py --generator dcgan-digiface --labels faces --out runs/ld-dcgan
    python launch/latent_direction.py --generator dcgan-digiface --labels faces --out runs/ld-dcgan --resume
    python launch/latent_direction.py --generator checkpoints/biggan-deep-128 --steps 1000 --out runs/ld-biggan

Writes the run directory of :mod:`gansem.methods.latent_direction_run` (config.json, directions/,
directions-loss.png, directions.png, dataset/, segmenter/, evaluation.png, report.json, report.md,
manifest.json). The defaults are a CPU-sized run; the paper's setting is ``--steps 1000``
(λ = 5, ε = 2 in z / 0.2 in w, Adam lr 0.05) with a far larger dataset and segmenter training.
"""

import argparse
import shlex
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.methods.latent_direction import DirectionConfig
from gansem.methods.latent_direction_run import run_latent_direction
from gansem.references import resolve_labels_source
from gansem.ufgs.models import ARCHS
from gansem.zoo import load_generator


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/latent_direction.py",
        description="Unsupervised foreground segmentation from a generator (Melas-Kyriazi et al., seed paper 004): "
                    "find latent directions v_l / v_d that brighten / darken the image centre against the border "
                    "while keeping its Sobel edges (Eq. 1), label each sample's foreground where G(z+εv_l) is "
                    "brighter than G(z+εv_d) (Eq. 2), refine and write these masks as a UFGS dataset, train a "
                    "segmenter on it and score it on fresh samples. Works on DCGAN, PGGAN, BigGAN (z) and "
                    "StyleGAN, StyleGAN2 (w).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--generator", required=True,
                   help="a built-in name (dcgan-digiface), a gansem checkpoint directory "
                        "(python -m weights_port convert SRC DST) or an original checkpoint file")
    p.add_argument("--seed", type=int, default=0,
                   help="root of the random streams: directions fold_in(key(seed), 0), dataset candidates "
                        "fold_in(., 1), fresh evaluation samples fold_in(., 2)")
    p.add_argument("--lam", type=float, default=5.0, help="λ of Eq. 1 (v_l uses +λ, v_d uses -λ; paper: 5)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="ε, the length of the latent shift (default: the paper's 2.0 in z, 0.2 in w)")
    p.add_argument("--direction-lr", type=float, default=0.05, help="Adam learning rate of the directions (paper: 0.05)")
    p.add_argument("--steps", type=int, default=300, help="direction optimisation steps (paper: 1000)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="latents per direction step (a multiple of --devices; split over the devices)")
    p.add_argument("--min-foreground", type=float, default=0.05,
                   help="refinement: drop samples whose mask has a smaller foreground fraction")
    p.add_argument("--max-foreground", type=float, default=0.8,
                   help="refinement: drop samples whose mask has a larger foreground fraction")
    p.add_argument("--min-change", type=float, default=0.02,
                   help="refinement: drop samples whose mean |G(z+εv_l) - G(z+εv_d)| brightness (images in [0, 1]) "
                        "is smaller")
    p.add_argument("--min-component", type=float, default=0.01,
                   help="refinement: flip foreground components and background holes smaller than this fraction "
                        "of the image")
    p.add_argument("--dataset-samples", type=int, default=512, help="refined (image, mask) pairs written to OUT/dataset")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per dataset shard")
    p.add_argument("--mask-batch-size", type=int, default=16,
                   help="samples per call when masking dataset candidates and evaluation samples")
    p.add_argument("--max-candidates-factor", type=int, default=20,
                   help="give up (with the refinement counts) after this many candidates per requested pair")
    p.add_argument("--arch", choices=ARCHS, default="unet", help="segmenter architecture (gansem.ufgs.models)")
    p.add_argument("--features", type=int, nargs="+", default=None,
                   help="UNet channels per level, finest first (its features option; default: the model's "
                        "(32, 64, 128))")
    p.add_argument("--train-steps", type=int, default=300, help="segmenter training steps")
    p.add_argument("--train-batch-size", type=int, default=16, help="segmenter batch (a multiple of --devices)")
    p.add_argument("--lr", type=float, default=1e-3, help="segmenter peak learning rate (AdamW, cosine schedule)")
    p.add_argument("--eval-samples", type=int, default=64, help="fresh samples the evaluation scores")
    p.add_argument("--labels", default=None,
                   help="reference labeller for the scores: 'faces' (built-in face parts; needs dlib), or "
                        "'module:function' / 'file.py:function' mapping uint8 images [B,H,W,3] to int labels "
                        "[B,H,W]; class 0 is background, every other class foreground")
    p.add_argument("--ignore-label", type=int, default=None, help="reference label value the scores skip")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoints of the direction search and of the segmenter training")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same settings): directions and segmenter from their latest "
                        "checkpoints, a complete dataset kept")
    _common.add_output_args(
        p, devices_help="split every batch over D devices (D simulated CPU devices if fewer exist); results agree "
                        "with one device to float rounding. Default: one device",
        out_help="run directory (absent or empty, or the run to --resume)", out_required=True)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    gen, params, meta = load_generator(args.generator)
    config = DirectionConfig(lam=args.lam, epsilon=args.epsilon, lr=args.direction_lr, steps=args.steps,
                             batch_size=args.batch_size, min_foreground=args.min_foreground,
                             max_foreground=args.max_foreground, min_change=args.min_change,
                             min_component=args.min_component)
    config.check(gen, args.devices or 1)  # before anything is created
    labels = resolve_labels_source(args.labels, args.ignore_label) if args.labels else None
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    info = {"name": meta.get("name"), "checkpoint": args.generator, "family": gen.family}
    command = shlex.join(["python", "launch/latent_direction.py", *(sys.argv[1:] if argv is None else argv)])
    if args.features is not None and args.arch != "unet":
        raise ValueError("--features is a UNet option; leave it out with --arch deeplabv3")
    model_kwargs = {} if args.features is None else {"features": list(args.features)}
    s = run_latent_direction(
        gen, params, config, args.out, seed=args.seed, mesh=mesh, resume=args.resume,
        dataset_samples=args.dataset_samples, shard_size=args.shard_size, mask_batch_size=args.mask_batch_size,
        max_candidates_factor=args.max_candidates_factor, arch=args.arch, model_kwargs=model_kwargs,
        train_steps=args.train_steps, train_batch_size=args.train_batch_size, lr=args.lr,
        eval_samples=args.eval_samples, labels=labels,
        ignore_label=None if labels is None else labels.ignore_label, checkpoint_every=args.checkpoint_every,
        generator_info=info, command=command, progress=not args.no_progress, quiet=args.quiet)
    ev = s["evaluation"]
    score = (f"segmenter fg IoU {ev['table']['segmenter']['iou_fg']:.3f}" if "table" in ev
             else f"segmenter/M(z) agreement mIoU {ev['agreement_miou']:.3f}")
    print(f"{args.out}: {s['dataset']['samples']} pairs, {score}, {sum(s['seconds'].values()):.0f} s; "
          f"see {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
