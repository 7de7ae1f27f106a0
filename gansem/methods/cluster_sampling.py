"""Cluster-guided image synthesis with an unconditional GAN, end to end (seed paper 002).

One call, :func:`run_cluster_sampling`, does what Fig. 1 / Algorithm 1 describe and
evaluates it:

1. sample ``num_latents`` latent codes ``z`` from the generator's prior;
2. cluster their representations ``G_[n](z)`` with K-means, optionally refining one
   cluster at a later layer (:mod:`gansem.methods.latent_clusters`);
3. train one mapping ``T_c`` per (leaf) cluster by IMLE, all clusters in one jitted
   program, Orbax-checkpointed and resumable (:mod:`gansem.methods.imle`);
4. evaluate: draw ``eval_samples`` latents ``T_c(e)`` per cluster, push them through the
   generator and assign them to the clusters with the same centroids; the **assignment
   accuracy** of cluster c is the fraction that lands in c. The baseline is the prior:
   the fraction of prior samples that land in c (the cluster's share of the prior mass,
   ``1/C`` on average over clusters). The paper judges clusters by attribute classifiers
   (Tables 1-2); this is the label-free check the issue asks for. A high accuracy alone can
   hide a collapsed ``T_c`` (a texture that happens to sit in cluster c), so
   :func:`collapse_check` compares every cluster's samples with its training latents: the
   ratio of their mean norms and of their diversities (mean pairwise distance) in latent and
   in image space, and flags a cluster outside :data:`NORM_RATIO_RANGE` or under
   :data:`MIN_DIVERSITY_RATIO`;
5. for a class-conditional generator (BigGAN), the paper's cross-class use (Sec. 4.4,
   Fig. 6): the clusters and mappings are learned on one class (``class_label``) and
   ``T_c`` is applied with other classes (``transfer_classes``), which are assigned to the
   same centroids and compared with the prior of that class;
6. write pictures (samples of every ``T_c``, prior members of every cluster, the IMLE
   objective per epoch), ``report.json``, ``report.md`` and ``manifest.json``.

Run directory (``out_dir``)::

    config.json        settings (a resume must match them), generator
    clusters.npz       latents, class labels, per-level labels, leaf labels, centroids
    checkpoints/<e>/   Orbax: the stacked T_c state and the objective history up to epoch e
    imle_objective.png the IMLE objective (Eq. 2 value, fixed evaluation draw) per epoch, per cluster and mean
    samples_tc.png     rows: samples G(T_c(e)) of each cluster, with their assignment accuracy
    cluster_members.png rows: prior samples that fall in each cluster (what the cluster is)
    transfer.png       (conditional generators with transfer classes) T_c applied to other classes
    report.json, report.md, manifest.json
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from .. import training, viz
from ..batching import map_batches
from ..features import to_uint8
from ..zoo import load_generator
from . import imle
from .latent_clusters import (ClusterLevel, LevelSpec, assign_levels, fit_cluster_levels, hierarchy_description,
                              leaf_labels)

__all__ = [
    "ClusterSamplingConfig",
    "ClusterSamplingError",
    "run_cluster_sampling",
    "assignment_accuracy",
    "generate_images",
    "load_clusters",
    "mean_pairwise_distance",
    "collapse_check",
    "NORM_RATIO_RANGE",
    "MIN_DIVERSITY_RATIO",
]

CONFIG_FILE = "config.json"
CLUSTERS_FILE = "clusters.npz"
#: Settings that may change when a run is resumed; every other one is fixed at creation.
RESUMABLE = ("epochs", "checkpoint_every", "eval_samples", "grid_samples", "diversity_samples")
#: A cluster whose T_c samples' mean norm over its training latents' falls outside this range is collapsed.
NORM_RATIO_RANGE = (0.8, 1.25)
#: ... or whose samples are less than this fraction as diverse (latent or image space) as its latents.
MIN_DIVERSITY_RATIO = 0.5


class ClusterSamplingError(ValueError):
    """Bad settings, or a run directory that does not fit the request."""


@dataclasses.dataclass(frozen=True)
class ClusterSamplingConfig:
    """Settings of :func:`run_cluster_sampling`.

    Attributes:
        generator: built-in name, gansem checkpoint directory or original checkpoint file.
        truncation: the generator's truncation setting (families that have one); ``None``: its own.
        levels: :class:`LevelSpec` s, first to last: the first clusters ``G_[n](z)`` at one layer,
            each later one refines a cluster of the previous level at a later layer.
        class_label: conditional generators: the class all latents are sampled with.
        transfer_classes: conditional generators: classes ``T_c`` is applied to after training on
            ``class_label`` (the paper's cross-class use).
        num_latents: latent codes sampled and clustered.
        kmeans_iters: maximum Lloyd iterations.
        hidden, num_aux, imle_batch_size, lr, lr_decay, epochs, steps_per_epoch: ``T_c`` width, Γ,
            pairs per Adam step, Adam rate of the first epoch and its decay per epoch, epochs, steps
            per epoch (``None``: one pass over the largest cluster).
        sphere: ``T_c`` outputs on the sphere of the prior's root-mean-square norm (estimated from
            the ``num_latents`` prior draws); ``False``: unconstrained outputs, which IMLE shrinks
            towards the cluster mean (:mod:`gansem.methods.imle`).
        checkpoint_every: epochs between Orbax checkpoints.
        eval_samples: samples per cluster for the assignment accuracy (and as many prior samples
            per cluster for the baseline).
        diversity_samples: images per cluster (T_c samples and training latents) for the
            image-space diversity of :func:`collapse_check`.
        grid_samples: images per cluster in the pictures.
        batch_size: generator batch size.
        seed: everything random derives from it.
    """

    generator: str = "dcgan-digiface"
    truncation: Optional[float] = None
    levels: tuple = (LevelSpec("block4", 4),)
    class_label: Optional[int] = None
    transfer_classes: tuple = ()
    num_latents: int = 10000
    kmeans_iters: int = 50
    hidden: int = 256
    num_aux: int = 4096
    imle_batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.92
    sphere: bool = True
    epochs: int = 40
    steps_per_epoch: Optional[int] = None
    checkpoint_every: int = 5
    eval_samples: int = 512
    diversity_samples: int = 64
    grid_samples: int = 8
    batch_size: int = 256
    seed: int = 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["levels"] = [list(LevelSpec(*s)) for s in self.levels]
        d["transfer_classes"] = list(self.transfer_classes)
        return d

    def check(self) -> None:
        """Checks what needs no generator; raises :class:`ClusterSamplingError`."""
        positive = ("num_latents", "kmeans_iters", "hidden", "num_aux", "imle_batch_size", "checkpoint_every",
                    "eval_samples", "diversity_samples", "grid_samples", "batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ClusterSamplingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ClusterSamplingError(f"epochs must be >= 0, got {self.epochs}")
        if not self.levels:
            raise ClusterSamplingError("at least one clustering level is needed")
        for i, s in enumerate(self.levels):
            s = LevelSpec(*s)
            if s.num_clusters < 2:
                raise ClusterSamplingError(f"level {i} ({s.layer}) needs at least 2 clusters, got {s.num_clusters}")
            if s.num_clusters * 2 > self.num_latents:
                raise ClusterSamplingError(f"{s.num_clusters} clusters need more than {self.num_latents} latents")
        if self.transfer_classes and self.class_label is None:
            raise ClusterSamplingError("transfer classes need the class the mappings are trained on (class_label)")


# -- pieces ------------------------------------------------------------------------------------


def generate_images(generator, params, latents, class_labels=None, *, batch_size: int = 64, mesh=None) -> np.ndarray:
    """``G(z)`` as uint8 ``[N, H, W, 3]`` (batches split over ``mesh``)."""
    def program(p, z, y=None):
        return generator.synthesize(p, z, y)[0]

    out = [to_uint8(img) for _, _, img in map_batches(program, [np.asarray(latents), class_labels],
                                                        batch_size=batch_size, mesh=mesh, bcast_args=(params,))]
    return np.concatenate(out)


def _labels_for(generator, n: int, label: Optional[int]):
    return None if generator.num_classes == 0 else np.full((n,), int(label), np.int32)


def assignment_accuracy(generator, params, levels: Sequence[ClusterLevel], result: imle.IMLEResult, key, *,
                        num_samples: int, class_label: Optional[int] = None, batch_size: int = 256,
                        mesh=None) -> dict:
    """How often ``G(T_c(e))`` lands back in cluster c, against samples from the prior.

    Args:
        levels: the clustering (the leaf clusters are ``0..C-1`` of its last level).
        result: the trained mappings, one per leaf cluster, in that order.
        key: ``fold_in(key, 0)`` draws the auxiliary samples, ``fold_in(key, 1)`` the prior samples.
        num_samples: samples per cluster (and ``C × num_samples`` from the prior).
        class_label: conditional generators: the class to generate with.

    Returns:
        ``{"tc_accuracy": [C], "prior_rate": [C], "confusion": [C, C + 1] (rows: T_c, columns: the
        assigned leaf cluster, last column: off the hierarchy path), "tc_latents": [C, n, ...],
        "prior_latents": [C·n, ...], "prior_leaf": [C·n]}``.
    """
    c = len(levels[-1].centroids)
    shape = tuple(generator.latent_shape)
    z_tc = np.asarray(imle.sample_cluster_latents(result.config, result.state, jax.random.fold_in(key, 0),
                                                  np.arange(c), num_samples)).reshape((c, num_samples) + shape)
    flat = z_tc.reshape((c * num_samples,) + shape)
    leaf_tc = leaf_labels(assign_levels(generator, params, flat, _labels_for(generator, len(flat), class_label),
                                        levels=levels, batch_size=batch_size, mesh=mesh), levels)
    leaf_tc = leaf_tc.reshape(c, num_samples)
    z_prior = np.asarray(generator.sample_latents(jax.random.fold_in(key, 1), c * num_samples))
    leaf_prior = leaf_labels(assign_levels(generator, params, z_prior,
                                           _labels_for(generator, len(z_prior), class_label),
                                           levels=levels, batch_size=batch_size, mesh=mesh), levels)
    confusion = np.stack([np.bincount(np.where(r < 0, c, r), minlength=c + 1) for r in leaf_tc])
    return {"tc_accuracy": (leaf_tc == np.arange(c)[:, None]).mean(1),
            "prior_rate": np.array([(leaf_prior == i).mean() for i in range(c)]),
            "confusion": confusion, "tc_latents": z_tc, "prior_latents": z_prior, "prior_leaf": leaf_prior}


def mean_pairwise_distance(x) -> float:
    """Mean Euclidean distance over the ``n(n-1)`` ordered pairs of distinct rows of ``x [n, ...]`` (0 if n < 2)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = len(x)
    if n < 2:
        return 0.0
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(d2, 0.0)
    return float(np.sqrt(d2).sum() / (n * (n - 1)))


