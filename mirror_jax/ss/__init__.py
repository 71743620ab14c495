"""Speculative streaming (SS) for the draft model: multi-stream attention in the top layers.

* `mirror_jax.ss.model`      - `SSConfig`, `SSParams`, `ss_forward`, `ss_train_forward`,
  `stream_head` (the streams' own, optionally reduced, LM head).
* `mirror_jax.ss.rollout`    - `SSDraft` / `ss_draft` (adapter ready to roll out), `ss_chain`,
  `ss_rollout` (several tokens per draft forward, the plain draft's tokens).
* `mirror_jax.ss.train`      - SS loss, optimizer, jitted train step.
* `mirror_jax.ss.checkpoint` - orbax save/restore of adapters with metadata validation.
* `mirror_jax.ss.window`     - expected draft forwards per window from the streams' acceptance,
  the tokens-per-forward ceiling and the acceptance a target needs.
"""

from mirror_jax.ss.model import SSConfig, SSParams, init_ss_params, ss_forward, ss_train_forward, stream_head
from mirror_jax.ss.rollout import SSDraft, ss_chain, ss_draft, ss_rollout

__all__ = [
    "SSConfig", "SSDraft", "SSParams", "init_ss_params", "ss_chain", "ss_draft", "ss_forward", "ss_rollout",
    "ss_train_forward", "stream_head",
]
