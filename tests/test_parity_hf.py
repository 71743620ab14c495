"""Parity of loaded weights: mirror_jax forward vs the transformers (torch, fp32, eager) reference.

Covers the safetensors path (qwen2, llama, llama3 RoPE scaling, tied embeddings, qwen3 with a
head_dim different from hidden/heads, sharded saves) and the GGUF path (F32 GGUFs written from the
same tiny models; llama includes llama.cpp's q/k row permutation).
"""

from __future__ import annotations

import numpy as np
import pytest

from mirror_jax.loading import load_gguf, load_hf_dir
from tests.helpers import jax_logits, make_tiny_hf_model, torch_logits, write_tiny_gguf

pytest.importorskip("torch")

TOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}

CASES = {
    "qwen2": ("qwen2", {}),
    "llama": ("llama", {}),
    "llama_llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True, "num_hidden_layers": 3}),
    "qwen3_head_dim": ("qwen3", {"head_dim": 32, "num_hidden_layers": 3}),
}


def _tokens(vocab: int, b: int = 2, t: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t), dtype=np.int64)


def _assert_close(a: np.ndarray, b: np.ndarray):
    assert a.shape == b.shape
    diff = float(np.max(np.abs(a - b)))
    assert diff <= TOL, f"max abs logit diff {diff:.3g} > {TOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_dir_parity(tmp_path, case):
    arch, overrides = CASES[case]
    path, hf = make_tiny_hf_model(tmp_path / case, arch, **overrides)
    loaded = load_hf_dir(path)
    assert loaded.cfg.arch == arch
    assert loaded.cfg.tie_embeddings == bool(overrides.get("tie_word_embeddings", False))
    if "head_dim" in overrides:
        assert loaded.cfg.head_dim == overrides["head_dim"] != loaded.cfg.hidden_size // loaded.cfg.num_heads
    if "rope_scaling" in overrides:
        assert loaded.cfg.rope_scaling[0] == "llama3"
    tokens = _tokens(loaded.cfg.vocab_size)
    _assert_close(jax_logits(loaded, tokens), torch_logits(hf, tokens))


def test_tied_embeddings_lm_head_is_embed(tmp_path):
    path, _ = make_tiny_hf_model(tmp_path / "m", "qwen2", tie_word_embeddings=True)
    loaded = load_hf_dir(path)
    assert loaded.params.lm_head is loaded.params.embed  # one array, held once


def test_sharded_save_loads(tmp_path):
    path, hf = make_tiny_hf_model(tmp_path / "sharded", "qwen2", num_hidden_layers=3, max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1, shards
    assert (path / "model.safetensors.index.json").is_file()
    loaded = load_hf_dir(path)
    tokens = _tokens(loaded.cfg.vocab_size, b=1, t=16)
    _assert_close(jax_logits(loaded, tokens), torch_logits(hf, tokens))
    # Shards without the index file are found by globbing.
    (path / "model.safetensors.index.json").unlink()
    _assert_close(jax_logits(load_hf_dir(path), tokens), torch_logits(hf, tokens))


def test_bf16_safetensors_loads(tmp_path):
    import torch

    path, hf = make_tiny_hf_model(tmp_path / "bf16", "llama", save=False)
    hf_bf16 = hf.to(torch.bfloat16)
    hf_bf16.save_pretrained(str(path), safe_serialization=True)
    loaded = load_hf_dir(path)
    ref = hf_bf16.float()
    tokens = _tokens(loaded.cfg.vocab_size, b=1, t=8)
    _assert_close(jax_logits(loaded, tokens), torch_logits(ref, tokens))


def test_dtype_argument(tmp_path):
    import jax.numpy as jnp

    path, _ = make_tiny_hf_model(tmp_path / "m", "qwen2")
    loaded = load_hf_dir(path, dtype=jnp.bfloat16)
    assert loaded.params.layers[0].w_qkv.dtype == jnp.bfloat16
    assert loaded.params.embed.dtype == jnp.bfloat16


GGUF_CASES = {
    "qwen2": ("qwen2", {}),
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_parity(tmp_path, case):
    arch, overrides = GGUF_CASES[case]
    _, hf = make_tiny_hf_model(tmp_path / case, arch, save=False, **overrides)
    gguf_path = write_tiny_gguf(tmp_path / f"{case}.gguf", hf, arch)
    loaded = load_gguf(gguf_path, progress=False)
    assert loaded.cfg.arch == arch
    assert loaded.cfg.tie_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert loaded.cfg.head_dim == overrides.get("head_dim", 16)
    assert loaded.tokenizer is None and loaded.chat_template is None
    tokens = _tokens(loaded.cfg.vocab_size)
    _assert_close(jax_logits(loaded, tokens), torch_logits(hf, tokens))


def test_gguf_llama_without_unpermute_would_differ(tmp_path):
    """Guard for the test itself: the permutation written for llama really changes the weights."""
    from mirror_jax.loading.keymap import llama_permute, llama_unpermute

    w = np.random.default_rng(0).normal(size=(4 * 16, 8)).astype(np.float32)
    p = llama_permute(w, 4, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(llama_unpermute(p, 4, 4), w)
    k = np.random.default_rng(1).normal(size=(2 * 16, 8)).astype(np.float32)
    np.testing.assert_array_equal(llama_unpermute(llama_permute(k, 4, 2), 4, 2), k)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_writer_matches_transformers_reader(tmp_path, arch):
    """The test GGUF writer uses llama.cpp's conventions: transformers' own GGUF loader (which undoes
    llama.cpp's permutation) reads it back to the same model, and so does mirror_jax."""
    from transformers import AutoModelForCausalLM

    _, hf = make_tiny_hf_model(tmp_path / "m", arch, save=False)
    write_tiny_gguf(tmp_path / "x.gguf", hf, arch)
    ref = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="x.gguf", dtype="float32", attn_implementation="eager"
    ).eval()
    tokens = _tokens(hf.config.vocab_size, b=1, t=12)
    _assert_close(torch_logits(ref, tokens), torch_logits(hf, tokens))
    _assert_close(
        jax_logits(load_gguf(tmp_path / "x.gguf", progress=False), tokens), torch_logits(ref, tokens)
    )


def test_tied_checkpoint_with_explicit_lm_head(tmp_path):
    """A tied model whose file still carries lm_head.weight loads too (the stored head is used)."""
    from safetensors.numpy import load_file, save_file

    path, hf = make_tiny_hf_model(tmp_path / "m", "llama", tie_word_embeddings=True)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
    save_file(sd, str(f), metadata={"format": "pt"})
    loaded = load_hf_dir(path)
    tokens = _tokens(loaded.cfg.vocab_size, b=1, t=8)
    _assert_close(jax_logits(loaded, tokens), torch_logits(hf, tokens))
