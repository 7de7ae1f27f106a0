"""A KLiSH run directory as one object: configuration, generator, trajectory, classifier at K.

``launch/klish.py`` (:func:`gansem.pipeline.run_klish_job`) writes a run directory;
everything that reads one (segmentation, evaluation, the launch scripts, research
code) opens it with :meth:`Run.open`::

    run = Run.open("runs/dcgan")
    run.ks                         # K of every merge step, K0 first
    W, b = run.classifier_at(12)   # [12, D], [12]: classifier of raw generator features
    k = run.k_for_threshold(0.8)   # the paper's φ*
    run.generator, run.params, run.layers, run.latents, run.transform

A trajectory is a list of merge records, one per step, K0 first: the
:class:`gansem.cluster.klish.MergeRecord` that the merge loop yields, that
:func:`gansem.cluster.klish.run_klish` returns and that
:func:`gansem.checkpoint.load_trajectory` reads back (``k, W, b, iou, ecos, p, q,
sizes, ...``), so the functions here serve research code and run directories alike.

The generator is loaded through :func:`gansem.zoo.load_generator` with the run's
generation settings applied (:meth:`gansem.generators.Generator.with_settings`), and
the layers are selected with the run's channel budget, so features are those the
run clustered.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from . import checkpoint, zoo
from .features import FeatureTransform, select_feature_layers
from .generators.base import FeatureLayer, Generator

__all__ = [
    "Run",
    "RunError",
    "trajectory_ks",
    "classifier_at",
    "k_for_threshold",
    "jsonable",
]

class RunError(ValueError):
    """A run directory or trajectory cannot answer the request (not a run, K not in it, φ* never reached...)."""


def trajectory_ks(trajectory: Sequence) -> list[int]:
    """K of every record, in trajectory order."""
    return [r.k for r in trajectory]


def classifier_at(trajectory: Sequence, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W [k, D], b [k])`` of the trajectory record with ``k`` clusters.

    Raises:
        RunError: no record has ``k`` clusters (the message gives the available range).
    """
    for rec in trajectory:
        if rec.k == int(k):
            return np.asarray(rec.W), np.asarray(rec.b)
    ks = sorted(set(trajectory_ks(trajectory)))
    if not ks:
        raise RunError(f"K={k}: the trajectory is empty")
    raise RunError(
        f"K={k} is not in the trajectory (available: {ks[0]}..{ks[-1]}"
        + ("" if len(ks) == ks[-1] - ks[0] + 1 else f", {len(ks)} values")
        + "); pick one of those, or resume the run if it is incomplete"
    )


def k_for_threshold(trajectory: Sequence, phi: float) -> int:
    """The paper's φ*: the first K (scanning from K0 down) whose minimum IoU (Eq. 4) reaches ``phi``.

    K = 1 (the last record of a complete trajectory) is trivially separable and never a choice.

    Raises:
        RunError: no K reaches ``phi`` (the message gives the best minimum IoU).
    """
    trajectory = [r for r in trajectory if r.k > 1]
    for rec in sorted(trajectory, key=lambda r: -r.k):
        if float(np.min(rec.iou)) >= phi:
            return rec.k
    best = max((float(np.min(r.iou)) for r in trajectory), default=float("nan"))
    raise RunError(
        f"the minimum IoU never reaches φ*={phi} in this trajectory (best {best:.3f}); choose a lower --threshold"
    )


def jsonable(obj):
    """``obj`` with numpy/JAX scalars and arrays turned into Python numbers and lists (for ``json.dump``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        a = np.asarray(obj)
        return a.item() if a.ndim == 0 else a.tolist()
    return obj


def read_config(run_dir: str) -> dict:
    """The run's ``config.json`` as a dict.

    Raises:
        RunError: ``run_dir`` holds no (readable) ``config.json``.
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir!r} is not a KLiSH run directory (no config.json); run launch/klish.py first")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read as JSON ({e}); the file is damaged") from e
    if not isinstance(cfg, dict) or not {"generator", "channel_budget"} <= set(cfg):
        raise RunError(f"{path} is not the configuration of a gansem KLiSH run")
    return cfg


