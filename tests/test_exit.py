"""Trained early exits (`mirror_jax.exit`): the head's maths, its use in the prefix and the device
loop, losslessness with any head, training that raises Omega, orbax checkpoints and `generate`'s
`exit_head` resolution. Tiny random models; the real default target's heads are in
`tests/test_real_pair.py`."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax import rounds as R
from mirror_jax.checkpointing import CheckpointCorruptedError, CheckpointMismatchError
from mirror_jax.corpus import chat_items, code_texts, pack_sequences, prose_requests, split_of, stdlib_files
from mirror_jax.engine.api import ConfigError, generate
from mirror_jax.exit import ExitHead, exit_logits, init_exit_head
from mirror_jax.exit.checkpoint import ExitHeads, load_default_exit_heads, restore_exit_heads, save_exit_heads
from mirror_jax.exit.train import active_vocab, exit_features, omega_ranks, train_exit_head
from mirror_jax.kv_cache import init_cache
from mirror_jax.testing import noisy_pair
from mirror_jax.testing import random_prompts as prompts

N_NEW = 20


@pytest.fixture(scope="module")
def models():
    return noisy_pair(noise=0.005)


def random_head(cfg, layer, scale=0.3, seed=0) -> ExitHead:
    rng = np.random.default_rng(seed)
    h = cfg.hidden_size
    return ExitHead(norm=jnp.asarray(1 + 0.1 * rng.normal(size=h), jnp.float32),
                    w=jnp.asarray(scale * rng.normal(size=(h, h)) / np.sqrt(h), jnp.float32),
                    b=jnp.asarray(0.1 * rng.normal(size=h), jnp.float32), layer=layer)


def test_identity_head_is_the_untrained_exit(models):
    (cfg, params), _ = models
    tokens = jnp.asarray([prompts(1, seed=3, lo=8, hi=9)[0]], jnp.int32)
    cache = init_cache(cfg, 1, 16)
    h0, ee0, _ = M.forward_prefix(cfg, params, tokens, cache, 2)
    h1, ee1, _ = M.forward_prefix(cfg, params, tokens, cache, 2, init_exit_head(cfg, 2))
    np.testing.assert_array_equal(np.asarray(ee0), np.asarray(ee1))
    np.testing.assert_array_equal(np.asarray(h0), np.asarray(h1))


def test_target_prefix_takes_candidates_from_the_head(models):
    """The channel's candidates are the top-kappa of the *head's* logits (not the raw exit's), and
    the hidden state handed to the suffix is the layer's own (the head never enters the suffix)."""
    (cfg, params), _ = models
    head = random_head(cfg, 2, scale=2.0)
    last, window = jnp.asarray([5], jnp.int32), jnp.asarray([[7, 9, 11]], jnp.int32)
    cache = init_cache(cfg, 1, 16).replace(lengths=jnp.asarray([4], jnp.int32))
    hid0, ee0, _ = R.target_prefix(cfg, params, cache, last, window, exit_layer=2, kappa=3)
    cache = init_cache(cfg, 1, 16).replace(lengths=jnp.asarray([4], jnp.int32))
    hid1, ee1, _ = R.target_prefix(cfg, params, cache, last, window, exit_layer=2, kappa=3, exit_head=head)
    np.testing.assert_array_equal(np.asarray(hid0), np.asarray(hid1))
    want = np.argsort(-np.asarray(exit_logits(cfg, params, head, hid1[0])), axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.asarray(ee1.top_ids), want)
    assert not np.array_equal(np.asarray(ee0.top_ids), np.asarray(ee1.top_ids))


@pytest.mark.parametrize("loop", ["host", "device"])
def test_mirror_with_a_head_is_lossless_and_uses_it(models, loop):
    if loop == "device" and not os.environ.get("MIRROR_JAX_FRESH_PROCESS"):
        # XLA:CPU (jax 0.10.2) segfaulted in backend compilation of this device-loop program when it
        # came late in the full test process (after ~200 other compilations); alone it compiles and
        # passes. Until that XLA bug is isolated, the same assertions run in a fresh interpreter.
        node = f"{__file__}::test_mirror_with_a_head_is_lossless_and_uses_it[device]"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                           env={**os.environ, "MIRROR_JAX_FRESH_PROCESS": "1"}, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
        return
    target, draft = models
    ps = prompts(3, seed=4)
    ar = generate(target, ps, N_NEW).tokens
    kw = dict(method="mirror", draft=draft, gamma=3, kappa=2, branch_budget=3, loop=loop)
    plain = generate(target, ps, N_NEW, exit_layer=2, exit_head=None, **kw)
    trained = generate(target, ps, N_NEW, exit_head=random_head(target[0], 2, scale=3.0), **kw)
    assert plain.tokens == ar and trained.tokens == ar
    assert plain.stats["exit_head"] == "untrained" and trained.stats["exit_head"] == "trained"
    assert trained.stats["settings"]["exit_layer"] == 2  # taken from the head
    assert plain.stats["omega_kappa"] != trained.stats["omega_kappa"]


def test_training_raises_omega_on_held_out_positions(models):
    """Distillation from the target's final distribution at layer 2 of 4 (random model, random
    tokens): held-out Omega_1 and Omega_4 rise clearly above the untrained exit's (measured 0.25 ->
    0.40 and 0.58 -> 0.73), the loss falls."""
    (cfg, params), _ = models
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, (64, 32)).astype(np.int32)
    held = rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    ft = exit_features(cfg, params, train, layers=(1, 2), top=8)
    fh = exit_features(cfg, params, held, layers=(1, 2), top=8)
    assert ft.hidden.shape == (2, 64 * 32, cfg.hidden_size) and ft.top_ids.shape == (64 * 32, 8)
    # top_ids[:, 0] is the target's greedy token.
    logits, _ = M.forward(cfg, params, jnp.asarray(held), init_cache(cfg, 4, 32))
    np.testing.assert_array_equal(np.asarray(fh.top_ids[:, 0]), np.asarray(jnp.argmax(logits, -1)).reshape(-1))
    vocab = active_vocab(ft.top_ids)
    log = []
    head = train_exit_head(cfg, params, np.asarray(ft.hidden[1]), np.asarray(ft.top_lp), np.asarray(ft.top_ids),
                           vocab, layer=2, steps=400, batch=128, lr=1e-2, log=log.append, progress=False)
    r0 = omega_ranks(cfg, params, None, np.asarray(fh.hidden[1]), np.asarray(fh.top_ids[:, 0]))
    r1 = omega_ranks(cfg, params, head, np.asarray(fh.hidden[1]), np.asarray(fh.top_ids[:, 0]))
    for k in (1, 4):
        assert np.mean(r1 < k) > np.mean(r0 < k) + 0.08, (k, np.mean(r0 < k), np.mean(r1 < k))
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    with pytest.raises(ValueError, match="exit layers"):
        exit_features(cfg, params, train, layers=(4,))


