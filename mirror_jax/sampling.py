"""Logit processing and sampling shared by every decoding method.

All methods (autoregressive, speculative, Mirror-SD) sample a token at absolute sequence position
``p`` of batch row ``b`` with the key ``position_key(key, b, p)``. With the paper's
sample-and-match verifier this makes a speculative run reproduce the autoregressive run's sampled
tokens exactly for the same seed (not only in distribution), which the tests use.

`SamplingParams` holds the user's settings. ``temperature == 0`` means greedy; then nothing is
sampled and the other fields are ignored. Top-k and top-p are applied after temperature, like
transformers' warpers: top-k keeps the k largest logits; top-p keeps the smallest set of the
largest probabilities whose mass reaches p (at least one token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def arrays(self) -> dict:
        """The varying scalars as device arrays (changing them never recompiles)."""
        return {
            "temperature": jnp.float32(max(self.temperature, 1e-6)),
            "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p),
        }


def processed_logprobs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Log-probabilities [..., V] of the distribution actually sampled from.

    temperature, top_k, top_p: scalar arrays (top_k 0 = off, top_p 1 = off)."""
    x = logits.astype(jnp.float32) / temperature
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)  # [..., V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take(desc, k - 1, axis=-1)[..., None]  # k-th largest logit
    desc = jnp.where(desc >= kth, desc, NEG_INF)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    keep = (mass_before < top_p) & (desc > NEG_INF / 2)
    # Smallest kept logit: everything >= it survives both filters.
    thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x >= thresh, x, NEG_INF)
    return jax.nn.log_softmax(x, axis=-1)


def position_key(key: jax.Array, row, position) -> jax.Array:
    """The PRNG key for the token at absolute `position` of batch `row`."""
    return jax.random.fold_in(jax.random.fold_in(key, row), position)


def sample_at(key: jax.Array, logprobs: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """Sample one token per entry. logprobs [..., V]; rows, positions: int arrays of shape [...]."""
    flat_lp = logprobs.reshape(-1, logprobs.shape[-1])
    keys = jax.vmap(lambda r, p: position_key(key, r, p))(rows.reshape(-1), positions.reshape(-1))
    toks = jax.vmap(jax.random.categorical)(keys, flat_lp)
    return toks.reshape(rows.shape).astype(jnp.int32)


def choose_tokens(logits, key, rows, positions, temperature, top_k, top_p, *, greedy: bool):
    """argmax (greedy) or a sample of the processed distribution at each position."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_at(key, processed_logprobs(logits, temperature, top_k, top_p), rows, positions)
