"""Where the target and the draft live, and the one place arrays cross between them.

A `Placement` names the target's device and the draft's device. Build one from devices or from a
string::

    Placement.parse("cpu:0,cpu:1")   # target on host device 0, draft on host device 1
    Placement.parse("gpu:0,cpu:0")   # target on the GPU, draft on the host CPU
    Placement.parse("tpu:0,tpu:1")   # two TPU cores
    Placement.parse("cpu:0")         # one device: the same code path, serialised

Two host devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` set before jax is
imported. Parameters are `device_put` once (`params_to_target`, `params_to_draft`, which keep a
tied LM head shared with the embedding), caches are created on their device; every
cross-device hand-off in the engine goes through `to_target` / `to_draft`, so the token channel
is exactly those calls.
"""

from __future__ import annotations

import dataclasses

import jax

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


@dataclasses.dataclass(frozen=True)
class Placement:
    target: jax.Device
    draft: jax.Device

    @classmethod
    def parse(cls, spec: str | Placement | None) -> Placement:
        """From 'target_dev,draft_dev', a single 'dev' (both on it), an existing Placement, or None
        (the default device for both)."""
        if isinstance(spec, Placement):
            return spec
        if spec is None or spec == "":
            d = jax.devices()[0]
            return cls(d, d)
        if not isinstance(spec, str):
            raise PlacementError(f"placement must be a string like 'cpu:0,cpu:1' or a Placement, got {spec!r}")
        parts = [p for p in spec.split(",") if p.strip()]
        if len(parts) == 1:
            d = parse_device(parts[0])
            return cls(d, d)
        if len(parts) != 2:
            raise PlacementError(f"placement {spec!r} must name one device or two ('target,draft')")
        return cls(parse_device(parts[0]), parse_device(parts[1]))

    @property
    def separate(self) -> bool:
        """True when target and draft run on different devices (overlap is possible)."""
        return self.target != self.draft

    def describe(self) -> str:
        t, d = self.target, self.draft
        s = f"target={t.platform}:{t.id}, draft={d.platform}:{d.id}"
        return s + ("" if self.separate else " (one device: serialised)")

    def to_target(self, tree):
        """Token channel draft -> target (and the initial placement of target state)."""
        return jax.device_put(tree, self.target)

    def to_draft(self, tree):
        """Token channel target -> draft (and the initial placement of draft state)."""
        return jax.device_put(tree, self.draft)

    def params_to_target(self, params):
        """The target's parameters onto its device, once per call (shared leaves stay shared)."""
        return device_put_shared(params, self.target)

    def params_to_draft(self, params):
        """The draft's parameters (or an SS adapter) onto its device, once per call."""
        return device_put_shared(params, self.draft)


def device_of(x) -> jax.Device:
    """The single device holding array `x` (for tests and assertions)."""
    (d,) = x.devices()
    return d
