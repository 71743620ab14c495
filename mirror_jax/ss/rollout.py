"""Speculative-streaming rollouts of the draft: several tokens per forward, the same tokens.

`ss_draft(cfg, sscfg, params, ssp)` prepares an `SSDraft` (the adapter plus its stream-path layer
weights with the LoRA merged once, by a separate jitted call: merged inside the rollout each SS
forward of the 0.5B draft took ~50% longer on CPU). `ss_chain` is the traceable rollout that
`mirror_jax.rounds.draft.propose` calls; `ss_rollout` is the same with host-side checks, for use
on its own. Contract (shared with the plain chain `mirror_jax.rounds.draft.draft_chain`)::

    tokens, q, conf, num_forwards, cache, length, fed = ss_chain(cfg, params, ss, cache, roots, gamma, samp, sample=...)

* Row b has committed cache length ``L_b = cache.lengths[b]``; ``roots[b]`` is its next input
  token, at position ``L_b`` and not yet in the cache.
* ``tokens[b] = [y_{L_b+1}, ..., y_{L_b+gamma}]`` is the draft's own continuation: its greedy
  continuation, or with ``sample=True`` the `Draw.DRAFT` draw of ``samp`` at each absolute
  position from the main stream's processed distribution (whose log-probs are ``q``), so the
  tokens (and q) equal the plain chain's for the same `SamplingArrays`. Lookahead streams draw
  their guess for position q with the same key, which couples them to the main stream's later
  draw and raises the hard-match rate without touching what is emitted.
* On return the main-stream K/V of ``root, y_{L_b+1}, ..., y_{L_b+gamma-1}`` are written at slots
  ``L_b .. L_b+gamma-1``; ``cache.lengths`` is unchanged (the caller commits). With ``stop_logp``
  (an adaptive window, see `ss_chain`) both hold up to the row's ``length`` instead of gamma.
* ``conf[b]`` is the main stream's raw log-probability of each emitted token (the draft's
  confidence, which the Mirror-SD branch choice reads).
* ``fed[b]``: window tokens whose K/V are written (``length - 1``). Only with ``tail=True`` (the
  lookahead tail, see `ss_chain`) is the window not the draft's own continuation: its last tokens
  are the streams' guesses, unchecked by the main stream, and ``fed`` is smaller.

SS loop (s streams, one row)::

    first forward: feed [root] at p; emit g_0; l_j <- stream j at p  (predicting p+1+j)
    feed [x0, l_1, .., l_s] at positions p .. p+s        (x0 = last emitted, l_j = lookaheads)
    main stream gives g_0 .. g_s   (g_i = the token at position p+i+1 given x0, l_1..l_i)
    a = number of leading j with l_j == g_{j-1}        (hard match, 0 <= a <= s)
    emit g_0 .. g_a                                     (a accepted lookaheads + 1 main token)
    x0 <- g_a at p+a+1;  l_j <- stream j's token at position p+a  (predicting p+a+1+j)

A forward feeds only the lookaheads the window can still use: with r tokens left it feeds
min(s, r - 1) of them (the most over a batch's unfinished rows), and a forward with r = 1 is a
plain forward (no stream rows, no stream head): gamma 4 with s = 2 and one accepted lookahead is
[root] -> [x0, l_1, l_2] -> [x0] instead of a third full SS forward.

Every emitted token is the main stream's choice given an all-correct prefix, hence identical to AR
decoding; the K/V of positions > p+a are stale and get overwritten by the next forward (it writes
p+a+1 onwards, one slot per token it feeds) before anything reads them. Rows advance at different
speeds; a row that has gamma tokens (or whose adaptive window ended) stops: its inputs are placed at
positions >= capacity, so its writes are dropped.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import KVCache, check_headroom
from mirror_jax.params import LayerParams, ModelParams
from mirror_jax.quant import quantize_layers, quantize_weight
from mirror_jax.sampling import Draw, SamplingArrays, SamplingParams, accepted_length, own_logprob, pick
from mirror_jax.ss.model import SSConfig, SSParams, main_pass, stream_head, stream_layers, stream_pass_at


@struct.dataclass
class SSDraft:
    """A speculative-streaming adapter ready to roll out: the static config, the trained
    parameters and the stream path's layer weights with the LoRA merged (see `ss_draft`)."""

    sscfg: SSConfig = struct.field(pytree_node=False)
    ssp: SSParams
    layers: tuple[LayerParams, ...]
    stream_lm_head: jax.Array | None = None  # [N, H] the streams' head rows (SSConfig.stream_vocab)
    stream_ids: jax.Array | None = None  # [N] int32 their token ids (sorted)

    def stream_params(self, params: ModelParams) -> ModelParams:
        """`params` with the LM head the streams choose their lookaheads with."""
        if self.stream_ids is None:
            return params
        return params.replace(lm_head=self.stream_lm_head, head_ids=self.stream_ids)

    def quantized(self, mode: str) -> SSDraft:
        """The stream path's merged layers and head rows in `mode` (`mirror_jax.quant`; "none": self)."""
        if mode == "none":
            return self
        head = None if self.stream_lm_head is None else quantize_weight(self.stream_lm_head, mode)
        return self.replace(layers=quantize_layers(self.layers, mode), stream_lm_head=head)


