"""How well a mask-to-image generator obeys its mask: mask recovery and feature statistics (KLiSH Sec. 5).

A USCS generator is asked for an image of a semantic layout. SPADE (Park et al. 2019,
Sec. 4) judges such generators by segmenting their images with a network trained on real
images and comparing the result with the layout the generator was given. Here the layouts
are KLiSH masks of generated samples, and the segmenter is a UFGS network trained on
(image, KLiSH mask) pairs of the same run (:mod:`gansem.ufgs.train`), so no human label is
involved anywhere::

    recovery = mask_recovery(synth, segmenter, masks)          # pooled pixel accuracy, mIoU, IoU [K]

**Mask recovery.** For held-out pairs ``(x_i, m_i)`` the generator draws ``G(m_i)`` and the
segmenter labels it; the confusion table ``T[a, b] = #{pixels: m_i = a, S(G(m_i)) = b}`` is
pooled over all images and gives pixel accuracy ``tr T / ΣT`` and
``mIoU = mean_a T[a, a] / (Σ_b T[a, b] + Σ_b T[b, a] − T[a, a])`` over the classes present.
The same numbers for the real pairs, ``S(x_i)`` against ``m_i``, are the ceiling: the
segmenter's own agreement with KLiSH. A generator at its initial weights is the floor.

**Feature statistics.** The Fréchet distance of FID (Heusel et al. 2017),
``FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½``, needs an Inception network whose
weights cannot be fetched here (no network at run time, and no offline package ships
them), so it is computed in the feature space that *is* available: the segmenter's
bottleneck (UNet) or backbone (DeepLabV3) features, averaged over positions. The numbers
are therefore not comparable with published FIDs, only with each other: generated images
from one half of the held-out masks are compared with the real images of the other half,
and the real images of the first half against the same second half give the floor that
finite samples leave.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import sharding, viz
from ..metrics import contingency
from ..ufgs.predict import TrainedSegmenter
from ..ufgs.train import confusion_scores
from .synth import Synthesizer, UscsRunError, load_synthesizer
from .train import gan_programs, generator_items

__all__ = [
    "RecoveryScores",
    "mask_recovery",
    "recovery_of_images",
    "generate_images",
    "segmenter_features",
    "frechet_distance",
    "evaluate_synthesizers",
    "report_markdown",
    "examples_figure",
    "write_report",
    "initial_synthesizer",
    "held_out_pairs",
    "evaluate_uscs_run",
]


class RecoveryScores(NamedTuple):
    """Agreement of segmented images with the masks they were drawn from (pooled over images).

    Attributes:
        pixel_accuracy: fraction of pixels whose segmented class is the mask's.
        miou: mean IoU over the classes present in the masks or the predictions.
        iou: ``[K]`` per-class IoU (NaN for a class absent from both).
        table: ``[K, K]`` int64 confusion table ``[mask class, segmented class]``.
        images: number of images.
    """

    pixel_accuracy: float
    miou: float
    iou: np.ndarray
    table: np.ndarray
    images: int

    def to_json(self) -> dict:
        return {"pixel_accuracy": self.pixel_accuracy, "miou": self.miou,
                "iou": [None if np.isnan(v) else float(v) for v in self.iou], "images": self.images,
                "table": self.table.tolist()}


def _check_masks(masks, k: int, resolution: int) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 3 or m.shape[1:] != (resolution, resolution) or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"masks must be int [N, {resolution}, {resolution}], got {m.dtype} {m.shape}")
    if m.size and (m.min() < 0 or m.max() >= k):
        raise ValueError(f"mask ids must be in 0..{k - 1}, got {m.min()}..{m.max()}")
    return m.astype(np.int32)


def generate_images(synth, masks, *, seed: int = 0, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """``synth.generate`` over ``masks`` ``int [N, R, R]`` in batches -> ``uint8 [N, R, R, 3]``.

    Batch ``b`` uses seed ``seed + b`` so that, for a generator with a style input, the
    images do not all share one style (the batch size is part of what defines them).
    """
    masks = _check_masks(masks, synth.num_classes, synth.resolution)
    out = np.empty(masks.shape + (3,), np.uint8)
    starts = range(0, len(masks), batch_size)
    for b, s in enumerate(tqdm(starts, desc="generate", unit="batch", disable=not progress)):
        out[s:s + batch_size] = synth.generate(masks[s:s + batch_size], seed=seed + b)
    return out


def recovery_of_images(segmenter, images, masks, num_classes: int, batch_size: int = 64) -> RecoveryScores:
    """Segment ``images`` ``uint8 [N, R, R, 3]`` and score the labels against ``masks`` ``int [N, R, R]``."""
    masks = np.asarray(masks)
    pred = segmenter.predict(np.asarray(images), batch_size=batch_size)
    table = contingency(pred, masks, num_classes, num_classes)               # [mask class, segmented class]
    s = confusion_scores(table)
    return RecoveryScores(s["pixel_accuracy"], s["miou"], s["iou"], table, int(len(masks)))


def mask_recovery(synth, segmenter, masks, *, seed: int = 0, batch_size: int = 64,
                  progress: bool = False) -> RecoveryScores:
    """Generate an image for every mask and score the segmenter's labels of it against the mask."""
    images = generate_images(synth, masks, seed=seed, batch_size=batch_size, progress=progress)
    return recovery_of_images(segmenter, images, masks, synth.num_classes, batch_size)


