"""`model.dense`: the CPU forms (few rows: the product kept as [out, M] behind a barrier, padded to a
multiple of 8 past 4; from `MANY_ROWS` on: the plain [M, out] product) give x @ w.T for every row
count and leading shape, under jit, vmap and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax.model import MANY_ROWS, dense


@pytest.mark.parametrize("lead", [(1,), (3,), (5,), (2, 3), (1, 7), (2, 9), (17,), (MANY_ROWS,), (3, 100)])
def test_dense_equals_matmul(lead):
    rng = np.random.default_rng(len(lead) * 100 + int(np.prod(lead)))
    w = rng.standard_normal((24, 16)).astype(np.float32)  # [out, in]
    x = rng.standard_normal(lead + (16,)).astype(np.float32)
    got = jax.jit(dense)(jnp.asarray(x), jnp.asarray(w))
    assert got.shape == lead + (24,)
    np.testing.assert_allclose(np.asarray(got), x @ w.T, rtol=1e-5, atol=1e-5)
    logits = jax.jit(lambda x, w: dense(x, w, out_dtype=jnp.float32))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(logits), x @ w.T, rtol=1e-5, atol=1e-5)


def test_dense_under_vmap_and_grad():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((12, 8)).astype(np.float32))
    xs = jnp.asarray(rng.standard_normal((4, 6, 8)).astype(np.float32))  # vmapped over 4, 6 rows each
    got = jax.vmap(lambda x: dense(x, w))(xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xs) @ np.asarray(w).T, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(dense(x, w) ** 2))(xs[0])  # d/dx |x W^T|^2 = 2 (x W^T) W
    ref = 2 * (np.asarray(xs[0]) @ np.asarray(w).T) @ np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-4)