def collapse_check(samples, targets, sample_images=None, target_images=None) -> list:
    """Does any ``T_c`` collapse? Its samples against its training latents, cluster by cluster.

    Args:
        samples: per cluster, ``T_c``'s latents ``[n_c, d]`` (a list or ``[C, n, d]``).
        targets: per cluster, the training latents ``[m_c, d]`` the mapping was fitted to.
        sample_images, target_images: optional, per cluster, images ``[k, H, W, 3]`` of (some of)
            both, for the image-space diversity.

    Returns:
        One dict per cluster: ``norm_ratio`` (mean ``||z||`` of the samples over the targets'),
        ``latent_diversity_ratio`` and ``image_diversity_ratio`` (:func:`mean_pairwise_distance`
        of the samples over the targets'; ``None`` without images) and ``collapsed``: the norm
        ratio outside :data:`NORM_RATIO_RANGE` or a diversity ratio below :data:`MIN_DIVERSITY_RATIO`.
    """
    out = []
    for c in range(len(samples)):
        s = np.asarray(samples[c], np.float64).reshape(len(samples[c]), -1)
        t = np.asarray(targets[c], np.float64).reshape(len(targets[c]), -1)
        norm_ratio = float(np.linalg.norm(s, axis=1).mean() / np.linalg.norm(t, axis=1).mean())
        lat = mean_pairwise_distance(s[:512]) / max(mean_pairwise_distance(t[:512]), 1e-12)
        img = None
        if sample_images is not None and target_images is not None:
            img = (mean_pairwise_distance(np.asarray(sample_images[c], np.float64) / 255.0)
                   / max(mean_pairwise_distance(np.asarray(target_images[c], np.float64) / 255.0), 1e-12))
        ratios = [lat] + ([img] if img is not None else [])
        collapsed = (not NORM_RATIO_RANGE[0] <= norm_ratio <= NORM_RATIO_RANGE[1]
                     or min(ratios) < MIN_DIVERSITY_RATIO)
        out.append({"cluster": c, "norm_ratio": norm_ratio, "latent_diversity_ratio": float(lat),
                    "image_diversity_ratio": None if img is None else float(img), "collapsed": bool(collapsed)})
    return out