@functools.lru_cache(maxsize=8)
def _feature_program(model):
    def pooled(variables, images):
        _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
        (feats,) = jax.tree.leaves(state["intermediates"])          # [B, h, w, C]: the one sown map
        return jnp.mean(feats.astype(jnp.float32), axis=(1, 2))        # [B, C]
    return jax.jit(pooled)


def segmenter_features(segmenter, images, batch_size: int = 64) -> np.ndarray:
    """Position-averaged bottleneck (UNet) / backbone (DeepLabV3) features: ``[N, R, R, 3] -> [N, C]`` float64.

    Images must be at the segmenter's training resolution.
    """
    images = np.asarray(images)
    r = segmenter.resolution
    if images.ndim != 4 or images.shape[1:] != (r, r, 3) or images.dtype != np.uint8:
        raise ValueError(f"segmenter_features takes uint8 [N, {r}, {r}, 3], got {images.dtype} {images.shape}")
    program = _feature_program(segmenter.model)
    out = [np.asarray(program(segmenter.variables, images[s:s + batch_size]), np.float64)
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, C]`` and ``b [M, C]``.

    ``‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½``; the matrix square roots are taken
    through symmetric eigendecompositions (negative eigenvalues of rounding clipped to 0),
    so the trace term is exact for positive semi-definite covariances.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two [N >= 2, C] feature sets, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa = _psd_sqrt(ca)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cb @ sa), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * cross)


