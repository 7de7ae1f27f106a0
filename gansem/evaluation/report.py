"""Reports of the evaluations: markdown tables, figures and JSON files.

:func:`results_table_markdown` formats :func:`gansem.evaluation.evaluate_run`'s
results as Tab. 4 of KLiSH (rows K × AMI/ARI/mIoU, one column per method);
:func:`write_evaluation` writes them with one cluster-map figure per K (as Fig. 5);
:func:`separability_markdown` formats the Tab. 3 experiment
(:func:`gansem.evaluation.separability_experiment`).
"""

from __future__ import annotations

import json
import os

from .. import viz
from ..references.sources import BUILTIN_LABELS

__all__ = ["METHOD_TITLES", "results_table_markdown", "write_evaluation", "separability_markdown"]

#: Column titles of the methods.
METHOD_TITLES = {
    "klish": "KLiSH", "kmeans": "K-means (euclidean)", "kmeans-arccos": "K-means (arccos)",
    "ahc": "AHC (ward)", "ahc-cosine": "AHC (arccos)", "kasp": "KASP (euclidean)",
}


def results_table_markdown(results: dict) -> str:
    """Tab.-4-style markdown: rows K × (AMI, ARI, mIoU), columns the methods, values in %."""
    methods = results["methods"]
    avg = results["miou_average"]
    lines = [
        f"# Clustering evaluation: {os.path.basename(results['run_dir'])}", "",
        f"Generator `{results['generator']}`; {results['num_samples']} evaluation samples at "
        f"{results['label_size']}²; reference labels: {_describe_labels(results['labels'])}; "
        f"{results['num_ref_classes']} reference classes. Samples with reference labels: "
        f"{results['num_labelled']} labelled, {results['num_skipped']} skipped (every pixel ignored; left out of "
        "all scores).", "",
        f"mIoU: greedy maximum matching (Algorithm 2, many-to-one), **averaged per {avg}** "
        + ("(per-class IoU over the images where the class or its clusters appear, then over classes — the original "
           "KLiSH evaluation)" if avg == "image" else "(pixels pooled over all images)")
        + f"; the other averaging is in results.json (`miou_{'dataset' if avg == 'image' else 'image'}`).", "",
        "| K | metric | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for k in results["ks"]:
        for metric, key in (("AMI", "ami"), ("ARI", "ari"), ("mIoU", "miou")):
            vals = [results["scores"][m][str(k)][key] for m in methods]
            best = max(vals)
            cells = [f"**{100 * v:.1f}**" if v == best else f"{100 * v:.1f}" for v in vals]
            lines.append(f"| {k if metric == 'AMI' else ''} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Values in %, best per row in bold. Baselines are fitted on the run's clustering samples; "
              "every method segments the evaluation samples as argmax of its (piecewise-)linear classifier on the "
              "upsampled generator features.", ""]
    for k in results["ks"]:
        lines.append(f"![cluster maps K={k}](clusters_k{k}.png)")
    return "\n".join(lines) + "\n"


def _describe_labels(d: dict) -> str:
    if d["kind"] == "file":
        return f"file `{d['path']}`"
    return f"built-in labeller `{d['name']}`" if d["name"] in BUILTIN_LABELS else f"callable `{d['name']}`"


def write_evaluation(results, out_dir, vis_img, vis_ref, vis_pred, names) -> dict:
    """Write ``results.json``, ``table.md`` and one cluster-map figure per K (like Fig. 5)."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md")}
    for k in results["ks"]:
        maps = {"reference": vis_ref}
        for i, (m, kk) in enumerate(names):
            if kk == k:
                maps[f"{METHOD_TITLES.get(m, m)}@{k}"] = vis_pred[i]
        p = os.path.join(out_dir, f"clusters_k{k}.png")
        viz.cluster_map_figure(vis_img, maps, p, title=f"cluster maps at K={k} (same evaluation samples)")
        files[f"clusters_k{k}"] = p
    with open(files["table"], "w") as f:
        f.write(results_table_markdown(results))
    with open(files["json"], "w") as f:
        json.dump({**results, "files": files}, f, indent=1)
    return files



def separability_markdown(res: dict) -> str:
    """Tab.-3-style markdown of a :func:`gansem.evaluation.separability_experiment` result."""
    s, l = res["svm"], res["lse"]
    return "\n".join([
        "# Linear separability: SVM (Eq. 3) vs LSE (cross-entropy)", "",
        f"Generator `{res['generator']}`; {res['num_train']} training samples at {res['train_resolution']}², "
        f"{res['num_test']} test samples at {res['test_resolution']}²; {res['num_classes']} reference classes.",
        f"Samples with reference labels: {res['num_train_labelled']} of {res['num_train']} training, "
        f"{res['num_test_labelled']} of {res['num_test']} test (skipped: {res['num_train_skipped']} + "
        f"{res['num_test_skipped']}, every pixel ignored, left out).", "",
        "| | SVM | LSE | Δ = (SVM − LSE)/LSE |", "|---|---|---|---|",
        f"| mIoU (pooled over test pixels) | {100 * s['miou']:.1f} | {100 * l['miou']:.1f} | {100 * res['delta']:+.1f}% |",
        f"| mIoU (per image) | {100 * s['miou_image']:.1f} | {100 * l['miou_image']:.1f} | "
        f"{100 * res['delta_image']:+.1f}% |",
        f"| pixel accuracy | {100 * s['pixel_accuracy']:.1f} | {100 * l['pixel_accuracy']:.1f} | |",
        f"| solver | {s['iters']} it, {'converged' if s['converged'] else 'NOT converged'} | "
        f"{l['iters']} it, {'converged' if l['converged'] else 'NOT converged'} | |", "",
    ])