def load_clusters(run_dir: str) -> tuple[tuple, dict]:
    """``(levels, arrays)`` from a run's ``clusters.npz`` (``arrays``: latents, class_labels, labels, leaf)."""
    with np.load(os.path.join(run_dir, CLUSTERS_FILE), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    levels = tuple(ClusterLevel(layer=str(arrays["layers"][i]), pool=int(arrays["pools"][i]),
                                parent=int(arrays["parents"][i]), centroids=arrays[f"centroids{i}"])
                   for i in range(len(arrays["layers"])))
    return levels, arrays


def _save_clusters(run_dir: str, levels, latents, class_labels, labels, leaf) -> None:
    extra = {} if class_labels is None else {"class_labels": class_labels}
    tmp = os.path.join(run_dir, "clusters.tmp.npz")
    np.savez(tmp, latents=latents, labels=labels, leaf=leaf, layers=np.array([lv.layer for lv in levels]),
             pools=np.array([lv.pool for lv in levels]), parents=np.array([lv.parent for lv in levels]),
             **{f"centroids{i}": lv.centroids for i, lv in enumerate(levels)}, **extra)
    os.replace(tmp, os.path.join(run_dir, CLUSTERS_FILE))


def _read_config(out_dir: str) -> dict:
    path = os.path.join(out_dir, CONFIG_FILE)
    stored = training.read_json(path, ClusterSamplingError, f"{path} is missing")
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
        raise ClusterSamplingError(f"{path} holds no run settings; the run directory is damaged")
    return stored


def _open_run_dir(out_dir: str, resume: bool, settings: dict) -> bool:
    """Checks ``out_dir`` against the request; ``True`` if it holds the run to resume.

    Every setting outside :data:`RESUMABLE` must be the run's; one the run does not record (a run
    written before the setting existed) counts as different.
    """
    stored = training.stored_run(out_dir, resume, read_meta=_read_config, error=ClusterSamplingError,
                                 what="cluster-sampling", meta_file=CONFIG_FILE)
    if stored is None:
        if resume:
            raise ClusterSamplingError(f"--resume: {out_dir!r} holds no cluster-sampling run ({CONFIG_FILE} missing)")
        return False
    fixed = [k for k in settings if k not in RESUMABLE]
    old = {k: stored["config"].get(k) for k in fixed}
    training.check_same_settings(out_dir, old, settings, fixed, error=ClusterSamplingError)
    return True


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _check_generator(gen, cfg: ClusterSamplingConfig) -> None:
    for s in cfg.levels:
        s = LevelSpec(*s)
        if s.layer not in {l.name for l in gen.feature_layers()}:
            raise ClusterSamplingError(f"the {gen.family} generator has no layer {s.layer!r}; its layers: "
                                       f"{', '.join(l.name for l in gen.feature_layers())}")
    order = {l.name: l.index for l in gen.feature_layers()}
    for a, b in zip(cfg.levels, cfg.levels[1:]):
        if order[LevelSpec(*b).layer] < order[LevelSpec(*a).layer]:
            raise ClusterSamplingError(f"a refinement clusters a later layer than its parent level: "
                                       f"{LevelSpec(*b).layer} comes before {LevelSpec(*a).layer}")
    classes = [cfg.class_label] if cfg.class_label is not None else []
    if gen.num_classes == 0 and (classes or cfg.transfer_classes):
        raise ClusterSamplingError(f"the {gen.family} generator is unconditional: drop --class-label and "
                                   "--transfer-classes")
    if gen.num_classes and cfg.class_label is None:
        raise ClusterSamplingError(f"the {gen.family} generator is class-conditional ({gen.num_classes} classes): "
                                   "give the class to cluster and train on (--class-label)")
    for y in classes + list(cfg.transfer_classes):
        if not 0 <= y < gen.num_classes:
            raise ClusterSamplingError(f"class {y} is outside [0, {gen.num_classes})")


# -- the job -----------------------------------------------------------------------------------


def run_cluster_sampling(config: ClusterSamplingConfig, out_dir: str, *, resume: bool = False, mesh=None,
                         progress: bool = True, quiet: bool = False) -> dict:
    """Clusters → IMLE mappings → evaluation and pictures; see the module docstring.

    Args:
        config: :class:`ClusterSamplingConfig`.
        out_dir: run directory (new or empty; an existing run with ``resume``).
        resume: continue the run in ``out_dir`` (clusters are loaded, IMLE resumes from its
            latest checkpoint; the settings must match, except :data:`RESUMABLE` ones).
        mesh: generator batches and K-means rows are split over its devices (default: one device).

    Returns:
        The report (also written as ``report.json``).

    Raises:
        ClusterSamplingError / GeneratorError (ValueErrors): bad settings or run directory,
        before anything is written.
    """
    t_start = time.perf_counter()
    cfg = dataclasses.replace(config, levels=tuple(LevelSpec(*s) for s in config.levels),
                              transfer_classes=tuple(int(y) for y in config.transfer_classes))
    cfg.check()
    settings = cfg.to_json()
    resuming = _open_run_dir(out_dir, resume, settings)
    gen, params, gen_meta = load_generator(cfg.generator)
    if cfg.truncation is not None:
        gen = gen.with_settings(truncation=cfg.truncation)
    _check_generator(gen, cfg)
    imle_cfg = imle.IMLEConfig(latent_dim=int(np.prod(gen.latent_shape)), hidden=cfg.hidden, num_aux=cfg.num_aux,
                               batch_size=cfg.imle_batch_size, steps_per_epoch=cfg.steps_per_epoch, lr=cfg.lr,
                               lr_decay=cfg.lr_decay)
    imle_cfg.check()
    os.makedirs(out_dir, exist_ok=True)
    if not resuming:
        training.write_json(os.path.join(out_dir, CONFIG_FILE), {
            "format": "gansem.cluster_sampling", "version": 1, "config": settings,
            "generator": {"name": gen_meta.get("name"), "family": gen.family, "config": gen.to_config()}})
    key = jax.random.key(cfg.seed)
    timings = {}

    # -- 1-2: latents and clusters ----------------------------------------------------------
    t0 = time.perf_counter()
    if resuming and os.path.isfile(os.path.join(out_dir, CLUSTERS_FILE)):
        levels, arrays = load_clusters(out_dir)
        latents, leaf = arrays["latents"], arrays["leaf"]
        cluster_info = None
        _log(f"loaded the clusters of {out_dir}", quiet)
    else:
        latents = np.asarray(gen.sample_latents(jax.random.fold_in(key, 0), cfg.num_latents))
        class_labels = _labels_for(gen, cfg.num_latents, cfg.class_label)
        _log(f"clustering {cfg.num_latents} latents: {', '.join(f'{s.layer} C={s.num_clusters}' for s in cfg.levels)}",
             quiet)
        levels, labels, cluster_info = fit_cluster_levels(
            jax.random.fold_in(key, 1), gen, params, latents, class_labels, specs=cfg.levels,
            batch_size=cfg.batch_size, mesh=mesh, max_iter=cfg.kmeans_iters, progress=progress)
        leaf = leaf_labels(labels, levels)
        _save_clusters(out_dir, levels, latents, class_labels, labels, leaf)
    c = len(levels[-1].centroids)
    sizes = np.bincount(leaf[leaf >= 0], minlength=c)
    timings["clusters_s"] = time.perf_counter() - t0

    # -- 3: IMLE ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    flat_latents = latents.reshape(len(latents), -1)
    targets = imle.pack_targets(flat_latents, leaf, range(c))
    radius = float(np.sqrt(np.mean(np.sum(flat_latents.astype(np.float64) ** 2, 1)))) if cfg.sphere else None
    imle_cfg = dataclasses.replace(imle_cfg, latent_radius=radius)
    _log(f"IMLE: {c} mappings T_c on {sizes.tolist()} latents, Γ={cfg.num_aux}, {cfg.epochs} epochs", quiet)
    result = imle.train_imle(targets, jax.random.fold_in(key, 2), imle_cfg, epochs=cfg.epochs, run_dir=out_dir,
                             resume=resuming, checkpoint_every=cfg.checkpoint_every, progress=progress)
    timings["imle_s"] = time.perf_counter() - t0
    objective = np.array([r["objective"] for r in result.history])   # [epochs, C], fixed evaluation draw
    mean_obj = objective.mean(1) if len(objective) else np.zeros(0)
    rises = [int(i + 2) for i in np.flatnonzero(np.diff(mean_obj) > 0)]
    cluster_rises = [[int(i + 2) for i in np.flatnonzero(np.diff(objective[:, k]) > 0)] if len(objective) else []
                     for k in range(c)]

    # -- 4: evaluation ------------------------------------------------------------------------
    t0 = time.perf_counter()
    ev = assignment_accuracy(gen, params, levels, result, jax.random.fold_in(key, 3), num_samples=cfg.eval_samples,
                             class_label=cfg.class_label, batch_size=cfg.batch_size, mesh=mesh)
    transfer = []
    for y in cfg.transfer_classes:
        tr = assignment_accuracy(gen, params, levels, result, jax.random.fold_in(jax.random.fold_in(key, 4), y),
                                 num_samples=cfg.eval_samples, class_label=y, batch_size=cfg.batch_size, mesh=mesh)
        transfer.append((y, tr))
    timings["evaluation_s"] = time.perf_counter() - t0

    # -- 5: pictures --------------------------------------------------------------------------
    t0 = time.perf_counter()
    g = cfg.grid_samples
    bs = min(cfg.batch_size, 64)
    k = min(max(cfg.diversity_samples, g), cfg.eval_samples)    # T_c images: the grid and the diversity check
    shape = tuple(gen.latent_shape)
    tc_imgs = generate_images(gen, params, ev["tc_latents"][:, :k].reshape((c * k,) + shape),
                              _labels_for(gen, c * k, cfg.class_label), batch_size=bs, mesh=mesh)
    tc_imgs = tc_imgs.reshape((c, k) + tc_imgs.shape[1:])
    member_z = [latents[leaf == i][:cfg.diversity_samples] for i in range(c)]     # training latents of each c
    member_imgs = [generate_images(gen, params, zc, _labels_for(gen, len(zc), cfg.class_label), batch_size=bs,
                                   mesh=mesh) for zc in member_z]
    collapse = collapse_check(ev["tc_latents"].reshape(c, cfg.eval_samples, -1),
                              [flat_latents[leaf == i] for i in range(c)], tc_imgs[:, :cfg.diversity_samples],
                              member_imgs)
    rows = {f"T_{i} ({ev['tc_accuracy'][i]:.0%})": tc_imgs[i, :g] for i in range(c)}
    viz.image_rows_figure(rows, os.path.join(out_dir, "samples_tc.png"),
                          title=f"G(T_c(e)) per cluster (assignment accuracy); {hierarchy_description(levels)}")
    members = {}
    for i in range(c):
        idx = np.flatnonzero(ev["prior_leaf"] == i)[:g]
        if len(idx):
            imgs = generate_images(gen, params, ev["prior_latents"][idx], _labels_for(gen, len(idx), cfg.class_label),
                                   batch_size=bs, mesh=mesh)
            members[f"c{i} ({ev['prior_rate'][i]:.0%} of prior)"] = imgs
    if members:
        viz.image_rows_figure(members, os.path.join(out_dir, "cluster_members.png"),
                              title="prior samples G(z) assigned to each cluster")
    if transfer:
        trows = {}
        for y, tr in transfer:
            flat = tr["tc_latents"][:, :g].reshape((c * g,) + tuple(gen.latent_shape))
            imgs = generate_images(gen, params, flat, _labels_for(gen, c * g, y), batch_size=bs, mesh=mesh)
            for i in range(c):
                trows[f"class {y}, T_{i} ({tr['tc_accuracy'][i]:.0%})"] = imgs[i * g:(i + 1) * g]
        viz.image_rows_figure(trows, os.path.join(out_dir, "transfer.png"),
                              title=f"T_c learned on class {cfg.class_label}, applied to other classes")
    if len(objective):
        epochs_x = [r["epoch"] for r in result.history]
        curves = {f"c{i}": objective[:, i] for i in range(c)}
        curves["mean over clusters"] = mean_obj
        viz.curves_plot(epochs_x, curves, os.path.join(out_dir, "imle_objective.png"), xlabel="epoch",
                        ylabel="mean_i min_γ ||z_i - T_c(e_γ)||² (Eq. 2)",
                        title=f"IMLE objective on a fixed draw of Γ={cfg.num_aux}, {c} clusters")
    timings["pictures_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    report = {
        "generator": {"name": gen_meta.get("name"), "family": gen.family},
        "clustering": hierarchy_description(levels), "num_latents": int(len(latents)),
        "cluster_sizes": sizes.tolist(), "kmeans": cluster_info,
        "imle": {"epochs": len(result.history), "resumed_from": result.resumed_from,
                 "steps_per_epoch": result.config.steps_per_epoch, "num_aux": cfg.num_aux,
                 "latent_radius": radius, "lr": cfg.lr, "lr_decay": cfg.lr_decay,
                 "objective_first": mean_obj[:1].tolist(), "objective_last": mean_obj[-1:].tolist(),
                 "objective_monotone": not rises, "objective_rises_at_epochs": rises,
                 "cluster_objective_rises_at_epochs": cluster_rises,
                 "max_in_degree_last": result.history[-1]["max_in_degree"] if result.history else [],
                 "matched_fraction_last": result.history[-1]["matched_fraction"] if result.history else [],
                 "history": result.history},
        "collapse": collapse,
        "evaluation": {
            "samples_per_cluster": cfg.eval_samples,
            "per_cluster": [{"cluster": i, "train_latents": int(sizes[i]),
                             "tc_accuracy": float(ev["tc_accuracy"][i]), "prior_rate": float(ev["prior_rate"][i])}
                            for i in range(c)],
            "overall": {"tc_accuracy": float(ev["tc_accuracy"].mean()),
                        "prior_rate": float(ev["prior_rate"].mean()), "chance": 1.0 / c},
            "confusion": ev["confusion"].tolist(),
        },
        "transfer": [{"class": y, "tc_accuracy": tr["tc_accuracy"].tolist(), "prior_rate": tr["prior_rate"].tolist(),
                      "overall_tc_accuracy": float(tr["tc_accuracy"].mean()),
                      "overall_prior_rate": float(tr["prior_rate"].mean())} for y, tr in transfer],
        "timings": timings, "devices": 1 if mesh is None else int(mesh.devices.size),
        "backend": jax.default_backend(),
    }
    training.write_json(os.path.join(out_dir, "report.json"), report)
    _write_markdown(os.path.join(out_dir, "report.md"), report, cfg, bool(transfer))
    training.write_json(os.path.join(out_dir, "manifest.json"), {
        "kind": "gansem cluster-guided sampling run (seed paper 002)",
        "files": {
            CONFIG_FILE: "settings (fixed at creation except " + ", ".join(RESUMABLE) + ") and the generator",
            CLUSTERS_FILE: "latents [N, ...], class_labels, labels [N, L] per level, leaf [N] (-1 off the path), "
                           "layers/pools/parents and centroids<i> [C_i, D_i] per level",
            "checkpoints/<epoch>/": "Orbax, latest 2: state (stacked T_c params, batch_stats, Adam state, epoch), "
                                    "meta (objective history)",
            "imle_objective.png": "IMLE objective (Eq. 2 on a fixed auxiliary draw) per epoch, per cluster and mean",
            "samples_tc.png": "G(T_c(e)) per cluster, with assignment accuracy",
            "cluster_members.png": "prior samples assigned to each cluster",
            **({"transfer.png": "T_c applied to other classes"} if transfer else {}),
            "report.json": "everything measured", "report.md": "the report",
        },
    })
    _log(f"wrote {out_dir}: T_c assignment accuracy {report['evaluation']['overall']['tc_accuracy']:.3f} vs prior "
         f"{report['evaluation']['overall']['prior_rate']:.3f} ({timings['total_s']:.0f} s)", quiet)
    return report


def _write_markdown(path: str, report: dict, cfg: ClusterSamplingConfig, transfer: bool) -> None:
    ev, im = report["evaluation"], report["imle"]
    lines = [
        "# Cluster-guided sampling (IMLE)", "",
        f"Generator `{report['generator']['name']}` ({report['generator']['family']}); clustering "
        f"{report['clustering']} over {report['num_latents']} latents; cluster sizes {report['cluster_sizes']}.", "",
        f"IMLE: {im['epochs']} epochs × {im['steps_per_epoch']} Adam steps, Γ = {im['num_aux']}, Adam rate "
        f"{im['lr']:g} × {im['lr_decay']:g}^epoch; T_c outputs "
        + (f"on the sphere of radius {im['latent_radius']:.3f} (the prior's RMS norm)" if im["latent_radius"]
           else "unconstrained") + ".", "",
        f"IMLE objective (Eq. 2 on a fixed draw of Γ auxiliary vectors, after each epoch), mean over clusters "
        f"{im['objective_first'][0] if im['objective_first'] else float('nan'):.4f} → "
        f"{im['objective_last'][0] if im['objective_last'] else float('nan'):.4f}: "
        + ("**decreases monotonically in epochs**" if im["objective_monotone"]
           else f"**not monotone**: it rises at epochs {im['objective_rises_at_epochs']}")
        + "; per cluster, rises at epochs "
        + ", ".join(f"c{i}: {r or 'none'}" for i, r in enumerate(im["cluster_objective_rises_at_epochs"])) + ".", "",
        f"Matching in the last epoch: at most {max(im['max_in_degree_last'] or [0]):.0f} targets share one sample "
        f"(hubness), {min(im['matched_fraction_last'] or [0]):.0%}-{max(im['matched_fraction_last'] or [0]):.0%} "
        "of the samples are matched.", "",
        f"## Assignment accuracy and collapse check ({ev['samples_per_cluster']} samples per cluster)", "",
        "| cluster | training latents | T_c → c | prior → c | norm ratio | latent diversity | image diversity | "
        "collapsed |", "|---|---|---|---|---|---|---|---|",
    ]
    for r, k in zip(ev["per_cluster"], report["collapse"]):
        img = "–" if k["image_diversity_ratio"] is None else f"{k['image_diversity_ratio']:.3f}"
        lines.append(f"| {r['cluster']} | {r['train_latents']} | {r['tc_accuracy']:.3f} | {r['prior_rate']:.3f} | "
                     f"{k['norm_ratio']:.3f} | {k['latent_diversity_ratio']:.3f} | {img} | "
                     f"{'**yes**' if k['collapsed'] else 'no'} |")
    o = ev["overall"]
    lines += [f"| **mean** | | **{o['tc_accuracy']:.3f}** | {o['prior_rate']:.3f} | | | | |", "",
              "`T_c → c`: fraction of G(T_c(e)) assigned to cluster c; `prior → c`: fraction of G(z), z from the "
              "prior, assigned to c (its mean over clusters is the baseline of a random cluster choice). "
              "Norm ratio: mean ||T_c(e)|| over the mean norm of c's training latents; diversity: mean pairwise "
              "distance of the samples over that of the training latents, of the latents and of their images "
              f"({cfg.diversity_samples} each). Collapsed: norm ratio outside {list(NORM_RATIO_RANGE)} or a "
              f"diversity ratio under {MIN_DIVERSITY_RATIO}.", ""]
    if transfer:
        lines += ["## Cross-class transfer", "", "| class | T_c → c (mean) | prior → c (mean) |", "|---|---|---|"]
        lines += [f"| {t['class']} | {t['overall_tc_accuracy']:.3f} | {t['overall_prior_rate']:.3f} |"
                  for t in report["transfer"]]
        lines += ["", "![transfer](transfer.png)", ""]
    t = report["timings"]
    lines += ["## Pictures", "", "![T_c samples](samples_tc.png)", "", "![cluster members](cluster_members.png)", "",
              "![IMLE objective](imle_objective.png)", "",
              f"Time: clusters {t['clusters_s']:.1f} s, IMLE {t['imle_s']:.1f} s, evaluation {t['evaluation_s']:.1f} s, "
              f"pictures {t['pictures_s']:.1f} s, total {t['total_s']:.1f} s on {report['devices']} "
              f"{report['backend']} device(s).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))

