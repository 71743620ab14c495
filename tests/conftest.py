"""Shared pytest configuration and fixtures.

Helpers live in the plain module `tests/helpers.py` (``from helpers import make_tiny_hf_model``)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import make_tiny_hf_model  # noqa: E402


@pytest.fixture
def tiny_hf_model(tmp_path):
    """Factory fixture: ``tiny_hf_model(arch, **overrides) -> (path, hf_model)`` saved under tmp_path."""

    def make(arch: str = "qwen2", **overrides):
        return make_tiny_hf_model(tmp_path / f"{arch}_model", arch, **overrides)

    return make
