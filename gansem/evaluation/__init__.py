"""Evaluate KLiSH against the baselines (Tab. 4) and SVM against a softmax extractor (Tab. 3).

Modules, bottom up:

* :mod:`.streams` -- evaluation samples on PRNG streams disjoint from a run's clustering samples;
* :mod:`.predict` -- one generator pass scores every method (all classifiers' rows stacked);
* :mod:`.clustering` -- :func:`evaluate_run` (Tab. 4: AMI, ARI, NMI, greedy-matching mIoU of
  KLiSH and the K-means / AHC / KASP baselines at several K) and :func:`fit_baselines`;
* :mod:`.separability` -- :func:`separability_experiment` (Tab. 3);
* :mod:`.report` -- markdown tables, figures and JSON.

Reference labels come from :mod:`gansem.references.sources` (label files, callables,
the built-in ``"faces"`` labeller); its :class:`EvaluationError` is the error of
every impossible evaluation request.
"""

from ..references.sources import EvaluationError
from .clustering import BASELINES, evaluate_run, fit_baselines
from .report import results_table_markdown, separability_markdown, write_evaluation
from .separability import separability_experiment
from .streams import EVAL_STREAM, count_overlap, evaluation_latents

__all__ = [
    "BASELINES",
    "EVAL_STREAM",
    "EvaluationError",
    "count_overlap",
    "evaluate_run",
    "evaluation_latents",
    "fit_baselines",
    "results_table_markdown",
    "separability_experiment",
    "separability_markdown",
    "write_evaluation",
]
