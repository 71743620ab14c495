"""What travels between the round functions: small `flax.struct` pytrees, not dicts.

Shapes for batch 1, window gamma, kappa candidates, n = branch budget, V vocabulary:

==============  =========================  ====================================================
payload         made by -> used by         fields
==============  =========================  ====================================================
`Channel`       target_prefix -> draft     cand_ids [gamma+1, kappa] int32, cand_lp, path_lp
`EarlyExit`     target_prefix -> verify    the Channel + top_ids (raw top-kappa, Omega_kappa)
`Proposal`      draft_propose/select       window [1, gamma], q [1, gamma, V] or None, conf, forwards,
                                           length [1], fed [1]
`Branches`      draft_rollout -> select    depth/root [n], tokens [n, gamma], q, conf, forwards,
                                           path [gamma+1], buffer (branch K/V), scores, cand_ids
`Verdict`       verify -> draft_select     a (accepted), c (correction/bonus), omega_hits
==============  =========================  ====================================================

Only `Channel` (~100 bytes) and the Verdict's ``a``/``c`` cross from the target's device to the
draft's, and only the `Proposal`'s window (and q) crosses back: the token channel.
"""

from __future__ import annotations

import jax
from flax import struct

from mirror_jax.rounds.branch_rows import BranchBuffer


@struct.dataclass
class Channel:
    """The early exit's candidates, sent to the draft's device."""

    cand_ids: jax.Array  # [gamma+1, kappa] int32: top-kappa per depth, on-path draft token excluded
    cand_lp: jax.Array  # [gamma+1, kappa] float32: their early-exit log-probabilities
    path_lp: jax.Array  # [gamma] float32: early-exit log-probability of each window token


@struct.dataclass
class EarlyExit:
    channel: Channel
    top_ids: jax.Array  # [gamma+1, kappa] int32: raw top-kappa (no exclusion), stays on the target for Omega


@struct.dataclass
class Proposal:
    """A draft window and what verification needs of it."""

    window: jax.Array  # [1, gamma] int32
    q: jax.Array | None  # [1, gamma, V] float32 processed draft log-probs (rejection verifier) or None
    conf: jax.Array  # [1, gamma] float32: the draft's log-prob of each window token (raw distribution)
    forwards: jax.Array  # int32 []: draft forwards spent on it
    length: jax.Array  # [1] int32: window tokens drafted (gamma, or fewer after an early stop); the rest are padding
    fed: jax.Array  # [1] int32: window tokens whose K/V the draft wrote (length - 1; fewer with the SS lookahead tail)


@struct.dataclass
class Branches:
    """Branch-complete rollouts: branch i assumes the target accepts depth[i] window tokens and then
    emits root[i]; tokens[i] is the draft's continuation after it."""

    depth: jax.Array  # [n] int32
    root: jax.Array  # [n] int32
    tokens: jax.Array  # [n, gamma] int32
    q: jax.Array | None  # [n, gamma, V] float32 or None
    conf: jax.Array  # [n, gamma] float32: the draft's log-prob of each branch token
    forwards: jax.Array  # int32 []: draft forwards of the rollout
    path: jax.Array  # [gamma+1] int32: [last, window], the tokens at P .. P+gamma
    buffer: BranchBuffer  # each branch's K/V (x_r, root, tokens[:-1]), written into the cache on reuse
    scores: jax.Array  # [gamma+1, kappa] float32: every candidate branch's score (`branch_scores`)
    cand_ids: jax.Array  # [gamma+1, kappa] int32: the candidates those scores belong to


@struct.dataclass
class Verdict:
    a: jax.Array  # int32 []: accepted window tokens
    c: jax.Array  # int32 []: the target's token at index a (correction, or the bonus when a == gamma)
    omega_hits: jax.Array  # int32 []: committed tokens inside the raw early-exit top-kappa (-1: no exit)