def evaluate_synthesizers(synths: Mapping[str, object], segmenter, images, masks, *, seed: int = 0,
                          batch_size: int = 64, progress: bool = False) -> dict:
    """Mask recovery and feature distances of several generators on the same held-out pairs.

    Args:
        synths: name -> synthesiser (e.g. ``{"trained": s, "initial weights": s0}``); all with the
            segmenter's K and resolution.
        segmenter: a UFGS segmenter (:class:`gansem.ufgs.predict.TrainedSegmenter`) of the same classes.
        images, masks: held-out real pairs, ``uint8 [N, R, R, 3]`` and ``int [N, R, R]`` (N >= 4).
        seed: style seed of the first generated batch.

    Returns:
        ``{"pairs", "seed", "rows": {name: {"recovery": RecoveryScores.to_json(), "fd": float}},
        "real": {...the real images' row...}, "fd_space", "samples": {name: uint8 images [n, R, R, 3]}}``
        -- the rows for the generated images of every synthesiser and for the real images
        (the segmenter's agreement with KLiSH, and the finite-sample floor of the distance).
    """
    images = np.asarray(images)
    k, r = segmenter.num_classes, segmenter.resolution
    masks = _check_masks(masks, k, r)
    if images.shape != masks.shape + (3,) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 {masks.shape + (3,)}, got {images.dtype} {images.shape}")
    n = len(masks)
    if n < 4:
        raise ValueError(f"evaluation needs at least 4 held-out pairs, got {n}")
    for name, s in synths.items():
        if (s.num_classes, s.resolution) != (k, r):
            raise ValueError(f"synthesiser {name!r} draws K={s.num_classes} classes at {s.resolution} px, "
                             f"the segmenter knows K={k} at {r} px: they must come from the same classes")
    half = n // 2
    ref_feats = segmenter_features(segmenter, images[half:], batch_size)       # the other half: FD reference
    rows, samples = {}, {}
    real = recovery_of_images(segmenter, images, masks, k, batch_size)
    real_fd = frechet_distance(segmenter_features(segmenter, images[:half], batch_size), ref_feats)
    for name, synth in synths.items():
        generated = generate_images(synth, masks, seed=seed, batch_size=batch_size, progress=progress)
        rec = recovery_of_images(segmenter, generated, masks, k, batch_size)
        fd = frechet_distance(segmenter_features(segmenter, generated[:half], batch_size), ref_feats)
        rows[name] = {"recovery": rec.to_json(), "fd": fd}
        samples[name] = generated
    return {"pairs": n, "seed": int(seed), "rows": rows,
            "real": {"recovery": real.to_json(), "fd": real_fd},
            "fd_space": f"{segmenter.meta.get('arch', 'segmenter')} features averaged over positions "
                        f"({ref_feats.shape[1]} dimensions); {half} generated vs the other {n - half} real images",
            "samples": samples}


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def report_markdown(report: Mapping, class_names: Optional[Sequence[str]] = None) -> str:
    """The report of :func:`evaluate_synthesizers` as a markdown table (one row per image source)."""
    rows = [("real images (the segmenter's agreement with KLiSH: ceiling)", report["real"])]
    rows += [(f"generated: {name}", row) for name, row in report["rows"].items()]
    k = len(report["real"]["recovery"]["iou"])
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    head = "| images | pixel acc. | mIoU | FD (segmenter features) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (4 + k)]
    for title, row in rows:
        rec = row["recovery"]
        lines.append(f"| {title} | {_pct(rec['pixel_accuracy'])} | {_pct(rec['miou'])} | {row['fd']:.2f} | "
                     + " | ".join(_pct(v) for v in rec["iou"]) + " |")
    return "\n".join(lines) + (f"\n\n{report['pairs']} held-out pairs; IoU in %, pooled over images. "
                               f"FD: Fréchet distance in {report['fd_space']} (not Inception FID).\n")


def examples_figure(images, masks, samples: Mapping[str, np.ndarray], segmenter, palette, path: str,
                    num: int = 8, batch_size: int = 64) -> str:
    """A PNG grid, one held-out pair per row: mask | real image | S(real) | per synthesiser: generated | S(generated).

    ``S`` is the segmenter; masks and labels are drawn in ``palette`` ``[K, 3]`` uint8.
    """
    idx = np.arange(min(num, len(masks)))
    cols = [viz.colorize(np.asarray(masks)[idx], palette), np.asarray(images)[idx],
            viz.colorize(segmenter.predict(np.asarray(images)[idx], batch_size=batch_size), palette)]
    for gen in samples.values():
        cols += [gen[idx], viz.colorize(segmenter.predict(gen[idx], batch_size=batch_size), palette)]
    tiles = np.stack(cols, 1).reshape((-1,) + cols[0].shape[1:])            # row-major: one pair per row
    return viz.save_png(path, viz.image_grid(tiles, ncols=len(cols)))


