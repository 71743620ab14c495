"""Autoregressive generation: the baseline every speed-up is measured against.

One compiled decode step per (config, batch, capacity, greedy) combination; prompts of the same
bucket compile nothing new (`tests/test_model_cache.py`). Position convention: the token generated
at absolute sequence position p of row b is chosen with `sampling.draw_key(key, Draw.TARGET, b, p)`,
so every method reproduces the same samples for a seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import numpy as np

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.engine.prefill import cache_capacity, start_sequences, truncate_at_eos, validate_prompts
from mirror_jax.kv_cache import KVCache, commit
from mirror_jax.params import ModelParams
from mirror_jax.sampling import Draw, SamplingArrays, SamplingParams, pick


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids per row (prompt excluded, truncated at EOS inclusive) and statistics."""

    tokens: list[list[int]]
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("cache",))
def decode_step(cfg, params, tokens, cache: KVCache, samp: SamplingArrays, *, greedy: bool):
    """Feed tokens [B] at each row's length, commit them, and choose the next token per row."""
    logits, cache = M.forward(cfg, params, tokens[:, None], cache)
    nxt, _ = pick(logits[:, 0], samp, cache.lengths + 1, stream=Draw.TARGET, sample=not greedy)
    return nxt, commit(cache, 1)


def generate_ar(
    cfg: ModelConfig,
    params: ModelParams,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingParams | None = None,
    eos_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    cache_dtype=None,
    progress=None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt with the target alone.

    Example::

        res = generate_ar(cfg, params, [[1, 2, 3]], 16)   # greedy
        res.tokens[0]                                       # 16 new ids (or fewer, ending at EOS)
    """
    sampling = sampling or SamplingParams()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = validate_prompts(prompts, cfg.vocab_size)
    eos = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
    capacity = cache_capacity(max(map(len, prompts)), max_new_tokens, 0, max_len)
    cache_dtype = cache_dtype or params.embed.dtype
    samp = sampling.arrays(row=np.arange(len(prompts)))

    t0 = time.perf_counter()
    tok, cache = start_sequences(cfg, params, prompts, sampling, capacity, cache_dtype, samp)
    out = [np.asarray(tok)]
    t_first = time.perf_counter()
    done = np.isin(out[0], list(eos)) if eos else np.zeros(len(prompts), bool)
    for _ in range(max_new_tokens - 1):
        if done.all():
            break
        tok, cache = decode_step(cfg, params, tok, cache, samp, greedy=sampling.greedy)
        host = np.asarray(tok)  # the one synchronisation per step
        out.append(host)
        if eos:
            done |= np.isin(host, list(eos))
        if progress is not None:
            progress()
    t_end = time.perf_counter()
    seqs = np.stack(out, axis=1).tolist()
    tokens = [truncate_at_eos(s, eos, max_new_tokens) for s in seqs]
    n_steps = len(out) - 1
    return GenerationResult(
        tokens=tokens,
        stats={
            "method": "ar",
            "prefill_s": t_first - t0,
            "decode_s": t_end - t_first,
            "total_s": t_end - t0,
            "decode_steps": n_steps,
            "ms_per_step": 1e3 * (t_end - t_first) / max(n_steps, 1),
            "tokens_per_round": 1.0,
        },
    )
