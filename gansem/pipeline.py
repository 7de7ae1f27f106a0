"""The KLiSH main job: generator → features → K-means → merge loop → trajectory, pictures, report.

``run_klish_job(config, run_dir)`` is what ``python launch/klish.py`` calls; it is
importable so research code and tests run the very same pipeline.

Run directory layout (also written to ``manifest.json``)::

    config.json          the configuration (what defines the results)
    latents.npy          the generator inputs of the clustered samples
    transform.npz        the clustering-space map (mean, layer scale, PCA basis; features.FeatureTransform)
    trajectory/<step>/   Orbax: one merge record per step (K, W, b, IoU, ECoS, p→q, sizes)
    state/<step>/        Orbax: resumable algorithm state (latest two)
    init.json            K-means / filter / first-solve statistics
    clusters.png         cluster maps of a few samples for several K
    trajectory.png       min IoU and merged-pair ECoS against K
    trajectory.json      per-K summary (min IoU, p, q, ECoS, solver iterations)
    report.md            a short report linking the above
    summary.json         timings and the main numbers
    manifest.json        what is where
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from . import sharding, viz
from .checkpoint import CorruptCheckpointError, RunCheckpoints, load_trajectory
from .cluster import klish as K
from .cluster import svm
from .features import (FeatureTransform, extract_features, row_moments, select_feature_layers,
                       transform_from_moments)
from .run import jsonable
from .segment import SegmentError, Segmenter, k_for_threshold
from .zoo import load_generator

__all__ = ["KlishJobConfig", "run_klish_job", "ConfigError"]


class ConfigError(ValueError):
    """Impossible arguments or a run directory that does not fit them."""


@dataclasses.dataclass
class KlishJobConfig:
    """Everything that defines a KLiSH run's results (devices and output folder excluded).

    Defaults are the CPU defaults of the embedded DCGAN main job.
    """

    generator: str = "dcgan-digiface"
    num_images: int = 256
    resolution: int = 16
    k0: int = 100
    seed: int = 0
    channel_budget: int = 1000
    filter_clusters: bool = True
    lam: float = 5000.0
    tol: float = 1e-4
    svm_max_iter: int = 3000
    kmeans_iters: int = 20
    retrain: str = "merged"
    solver: str = "lbfgs"
    truncation: Optional[float] = None
    batch_size: int = 16
    feature_balance: str = "layer"
    pca_dim: int = 32
    holdout: bool = True
    select_threshold: float = 0.5

    @classmethod
    def paper(cls, **kw) -> "KlishJobConfig":
        """The paper-faithful clustering space and statistics: raw features, no PCA, no held-out images."""
        return cls(**{"feature_balance": "none", "pca_dim": 0, "holdout": False, **kw})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        if self.num_images < 1:
            raise ConfigError(f"--num-images must be >= 1, got {self.num_images}")
        if self.resolution < 1:
            raise ConfigError(f"--resolution must be >= 1, got {self.resolution}")
        if self.k0 < 2:
            raise ConfigError(f"--k0 must be >= 2 (KLiSH merges K0-1 times), got {self.k0}")
        npix = self.num_images * self.resolution ** 2
        if self.k0 > npix:
            raise ConfigError(
                f"--k0 {self.k0} is larger than the number of pixels to cluster "
                f"({self.num_images} images × {self.resolution}² = {npix}); lower --k0 or raise "
                "--num-images / --resolution"
            )
        if self.retrain not in ("merged", "all"):
            raise ConfigError(f"--retrain must be 'merged' or 'all', got {self.retrain!r}")
        for flag, v in (("--lam", self.lam), ("--tol", self.tol)):
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{flag} must be a finite positive number, got {v}")
        if self.truncation is not None and not (math.isfinite(self.truncation) and self.truncation > 0):
            raise ConfigError(f"--truncation must be a finite positive number, got {self.truncation}")
        for flag, v, lo in (("--batch-size", self.batch_size, 1), ("--svm-max-iter", self.svm_max_iter, 1),
                            ("--kmeans-iters", self.kmeans_iters, 0), ("--channel-budget", self.channel_budget, 1)):
            if v < lo:
                raise ConfigError(f"{flag} must be >= {lo}, got {v}")
        if self.solver not in ("lbfgs", "newton"):
            raise ConfigError(f"--solver must be 'lbfgs' or 'newton', got {self.solver!r}")
        if self.feature_balance not in ("layer", "none"):
            raise ConfigError(f"--feature-balance must be 'layer' or 'none', got {self.feature_balance!r}")
        if self.pca_dim < 0:
            raise ConfigError(f"--pca-dim must be >= 0 (0: no projection), got {self.pca_dim}")
        if self.holdout and self.num_images < 2:
            raise ConfigError("held-out statistics need at least 2 images (half are held out); "
                              "raise --num-images or pass --no-holdout")
        if not 0.0 < self.select_threshold <= 1.0:
            raise ConfigError(f"--select-threshold must be in (0, 1], got {self.select_threshold}")


def _read_json(path: str):
    """Parse a JSON file of the run directory; ConfigError naming the file if it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as JSON ({e}); the file is damaged") from e


