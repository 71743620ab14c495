"""A reduced vocabulary for the draft's LM head (frequency-ranked drafting, as in FR-Spec).

A draft forward streams its whole LM head: for Qwen2.5-0.5B that is 151936 x 896 float32 weights,
545 MB of the ~2 GB a float32 draft step reads. `restrict_head` keeps only N rows of it; the draft
then gives every other token the logit NEG_INF and never proposes it. This is lossless with every
verifier, because the draft only proposes: greedy and sample-match verification commit the
target's own tokens whatever was proposed, and rejection sampling receives the reduced draft's
own q (zero outside the subset), a valid proposal distribution. What it can cost is acceptance: a
position whose target token lies outside the subset is rejected there.

Which N tokens: `reduced_vocab` takes the first N of a ranking plus the ids the draft must be able
to propose (EOS and the tokenizer's special tokens). The default ranking is the token id itself:
byte-level BPE vocabularies (Qwen2, Llama 3, GPT-2) number tokens in merge order, and merges are
learnt most frequent pair first, so low ids approximate a frequency ranking over the tokenizer's
training corpus with no data of ours. `rank_by_frequency` ranks by counts over your own token
streams instead. Example::

    ids = reduced_vocab(draft.cfg, 32768, keep=draft.tokenizer.all_special_ids)
    small = restrict_head(draft.params, draft.cfg, ids)     # head [32768 + specials, H], head_ids set
    generate(target, prompts, 128, method="sd", draft=(draft.cfg, small))
    generate(target, prompts, 128, method="sd", draft=draft, draft_vocab=32768)   # the same, by name

`experiments/bench_sd_draft.py` measures the draft forward, acceptance and sd's speed by N.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.params import ModelParams
from mirror_jax.quant import take_rows


class DraftVocabError(ValueError):
    """A reduced draft vocabulary that cannot be built (size, ids out of range, already reduced)."""


def reduced_vocab(cfg: ModelConfig, n: int, *, keep: Iterable[int] = (), ranking: Sequence[int] | None = None
                  ) -> np.ndarray:
    """Sorted unique int32 ids: the first `n` of `ranking` (default: ids 0, 1, 2, ..., BPE merge
    order) plus `keep` and ``cfg.eos_token_ids`` (ids the draft must be able to propose)."""
    v = cfg.vocab_size
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DraftVocabError(f"a reduced draft vocabulary needs n >= 1 tokens, got {n!r}")
    order = np.arange(v) if ranking is None else np.asarray(ranking, np.int64)
    extra = np.asarray(list(keep) + list(cfg.eos_token_ids), np.int64)
    ids = np.unique(np.concatenate([order[: int(n)], extra]))
    if ids.size and (ids[0] < 0 or ids[-1] >= v):
        raise DraftVocabError(f"draft vocabulary ids must lie in [0, {v}); got {ids[0]}..{ids[-1]}")
    return ids.astype(np.int32)


def restrict_head(params: ModelParams, cfg: ModelConfig, ids) -> ModelParams:
    """`params` whose LM head covers only the token ids `ids` (sorted and de-duplicated here); the
    embedding (also a tied one) stays whole. The result works everywhere a draft's parameters do:
    `mirror_jax.model.head` scatters the N logits into a NEG_INF vocabulary row."""
    if params.head_ids is not None:
        raise DraftVocabError("these parameters already have a reduced LM head; restrict the full model instead")
    ids = vocab_ids(ids, cfg.vocab_size)
    if ids.size == cfg.vocab_size:
        return params
    ids_dev = jnp.asarray(ids, jnp.int32)
    return params.replace(lm_head=take_rows(params.lm_head, ids_dev), head_ids=ids_dev)


def vocab_ids(ids, vocab_size: int) -> np.ndarray:
    """`ids` (a sequence or range of token ids) checked and made sorted, unique int64 [N]."""
    arr = np.asarray(list(ids) if isinstance(ids, range) else ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise DraftVocabError(f"draft vocabulary ids must be a non-empty 1-D sequence of ints, got {ids!r:.60}")
    ids = np.unique(arr.astype(np.int64))
    if ids[0] < 0 or ids[-1] >= vocab_size:
        raise DraftVocabError(f"draft vocabulary ids must be a non-empty subset of [0, {vocab_size})")
    return ids


def rank_by_frequency(token_streams: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Token ids ordered by how often they occur in `token_streams` (most frequent first; ties and
    unseen tokens in id order), a `ranking` for `reduced_vocab`."""
    counts = np.zeros(vocab_size, np.int64)
    for toks in token_streams:
        counts += np.bincount(np.asarray(toks, np.int64), minlength=vocab_size)[:vocab_size]
    return np.argsort(-counts, kind="stable").astype(np.int32)


def coverage(ids: np.ndarray, tokens: Sequence[int]) -> float:
    """Fraction of `tokens` inside the vocabulary `ids` (how often the reduced draft could be right)."""
    t = np.asarray(tokens, np.int64)
    return float(np.isin(t, ids).mean()) if t.size else 1.0
