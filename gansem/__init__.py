"""gansem: semantic clusters from pretrained GANs without labels (KLiSH), in JAX.

The public API, for research code::

    import gansem

    gen, params, _ = gansem.load_generator("dcgan-digiface")
    layers = gansem.select_feature_layers(gen.feature_layers(), 1000)
    images, feats = gansem.extract_features(gen, params, latents, layers, 16)   # [N, 16, 16, D]
    data = gansem.place_rows(feats.reshape(-1, feats.shape[-1]), gansem.make_mesh())
    result = gansem.kmeans(key, data, 20)                        # host-level: checks, then kmeans_fit
    fit = jax.jit(gansem.kmeans_fit, static_argnums=2)(key, data, 20)   # the same bits, jitted

Two kinds of functions:

**Jittable core** -- pure functions of arrays (and of a :class:`RowData`, a pytree
whose layout and mesh are static), callable inside a user's ``jax.jit``,
``jax.grad`` (where differentiable) or ``jax.vmap`` over parameters:

* :func:`kmeans_fit` (k-means++ and Lloyd on row-sharded data; returns its state: iterations,
  converged flag, inertia), :func:`fit_ovr_svm` (L-BFGS on Eq. 3 for every class at once,
  the paper's stopping rule in a ``lax.while_loop``), :func:`ovr_svm_objective` (Eq. 3, with
  its own VJP), :func:`cluster_iou` (Eq. 4);
* :func:`concat_features`, :func:`resize_bilinear_align_corners`, :func:`segment_scores`;
* the generators' ``sample_latents``, ``map_latents``, ``synthesize`` (``gen`` is a frozen,
  hashable dataclass: close over it or pass it as a static argument).

**Host-level drivers** -- loops with Python control flow, progress bars, files or
host-side statistics; call them from plain Python:

* :func:`load_generator` (files, converters), :func:`extract_features` and
  :func:`map_batches` (batch loops, data-parallel over a mesh),
  :func:`fit_feature_transform`;
* :func:`kmeans` (argument checks, then :func:`kmeans_fit`), :func:`train_ovr_svm` (working-set
  solves with per-class stopping, the fast route to the optimum :func:`fit_ovr_svm` reaches),
  :func:`klish_init`, :func:`klish_step`, :func:`klish_steps` (the one merge loop, a generator of
  ``(record, state)``), :func:`run_klish` (it, from K-means to K = 1; records are :class:`MergeRecord`);
* :func:`run_klish_job` (the whole pipeline into a run directory), :class:`Run` (open a run
  directory), :class:`Segmenter` (label new samples), :func:`evaluate_run`;
* the metrics (host numpy on contingency tables streamed by :class:`ContingencyAccumulator`).

Devices: :func:`make_mesh` builds a 1-D mesh; :func:`place_rows` places ``[N, ...]``
rows on it as a :class:`RowData` (rows, mask, layout, mesh). Results are the same
on any device count dividing 8.

UFGS (Sec. 5) lives in :mod:`gansem.ufgs` and is imported from there (it needs grain and
array_record, which ``import gansem`` does not load): ``ufgs.dataset.write_dataset`` and
``ufgs.records.open_dataset`` (pair datasets), ``ufgs.models.build_model`` (UNet, DeepLabV3),
``ufgs.train.fit_segmenter``, ``ufgs.predict.TrainedSegmenter``, ``ufgs.evaluate.ufgs_table``.
USCS (Sec. 5, a SPADE generator trained on those pairs) lives in :mod:`gansem.uscs` likewise:
``uscs.models`` (SPADE networks), ``uscs.train.fit_uscs``, ``uscs.synth.load_synthesizer``.
"""

from . import batching, evaluation, features, generators, metrics, pipeline, run, segment, sharding, zoo
from .batching import map_batches
from .cluster.klish import (KlishState, MergeRecord, cluster_iou, is_complete, klish_init, klish_step, klish_steps,
                           run_klish)
from .cluster.kmeans import KMeansResult, kmeans, kmeans_fit
from .cluster.svm import SVMFit, SVMResult, fit_ovr_svm, ovr_svm_objective, train_ovr_svm
from .evaluation import evaluate_run
from .features import (
    FeatureTransform,
    concat_features,
    extract_features,
    fit_feature_transform,
    resize_bilinear_align_corners,
    select_feature_layers,
)
from .generators import FeatureLayer, Generator, GeneratorError
from .metrics import (
    ContingencyAccumulator,
    adjusted_mutual_info,
    adjusted_rand_index,
    clustering_scores,
    contingency,
    greedy_matching_miou,
    normalized_mutual_info,
)
from .pipeline import KlishJobConfig, run_klish_job
from .run import Run, RunError
from .segment import Segmenter, segment_scores
from .sharding import RowData, make_mesh, place_rows
from .zoo import BUILTIN_GENERATORS, load_generator

__version__ = "0.1.0"

__all__ = [
    # generators
    "load_generator", "BUILTIN_GENERATORS", "Generator", "FeatureLayer", "GeneratorError",
    # features
    "select_feature_layers", "extract_features", "concat_features", "resize_bilinear_align_corners",
    "FeatureTransform", "fit_feature_transform", "map_batches",
    # devices
    "make_mesh", "place_rows", "RowData",
    # clustering
    "kmeans", "kmeans_fit", "KMeansResult", "train_ovr_svm", "fit_ovr_svm", "SVMResult", "SVMFit",
    "ovr_svm_objective", "cluster_iou", "klish_init", "klish_step", "klish_steps", "is_complete", "run_klish",
    "MergeRecord", "KlishState",
    # metrics
    "contingency", "ContingencyAccumulator", "adjusted_rand_index", "adjusted_mutual_info",
    "normalized_mutual_info", "greedy_matching_miou", "clustering_scores",
    # runs
    "Run", "RunError", "Segmenter", "segment_scores", "run_klish_job", "KlishJobConfig", "evaluate_run",
    # submodules
    "batching", "evaluation", "features", "generators", "metrics", "pipeline", "run", "segment", "sharding", "zoo",
]