def _check_run_dir(run_dir: str, config: KlishJobConfig, resume: bool) -> bool:
    """Check the run directory against the request, changing nothing. Returns True if it holds a run to resume."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"--out {run_dir!r} is an existing file, not a directory; choose another --out")
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_path):
        old = _read_json(cfg_path)
        if not isinstance(old, dict) or not {"generator", "k0", "seed"} <= set(old):
            raise ConfigError(f"{cfg_path} is not the configuration of a gansem KLiSH run; choose another --out")
        if not resume:
            raise ConfigError(
                f"{run_dir!r} already holds a run; pass --resume to continue it, or choose another --out"
            )
        new = config.to_dict()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            details = ", ".join(f"{k}: run has {old.get(k)!r}, you asked {new.get(k)!r}" for k in diff)
            raise ConfigError(
                f"--resume: {run_dir!r} was made with a different configuration ({details}); "
                "use the same flags, or a new --out"
            )
        return True
    nonempty = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if resume:
        if nonempty:
            raise ConfigError(f"--resume: {run_dir!r} is not a gansem run (it has no config.json) and is not empty; "
                              "refusing to write into it: give the run's own folder as --out")
        raise ConfigError(f"no run to resume in {run_dir!r}; drop --resume to start one")
    if nonempty:
        raise ConfigError(f"{run_dir!r} exists and is not empty; choose another --out")
    return False


def _create_run_dir(run_dir: str, config: KlishJobConfig):
    """Create a new run directory holding ``config.json`` (after :func:`_check_run_dir`)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory --out {run_dir!r} ({e.strerror or e}); "
                          "choose a writable location") from e


def _log(msg: str, quiet: bool):
    if not quiet:
        print(f"[gansem] {msg}", flush=True)


def _resume_point(run_dir: str):
    """The saved state to continue from, checked before any work (see :meth:`RunCheckpoints.resume_point`).

    A damaged latest state (or a damaged record before it) falls back to the older
    kept state with a warning on stderr; ``None`` when no state was saved yet.
    """
    if not os.path.isdir(os.path.join(run_dir, "state")):
        return None
    ck = RunCheckpoints(run_dir)
    try:
        return ck.resume_point(log=lambda m: print(f"[gansem] warning: {m}", file=sys.stderr, flush=True))
    except CorruptCheckpointError as e:
        raise ConfigError(f"--resume {run_dir!r}: {e}") from e
    finally:
        ck.close()


