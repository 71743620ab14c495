"""Prompts in, first token out: the start every decoding method shares.

Shapes are static: prompts are right-padded to a bucket (`prompt_bucket`: powers of two up to 128,
then two per octave, so padding wastes at most a third of a prefill), the cache
capacity is rounded up to a multiple of `CAPACITY_QUANTUM` (`cache_capacity`), so prompts of the
same bucket reuse the compiled programs. `start_sequences` prefills a fresh cache on a device and
chooses each row's first token with the target's `Draw.TARGET` key of (row, position), exactly as
every later token is chosen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import CacheCapacityError, KVCache, commit, init_cache
from mirror_jax.params import ModelParams
from mirror_jax.sampling import Draw, SamplingArrays, SamplingParams, pick

MIN_PROMPT_BUCKET = 16
CAPACITY_QUANTUM = 256
CONTEXT_SINK = 32  # `draft_context_ids`: the prompt's first tokens a shortened draft context keeps


def prompt_bucket(n: int) -> int:
    """The padded prompt length for `n` tokens: the smallest of 16, 32, 64, 128, then 192, 256, 384,
    512, 768, 1024, 1536, ... (2^k and 1.5 * 2^k) that holds them.

    Prefill costs in proportion to the padded length (it is compute-bound), so power-of-two buckets
    waste up to half of it: a 689-token SpecBench summarization prompt pads to 768 here, to 1024 with
    powers of two. Two buckets per octave cost one more compiled prefill per octave.

    >>> [prompt_bucket(n) for n in (1, 17, 129, 193, 689, 1025)]
    [16, 32, 192, 256, 768, 1536]
    """
    n = max(int(n), MIN_PROMPT_BUCKET)
    p = 1 << (n - 1).bit_length()  # the power of two >= n
    return p * 3 // 4 if p > 128 and n <= p * 3 // 4 else p


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
    hidden, cache = M.forward_hidden(cfg, params, tokens, cache)
    last = jnp.take_along_axis(hidden, (n_valid - 1)[:, None, None], axis=1)  # [B, 1, H]
    return M.head(cfg, params, last)[:, 0], commit(cache, n_valid)  # the LM head on B rows, not B x T


@functools.partial(jax.jit, static_argnames=("greedy",))
def first_token(logits, positions, samp: SamplingArrays, *, greedy: bool):
    """The first generated token from the prefill logits [B, V] at positions [B] (rows: samp.row)."""
    return pick(logits, samp, positions, stream=Draw.TARGET, sample=not greedy)[0]


def start_sequences(cfg, params, prompts, sampling: SamplingParams, capacity: int, cache_dtype, samp: SamplingArrays,
                    device=None, cache: KVCache | None = None):
    """Prefill a fresh cache (on `device`, a device or sharding) and choose each row's first token
    (shared by all methods). `samp`: the run's sampling arrays on `device`, ``samp.row`` the
    prompts' batch rows. `cache`: a fresh cache to use (e.g. sharded over a device group) instead
    of a new one on `device`. Returns (first tokens [B] device array, cache whose lengths are the
    prompt lengths)."""
    toks, n_valid = pad_prompts(prompts)
    put = lambda x: jax.device_put(x, device)  # device None: the default device
    if cache is None:
        cache = init_cache(cfg, len(prompts), capacity, cache_dtype, device=device)
    last, cache = prefill(cfg, params, put(toks), put(n_valid), cache)
    first = first_token(last, put(n_valid), samp, greedy=sampling.greedy)
    return first, cache


def draft_context_ids(prompt: list[int], context: int, sink: int = CONTEXT_SINK) -> list[int]:
    """The prompt tokens the draft prefills under `SpecSettings.draft_context`: the whole prompt when
    `context` is 0 or the prompt fits, else its first `sink` tokens and its last ``context - sink``.

    The draft only proposes, so what it reads never changes the output, only acceptance and the
    draft's prefill (compute-bound: ~30% of the target's on this CPU). The first tokens (the chat
    template's system header) stay, as in StreamingLLM's "attention sink"; on SpecBench
    summarization keeping them did not rescue acceptance (README: the draft copies the article's
    lead, which a short context cuts), so the default is the whole prompt. Positions in the draft's
    cache are contiguous (RoPE sees the kept tokens as adjacent); the host loop and the device loop
    track the draft's cache only relative to its own length, so nothing else changes.

    >>> draft_context_ids(list(range(10)), 6, sink=2)
    [0, 1, 6, 7, 8, 9]
    >>> draft_context_ids(list(range(10)), 0, sink=2) == list(range(10))
    True
    """
    if not context or len(prompt) <= context:
        return list(prompt)
    return list(prompt[:sink]) + list(prompt[len(prompt) - (context - sink):])


def draft_context_rows(tokens, n_valid, context: int, sink: int = CONTEXT_SINK):
    """`draft_context_ids` for right-padded rows, traceable: tokens [B, T], n_valid [B] ->
    (tokens [B, min(T, context)], n_valid [B]); rows that fit keep their tokens."""
    t = tokens.shape[1]
    if not context or t <= context:
        return tokens, n_valid
    j = jnp.arange(context)[None, :]  # [1, C]
    n = n_valid[:, None]  # [B, 1]
    tail = n - context + j  # [B, C]: the last context - sink tokens land at j >= sink
    idx = jnp.where((n <= context) | (j < sink), j, tail)
    return jnp.take_along_axis(tokens, idx, axis=1), jnp.minimum(n_valid, context)


def truncate_at_eos(seq: list[int], eos_ids, max_new_tokens: int) -> list[int]:
    seq = seq[:max_new_tokens]
    for i, t in enumerate(seq):
        if t in eos_ids:
            return seq[: i + 1]
    return seq
