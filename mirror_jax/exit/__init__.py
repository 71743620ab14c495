"""Trained early exits for the target (Mirror-SD's token channel).

* `mirror_jax.exit.head`       - `ExitHead`, `init_exit_head`, `apply_exit`, `exit_logits`.
* `mirror_jax.exit.train`      - features from the target, distillation loss, optax training,
  held-out Omega_kappa ranks.
* `mirror_jax.exit.checkpoint` - orbax save/restore (`ExitHeads` by layer), the default target's
  committed heads (`load_default_exit_heads`).
"""

from mirror_jax.exit.head import ExitHead, apply_exit, exit_logits, init_exit_head

__all__ = ["ExitHead", "apply_exit", "exit_logits", "init_exit_head"]