def write_report(report: Mapping, out_dir: str, *, class_names=None, manifest: Optional[dict] = None) -> dict:
    """Write ``report.json`` and ``report.md`` (and extend ``manifest``); returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    body = {k: v for k, v in report.items() if k != "samples"}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(body, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(report, class_names))
    manifest = dict(manifest or {})
    manifest.update({"report.json": "mask recovery (confusion tables, IoU per class) and feature distances",
                     "report.md": "the same as a markdown table"})
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# -- a run against its initial weights -------------------------------------------------------


def initial_synthesizer(synth: Synthesizer) -> Synthesizer:
    """The run's generator at step 0: the same architecture with the weights its training started from.

    The initial state is a pure function of the run's seed (:func:`gansem.uscs.train.gan_programs`),
    so this is exactly "the same generator trained for zero steps".
    """
    cfg = synth.meta["config"]
    progs = gan_programs(synth.models, float(cfg["g_lr"]), float(cfg["d_lr"]), float(cfg["beta1"]),
                         float(cfg["beta2"]), float(cfg["lambda_fm"]), float(cfg["lambda_kl"]), sharding.make_mesh(1))
    state = progs.init(np.uint32(cfg["seed"]))
    return Synthesizer(models=synth.models, variables=jax.device_get(generator_items(state)), meta=synth.meta, step=0,
                       run_dir=synth.run_dir)


def held_out_pairs(synth: Synthesizer, num: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` (default: all) example pairs of the run: ``uint8 [n, R, R, 3]``, ``int32 [n, R, R]``.

    These are the pairs the run held out of training (see :meth:`Synthesizer.example`).

    Raises:
        UscsRunError: the run's dataset is gone, or holds fewer than 4 pairs.
    """
    n = synth.num_examples if num is None else min(int(num), synth.num_examples)
    if n < 4:
        raise UscsRunError(f"the run {synth.run_dir} has {synth.num_examples} example pairs (its dataset "
                           f"{(synth.meta.get('data') or {}).get('path')!r} is missing or too small); evaluation "
                           "needs at least 4")
    pairs = [synth.example(i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.int32)


def _labelling_id(meta: Mapping) -> Optional[str]:
    """The KLiSH classifier's hash that labelled a run's training pairs (``None`` if unknown)."""
    return ((meta.get("data") or {}).get("meta") or {}).get("classifier_sha256")


def evaluate_uscs_run(run_dir: str, segmenter_dir: str, out_dir: str, *, step: Optional[int] = None,
                      num_pairs: Optional[int] = None, seed: int = 0, batch_size: int = 32, num_examples: int = 8,
                      progress: bool = True) -> dict:
    """Score a USCS run on its held-out pairs against its initial weights; write the report.

    Args:
        run_dir: a run of :func:`gansem.uscs.train.fit_uscs`; ``step`` its checkpoint (default latest).
        segmenter_dir: a UFGS segmenter run trained on pairs of the same KLiSH classifier.
        out_dir: where ``report.json``, ``report.md``, ``examples.png`` and ``manifest.json`` go.
        num_pairs: held-out pairs to use (default all).
        seed: style seed of the first batch; batch_size: images per call.

    Returns:
        The report of :func:`evaluate_synthesizers` (without the generated images) plus the run,
        step and segmenter.

    Raises:
        UscsRunError / SegmenterRunError (ValueErrors): a missing or damaged run, or a segmenter of other classes.
    """
    synth = load_synthesizer(run_dir, step)
    seg = TrainedSegmenter.load(segmenter_dir)
    a, b = _labelling_id(synth.meta), _labelling_id(seg.meta)
    if a and b and a != b:
        raise UscsRunError(f"the segmenter {segmenter_dir} was trained on pairs of another KLiSH classifier than "
                           f"the run {run_dir} (classifier hashes {b[:12]}… and {a[:12]}…): its classes differ")
    images, masks = held_out_pairs(synth, num_pairs)
    synths = {f"trained ({synth.step} steps)": synth, "initial weights (0 steps)": initial_synthesizer(synth)}
    report = evaluate_synthesizers(synths, seg, images, masks, seed=seed, batch_size=batch_size, progress=progress)
    report.update(run=os.path.abspath(run_dir), step=synth.step, segmenter=os.path.abspath(segmenter_dir),
                  segmenter_step=seg.step)
    manifest = {"examples.png": "held-out pairs: mask | real | S(real) | per generator: image | S(image) "
                                "(S: the segmenter)"}
    os.makedirs(out_dir, exist_ok=True)
    examples_figure(images, masks, report["samples"], seg, synth.palette, os.path.join(out_dir, "examples.png"),
                    num=num_examples, batch_size=batch_size)
    write_report(report, out_dir, class_names=synth.class_names, manifest=manifest)
    return {k: v for k, v in report.items() if k != "samples"}
