"""Save / restore SS adapters (`SSParams`) with orbax, plus validated metadata.

Layout of ``checkpoints/<name>/``::

    params/          orbax StandardCheckpointer directory: flat dict {"stream_embed": ...,
                     "lora.0.a_q": ..., ...} of float arrays (+ "stream_ids", int32, when the
                     streams choose among a frequency-ranked vocabulary)
    metadata.json    {"format": 2, "base_fingerprint": ..., "base_config": {...},
                      "ss_config": {"num_streams", "num_msa_layers", "lora_rank", "stream_vocab"},
                      "leaves": {name: [shape, dtype]}, "files": {relpath: sha256},
                      + caller extras (steps, data description, final losses, ...)}

Saving is atomic: everything is written to ``<parent>/.<name>.tmp-<pid>`` and renamed into place
(an existing checkpoint of the same name is replaced only after the new one is complete).
Restoring checks, in order: the directory and metadata exist and parse, every file listed in
``files`` exists with the recorded sha256 (so a truncated or deleted file is reported as
`CheckpointCorruptedError`), and the metadata matches the base model and SS config the caller
gives (`CheckpointMismatchError` listing every difference).

The base fingerprint hashes the `ModelConfig` plus every parameter leaf's shape, dtype and a fixed
strided sample of up to 4096 values (cheap even for a 0.5B model, and different for any two
differently trained models). Format 2 takes it over the ``[out, in]`` weights mirror_jax stores
now; format 1 checkpoints (weights were stored ``[in, out]``) are verified against the same sample
of the transposed matrices, so they still load: the adapter's own parameters (LoRA factors,
stream embeddings) do not depend on the base layout.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from mirror_jax.checkpointing import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointMismatchError,
    base_diffs,
    base_fingerprint,
    flatten_tree,
    leaf_specs,
    read_metadata,
    restore_flat,
    save_flat,
    unflatten_tree,
    verified_metadata,
)
from mirror_jax.config import ModelConfig
from mirror_jax.files import checkpoint_search_path
from mirror_jax.params import ModelParams
from mirror_jax.ss.model import SSConfig, SSParams, init_ss_params

FORMAT_VERSION = 2
_FORMATS = (1, 2)
# The committed adapter for the default draft: `checkpoints/ss_default_draft` (trained on stdlib text)
# fine-tuned on the draft's own greedy continuations (`experiments/train_ss_draft.py --data self`:
# `ss_self_draft`, then `ss_self_draft_r2` on 1280 more prompts), which lifted the streams' hit rate
# where decoding runs (experiments/results/ss_bench.md, ss_bench_int8.md).
DEFAULT_ADAPTER_NAME = "ss_self_draft_r2"
__all__ = [
    "CheckpointCorruptedError", "CheckpointError", "CheckpointMismatchError", "base_fingerprint", "read_metadata",
    "restore_ss_checkpoint", "save_ss_checkpoint", "load_default_ss_adapter", "default_adapter_dirs",
]


def save_ss_checkpoint(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: ModelParams,
    sscfg: SSConfig,
    ssp: SSParams,
    extra: dict | None = None,
    *,
    fingerprint: str | None = None,
) -> Path:
    """Atomically write `ssp` + metadata to `directory` (e.g. ``checkpoints/<name>``).

    `extra` (JSON-serialisable: steps, data description, final losses, ...) is merged into the
    metadata. Returns the final path."""
    meta = {
        "format": FORMAT_VERSION,
        "base_fingerprint": fingerprint or base_fingerprint(cfg, params),
        "base_config": dataclasses.asdict(cfg),
        "ss_config": dataclasses.asdict(sscfg),
        **(extra or {}),
    }
    return save_flat(directory, flatten_tree(ssp), meta)


def _diffs(meta: dict, cfg: ModelConfig, sscfg: SSConfig | None, fingerprint: str) -> list[str]:
    out = []
    if meta.get("format") not in _FORMATS:
        out.append(f"format version {meta.get('format')} is not one of {_FORMATS}")
    out += base_diffs(meta, cfg, fingerprint)
    if sscfg is not None:
        got = {**dataclasses.asdict(SSConfig()), **meta.get("ss_config", {})}  # fields added later: defaults
        for k, v in dataclasses.asdict(sscfg).items():
            if got.get(k) != v:
                out.append(f"SS config {k}: checkpoint has {got.get(k)!r}, requested {v!r}")
    return out


def restore_ss_checkpoint(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: ModelParams,
    sscfg: SSConfig | None = None,
    *,
    fingerprint: str | None = None,
) -> tuple[SSConfig, SSParams, dict]:
    """Load an adapter for the base model (cfg, params). `sscfg=None` takes the checkpoint's SS
    config. Returns (sscfg, ssp, metadata). Raises CheckpointCorruptedError /
    CheckpointMismatchError with the reason."""
    d = Path(directory).resolve()
    meta = verified_metadata(d, "SS checkpoint")
    fmt = meta.get("format") if meta.get("format") in _FORMATS else FORMAT_VERSION
    diffs = _diffs(meta, cfg, sscfg, fingerprint or base_fingerprint(cfg, params, version=fmt))
    if diffs:
        raise CheckpointMismatchError(
            f"SS checkpoint {d} does not match the given model/config:\n  - " + "\n  - ".join(diffs)
        )
    sscfg = sscfg or SSConfig(**meta["ss_config"])
    template = init_ss_params(cfg, sscfg, params)
    if "stream_ids" in meta["leaves"]:  # the streams' token ids, saved with the adapter
        template = template.replace(stream_ids=np.zeros(meta["leaves"]["stream_ids"][0], np.int32))
    flat_t = flatten_tree(template)
    if leaf_specs(flat_t) != meta["leaves"]:
        raise CheckpointMismatchError(f"SS checkpoint {d}: parameter names/shapes differ from SSConfig {sscfg}")
    flat = restore_flat(d, flat_t, "SS checkpoint")
    return sscfg, unflatten_tree(template, flat), meta


def default_adapter_dirs(checkpoints: str | os.PathLike | None = None) -> list[Path]:
    """Where the committed adapter for the default draft is looked for, in order (see
    `mirror_jax.files.checkpoint_search_path`: the argument, $MIRROR_JAX_CHECKPOINTS, the checkout's
    ``checkpoints/``, ``./checkpoints``)."""
    return [p / DEFAULT_ADAPTER_NAME for p in checkpoint_search_path(checkpoints)]


def load_default_ss_adapter(draft, checkpoints: str | os.PathLike | None = None):
    """The committed SS adapter for `draft` (an object with `.cfg` and `.params`), or None.

    Takes the first of `default_adapter_dirs(checkpoints)` that holds one; returns None when none
    does or it was trained for another base model. Returns (sscfg, ssp, metadata) otherwise, with
    the directory it came from as ``metadata["directory"]``."""
    d = next((p for p in default_adapter_dirs(checkpoints) if (p / "metadata.json").is_file()), None)
    if d is None:
        return None
    try:
        sscfg, ssp, meta = restore_ss_checkpoint(d, draft.cfg, draft.params)
    except CheckpointMismatchError:
        return None
    return sscfg, ssp, {**meta, "directory": str(d)}
