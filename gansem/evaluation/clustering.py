"""Tab. 4 of KLiSH: a run's clusters and the baselines' against reference labels.

:func:`evaluate_run` fits the requested baselines on the **same clustering data as
the run** (features recomputed from the run's ``latents.npy`` with the run's
generator, layers, resolution and clustering space), evaluates every method at
every K on evaluation samples by streaming per-image contingency tables batch by
batch (:class:`gansem.metrics.ContingencyAccumulator`), and reports ARI, AMI, NMI
and the greedy-matching mIoU (Algorithm 2) with both averagings (``"image"``:
per-class IoU averaged over the images where the union is non-empty, as the
original evaluation; ``"dataset"``: pixels pooled over all images). Every method
is a :class:`gansem.cluster.baselines.ClusterClassifier` applied to the features
upsampled to the label resolution, exactly as KLiSH segments new samples
(:mod:`gansem.evaluation.predict`).

Evaluation samples are those of a labels file, or fresh samples of the run's
generator on a stream disjoint from the clustering samples
(:mod:`gansem.evaluation.streams`). Samples without reference labels (every pixel
``ignore_label``) are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence, Union

import jax
import numpy as np
from tqdm.auto import tqdm

from .. import metrics, sharding
from ..cluster import baselines as bl
from ..features import extract_features
from ..references.sources import (
    EvaluationError,
    FileLabels,
    check_labelled,
    num_skipped,
    resolve_labels_source,
)
from ..run import Run
from . import report
from .predict import iterate_predictions, pack_classifiers
from .streams import EVAL_STREAM, count_overlap, evaluation_latents

__all__ = ["BASELINES", "fit_baselines", "evaluate_run"]

#: Baseline names accepted by :func:`evaluate_run` and ``launch/evaluate.py --baselines``.
BASELINES = ("kmeans", "kmeans-arccos", "ahc", "ahc-cosine", "kasp")


def _check_ks(avail: Sequence[int], ks: Sequence[int]) -> None:
    avail = sorted(set(avail))
    bad = [k for k in ks if k not in avail]
    if bad:
        raise EvaluationError(
            f"K={bad} not in the run's trajectory (available: {avail[0]}..{avail[-1]}); choose --k among those")


def _log(msg, quiet):
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _padded_ref(tables: np.ndarray, m: int) -> np.ndarray:
    """Per-image tables ``[N, M', K]`` with zero reference rows up to ``m``."""
    return np.pad(tables, ((0, 0), (0, m - tables.shape[1]), (0, 0)))


def fit_baselines(baselines: Sequence[str], ks: Sequence[int], x_host: np.ndarray, *, seed: int, k0: int,
                  mesh, ahc_samples: int = 4000, kmeans_iters: int = 20, quiet: bool = True,
                  progress: bool = False) -> tuple[dict, dict]:
    """Fit baselines on clustering features ``x_host [N, D]`` (host rows, placed on ``mesh`` here).

    K-means (euclidean / arccos) at every K, KASP (spectral grouping of K0 K-means
    centroids) and AHC (ward / average-cosine) on a subsample of ``ahc_samples`` rows
    with a cross-entropy linear read-out.

    Returns:
        ``({(method, k): ClusterClassifier}, {method: fit info})``.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise EvaluationError(f"unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
    key = jax.random.fold_in(jax.random.key(int(seed)), 7)  # baselines' own stream (run uses 0, 1, 2)
    data = None
    if any(b in ("kmeans", "kmeans-arccos", "kasp") for b in baselines):
        data = sharding.place_rows(x_host, mesh)
    out, info = {}, {}
    jobs = [(m, k) for m in baselines if m in ("kmeans", "kmeans-arccos") for k in ks]
    bar = tqdm(total=len(jobs) + sum(m in ("ahc", "ahc-cosine", "kasp") for m in baselines),
               desc="fit baselines", disable=not progress)
    for m, k in jobs:
        t = time.time()
        metric = "euclidean" if m == "kmeans" else "cosine"
        clf, res = bl.fit_kmeans(jax.random.fold_in(key, k * 2 + (m != "kmeans")), data, k, metric=metric,
                                 max_iter=kmeans_iters)
        out[(m, k)] = clf
        info.setdefault(m, {})[str(k)] = {"iters": int(res.n_iter), "converged": bool(res.converged),
                                          "inertia": float(res.inertia), "time_s": time.time() - t}
        bar.update(1)
    if "kasp" in baselines:
        t = time.time()
        if max(ks) > k0:
            raise EvaluationError(f"KASP groups K0={k0} centroids; K={max(ks)} is larger: raise --kasp-k0")
        clf, res = bl.fit_kmeans(jax.random.fold_in(key, 1), data, k0, max_iter=kmeans_iters)
        for k, c in bl.fit_kasp(np.asarray(res.centroids), ks, seed=seed).items():
            out[("kasp", k)] = c
        info["kasp"] = {"k0": int(k0), "kmeans_iters": int(res.n_iter), "kmeans_converged": bool(res.converged),
                        "groups_found": {str(k): int(out[("kasp", k)].num_clusters) for k in ks},
                        "time_s": time.time() - t}
        bar.update(1)
    for m in ("ahc", "ahc-cosine"):
        if m not in baselines:
            continue
        t = time.time()
        rng = np.random.default_rng(seed)
        n_sub = min(int(ahc_samples), x_host.shape[0])
        idx = np.sort(rng.choice(x_host.shape[0], n_sub, replace=False))
        fits = bl.fit_ahc(x_host[idx], ks, linkage="ward" if m == "ahc" else "average-cosine", mesh=mesh)
        for k, (clf, lab, r) in fits.items():
            out[(m, k)] = clf
            info.setdefault(m, {})[str(k)] = {
                "subsample": n_sub, "readout_iters": r.n_iter, "readout_converged": r.converged,
                "readout_train_accuracy": r.accuracy}
        info[m]["time_s"] = time.time() - t
        bar.update(1)
    bar.close()
    return out, info



def evaluate_run(run_dir: Union[str, Run], labels, ks: Sequence[int], baselines: Sequence[str] = BASELINES,
                 num_samples: Optional[int] = None, seed: Optional[int] = None, *, batch_size: int = 8,
                 devices: Optional[int] = None, miou_average: str = "image", ahc_samples: int = 4000,
                 kasp_k0: Optional[int] = None, kmeans_iters: int = 20, ignore_label: Optional[int] = None,
                 num_vis: int = 4, out_dir: Optional[str] = None, progress: bool = False,
                 quiet: bool = True, batch_devices: Optional[int] = None) -> dict:
    """Tab. 4 for one run: KLiSH and baselines × K × (AMI, ARI, NMI, mIoU) on evaluation samples.

    Args:
        run_dir: a finished (or partial) ``launch/klish.py`` run directory, or an opened :class:`~gansem.run.Run`.
        labels: a :class:`LabelsSource`, ``"faces"``, an ``.npz`` path, ``"module:function"``, or a callable.
        ks: numbers of clusters (each must be in the trajectory).
        baselines: subset of :data:`BASELINES`.
        num_samples: evaluation samples (callable source: required; file: default all).
        seed: evaluation seed for a callable source (default: the run's seed; the
            stream is disjoint from the clustering samples either way).
        batch_size: generator batch size of the evaluation pass.
        devices: devices for fitting the baselines (default all).
        batch_devices: split the generator batches (clustering features, evaluation pass) over
            this many devices (same results on any count dividing 8); ``None``: one device.
        miou_average: which mIoU the table shows, ``"image"`` or ``"dataset"`` (both are in the results).
        ahc_samples: pixels subsampled from the clustering data for AHC.
        kasp_k0: K-means centroids grouped by KASP (default: the run's K0).
        kmeans_iters: Lloyd iterations for K-means baselines (as the run).
        ignore_label: reference label value to skip.
        num_vis: samples shown in the cluster-map figures.
        out_dir: write ``results.json``, ``table.md`` and ``clusters_k{K}.png`` there.

    Returns:
        A JSON-able dict: ``scores[method][str(k)]`` with ``ari, ami, nmi, miou_image,
        miou_dataset, miou`` (the chosen averaging), ``per_class_iou``, ``assignment``,
        plus ``num_labelled`` / ``num_skipped`` (samples without reference labels, left
        out), ``fit`` statistics, ``labels`` description, timings and, with
        ``out_dir``, the written ``files``.
    """
    t0 = time.time()
    if miou_average not in ("image", "dataset"):
        raise EvaluationError(f"--miou-average must be 'image' or 'dataset', got {miou_average!r}")
    ks = sorted({int(k) for k in ks}, reverse=True)
    if not ks:
        raise EvaluationError("give at least one K")
    batch_mesh = sharding.make_mesh(batch_devices) if batch_devices else None
    baselines = list(dict.fromkeys(baselines))
    # The labels source first: importing a callable's module may register a generator family.
    source = resolve_labels_source(labels, ignore_label)
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    run_dir = run.run_dir
    cfg, gen, params, layers = run.config, run.generator, run.params, run.layers
    run_latents = run.latents
    _check_ks(run.ks, ks)
    classifiers = {("klish", k): bl.linear_classifier(*run.classifier_at(k)) for k in ks}
    dim = run.feature_dim
    mesh = sharding.make_mesh(devices)

    # -- evaluation samples -----------------------------------------------------------------
    eval_seed = int(cfg["seed"] if seed is None else seed)
    if isinstance(source, FileLabels):
        if tuple(source.latents.shape[1:]) != tuple(gen.latent_shape):
            raise EvaluationError(
                f"{source.path}: latents have shape {source.latents.shape[1:]} but the run's generator takes "
                f"{tuple(gen.latent_shape)}: the file was made with another generator")
        n = source.num_samples if num_samples is None else int(num_samples)
        if not 1 <= n <= source.num_samples:
            raise EvaluationError(f"--num-samples {n}: the labels file holds {source.num_samples} samples")
        if gen.num_classes and source.class_labels is None:
            raise EvaluationError(f"{source.path}: the generator is class-conditional; the file needs class_labels [N]")
        latents, class_labels = source.latents[:n], (None if source.class_labels is None else source.class_labels[:n])
        if n < source.num_samples:
            source = dataclasses.replace(source, images=source.images[:n], latents=latents, labels=source.labels[:n],
                                         class_labels=class_labels)
        size = source.label_size
        overlap = count_overlap(latents, run_latents)
        if overlap:
            _log(f"warning: {overlap} of {n} labelled samples are clustering samples of the run "
                 "(evaluation on training data)", False)
    else:
        if num_samples is None or int(num_samples) < 1:
            raise EvaluationError("--num-samples is required (>= 1) when labels come from a callable")
        n = int(num_samples)
        latents, class_labels = evaluation_latents(gen, eval_seed, n, training_latents=run_latents)
        size = gen.resolution
        overlap = 0
    class_names = source.class_names

    # -- baselines on the run's clustering data ------------------------------------------------
    timings = {}
    fit_info = {}
    if baselines:
        t = time.time()
        _log(f"recomputing the run's clustering features ({run_latents.shape[0]} samples at {cfg['resolution']}²)",
             quiet)
        _, feats = extract_features(gen, params, run_latents, layers, cfg["resolution"], run.class_labels,
                                    batch_size=cfg.get("batch_size", 16), progress=progress,
                                    desc="clustering features", mesh=batch_mesh)
        x_host = feats.reshape(-1, dim)
        del feats
        # Baselines cluster in the run's clustering space (layer balance, PCA), like KLiSH itself.
        transform = run.transform
        if transform is not None:
            x_host = transform.apply(x_host)
        fitted, fit_info = fit_baselines(baselines, ks, x_host, seed=int(cfg["seed"]), k0=int(kasp_k0 or cfg["k0"]),
                                         mesh=mesh, ahc_samples=ahc_samples, kmeans_iters=kmeans_iters, quiet=quiet,
                                         progress=progress)
        del x_host
        if transform is not None:
            fitted = {nm: c._replace(**dict(zip("Wb", transform.to_feature_space(c.W, c.b))))
                      for nm, c in fitted.items()}
        classifiers.update(fitted)
        timings["fit_baselines_s"] = time.time() - t

    # -- streaming evaluation -------------------------------------------------------------------
    t = time.time()
    methods = ["klish"] + baselines
    names = [(m, k) for m in methods for k in ks]
    W, b, spec = pack_classifiers([classifiers[nm] for nm in names])
    _log(f"evaluating {len(methods)} method(s) × K={ks} on {n} samples at {size}² ({W.shape[0]} affine rows)", quiet)
    # one reference row per label id seen (class_names only name the classes)
    tables = {nm: metrics.ContingencyAccumulator(classifiers[nm].num_clusters, 1, ignore_label=source.ignore_label,
                                                 keep_per_image=True, grow_ref=True) for nm in names}
    skipped = 0
    vis_img, vis_ref, vis_pred = [], [], []
    for img, ref, preds in iterate_predictions(source, gen, params, layers, size, spec, W, b, latents,
                                               class_labels, batch_size, progress, "evaluate", mesh=batch_mesh):
        skipped += num_skipped(ref, source.ignore_label)
        for i, nm in enumerate(names):
            tables[nm].update(preds[i], ref)
        shown = sum(a.shape[0] for a in vis_img)
        if shown < num_vis:
            take = num_vis - shown
            vis_img.append(img[:take])
            vis_ref.append(ref[:take] if source.ignore_label is None else
                           np.where(ref[:take] == source.ignore_label, -1, ref[:take]))  # ignored: black
            vis_pred.append(preds[:, :take])
    timings["evaluate_s"] = time.time() - t
    check_labelled(skipped, n, "evaluation")
    m_ref = max(t.num_ref for t in tables.values())
    _log(f"reference labels for {n - skipped} of {n} samples ({skipped} skipped: every pixel ignored)", quiet)

    scores = {}
    for m, k in names:
        tab = _padded_ref(tables[(m, k)].per_image_tables, m_ref)
        cs = metrics.clustering_scores(tab, average=miou_average)
        other = "dataset" if miou_average == "image" else "image"
        alt = metrics.greedy_matching_miou(tab, other)
        scores.setdefault(m, {})[str(k)] = {
            "ari": cs.ari, "ami": cs.ami, "nmi": cs.nmi, "miou": cs.miou,
            f"miou_{miou_average}": cs.miou, f"miou_{other}": alt.miou,
            "per_class_iou": [None if not np.isfinite(v) else float(v) for v in cs.per_class_iou],
            "assignment": cs.assignment.tolist(), "ami_method": cs.ami_method,
            "num_clusters": int(classifiers[(m, k)].num_clusters),
        }
    timings["total_s"] = time.time() - t0
    results = {
        "run_dir": os.path.abspath(run_dir), "generator": cfg["generator"], "ks": ks, "methods": methods,
        "labels": source.describe(), "num_samples": n, "num_labelled": n - skipped, "num_skipped": skipped,
        "skipped_note": "samples whose reference map is entirely ignore_label; they add nothing to any score",
        "label_size": size, "num_ref_classes": m_ref,
        "class_names": list(class_names) if class_names else None,
        "eval_seed": eval_seed if not isinstance(source, FileLabels) else None,
        "eval_stream": (f"latents = sample_latents(fold_in(fold_in(key({eval_seed}), {EVAL_STREAM}), 0)); "
                        f"the run used fold_in(key({cfg['seed']}), 0)") if not isinstance(source, FileLabels)
        else "samples of the labels file",
        "overlap_with_clustering_samples": overlap,
        "miou_average": miou_average,
        "miou_note": ("greedy many-to-one matching of clusters to classes (Algorithm 2); 'image': per-class IoU "
                      "averaged over the images where the union is non-empty, then over classes (as the original "
                      "KLiSH evaluation); 'dataset': pixels pooled over all images"),
        "ignore_label": source.ignore_label, "scores": scores, "fit": fit_info, "timings": timings,
        "baseline_settings": {"ahc_samples": ahc_samples, "kasp_k0": int(kasp_k0 or cfg["k0"]),
                              "kasp_spectral": "nearest_neighbors, n_neighbors=3, assign_labels=discretize",
                              "ahc_readout": "softmax regression, full-batch L-BFGS (jaxopt), l2=1e-4",
                              "kmeans_iters": kmeans_iters},
    }
    if out_dir is not None:
        results["files"] = report.write_evaluation(results, out_dir, np.concatenate(vis_img), np.concatenate(vis_ref),
                                            np.concatenate(vis_pred, axis=1), names)
        _log(f"wrote {results['files']['table']}", quiet)
    return results