_merge = jax.jit(stream_layers, static_argnums=(0, 1))


def ss_draft(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, ssp: SSParams) -> SSDraft:
    """Merge the adapter's LoRA into the stream path once and cut the streams' head rows
    (`stream_head`), on the parameters' device."""
    sp = stream_head(cfg, sscfg, params, ssp.stream_ids)
    reduced = sp.head_ids is not params.head_ids
    return SSDraft(sscfg=sscfg, ssp=ssp, layers=_merge(cfg, sscfg, params, ssp),
                   stream_lm_head=sp.lm_head if reduced else None, stream_ids=sp.head_ids if reduced else None)


def ss_chain(cfg: ModelConfig, params: ModelParams, ss: SSDraft, cache: KVCache, roots, num_tokens: int,
             samp: SamplingArrays | None = None, *, sample: bool = False, stop_logp: float | None = None,
             cumulative: bool = False, tail: bool = False, lead=None):
    """Speculative-streaming rollout of `num_tokens` tokens per row (traceable; see the module
    docstring). roots: [B], or [B, F] when F-1 committed tokens whose K/V are not in the cache yet
    precede each root (fed with it in the first forward from slot L_b; the tokens then continue
    after the root). `lead` [B] int32 (default F-1): row b's root is roots[b, lead_b] after lead_b
    such tokens, and its tokens past the root are padding: their K/V land in slots past the root
    that the window's own tokens overwrite before any query reads them (slot == position, the mask
    is slot <= query position). One compiled shape then serves every lead (the lookahead tail's
    next window starts with 1..gamma+1 tokens). Returns (tokens [B, num_tokens], q [B, num_tokens, V] or None, conf
    [B, num_tokens] (raw log-prob of each emitted token), forwards
    (int32 []: until every row had its tokens or stopped), cache with lengths unchanged, length [B] int32,
    fed [B] int32: window tokens whose K/V are written, ``length - 1`` unless `tail`).

    `stop_logp` (static; None: full windows, length == num_tokens): the adaptive window of
    `mirror_jax.rounds.draft.draft_chain_until`, with the same rule and the same lengths: a row's
    window ends after the first emitted token whose raw log-prob (or, with `cumulative`, the window's
    sum so far) is below it, and the row stops drafting. A forward may emit tokens past that one
    (accepted lookaheads); they are padding, never verified. The K/V of the root and the window's
    tokens before the last are written, as the plain chain leaves them.

    `tail` (static): the lookahead tail, a window that is not the draft's own continuation. Once a
    forward leaves a row r <= s tokens short, the streams' r lookaheads fill the window unverified
    by the main stream (Medusa-style proposals; the target verifies them, so decoding stays lossless;
    with ``sample`` each is a draw from its stream's processed distribution and ``q`` holds it, so
    rejection sampling stays exact). The stop rule, if any, applies to them with the streams'
    log-probs as ``conf``. Their K/V are not written: ``fed`` counts the tokens that have them, and
    the next window's first forward must feed the rest (`engine.speculative`'s host loop does).
    Example, gamma 4, s = 2: [root] emits d1 (lookaheads for d2, d3); [d1, l2, l3] emits d2 .. d_{2+a}
    (a accepted) and new lookaheads, which fill the 4 - 2 - a tokens left: every window takes two
    forwards, ``fed`` = 1 + a."""
    bsz, s, cap = roots.shape[0], ss.sscfg.num_streams, cache.capacity
    k_in = s + 1  # tokens fed per forward after the first
    base = cache.lengths
    rows = jnp.arange(bsz)
    out_w = num_tokens + k_in  # room for the last forward's overshoot
    choose = partial(pick, samp=samp, stream=Draw.DRAFT, sample=sample)

    def going(st):
        return (st["n"] < num_tokens) & ~st["stopped"]  # [B] rows still drafting

    def stop_rule(emit, cf, offset, stopped, length, score):
        """The adaptive window (`stop_logp`) over tokens cf [B, k] emitted where `emit`, emit[:, j] at
        window index offset + j: the first one the rule rejects ends the row's window."""
        if stop_logp is None:
            return stopped, length, score
        cf_in = jnp.where(emit, cf, 0.0)
        sc = score[:, None] + jnp.cumsum(cf_in, axis=1) if cumulative else cf  # [B, k]
        low = emit & (sc < stop_logp)
        hit = jnp.any(low, axis=1)  # emit is False on inactive rows, so hit is too
        length = jnp.where(hit, offset + jnp.argmax(low, axis=1) + 1, length)
        return stopped | hit, length, score + jnp.sum(cf_in, axis=1)

    def streams_at(h0, positions, c, at):
        """Stream hidden [B, s, H] of the fed position `at` [B] (its main K/V are in `c`)."""
        return stream_pass_at(cfg, ss.sscfg, params, ss.ssp, h0, positions, c, at, ss.layers)

    def step(st, toks, lead=None, streams: bool = True):
        """One SS forward of toks [B, k]: in the loop x0 and up to s lookaheads (lead None); first
        (lead [B]), the committed tokens without K/V and the root at index lead (their predictions are
        not emitted; none is a lookahead, so none is accepted), then padding.
        streams=False: a plain forward (no lookaheads are needed after it).

        The streams run at one fed position only, the last whose input proved right (p + last): the
        lookaheads come from there, and stream rows at the other positions (a forward of k tokens
        used to run k * s of them through the MSA layers) were never read. A stream at t attends to
        main slots <= t only, so the rejected lookaheads' K/V written past it are masked out."""
        k = toks.shape[1]
        first_fwd = lead is not None
        skip = lead if first_fwd else jnp.zeros((bsz,), jnp.int32)  # [B] index of x0 (the root) in toks
        active = going(st)
        p = st["p"]  # [B] position of x0
        pos_in = jnp.where(active, p, cap)  # finished rows: every write lands out of range
        h0, hf, positions, c = main_pass(cfg, ss.sscfg, params, toks, st["cache"].replace(lengths=pos_in))
        at = p  # [B] position of the first row the main head reads
        if first_fwd:  # only the root's prediction is emitted (no lookahead was fed): the head reads its row
            hf, at = hf[rows, skip][:, None], p + skip  # [B, 1, H] (a padded start fed gamma + 1 rows)
        k_h = hf.shape[1]  # rows through the main head
        # With no lookahead fed (the first forward) the last right position is the root's before the
        # main head has run, so the streams need not wait for it. The LM head is the largest weight of
        # a small draft; on the CPU a product of <= 8 rows costs ~1.2-1.4x one row (`model.dense`), so
        # then the stream rows join the main rows in one head pass while that stays <= 8 rows. A
        # reduced stream head (`SSConfig.stream_vocab`) always gets its own pass over its few rows.
        known_last = streams and (first_fwd or k == 1)
        s_logits = None
        if known_last:
            hs = streams_at(h0, positions, c, skip)  # [B, s, H]
            if bsz * (k_h + s) <= 8 and ss.stream_ids is None:
                both = M.head(cfg, params, jnp.concatenate([hf, hs], axis=1))
                logits, s_logits = both[:, :k_h], both[:, k_h:]  # [B, k_h, V], [B, s, V]
            else:
                logits, s_logits = M.head(cfg, params, hf), M.head(cfg, ss.stream_params(params), hs)
        else:
            logits = M.head(cfg, params, hf)  # [B, k, V]
        g, lp = choose(logits, positions=at[:, None] + 1 + jnp.arange(k_h), want_logprobs=sample)
        if first_fwd:
            a = jnp.zeros((bsz,), jnp.int32)
        else:
            a = accepted_length(st["look"][:, : k - 1] == g[:, : k - 1])  # [B] accepted lookaheads
        last = a  # [B] the last head row whose input is right (fed position skip + a); its prediction is emitted
        # Emit g_0 .. g_last into out[n .. n+a] (only for active rows; the rest are dropped).
        j = jnp.arange(k_h)[None, :]
        emit = (j <= last[:, None]) & active[:, None]
        idx = jnp.where(emit, st["n"][:, None] + j, out_w)
        out = st["out"].at[rows[:, None], idx].set(g, mode="drop")
        q = None if lp is None else st["q"].at[rows[:, None], idx].set(lp, mode="drop")
        cf = own_logprob(logits, g)  # [B, k_h]
        conf = st["conf"].at[rows[:, None], idx].set(cf, mode="drop")
        stopped, length, score = stop_rule(emit, cf, st["n"], st["stopped"], st["len"], st["score"])
        n = jnp.where(active, st["n"] + a + 1, st["n"])
        # New lookaheads from the streams at the last accepted position p+a.
        if streams:
            if s_logits is None:  # the last right position is known only now
                s_logits = M.head(cfg, ss.stream_params(params), streams_at(h0, positions, c, last))  # [B, s, V]
            look, look_lp = choose(s_logits, positions=(at + last + 1)[:, None] + jnp.arange(1, s + 1),
                                   want_logprobs=sample and tail)  # [B, s], [B, s, V] or None
            if tail:  # rows left r <= s tokens short take r lookaheads as they are
                left = num_tokens - n  # [B]
                put = (active & ~stopped & (left > 0) & (left <= s))[:, None] & (jnp.arange(s)[None, :] < left[:, None])
                idx_t = jnp.where(put, n[:, None] + jnp.arange(s)[None, :], out_w)  # [B, s]
                out = out.at[rows[:, None], idx_t].set(look, mode="drop")
                cf_t = own_logprob(s_logits, look)  # [B, s] the streams' raw log-probs
                conf = conf.at[rows[:, None], idx_t].set(cf_t, mode="drop")
                if q is not None:
                    q = q.at[rows[:, None], idx_t].set(look_lp, mode="drop")
                stopped, length, score = stop_rule(put, cf_t, n, stopped, length, score)
                n = jnp.where(put[:, 0], num_tokens, n)
        else:
            look = st["look"]
        return dict(
            p=jnp.where(active, at + last + 1, p),
            x0=jnp.where(active, g[rows, last], st["x0"]),
            look=jnp.where(active[:, None], look, st["look"]),
            n=n,
            out=out,
            q=q,
            conf=conf,
            cache=c.replace(lengths=base),
            it=st["it"] + 1,
            stopped=stopped,
            len=length,
            score=score,
        )

    def body(st):
        # Feed only the lookaheads a row can still use: m = min(s, tokens it still needs - 1), the
        # most over the unfinished rows. A window's last forward then has fewer rows, and with m = 0
        # (every row needs one more token) it is a plain forward: no stream rows, no stream head.
        toks = jnp.concatenate([st["x0"][:, None], st["look"]], axis=1)  # [B, s+1]
        need = jnp.where(going(st), num_tokens - st["n"] - 1, 0)  # [B]
        m = jnp.clip(jnp.max(need), 0, s)
        return lax.switch(m, [partial(lambda st, j: step(st, toks[:, : j + 1], streams=j > 0), j=j)
                              for j in range(s + 1)], st)

    first = (roots[:, None] if roots.ndim == 1 else roots).astype(jnp.int32)  # [B, F]
    lead = jnp.full((bsz,), first.shape[1] - 1, jnp.int32) if lead is None else jnp.asarray(lead, jnp.int32)
    st = dict(
        p=base,
        x0=first[rows, lead],
        look=jnp.zeros((bsz, s), jnp.int32),
        n=jnp.zeros((bsz,), jnp.int32),
        out=jnp.zeros((bsz, out_w), jnp.int32),
        q=jnp.zeros((bsz, out_w, cfg.vocab_size), jnp.float32) if sample else None,
        conf=jnp.zeros((bsz, out_w), jnp.float32),
        cache=cache,
        it=jnp.zeros((), jnp.int32),
        stopped=jnp.zeros((bsz,), bool),
        len=jnp.full((bsz,), num_tokens, jnp.int32),
        score=jnp.zeros((bsz,), jnp.float32),
    )
    # The first forward feeds the root (after any committed tokens whose K/V are missing) without
    # lookaheads: there are none yet (s placeholder copies made it a multi-row forward for tokens
    # that were almost never right); it yields the first token and the streams' lookaheads.
    st = step(st, first, lead=lead)
    st = lax.while_loop(lambda st: jnp.any(going(st)), body, st)
    q = None if st["q"] is None else st["q"][:, :num_tokens]
    length = jnp.minimum(st["len"], num_tokens)
    # The main stream's K/V are right in slots base .. p-1: the F-1 lead tokens, the root and window tokens
    # 1 .. p-base-F (the main stream emitted those and the ones fed after them; the tail was never fed).
    fed = jnp.minimum(st["p"] - base - lead - 1, length - 1)
    return st["out"][:, :num_tokens], q, st["conf"][:, :num_tokens], st["it"], st["cache"], length, fed


