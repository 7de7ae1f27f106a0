#!/usr/bin/env python
"""Evaluate a UFGS segmenter as in KLiSH Tab. 5 / Tab. 6: name its clusters with M labelled images, score the rest.

Runbook:

    # real images: a folder (DIR/images/<name>.png|jpg, DIR/masks/<name>.png with class ids, optional
    # DIR/classes.txt); 200 validation images (2 x the largest M) form the matching pool, every test image is scored
    python launch/evaluate_segmenter.py --model runs/ufgs-unet --labels data/celebamask_test \
        --match-labels data/celebamask_val --ignore-label 255 --out runs/ufgs-unet/eval

    # generated images labelled by the built-in face-part labeller (dlib landmarks): matching and test images
    # are fresh samples of the KLiSH run's generator (model.json's klish_run, or --run); the KLiSH classifier
    # itself is scored on the same samples
    python launch/evaluate_segmenter.py --model runs/ufgs-dcgan --labels faces --num-test 500 \
        --num-match 1,10,100 --repeats 5 --few-shot-steps 2000 --out runs/ufgs-dcgan/eval

    # a prepared tensorflow-datasets split (pip install 'gansem[tfds]'; never downloads)
    python launch/evaluate_segmenter.py --model runs/ufgs-car --labels tfds:MY_DATASET:test \
        --match-labels tfds:MY_DATASET:validation --tfds-label-key segmentation_mask --num-test 500 ...

For every M of --num-match and each of --repeats draws of M images from the matching pool (the same draws for
every row): the UFGS segmenter with clusters matched to classes on the M images (greedy maximum-matching mIoU,
Algorithm 2); the KLiSH classifier matched the same way (generated labels only); and the few-shot baseline, the
same network trained directly on the M labelled images for --few-shot-steps steps. Writes to --out:
results.json (every number), tables.md (Tab. 5: mIoU ± std over repeats and the number of labelled images;
Tab. 6: per-class IoU), examples.png (test images, reference, matched predictions) and manifest.json.
"""

import argparse
import json
import os
import sys

import _common  # first: puts gansem on the import path

from gansem import sharding
from gansem.references.sources import EvaluationError
from gansem.segment import Segmenter
from gansem.ufgs.evaluate import REPORT_FILES, evaluate_segmenter, network_few_shot_trainer
from gansem.ufgs.labelled import is_generator_labeller
from gansem.ufgs.predict import TrainedSegmenter

#: Key of the KLiSH run directory in the UFGS model's ``model.json`` (used when --run is not given).
KLISH_RUN_KEY = "klish_run"


