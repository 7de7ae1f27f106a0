"""Helpers for the USCS tests: network variables without a compiled init, a run directory without training.

Compiling a network's ``init`` costs XLA seconds for its random initialisers even at test sizes;
these helpers take the shapes from ``jax.eval_shape`` and the values from numpy, so the cheap
tests compile only the calls they check.
"""

import jax
import numpy as np

from gansem import training


def numpy_variables(module, *args, seed=0, scale=0.3, **kwargs):
    """Variables of ``module`` (``module.init(key, *args, train=False)``'s structure) from numpy.

    Params are N(0, scale²); ``batch_stats`` are ones (BatchNorm mean and variance 1; spectral-norm
    u and σ: the power iteration starts from any u).
    """
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, train=False, **kwargs), *args)
    rng = np.random.default_rng(seed)
    out = {"params": jax.tree.map(lambda s: rng.normal(0, scale, s.shape).astype(s.dtype), shapes["params"])}
    if "batch_stats" in shapes:
        out["batch_stats"] = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes["batch_stats"])
    return out


def write_untrained_run(run_dir, models, *, step=4, data=None, fixed=None, seed=0):
    """A USCS run directory as ``fit_uscs`` leaves it, with a numpy generator at checkpoint ``step``.

    Args:
        models: ``gansem.uscs.models.build_models(...)``.
        data: ``model.json``'s ``data`` entry (e.g. ``{"path": npz, "held_out": {"first", "count"}}``).
        fixed: the settings a resume must match (``model.json``'s ``fixed``).

    Returns:
        The generator item that was saved (``{"params": {"generator"}, "batch_stats": {"generator"}}``).
    """
    res, k = models.resolution, models.num_classes
    gen = numpy_variables(models.generator, np.zeros((1, res, res, k), np.float32), seed=seed, scale=0.05)
    item = {"params": {"generator": gen["params"]}, "batch_stats": {"generator": gen["batch_stats"]}}
    meta = {"kind": "uscs-spade", "version": 1, "num_classes": k, "resolution": res,
            "palette": np.arange(3 * k).reshape(k, 3).tolist(), "class_names": None,
            "model": models.config.to_dict(), "config": {}, "data": dict(data or {}), "fixed": dict(fixed or {})}
    training.create_run_dir(run_dir, meta, error=ValueError)
    mngr = training.checkpoint_manager(run_dir, create=True)
    training.save_checkpoint(mngr, step, {"generator": item}, {"step": step})
    mngr.wait_until_finished()
    mngr.close()
    return item
