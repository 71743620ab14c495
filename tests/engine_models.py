"""Tiny random target/draft pairs for engine tests.

The draft is the target with Gaussian noise added to every weight, so it agrees with the target
often but not always: rounds with full acceptance, partial acceptance, rejections, reuse and
fallback all occur.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.params import init_random

VOCAB = 64


def target_cfg(arch: str = "qwen2", layers: int = 4, vocab: int = VOCAB) -> ModelConfig:
    return ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
        num_kv_heads=2, head_dim=16, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", eos_token_ids=(),
    )


@functools.cache
def pair(noise: float = 0.05, arch: str = "qwen2", layers: int = 4, vocab: int = VOCAB, seed: int = 0):
    """((cfg, target_params), (cfg, draft_params)); draft = target + noise * N(0, 1) per weight."""
    cfg = target_cfg(arch, layers, vocab)
    params = init_random(cfg, seed, scale=0.35)
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed + 1)
    noisy = [x + noise * jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves]
    return (cfg, params), (cfg, jax.tree_util.tree_unflatten(tree, noisy))


def prompts(n: int, seed: int = 0, vocab: int = VOCAB, lo: int = 3, hi: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def check_round_records(res, ref) -> int:
    """Recompute every mirror round's hit from its own record, independently of the engine's flag:
    the next window is reused iff (A, c) was among the branches rolled out, and c is the token ar
    committed at that position. Returns the number of hits."""
    hits, rounds = 0, iter(res.stats["per_round"])
    for toks in ref:
        end = 1  # tokens committed so far (the first one comes from the prefill)
        while end < len(toks):
            r = next(rounds)
            end += r["a"] + 1
            assert end > len(toks) or r["c"] == toks[end - 1]
            want = (r["a"], r["c"]) in r["branches"]
            assert r["hit"] == want, r
            assert len(r["branches"]) == res.stats["settings"]["branch_budget"]
            hits += want
    assert next(rounds, None) is None
    return hits