def run_klish_job(config: KlishJobConfig, run_dir: str, devices: Optional[int] = None, resume: bool = False,
                  progress: bool = True, quiet: bool = False, max_steps: Optional[int] = None,
                  vis_ks: Optional[Sequence[int]] = None, num_vis: int = 6) -> dict:
    """Run (or resume) KLiSH end to end and write the run directory.

    With several processes (``jax.distributed``, see :func:`gansem.sharding.initialize_distributed`)
    every process calls this with the same arguments: each extracts the features of the
    images whose pixels its devices hold and keeps only those rows; the merge loop's
    collectives run across processes; process 0 writes the files other than the Orbax
    checkpoints (which every process writes its shards of). ``run_dir`` must be on a
    filesystem all processes see.

    Args:
        config: what to run.
        run_dir: output folder (created; must be new or empty unless ``resume``).
        devices: number of devices for the data mesh (``None``: all; at most the number of pixels).
        resume: continue the run in ``run_dir`` (an error if it holds none) from its latest intact saved
            merge step; a damaged latest step falls back to the older kept one (see
            :meth:`~gansem.checkpoint.RunCheckpoints.resume_point`).
        progress: show progress bars.
        quiet: no log lines.
        max_steps: stop after this many merge steps in this call (for tests of interruption).
        vis_ks: K values shown in ``clusters.png`` (default: a handful spread over the trajectory).
        num_vis: number of samples in ``clusters.png``.

    Raises:
        ConfigError: impossible arguments or run directory, found before the directory is
            created and before any work is done.

    Returns:
        The summary dict also written to ``summary.json``.
    """
    # Everything that can be checked is checked before the run directory is created or any work is done.
    config.validate()
    npix = config.num_images * config.resolution ** 2
    if devices is not None and int(devices) > npix:
        raise ConfigError(f"--devices {devices} is more than the {npix} pixels to cluster "
                          f"({config.num_images} images × {config.resolution}²); use at most {npix} devices")
    mesh = sharding.make_mesh(devices)  # DeviceError if they do not exist
    lead = jax.process_index() == 0
    quiet = quiet or not lead
    progress = progress and lead
    t_start = time.time()
    timings = {}
    has_run = _check_run_dir(run_dir, config, resume)
    resume_from = _resume_point(run_dir) if has_run else None  # damaged checkpoints: fall back, or stop here
    sharding.barrier("gansem-run-dir-checked")  # nobody creates the directory before everyone checked it

    # -- generator and features -----------------------------------------------------------
    t = time.time()
    gen, params, gen_meta = load_generator(config.generator)
    gen = gen.with_settings(truncation=config.truncation)
    layers = select_feature_layers(gen.feature_layers(), config.channel_budget)
    if not has_run and lead:
        _create_run_dir(run_dir, config)
    dim = sum(l.channels for l in layers)
    _log(f"generator {gen_meta.get('name', config.generator)} ({gen.family}, {gen.resolution}px); "
         f"layers {[l.name for l in layers]} → D={dim}", quiet)
    key = jax.random.key(config.seed)
    latents = np.asarray(gen.sample_latents(jax.random.fold_in(key, 0), config.num_images), np.float32)
    class_labels = gen.sample_class_labels(jax.random.fold_in(key, 1), config.num_images)
    class_labels = None if class_labels is None else np.asarray(class_labels, np.int32)
    if lead:
        np.save(os.path.join(run_dir, "latents.npy"), latents)
        if class_labels is not None:
            np.save(os.path.join(run_dir, "class_labels.npy"), class_labels)
    layout = sharding.plan_rows(npix, mesh.devices.size)
    x_local, start = _local_features(gen, params, layers, latents, class_labels, config, mesh, layout, progress)
    raw = sharding.place_rows(_fetch(x_local, start), mesh, layout)
    del x_local  # the placed rows are the only copy
    transform = clustering_transform(run_dir, raw, layers, config, resume=resume_from is not None, save=lead)
    data = transform.apply_rows(raw)
    del raw
    if transform.basis is not None:
        _log(f"clustering space: layer balance {config.feature_balance}, PCA {dim} → {transform.dim}", quiet)
    timings["features_s"] = time.time() - t

    # -- devices --------------------------------------------------------------------------
    n_dev = mesh.devices.size
    if layout.padded_rows != npix:
        _log(f"{npix} pixels padded to {layout.padded_rows} rows ({layout.num_chunks} chunks) "
             f"for {n_dev} device(s); padding is masked out of every statistic", quiet)
    holdout = None
    if config.holdout:
        holdout = data.place(lambda a, b: heldout_rows(config.resolution, a, b))
    _log(f"{config.num_images} images × {config.resolution}² = {npix} pixels × {transform.dim} features "
         f"on {n_dev} {jax.default_backend()} device(s)"
         + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
         + ("; IoU/ECoS on the held-out odd-numbered images" if config.holdout else ""), quiet)

    ck = RunCheckpoints(run_dir)
    solver_kw = dict(lam=config.lam, tol=config.tol, max_iter=config.svm_max_iter, solver=config.solver)

    def save(step, rec, st):
        """Records hold classifiers of raw features (segmentation never needs the transform); states do not."""
        if rec is not None:
            W, b = transform.to_feature_space(rec.W, rec.b)
            rec = rec._replace(W=W, b=b)
        ck.save_step(step, rec, st)
    try:
        precond = svm.svm_preconditioner(K.training_rows(data, holdout))
        # -- initial state ----------------------------------------------------------------
        t = time.time()
        if resume_from is not None:  # init.json (statistics only) is not needed to continue
            step, arrays, _ = resume_from
            state = _state_from_saved(arrays, data)
            resume_from = arrays = None
            _log(f"resuming from merge step {step} (K={_k(state)})", quiet)
        else:
            _log(f"K-means++ (K0={config.k0}) and initial SVMs...", quiet)
            state, init_info = K.klish_init(
                jax.random.fold_in(key, 2), data, config.k0, filter_clusters=config.filter_clusters,
                kmeans_iters=config.kmeans_iters, precond=precond, holdout=holdout, **solver_kw)
            if lead:
                with open(os.path.join(run_dir, "init.json"), "w") as f:
                    json.dump(jsonable(init_info), f, indent=2)
            step = 0
            save(0, None, state)
            timings["init_s"] = time.time() - t
            _log(f"initial clusters: {_k(state)} (after filter) in {timings['init_s']:.1f}s", quiet)

        # -- merge loop: the one loop of gansem.cluster.klish, with checkpoints and a progress bar ----
        t = time.time()
        with tqdm(total=step + _k(state), initial=step, desc="KLiSH merges", disable=not progress,
                  unit="step") as bar:
            for rec, state in K.klish_steps(state, data, max_steps=max_steps, precond=precond, holdout=holdout,
                                            retrain=config.retrain, **solver_kw):
                step += 1
                save(step, rec, state)
                bar.update(1)
                bar.set_postfix(K=int(rec.k), minIoU=f"{float(np.min(rec.iou)):.3f}", it=int(rec.svm_iters))
        timings["merge_s"] = time.time() - t
    finally:
        ck.close()

    complete = K.is_complete(state)
    summary = {"complete": complete, "steps": step, "devices": n_dev, "processes": jax.process_count(),
               "backend": jax.default_backend(), "pixels": npix, "feature_dim": dim,
               "clustering_dim": transform.dim, "layers": [l.name for l in layers], "timings": timings}
    if complete:
        t = time.time()
        traj = load_trajectory(run_dir)  # every process: opening Orbax checkpoints is a collective
        if lead:
            summary.update(write_outputs(run_dir, traj, gen, params, layers, latents, class_labels,
                                         vis_ks=vis_ks, num_vis=num_vis, quiet=quiet))
        timings["outputs_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start
    summary["peak_rss_mib"] = _peak_rss_mib()
    if lead:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(jsonable(summary), f, indent=2)
        write_manifest(run_dir)
    sharding.barrier("gansem-run-finished")
    return summary


def _peak_rss_mib() -> list[int]:
    """Peak resident memory of each process so far, MiB, in process order."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    if jax.process_count() == 1:
        return [int(rss)]
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(rss))).reshape(-1)]


def _fetch(x_local, start: int):
    """``fetch(a, b)`` of the rows ``[a, b)`` from the rows ``[start, start + len(x_local))`` this process holds."""
    return lambda a, b: x_local[a - start:b - start]


def _local_features(gen, params, layers, latents, class_labels, config, mesh, layout, progress):
    """Raw features ``[stop - start, D]`` of the pixels held by this process's devices, and ``start``.

    Pixels are ordered image by image, so the rows ``[start, stop)`` belong to the images
    ``start // R² .. (stop - 1) // R²``: only those (rounded out to whole micro-batches) are
    generated here, batch-parallel over this process's devices of the mesh; with one
    process, all images over all devices.

    Every device computes micro-batches of ``config.batch_size`` images with one compiled
    program (:func:`gansem.batching.map_batches` with ``8 × batch_size`` rows per batch).
    A sample's bits depend on that program's shape, not on the other samples in it, nor on
    the device count: with a handful of images per call XLA:CPU splits the convolutions'
    reductions according to the size of its thread pool, which grows with the number of
    simulated devices, so tiny micro-batches would give other bits in a process that
    simulates 8 devices than in one that simulates 2. Micro-batches start on multiples of
    ``batch_size`` in the global image sequence, so every process cuts the images where one
    process would.
    """
    start, stop = sharding.local_row_range(mesh, layout)
    if stop <= start:  # this process's devices hold padding only
        return np.zeros((0, sum(l.channels for l in layers)), np.float32), start
    per_image = config.resolution ** 2
    micro = config.batch_size
    i0 = start // per_image // micro * micro
    i1 = min(config.num_images, -(-(-(-stop // per_image)) // micro) * micro)
    _, feats = extract_features(gen, params, latents[i0:i1], layers, config.resolution,
                                None if class_labels is None else class_labels[i0:i1],
                                batch_size=8 * micro, mesh=sharding.local_mesh(mesh), progress=progress)
    if not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats)).any(axis=(1, 2, 3)).sum())
        raise ConfigError(
            f"the generator produced NaN/Inf features for {bad} of {i1 - i0} samples; "
            "check the checkpoint (a corrupt or mismatched conversion) or the truncation setting"
        )
    x = feats.reshape(-1, feats.shape[-1])
    return x[start - i0 * per_image: stop - i0 * per_image], start


def heldout_rows(resolution: int, start: int, stop: int) -> np.ndarray:
    """``[stop - start] float32`` for the pixel rows ``[start, stop)``: 1 on odd-numbered images (held out), else 0."""
    return ((np.arange(start, stop) // (resolution * resolution)) % 2 == 1).astype(np.float32)


def clustering_transform(run_dir: str, raw: sharding.RowData, layers, config: KlishJobConfig, *,
                         resume: bool, save: bool = True) -> FeatureTransform:
    """The run's :class:`~gansem.features.FeatureTransform`: fitted on the placed raw features and saved to
    ``transform.npz``, or loaded on resume."""
    saved = FeatureTransform.from_run(run_dir) if resume else None
    if saved is not None:
        return saved
    mean, cov = row_moments(raw)
    tr = transform_from_moments(mean, cov, layers, balance=config.feature_balance, pca_dim=config.pca_dim or None)
    if save:
        tr.save(os.path.join(run_dir, FeatureTransform.FILE))
    return tr


def _k(state) -> int:
    return int(state.W.shape[0])


def _state_from_saved(arrays: dict, data: sharding.RowData) -> K.KlishState:
    """Rebuild a :class:`KlishState` saved by :class:`RunCheckpoints`, placed like ``data``.

    Labels are read back as host arrays and placed again, so the saved padding (another
    device count) does not matter.
    """
    host = np.asarray(arrays["labels"], np.int32)[: data.num_rows]  # saved padding may differ
    labels = data.place(lambda a, b: host[a:b])
    rep = sharding.replicated(data.mesh)
    put = lambda name, dtype: jax.device_put(np.asarray(arrays[name], dtype), rep)  # noqa: E731
    return K.KlishState(W=put("W", np.float32), b=put("b", np.float32), labels=labels,
                        sizes=put("sizes", np.int32), step=int(np.asarray(arrays["step"])),
                        ids=put("ids", np.int32), stale=put("stale", bool))


def default_vis_ks(ks: Sequence[int], n: int = 6, selected: Optional[int] = None) -> list[int]:
    """A handful of K values spread over the trajectory (largest first), with ``selected`` among them."""
    ks = sorted(set(int(k) for k in ks), reverse=True)
    cands = [ks[0]] + [k for k in (50, 30, 20, 12, 8, 5, 3) if k in ks and k < ks[0]]
    cands = cands[:n]
    if selected is not None and selected in ks and selected not in cands:
        cands = sorted(cands[: n - 1] + [selected], reverse=True)
    return cands


def write_outputs(run_dir, traj, gen, params, layers, latents, class_labels, vis_ks=None, num_vis=6,
                  quiet=False) -> dict:
    """Pictures, per-K summary and the report of a finished trajectory (``load_trajectory(run_dir)``)."""
    traj = [r for r in traj if r.k > 1]  # K = 1 has no merge and is no choice of K
    ks = [r.k for r in traj]
    min_iou = [float(np.min(r.iou)) for r in traj]
    ecos_pq = [float(r.ecos[r.p, r.q]) for r in traj]
    rows = [{"k": r.k, "min_iou": mi, "mean_iou": float(np.mean(r.iou)), "p": r.p, "q": r.q, "ecos_pq": e,
             "svm_iters": r.svm_iters, "svm_converged": r.svm_converged, "sizes_min": int(np.min(r.sizes)),
             "largest_share": float(np.max(r.sizes) / max(np.sum(r.sizes), 1))}
            for r, mi, e in zip(traj, min_iou, ecos_pq)]
    with open(os.path.join(run_dir, "trajectory.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    phi = float(cfg.get("select_threshold", 0.5))
    try:
        k_sel = k_for_threshold(traj, phi)
    except SegmentError:
        k_sel = None
    viz.trajectory_plot(ks, min_iou, ecos_pq, os.path.join(run_dir, "trajectory.png"))

    vis_ks = list(vis_ks) if vis_ks else default_vis_ks(ks, selected=k_sel)
    n = min(num_vis, latents.shape[0])
    maps = {}
    imgs = None
    for k in vis_ks:
        W, b = next((r.W, r.b) for r in traj if r.k == k)
        seg = Segmenter(gen, params, tuple(layers), W, b, k, cfg)
        out = seg.segment_latents(latents[:n], None if class_labels is None else class_labels[:n],
                                  batch_size=min(16, n))
        maps[f"K={k}" + (" (φ*)" if k == k_sel else "")] = out["labels"]
        imgs = out["images"]
    viz.cluster_map_figure(imgs, maps, os.path.join(run_dir, "clusters.png"),
                           title="KLiSH cluster maps of training samples")
    unconverged = [r["k"] for r in rows if not r["svm_converged"]]
    lines = [
        "# KLiSH run report", "",
        f"Generator `{cfg['generator']}`, {cfg['num_images']} images at {cfg['resolution']}² "
        f"({cfg['num_images'] * cfg['resolution'] ** 2} pixels), K0 = {cfg['k0']}, seed {cfg['seed']}, "
        f"λ1 = {cfg['lam']}, filter {'on' if cfg['filter_clusters'] else 'off'}, retrain `{cfg['retrain']}`.", "",
        "Clustering space: " + (
            f"layer balance `{cfg.get('feature_balance', 'none')}`, PCA d = {cfg.get('pca_dim') or 'off'}; "
            + ("IoU/ECoS on held-out images (odd-numbered), SVMs trained on the others."
               if cfg.get("holdout") else "IoU/ECoS on the training pixels (as the paper).")), "",
        "## Selected K", "",
        (f"φ* = {phi}: the first K from K0 down whose minimum IoU reaches φ* is **K = {k_sel}** "
         f"(largest cluster {rows[ks.index(k_sel)]['largest_share']:.0%} of the pixels). Segment with "
         f"`python launch/segment.py --run RUN_DIR --threshold {phi} ...`." if k_sel is not None else
         f"φ* = {phi}: no K reaches it (best minimum IoU {max(min_iou or [0]):.3f}); lower --select-threshold."),
        "",
        "## Cluster maps", "", "![cluster maps](clusters.png)", "",
        "## Separability along the trajectory", "", "![trajectory](trajectory.png)", "",
        "| K | min IoU | mean IoU | largest cluster | merged p → q | ECoS(p,q) | SVM iters |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['k']}{' (φ*)' if r['k'] == k_sel else ''} | {r['min_iou']:.3f} | {r['mean_iou']:.3f} | "
                     f"{r['largest_share']:.0%} | {r['p']} → {r['q']} | "
                     f"{r['ecos_pq']:.3f} | {r['svm_iters']}{'' if r['svm_converged'] else ' (not converged)'} |")
    lines += ["", "Indices p, q refer to the cluster order at that K (row p is removed after the merge).",
              "", f"SVM solves that did not converge: {unconverged if unconverged else 'none'}.", "",
              "Segment new samples: `python launch/segment.py --run RUN_DIR --k K --num-samples N --seed S "
              "--out FILE.npz` (or `--threshold PHI`).", ""]
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    _log(f"wrote {os.path.join(run_dir, 'report.md')}", quiet)
    return {"vis_ks": vis_ks, "selected_k": k_sel, "select_threshold": phi,
            "min_iou_by_k": {str(k): v for k, v in zip(ks, min_iou)}}


_MANIFEST = {
    "config.json": "configuration of the run (flags that define the results)",
    "latents.npy": "generator inputs (z) of the clustered samples, float32 [N, ...]",
    "transform.npz": "clustering-space map z = ((x - mean) * scale) @ basis (layer balance, PCA); trajectory "
                     "classifiers are stored on raw features",
    "class_labels.npy": "class labels of the clustered samples (conditional generators)",
    "init.json": "K-means++ / Lloyd / initial filter / first SVM solve statistics",
    "trajectory": "Orbax checkpoints, one per merge step: k, W [k,D], b [k], iou [k], ecos [k,k], p, q, sizes [k], solver stats",
    "state": "Orbax checkpoints of the resumable algorithm state (latest two)",
    "trajectory.json": "per-K summary: min/mean IoU, merged pair, ECoS, solver iterations",
    "trajectory.png": "plot of min IoU and merged-pair ECoS against K",
    "clusters.png": "cluster maps of a few samples for several K",
    "report.md": "short report linking the pictures and the per-K table",
    "summary.json": "timings, devices, main numbers",
}


def write_manifest(run_dir: str):
    entries = {k: v for k, v in _MANIFEST.items() if os.path.exists(os.path.join(run_dir, k))}
    with open(os.path.join(run_dir, "manifest.json"), "w") as f:
        json.dump({"run_dir": os.path.abspath(run_dir), "files": entries}, f, indent=2)
