"""The public API: ``gansem.__all__``, the README's "From Python" code, and the jittable core under ``jax.jit``."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gansem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_names_resolve():
    assert len(gansem.__all__) == len(set(gansem.__all__))
    missing = [n for n in gansem.__all__ if not hasattr(gansem, n)]
    assert not missing
    for name in ("load_generator", "select_feature_layers", "extract_features", "FeatureTransform",
                 "fit_feature_transform", "make_mesh", "place_rows", "RowData", "kmeans", "train_ovr_svm",
                 "klish_init", "klish_step", "run_klish", "MergeRecord", "KlishState", "Run", "Segmenter",
                 "run_klish_job", "KlishJobConfig", "adjusted_rand_index", "adjusted_mutual_info",
                 "greedy_matching_miou"):
        assert name in gansem.__all__, name


def readme_python_blocks(section: str = "From Python") -> list:
    """The ```python blocks of one ``## section`` of README.md."""
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README.md has no '## {section}' section"
    return re.findall(r"^```python\n(.*?)^```", m.group(1), re.S | re.M)


@pytest.mark.slow
def test_readme_from_python_runs(tmp_path):
    blocks = readme_python_blocks()
    assert blocks, "the 'From Python' section holds no python code"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "(4, 64, 64)" in r.stdout


def _data(n=300, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 4
    y = rng.integers(0, k, n)
    x = (centres[y] + rng.standard_normal((n, d))).astype(np.float32)
    return gansem.place_rows(x, gansem.make_mesh(8)), y.astype(np.int32)


def test_svm_objective_under_user_jit_and_grad_matches_host_call():
    data, y = _data()
    labels = data.place(y)
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(3), jnp.float32)

    def user_loss(W, b, data, labels):  # research code around the core
        return gansem.ovr_svm_objective(W, b, data, labels, lam=5000.0) + 0.1 * jnp.sum(b ** 2)

    host = float(gansem.ovr_svm_objective(W, b, data, labels, lam=5000.0)) + 0.1 * float(jnp.sum(b ** 2))
    jitted = jax.jit(user_loss)(W, b, data, labels)
    np.testing.assert_allclose(float(jitted), host, rtol=1e-6)
    gW, gb = jax.jit(jax.grad(user_loss, argnums=(0, 1)))(W, b, data, labels)
    assert gW.shape == (3, 5) and gb.shape == (3,) and np.all(np.isfinite(np.asarray(gW)))


def test_kmeans_under_user_jit_matches_host_call():
    data, _ = _data()
    key = jax.random.key(0)

    @jax.jit
    def user_fn(key, data):
        res = gansem.kmeans_fit(key, data, 3, max_iter=20)
        return res.centroids, res.inertia, res.n_iter, res.converged

    host = gansem.kmeans(key, data, 3, max_iter=20)
    c, inertia, n_iter, converged = user_fn(key, data)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(host.centroids))
    assert float(inertia) == float(host.inertia) and int(n_iter) == int(host.n_iter)
    assert bool(converged) == bool(host.converged)
