"""Row contractions (``aᵀ b`` over many rows) with bits that do not depend on the host's threads or devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gansem import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import sys
sys.path.insert(0, {root!r})
import numpy as np, jax
from gansem import sharding
g = np.random.default_rng(0).standard_normal((4099, 33)).astype(np.float32)
np.save({out!r}, np.asarray(jax.jit(sharding.rows_tdot)(g, g)))
"""


@pytest.mark.parametrize("shape_a,shape_b", [((1000, 7), (1000, 5)), ((300,), (300, 4)), ((40, 3), (40, 3)),
                                             ((257, 2), (257,))])
def test_rows_tdot_is_the_transposed_product(rng, shape_a, shape_b):
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    got = np.asarray(jax.jit(sharding.rows_tdot)(jnp.asarray(a), jnp.asarray(b)))
    want = np.tensordot(a.astype(np.float64), b.astype(np.float64), axes=(0, 0))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_rows_tdot_has_the_same_bits_with_one_cpu_device_as_with_eight(tmp_path):
    """The tests run with 8 simulated CPU devices; a process with one gets other thread splits for plain ``Gᵀ G``."""
    g = np.random.default_rng(0).standard_normal((4099, 33)).astype(np.float32)
    here = np.asarray(jax.jit(sharding.rows_tdot)(g, g))
    out = str(tmp_path / "gram.npy")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT, out=out)], check=True, env=env, timeout=120)
    np.testing.assert_array_equal(np.load(out), here)


def test_rows_tdot_adds_large_products_block_by_block_with_the_same_bits(rng, monkeypatch):
    """Above ``TDOT_BATCHED_MAX_ELEMENTS`` the blocks' products are added as they are computed (memory ``P × Q``)."""
    a = rng.standard_normal((2000, 40)).astype(np.float32)
    b = rng.standard_normal((2000, 24)).astype(np.float32)
    batched = np.asarray(jax.jit(sharding.rows_tdot)(a, b))
    monkeypatch.setattr(sharding, "TDOT_BATCHED_MAX_ELEMENTS", 0)
    scanned = np.asarray(jax.jit(sharding.rows_tdot)(a, b))
    np.testing.assert_array_equal(scanned, batched)
    np.testing.assert_allclose(scanned, a.astype(np.float64).T @ b, rtol=1e-4, atol=1e-3)
