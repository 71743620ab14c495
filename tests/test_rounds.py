"""The target side's early exit (`mirror_jax.rounds.target`): what it sends over the token channel,
and that it compiles to a top-k, not a sort over the vocabulary. Tiny random models, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.kv_cache import init_cache
from mirror_jax.params import init_random
from mirror_jax.rounds.target import early_exit, target_prefix
from mirror_jax.testing import tiny_config


def _vocab_sorts(hlo: str, vocab: int) -> list[str]:
    return [line.strip() for line in hlo.splitlines() if " sort(" in line and f",{vocab}]" in line]


def test_early_exit_compiles_without_a_vocabulary_sort():
    """XLA:CPU rewrote the early exit's TopK into a full sort of [gamma+1, V] when its outputs had
    three consumers (300-400 ms per round at V = 152k, vs ~3 ms); the compiled `target_prefix`
    must contain no sort whose operand spans the vocabulary."""
    vocab, gamma, kappa = 512, 4, 4
    cfg = tiny_config(vocab_size=vocab)
    params = init_random(cfg, 0)
    cache = init_cache(cfg, 1, 64)
    last, window = jnp.zeros((1,), jnp.int32), jnp.ones((1, gamma), jnp.int32)
    hlo = target_prefix.lower(cfg, params, cache, last, window, exit_layer=2, kappa=kappa).compile().as_text()
    assert "TopK" in hlo or "top_k" in hlo.lower(), "expected a top-k in the compiled prefix"
    assert not _vocab_sorts(hlo, vocab), _vocab_sorts(hlo, vocab)[:2]
    standalone = jax.jit(lambda x, w: early_exit(x, w, kappa)).lower(
        jnp.zeros((gamma + 1, vocab)), jnp.zeros((gamma,), jnp.int32)).compile().as_text()
    assert not _vocab_sorts(standalone, vocab)


def test_early_exit_candidates_match_a_reference():
    """Per depth: the top-(kappa+1) by early-exit log-probability with the on-path draft token
    removed (or the (kappa+1)-th when the path token is not among them), in order; the raw top-kappa
    for Omega_kappa; and the path tokens' log-probabilities."""
    rng = np.random.default_rng(0)
    vocab, gamma, kappa = 50, 4, 3
    f = jax.jit(lambda x, w: early_exit(x, w, kappa))
    for trial in range(40):
        logits = rng.standard_normal((gamma + 1, vocab)).astype(np.float32)
        order = np.argsort(-logits, axis=-1, kind="stable")
        window = np.array([order[r, rng.integers(0, kappa + 3)] for r in range(gamma)], np.int32)
        ee = f(jnp.asarray(logits), jnp.asarray(window))
        lp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
        for r in range(gamma + 1):
            top = list(order[r, : kappa + 1])
            if r < gamma and window[r] in top:
                top.remove(window[r])
            want = top[:kappa]
            np.testing.assert_array_equal(np.asarray(ee.channel.cand_ids[r]), want, err_msg=f"trial {trial} r {r}")
            np.testing.assert_allclose(np.asarray(ee.channel.cand_lp[r]), lp[r, want], rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(ee.top_ids[r]), order[r, :kappa])
        np.testing.assert_allclose(np.asarray(ee.channel.path_lp), lp[np.arange(gamma), window], rtol=1e-6)


def test_batched_early_exit_matches_rows_and_does_not_sort():
    """Leading batch dims (the device loop's [B, gamma+1, V]) give each row's own result and still
    compile to a top-k, not a sort of the vocabulary."""
    rng = np.random.default_rng(1)
    vocab, gamma, kappa, b = 512, 4, 3, 3
    logits = jnp.asarray(rng.standard_normal((b, gamma + 1, vocab)).astype(np.float32))
    window = jnp.asarray(rng.integers(0, vocab, (b, gamma)).astype(np.int32))
    f = jax.jit(lambda x, w: early_exit(x, w, kappa))
    got = f(logits, window)
    for r in range(b):
        one = early_exit(logits[r], window[r], kappa)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(np.asarray(x[r]), np.asarray(y), rtol=1e-6)  # ids: exactly
    assert not _vocab_sorts(f.lower(logits, window).compile().as_text(), vocab)
