"""A persistent XLA compilation cache, scoped to the machine and the jax build that wrote it.

The first `generate` call of a process compiles every program it needs (prefills, decode steps,
the draft's windows, the verification forwards): on a 2-core CPU about 30-40 s for sd on the
default pair, longer than decoding 96 tokens. JAX can keep compiled executables on disk and load
them in later processes (``jax_compilation_cache_dir``); `enable_compile_cache` turns that on for a
directory whose name fingerprints what an executable depends on beyond the program itself:

* the jax and jaxlib versions (an executable written by one jaxlib can crash another's loader);
* on CPU, the host's vector-ISA flags and CPU model (XLA:CPU compiles for the host's instruction
  set; a home directory shared by machines with different CPUs must not hand an avx512 executable
  to an AVX2 machine).

The command line (``mirror-jax generate`` / ``bench``; ``--no-compile-cache`` to skip) calls it
before anything compiles; from your own code, call it once, best before the first jitted call::

    import mirror_jax
    mirror_jax.enable_compile_cache()            # ~/.cache/mirror_jax/xla/<fingerprint>
    res = mirror_jax.generate(target, [ids], 64, method="sd", draft=draft)

``MIRROR_JAX_COMPILE_CACHE=off`` (or 0, none, false, no) disables it; any other value is the base
directory to use instead of ``$XDG_CACHE_HOME/mirror_jax/xla``. A cache directory the user set for
jax already (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept as it is. Nothing here changes
what a program computes: a cached executable is the one the compiler would have produced.

Not a timing knob: benchmarks time warm runs. jax reports a program loaded from the cache under
the same event as a backend compile, so ``bench.runner.timed_without_compiles`` redoes a run that
loaded programs exactly as one that compiled them, and measured speeds do not change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from pathlib import Path

ENV = "MIRROR_JAX_COMPILE_CACHE"
OFF_VALUES = ("0", "off", "none", "false", "no")
MIN_COMPILE_SECS = 1.0  # programs that compile faster than this are not worth a disk entry
MAX_BYTES = 2 << 30  # least recently used entries go beyond this (where `filelock` is installed, as jax needs)


def compile_cache_disabled() -> bool:
    """True when ``MIRROR_JAX_COMPILE_CACHE`` says off (0, off, none, false, no)."""
    return os.environ.get(ENV, "").strip().lower() in OFF_VALUES


def host_fingerprint() -> str:
    """A short name for what a compiled executable depends on here: jax/jaxlib versions, the machine
    architecture and a hash of the CPU model and its vector-ISA flags.

    >>> host_fingerprint()  # doctest: +SKIP
    'jax0.10.2-jaxlib0.10.2-x86_64-3f9c2a1b7d04'
    """
    import jax
    import jaxlib

    from mirror_jax.layout import cpu_flags, cpu_model

    cpu = hashlib.sha256(f"{cpu_model()}|{' '.join(cpu_flags())}".encode()).hexdigest()[:12]
    return f"jax{jax.__version__}-jaxlib{jaxlib.__version__}-{platform.machine() or 'unknown'}-{cpu}"


def default_cache_base() -> Path:
    """``$MIRROR_JAX_COMPILE_CACHE`` when it names a directory, else ``$XDG_CACHE_HOME/mirror_jax/xla``
    (``~/.cache/mirror_jax/xla``)."""
    env = os.environ.get(ENV, "").strip()
    if env and env.lower() not in OFF_VALUES:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mirror_jax" / "xla"


def enable_compile_cache(base: str | os.PathLike | None = None, *, min_compile_secs: float = MIN_COMPILE_SECS,
                         max_bytes: int = MAX_BYTES) -> Path | None:
    """Keep compiled XLA programs under ``base / host_fingerprint()`` so later processes load them.

    Programs compiled from then on are written and read there (best called before the first jitted
    call, so that every program is). Returns the directory in use; None when disabled by
    ``MIRROR_JAX_COMPILE_CACHE`` or when the directory cannot be created (then the process simply
    compiles as before). A cache directory already configured for jax is kept and returned.
    `min_compile_secs`: programs compiled faster are not stored; `max_bytes`: the directory's size
    beyond which the least recently used entries are deleted."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    if base is None and compile_cache_disabled():
        return None
    path = (Path(base).expanduser() if base is not None else default_cache_base()) / host_fingerprint()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    if importlib.util.find_spec("filelock") is not None:  # jax's LRU eviction locks the directory with it
        jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    compilation_cache.reset_cache()  # JAX checks once per process whether a cache is in use: check again
    return path
