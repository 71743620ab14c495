"""Speculative streaming (SS) for the draft model: multi-stream attention in the top layers.

* `mirror_jax.ss.model`      - `SSConfig`, `SSParams`, `ss_forward`, `ss_train_forward`.
* `mirror_jax.ss.rollout`    - `ss_rollout` (several tokens per draft forward) and `ar_rollout`.
* `mirror_jax.ss.train`      - SS loss, optimizer, jitted train step.
* `mirror_jax.ss.checkpoint` - orbax save/restore of adapters with metadata validation.
"""

from mirror_jax.ss.model import SSConfig, SSParams, init_ss_params, ss_forward, ss_train_forward

__all__ = ["SSConfig", "SSParams", "init_ss_params", "ss_forward", "ss_train_forward"]
