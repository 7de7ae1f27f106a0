#!/usr/bin/env python
"""Fidelity ablation: what each candidate cause of the merge-trajectory collapse does, measured.

Each variant is a full main job (``gansem.pipeline.run_klish_job``, the code behind
``launch/klish.py``) on the bundled DCGAN, followed by the Tab. 4 evaluation
(``gansem.evaluation.evaluate_run``, the code behind ``launch/evaluate.py``) against
the built-in face-part labeller (``--labels faces``) on fresh samples, with the
K-means baseline fitted on the same pixels in the same clustering space. Per K it
reports KLiSH's and K-means' greedy-matching mIoU (pooled over the dataset and
averaged per image) and the share of the pixels held by the largest KLiSH cluster.

    python benchmarks/ablation_fidelity.py --workdir runs/ablation --out ablation.json
    python benchmarks/ablation_fidelity.py --variants paper,default --eval-samples 200

Variants (``--variants``, comma-separated; ``all`` for every one):
    paper            raw features, IoU/ECoS on the training pixels (the paper's setting), 256 × 16²
    paper-res32      the same pixel count clustered at 32² (64 images)
    balance          + layer balance only
    pca32            + PCA to 32 dimensions only (no balance)
    balance-pca32    + balance and PCA, statistics on the training pixels
    holdout          + held-out IoU/ECoS only (raw features)
    holdout-balance  + held-out statistics and balance (D = 960)
    holdout-pca32    + held-out statistics and PCA (no balance)
    default          held-out statistics, balance, PCA 32 (launch/klish.py's default)
    default-pca16    the default with PCA 16
    default-pca64    the default with PCA 64
    default-nofilter the default without the initial-cluster filter

Results go to ``--out`` (JSON, written after every variant) and a markdown table on stdout.
Each variant is a full main job; the ones that cluster raw D = 960 features are the slow ones
(run times in benchmarks/README.md, "Fidelity ablation").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PAPER = dict(feature_balance="none", pca_dim=0, holdout=False)
DEFAULT = dict(feature_balance="layer", pca_dim=32, holdout=True)
VARIANTS = {
    "paper": PAPER,
    "paper-res32": {**PAPER, "num_images": 64, "resolution": 32},
    "balance": {**PAPER, "feature_balance": "layer"},
    "pca32": {**PAPER, "pca_dim": 32},
    "balance-pca32": {**PAPER, "feature_balance": "layer", "pca_dim": 32},
    "holdout": {**PAPER, "holdout": True},
    "holdout-balance": {**PAPER, "holdout": True, "feature_balance": "layer"},
    "holdout-pca32": {**PAPER, "holdout": True, "pca_dim": 32},
    "default": DEFAULT,
    "default-pca16": {**DEFAULT, "pca_dim": 16},
    "default-pca64": {**DEFAULT, "pca_dim": 64},
    "default-nofilter": {**DEFAULT, "filter_clusters": False},
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="all", help="comma-separated variant names (see the module docstring) or all")
    p.add_argument("--workdir", default="runs/ablation", help="one run directory per variant is made here; "
                   "finished runs are reused, unfinished ones resumed")
    p.add_argument("--ks", default="8,12,20", help="numbers of clusters evaluated")
    p.add_argument("--eval-samples", type=int, default=200, help="fresh samples labelled by the face labeller")
    p.add_argument("--seed", type=int, default=0, help="run seed (latents, K-means++)")
    p.add_argument("--out", default=None, help="JSON results file")
    return p


def run_variant(name: str, overrides: dict, args, ks) -> dict:
    from gansem.evaluation import evaluate_run
    from gansem.pipeline import KlishJobConfig, run_klish_job

    cfg = KlishJobConfig(**{"seed": args.seed, **overrides})
    run_dir = os.path.join(args.workdir, name)
    t = time.time()
    done = os.path.isfile(os.path.join(run_dir, "summary.json")) and \
        json.load(open(os.path.join(run_dir, "summary.json"))).get("complete")
    if not done:
        run_klish_job(cfg, run_dir, resume=os.path.isdir(run_dir), progress=False, quiet=True)
    run_s = time.time() - t
    t = time.time()
    res = evaluate_run(run_dir, "faces", ks, ["kmeans"], args.eval_samples, None,
                       out_dir=os.path.join(run_dir, "eval"), progress=False, quiet=True)
    rows = json.load(open(os.path.join(run_dir, "trajectory.json")))
    share = {r["k"]: r["largest_share"] for r in rows}
    out = {"variant": name, "config": cfg.to_dict(), "run_s": run_s, "eval_s": time.time() - t,
           "num_labelled": res.get("num_labelled"), "selected_k": json.load(
               open(os.path.join(run_dir, "summary.json"))).get("selected_k"), "by_k": {}}
    for k in ks:
        s = {m: res["scores"][m][str(k)] for m in ("klish", "kmeans")}
        out["by_k"][k] = {"klish_miou_pooled": s["klish"]["miou_dataset"], "klish_miou_image": s["klish"]["miou_image"],
                          "kmeans_miou_pooled": s["kmeans"]["miou_dataset"],
                          "kmeans_miou_image": s["kmeans"]["miou_image"], "largest_share": share.get(k)}
    return out


def table(results) -> str:
    ks = sorted({int(k) for r in results for k in r["by_k"]})
    head = "| variant | " + " | ".join(f"K={k}: KLiSH / K-means (pooled; per image) · largest" for k in ks) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 1)]
    for r in results:
        cells = []
        for k in ks:
            v = r["by_k"][k] if k in r["by_k"] else r["by_k"][str(k)]
            cells.append(f"{100 * v['klish_miou_pooled']:.1f} / {100 * v['kmeans_miou_pooled']:.1f}; "
                         f"{100 * v['klish_miou_image']:.1f} / {100 * v['kmeans_miou_image']:.1f} · "
                         f"{v['largest_share']:.0%}")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        print(f"error: unknown variants {bad}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.ks.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for name in names:
        print(f"[ablation] {name} ...", flush=True)
        results.append(run_variant(name, VARIANTS[name], args, ks))
        print(table(results[-1:]).splitlines()[-1], flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"eval_samples": args.eval_samples, "ks": ks, "results": results}, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