def _int_list(s: str):
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/evaluate_segmenter.py",
        description=(
            "Evaluate a UFGS segmentation network (trained on a KLiSH run's generated image/cluster-mask dataset) "
            "on labelled images as in KLiSH Tab. 5/6: clusters are matched to classes with M labelled images "
            "(Algorithm 2), scored on disjoint test images, and compared with the KLiSH classifier itself "
            "(generated images) and a few-shot baseline trained on the same M images."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the UFGS segmenter's training directory (its model.json)")
    p.add_argument("--run", default=None,
                   help=f"KLiSH run directory whose generator draws generated matching/test images and whose "
                        f"classifier is scored too; default: the model.json key '{KLISH_RUN_KEY}'")
    p.add_argument("--k", type=int, default=None,
                   help="K of the KLiSH classifier (must equal the segmenter's number of clusters); default the "
                        "segmenter's")
    p.add_argument("--labels", required=True,
                   help="test labels: 'faces' (built-in face-part labeller) or a callable 'module:function' / "
                        "'file.py:function' (images uint8 [B,H,W,3] -> int labels [B,H,W]) applied to fresh "
                        "samples of the run's generator; a folder DIR (DIR/images/<name>.png|jpg, "
                        "DIR/masks/<name>.png with class ids, optional DIR/classes.txt); 'tfds:NAME[:SPLIT]' (a "
                        "prepared tensorflow-datasets split, default split test); or an .npz labels file (images, "
                        "latents, labels). Without --match-labels the matching pool comes from the same source, "
                        "disjoint from the test images")
    p.add_argument("--match-labels", default=None,
                   help="where the matching images come from (same forms as --labels), e.g. a validation split; "
                        "default: --labels")
    p.add_argument("--num-match", type=_int_list, default=[1, 10, 100],
                   help="comma-separated numbers M of labelled images used to match clusters to classes (and to "
                        "train the few-shot baseline); each at most the matching pool size")
    p.add_argument("--repeats", type=int, default=5, help="draws of the M images per M (mean ± std over them)")
    p.add_argument("--match-pool", type=int, default=None,
                   help="images the M-image draws come from (generated labels: samples drawn, skipped ones "
                        "dropped); default 2 x the largest M")
    p.add_argument("--num-test", type=int, default=None,
                   help="test images: samples drawn with generated labels (required then), otherwise at most this "
                        "many (default all the images not in the matching pool)")
    p.add_argument("--few-shot-steps", type=int, default=2000,
                   help="training steps of each few-shot network (one per M and repeat); 0: no few-shot rows")
    p.add_argument("--few-shot-arch", default=None,
                   help="architecture of the few-shot network; default the UFGS model's (model.json 'arch')")
    p.add_argument("--few-shot-batch-size", type=int, default=8, help="batch size of the few-shot training")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the M-image draws, the few-shot trainings, the choice of real images and the "
                        "generated samples' evaluation stream (disjoint from the run's clustering samples)")
    p.add_argument("--ignore-label", type=int, default=None,
                   help="reference label of unlabelled pixels (e.g. 255; 'faces' sets 255 itself)")
    p.add_argument("--match-average", choices=("image", "dataset"), default="image",
                   help="IoU averaging of Algorithm 2 on the M matching images: per image (original KLiSH "
                        "evaluation) or pixels pooled")
    p.add_argument("--batch-size", type=int, default=16, help="images per segmenter / generator call")
    p.add_argument("--num-examples", type=int, default=4, help="test images shown in examples.png")
    p.add_argument("--tfds-data-dir", default=None, help="tensorflow-datasets data_dir (default TFDS' own)")
    p.add_argument("--tfds-manual-dir", default=None,
                   help="folder with the manually downloaded archives of a tfds dataset that is not prepared yet "
                        "(built from them without network; TFDS' usual place is <data_dir>/downloads/manual)")
    p.add_argument("--tfds-image-key", default=None, help="tfds feature holding the RGB image (default 'image')")
    p.add_argument("--tfds-label-key", default=None,
                   help="tfds feature holding the class-id map (default: the only other image feature)")
    _common.add_output_args(
        p, devices_help="devices for the few-shot training and the generator batches (N simulated CPU devices if "
                        "fewer exist); default one",
        out_help="output folder (default: MODEL/eval)")
    return p


def read_model_config(model_dir: str) -> dict:
    """The UFGS model's ``model.json`` (``{}`` if absent)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir!r} is not a directory; give a UFGS segmenter's training folder")
    path = os.path.join(model_dir, "model.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{path} cannot be read as JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise EvaluationError(f"{path} is not a JSON object")
    return cfg


def load_ufgs_predictor(model_dir: str, mesh) -> TrainedSegmenter:
    """The trained UFGS segmenter: ``.predict(images uint8 [N,H,W,3]) -> int32 [N,H,W]`` and ``.num_classes``."""
    return TrainedSegmenter.load(model_dir, mesh=mesh)


def make_few_shot_trainer(arch: str, steps: int, batch_size: int, resolution: int, mesh, model_kwargs=None):
    """The few-shot baseline: :func:`gansem.ufgs.evaluate.network_few_shot_trainer`."""
    return network_few_shot_trainer(arch, steps, batch_size, resolution, mesh=mesh, model_kwargs=model_kwargs)


def klish_run_of(model_cfg: dict):
    """The KLiSH run a UFGS model's data came from: ``model.json``'s key, else the dataset index's ``run_dir``."""
    data_meta = (model_cfg.get("data") or {}).get("meta") or {}
    return model_cfg.get(KLISH_RUN_KEY) or data_meta.get("run_dir")


