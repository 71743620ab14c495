"""Tiny random models for tests, examples, the notebook and smoke runs (``--tiny``).

* `tiny_config(arch, **overrides)`: one small decoder configuration; tests override what they
  need (an odd vocabulary, more layers, Qwen3's q/k norms).
* `noisy_pair(...)`: a random target and, as its draft, the target with Gaussian noise added to
  every weight, so the two agree often but not always: rounds with full acceptance, partial
  acceptance, rejections, reuse and fallback all occur.
* `random_prompts(n, ...)`: token-id prompts of random lengths.

Example::

    (cfg, tp), (_, dp) = noisy_pair(noise=0.005)
    res = generate((cfg, tp), random_prompts(2), 16, method="mirror", draft=(cfg, dp), gamma=3)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.params import init_random

VOCAB = 64


def tiny_config(arch: str = "qwen2", **overrides) -> ModelConfig:
    """A 3-layer, 32-wide decoder of `arch` (Qwen2: q/k/v bias; Qwen3: q/k norms) with vocabulary
    `VOCAB`; keyword overrides are ModelConfig fields (``num_layers=4``, ``vocab_size=61``, ...)."""
    base = dict(
        arch=arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=8, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", eos_token_ids=(),
    )
    return ModelConfig(**{**base, **overrides})


def pair_config(arch: str = "qwen2", layers: int = 4, vocab: int = VOCAB, heads: int = 4, kv_heads: int = 2
                ) -> ModelConfig:
    """The configuration of `noisy_pair`'s models (hidden 64, `heads` heads of 64 / heads, GQA with
    `kv_heads` K/V heads)."""
    return tiny_config(arch, num_layers=layers, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=64 // heads)


@functools.cache
def noisy_pair(noise: float = 0.05, arch: str = "qwen2", layers: int = 4, vocab: int = VOCAB, seed: int = 0,
               heads: int = 4, kv_heads: int = 2):
    """((cfg, target_params), (cfg, draft_params)); draft = target + noise * N(0, 1) per weight."""
    cfg = pair_config(arch, layers, vocab, heads, kv_heads)
    params = init_random(cfg, seed, scale=0.35)
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed + 1)
    noisy = [x + noise * jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves]
    return (cfg, params), (cfg, jax.tree_util.tree_unflatten(tree, noisy))


def random_prompts(n: int, seed: int = 0, vocab: int = VOCAB, lo: int = 3, hi: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]
