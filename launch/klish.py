#!/usr/bin/env python
"""KLiSH end to end: sample a GAN, cluster its pixel features, record the merge trajectory.

Runbook (the embedded default, a 64×64 DigiFace DCGAN, 2-core CPU):

    python launch/klish.py --out runs/dcgan            # see README for measured times
    python launch/klish.py --devices 8 --out runs/d8   # same trajectory, 8 simulated CPU devices
    python launch/klish.py --out runs/dcgan --resume   # continue an interrupted run

Any supported checkpoint works too:

    python -m weights_port convert ffhq.pkl ckpt/ffhq
    python launch/klish.py --checkpoint ckpt/ffhq --resolution 256 --num-images 256 --devices 8

Several processes (hosts), with jax.distributed: start the same command on every host,

    python launch/klish.py --devices 16 --out /shared/runs/d16 \
        --coordinator host0:12355 --num-processes 4 --process-id I      # I = 0..3

or, on a SLURM / Open MPI / TPU / Kubernetes cluster, --distributed (JAX reads the rest from the
environment). Each process extracts the features of its own images and holds only its own rows;
the trajectory is bit-identical to one process with the same device count. --out must be on a
filesystem every process sees.

The run directory's manifest.json says what each output file is.
"""

import argparse
import os
import sys

import _common  # first: puts gansem on the import path
import jax

from gansem import sharding
from gansem.generators import GeneratorError
from gansem.pipeline import ConfigError, KlishJobConfig, run_klish_job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/klish.py",
        description=(
            "Run KLiSH (K-means with Linear Separability Heuristic, Xu et al., TPAMI) on a pretrained GAN: "
            "generator features → K-means++ with K0 clusters → one-vs-rest L2-SVMs (Eq. 3, L-BFGS) → "
            "IoU (Eq. 4) / ECoS (Eq. 5) → merge the least separable cluster into the one that confuses it "
            "most, K0-1 times. Writes the Orbax trajectory, cluster-map pictures, a plot and a report."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--generator", default="dcgan-digiface",
                   help="built-in generator name (dcgan-digiface: the 64x64 DigiFace DCGAN whose weights ship "
                        "in the gan-face-generate wheel)")
    g.add_argument("--checkpoint", default=None,
                   help="a gansem checkpoint directory (python -m weights_port convert SRC DST) or an original "
                        "checkpoint file (NVIDIA .pkl, rosinality .pt, genforce .pth, BigGAN pytorch_model.bin); "
                        "overrides --generator")
    g.add_argument("--truncation", type=float, default=None,
                   help="truncation ψ for generators that have one (StyleGAN family, BigGAN); default: the "
                        "generator's own setting")
    g = p.add_argument_group("data")
    g.add_argument("--num-images", type=int, default=256,
                   help="number of generated samples whose pixels are clustered (the paper uses 256)")
    g.add_argument("--resolution", type=int, default=16,
                   help="common resolution R the selected feature maps are bilinearly resized to; "
                        "pixels clustered = num-images × R² (the paper uses 256 for 1024-px GANs, a quarter of "
                        "the image size; 16 for the 64-px DCGAN)")
    g.add_argument("--channel-budget", type=int, default=1000,
                   help="layer rule: last layer of each resolution, from high to low resolution, while the total "
                        "channel count stays within this budget")
    g.add_argument("--seed", type=int, default=0, help="seed for latents, K-means++ and everything random")
    g.add_argument("--batch-size", type=int, default=16,
                   help="images each device generates per step of feature extraction (the features' bits do not "
                        "depend on it being split over 1 or many devices; lower it if the generator runs out of memory)")
    g = p.add_argument_group("clustering")
    g.add_argument("--k0", type=int, default=100, help="initial number of K-means clusters K0")
    g.add_argument("--no-filter", action="store_true",
                   help="skip the initial-cluster filter (drop clusters whose inverse-sigmoid IoU is below "
                        "mean - std, then re-run K-means); the filter is on by default as in the paper")
    g.add_argument("--kmeans-iters", type=int, default=20, help="maximum Lloyd iterations after K-means++")
    g.add_argument("--lam", type=float, default=5000.0, help="λ1 of Eq. 3 (SVM loss weight)")
    g.add_argument("--tol", type=float, default=1e-4,
                   help="SVM convergence: L∞ change of W below this (guarded against premature stops)")
    g.add_argument("--svm-max-iter", type=int, default=3000,
                   help="L-BFGS iteration limit per solve; solves that hit it are reported as not converged")
    g.add_argument("--retrain", choices=("merged", "all"), default="merged",
                   help="after each merge re-solve only the merged class (exact: Eq. 3 is a sum of independent "
                        "binary SVMs) or all classes jointly as the original implementation does")
    g.add_argument("--solver", choices=("lbfgs", "newton"), default="lbfgs",
                   help="SVM solver, both exact (same optimum of Eq. 3, same stopping rule): jaxopt L-BFGS "
                        "preconditioned by the active-set Hessian, or the primal finite Newton method "
                        "(Cholesky of the active-set Hessian + exact line search)")
    g = p.add_argument_group(
        "fidelity",
        "Switchable deviations from the paper for small runs (README, 'Fidelity'); --paper turns all of them off")
    g.add_argument("--paper", action="store_true",
                   help="paper-faithful clustering: raw features (no layer balance, no PCA) and IoU/ECoS on the "
                        "training pixels (no held-out images); the flags below override single settings")
    d = KlishJobConfig()
    g.add_argument("--feature-balance", choices=("layer", "none"), default=argparse.SUPPRESS,
                   help="scale each feature layer to the same share of the total variance ('layer'), or use the "
                        f"raw concatenation ('none', the paper). Default: {d.feature_balance} (none with --paper)")
    g.add_argument("--pca-dim", type=int, default=argparse.SUPPRESS,
                   help="cluster in the top d principal directions of the (balanced) features (centred, not "
                        f"whitened); 0: no projection (the paper). Default: {d.pca_dim} (0 with --paper)")
    g.add_argument("--holdout", dest="holdout", action="store_true", default=argparse.SUPPRESS,
                   help="train the SVMs on the even-numbered images and count IoU (Eq. 4) and ECoS (Eq. 5) on the "
                        "odd-numbered ones, so separability means generalisation to unseen pixels (default; off "
                        "with --paper)")
    g.add_argument("--no-holdout", dest="holdout", action="store_false", default=argparse.SUPPRESS,
                   help="train and count on the same pixels, as the paper does")
    g.add_argument("--select-threshold", type=float, default=d.select_threshold,
                   help="φ* of the paper: the report presents the first K (from K0 down) whose minimum IoU "
                        "reaches it, next to fixed Ks")
    g = p.add_argument_group("run")
    g.add_argument("--devices", type=int, default=None,
                   help="number of devices to shard pixels over; on a machine with fewer devices N CPU devices "
                        "are simulated (results are identical for any count dividing 8). Default: all devices")
    g.add_argument("--out", default=None, help="run directory (default: runs/<generator>-k<K0>-s<seed>)")
    g = p.add_argument_group(
        "several processes",
        "jax.distributed: run the same command in every process; --devices counts the devices of all processes")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT where process 0 serves the coordination service (with --num-processes and "
                        "--process-id)")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes taking part")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0..num-processes-1")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose coordinator, size and index JAX reads from the cluster "
                        "environment (SLURM, Open MPI, TPU pods, Kubernetes)")
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds without a heartbeat after which a process counts as lost and the others stop")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last intact merge step (same flags required; an error "
                        "if --out holds no run)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--quiet", action="store_true", help="no log lines")
    return p