def test_checkpoint_roundtrip_and_errors(models, tmp_path):
    (cfg, params), (_, other) = models
    heads = [random_head(cfg, 1, seed=1), random_head(cfg, 3, seed=2)]
    d = save_exit_heads(tmp_path / "exit", cfg, params, heads, default_layer=3, extra={"steps": 7})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    got = restore_exit_heads(d, cfg, params)
    assert got.layers == (1, 3) and got.default_layer == 3 and got.metadata["steps"] == 7
    for h in heads:
        g = got.for_layer(h.layer)
        assert g.layer == h.layer and g.w.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g.w), np.asarray(h.w.astype(jnp.bfloat16).astype(jnp.float32)))
    assert got.for_layer(2) is None
    with pytest.raises(CheckpointMismatchError, match="weights differ"):
        restore_exit_heads(d, cfg, other)
    assert load_default_exit_heads(types.SimpleNamespace(cfg=cfg, params=other), tmp_path / "none") is None
    with pytest.raises(ValueError, match="default_layer"):
        save_exit_heads(tmp_path / "bad", cfg, params, heads, default_layer=2)
    with pytest.raises(ValueError, match="one head per exit layer"):
        save_exit_heads(tmp_path / "bad", cfg, params, [heads[0], heads[0]])
    victim = next(p for p in (d / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointCorruptedError, match="corrupted"):
        restore_exit_heads(d, cfg, params)
    meta = json.loads((d / "metadata.json").read_text())
    (d / "metadata.json").write_text(json.dumps({**meta, "kind": "ss"}))
    with pytest.raises((CheckpointMismatchError, CheckpointCorruptedError)):
        restore_exit_heads(d, cfg, params)


def test_generate_resolves_exit_head(models, tmp_path):
    (cfg, params), draft = models
    heads = ExitHeads({1: random_head(cfg, 1), 3: random_head(cfg, 3, seed=5)}, default_layer=3)
    target = types.SimpleNamespace(cfg=cfg, params=params, tokenizer=None, exit_heads=heads)
    ps = prompts(2, seed=6)
    kw = dict(method="mirror", draft=draft, gamma=2, kappa=2, branch_budget=2)  # branches: the exit runs
    auto = generate(target, ps, 8, **kw)
    assert auto.stats["exit_head"] == "trained" and auto.stats["settings"]["exit_layer"] == 3
    at1 = generate(target, ps, 8, exit_layer=1, **kw)
    assert at1.stats["exit_head"] == "trained" and at1.stats["settings"]["exit_layer"] == 1
    at2 = generate(target, ps, 8, exit_layer=2, **kw)  # no head for layer 2: the untrained exit
    assert at2.stats["exit_head"] == "untrained"
    off = generate(target, ps, 8, exit_head=None, **kw)
    assert off.stats["exit_head"] == "untrained" and off.stats["settings"]["exit_layer"] == cfg.num_layers // 2
    assert auto.tokens == at1.tokens == at2.tokens == off.tokens
    with pytest.raises(ConfigError, match="trained for exit layer 1, not 2"):
        generate(target, ps, 8, exit_layer=2, exit_head=heads.for_layer(1), **kw)
    with pytest.raises(ConfigError, match="exit_head must be"):
        generate(target, ps, 8, exit_head="trained", **kw)
    with pytest.raises(ConfigError, match="exit_head must be"):
        generate(target, ps, 8, exit_head=3, **kw)
    wrong = init_exit_head(cfg, 1).replace(w=jnp.zeros((8, 8)))
    with pytest.raises(ConfigError, match="hidden size"):
        generate(target, ps, 8, exit_head=wrong, **kw)
    sd = generate(target, ps, 8, method="sd", draft=draft, gamma=2)
    assert sd.stats["exit_head"] is None


def test_device_loop_inside_jit_takes_the_head(models):
    """`run_device_loop` with a head compiles once and gives the host loop's statistics."""
    target, draft = models
    head = random_head(target[0], 2, scale=3.0)
    ps = prompts(2, seed=8)
    kw = dict(method="mirror", draft=draft, gamma=3, kappa=2, branch_budget=2, exit_head=head)
    host = [generate(target, [p], N_NEW, **kw).stats for p in ps]
    dev = generate(target, ps, N_NEW, loop="device", **kw).stats
    for row, h in zip(dev["per_row"], host, strict=True):
        tokens = sum((a + 1) * n for a, n in enumerate(row["accepted_hist"]))
        assert row["reuse"] == h["reuse"]
        assert row["omega_hits"] / tokens == pytest.approx(h["omega_kappa"])


def test_corpus_split_and_packing():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert train and held and not {r for r, _ in train} & {r for r, _ in held}
    assert all(split_of(r) == "heldout" for r, _ in held)
    assert not any("site-packages" in str(p) or "dist-packages" in str(p) for _, p in train + held)
    with pytest.raises(ValueError, match="split"):
        stdlib_files("test")

    class CharTok:  # one token per character; a template that tags roles
        def apply_chat_template(self, msgs, chat_template=None, tokenize=False):
            return "".join(f"<{m['role']}>{m['content']}" for m in msgs)

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 1000 for c in text]

    rows = pack_sequences(CharTok(), None, "heldout", 4096, 512)
    assert rows.shape == (8, 512) and rows.dtype == np.int32
    again = pack_sequences(CharTok(), None, "heldout", 4096, 512)
    np.testing.assert_array_equal(rows, again)  # deterministic
    assert not np.array_equal(rows, pack_sequences(CharTok(), None, "heldout", 4096, 512, seed=1))

    # raw_frac: that share of the rows is the files' raw source (no template), the rest chat rows
    chat_only = pack_sequences(CharTok(), None, "heldout", 2048, 512)
    raw_only = pack_sequences(CharTok(), None, "heldout", 2048, 512, raw_frac=1.0)
    first_file = next(code_texts("heldout"))
    np.testing.assert_array_equal(raw_only[0], CharTok().encode(first_file)[:512])
    assert not any(b"<user>" in bytes(r.astype(np.uint8)) for r in raw_only)  # no chat template in raw rows
    mixed = pack_sequences(CharTok(), None, "heldout", 4096, 512, raw_frac=0.5)
    assert mixed.shape == (8, 512)
    assert sorted(map(bytes, mixed)) == sorted(map(bytes, np.concatenate([chat_only, raw_only])))
    kinds = ["raw" if any(np.array_equal(m, r) for r in raw_only) else "chat" for m in mixed]
    assert kinds.count("raw") == 4 and len(set(kinds[:4])) == 2  # interleaved, not chat rows then raw rows
    def pack_before_raw_frac(tok, num_tokens, seq_len):  # pack_sequences as it was before raw_frac (3356148)
        out, stream = [], []
        for msgs in chat_items("heldout", 0):
            stream.extend(tok.encode(tok.apply_chat_template(msgs, chat_template=None, tokenize=False)))
            while len(stream) >= seq_len:
                out.append(stream[:seq_len])
                stream = stream[seq_len:]
            if len(out) * seq_len >= num_tokens:
                break
        return np.asarray(out[: max(1, num_tokens // seq_len)], np.int32)

    for num_tokens in (4096, 4000, 300):  # the rows the committed adapters were trained on: unchanged
        np.testing.assert_array_equal(pack_sequences(CharTok(), None, "heldout", num_tokens, 512, raw_frac=0.0),
                                      pack_before_raw_frac(CharTok(), num_tokens, 512))
    with pytest.raises(ValueError, match="raw_frac"):
        pack_sequences(CharTok(), None, "heldout", 4096, 512, raw_frac=1.5)
    jax.clear_caches()


def test_prose_requests_seeded_split_and_varied():
    """The prose requests the exit heads' prose rows answer: seeded, from one split's files only, of
    every kind, with word problems about one request in six."""
    held = list(prose_requests("heldout"))
    assert held == list(prose_requests("heldout"))
    assert held[:50] != list(itertools.islice(prose_requests("heldout", seed=1), 50))
    assert all(isinstance(r, str) and r.strip() for r in held)
    starts = ("Explain in plain English", "Summarize the following", "Translate the following text into",
              "Here is the documentation of", "Write a short, friendly introduction")
    for start in starts:
        assert any(r.startswith(start) for r in held), start
    math = [r for r in held if not r.startswith(starts)]
    assert 0.08 < len(math) / len(held) < 0.25
    assert all(re.search(r"\d", r) and ("step" in r or "work" in r) for r in math)
    # Requests about files are never shared between the splits (the word problems are not about files).
    train = set(prose_requests("train"))
    assert not {r for r in held if r.startswith(starts)} & train


def test_prose_rows_generate_cache_and_resume(models, tmp_path, monkeypatch):
    """train_exit's prose rows: requests + the model's greedy answers, cut into rows; cached after
    each batch, so a rerun generates nothing and a run cut short resumes to the same rows."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    import train_exit

    from mirror_jax.engine import autoregressive

    (cfg, params), _ = models
    target = types.SimpleNamespace(cfg=cfg, params=params, chat_template="x")

    class CharTok:  # one token per character, inside the tiny vocabulary
        def apply_chat_template(self, msgs, chat_template=None, add_generation_prompt=True, tokenize=False):
            return "".join(f"<{m['role']}>{m['content'][:40]}" for m in msgs) + "<assistant>"

        def encode(self, text, add_special_tokens=False):
            return [ord(c) % cfg.vocab_size for c in text]

    kw = dict(new_tokens=6, batch=2, max_prompt=1000)
    rows = train_exit.prose_rows(target, CharTok(), "heldout", 5 * 32, 32, tmp_path, **kw)
    assert rows.shape == (5, 32) and rows.dtype == np.int32
    cache = tmp_path / "prose_heldout_s0_n6.jsonl"
    recs = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(recs) % 2 == 0 and [r["request"] for r in recs] == sorted({r["request"] for r in recs})
    first = next(prose_requests("heldout"))
    prompt = CharTok().encode(CharTok().apply_chat_template([{"role": "user", "content": first}]))
    assert recs[0]["ids"][: recs[0]["prompt_len"]] == prompt
    answer = autoregressive.generate_ar(cfg, params, [prompt], 6).tokens[0]
    assert recs[0]["ids"][recs[0]["prompt_len"]:] == list(answer)  # the model's own greedy answer
    np.testing.assert_array_equal(rows.ravel(), [t for r in recs for t in r["ids"]][: 5 * 32])

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(autoregressive, "generate_ar", no_generation)
    np.testing.assert_array_equal(train_exit.prose_rows(target, CharTok(), "heldout", 5 * 32, 32, tmp_path, **kw),
                                  rows)  # a rerun reads the cache
    monkeypatch.undo()
    cache.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))  # a run cut after its first batch
    np.testing.assert_array_equal(train_exit.prose_rows(target, CharTok(), "heldout", 5 * 32, 32, tmp_path, **kw),
                                  rows)
    assert [json.loads(line) for line in cache.read_text().splitlines()] == recs