@_common.user_errors
def main(argv=None) -> int:
    args = _common.parse_with_devices(build_parser(), argv)
    for flag in ("repeats", "batch_size", "few_shot_batch_size"):
        if getattr(args, flag) < 1:
            return _common.fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.few_shot_steps < 0:
        return _common.fail(f"--few-shot-steps must be >= 0, got {args.few_shot_steps}")
    model_cfg = read_model_config(args.model)
    out = args.out or os.path.join(args.model, "eval")
    mesh = sharding.make_mesh(args.devices) if args.devices else None
    net = load_ufgs_predictor(args.model, mesh)
    k = int(net.num_classes)
    if args.k is not None and args.k != k:
        return _common.fail(f"--k {args.k}: the UFGS segmenter predicts {k} clusters; the KLiSH classifier must "
                            "be the one at that K")
    generated = any(is_generator_labeller(s) for s in (args.labels, args.match_labels) if s is not None)
    npz = any(str(s).endswith(".npz") for s in (args.labels, args.match_labels) if s is not None)
    run_dir = args.run or klish_run_of(model_cfg)
    if generated and not run_dir:
        return _common.fail(f"--labels {args.labels!r} labels generated samples: give the KLiSH run (--run), or a "
                            f"model whose model.json names it ('{KLISH_RUN_KEY}')")
    segmenter = Segmenter.from_run(run_dir, k=k, mesh=mesh) if run_dir and (generated or npz) else None
    trainer = None
    arch = args.few_shot_arch or model_cfg.get("arch", "unet")
    if args.few_shot_steps:
        kwargs = model_cfg.get("model_kwargs") or {} if arch == model_cfg.get("arch") else {}
        trainer = make_few_shot_trainer(arch, args.few_shot_steps, args.few_shot_batch_size, int(net.resolution), mesh,
                                        model_kwargs=kwargs)
    tfds_options = {k: v for k, v in (("data_dir", args.tfds_data_dir), ("manual_dir", args.tfds_manual_dir),
                                      ("image_key", args.tfds_image_key), ("label_key", args.tfds_label_key)) if v}
    manifest = {
        "command": ["launch/evaluate_segmenter.py"] + list(sys.argv[1:] if argv is None else argv),
        "inputs": {"model": os.path.abspath(args.model), "klish_run": os.path.abspath(run_dir) if run_dir else None,
                   "klish_run_from": ("--run" if args.run else f"model.json '{KLISH_RUN_KEY}'") if run_dir else None,
                   "k": k, "labels": args.labels, "match_labels": args.match_labels},
        "few_shot": ({"arch": arch, "steps": args.few_shot_steps, "batch_size": args.few_shot_batch_size}
                     if trainer else None),
    }
    table = evaluate_segmenter(
        net.predict, args.labels, num_clusters=k, segmenter=segmenter, match_labels=args.match_labels,
        few_shot_trainer=trainer, num_match=args.num_match, repeats=args.repeats, num_test=args.num_test,
        match_pool=args.match_pool, seed=args.seed, ignore_label=args.ignore_label,
        match_average=args.match_average, batch_size=args.batch_size, num_examples=args.num_examples,
        tfds_options=tfds_options, out_dir=out, manifest=manifest,
        progress=not args.no_progress, quiet=args.quiet)
    files = table.results["files"]
    if not args.quiet:
        with open(files["tables.md"]) as f:
            print(f.read())
        print(f"[gansem] done in {table.results['timings']['total_s']:.0f}s: "
              + ", ".join(files[n] for n in REPORT_FILES if n in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
