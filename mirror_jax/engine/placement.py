"""Where the target and the draft live, and the one place arrays cross between them.

A `Placement` names the target's device and the draft's device. Build one from devices or from a
string::

    Placement.parse("cpu:0,cpu:1")   # target on host device 0, draft on host device 1
    Placement.parse("gpu:0,cpu:0")   # target on the GPU, draft on the host CPU
    Placement.parse("tpu:0,tpu:1")   # two TPU cores
    Placement.parse("cpu:0")         # one device: the same code path, serialised
    Placement.parse("cpu:0+cpu:1+cpu:2,cpu:3")   # target sharded over 3 devices, draft on the 4th
    Placement.parse("gpu:0+gpu:1,gpu:2")           # two GPUs for the target, a third for the draft

Two host devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` set before jax is
imported. Parameters are placed once (`place_target`, `place_draft`: a tied LM head stays shared
with the embedding; on a device group ``a+b+...`` the model is sharded tensor-parallel, see
`mirror_jax.engine.sharding`), caches are created on their device (group); every
cross-device hand-off in the engine goes through `to_target` / `to_draft`, so the token channel
is exactly those calls.
"""

from __future__ import annotations

import dataclasses

import jax

from mirror_jax.kv_cache import init_cache
from mirror_jax.params import device_put_shared

_PLATFORM_ALIASES = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu", "tpu": "tpu"}


class PlacementError(ValueError):
    """A placement names devices that do not exist or is malformed."""


def _devices_of(platform: str) -> list:
    try:
        return jax.devices(platform)
    except RuntimeError:
        return []


def parse_device(spec: str):
    """'cpu:1' -> the jax device. Raises PlacementError with the devices that do exist."""
    spec = spec.strip().lower()
    name, _, idx = spec.partition(":")
    if name not in _PLATFORM_ALIASES:
        raise PlacementError(f"unknown device kind {name!r} in {spec!r}; use cpu:N, gpu:N or tpu:N")
    try:
        index = int(idx) if idx else 0
    except ValueError:
        raise PlacementError(f"device index in {spec!r} is not an integer") from None
    devs = _devices_of(_PLATFORM_ALIASES[name])
    if index < 0 or index >= len(devs):
        have = ", ".join(f"{d.platform}:{d.id}" for d in jax.devices()) or "none"
        hint = ""
        if name == "cpu":
            hint = (
                " For several host devices set XLA_FLAGS=--xla_force_host_platform_device_count=2 "
                "before importing jax."
            )
        raise PlacementError(f"device {spec!r} does not exist (available: {have}).{hint}")
    return devs[index]


def parse_group(spec: str) -> tuple:
    """'cpu:0+cpu:1' -> (device, device): one device or a tensor-parallel group."""
    devs = tuple(parse_device(p) for p in spec.split("+"))
    if len(set(devs)) != len(devs):
        raise PlacementError(f"device group {spec!r} names a device twice")
    if len({d.platform for d in devs}) != 1:
        raise PlacementError(f"device group {spec!r} mixes platforms; a group shards one model over one kind of device")
    return devs


