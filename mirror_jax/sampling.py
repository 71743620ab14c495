"""Logit processing and sampling shared by every decoding method.

Every random draw of a decoding run comes from one seed key through `draw_key` (see its docstring
for the streams and why they are disjoint). The target's token at absolute sequence position ``p``
of batch row ``b`` is drawn with ``draw_key(key, Draw.TARGET, b, p)`` by every method, so with the
paper's sample-and-match verifier a speculative run reproduces the autoregressive run's sampled
tokens exactly for the same seed (not only in distribution), which the tests use.

`SamplingParams` holds the user's settings. ``temperature == 0`` means greedy; then nothing is
sampled and the other fields are ignored. Top-k and top-p are applied after temperature, like
transformers' warpers: top-k keeps the k largest logits; top-p keeps the smallest set of the
largest probabilities whose mass reaches p (at least one token). `SamplingArrays` is what the
jitted functions take: the seed key, the batch row(s) and the three scalars as device arrays
(changing any of them never recompiles). `pick` is the one token picker of every method and of
both models; `accepted_length` the one longest-agreeing-prefix rule.

Example::

    samp = SamplingParams(temperature=0.8, seed=3).arrays(row=0)
    tok, lp = pick(logits, samp, positions, stream=Draw.DRAFT, sample=True, want_logprobs=True)
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

NEG_INF = -1e30


@struct.dataclass
class SamplingArrays:
    """The sampling state of a run as device arrays (a pytree; pass it to the jitted functions)."""

    key: jax.Array  # the run's seed key (typed PRNG key); every draw derives its own with `draw_key`
    row: jax.Array  # int32 [] or [B]: the batch row(s) of the sequence(s) being decoded
    temperature: jax.Array  # float32 [] (> 0; ignored when greedy)
    top_k: jax.Array  # int32 [] (0 = off)
    top_p: jax.Array  # float32 [] (1 = off)

    def rows_for(self, positions: jax.Array) -> jax.Array:
        """`row` broadcast over `positions` [B, ...] (or [...] for a scalar row)."""
        r = jnp.asarray(self.row, jnp.int32)
        return jnp.broadcast_to(r.reshape(r.shape + (1,) * (positions.ndim - r.ndim)), positions.shape)


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

    def arrays(self, row=0) -> SamplingArrays:
        """The run's `SamplingArrays` for batch row(s) `row` (an int, or a list for a batch)."""
        return SamplingArrays(
            key=jax.random.key(self.seed),
            row=jnp.asarray(row, jnp.int32),
            temperature=jnp.float32(max(self.temperature, 1e-6)),
            top_k=jnp.int32(self.top_k),
            top_p=jnp.float32(self.top_p),
        )


def processed_logprobs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Log-probabilities [..., V] of the distribution actually sampled from.

    temperature, top_k, top_p: scalar arrays (top_k 0 = off, top_p 1 = off). With both filters off
    this is ``log_softmax(logits / temperature)`` and no full-vocabulary sort runs (a `lax.cond`
    picks the branch at run time: sorting 5 x 152k logits cost ~150 ms on a 2-core CPU, on every
    sampled step); with either on, the logits outside the top-k / nucleus are set to -1e30."""
    x = logits.astype(jnp.float32) / temperature
    return lax.cond((top_k > 0) | (top_p < 1.0), _filtered_logprobs, _plain_logprobs, x, top_k, top_p)


def _plain_logprobs(x: jax.Array, top_k, top_p) -> jax.Array:
    return jax.nn.log_softmax(x, axis=-1)


def _filtered_logprobs(x: jax.Array, top_k, top_p) -> jax.Array:
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


class Draw(enum.IntEnum):
    """The random streams of one decoding run. Each (stream, row, position) is drawn at most once
    for a committed token, and no two streams share a key (see `draw_key`)."""

    TARGET = 0  # the target's token: ar, the first token after prefill, sample_match verification
    DRAFT = 1  # the draft's sampled proposal (rejection verifier only), plain or SS draft
    ACCEPT = 2  # rejection verifier: the acceptance coin of the draft token
    RESIDUAL = 3  # rejection verifier: the correction from normalise((p - q)+); the bonus (q = 0)


def draw_key(key: jax.Array, stream, row, position) -> jax.Array:
    """The PRNG key of the draw of `stream` for the token at absolute `position` of batch `row`.

    ``fold_in(fold_in(fold_in(key, stream), row), position)``: distinct (stream, row, position)
    triples give independent keys, so no draw can see another's noise. (Before, the draft's key was
    ``fold_in(seed, 1)`` and the acceptance coin's ``fold_in(fold_in(seed, 1), row)``: for row 0 the
    coin at position p was bit-identical to the uniform behind the Gumbel noise of token 0 in the
    draft's sample at p, and a drafted token 0 was rejected too often; `tests/test_key_streams.py`
    keeps that derivation as a negative control.)

    Draft samples are keyed by the *sequence* row and the absolute position, not by branch: at
    most one branch of a Mirror-SD round becomes the next window, and equal keys make a reused
    branch identical to the chain a fallback (or vanilla SD) would draw, so reuse never changes
    the output for a seed. Independence still holds where it matters: a draft token at position p
    is drawn again in a later round only when the earlier draw at p was past the first rejection,
    i.e. it influenced nothing that was committed; the same holds for acceptance coins.

    Example::

        k = draw_key(jax.random.key(seed), Draw.ACCEPT, row, 17)   # coin of the draft token at 17
    """
    k = jax.random.fold_in(key, jnp.asarray(stream, jnp.uint32))
    return jax.random.fold_in(jax.random.fold_in(k, row), position)


def sample_at(key: jax.Array, stream, logprobs: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """Sample one token per entry from the `stream` draws. logprobs [..., V]; rows, positions: int
    arrays of shape [...]."""
    flat_lp = logprobs.reshape(-1, logprobs.shape[-1])
    keys = jax.vmap(lambda r, p: draw_key(key, stream, r, p))(rows.reshape(-1), positions.reshape(-1))
    toks = jax.vmap(jax.random.categorical)(keys, flat_lp)
    return toks.reshape(rows.shape).astype(jnp.int32)


def uniform_at(key: jax.Array, stream, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """One U[0, 1) draw of `stream` per (row, position) entry; rows, positions: int arrays [...]."""
    keys = jax.vmap(lambda r, p: draw_key(key, stream, r, p))(rows.reshape(-1), positions.reshape(-1))
    return jax.vmap(jax.random.uniform)(keys).reshape(rows.shape)


def pick(logits, samp: SamplingArrays, positions, *, stream, sample: bool, want_logprobs: bool = False):
    """The token at each of `positions` [...] from `logits` [..., V], and the processed
    log-probabilities [..., V] when `want_logprobs` (else None).

    ``sample=False``: argmax (greedy decoding; the draft's proposals under greedy or sample-match
    verification). ``sample=True``: a draw of `stream` from the processed distribution, keyed by
    (``samp.rows_for(positions)``, position)."""
    if not sample and not want_logprobs:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    lp = processed_logprobs(logits, samp.temperature, samp.top_k, samp.top_p)
    if sample:
        tok = sample_at(samp.key, stream, lp, samp.rows_for(positions), positions)
    else:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, (lp if want_logprobs else None)


def own_logprob(logits, tok):
    """log softmax(logits)[tok]: the draft's confidence in the token it emitted. [..., V], [...]."""
    picked = jnp.take_along_axis(logits, tok[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def accepted_length(match: jax.Array) -> jax.Array:
    """Length of the all-True prefix along the last axis of `match` [..., n] -> int32 [...]."""
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
