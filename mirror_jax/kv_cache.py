"""Static-shape KV cache with per-row lengths and rollback.

Layout: per layer ``k, v: [B, H_kv, S, D]``, plus ``lengths: [B]`` int32, the number of committed
tokens of each row. Slot == position: the token at position p of row b lives in slot p.

Heads before slots (as jax-ml/jax-llm-examples lays out its caches): attention contracts each
(row, KV head) with a contiguous [S, D] slab. With slots before heads XLA:CPU copies the cache into
that order for every layer once the batch has more than one row: 5.9 vs 1.7 ms per layer at B = 8,
S = 1024 (`experiments/probe_attention.py`).

Protocol (worked example, one row, capacity S = 8)::

    lengths = 3                       # slots 0..2 hold committed tokens
    forward(T=4 new tokens)           # writes slots 3..6, lengths stays 3 (tentative)
    commit(n=2)                       # lengths = 5: slots 3,4 are now committed
                                      # slots 5,6 still hold rejected keys, but they are
                                      # overwritten by the next forward before being read:
    forward(T=2)                      # writes slots 5,6 again; queries at position p see slots <= p

Rollback is therefore "commit fewer tokens". Attention masks are ``slot <= query position``: a
stale slot above the row's length is always rewritten by the same forward that could see it.
Writes use ``mode="drop"`` so an out-of-range slot is never written on device; the host checks
headroom first (`check_headroom`) and raises `CacheCapacityError` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirror_jax.config import ModelConfig

SLOT_AXIS = 2  # the slot (position) axis of a [B, H_kv, S, D] cache buffer


class CacheCapacityError(ValueError):
    """A write would go past the end of the KV cache."""


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, H_kv, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, H_kv, S, D]
    lengths: jax.Array  # [B] int32, committed tokens per row

    @property
    def capacity(self) -> int:
        return self.k[0].shape[SLOT_AXIS]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32, device=None) -> KVCache:
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)

    # Made on `device` itself (no default-device buffer and copy); one buffer per layer and per K/V,
    # since the decode steps donate them.
    z = lambda: jnp.zeros(shape, dtype, device=device)
    return KVCache(
        k=tuple(z() for _ in range(cfg.num_layers)),
        v=tuple(z() for _ in range(cfg.num_layers)),
        lengths=jnp.zeros((batch,), jnp.int32, device=device),
    )


def write_slots(buf: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write ``new: [B, T, H, D]`` (token-major, as the projections give it) into ``buf: [B, H, S, D]``
    at ``positions: [B, T]``.

    Slots outside ``[0, S)`` are dropped (never written)."""
    b = jnp.arange(buf.shape[0])[:, None]  # [B, 1]
    # The two index arrays are split by a slice, so (numpy rules) the indexed view is [B, T, H, D].
    return buf.at[b, :, positions].set(new.astype(buf.dtype), mode="drop")


def commit(cache: KVCache, n) -> KVCache:
    """Mark `n` (scalar or [B]) of the tentatively written tokens as committed."""
    return cache.replace(lengths=cache.lengths + jnp.asarray(n, jnp.int32))


def set_lengths(cache: KVCache, lengths) -> KVCache:
    """Roll back (or forward) to explicit per-row lengths."""
    return cache.replace(lengths=jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), cache.lengths.shape))


def check_headroom(lengths, n_new: int, capacity: int, what: str = "KV cache") -> None:
    """Host-side check that writing `n_new` tokens after `lengths` fits in `capacity` slots."""
    need = int(np.max(np.asarray(lengths))) + int(n_new)
    if need > capacity:
        raise CacheCapacityError(
            f"{what} capacity exceeded: {need} slots needed but the cache holds {capacity}; "
            f"create the cache with a larger `max_len`/`capacity` or generate fewer tokens"
        )
