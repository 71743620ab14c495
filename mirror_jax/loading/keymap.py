"""Strict mapping from checkpoint tensor names to a `ModelParams` pytree.

Two naming schemes are understood:

* Hugging Face (safetensors): ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
  ``model.layers.{i}.mlp.gate_proj.weight``, ``model.norm.weight``, ``lm_head.weight``, ...
* GGUF (llama.cpp): ``token_embd.weight``, ``blk.{i}.attn_q.weight``, ``blk.{i}.ffn_gate.weight``,
  ``output_norm.weight``, ``output.weight``, ...

GGUF names are first translated to the Hugging Face names (`gguf_to_hf_name`), so there is one builder,
`build_params`. It is strict: every tensor of the checkpoint must be used, every tensor the config needs
must be present, and every shape must match the config; otherwise a `WeightLoadError` names the keys.

All layout work (q/k/v and gate/up fusion; weights keep the checkpoints' ``[out, in]`` layout) happens
in numpy on the host;
the arrays are converted with ``jnp.asarray(..., dtype)`` only at the end, one tensor group at a time
(so peak host memory stays close to the size of the result).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.layout import backend_layout
from mirror_jax.params import LayerParams, ModelParams


def quiet_transformers():
    """Import transformers without its "PyTorch was not found" advice: mirror_jax uses only its
    tokenizer and config code (torch is the tests' reference implementation, not a dependency).
    The advisory switch is set for the import only; the user's environment is left as it was."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"]
    old = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        return importlib.import_module("transformers")
    finally:
        if old is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = old


class WeightLoadError(ValueError):
    """A checkpoint could not be mapped onto the model (missing/unknown keys, bad shapes, bad file)."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for `mirror_jax.model.forward`: static config, parameters and tokenizer.

    ``source`` is the path it was loaded from, ``sha256`` the file's verified hash when known
    (GGUF files assembled by `default_pair`), ``tokenizer`` a transformers fast tokenizer or None,
    ``chat_template`` the Jinja chat template (from the tokenizer config or the GGUF metadata) or None.
    """

    cfg: ModelConfig
    params: ModelParams
    name: str
    source: str
    sha256: str | None
    tokenizer: Any
    chat_template: str | None
    exit_heads: Any = None  # mirror_jax.exit.checkpoint.ExitHeads: trained early exits (default_pair attaches them)


LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"

_GGUF_GLOBAL = {
    "token_embd.weight": EMBED,
    "output_norm.weight": FINAL_NORM,
    "output.weight": LM_HEAD,
}
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None if the name is not one mirror_jax knows."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_LAYER_RE.match(name)
    if m is None or m.group(2) not in _GGUF_LAYER:
        return None
    return f"model.layers.{int(m.group(1))}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"


def expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(required {hf_name: torch-layout shape}, optional names) for a config.

    Shapes are in the checkpoint's PyTorch layout (``[out, in]`` for linear weights). The LM head is
    optional when the embeddings are tied (it is then the embedding array itself)."""
    h, i, v, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED: (v, h), FINAL_NORM: (h,), LM_HEAD: (v, h)}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.kv_size,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    optional = {LM_HEAD} if cfg.tie_embeddings else set()
    return shapes, optional


def _fmt(names, limit: int = 12) -> str:
    names = sorted(names, key=_natural_key)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def check_keys(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise `WeightLoadError` naming every missing, unknown or wrongly shaped tensor."""
    want, optional = expected_shapes(cfg)
    have = set(shapes)
    missing = set(want) - have - optional
    unknown = have - set(want)
    bad = [
        f"{k}: checkpoint {tuple(shapes[k])} vs config {want[k]}"
        for k in sorted(have & set(want), key=_natural_key)
        if tuple(shapes[k]) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_fmt(missing)}")
    if unknown:
        problems.append(f"unexpected tensors ({len(unknown)}): {_fmt(unknown)}")
    if bad:
        more = f" ... and {len(bad) - 12} more" if len(bad) > 12 else ""
        problems.append(f"shape mismatches ({len(bad)}): " + "; ".join(bad[:12]) + more)
    if problems:
        raise WeightLoadError(
            f"checkpoint {source} does not match its config ({cfg.arch}, {cfg.num_layers} layers, "
            f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}): "
            + " | ".join(problems)
            + ". The weights and config.json/metadata must come from the same model, and the model must "
            "be a plain Qwen2/Llama/Qwen3 decoder (no extra projection biases, no MoE)."
        )


def build_params(
    cfg: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], np.ndarray],
    dtype=jnp.float32,
    source: str = "<checkpoint>",
    progress: Any = None,
) -> ModelParams:
    """Build `ModelParams` from checkpoint tensors given by Hugging Face name.

    ``shapes``: {hf_name: shape in PyTorch layout} of every tensor in the checkpoint (checked strictly
    against the config before anything is read). ``get(name)`` returns that tensor as a numpy array
    (any float dtype). ``progress``: optional callable(n) called after each tensor is read (a tqdm
    ``update``)."""
    check_keys(cfg, shapes, source)

    def read(name: str) -> np.ndarray:
        arr = np.asarray(get(name))
        if tuple(arr.shape) != tuple(shapes[name]):
            raise WeightLoadError(
                f"{source}: tensor {name} has shape {tuple(arr.shape)} but its header says "
                f"{tuple(shapes[name])}; the file is corrupt, re-download or re-create it"
            )
        if progress is not None:
            progress(1)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return arr

    def dev(a: np.ndarray):
        return jnp.asarray(np.ascontiguousarray(a), dtype=dtype)

    layers = []
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        w_qkv = np.concatenate([read(a + f"{n}_proj.weight") for n in "qkv"], axis=0)  # [qkv, H]
        b_qkv = None
        if cfg.qkv_bias:
            b_qkv = dev(np.concatenate([read(a + f"{n}_proj.bias") for n in "qkv"], axis=0))
        gate_up = np.concatenate([read(p + "mlp.gate_proj.weight"), read(p + "mlp.up_proj.weight")], axis=0)
        layers.append(
            LayerParams(
                attn_norm=dev(read(p + "input_layernorm.weight")),
                w_qkv=dev(w_qkv),
                b_qkv=b_qkv,
                q_norm=dev(read(a + "q_norm.weight")) if cfg.qk_norm else None,
                k_norm=dev(read(a + "k_norm.weight")) if cfg.qk_norm else None,
                w_o=dev(read(a + "o_proj.weight")),
                mlp_norm=dev(read(p + "post_attention_layernorm.weight")),
                w_gate_up=dev(gate_up),
                w_down=dev(read(p + "mlp.down_proj.weight")),
            )
        )
        del w_qkv, gate_up
    embed_np = read(EMBED)
    embed = dev(embed_np)
    lm_head = dev(read(LM_HEAD)) if LM_HEAD in shapes else embed  # tied: one array, held once
    del embed_np
    params = ModelParams(embed=embed, layers=tuple(layers), final_norm=dev(read(FINAL_NORM)), lm_head=lm_head)
    # bfloat16 on CPU: long contractions stored split for XLA:CPU's fast one-row kernel (`mirror_jax.layout`)
    return backend_layout(params)


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's row permutation of ``attn_q``/``attn_k`` (convert_hf_to_gguf ``LlamaModel.permute``).

    Applied by llama.cpp when writing a ``llama`` GGUF; exposed for tests that write one."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Inverse of `llama_permute` (transformers' ``LlamaTensorProcessor._reverse_permute_weights``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
