"""Linear separability of GAN features: SVM (Eq. 3) vs a cross-entropy extractor (Sec. 4.2, Tab. 3).

:func:`separability_experiment` trains the one-vs-rest SVMs of Eq. 3 and a
cross-entropy linear extractor (LSE, softmax regression) on generator features
with reference labels and compares their mIoU on held-out samples.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Union

import numpy as np

from .. import metrics, sharding
from ..cluster import baselines as bl
from ..cluster.svm import train_ovr_svm
from ..features import extract_features, select_feature_layers
from ..references.sources import (
    EvaluationError,
    FileLabels,
    check_labelled,
    nearest_resize_labels,
    num_skipped,
    resolve_labels_source,
)
from ..run import Run
from ..zoo import load_generator
from .predict import iterate_predictions, pack_classifiers
from .streams import evaluation_latents

__all__ = ["separability_experiment"]


def _log(msg, quiet):
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def separability_experiment(labels, *, run_dir: Optional[Union[str, Run]] = None, generator: Optional[str] = None,
                            num_train: int = 32, num_test: int = 32, seed: int = 0,
                            resolution: Optional[int] = None, channel_budget: int = 1000,
                            truncation: Optional[float] = None, lam: float = 5000.0, svm_tol: float = 1e-4,
                            svm_max_iter: int = 2000, lse_l2: float = 1e-4, lse_tol: float = 1e-4,
                            lse_max_iter: int = 1000, ignore_label: Optional[int] = None, batch_size: int = 8,
                            devices: Optional[int] = None, batch_devices: Optional[int] = None,
                            progress: bool = False, quiet: bool = True) -> dict:
    """SVM (Eq. 3, ``train_ovr_svm``) vs LSE (softmax regression) on reference labels (Tab. 3).

    Both are linear classifiers of the generator features trained on the same
    pixels (features resized to ``resolution``, reference labels sampled at the
    same positions), then segment ``num_test`` held-out samples at the label
    resolution. The LSE is trained to convergence with full-batch L-BFGS
    (:func:`gansem.cluster.baselines.train_softmax_regression`) rather than the
    paper's one epoch of Adam (lr 1e-3).

    Samples: with a labels file, the first ``num_train`` samples train and the next
    ``num_test`` test; with a callable, training latents come from the
    ``"train"`` part and test latents from the ``"eval"`` part of the evaluation
    stream (:func:`evaluation_latents`), disjoint from each other and from a run's
    clustering samples.

    Args:
        labels: labels source (see :func:`resolve_labels_source`).
        run_dir: take generator, truncation, channel budget and resolution from a run;
            or ``generator`` (a name or checkpoint path) with ``channel_budget`` / ``truncation``.
        resolution: training feature resolution (default: the run's, else the generator's).
        lam, svm_tol, svm_max_iter: SVM settings (Eq. 3; λ1 = 5000 as in KLiSH).
        lse_l2, lse_tol, lse_max_iter: LSE settings.
        devices: devices the training pixels are sharded over (default all).
        batch_devices: split the generator batches over this many devices; ``None``: one device.

    Returns:
        dict with ``svm`` and ``lse`` (``miou`` = mean over classes of the per-class IoU
        pooled over the test set, ``miou_image`` per-image averaging, ``per_class_iou``,
        ``pixel_accuracy``, solver statistics), ``delta = (svm - lse) / lse``, the labelled
        and skipped sample counts (``num_{train,test}_{labelled,skipped}``) and the setup.
    """
    t0 = time.time()
    source = resolve_labels_source(labels, ignore_label)
    run_latents = None
    if run_dir is not None:
        run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
        run_dir = run.run_dir
        gen, params, layers, run_latents = run.generator, run.params, run.layers, run.latents
        resolution = resolution or run.config["resolution"]
        gen_name = run.config["generator"]
    elif generator is not None:
        gen, params, _ = load_generator(generator)
        gen = gen.with_settings(truncation=truncation)
        layers = select_feature_layers(gen.feature_layers(), channel_budget)
        gen_name = generator
    else:
        raise EvaluationError("give a run directory (--run) or a generator (--generator)")
    resolution = int(resolution or gen.resolution)
    dim = sum(l.channels for l in layers)

    if isinstance(source, FileLabels):
        if source.num_samples < num_train + num_test:
            raise EvaluationError(f"{source.path} holds {source.num_samples} samples; --num-train {num_train} + "
                                  f"--num-test {num_test} are needed")
        tr = slice(0, num_train)
        te = slice(num_train, num_train + num_test)
        lat_tr, cl_tr = source.latents[tr], None if source.class_labels is None else source.class_labels[tr]
        ref_tr = source.labels[tr]
        test_source = dataclasses.replace(
            source, images=source.images[te], latents=source.latents[te], labels=source.labels[te],
            class_labels=None if source.class_labels is None else source.class_labels[te])
        lat_te, cl_te = test_source.latents, test_source.class_labels
        size = source.label_size
    else:
        lat_tr, cl_tr = evaluation_latents(gen, seed, num_train, training_latents=run_latents, part="train")
        lat_te, cl_te = evaluation_latents(gen, seed, num_test, training_latents=run_latents, part="eval")
        test_source = source
        size = gen.resolution
        ref_tr = None

    # -- training pixels --------------------------------------------------------------------
    t = time.time()
    batch_mesh = sharding.make_mesh(batch_devices) if batch_devices else None
    imgs, feats = extract_features(gen, params, lat_tr, layers, resolution, cl_tr, batch_size=batch_size,
                                   progress=progress, desc="train features", mesh=batch_mesh)
    if ref_tr is None:
        ref_tr = np.concatenate([source(imgs[i:i + batch_size]) for i in range(0, len(imgs), batch_size)])
    train_skipped = num_skipped(ref_tr, source.ignore_label)
    check_labelled(train_skipped, num_train, "training")
    y = nearest_resize_labels(ref_tr, resolution).reshape(-1)
    x_host = feats.reshape(-1, dim)
    del feats
    keep = y != source.ignore_label if source.ignore_label is not None else np.ones(y.shape, bool)
    if not keep.any():
        raise EvaluationError("every training pixel has the ignored label; check --ignore-label and the labels")
    m_ref = int(y[keep].max()) + 1  # class_names, if any, only name the classes
    mesh = sharding.make_mesh(devices)
    data = sharding.place_rows(x_host, mesh)
    data = data.replace(valid=data.valid * data.place(keep.astype(np.float32)))  # labelled rows only
    ys = data.place(np.where(keep, y, 0).astype(np.int32))
    del x_host
    timings = {"train_features_s": time.time() - t}

    t = time.time()
    _log(f"SVM (Eq. 3, λ1={lam}) on {int(keep.sum())} pixels × {dim} features, {m_ref} classes", quiet)
    svm_res = train_ovr_svm(data, ys, np.zeros((m_ref, dim), np.float32), np.zeros(m_ref, np.float32),
                            lam=lam, tol=svm_tol, max_iter=svm_max_iter)
    timings["svm_s"] = time.time() - t
    t = time.time()
    _log("LSE (softmax regression, L-BFGS)", quiet)
    lse_res = bl.train_softmax_regression(data, ys, m_ref, l2=lse_l2, tol=lse_tol, max_iter=lse_max_iter)
    timings["lse_s"] = time.time() - t
    del data, ys

    # -- held-out evaluation ----------------------------------------------------------------
    t = time.time()
    clfs = [bl.linear_classifier(svm_res.W, svm_res.b), bl.linear_classifier(lse_res.W, lse_res.b)]
    W, b, spec = pack_classifiers(clfs)
    # reference rows grow past the training classes if the test set has more (class_names only name them)
    acc = [metrics.ContingencyAccumulator(m_ref, m_ref, ignore_label=source.ignore_label, keep_per_image=True,
                                          grow_ref=True) for _ in clfs]
    test_skipped = 0
    for _, ref, preds in iterate_predictions(test_source, gen, params, layers, size, spec, W, b, lat_te, cl_te,
                                             batch_size, progress, "test", mesh=batch_mesh):
        test_skipped += num_skipped(ref, source.ignore_label)
        for i in range(2):
            acc[i].update(np.minimum(preds[i], m_ref - 1), ref)
    timings["test_s"] = time.time() - t
    check_labelled(test_skipped, num_test, "test")
    m_all = max(a.num_ref for a in acc)
    _log(f"reference labels for {num_train - train_skipped} of {num_train} training and {num_test - test_skipped} "
         f"of {num_test} test samples (the others skipped: every pixel ignored)", quiet)

    def summary(tables, extra):
        tab = tables.per_image_tables  # [N, M_all, M_ref]: reference rows, predicted classes
        tab = np.pad(tab, ((0, 0), (0, m_all - tab.shape[1]), (0, 0)))
        ident = np.arange(m_ref)
        per_ds = metrics.per_class_iou_after_matching(tab, ident, "dataset")
        per_im = metrics.per_class_iou_after_matching(tab, ident, "image")
        total = tab.sum(0)
        correct = sum(total[c, c] for c in range(min(m_ref, m_all)))
        return {"miou": float(np.nanmean(per_ds)), "miou_image": float(np.nanmean(per_im)),
                "per_class_iou": [None if not np.isfinite(v) else float(v) for v in per_ds],
                "pixel_accuracy": float(correct / max(total.sum(), 1)), **extra}

    svm_out = summary(acc[0], {"iters": int(svm_res.n_iter), "converged": bool(svm_res.converged),
                               "stop_reason": svm_res.stop_reason, "objective": float(svm_res.objective)})
    lse_out = summary(acc[1], {"iters": lse_res.n_iter, "converged": lse_res.converged, "loss": lse_res.loss,
                               "train_accuracy": lse_res.accuracy})
    timings["total_s"] = time.time() - t0
    return {
        "generator": gen_name, "run_dir": None if run_dir is None else os.path.abspath(run_dir),
        "labels": source.describe(), "num_train": num_train, "num_test": num_test,
        "num_train_labelled": num_train - train_skipped, "num_train_skipped": train_skipped,
        "num_test_labelled": num_test - test_skipped, "num_test_skipped": test_skipped,
        "train_resolution": resolution,
        "test_resolution": size, "num_classes": m_ref,
        "class_names": list(source.class_names) if source.class_names else None,
        "svm": svm_out, "lse": lse_out,
        "delta": (svm_out["miou"] - lse_out["miou"]) / lse_out["miou"] if lse_out["miou"] > 0 else float("nan"),
        "delta_image": ((svm_out["miou_image"] - lse_out["miou_image"]) / lse_out["miou_image"]
                        if lse_out["miou_image"] > 0 else float("nan")),
        "settings": {"lam": lam, "svm_tol": svm_tol, "svm_max_iter": svm_max_iter, "lse_l2": lse_l2,
                     "lse_solver": "full-batch L-BFGS (jaxopt) on standardised features", "seed": seed},
        "miou_note": "mIoU = mean over reference classes of the IoU pooled over all test pixels ('miou'), "
                     "or averaged per image ('miou_image'); classes absent from the test set are skipped",
        "timings": timings,
    }