@dataclasses.dataclass
class Run:
    """An opened run directory (see the module docstring).

    Attributes:
        run_dir: the directory.
        config: ``config.json`` (:class:`gansem.pipeline.KlishJobConfig` as a dict).
        trajectory: merge records, K0 first.
        generator: the run's generator, its generation settings applied.
        params: the generator's parameters (host arrays).
        generator_meta: what :func:`gansem.zoo.load_generator` says about the generator.
        layers: the selected feature layers, in the order of the classifiers' input channels.
        transform: the clustering-space map (``transform.npz``) or ``None`` (raw features).
    """

    run_dir: str
    config: dict
    trajectory: list
    generator: Generator
    params: Any
    generator_meta: dict
    layers: tuple[FeatureLayer, ...]
    transform: Optional[FeatureTransform]

    @classmethod
    def open(cls, run_dir: str) -> "Run":
        """Read ``run_dir`` and load its generator.

        Raises:
            RunError: not a run directory, or no merge step saved yet.
            GeneratorError: the run's generator cannot be loaded.
        """
        cfg = read_config(run_dir)
        try:
            traj = checkpoint.load_trajectory(run_dir)
        except FileNotFoundError as e:
            raise RunError(str(e)) from e
        if not traj:
            raise RunError(f"{run_dir!r} has no merge steps yet; let launch/klish.py run (or --resume it)")
        gen, params, meta = zoo.load_generator(cfg["generator"])
        gen = gen.with_settings(truncation=cfg.get("truncation"), noise_mode=cfg.get("noise_mode"))
        layers = select_feature_layers(gen.feature_layers(), cfg["channel_budget"])
        return cls(run_dir, cfg, list(traj), gen, params, meta, layers, FeatureTransform.from_run(run_dir))

    # -- trajectory ------------------------------------------------------------------------
    @property
    def ks(self) -> list[int]:
        """K of every merge record, K0 first."""
        return trajectory_ks(self.trajectory)

    @property
    def feature_dim(self) -> int:
        """D: channels of the selected layers (inputs of every classifier)."""
        return int(sum(l.channels for l in self.layers))

    def classifier_at(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(W [k, D], b [k])``: the KLiSH classifier of raw generator features at ``k`` clusters.

        Raises:
            RunError: ``k`` is not in the trajectory, or the classifier does not fit the
                generator's layers (the generator changed since the run).
        """
        W, b = classifier_at(self.trajectory, k)
        if W.shape[1] != self.feature_dim:
            raise RunError(
                f"the trajectory's classifier has {W.shape[1]} inputs but the generator's selected layers give "
                f"{self.feature_dim} channels: the generator changed since the run")
        return W, b

    def k_for_threshold(self, phi: float) -> int:
        """The first K from K0 down whose minimum IoU reaches ``phi`` (:func:`k_for_threshold`)."""
        return k_for_threshold(self.trajectory, phi)

    # -- clustered samples -----------------------------------------------------------------
    @property
    def latents(self) -> np.ndarray:
        """Generator inputs of the clustered samples (``latents.npy``), ``[N, ...]`` float32.

        Raises:
            RunError: the file is missing (the run stopped before writing it).
        """
        path = os.path.join(self.run_dir, "latents.npy")
        if not os.path.isfile(path):
            raise RunError(f"{self.run_dir!r} has no latents.npy (the clustered samples); the run is incomplete")
        return np.load(path)

    @property
    def class_labels(self) -> Optional[np.ndarray]:
        """Class labels of the clustered samples (``class_labels.npy``, conditional generators) or ``None``."""
        path = os.path.join(self.run_dir, "class_labels.npy")
        return np.load(path) if os.path.isfile(path) else None
