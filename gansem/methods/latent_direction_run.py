"""A latent-direction segmenter run: directions -> mask dataset -> segmenter -> evaluation (seed paper 004).

:func:`run_latent_direction` is what ``launch/latent_direction.py`` calls. It writes::

    config.json          the settings, the generator, the seed and the command (a resume must match them)
    directions/          Orbax checkpoints of the direction search (resumable) and directions.npz (v_l, v_d, ε)
    directions-loss.png  Eq. 1 and its two terms against the step, for +λ (v_l) and -λ (v_d)
    directions.png       per sample: G(z) | G(z+εv_l) | G(z+εv_d) | M(z) (Eq. 2) | refined mask (grey: dropped)
    dataset/             the refined (image, mask) pairs in the UFGS format (0 = background, 1 = foreground)
    segmenter/           the UFGS segmenter trained on them (gansem.ufgs.train.fit_segmenter; resumable)
    evaluation.png       fresh samples: image | reference | M(z) | segmenter | centred ellipse
    report.json          direction statistics, refinement counts, the metric table, timings
    report.md            the same, readable
    manifest.json        what is where

**Streams.** From ``root = key(seed)``: the direction search uses ``fold_in(root, 0)``,
dataset candidate ``i`` uses ``fold_in(fold_in(root, 1), i)`` (:func:`gansem.methods.latent_direction.iter_masks`),
evaluation sample ``i`` uses ``fold_in(fold_in(root, 2), i)``: the evaluation samples are
fresh, never trained on.

**Dataset.** Candidates are masked batch by batch and refined
(:func:`gansem.methods.latent_direction.refine_masks`); the kept ones are written in
candidate order until ``dataset_samples`` pairs exist (at most ``max_candidates_factor``
times as many candidates are tried). Records go through :class:`gansem.ufgs.dataset.ShardSink`.

**Segmenter.** The paper minimises the pixel binary cross-entropy of one logit ``s``,
``-log p(m | s)`` with ``p(1 | s) = σ(s)``. The UFGS trainer's two-class softmax
cross-entropy is the same function of the logit difference ``s = l_1 - l_0``
(``softmax([l_0, l_1])_1 = σ(l_1 - l_0)``), so the segmenter is trained by
:func:`gansem.ufgs.train.fit_segmenter` on the 2-class dataset as it is.

**Evaluation.** Against a reference labeller (class 0 = background, every other class
foreground; e.g. the built-in face labeller), on ``eval_samples`` fresh samples, for the
trained segmenter, the masks ``M(z)`` themselves (unrefined) and two trivial baselines:
all foreground, and the centred axis-aligned ellipse whose axes are the mean height and
width of the reference foreground's bounding boxes. Scores (:mod:`gansem.metrics`): Acc,
IoU fg/bg, mIoU, F1, precision, recall, averaged per image as the paper's code does,
and maxFβ (β² = 0.3) from the segmenter's foreground probability (for binary masks maxFβ
is their Fβ). Samples the labeller skips (``ignore_label``) are left out.

**Resume.** ``resume=True`` continues every stage: the direction search from its latest
checkpoint, a complete dataset is kept (an incomplete one is written again: it is a
deterministic function of the directions and the seed), the segmenter from its latest
checkpoint; the evaluation is recomputed.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Mapping, Optional

import jax
import numpy as np

from .. import training, viz
from ..batching import map_batches
from ..features import to_uint8
from ..generators.base import Generator
from ..metrics import binary_segmentation_metrics, max_f_beta
from ..ufgs.records import INDEX_FILE, DatasetError, encode_pair, open_dataset
from ..ufgs.train import fit_segmenter
from .latent_direction import (DirectionConfig, LatentDirectionError, iter_masks, latent_space, optimise_directions,
                               refine_masks)
from .mask_dataset import enlarge, finish_mask_dataset, reference_foreground, start_mask_dataset

__all__ = ["STREAMS", "run_latent_direction", "write_direction_dataset", "directions_figure", "ellipse_mask",
           "mean_box_size", "evaluate_masks", "foreground_probability"]

#: ``fold_in(key(seed), s)`` of each stage.
STREAMS = {"directions": 0, "dataset": 1, "evaluation": 2}
_FIGURE_SAMPLES = 8
_DROPPED_GREY = 96


def _mask_rgb(mask: np.ndarray, value: int = 255) -> np.ndarray:
    return np.repeat((np.asarray(mask, bool) * value).astype(np.uint8)[..., None], 3, -1)


def directions_figure(out: Mapping[str, np.ndarray], refined: np.ndarray, keep: np.ndarray, path: str) -> str:
    """One row per sample: ``G(z) | G(z+εv_l) | G(z+εv_d) | M(z) | refined mask`` (grey when the sample is dropped)."""
    cols = [to_uint8(out["image"]), to_uint8(out["light"]), to_uint8(out["dark"]), _mask_rgb(out["mask"]),
            np.stack([_mask_rgb(m, 255 if k else _DROPPED_GREY) for m, k in zip(refined, keep)])]
    tiles = enlarge(np.stack(cols, 1).reshape((-1,) + cols[0].shape[1:]))
    return viz.save_png(path, viz.image_grid(tiles, ncols=len(cols)))


def write_direction_dataset(gen: Generator, params, config: DirectionConfig, v_light, v_dark, out_dir: str, *,
                            key, seed: int, num_samples: int, shard_size: int = 1000, batch_size: int = 16,
                            mesh=None, max_candidates_factor: int = 20, generator_info: Optional[dict] = None,
                            command: Optional[str] = None, progress: bool = False) -> dict:
    """Write ``num_samples`` refined (image, mask) pairs as a UFGS dataset (:mod:`gansem.ufgs.records`).

    Candidate ``i`` comes from ``fold_in(key, i)``; its mask ``M(z)`` is refined
    (:func:`gansem.methods.latent_direction.refine_masks`) and kept or dropped; the kept
    candidates are the dataset's samples in candidate order. ``index.json`` records how many
    candidates were tried and why the others were dropped; it says ``complete: true`` last.

    Returns:
        The dataset's index.

    Raises:
        DatasetError: ``out_dir`` is not empty, bad sizes, or fewer than ``num_samples`` candidates of
            ``max_candidates_factor * num_samples`` survive the refinement (the message gives the counts).
    """
    if num_samples < 1 or shard_size < 1 or max_candidates_factor < 1:
        raise DatasetError(f"num_samples, shard_size and max_candidates_factor must be >= 1, got {num_samples}, "
                           f"{shard_size} and {max_candidates_factor}")
    meta, sink = start_mask_dataset(
        out_dir, gen, num_samples=num_samples, shard_size=shard_size, resolution=int(gen.resolution), seed=seed,
        batch_size=batch_size, class_conditional=bool(gen.num_classes),
        sampling=f"candidate i: the latent (and class) of fold_in(fold_in(key({int(seed)}), "
                 f"{STREAMS['dataset']}), i); the kept candidates in order are the samples",
        method={"name": "latent_direction", "paper": "seed 004, Sec. 3.2", "config": vars(config),
                "latent_space": latent_space(gen), "epsilon": config.shift(gen)},
        generator_info=generator_info, command=command, mesh=mesh)
    limit = int(max_candidates_factor) * int(num_samples)
    counts = {"candidates": 0, "too_small": 0, "too_large": 0, "no_change": 0}
    written = 0
    try:
        for start, stop, out in iter_masks(gen, params, config, v_light, v_dark, key, np.arange(limit), mesh=mesh,
                                           batch_size=batch_size, shifted=False, progress=progress,
                                           desc="mask dataset"):
            refined, keep, why = refine_masks(out["mask"], out["change"], config)
            images = to_uint8(out["image"])
            for r in range(stop - start):
                if written == num_samples:
                    break
                counts["candidates"] += 1
                for name in why:
                    counts[name] += int(why[name][r])
                if keep[r]:
                    cls = None if "class_label" not in out else int(out["class_label"][r])
                    sink.write(encode_pair(images[r], refined[r].astype(np.uint8), num_classes=2, index=written,
                                           latent=out["latent"][r], class_label=cls))
                    written += 1
            if written == num_samples:
                break
    finally:
        sink.close()
    meta["refinement"] = dict(counts, kept=written)
    if written < num_samples:
        training.write_json(os.path.join(out_dir, INDEX_FILE), meta)
        raise DatasetError(f"only {written} of {counts['candidates']} candidates survive the refinement "
                           f"(dropped: {counts['too_small']} too little foreground, {counts['too_large']} too much, "
                           f"{counts['no_change']} too little brightness change); {num_samples} were asked for. "
                           "Loosen --min-foreground/--max-foreground/--min-change, or train the directions longer")
    return finish_mask_dataset(out_dir, meta)


# -- evaluation ----------------------------------------------------------------------------------


def mean_box_size(reference: np.ndarray, ignore_label: Optional[int] = None) -> tuple[float, float]:
    """Mean height and width (pixels) of the bounding boxes of the reference foreground (labelled, non-empty images)."""
    hs, ws = [], []
    for ref in np.asarray(reference):
        if ignore_label is not None and np.any(ref == ignore_label):
            continue
        ys, xs = np.nonzero(ref == 1)
        if ys.size:
            hs.append(ys.max() - ys.min() + 1)
            ws.append(xs.max() - xs.min() + 1)
    if not hs:
        raise LatentDirectionError("the reference labeller found no foreground in any evaluation sample; "
                                   "nothing to measure the ellipse baseline on")
    return float(np.mean(hs)), float(np.mean(ws))


def ellipse_mask(height: int, width: int, box_h: float, box_w: float) -> np.ndarray:
    """``[H, W]`` bool: the axis-aligned ellipse centred in the image with axes ``box_h`` x ``box_w`` pixels."""
    i = np.arange(height) - (height - 1) / 2.0
    j = np.arange(width) - (width - 1) / 2.0
    return (i[:, None] / (box_h / 2.0)) ** 2 + (j[None, :] / (box_w / 2.0)) ** 2 <= 1.0


def foreground_probability(segmenter, images: np.ndarray, *, mesh=None, batch_size: int = 16) -> np.ndarray:
    """``[N, H, W]`` float32: the softmax probability of class 1 (foreground) of a 2-class UFGS segmenter.

    The images must be at the segmenter's training resolution.
    """
    model = segmenter.model

    def fn(variables, x):
        return jax.nn.softmax(model.apply(variables, x, train=False), axis=-1)[..., 1]

    variables = jax.device_get(segmenter.variables)
    parts = [o for _, _, o in map_batches(fn, [np.asarray(images, np.uint8)], batch_size=batch_size, mesh=mesh,
                                          bcast_args=(variables,))]
    return np.concatenate(parts).astype(np.float32)


def evaluate_masks(predictions: Mapping[str, np.ndarray], reference: np.ndarray, *,
                   scores: Optional[Mapping[str, np.ndarray]] = None, ignore_label: Optional[int] = None) -> dict:
    """The paper's metric table: ``{name: {accuracy, iou_fg, iou_bg, miou, f1, precision, recall, max_f_beta}}``.

    Args:
        predictions: name -> ``[N, H, W]`` bool masks.
        reference: ``[N, H, W]`` {0, 1} (or ``ignore_label``).
        scores: name -> ``[N, H, W]`` soft foreground scores in [0, 1] for maxFβ (default: the mask itself).
    """
    table = {}
    for name, pred in predictions.items():
        m = binary_segmentation_metrics(pred, reference, average="image", ignore_label=ignore_label)
        soft = (scores or {}).get(name, np.asarray(pred, np.float32))
        f = max_f_beta(soft, reference, beta2=0.3, ignore_label=ignore_label)
        table[name] = dict(m._asdict(), max_f_beta=float(f.max_f_beta))
    return table


def _evaluation_figure(images, reference, rows: Mapping[str, np.ndarray], path: str) -> str:
    red = np.array([[0, 0, 0], [255, 64, 64]], np.uint8)
    ref = np.where(reference == 1, 1, 0)
    cols = [images, viz.overlay(images, ref, alpha=0.6, colors=red)]
    cols += [viz.overlay(images, np.asarray(m, np.int32), alpha=0.6, colors=red) for m in rows.values()]
    tiles = enlarge(np.stack(cols, 1).reshape((-1,) + images.shape[1:]))
    return viz.save_png(path, viz.image_grid(tiles, ncols=len(cols)))


# -- the run ---------------------------------------------------------------------------------


_COLUMNS = (("accuracy", "Acc"), ("iou_fg", "IoU fg"), ("iou_bg", "IoU bg"), ("miou", "mIoU"), ("f1", "F1"),
            ("precision", "Prec"), ("recall", "Rec"), ("max_f_beta", "maxFβ"))


def _markdown(s: dict) -> str:
    d, cfg = s["directions"], s["config"]
    lines = [f"# Latent-direction segmenter ({s['generator'].get('name') or s['generator']['family']})", "",
             f"Direction search in {d['latent_space']} (D = {d['dim']}): λ = ±{cfg['lam']}, ε = {d['epsilon']}, "
             f"Adam lr {cfg['lr']}, {d['steps']} steps of {cfg['batch_size']} latents on {s['devices']} device(s), "
             f"{s['seconds']['directions']:.0f} s. v_l · v_d = {d['dot']:.3f}; final Eq. 1 (L_c, L_s): "
             f"v_l {d['final']['loss_light']:.4f} ({d['final']['lc_light']:.4f}, {d['final']['ls_light']:.4f}), "
             f"v_d {d['final']['loss_dark']:.4f} ({d['final']['lc_dark']:.4f}, {d['final']['ls_dark']:.4f}).", "",
             "![loss](directions-loss.png)", "",
             "Columns: G(z) | G(z+εv_l) | G(z+εv_d) | M(z) (Eq. 2) | refined mask (grey: sample dropped).", "",
             "![directions](directions.png)", ""]
    r = s["dataset"]["refinement"]
    lines += [f"Dataset: {s['dataset']['samples']} pairs kept of {r['candidates']} candidates (dropped: "
              f"{r['too_small']} foreground < {cfg['min_foreground']}, {r['too_large']} foreground > "
              f"{cfg['max_foreground']}, {r['no_change']} brightness change < {cfg['min_change']}; small "
              f"components < {cfg['min_component']} of the image flipped), {s['seconds']['dataset']:.0f} s: "
              "`dataset/` (UFGS format).", "",
              f"Segmenter: {s['segmenter']['arch']}, {s['segmenter']['steps']} steps of batch "
              f"{s['segmenter']['batch_size']}, final loss {s['segmenter']['final_loss']:.4f}, "
              f"{s['seconds']['segmenter']:.0f} s: `segmenter/`.", "", "![segmenter training](segmenter/curves.png)",
              ""]
    ev = s["evaluation"]
    if ev.get("table"):
        lines += [f"## Evaluation on {ev['samples']} fresh samples against `{ev['labels']}`", "",
                  f"{ev['labelled']} samples labelled ({ev['samples'] - ev['labelled']} skipped by the labeller); "
                  f"reference foreground fraction {ev['reference_fraction']:.3f}; ellipse axes "
                  f"{ev['ellipse'][0]:.1f} x {ev['ellipse'][1]:.1f} px (mean reference box). Per-image means; maxFβ "
                  "with β² = 0.3.", "",
                  "| prediction | " + " | ".join(c for _, c in _COLUMNS) + " |",
                  "|---|" + "---|" * len(_COLUMNS)]
        for name, row in ev["table"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k, _ in _COLUMNS) + " |")
        lines += ["", ev["verdict"], "",
                  "Columns: image | reference | M(z) | segmenter | ellipse baseline.", "",
                  "![evaluation](evaluation.png)", ""]
    else:
        lines += [f"## Evaluation on {ev['samples']} fresh samples (no reference labeller)", "",
                  f"Agreement of the segmenter with M(z): mIoU {ev['agreement_miou']:.3f}.", "",
                  "![evaluation](evaluation.png)", ""]
    lines += [f"Total {sum(s['seconds'].values()):.0f} s.", ""]
    return "\n".join(lines)


def _verdict(table: dict) -> str:
    best_base = max(table["all foreground"]["iou_fg"], table["centred ellipse"]["iou_fg"])
    lines = []
    for name in ("segmenter", "M(z)"):
        iou = table[name]["iou_fg"]
        word = "beats" if iou > best_base else "does NOT beat"
        lines.append(f"{name} {word} the better trivial baseline in foreground IoU ({iou:.3f} vs {best_base:.3f}).")
    return " ".join(lines)


def run_latent_direction(gen: Generator, params, config: DirectionConfig, out_dir: str, *, seed: int = 0,
                         mesh=None, resume: bool = False, dataset_samples: int = 256, shard_size: int = 1000,
                         mask_batch_size: int = 16, max_candidates_factor: int = 20, arch: str = "unet",
                         model_kwargs: Optional[Mapping] = None, train_steps: int = 300, train_batch_size: int = 16,
                         lr: float = 1e-3, eval_samples: int = 64, labels=None, ignore_label: Optional[int] = None,
                         checkpoint_every: int = 100, generator_info: Optional[dict] = None,
                         command: Optional[str] = None, progress: bool = True, quiet: bool = False) -> dict:
    """Optimise the directions, write the mask dataset, train the segmenter, evaluate (module docstring).

    Args:
        gen, params: a generator of :data:`gansem.methods.latent_direction.LATENT_SPACES` and its parameters.
        config: direction search and refinement settings.
        out_dir: run directory (absent or empty, or a run to continue with ``resume``).
        seed: root of every random stream (:data:`STREAMS`).
        mesh: 1-D mesh for every stage (``None``: one device).
        resume: continue the run in ``out_dir`` (it must have been created with the same settings).
        dataset_samples, shard_size, mask_batch_size, max_candidates_factor: the mask dataset.
        arch, model_kwargs, train_steps, train_batch_size, lr: the segmenter (:func:`gansem.ufgs.train.fit_segmenter`).
        eval_samples: fresh samples evaluated.
        labels: reference labeller ``uint8 [B, H, W, 3] -> int [B, H, W]`` (0 = background) or ``None``.
        ignore_label: reference value of skipped samples/pixels.
        checkpoint_every: steps between checkpoints of the direction search and of the segmenter.
        generator_info, command: recorded.
        progress, quiet: progress bars; no log lines.

    Returns:
        The report (also ``report.json``).

    Raises:
        LatentDirectionError: an impossible setting, an occupied ``out_dir`` without ``resume``, or a resume
            with other settings.
    """
    n_dev = 1 if mesh is None else int(mesh.devices.size)
    config.check(gen, n_dev)
    if dataset_samples < 2 or eval_samples < 1 or train_steps < 1:
        raise LatentDirectionError(f"need dataset_samples >= 2, eval_samples >= 1 and train_steps >= 1, got "
                                   f"{dataset_samples}, {eval_samples} and {train_steps}")
    if train_batch_size % n_dev:
        raise LatentDirectionError(f"train_batch_size {train_batch_size} must be a multiple of the {n_dev} devices")
    info = dict(generator_info or {"family": gen.family})
    fixed = {"method": "latent_direction (seed 004)", "config": vars(config), "seed": int(seed),
             "dataset_samples": int(dataset_samples), "shard_size": int(shard_size),
             "mask_batch_size": int(mask_batch_size), "max_candidates_factor": int(max_candidates_factor),
             "arch": arch, "model_kwargs": dict(model_kwargs or {}), "train_batch_size": int(train_batch_size),
             "lr": float(lr), "generator_config": gen.to_config()}
    cpath = os.path.join(out_dir, "config.json")
    if os.path.isfile(cpath):
        if not resume:
            raise LatentDirectionError(f"{out_dir!r} already holds a latent-direction run; pass --resume to continue "
                                       "it, or choose a new --out")
        old = training.read_json(cpath, LatentDirectionError, "config.json")["fixed"]
        training.check_same_settings(out_dir, old, fixed, list(fixed), error=LatentDirectionError)
    elif os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise LatentDirectionError(f"{out_dir!r} exists and is not a latent-direction run (no config.json); "
                                   "choose a new or empty --out")
    os.makedirs(out_dir, exist_ok=True)
    training.write_json(cpath, {"fixed": fixed, "steps": int(config.steps), "train_steps": int(train_steps),
                                "eval_samples": int(eval_samples), "generator": info, "command": command,
                                "devices": n_dev})
    root = jax.random.key(seed)
    seconds = {}

    # 1. directions ---------------------------------------------------------------------------
    t0 = time.time()
    ddir = os.path.join(out_dir, "directions")
    found = optimise_directions(gen, params, config, jax.random.fold_in(root, STREAMS["directions"]), mesh=mesh,
                                run_dir=ddir, resume=resume, checkpoint_every=checkpoint_every, progress=progress)
    eps = config.shift(gen)
    np.savez(os.path.join(ddir, "directions.npz"), v_light=found.v_light, v_dark=found.v_dark, epsilon=eps)
    seconds["directions"] = time.time() - t0
    hist = found.history
    if hist:
        steps = [r["step"] for r in hist]
        viz.curves_plot(steps, {f"{n} {side}": [r[f"{n}_{side}"] for r in hist] for side in ("light", "dark")
                                for n in ("loss", "lc", "ls")}, os.path.join(out_dir, "directions-loss.png"),
                        xlabel="step", ylabel="Eq. 1 terms", title="L = λ L_c + L_s (light: +λ, dark: -λ)")

    # 2. pictures and dataset ------------------------------------------------------------------
    t0 = time.time()
    dkey = jax.random.fold_in(root, STREAMS["dataset"])
    nfig = _FIGURE_SAMPLES
    fig = next(iter_masks(gen, params, config, found.v_light, found.v_dark, dkey, np.arange(nfig), mesh=mesh,
                          batch_size=mask_batch_size))[2]
    refined, keep, _ = refine_masks(fig["mask"], fig["change"], config)
    directions_figure(fig, refined, keep, os.path.join(out_dir, "directions.png"))
    data_dir = os.path.join(out_dir, "dataset")
    index_path = os.path.join(data_dir, INDEX_FILE)
    done = False
    if resume and os.path.isfile(index_path):
        done = bool(training.read_json(index_path, DatasetError, INDEX_FILE).get("complete"))
        if not done:
            shutil.rmtree(data_dir)  # an interrupted write: deterministic, so written again
    if not done:
        write_direction_dataset(gen, params, config, found.v_light, found.v_dark, data_dir, key=dkey, seed=seed,
                                num_samples=dataset_samples, shard_size=shard_size, batch_size=mask_batch_size,
                                mesh=mesh, max_candidates_factor=max_candidates_factor, generator_info=info,
                                command=command, progress=progress)
    dmeta = training.read_json(index_path, DatasetError, INDEX_FILE)
    seconds["dataset"] = time.time() - t0

    # 3. segmenter ------------------------------------------------------------------------------
    t0 = time.time()
    sdir = os.path.join(out_dir, "segmenter")
    ds = open_dataset(data_dir)
    try:
        seg = fit_segmenter(ds, arch=arch, model_kwargs=model_kwargs, steps=train_steps, batch_size=train_batch_size,
                            lr=lr, seed=seed, mesh=mesh, out_dir=sdir, resume=resume and os.path.isdir(sdir),
                            val_samples=0, checkpoint_every=checkpoint_every, data_info={"path": data_dir},
                            progress=progress, quiet=quiet)
    finally:
        ds.close()
    seconds["segmenter"] = time.time() - t0

    # 4. evaluation ------------------------------------------------------------------------------
    t0 = time.time()
    ekey = jax.random.fold_in(root, STREAMS["evaluation"])
    parts = [o for _, _, o in iter_masks(gen, params, config, found.v_light, found.v_dark, ekey,
                                         np.arange(eval_samples), mesh=mesh, batch_size=mask_batch_size,
                                         shifted=False, progress=progress, desc="evaluation")]
    sample = {n: np.concatenate([p[n] for p in parts]) for n in ("image", "mask")}
    images = to_uint8(sample["image"])
    prob = foreground_probability(seg, images, mesh=mesh, batch_size=mask_batch_size)
    seg_mask = prob > 0.5
    ev = {"samples": int(eval_samples)}
    nshow = min(eval_samples, _FIGURE_SAMPLES)
    if labels is not None:
        reference = reference_foreground(labels, images, ignore_label)
        labelled = np.ones(len(reference), bool) if ignore_label is None else ~np.all(reference == ignore_label,
                                                                                       axis=(1, 2))
        if not labelled.any():
            raise LatentDirectionError(f"the reference labeller skipped all {eval_samples} evaluation samples; "
                                       "evaluate more samples (--eval-samples) or use another labeller")
        box = mean_box_size(reference[labelled], ignore_label)
        ell = np.broadcast_to(ellipse_mask(images.shape[1], images.shape[2], *box), seg_mask.shape)
        preds = {"segmenter": seg_mask, "M(z)": sample["mask"], "all foreground": np.ones_like(seg_mask),
                 "centred ellipse": ell}
        table = evaluate_masks({n: p[labelled] for n, p in preds.items()}, reference[labelled],
                               scores={"segmenter": prob[labelled]}, ignore_label=ignore_label)
        valid = reference[labelled] != (ignore_label if ignore_label is not None else -1)
        ev.update(labels=str(getattr(labels, "name", labels)), labelled=int(labelled.sum()), table=table,
                  reference_fraction=float(reference[labelled][valid].mean()), ellipse=list(box),
                  verdict=_verdict(table))
        show = np.flatnonzero(labelled)[:nshow]
        _evaluation_figure(images[show], reference[show], {"M(z)": sample["mask"][show], "segmenter": seg_mask[show],
                                                           "ellipse": ell[show]}, os.path.join(out_dir,
                                                                                               "evaluation.png"))
    else:
        agree = binary_segmentation_metrics(seg_mask, sample["mask"].astype(np.uint8), average="image")
        ev["agreement_miou"] = float(agree.miou)
        _evaluation_figure(images[:nshow], sample["mask"][:nshow].astype(np.uint8),
                           {"M(z)": sample["mask"][:nshow], "segmenter": seg_mask[:nshow]},
                           os.path.join(out_dir, "evaluation.png"))
    seconds["evaluation"] = time.time() - t0

    final = hist[-1] if hist else {k: float("nan") for k in ("loss_light", "lc_light", "ls_light", "loss_dark",
                                                             "lc_dark", "ls_dark")}
    summary = {
        "generator": info, "config": vars(config), "seed": int(seed), "devices": n_dev,
        "directions": {"latent_space": latent_space(gen), "dim": int(found.v_light.size), "epsilon": eps,
                       "steps": found.steps, "resumed_from": found.resumed_from,
                       "dot": float(found.v_light @ found.v_dark), "final": final},
        "dataset": {"path": data_dir, "samples": int(dmeta["num_samples"]), "refinement": dmeta["refinement"]},
        "segmenter": {"path": sdir, "arch": arch, "steps": seg.step, "batch_size": int(train_batch_size),
                      "final_loss": seg.summary["final_loss"] if seg.summary["final_loss"] is not None
                      else float("nan"), "resumed_from": seg.summary["resumed_from"]},
        "evaluation": ev, "seconds": seconds,
    }
    training.write_json(os.path.join(out_dir, "report.json"), summary)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(summary))
    training.write_json(os.path.join(out_dir, "manifest.json"), {"files": {
        "config.json": "settings (fixed: a resume must match them), generator, command",
        "directions/": "Orbax checkpoints of the direction search; directions.npz: v_light, v_dark [D], epsilon",
        "directions-loss.png": "Eq. 1 and its terms against the step",
        "directions.png": "G(z) | G(z+εv_l) | G(z+εv_d) | M(z) | refined mask (grey: dropped)",
        "dataset/": "refined (image, mask) pairs, UFGS format (gansem.ufgs.records.open_dataset)",
        "segmenter/": "the trained segmenter (gansem.ufgs.predict.TrainedSegmenter.load)",
        "evaluation.png": "fresh samples: image | reference | M(z) | segmenter | ellipse baseline",
        "report.json": "all numbers", "report.md": "the report", "manifest.json": "this file"}})
    return summary
