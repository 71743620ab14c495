"""Real-model test of the default pair (Qwen2.5-Coder 1.5B target / 0.5B draft, GGUF Q4_K_M).

Slow (a few minutes, ~10 GB RAM peak): run alone, ``pytest -m slow tests/test_default_pair.py``.
Needs the part packages installed (see docs/models.md); skipped otherwise.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from mirror_jax.loading import (
    DRAFT_SPEC,
    TARGET_SPEC,
    check_same_tokenizer,
    default_pair,
)
from mirror_jax.tokenizer import apply_chat_template
from tests.helpers import default_pair_files_or_skip

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}]


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def files():
    t0 = time.perf_counter()
    paths = default_pair_files_or_skip()
    print(f"\nassemble_default_files: {time.perf_counter() - t0:.1f}s")
    return paths


def test_assembled_files(files):
    target, draft = files
    assert target.stat().st_size == TARGET_SPEC.size == 1_117_320_768
    assert draft.stat().st_size == DRAFT_SPEC.size == 491_400_064
    assert _sha256(target) == TARGET_SPEC.sha256
    assert _sha256(draft) == DRAFT_SPEC.sha256


def test_default_pair_matches_transformers(files):
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from mirror_jax.kv_cache import init_cache
    from mirror_jax.loading import load_gguf_tokenizer
    from mirror_jax.model import forward
    from tests.hf_reference import hf_last_logits

    # transformers' reference runs first, in a child process (tests/hf_reference.py), so its copy of
    # the 1.5B never shares this process with ours.
    tok_only, template = load_gguf_tokenizer(files[0])
    ids = apply_chat_template(tok_only, MESSAGES, template)
    cache_dir, name = str(files[0].parent), files[0].name
    ref_tok = AutoTokenizer.from_pretrained(cache_dir, gguf_file=name)
    assert ref_tok(tok_only.decode(ids), add_special_tokens=False)["input_ids"] == ids
    t0 = time.perf_counter()
    ref_logits = np.asarray(hf_last_logits(files[0], [ids])[0], np.float32)
    print(f"\ntransformers target (child process): {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    target, draft, tok = default_pair(jnp.float32)
    print(f"default_pair (both GGUFs, float32): {time.perf_counter() - t0:.1f}s")
    check_same_tokenizer(target.tokenizer, draft.tokenizer)
    assert tok is target.tokenizer and len(tok) == 151936
    assert tok.bos_token_id == 151643 and tok.eos_token_id == 151645
    assert target.sha256 == TARGET_SPEC.sha256 and draft.sha256 == DRAFT_SPEC.sha256
    for m, layers, hidden in ((target, 28, 1536), (draft, 24, 896)):
        c = m.cfg
        assert (c.arch, c.vocab_size, c.tie_embeddings, c.qkv_bias) == ("qwen2", 151936, False, True)
        assert (c.num_layers, c.hidden_size) == (layers, hidden)
        assert m.params.embed.shape == (151936, hidden) and m.params.lm_head.shape == (151936, hidden)
        assert m.params.embed.dtype == jnp.float32
        assert m.chat_template and "<|im_start|>" in m.chat_template

    assert apply_chat_template(tok, MESSAGES, target.chat_template) == ids  # the loaded pair's ids
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)[-3:]
    fwd = jax.jit(forward, static_argnums=0)
    tokens = jnp.asarray([ids], jnp.int32)
    ours = {}
    for role, m in (("target", target), ("draft", draft)):
        logits, _ = fwd(m.cfg, m.params, tokens, init_cache(m.cfg, 1, len(ids)))
        ours[role] = np.asarray(logits[0, -1])
    assert int(np.argmax(ours["target"])) == int(np.argmax(ref_logits))
    top_ref = np.argsort(ref_logits)[-5:]
    np.testing.assert_allclose(ours["target"][top_ref], ref_logits[top_ref], atol=5e-2, rtol=0)
    print(f"next token: target {int(np.argmax(ref_logits))}, draft {int(np.argmax(ours['draft']))}")