def _lost_peer(e: BaseException) -> bool:
    """Whether an exception is a collective or coordination failure (another process is gone)."""
    msg = str(e)
    return any(s in msg for s in ("Gloo", "Connection closed", "Connection reset", "heartbeat", "coordination",
                                  "UNAVAILABLE", "DEADLINE_EXCEEDED", "NCCL"))


def _report_lost_peer(e: BaseException, out: str):
    """Say which process lost whom and how to continue, then exit at once (status 3)."""
    print(f"error: process {jax.process_index()} lost contact with the other processes "
          f"({str(e).splitlines()[0][:200]}): one was killed, crashed or cut off. Every completed merge step "
          f"is saved in {out}; start all {jax.process_count()} processes again with the same flags and --resume",
          file=sys.stderr, flush=True)
    os._exit(3)  # skip JAX's shutdown barrier, which would abort with a long log now that a peer is gone


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    multi = args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if multi:
        try:  # before JAX starts; on CPU each process simulates its share of --devices
            if args.num_processes and args.devices is not None and args.devices % args.num_processes:
                raise sharding.DeviceError(f"--devices {args.devices} cannot be split evenly over "
                                           f"{args.num_processes} processes")
            local = None if (args.devices is None or not args.num_processes) else args.devices // args.num_processes
            sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                            local_devices=local, heartbeat_timeout_s=args.heartbeat_timeout)
        except sharding.DeviceError as e:
            return _common.fail(e)
    else:
        status = _common.setup_devices(args.devices)  # before JAX starts
        if status:
            return status

    spec = args.checkpoint or args.generator
    fidelity = {k: getattr(args, k) for k in ("feature_balance", "pca_dim", "holdout") if hasattr(args, k)}
    config = (KlishJobConfig.paper if args.paper else KlishJobConfig)(
        **fidelity, select_threshold=args.select_threshold,
        generator=spec, num_images=args.num_images, resolution=args.resolution, k0=args.k0, seed=args.seed,
        channel_budget=args.channel_budget, filter_clusters=not args.no_filter, lam=args.lam, tol=args.tol,
        svm_max_iter=args.svm_max_iter, kmeans_iters=args.kmeans_iters, retrain=args.retrain,
        solver=args.solver,
        truncation=args.truncation, batch_size=args.batch_size,
    )
    name = os.path.basename(os.path.normpath(spec))
    out = args.out or os.path.join("runs", f"{name}-k{args.k0}-s{args.seed}")
    try:
        summary = run_klish_job(config, out, devices=args.devices, resume=args.resume,
                                progress=not args.no_progress, quiet=args.quiet)
    except (ConfigError, GeneratorError, sharding.DeviceError, ValueError, RuntimeError) as e:
        if multi and _lost_peer(e):
            _report_lost_peer(e, out)
        if isinstance(e, RuntimeError) and not isinstance(e, sharding.DeviceError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file of the run directory cannot be written or read (disk full, permissions)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python launch/klish.py {' '.join(sys.argv[1:])} --resume"
              if "--resume" not in sys.argv else "\ninterrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    if not args.quiet:
        t = summary["timings"]
        print(f"[gansem] done in {t.get('total_s', 0):.0f}s: {os.path.join(out, 'report.md')} "
              f"(manifest: {os.path.join(out, 'manifest.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