def _name(group) -> str:
    return "+".join(f"{d.platform}:{d.id}" for d in group)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The target's device group and the draft's. A group of one is a plain device; a group of
    several shards the model tensor-parallel over it (`mirror_jax.engine.sharding`)."""

    target_group: tuple
    draft_group: tuple

    @classmethod
    def on(cls, target, draft=None) -> Placement:
        """From devices (or tuples of devices); `draft` defaults to the target's."""
        t = tuple(target) if isinstance(target, tuple | list) else (target,)
        d = t if draft is None else tuple(draft) if isinstance(draft, tuple | list) else (draft,)
        return cls(t, d)

    @classmethod
    def parse(cls, spec: str | Placement | None) -> Placement:
        """From 'target,draft' where each side is a device ('cpu:1') or a group ('cpu:0+cpu:1'); a
        single side puts both models on it; an existing Placement; or None (the default device)."""
        if isinstance(spec, Placement):
            return spec
        if spec is None or spec == "":
            return cls.on(jax.devices()[0])
        if not isinstance(spec, str):
            raise PlacementError(f"placement must be a string like 'cpu:0,cpu:1' or a Placement, got {spec!r}")
        parts = [p for p in spec.split(",") if p.strip()]
        if len(parts) not in (1, 2):
            raise PlacementError(f"placement {spec!r} must name one device (group) or two ('target,draft')")
        groups = [parse_group(p) for p in parts]
        return cls(groups[0], groups[-1])

    @property
    def target(self) -> jax.Device:
        """The target's (first) device."""
        return self.target_group[0]

    @property
    def draft(self) -> jax.Device:
        """The draft's (first) device."""
        return self.draft_group[0]

    @property
    def separate(self) -> bool:
        """True when target and draft run on different devices (overlap is possible)."""
        return self.target_group != self.draft_group

    @property
    def sharded(self) -> bool:
        return len(self.target_group) > 1 or len(self.draft_group) > 1

    def describe(self) -> str:
        s = f"target={_name(self.target_group)}, draft={_name(self.draft_group)}"
        return s + ("" if self.separate else " (one device: serialised)" if not self.sharded else " (one group)")

    @staticmethod
    def _sharding(group):
        if len(group) == 1:
            return group[0]
        from mirror_jax.engine.sharding import replicated

        return replicated(group)

    @property
    def target_sharding(self):
        """Where small target-side arrays go: the device, or replicated over the group."""
        return self._sharding(self.target_group)

    @property
    def draft_sharding(self):
        return self._sharding(self.draft_group)

    def to_target(self, tree):
        """Token channel draft -> target (and the initial placement of target state)."""
        return jax.device_put(tree, self.target_sharding)

    def to_draft(self, tree):
        """Token channel target -> draft (and the initial placement of draft state)."""
        return jax.device_put(tree, self.draft_sharding)

    @staticmethod
    def _place(group, cfg, params):
        if len(group) == 1:
            return cfg, device_put_shared(params, group[0])
        from mirror_jax.engine.sharding import shard_params

        return shard_params(cfg, params, group)

    def place_target(self, cfg, params):
        """The target's parameters onto its device (group), once per call. Returns (cfg, params):
        on a group the fused weights are regrouped per shard (``cfg.tp_shards``) and sharded."""
        return self._place(self.target_group, cfg, params)

    def place_draft(self, cfg, params):
        """The draft's parameters onto its device (group), once per call; see `place_target`."""
        return self._place(self.draft_group, cfg, params)

    def params_to_target(self, params):
        """The target's parameters onto its (single) device (shared leaves stay shared)."""
        return device_put_shared(params, self._single(self.target_group))

    def params_to_draft(self, params):
        """The draft's parameters (or an SS adapter) onto its (single) device, once per call."""
        return device_put_shared(params, self._single(self.draft_group))

    @staticmethod
    def _single(group):
        if len(group) != 1:
            raise PlacementError(f"{_name(group)} is a device group: place a model on it with place_target/place_draft")
        return group[0]

    @staticmethod
    def _cache(group, cfg, batch, capacity, dtype):
        if len(group) == 1:
            return init_cache(cfg, batch, capacity, dtype, device=group[0])
        from mirror_jax.engine.sharding import init_sharded_cache

        return init_sharded_cache(cfg, batch, capacity, dtype, group)

    def target_cache(self, cfg, batch: int, capacity: int, dtype):
        """A zero KV cache for the target on its device (group: sharded over K/V heads)."""
        return self._cache(self.target_group, cfg, batch, capacity, dtype)

    def draft_cache(self, cfg, batch: int, capacity: int, dtype):
        return self._cache(self.draft_group, cfg, batch, capacity, dtype)


def device_of(x) -> jax.Device:
    """The single device holding array `x` (for tests and assertions)."""
    (d,) = x.devices()
    return d
