"""Shared test helpers: tiny random transformers models saved to disk, tiny GGUF files, and an
independent check of Mirror-SD round records.

Import from test files with ``from tests.helpers import make_tiny_hf_model``. torch is imported
lazily, only by the helpers that need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

_CLASSES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_hf_model(tmp_path, arch: str = "qwen2", seed: int = 0, save: bool = True, **overrides):
    """Build a tiny random ``{Qwen2,Llama,Qwen3}ForCausalLM`` (float32, eager attention), save it with
    safetensors under ``tmp_path`` and return ``(path, hf_model)``.

    ``overrides`` go to the config (e.g. ``num_hidden_layers=3``, ``head_dim=32``,
    ``tie_word_embeddings=True``, ``rope_scaling={...}``); ``max_shard_size`` goes to
    ``save_pretrained``."""
    import torch
    import transformers

    cfg_name, model_name = _CLASSES[arch]
    max_shard_size = overrides.pop("max_shard_size", None)
    kwargs = dict(TINY_DEFAULTS)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    with torch.no_grad():
        # Random norms and biases, so a mis-mapped norm/bias cannot hide behind an all-ones init.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.5)
    path = Path(tmp_path)
    if save:
        path.mkdir(parents=True, exist_ok=True)
        extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(path), safe_serialization=True, **extra)
    return path, model


def torch_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of a transformers causal LM on int tokens [B, T]."""
    import torch

    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return out.logits.float().numpy()


def jax_logits(loaded, tokens: np.ndarray, capacity: int | None = None) -> np.ndarray:
    """float32 logits [B, T, V] of `mirror_jax.model.forward` for a `LoadedModel` on tokens [B, T]."""
    import jax.numpy as jnp

    from mirror_jax.kv_cache import init_cache
    from mirror_jax.model import forward

    tokens = np.asarray(tokens)
    b, t = tokens.shape
    cache = init_cache(loaded.cfg, b, capacity or t, dtype=jnp.float32)
    logits, _ = forward(loaded.cfg, loaded.params, jnp.asarray(tokens, jnp.int32), cache)
    return np.asarray(logits)


_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_gguf_name(name: str) -> str:
    if name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[name]
    parts = name.split(".")  # model.layers.{i}.<module...>.<weight|bias>
    assert parts[:2] == ["model", "layers"], name
    return f"blk.{parts[2]}.{_HF_TO_GGUF_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_tiny_gguf(path, hf_model, arch: str, extra_tensors: dict | None = None, tokens: list | None = None):
    """Write ``hf_model``'s weights as an F32 GGUF (the way llama.cpp's converter names and, for the
    ``llama`` architecture, permutes them). Returns the path."""
    import gguf

    from mirror_jax.loading.keymap import llama_permute

    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_bos_token_id(c.bos_token_id)
        w.add_eos_token_id(c.eos_token_id)
    sd = hf_model.state_dict()
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for name, t in sd.items():
        a = t.detach().float().numpy().copy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            kv = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            a = llama_permute(a, c.num_attention_heads, kv)
        w.add_tensor(hf_to_gguf_name(name), np.ascontiguousarray(a, dtype=np.float32))
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def check_round_records(res, ref) -> int:
    """Recompute every mirror round's hit from its own record, independently of the engine's flag:
    the next window is reused iff (A, c) was among the branches rolled out, and c is the token ar
    committed at that position. Returns the number of hits."""
    hits, rounds = 0, iter(res.stats["per_round"])
    for toks in ref:
        end = 1  # tokens committed so far (the first one comes from the prefill)
        while end < len(toks):
            r = next(rounds)
            end += r["a"] + 1
            assert end > len(toks) or r["c"] == toks[end - 1]
            want = (r["a"], r["c"]) in r["branches"]
            assert r["hit"] == want, r
            assert len(r["branches"]) == res.stats["settings"]["branch_budget"]
            hits += want
    assert next(rounds, None) is None
    return hits


def default_pair_files_or_skip():
    """(target GGUF, draft GGUF) of the default pair, assembled from the installed part packages;
    skips the calling test when those packages are not installed (the real-model tests' setup)."""
    import importlib

    import pytest

    from mirror_jax.loading import DRAFT_SPEC, TARGET_SPEC, MissingModelPackagesError, assemble_default_files

    dp = importlib.import_module("mirror_jax.loading.default_pair")  # the module, not the function it exports
    try:
        dp.find_parts(TARGET_SPEC)
        dp.find_parts(DRAFT_SPEC)
    except MissingModelPackagesError as e:
        pytest.skip(str(e))
    return assemble_default_files()


def run_bench_sd_draft_tiny(out_dir, settings: str, *extra: str) -> dict:
    """Run ``experiments/bench_sd_draft.py --tiny`` (2 prompts, 8 tokens) with `settings` (and `extra`
    arguments) into `out_dir`; returns its JSON (fails the test with the script's output if it exits
    non-zero)."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "experiments" / "bench_sd_draft.py"), "--tiny", "--num-prompts", "2",
                        "--max-new-tokens", "8", "--settings", settings, "--out", str(out_dir), *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads((Path(out_dir) / "sd_draft.json").read_text())
