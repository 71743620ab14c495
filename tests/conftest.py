"""Shared pytest configuration and fixtures.

Test helpers live in `tests/helpers.py` (``from tests.helpers import make_tiny_hf_model``); tiny
random models for engine tests in `mirror_jax.testing`."""

from __future__ import annotations

import os

from mirror_jax.xla_env import ensure_host_devices

# Two virtual host devices for placement tests; must be set before jax is first imported.
ensure_host_devices(2)
# Tests call the command line in this process: keep its compilation cache off (no writes under the
# user's ~/.cache); tests/test_compile_cache.py opts in with its own directories.
os.environ["MIRROR_JAX_COMPILE_CACHE"] = "off"

import pytest  # noqa: E402

from tests.helpers import make_tiny_hf_model  # noqa: E402


@pytest.fixture
def tiny_hf_model(tmp_path):
    """Factory fixture: ``tiny_hf_model(arch, **overrides) -> (path, hf_model)`` saved under tmp_path."""

    def make(arch: str = "qwen2", **overrides):
        return make_tiny_hf_model(tmp_path / f"{arch}_model", arch, **overrides)

    return make


def pytest_collection_modifyitems(config, items):
    """Skip `@pytest.mark.slow` (real-model) tests unless selected with ``-m slow`` (or any ``-m``
    expression) or ``MIRROR_JAX_RUN_SLOW=1``: a plain ``pytest`` stays fast and never loads the
    multi-GB default pair behind the user's back."""
    if config.getoption("markexpr") or os.environ.get("MIRROR_JAX_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="real-model test: run with `pytest -m slow` (serially, ~10 GB RAM)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test file. The full suite compiles several hundred
    programs in one process; late in such a run XLA:CPU (jax 0.10.2) segfaulted inside backend
    compilation of programs that compile fine on their own (twice in `test_exit.py`, in different
    tests). Releasing the executables of finished files keeps the process's compiled code small."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
