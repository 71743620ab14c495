"""A trained early exit: a small residual map on the layer-l_e hidden state, before the target's
own final norm and LM head.

The untrained early exit (spec section 2 step 2) reads the target's LM head straight off the
layer-l_e hidden state; at l_e = 14 of the default 28-layer target that puts the final greedy token
in its top-4 only ~12% of the time (``experiments/results/omega_by_exit.md``). An `ExitHead`
(LayerSkip/Kangaroo-style exit adapter) first maps the hidden state towards what the last layer
would produce::

    x' = x + W rms_norm(x; g) + b           W [H, H] ([out, in], zero at init), g [H], b [H]
    early-exit logits = lm_head(final_norm(x'))

W and b start at zero, so an untrained `ExitHead` is exactly the untrained exit. The head is tied
to one exit layer (`layer`, static) and one target (checkpoints record the target's fingerprint).
It only changes *which candidates* the draft rolls out, never the output: verification still uses
the target's full forward, so decoding stays lossless with any exit head.

Example::

    head = init_exit_head(cfg, layer=14)
    hidden, ee_logits, cache = forward_prefix(cfg, params, tokens, cache, 14)   # untrained exit
    ee_logits = exit_logits(cfg, params, head, hidden)                          # same, trained head
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.params import ModelParams


@struct.dataclass
class ExitHead:
    norm: jax.Array | None  # [H] float32: RMSNorm gain on the exit input (None: no map, the untrained exit)
    w: jax.Array | None  # [H, H] stored [out, in] like every weight (`model.dense`)
    b: jax.Array | None  # [H]
    layer: int = struct.field(pytree_node=False)  # the exit layer l_e it was trained for
    # A reduced exit vocabulary (`restrict_exit`): the exit's LM head covers these token ids only.
    vocab_ids: jax.Array | None = None  # [N] int32, sorted
    lm_head: jax.Array | None = None  # [N, H]: the target's LM-head rows of vocab_ids

    @property
    def trained(self) -> bool:
        """False for the untrained exit (no map), which may still carry a reduced vocabulary."""
        return self.w is not None

    def apply(self, cfg: ModelConfig, x: jax.Array) -> jax.Array:
        """`apply_exit`."""
        return apply_exit(cfg, self, x)

    def logits(self, cfg: ModelConfig, params: ModelParams, x: jax.Array) -> jax.Array:
        """`exit_logits` (the hook `model.forward_prefix` calls)."""
        return exit_logits(cfg, params, self, x)


def init_exit_head(cfg: ModelConfig, layer: int, dtype=jnp.float32) -> ExitHead:
    """The identity exit head (W = 0, b = 0): equal to the untrained early exit."""
    h = cfg.hidden_size
    return ExitHead(norm=jnp.ones((h,), dtype), w=jnp.zeros((h, h), dtype), b=jnp.zeros((h,), dtype), layer=layer)


def apply_exit(cfg: ModelConfig, head: ExitHead | None, x: jax.Array) -> jax.Array:
    """x [..., H] -> the hidden state the LM head reads (x itself without a head or map)."""
    if head is None or head.w is None:
        return x
    y = M.dense(M.rms_norm(x, head.norm.astype(x.dtype), cfg.rms_norm_eps), head.w.astype(x.dtype))
    return x + y + head.b.astype(x.dtype)


def exit_logits(cfg: ModelConfig, params: ModelParams, head: ExitHead | None, x: jax.Array) -> jax.Array:
    """Early-exit logits [..., V] float32: the target's final norm + LM head after `apply_exit`
    (with a reduced exit vocabulary: its N rows only, NEG_INF elsewhere, as `model.head` does)."""
    if head is not None and head.lm_head is not None:
        params = params.replace(lm_head=head.lm_head, head_ids=head.vocab_ids)
    return M.head(cfg, params, apply_exit(cfg, head, x))


def restrict_exit(head: ExitHead | None, cfg: ModelConfig, params: ModelParams, ids, layer: int) -> ExitHead:
    """The early exit at `layer` (`head`, or the untrained exit for None) with its LM head cut to
    the token ids `ids` (checked, sorted; `mirror_jax.draft_vocab.vocab_ids`).

    The exit's second LM head over gamma+1 positions costs as much as the verification's own on
    a bandwidth-bound device (152k x 1536 floats for the default target); its candidates only choose
    which branches are rolled out, so a vocabulary that holds nearly every token the target emits
    (e.g. `mirror_jax.draft_vocab.reduced_vocab`) keeps the hit rate and never changes the output.
    Example::

        ids = reduced_vocab(cfg, 32768, keep=tok.all_special_ids)
        head = restrict_exit(heads.for_layer(24), cfg, params, ids, 24)
        generate(target, prompts, method="mirror", draft=draft, exit_head=head)"""
    from mirror_jax.draft_vocab import vocab_ids

    ids = jnp.asarray(vocab_ids(ids, cfg.vocab_size), jnp.int32)
    base = ExitHead(norm=None, w=None, b=None, layer=layer) if head is None else head
    if base.layer != layer:
        raise ValueError(f"the exit head was trained for exit layer {base.layer}, not {layer}")
    return base.replace(vocab_ids=ids, lm_head=jnp.take(params.lm_head, ids, axis=0))


def check_exit_head(cfg: ModelConfig, head: ExitHead | None, exit_layer: int) -> None:
    """Raise ValueError if `head` cannot serve exit layer `exit_layer` of a model with config `cfg`."""
    if head is None:
        return
    if head.layer != exit_layer:
        raise ValueError(
            f"the exit head was trained for exit layer {head.layer}, not {exit_layer}: pass exit_layer={head.layer}, "
            f"a head trained for layer {exit_layer}, or exit_head=None for the untrained exit"
        )
    if head.w is not None and head.w.shape != (cfg.hidden_size, cfg.hidden_size):
        raise ValueError(f"the exit head's map is {head.w.shape}, the target's hidden size is {cfg.hidden_size}")
