#!/usr/bin/env python
"""Train a SPADE generator on (KLiSH cluster mask, generated image) pairs: USCS (KLiSH Sec. 5).

    python launch/make_dataset.py --run runs/dcgan --k 8 --num-samples 5000 --out runs/ufgs-data-k8
    python launch/train_uscs.py --data runs/ufgs-data-k8 --steps 3000 --out runs/uscs-k8
    python launch/train_uscs.py --data runs/ufgs-data-k8 --steps 6000 --out runs/uscs-k8 --resume

``--data`` is a UFGS dataset directory (``gansem.ufgs.records``) or an ``.npz`` in the layout
``launch/segment.py`` writes (``images`` uint8 [N, H, W, 3], ``labels`` int32 [N, H, W], ``k``).
``--config cpu`` (default) is a 1/8-width SPADE for 64 px pairs on a CPU; ``--config paper``
is the SPADE reference networks for 256 px pairs on a GPU. The run directory gets model.json,
checkpoints/, metrics.jsonl, samples/ (mask | generated | real), curves.png, summary.json and
manifest.json (see ``gansem.uscs.train``); ``gansem.uscs.synth.load_synthesizer(RUN)`` opens it.
"""

import argparse
import os
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.ufgs import records
from gansem.uscs.models import CONFIGS, spade_config
from gansem.uscs.train import fit_uscs


def _int_tuple(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(
        prog="launch/train_uscs.py",
        description="Train a SPADE (GauGAN) mask-to-image generator on generated images and their KLiSH masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True,
                   help="UFGS dataset directory (launch/make_dataset.py), or an .npz written by launch/segment.py "
                        "(images, labels, k)")
    p.add_argument("--steps", type=int, required=True, help="train until this many steps are done")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (same settings and data); "
                        "a larger --steps extends it")
    p.add_argument("--config", choices=tuple(CONFIGS), default="cpu",
                   help="network sizes: 'cpu' (1/8-width SPADE, 64 px pairs on a CPU) or 'paper' (the SPADE "
                        "reference, 256 px on a GPU); the model flags below override single fields")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step, a multiple of --devices")
    p.add_argument("--g-lr", type=float, default=1e-4, help="generator Adam learning rate (TTUR)")
    p.add_argument("--d-lr", type=float, default=4e-4, help="discriminator Adam learning rate (TTUR)")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 of both optimisers")
    p.add_argument("--beta2", type=float, default=0.9, help="Adam beta2 of both optimisers")
    p.add_argument("--lambda-fm", type=float, default=10.0, help="weight of the discriminator feature-matching loss")
    p.add_argument("--lambda-kl", type=float, default=0.05, help="weight of the KL term (with --use-vae)")
    p.add_argument("--seed", type=int, default=0, help="data order, initialisation and noise")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="hold out the last N pairs of --data (never trained on; shown in the sample grids and "
                        "offered as examples by the painting page). Default: 5%%, at most 200")
    p.add_argument("--num-samples", type=int, default=8, help="held-out pairs in each sample grid")
    p.add_argument("--sample-every", type=int, default=500, help="write a sample grid every N steps (and after the last)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (and after the last)")
    p.add_argument("--data-threads", type=int, default=2, help="threads reading batches ahead")
    m = p.add_argument_group("model (override single fields of --config)")
    m.add_argument("--ngf", type=int, help="generator width: level i has ngf * mults[i] channels")
    m.add_argument("--mults", type=_int_tuple, help="channel multipliers per resolution level, lowest first "
                                                    "(comma-separated, e.g. 16,16,8,4,2,1); R must be divisible by "
                                                    "2^(levels - 1)")
    m.add_argument("--blocks", type=_int_tuple, help="SPADE residual blocks per level (comma-separated, one per "
                                                     "multiplier; default: the configuration's, or one per level "
                                                     "when --mults changes the number of levels)")
    m.add_argument("--spade-hidden", type=int, help="channels of the shared convolution in each SPADE layer")
    m.add_argument("--norm", choices=("batch", "instance"), help="parameter-free normalisation inside SPADE")
    m.add_argument("--no-spectral", action="store_true", help="no spectral normalisation")
    m.add_argument("--use-vae", action="store_true", help="add SPADE's style encoder (VAE, KL loss); the generator "
                                                          "then starts from a style vector")
    m.add_argument("--z-dim", type=int, help="style vector length (with --use-vae)")
    m.add_argument("--ndf", type=int, help="discriminator width (first layer)")
    m.add_argument("--d-layers", type=int, help="4x4 convolutions of each PatchGAN before its logits")
    m.add_argument("--num-d", type=int, help="number of discriminator scales")
    _common.add_output_args(
        p, devices_help="train data-parallel over N devices (N simulated CPU devices if fewer exist). Default: 1",
        out_help="run directory (new, or an existing one with --resume)", out_required=True)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    config = spade_config(args.config, ngf=args.ngf, mults=args.mults, blocks=args.blocks,
                          spade_hidden=args.spade_hidden, norm=args.norm, spectral=False if args.no_spectral else None,
                          use_vae=True if args.use_vae else None, z_dim=args.z_dim, ndf=args.ndf,
                          d_layers=args.d_layers, num_d=args.num_d)
    source = records.load_pairs(args.data)
    synth = fit_uscs(
        source, steps=args.steps, batch_size=args.batch_size, out_dir=args.out, resume=args.resume, seed=args.seed,
        mesh=sharding.make_mesh(args.devices or 1), config=config, g_lr=args.g_lr, d_lr=args.d_lr,
        beta1=args.beta1, beta2=args.beta2, lambda_fm=args.lambda_fm, lambda_kl=args.lambda_kl,
        eval_samples=args.eval_samples, num_samples=args.num_samples, sample_every=args.sample_every,
        checkpoint_every=args.checkpoint_every, data_threads=args.data_threads,
        data_info={"path": os.path.abspath(args.data)}, progress=not args.no_progress, quiet=args.quiet)
    if not args.quiet:
        final = (synth.summary or {}).get("final") or {}
        losses = ", ".join(f"{k} {v:.3f}" for k, v in final.items() if v is not None)
        print(f"trained {args.out}: step {synth.step}" + (f" (last 10 steps: {losses})" if losses else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
