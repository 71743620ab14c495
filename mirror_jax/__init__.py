"""mirror_jax: Mirror Speculative Decoding (Mirror-SD) for JAX/Flax language models.

Quick start::

    from mirror_jax import default_pair, generate
    target, draft, tok = default_pair()
    ids = tok.encode("def quicksort(xs):")
    res = generate(target, [ids], 64, method="mirror", draft=draft)
    print(tok.decode(res.tokens[0]), res.stats["tokens_per_s"])

The four jitted round functions (`target_prefix`, `target_suffix`, `draft_rollout`, `verify`, in
`mirror_jax.rounds`), `draft_select`, `draft_propose` and `Placement` are exported for use from your
own JAX code. Imports are lazy so that
``XLA_FLAGS`` (e.g. virtual host devices) can still be set after ``import mirror_jax``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "generate": "mirror_jax.engine.api",
    "ConfigError": "mirror_jax.engine.api",
    "PerformanceHint": "mirror_jax.engine.api",
    "Placement": "mirror_jax.engine.placement",
    "PlacementError": "mirror_jax.engine.placement",
    "target_prefix": "mirror_jax.rounds",
    "target_suffix": "mirror_jax.rounds",
    "target_full": "mirror_jax.rounds",
    "draft_rollout": "mirror_jax.rounds",
    "verify": "mirror_jax.rounds",
    "draft_select": "mirror_jax.rounds",
    "draft_propose": "mirror_jax.rounds",
    "generate_ar": "mirror_jax.engine.autoregressive",
    "SamplingParams": "mirror_jax.sampling",
    "SamplingArrays": "mirror_jax.sampling",
    "ModelConfig": "mirror_jax.config",
    "KVCache": "mirror_jax.kv_cache",
    "init_cache": "mirror_jax.kv_cache",
    "CacheCapacityError": "mirror_jax.kv_cache",
    "default_pair": "mirror_jax.loading",
    "load_gguf": "mirror_jax.loading",
    "load_hf_dir": "mirror_jax.loading",
    "LoadedModel": "mirror_jax.loading",
    "enable_compile_cache": "mirror_jax.compile_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mirror_jax' has no attribute {name!r}")
