"""Save / restore SS adapters (`SSParams`) with orbax, plus validated metadata.

Layout of ``checkpoints/<name>/``::

    params/          orbax StandardCheckpointer directory: flat dict {"stream_embed": ...,
                     "lora.0.a_q": ..., ...} of float arrays
    metadata.json    {"format": 2, "base_fingerprint": ..., "base_config": {...},
                      "ss_config": {"num_streams", "num_msa_layers", "lora_rank"},
                      "leaves": {name: [shape, dtype]}, "files": {relpath: sha256},
                      + caller extras (steps, data description, final losses, ...)}

Saving is atomic: everything is written to ``<parent>/.<name>.tmp-<pid>`` and renamed into place
(an existing checkpoint of the same name is replaced only after the new one is complete).
Restoring checks, in order: the directory and metadata exist and parse, every file listed in
``files`` exists with the recorded sha256 (so a truncated or deleted file is reported as
`CheckpointCorruptedError`), and the metadata matches the base model and SS config the caller
gives (`CheckpointMismatchError` listing every difference).

The base fingerprint hashes the `ModelConfig` plus every parameter leaf's shape, dtype and a fixed
strided sample of up to 4096 values (cheap even for a 0.5B model, and different for any two
differently trained models). Format 2 takes it over the ``[out, in]`` weights mirror_jax stores
now; format 1 checkpoints (weights were stored ``[in, out]``) are verified against the same sample
of the transposed matrices, so they still load: the adapter's own parameters (LoRA factors,
stream embeddings) do not depend on the base layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.files import checkpoint_search_path, sha256_file
from mirror_jax.params import ModelParams
from mirror_jax.ss.model import SSConfig, SSParams, init_ss_params

FORMAT_VERSION = 2
_FORMATS = (1, 2)
_TRANSPOSED_IN_FORMAT_1 = ("w_qkv", "w_o", "w_gate_up", "w_down", "lm_head")
DEFAULT_ADAPTER_NAME = "ss_default_draft"


class CheckpointError(RuntimeError):
    """Base class of SS checkpoint errors."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was trained for a different base model or SS configuration."""


class CheckpointCorruptedError(CheckpointError):
    """The checkpoint directory is incomplete or its files do not match their recorded hashes."""


def base_fingerprint(cfg: ModelConfig, params: ModelParams, samples: int = 4096, *, version: int = FORMAT_VERSION
                     ) -> str:
    """sha256 over the config and a strided sample of every parameter leaf. ``version=1``: as the
    format-1 checkpoints took it, with the weight matrices in their old ``[in, out]`` layout (read
    through a transposed index, nothing is copied)."""
    h = hashlib.sha256(repr(dataclasses.asdict(cfg)).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        legacy = version == 1 and a.ndim == 2 and getattr(path[-1], "name", None) in _TRANSPOSED_IN_FORMAT_1
        shape = a.shape[::-1] if legacy else a.shape
        idx = np.linspace(0, a.size - 1, num=min(samples, a.size)).astype(np.int64)
        if legacy:  # element idx of the [in, out] matrix is a[j, i] of the stored [out, in] one
            i, j = np.divmod(idx, shape[1])
            vals = a[j, i]
        else:
            vals = a.reshape(-1)[idx]
        h.update(f"{jax.tree_util.keystr(path)}|{shape}|{a.dtype}".encode())
        h.update(np.ascontiguousarray(vals.astype(np.float32)).tobytes())
    return h.hexdigest()


def _flatten(ssp: SSParams) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(ssp)[0]:
        name = ".".join(str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k)))) for k in path)
        out[name] = np.asarray(leaf)
    return out


def _unflatten(template: SSParams, flat: dict[str, Any]) -> SSParams:
    names = list(_flatten(template))
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(flat[n]) for n in names])


def _manifest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted((root / "params").rglob("*")) if p.is_file()}


