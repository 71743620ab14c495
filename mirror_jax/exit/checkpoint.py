"""Save / restore trained exit heads (`ExitHead`, one per exit layer) for a target, with orbax.

A checkpoint holds heads for one or more exit layers of one target (``heads.<layer>.w`` etc.,
stored bfloat16: the heads only pick draft candidates, so their precision never touches the
output) and metadata: the target's fingerprint and config, the layers, the recommended
``default_layer``, and whatever the trainer records (data hash, steps, command, held-out
Omega_kappa). Layout, atomic save and integrity checks: `mirror_jax.checkpointing`.

Example::

    save_exit_heads("checkpoints/exit_default_target", cfg, params, [head14, head20], default_layer=20,
                    extra={"steps": 300})
    heads = restore_exit_heads("checkpoints/exit_default_target", cfg, params)
    heads.default_layer, heads.for_layer(20)            # -> 20, ExitHead(layer=20)
    load_default_exit_heads(target)                      # the committed heads of the default target, or None
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from mirror_jax.checkpointing import (
    CheckpointMismatchError,
    base_diffs,
    base_fingerprint,
    flatten_tree,
    leaf_specs,
    restore_flat,
    save_flat,
    unflatten_tree,
    verified_metadata,
)
from mirror_jax.config import ModelConfig
from mirror_jax.exit.head import ExitHead, init_exit_head
from mirror_jax.files import checkpoint_search_path
from mirror_jax.params import ModelParams

FORMAT_VERSION = 1
KIND = "exit_heads"
DEFAULT_EXIT_NAME = "exit_default_target"
STORE_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class ExitHeads:
    """Trained exit heads of one target, by exit layer."""

    heads: dict[int, ExitHead]
    default_layer: int | None = None
    metadata: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.heads))

    def for_layer(self, layer: int) -> ExitHead | None:
        return self.heads.get(layer)


def _template(cfg: ModelConfig, layers: Sequence[int]) -> dict[str, ExitHead]:
    return {str(layer): init_exit_head(cfg, layer, STORE_DTYPE) for layer in sorted(layers)}


def save_exit_heads(directory: str | os.PathLike, cfg: ModelConfig, params: ModelParams, heads: Sequence[ExitHead],
                    *, default_layer: int | None = None, extra: dict | None = None,
                    fingerprint: str | None = None) -> Path:
    """Atomically write `heads` (one per distinct layer) + metadata to `directory`."""
    layers = [h.layer for h in heads]
    if len(set(layers)) != len(layers):
        raise ValueError(f"one head per exit layer, got layers {layers}")
    if default_layer is not None and default_layer not in layers:
        raise ValueError(f"default_layer {default_layer} has no head (layers {sorted(layers)})")
    if any(not h.trained for h in heads):
        raise ValueError("only trained exit heads (with a map) are saved; the untrained exit needs no checkpoint")
    # A reduced exit vocabulary is a runtime choice (`restrict_exit`), not part of the trained head.
    tree = {str(h.layer): _cast(h.replace(vocab_ids=None, lm_head=None), STORE_DTYPE) for h in heads}
    meta = {"format": FORMAT_VERSION, "kind": KIND,
            "base_fingerprint": fingerprint or base_fingerprint(cfg, params),
            "base_config": dataclasses.asdict(cfg), "layers": sorted(layers), "default_layer": default_layer,
            **(extra or {})}
    return save_flat(directory, flatten_tree(tree), meta)


def _cast(head: ExitHead, dtype) -> ExitHead:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), head)  # `layer` is static: kept


def restore_exit_heads(directory: str | os.PathLike, cfg: ModelConfig, params: ModelParams, *,
                       fingerprint: str | None = None, dtype=jnp.float32) -> ExitHeads:
    """Load the heads in `directory` for the target (cfg, params), cast to `dtype`.

    Raises `CheckpointCorruptedError` (missing/damaged files) or `CheckpointMismatchError` (another
    target, or not an exit-head checkpoint) with the reason."""
    d = Path(directory).resolve()
    meta = verified_metadata(d, "exit-head checkpoint")
    diffs = []
    if meta.get("kind") != KIND or meta.get("format") != FORMAT_VERSION:
        diffs.append(f"kind/format {meta.get('kind')!r}/{meta.get('format')!r}, expected {KIND!r}/{FORMAT_VERSION}")
    diffs += base_diffs(meta, cfg, fingerprint or base_fingerprint(cfg, params))
    if diffs:
        raise CheckpointMismatchError(
            f"exit-head checkpoint {d} does not match the given target:\n  - " + "\n  - ".join(diffs))
    template = _template(cfg, meta["layers"])
    flat_t = flatten_tree(template)
    if leaf_specs(flat_t) != meta["leaves"]:
        raise CheckpointMismatchError(f"exit-head checkpoint {d}: parameter names/shapes differ from the target's")
    tree = unflatten_tree(template, restore_flat(d, flat_t, "exit-head checkpoint"))
    heads = {int(k): _cast(h, dtype) for k, h in tree.items()}
    return ExitHeads(heads, meta.get("default_layer"), {**meta, "directory": str(d)})


def default_exit_dirs(checkpoints: str | os.PathLike | None = None) -> list[Path]:
    """Where the committed heads of the default target are looked for (`checkpoint_search_path`)."""
    return [p / DEFAULT_EXIT_NAME for p in checkpoint_search_path(checkpoints)]


def load_default_exit_heads(target, checkpoints: str | os.PathLike | None = None) -> ExitHeads | None:
    """The committed exit heads for `target` (an object with `.cfg` and `.params`), or None when there
    are none or they were trained for another target."""
    d = next((p for p in default_exit_dirs(checkpoints) if (p / "metadata.json").is_file()), None)
    if d is None:
        return None
    try:
        return restore_exit_heads(d, target.cfg, target.params)
    except CheckpointMismatchError:
        return None

