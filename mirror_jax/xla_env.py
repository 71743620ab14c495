"""Host-device flags for XLA, set before jax is imported (this module imports no jax).

Two or more virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) exist
only if the flag is set before jax initialises. Both command lines and the test configuration call
`ensure_host_devices` first::

    from mirror_jax.xla_env import ensure_host_devices
    ensure_host_devices("cpu:0,cpu:1")   # or ensure_host_devices(2)
    import jax                           # now jax.devices("cpu") has two devices
"""

from __future__ import annotations

import os
import re
import sys

FLAG = "xla_force_host_platform_device_count"


def host_devices_needed(placement: str | int | None) -> int:
    """How many host CPU devices a placement string names (``"cpu:0,cpu:3"`` -> 4); an int is
    returned as is; None -> 1."""
    if placement is None:
        return 1
    if isinstance(placement, int):
        return placement
    ids = [int(m) for m in re.findall(r"cpu:(\d+)", placement.lower())]
    return max(ids, default=0) + 1


def ensure_host_devices(placement: str | int | None) -> bool:
    """Ask XLA for enough host devices for `placement`, unless jax is already imported or the flag
    is already set. Returns True when the flag was set here."""
    n = host_devices_needed(placement)
    flags = os.environ.get("XLA_FLAGS", "")
    if n <= 1 or "jax" in sys.modules or FLAG in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --{FLAG}={n}".strip()
    return True
