"""The algorithm: one Mirror-SD round as pure, jitted functions, one file per box of the diagram.

=================  =========  ===================================================  ==================
function           device     computes                                             file
=================  =========  ===================================================  ==================
`target_prefix`    target     layers [0, l_e) over [last, window] + early-exit     `rounds/target.py`
                              top-kappa (the `Channel` sent to the draft)
`draft_rollout`    draft      branch choice + branch-complete rollouts over the    `rounds/draft.py`
                              shared cache (per-branch K/V buffers)
`target_suffix`    target     layers [l_e, N) + head -> final logits               `rounds/target.py`
`verify`           target     accepted length A, correction c, commit A + 1        `rounds/verify.py`
`draft_select`     draft      commit A + 1; reuse branch (A, c) or fall back       `rounds/draft.py`
`draft_propose`    draft      a fresh window (vanilla SD; the first window)        `rounds/draft.py`
`target_full`      target     the unsplit verification forward (vanilla SD)        `rounds/target.py`
=================  =========  ===================================================  ==================

Each is compiled once per static configuration (model config, gamma via the window shape, kappa,
exit layer, branch budget, cache size, verifier) and callable from your own JAX code; payloads
are the `flax.struct` pytrees of `rounds/payloads.py`. Every function that returns a KV cache
*donates* the one it took (``donate_argnames``; `draft_rollout` only reads its cache): its buffers
are reused for the returned cache and the array you passed in is deleted; always continue with the
returned cache (copy first, e.g. ``jax.tree.map(jnp.copy, cache)``, to keep an old state). ``samp`` is the run's
`mirror_jax.sampling.SamplingArrays` (seed key, batch row, temperature/top-k/top-p).
`tests/test_engine_api.py` runs one round by hand on two devices.
"""

from mirror_jax.rounds.draft import draft_propose, draft_rollout, draft_select
from mirror_jax.rounds.payloads import Branches, Channel, EarlyExit, Proposal, Verdict
from mirror_jax.rounds.target import target_full, target_prefix, target_suffix
from mirror_jax.rounds.verify import VERIFIERS, verify

__all__ = [
    "VERIFIERS", "Branches", "Channel", "EarlyExit", "Proposal", "Verdict", "draft_propose", "draft_rollout",
    "draft_select", "target_full", "target_prefix", "target_suffix", "verify",
]