def save_ss_checkpoint(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: ModelParams,
    sscfg: SSConfig,
    ssp: SSParams,
    extra: dict | None = None,
    *,
    fingerprint: str | None = None,
) -> Path:
    """Atomically write `ssp` + metadata to `directory` (e.g. ``checkpoints/<name>``).

    `extra` (JSON-serialisable: steps, data description, final losses, ...) is merged into the
    metadata. Returns the final path."""
    import orbax.checkpoint as ocp

    final = Path(directory).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    flat = _flatten(ssp)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", flat)
        ckptr.wait_until_finished()
    meta = {
        "format": FORMAT_VERSION,
        "base_fingerprint": fingerprint or base_fingerprint(cfg, params),
        "base_config": dataclasses.asdict(cfg),
        "ss_config": dataclasses.asdict(sscfg),
        "leaves": {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()},
        "files": _manifest(tmp),
        **(extra or {}),
    }
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def read_metadata(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointCorruptedError(f"SS checkpoint directory {d} does not exist")
    mp = d / "metadata.json"
    if not mp.is_file():
        raise CheckpointCorruptedError(f"SS checkpoint {d} has no metadata.json (incomplete or not a checkpoint)")
    try:
        return json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorruptedError(f"SS checkpoint {d}: metadata.json is not valid JSON ({e})") from e


def _diffs(meta: dict, cfg: ModelConfig, sscfg: SSConfig | None, fingerprint: str) -> list[str]:
    out = []
    if meta.get("format") not in _FORMATS:
        out.append(f"format version {meta.get('format')} is not one of {_FORMATS}")
    want_cfg = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    got_cfg = meta.get("base_config", {})
    for k in sorted(set(want_cfg) | set(got_cfg)):
        if want_cfg.get(k) != got_cfg.get(k):
            out.append(f"base config {k}: checkpoint has {got_cfg.get(k)!r}, model has {want_cfg.get(k)!r}")
    if meta.get("base_fingerprint") != fingerprint:
        out.append(
            f"base model weights differ (fingerprint {str(meta.get('base_fingerprint'))[:12]}... in the "
            f"checkpoint, {fingerprint[:12]}... for the given model)"
        )
    if sscfg is not None:
        got = meta.get("ss_config", {})
        for k, v in dataclasses.asdict(sscfg).items():
            if got.get(k) != v:
                out.append(f"SS config {k}: checkpoint has {got.get(k)!r}, requested {v!r}")
    return out


def restore_ss_checkpoint(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: ModelParams,
    sscfg: SSConfig | None = None,
    *,
    fingerprint: str | None = None,
) -> tuple[SSConfig, SSParams, dict]:
    """Load an adapter for the base model (cfg, params). `sscfg=None` takes the checkpoint's SS
    config. Returns (sscfg, ssp, metadata). Raises CheckpointCorruptedError /
    CheckpointMismatchError with the reason."""
    import orbax.checkpoint as ocp

    d = Path(directory).resolve()
    meta = read_metadata(d)
    files = meta.get("files")
    if not files:
        raise CheckpointCorruptedError(f"SS checkpoint {d}: metadata lists no parameter files")
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointCorruptedError(f"SS checkpoint {d}: file {rel} is missing")
        if sha256_file(p) != digest:
            raise CheckpointCorruptedError(f"SS checkpoint {d}: file {rel} is corrupted (sha256 mismatch)")
    fmt = meta.get("format") if meta.get("format") in _FORMATS else FORMAT_VERSION
    diffs = _diffs(meta, cfg, sscfg, fingerprint or base_fingerprint(cfg, params, version=fmt))
    if diffs:
        raise CheckpointMismatchError(
            f"SS checkpoint {d} does not match the given model/config:\n  - " + "\n  - ".join(diffs)
        )
    sscfg = sscfg or SSConfig(**meta["ss_config"])
    template = init_ss_params(cfg, sscfg, params)
    flat_t = _flatten(template)
    if {k: [list(v.shape), str(v.dtype)] for k, v in flat_t.items()} != meta["leaves"]:
        raise CheckpointMismatchError(f"SS checkpoint {d}: parameter names/shapes differ from SSConfig {sscfg}")
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_t.items()}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            flat = ckptr.restore(d / "params", abstract)
    except Exception as e:  # orbax/tensorstore raise various types for damaged data
        raise CheckpointCorruptedError(f"SS checkpoint {d}: orbax could not read the parameters ({e})") from e
    return sscfg, _unflatten(template, flat), meta


def default_adapter_dirs(checkpoints: str | os.PathLike | None = None) -> list[Path]:
    """Where the committed adapter for the default draft is looked for, in order (see
    `mirror_jax.files.checkpoint_search_path`: the argument, $MIRROR_JAX_CHECKPOINTS, the checkout's
    ``checkpoints/``, ``./checkpoints``)."""
    return [p / DEFAULT_ADAPTER_NAME for p in checkpoint_search_path(checkpoints)]


def load_default_ss_adapter(draft, checkpoints: str | os.PathLike | None = None):
    """The committed SS adapter for `draft` (an object with `.cfg` and `.params`), or None.

    Takes the first of `default_adapter_dirs(checkpoints)` that holds one; returns None when none
    does or it was trained for another base model. Returns (sscfg, ssp, metadata) otherwise, with
    the directory it came from as ``metadata["directory"]``."""
    d = next((p for p in default_adapter_dirs(checkpoints) if (p / "metadata.json").is_file()), None)
    if d is None:
        return None
    try:
        sscfg, ssp, meta = restore_ss_checkpoint(d, draft.cfg, draft.params)
    except CheckpointMismatchError:
        return None
    return sscfg, ssp, {**meta, "directory": str(d)}
