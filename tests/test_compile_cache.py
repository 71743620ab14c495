"""The persistent compilation cache (`mirror_jax.compile_cache`): a second process loads the first
one's programs instead of compiling them and decodes the same tokens; the directory is scoped to the
jax build and the CPU; the environment switch and the CLI flag turn it off.

The test session itself runs with ``MIRROR_JAX_COMPILE_CACHE=off`` (conftest), so the processes
started here opt in with an explicit directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror_jax import compile_cache as cc

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
import jax
from mirror_jax.compile_cache import enable_compile_cache

path = enable_compile_cache(sys.argv[1], min_compile_secs=0.0)
seen = {"hits": 0, "compiles": 0}


def on_event(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        seen["hits"] += 1


def on_duration(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        seen["compiles"] += 1


jax.monitoring.register_event_listener(on_event)
jax.monitoring.register_event_duration_secs_listener(on_duration)
from mirror_jax.engine.api import generate
from mirror_jax.testing import noisy_pair, random_prompts

target, draft = noisy_pair()
res = generate(target, random_prompts(2, seed=3), 12, method="sd", draft=draft, gamma=3)
print(json.dumps({"path": str(path), "tokens": res.tokens, **seen}))
"""


def _run(cache_base: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MIRROR_JAX_COMPILE_CACHE", None)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(cache_base)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_first_ones_programs(tmp_path):
    first = _run(tmp_path)
    path = Path(first["path"])
    assert path.parent == tmp_path and path.name == cc.host_fingerprint()
    assert first["hits"] == 0 and first["compiles"] > 0
    entries = [f for f in path.iterdir() if f.name.endswith("-cache")]  # (beside them: access times, a lock file)
    assert len(entries) == first["compiles"], "the first process did not store every program it compiled"
    second = _run(tmp_path)
    assert second["tokens"] == first["tokens"]  # a loaded program computes what the compiled one did
    # jax reports a program loaded from disk as a (fast) backend compile too: every one was a load
    assert second["hits"] == len(entries) and second["compiles"] == second["hits"], (first, second)


def test_fingerprint_names_the_jax_build_and_the_cpu(monkeypatch):
    import jax
    import jaxlib

    import mirror_jax.layout as layout

    fp = cc.host_fingerprint()
    assert f"jax{jax.__version__}" in fp and f"jaxlib{jaxlib.__version__}" in fp
    monkeypatch.setattr(layout, "cpu_flags", lambda: ["avx", "avx2", "fma"])
    avx2 = cc.host_fingerprint()
    monkeypatch.setattr(layout, "cpu_flags", lambda: ["avx", "avx2", "avx512f", "fma"])
    assert cc.host_fingerprint() != avx2  # a cache written on an avx512 CPU is never read on an AVX2 one
    monkeypatch.setattr(layout, "cpu_model", lambda: "another CPU")
    assert cc.host_fingerprint() not in (avx2, fp)


@pytest.mark.parametrize("value", ["off", "0", "None", "false", " OFF "])
def test_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(cc.ENV, value)
    assert cc.compile_cache_disabled()
    assert cc.enable_compile_cache() is None  # nothing configured, nothing written


def test_environment_and_xdg_choose_the_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(cc.ENV, str(tmp_path / "mine"))
    assert not cc.compile_cache_disabled() and cc.default_cache_base() == tmp_path / "mine"
    monkeypatch.delenv(cc.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_cache_base() == tmp_path / "xdg" / "mirror_jax" / "xla"


def test_cli_flag(capsys):
    import argparse

    import jax

    from mirror_jax.bench.cli import add_bench_args, use_compile_cache
    from mirror_jax.cli import main

    for command in ("generate", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--no-compile-cache" in capsys.readouterr().out
    p = argparse.ArgumentParser()
    add_bench_args(p)
    args = p.parse_args(["--tiny", "--no-compile-cache"])
    assert args.no_compile_cache
    use_compile_cache(args)  # skipped: nothing configured
    assert not jax.config.jax_compilation_cache_dir
