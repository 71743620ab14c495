"""Autoregressive generation: the baseline every speed-up is measured against.

Shapes are static: prompts are right-padded to a power-of-two bucket, the cache capacity is rounded
up to a multiple of `CAPACITY_QUANTUM`, and the decode step is one compiled program per
(config, batch, capacity, greedy) combination. A second call with prompts of the same bucket
compiles nothing (see tests/test_generate.py).

Position convention: the token generated at absolute sequence position p of row b is sampled with
`sampling.draw_key(key, Draw.TARGET, b, p)`, so every method reproduces the same samples for a seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import CacheCapacityError, KVCache, commit, init_cache
from mirror_jax.params import ModelParams
from mirror_jax.sampling import SamplingParams, choose_tokens

MIN_PROMPT_BUCKET = 16
CAPACITY_QUANTUM = 256


@dataclasses.dataclass
class GenerationResult:
    """Generated token ids per row (prompt excluded, truncated at EOS inclusive) and statistics."""

    tokens: list[list[int]]
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)


def prompt_bucket(n: int) -> int:
    """Smallest power of two >= max(n, MIN_PROMPT_BUCKET)."""
    return max(MIN_PROMPT_BUCKET, 1 << (int(n) - 1).bit_length())


def cache_capacity(max_prompt: int, max_new_tokens: int, margin: int = 0, max_len: int | None = None) -> int:
    """Cache slots needed for prompt + generation + speculative margin, rounded up; or `max_len`,
    checked."""
    need = max_prompt + max_new_tokens + margin
    if max_len is None:
        return -(-max(need, prompt_bucket(max_prompt)) // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
    if need > max_len:
        raise CacheCapacityError(
            f"prompt ({max_prompt} tokens) + max_new_tokens ({max_new_tokens}) + speculative margin "
            f"({margin}) = {need} exceeds the cache size max_len={max_len}; shorten the prompt, lower "
            f"max_new_tokens or raise max_len"
        )
    return int(max_len)


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, str | bytes) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists (tokenize text first)")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(p)
    return out


def pad_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the bucket -> (tokens [B, T_bucket] int32, lengths [B] int32)."""
    t = prompt_bucket(max(len(p) for p in prompts))
    toks = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    return toks, np.array([len(p) for p in prompts], np.int32)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(cfg: ModelConfig, params: ModelParams, tokens, n_valid, cache: KVCache):
    """Process right-padded prompts [B, T]; commit `n_valid` [B] tokens per row.

    Returns (logits at each row's last prompt token [B, V], cache)."""
    logits, cache = M.forward(cfg, params, tokens, cache)
    last = jnp.take_along_axis(logits, (n_valid - 1)[:, None, None], axis=1)[:, 0]
    return last, commit(cache, n_valid)


@functools.partial(jax.jit, static_argnames=("greedy",))
def first_token(logits, key, positions, row0, temperature, top_k, top_p, *, greedy: bool):
    """The first generated token from the prefill logits [B, V]; positions [B]; rows start at row0."""
    rows = row0 + jnp.arange(logits.shape[0])
    return choose_tokens(logits, key, rows, positions, temperature, top_k, top_p, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("cache",))
def decode_step(cfg, params, tokens, cache: KVCache, key, temperature, top_k, top_p, *, greedy: bool):
    """Feed tokens [B] at each row's length, commit them, and choose the next token per row."""
    logits, cache = M.forward(cfg, params, tokens[:, None], cache)
    rows = jnp.arange(tokens.shape[0])
    nxt = choose_tokens(logits[:, 0], key, rows, cache.lengths + 1, temperature, top_k, top_p, greedy=greedy)
    return nxt, commit(cache, 1)


def start_sequences(
    cfg, params, prompts, sampling: SamplingParams, capacity: int, cache_dtype, key, device=None, row0: int = 0
):
    """Prefill a fresh cache (on `device`) and choose each row's first token (shared by all
    methods). `row0` is the batch row of prompts[0] (sampling keys). Returns (first tokens [B]
    device array, cache whose lengths are the prompt lengths)."""
    toks, n_valid = pad_prompts(prompts)
    put = lambda x: jax.device_put(x, device)  # device None: the default device
    cache = init_cache(cfg, len(prompts), capacity, cache_dtype, device=device)
    last, cache = prefill(cfg, params, put(toks), put(n_valid), cache)
    arrays = put(sampling.arrays())
    first = first_token(last, key, put(n_valid), put(jnp.int32(row0)), **arrays, greedy=sampling.greedy)
    return first, cache


def truncate_at_eos(seq: list[int], eos_ids, max_new_tokens: int) -> list[int]:
    seq = seq[:max_new_tokens]
    for i, t in enumerate(seq):
        if t in eos_ids:
            return seq[: i + 1]
    return seq


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
    key = jax.random.key(sampling.seed)
    arrays = sampling.arrays()

    t0 = time.perf_counter()
    tok, cache = start_sequences(cfg, params, prompts, sampling, capacity, cache_dtype, key)
    out = [np.asarray(tok)]
    t_first = time.perf_counter()
    done = np.isin(out[0], list(eos)) if eos else np.zeros(len(prompts), bool)
    for _ in range(max_new_tokens - 1):
        if done.all():
            break
        tok, cache = decode_step(cfg, params, tok, cache, key, **arrays, greedy=sampling.greedy)
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
