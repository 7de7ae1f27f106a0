#!/usr/bin/env python
"""Cluster-guided image synthesis (seed paper 002): cluster G_[n](z), learn T_c per cluster by IMLE, evaluate.

Runbook (the embedded 64×64 DigiFace DCGAN, CPU):

    python launch/cluster_sampling.py --out runs/imle-demo              # clusters of block4, C=4
    python launch/cluster_sampling.py --out runs/imle-demo --resume --epochs 80   # train on
    python launch/cluster_sampling.py --out runs/imle-h --clusters 3 --refine 0:block16:3:4   # hierarchical

BigGAN (the paper's cross-class use: clusters and T_c on one class, applied to others):

    python launch/cluster_sampling.py --checkpoint ckpt/biggan-deep-128 --layer <layer> --class-label 207 \
        --transfer-classes 208 281 --out runs/biggan-pose

The run directory's manifest.json says what each output file is; see gansem.methods.cluster_sampling.
"""

import argparse
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.methods.cluster_sampling import ClusterSamplingConfig, run_cluster_sampling
from gansem.methods.latent_clusters import LevelSpec


def _refine(text: str) -> LevelSpec:
    parts = text.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        return LevelSpec(layer=parts[1], num_clusters=int(parts[2]), pool=int(parts[3]) if len(parts) == 4 else 0,
                         parent=int(parts[0]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PARENT:LAYER:C[:POOL], e.g. 0:block16:3:4, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = ClusterSamplingConfig()
    p = argparse.ArgumentParser(
        prog="launch/cluster_sampling.py",
        description=(
            "Cluster-guided synthesis with an unconditional GAN (Georgopoulos et al., seed paper 002): K-means on "
            "the representations G_[n](z) of many latents at one layer (optionally refining a cluster at a later "
            "layer), one mapping T_c per cluster from N(0, I) to the cluster's latents trained by IMLE (Eq. 2-3), "
            "then the assignment accuracy of G(T_c(e)) against the prior, pictures and a report."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--generator", default=d.generator,
                   help="built-in generator name (dcgan-digiface: the 64x64 DigiFace DCGAN of the gan-face-generate "
                        "wheel)")
    g.add_argument("--checkpoint", default=None,
                   help="a gansem checkpoint directory or an original checkpoint file; overrides --generator")
    g.add_argument("--truncation", type=float, default=None,
                   help="truncation for generators that have one (StyleGANs, BigGAN); default: the generator's own")
    g.add_argument("--class-label", type=int, default=None,
                   help="class-conditional generators (BigGAN): the class whose latents are clustered and mapped")
    g.add_argument("--transfer-classes", type=int, nargs="*", default=[],
                   help="BigGAN: apply the T_c learned on --class-label to these classes too (the paper's "
                        "cross-class use) and evaluate them")
    g = p.add_argument_group("clusters")
    g.add_argument("--layer", default=d.levels[0].layer,
                   help="layer n whose representation G_[n](z) is clustered (the DCGAN's: block4, block8, block16, "
                        "block32)")
    g.add_argument("--pool", type=int, default=0,
                   help="0: the flattened feature map (the paper); P: average-pooled to P×P cells first (P=1: "
                        "channel means), for wide layers")
    g.add_argument("--clusters", type=int, default=d.levels[0].num_clusters, help="number of K-means clusters C")
    g.add_argument("--refine", type=_refine, action="append", default=[], metavar="PARENT:LAYER:C[:POOL]",
                   help="hierarchical clusters: re-cluster cluster PARENT of the previous level at a later LAYER "
                        "into C clusters (repeatable); T_c are then learned for the last level's clusters")
    g.add_argument("--num-latents", type=int, default=d.num_latents, help="latent codes sampled and clustered")
    g.add_argument("--kmeans-iters", type=int, default=d.kmeans_iters, help="maximum Lloyd iterations")
    g = p.add_argument_group("IMLE")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help="train until this many epochs are done (each: Γ samples per cluster, nearest-neighbour "
                        "matching, Adam steps)")
    g.add_argument("--num-aux", type=int, default=d.num_aux, help="Γ: auxiliary samples per cluster and epoch")
    g.add_argument("--hidden", type=int, default=d.hidden, help="width of T_c's two hidden layers")
    g.add_argument("--imle-batch-size", type=int, default=d.imle_batch_size, help="matched pairs per Adam step")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="Adam steps per epoch (default: one pass over the largest cluster)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of the first epoch")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="the Adam rate is multiplied by this after every epoch (1: constant)")
    g.add_argument("--no-sphere", dest="sphere", action="store_false",
                   help="leave T_c's outputs unconstrained instead of putting them on the sphere of the prior's RMS "
                        "norm (unconstrained, IMLE in a 100-d latent shrinks them towards the cluster mean)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same settings; --epochs may grow): clusters are loaded, IMLE "
                        "resumes from its latest checkpoint")
    g = p.add_argument_group("evaluation and run")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="samples per cluster for the assignment accuracy (and as many prior samples per cluster)")
    g.add_argument("--diversity-samples", type=int, default=d.diversity_samples,
                   help="images per cluster (T_c samples and training latents) for the image-space diversity of the "
                        "collapse check")
    g.add_argument("--grid-samples", type=int, default=d.grid_samples, help="images per cluster in the pictures")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="generator batch size")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of latents, K-means++, T_c and every sample")
    _common.add_output_args(p, devices_help="split generator batches and K-means rows over N devices (simulated "
                                            "CPU devices if fewer exist); default: one device",
                            out_help="run directory (new or empty; an existing run with --resume)", out_required=True)
    return p


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    levels = (LevelSpec(args.layer, args.clusters, args.pool),) + tuple(args.refine)
    config = ClusterSamplingConfig(
        generator=args.checkpoint or args.generator, truncation=args.truncation, levels=levels,
        class_label=args.class_label, transfer_classes=tuple(args.transfer_classes), num_latents=args.num_latents,
        kmeans_iters=args.kmeans_iters, hidden=args.hidden, num_aux=args.num_aux,
        imle_batch_size=args.imle_batch_size, lr=args.lr, lr_decay=args.lr_decay, sphere=args.sphere,
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, checkpoint_every=args.checkpoint_every,
        eval_samples=args.eval_samples, diversity_samples=args.diversity_samples, grid_samples=args.grid_samples,
        batch_size=args.batch_size, seed=args.seed)
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    run_cluster_sampling(config, args.out, resume=args.resume, mesh=mesh, progress=not args.no_progress,
                         quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
