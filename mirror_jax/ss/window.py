"""How many draft forwards an SS window takes, from its streams' acceptance (a model of `ss_chain`).

A window of ``gamma`` tokens starts with the root forward, which emits one token (the draft has not
seen the root yet, so nothing it emits can be checked in that forward). Every later forward with
``r`` tokens still to emit feeds ``m = min(s, r - 1)`` lookaheads and emits ``1 + a`` tokens, ``a``
the number of leading lookaheads that match (`mirror_jax.ss.rollout`'s module docstring); with
``r = 1`` it is a plain forward. So with ``accept[j]`` = P(lookahead j+1 matches | lookaheads
1..j matched), independent across forwards::

    F(0) = 0,  F(1) = 1,  F(r) = 1 + sum_{i=0..m} P(a = i) F(r - 1 - i)     (r >= 2)
    forwards per window = 1 + F(gamma - 1),  tokens per forward = gamma / that

Worked example (gamma 4, s = 2): after the root, 3 tokens are left; the next forward feeds 2
lookaheads. Both match (p1 p2): done, 2 forwards. One matches (p1 (1 - p2)): one token left, a
plain forward, 3 forwards. None ((1 - p1)): 2 left, a forward with one lookahead that either matches
(3 forwards) or not (4). So the window never takes fewer than 2 forwards: **at gamma 4 an SS draft
emits at most 2.0 tokens per forward whatever its streams**, and 1.8 needs about 0.89 acceptance
per lookahead (`acceptance_needed(4, 2, 1.8)`); with p1 = 0.41, p2 = 0.24 it is 4 / 3.25 = 1.23.

`expected_forwards` is the model; `acceptance_needed` inverts it for equal per-stream acceptance;
`max_tokens_per_forward` is the all-match ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence


def _check(gamma: int, streams: int) -> None:
    if gamma < 1 or streams < 0:
        raise ValueError(f"need gamma >= 1 and streams >= 0, got gamma={gamma}, streams={streams}")


def expected_forwards(gamma: int, accept: Sequence[float]) -> float:
    """Expected draft forwards for a window of `gamma` tokens whose ``s = len(accept)`` streams'
    lookaheads match with conditional probabilities `accept` (see the module docstring)."""
    s = len(accept)
    _check(gamma, s)
    if any(not 0.0 <= p <= 1.0 for p in accept):
        raise ValueError(f"acceptance probabilities must lie in [0, 1], got {list(accept)}")
    f = [0.0, 1.0]  # F(0), F(1)
    for r in range(2, gamma):
        m = min(s, r - 1)
        total, reach = 1.0, 1.0  # reach = P(the first i lookaheads all match)
        for i in range(m + 1):
            p_here = reach * (1.0 - accept[i]) if i < m else reach  # P(a = i)
            total += p_here * f[r - 1 - i]
            if i < m:
                reach *= accept[i]
        f.append(total)
    return 1.0 + f[gamma - 1] if gamma > 1 else 1.0


def tokens_per_forward(gamma: int, accept: Sequence[float]) -> float:
    """gamma / `expected_forwards`."""
    return gamma / expected_forwards(gamma, accept)


def max_tokens_per_forward(gamma: int, streams: int) -> float:
    """The ceiling: every lookahead matches (``gamma / (1 + ceil((gamma - 1) / (s + 1)))``)."""
    _check(gamma, streams)
    return tokens_per_forward(gamma, [1.0] * streams)


def acceptance_needed(gamma: int, streams: int, target: float, tol: float = 1e-9) -> float | None:
    """The smallest acceptance p, the same for every stream, at which an SS window of `gamma` tokens
    reaches `target` tokens per forward; None where even p = 1 does not (`max_tokens_per_forward`)."""
    _check(gamma, streams)
    if tokens_per_forward(gamma, [1.0] * streams) < target:
        return None
    lo, hi = 0.0, 1.0  # tokens_per_forward rises with p
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_forward(gamma, [mid] * streams) < target else (lo, mid)
    return hi
