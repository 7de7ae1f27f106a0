#!/usr/bin/env python
"""Labels4Free (seed paper 001): unsupervised fg/bg masks from a frozen StyleGAN2.

    python launch/labels4free.py --out runs/l4f-demo                         # CPU demo, fixture StyleGAN2
    python launch/labels4free.py --generator checkpoints/ffhq --config ffhq --devices 1 \
        --labels faces --eval-samples 1000 --out runs/l4f-ffhq              # the paper's FFHQ setting
    python launch/labels4free.py --generator checkpoints/ffhq --config ffhq --out runs/l4f-ffhq --resume

Writes the run directory of :mod:`gansem.methods.labels4free_run` (model.json, analysis.json,
checkpoints/, metrics.jsonl, panels.png, curves.png, eval/images, report.md, report.json,
manifest.json). Named configs carry the paper's per-dataset settings
(:data:`gansem.methods.labels4free.CONFIGS`).
"""

import argparse
import dataclasses
import os
import shlex
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.methods.labels4free import CONFIGS, config_by_name
from gansem.methods.labels4free_run import fit_labels4free
from gansem.references import resolve_labels_source
from gansem.zoo import load_generator

DEMO_GENERATOR = os.path.join(_common.ROOT, "tests", "fixtures", "stylegan2_ada", "uncond32.pkl")


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/labels4free.py",
        description="Labels4Free: an alpha network on the frozen StyleGAN2's features predicts a soft foreground "
                    "mask M; the composite M*G(z) + (1-M)*G_bg(z'), with G_bg the generator whose first layer is "
                    "switched off, is trained against a weak StyleGAN2 discriminator (from scratch) that sees "
                    "samples of G as real. Needs an unconditional StyleGAN2 (skip architecture): StyleGAN (v1), "
                    "PGGAN, DCGAN and BigGAN are refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--generator", default=DEMO_GENERATOR,
                   help="a gansem StyleGAN2 checkpoint directory (python -m weights_port convert ffhq.pkl "
                        "checkpoints/ffhq) or an original StyleGAN2 .pkl/.pt file; default: the random-weight 32 px "
                        "test fixture (mechanics only: its images are noise)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-demo",
                   help="named hyper-parameters: ffhq (1000 it, λ1=1.2, ψ=1, alpha from 32 px), lsun-cat (900 it, "
                        "λ1=λ2=3, ψ=0.5, from 8 px), lsun-horse (500 it, λ1=λ2=3, ψ=1, from 8 px), lsun-car (250 it, "
                        "λ1=λ2=20, ψ=0.3, from 16 px); all lr 2e-4, batch 8, D loss weight 0.1, φ=0.25 on LSUN; "
                        "cpu-demo: 60 steps, small discriminator, start chosen by the tRGB analysis")
    p.add_argument("--steps", type=int, default=None, help="training iterations (overrides the config)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch, a multiple of --devices and of the minibatch-std group (config: 8)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of both networks (config: 2e-4)")
    p.add_argument("--truncation", type=float, default=None, help="ψ of G(z) and of the real samples (config)")
    p.add_argument("--lambda-b", type=float, default=None, help="λ1, weight of B(M) = min(M, 1-M) (config)")
    p.add_argument("--lambda-c", type=float, default=None, help="λ2, weight of C(M) = ReLU(φ1 - mean M) (config)")
    p.add_argument("--lambda-e", type=float, default=None,
                   help="weight of E(M) = ReLU(φ2 - mean(1-M)) (config: 0, the paper gives no value)")
    p.add_argument("--phi-c", type=float, default=None, help="φ1 of C (config: 0.25)")
    p.add_argument("--phi-e", type=float, default=None, help="φ2 of E (config: 0.25)")
    p.add_argument("--alpha-start", type=int, default=None,
                   help="lowest feature resolution the alpha network reads (config; 0: choose it by the tRGB "
                        "noise-SSIM analysis)")
    p.add_argument("--bg-channels", type=int, nargs="+", default=None,
                   help="switch off only these channels of the first layer in G_bg (default: all, the paper's "
                        "safe strategy)")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="foreground where M > this, for the scores (config: 0.5; 0.9 on LSUN as the paper's Tab. 2)")
    p.add_argument("--seed", type=int, default=None, help="initialisation and every latent of the run (config: 0)")
    p.add_argument("--analysis-samples", type=int, default=8,
                   help="samples of the layer analyses (tRGB noise SSIM, gradient scores); 0 skips them")
    p.add_argument("--eval-samples", type=int, default=16,
                   help="fresh samples whose masks are scored and written to OUT/eval/images (paper: 1000)")
    p.add_argument("--panels", type=int, default=6, help="samples drawn in panels.png")
    p.add_argument("--labels", default=None,
                   help="reference labeller of generated images for the scores: 'faces' (built-in; foreground = "
                        "face parts, not the paper's BiSeNet person masks) or 'module:function' / "
                        "'file.py:function' mapping uint8 [B,H,W,3] to int [B,H,W]; class 0 is background")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="reference label value the scores skip (of --labels or of the --eval-folder masks)")
    p.add_argument("--eval-folder", default=None,
                   help="labelled folder (DIR/images/eval_<i>.png + DIR/masks/eval_<i>.png, 0 = background) with "
                        "masks of this run's OUT/eval/images: score against it instead of --labels (with --resume "
                        "on a finished run: only the evaluation and the report are redone)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between Orbax checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between fetches of the losses")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (same generator and settings)")
    _common.add_output_args(
        p, devices_help="train data-parallel over D devices (D simulated CPU devices if fewer exist); the same "
                        "losses to float rounding on any count dividing the batch. Default: one device",
        out_help="run directory (new or empty, or an existing run with --resume)", out_required=True)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    gen, params, meta = load_generator(args.generator)
    start = args.alpha_start
    cfg = config_by_name(args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         truncation=args.truncation, lambda_b=args.lambda_b, lambda_c=args.lambda_c,
                         lambda_e=args.lambda_e, phi_c=args.phi_c, phi_e=args.phi_e,
                         mask_threshold=args.mask_threshold, seed=args.seed,
                         bg_channels=tuple(args.bg_channels) if args.bg_channels else None)
    if start is not None:
        cfg = dataclasses.replace(cfg, alpha_start=start or None)
    labels = resolve_labels_source(args.labels, args.ignore_label) if args.labels else None
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    info = {"name": meta.get("name"), "checkpoint": os.path.abspath(args.generator)}
    command = shlex.join(["python", "launch/labels4free.py", *(sys.argv[1:] if argv is None else argv)])
    out = fit_labels4free(
        gen, params, cfg, args.out, resume=args.resume, mesh=mesh, generator_info=info,
        analysis_samples=args.analysis_samples, eval_samples=args.eval_samples, num_panels=args.panels,
        labels=labels, eval_folder=args.eval_folder, folder_ignore_label=args.ignore_label,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, progress=not args.no_progress, quiet=args.quiet, command=command)
    ev = out.summary["evaluation"]
    scores = ev["scores"]
    tail = ("no reference labels (no scores)" if scores is None else
            ", ".join(f"{k} {scores[k]:.3f}" for k in ("acc", "iou_fg", "iou_bg", "miou", "f1", "max_f_beta")))
    if not args.quiet:
        print(f"{args.out}: {out.summary['steps']} steps, mean mask {ev['mask_mean']:.3f}; {tail}; "
              f"see {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
