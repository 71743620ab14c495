"""Orbax checkpoints of small adapters (SS streams, exit heads) tied to a base model.

Layout of ``checkpoints/<name>/``::

    params/          orbax StandardCheckpointer directory: a flat dict {"a.b.c": array, ...}
    metadata.json    {"format", "kind", "base_fingerprint", "base_config", "leaves": {name: [shape,
                      dtype]}, "files": {relpath: sha256}, + the caller's fields}

`save_flat` is atomic: everything is written to ``<parent>/.<name>.tmp-<pid>`` and renamed into
place (an existing checkpoint of the same name is replaced only after the new one is complete).
`verified_metadata` checks that the directory and metadata exist and parse and that every file
listed in ``files`` exists with its recorded sha256 (`CheckpointCorruptedError` otherwise);
`base_diffs` lists every way the checkpoint's base model differs from the caller's
(`CheckpointMismatchError` is raised by the callers with that list).

The base fingerprint hashes the `ModelConfig` plus every parameter leaf's shape, dtype and a fixed
strided sample of up to 4096 values (cheap even for a 1.5B model, and different for any two
differently trained models).
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
from mirror_jax.files import sha256_file
from mirror_jax.layout import plain_params
from mirror_jax.params import ModelParams

_TRANSPOSED_IN_FORMAT_1 = ("w_qkv", "w_o", "w_gate_up", "w_down", "lm_head")


class CheckpointError(RuntimeError):
    """Base class of adapter checkpoint errors."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was trained for a different base model or adapter configuration."""


class CheckpointCorruptedError(CheckpointError):
    """The checkpoint directory is incomplete or its files do not match their recorded hashes."""


def base_fingerprint(cfg: ModelConfig, params: ModelParams, samples: int = 4096, *, version: int = 2) -> str:
    """sha256 over the config and a strided sample of every parameter leaf. ``version=1``: as the
    format-1 SS checkpoints took it, with the weight matrices in their old ``[in, out]`` layout
    (read through a transposed index, nothing is copied)."""
    h = hashlib.sha256(repr(dataclasses.asdict(cfg)).encode())
    for path, a in jax.tree_util.tree_flatten_with_path(plain_params(params))[0]:  # whatever the layout
        # Only the sampled values leave the device (not a 1.5B model's weights, on a GPU).
        legacy = version == 1 and a.ndim == 2 and getattr(path[-1], "name", None) in _TRANSPOSED_IN_FORMAT_1
        shape = a.shape[::-1] if legacy else a.shape
        idx = np.linspace(0, a.size - 1, num=min(samples, a.size)).astype(np.int64)
        if legacy:  # element idx of the [in, out] matrix is a[j, i] of the stored [out, in] one
            i, j = np.divmod(idx, shape[1])
            vals = np.asarray(a[j, i])
        else:
            vals = np.asarray(a.reshape(-1)[idx])
        h.update(f"{jax.tree_util.keystr(path)}|{shape}|{np.dtype(a.dtype)}".encode())
        h.update(np.ascontiguousarray(vals.astype(np.float32)).tobytes())
    return h.hexdigest()


def flatten_tree(tree) -> dict[str, np.ndarray]:
    """{"a.0.b": array} for every leaf of a pytree (dataclass fields, sequence indices, dict keys)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(str(getattr(k, "name", getattr(k, "idx", getattr(k, "key", k)))) for k in path)
        out[name] = np.asarray(leaf)
    return out


def unflatten_tree(template, flat: dict[str, Any]):
    """Inverse of `flatten_tree` given a template with the same structure."""
    names = list(flatten_tree(template))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template),
                                        [jax.numpy.asarray(flat[n]) for n in names])


def leaf_specs(flat: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()}


def save_flat(directory: str | os.PathLike, flat: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write the arrays `flat` (orbax) and ``meta`` + leaves + file hashes
    (``metadata.json``) to `directory`. Returns the final path."""
    import orbax.checkpoint as ocp

    final = Path(directory).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", flat)
            ckptr.wait_until_finished()
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted((tmp / "params").rglob("*")) if p.is_file()}
        full = {**meta, "leaves": leaf_specs(flat), "files": files}
        (tmp / "metadata.json").write_text(json.dumps(full, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def read_metadata(directory: str | os.PathLike, what: str = "checkpoint") -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointCorruptedError(f"{what} directory {d} does not exist")
    mp = d / "metadata.json"
    if not mp.is_file():
        raise CheckpointCorruptedError(f"{what} {d} has no metadata.json (incomplete or not a checkpoint)")
    try:
        return json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorruptedError(f"{what} {d}: metadata.json is not valid JSON ({e})") from e


def verified_metadata(directory: str | os.PathLike, what: str = "checkpoint") -> dict:
    """`read_metadata` + every listed file present with its recorded sha256."""
    d = Path(directory).resolve()
    meta = read_metadata(d, what)
    files = meta.get("files")
    if not files:
        raise CheckpointCorruptedError(f"{what} {d}: metadata lists no parameter files")
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointCorruptedError(f"{what} {d}: file {rel} is missing")
        if sha256_file(p) != digest:
            raise CheckpointCorruptedError(f"{what} {d}: file {rel} is corrupted (sha256 mismatch)")
    return meta


def base_diffs(meta: dict, cfg: ModelConfig, fingerprint: str) -> list[str]:
    """Every difference between the checkpoint's recorded base model and (cfg, fingerprint)."""
    out = []
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
    return out


def restore_flat(directory: str | os.PathLike, template: dict[str, np.ndarray], what: str = "checkpoint") -> dict:
    """The arrays of `directory`'s ``params/`` with the names/shapes/dtypes of `template`."""
    import orbax.checkpoint as ocp

    d = Path(directory).resolve()
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in template.items()}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(d / "params", abstract)
    except Exception as e:  # orbax/tensorstore raise various types for damaged data
        raise CheckpointCorruptedError(f"{what} {d}: orbax could not read the parameters ({e})") from e