_ss_chain = jax.jit(ss_chain, static_argnames=("cfg", "num_tokens", "sample", "stop_logp", "cumulative", "tail"))


def ss_rollout(cfg: ModelConfig, params: ModelParams, ss: SSDraft, cache: KVCache, roots, num_tokens: int,
               samp: SamplingArrays | None = None, *, sample: bool = False):
    """`ss_chain`, jitted, after host-side checks (cache headroom; `samp` given when sampling);
    roots [B] or [B, F] as in `ss_chain`;
    returns (tokens, q, forwards, cache) (without ``conf``).
    Greedy by default (``samp`` defaults to ``SamplingParams().arrays()``, rows 0..B-1)."""
    roots = jnp.asarray(roots)
    if sample and samp is None:
        raise ValueError("ss_rollout: sample=True needs `samp` (SamplingParams(temperature=...).arrays(rows))")
    if samp is None:
        samp = SamplingParams().arrays(row=jnp.arange(roots.shape[0]))
    lead = roots.shape[1] - 1 if roots.ndim == 2 else 0  # committed tokens fed before the root
    check_headroom(cache.lengths, lead + num_tokens + ss.sscfg.num_streams, cache.capacity, what="ss_rollout KV cache")
    toks, q, _, forwards, cache, _, _ = _ss_chain(cfg, params, ss, cache, roots, num_tokens, samp, sample=sample)
    return toks, q, forwards, cache
