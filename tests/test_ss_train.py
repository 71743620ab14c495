"""SS training: loss decreases, chunked loss == naive loss from ss_train_forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax.params import init_random
from mirror_jax.ss.model import SSConfig, init_ss_params, ss_train_forward
from mirror_jax.ss.train import (
    chunked_nll,
    init_train_state,
    make_eval_loss,
    make_optimizer,
    make_train_step,
    precompute_main,
    ss_loss,
)
from mirror_jax.ss.window import tokens_per_forward
from mirror_jax.testing import tiny_config

ss_loss_jit = jax.jit(ss_loss, static_argnums=(0, 1), static_argnames=("chunk", "start", "labels", "max_rows"))

CFG = tiny_config("llama", vocab_size=50)
PARAMS = init_random(CFG, seed=0, scale=0.2)


def test_chunked_nll_matches_naive():
    h = jax.random.normal(jax.random.key(0), (13, 32))
    tg = jnp.arange(13) % CFG.vocab_size
    from mirror_jax import model as M

    logp = jax.nn.log_softmax(M.head(CFG, PARAMS, h), axis=-1)
    ref = -logp[jnp.arange(13), tg]
    np.testing.assert_allclose(np.asarray(chunked_nll(CFG, PARAMS, h, tg, chunk=4)), np.asarray(ref), rtol=1e-5)


def test_loss_matches_train_forward():
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=1, embed_scale=0.3)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 10)), jnp.int32)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    loss, m = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, chunk=7)
    ml, sl = jax.jit(ss_train_forward, static_argnums=(0, 1))(CFG, sscfg, PARAMS, ssp, toks)
    lp_main = jax.nn.log_softmax(ml, -1)
    nll_main = -jnp.mean(jnp.take_along_axis(lp_main[:, :-1], toks[:, 1:, None], -1))
    lp_s = jax.nn.log_softmax(sl, -1)
    nll_j = [-jnp.mean(jnp.take_along_axis(lp_s[:, : 10 - 1 - j, j - 1], toks[:, 1 + j :, None], -1)) for j in (1, 2)]
    np.testing.assert_allclose(float(m["nll_main"]), float(nll_main), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m["nll_stream"]), np.asarray(nll_j), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(nll_main + 0.1 * sum(nll_j)), rtol=1e-5)


def test_training_reduces_loss_and_freezes_base():
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=0)
    # Learnable data: a repeating pattern, so lookahead tokens are predictable.
    pattern = np.array([3, 17, 29, 8, 41, 5, 12])
    toks = jnp.asarray(np.stack([np.roll(np.tile(pattern, 4), -i)[:24] for i in range(4)]), jnp.int32)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    opt = make_optimizer(3e-2, total_steps=40, warmup_steps=5, schedule="cosine")
    state = init_train_state(ssp, opt)
    step = make_train_step(CFG, sscfg, opt)
    ev = make_eval_loss(CFG, sscfg)
    before = ev(PARAMS, state.ssp, feats, toks)
    for _ in range(40):
        state, m = step(PARAMS, state, feats, toks)
    after = ev(PARAMS, state.ssp, feats, toks)
    assert int(state.step) == 40
    assert float(after["nll_main"]) == float(before["nll_main"])  # main stream frozen
    assert float(after["loss"]) < float(before["loss"]) - 0.1
    assert np.all(np.asarray(after["nll_stream"]) < np.asarray(before["nll_stream"]))


def test_start_skips_masked_prompt_positions():
    """With targets before `start + 1 + s` masked out, skipping the first `start` stream positions
    gives the same loss."""
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=1, embed_scale=0.3)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] >= 6, jnp.float32).repeat(2, 0)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    _, m0 = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, mask)
    _, m3 = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, mask, start=3)
    np.testing.assert_allclose(np.asarray(m3["nll_stream"]), np.asarray(m0["nll_stream"]), rtol=1e-5)


def test_self_labels_are_the_drafts_own_greedy_continuation():
    """Where `self_labels` gives weight 1, its label is exactly the token the draft's greedy
    continuation of tokens[:t+1] puts at t+1+j (checked by decoding it, one forward per token), and
    the weight is 1 exactly where that continuation follows the text for j tokens."""
    from mirror_jax import model as M
    from mirror_jax.kv_cache import init_cache
    from mirror_jax.ss.train import self_labels

    s, t_len = 3, 16
    fwd = jax.jit(lambda toks: M.forward(CFG, PARAMS, toks, init_cache(CFG, 1, t_len + s + 2))[0])

    def next_token(seq):  # greedy next token after seq (padded to a fixed shape; causal mask)
        pad = np.zeros(t_len + s + 2, np.int32)
        pad[: len(seq)] = seq
        return int(jnp.argmax(fwd(jnp.asarray(pad[None]))[0, len(seq) - 1]))

    # Text that follows the draft's greedy path except for two substituted tokens.
    seq = [7, 3, 11]
    while len(seq) < t_len:
        seq.append(next_token(seq))
    seq[7], seq[12] = (seq[7] + 1) % CFG.vocab_size, (seq[12] + 5) % CFG.vocab_size
    toks = jnp.asarray([seq], jnp.int32)
    feats = precompute_main(CFG, SSConfig(num_streams=s, num_msa_layers=1, lora_rank=2), PARAMS, toks)
    tgt, w = (np.asarray(x)[0] for x in self_labels(toks, feats.greedy, s))
    for t in range(t_len):
        cont = list(seq[: t + 1])
        for _ in range(s + 1):
            cont.append(next_token(cont))
        for j in range(1, s + 1):
            follows = t + j < t_len and cont[t + 1 : t + 1 + j] == seq[t + 1 : t + 1 + j]
            assert w[t, j - 1] == float(follows), (t, j)
            if follows:
                assert tgt[t, j - 1] == cont[t + 1 + j], (t, j)
    assert 0 < w.sum() < w.size  # both cases occur


def test_max_rows_keeps_the_weighted_rows():
    """With self labels most rows weigh 0: evaluating the head on just the weighted rows gives the
    same loss as on all rows, and fewer rows than that drop some (the loss changes)."""
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=1, embed_scale=0.3)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    # Make the text agree with the draft everywhere, so every row before the end carries weight.
    toks = jnp.concatenate([toks[:, :1], feats.greedy[:, :-1]], axis=1)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    from mirror_jax.ss.train import self_labels

    n_weighted = int(np.asarray(self_labels(toks, feats.greedy, 2)[1]).sum())
    assert n_weighted > 0
    _, full = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, labels="self")
    _, cut = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, labels="self", max_rows=n_weighted)
    _, short = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, labels="self", max_rows=n_weighted // 2)
    np.testing.assert_allclose(np.asarray(cut["nll_stream"]), np.asarray(full["nll_stream"]), rtol=1e-5)
    assert not np.allclose(np.asarray(short["label_frac"]), np.asarray(full["label_frac"]))


def test_reduced_stream_vocabulary_loss():
    """stream_vocab: the streams' NLL is over the kept rows only (a softmax over them), targets
    outside weigh nothing in the loss and count as misses in the hard match."""
    from mirror_jax import model as M
    from mirror_jax.ss.model import stream_head, stream_pass

    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=4, stream_vocab=25)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=2, embed_scale=0.3)
    toks = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    _, m = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, chunk=5)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    hs = stream_pass(CFG, sscfg, PARAMS, ssp, feats.h0, feats.ks, feats.vs, pos)  # [2, 12, s, H]
    ids = np.asarray(stream_head(CFG, sscfg, PARAMS).head_ids)
    logits = np.asarray(M.head(CFG, PARAMS, hs))[..., ids]  # [2, 12, s, N]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    t = np.asarray(toks)
    for j in (1, 2):
        tgt = t[:, 1 + j :]  # stream j at t -> tokens[t+1+j]
        lp = logp[:, : 12 - 1 - j, j - 1]
        inside = np.isin(tgt, ids)
        assert 0 < inside.mean() < 1  # both kinds occur
        slot = np.searchsorted(ids, np.where(inside, tgt, ids[0]))
        nll = -np.take_along_axis(lp, slot[..., None], -1)[..., 0]
        np.testing.assert_allclose(float(m["nll_stream"][j - 1]), nll[inside].mean(), rtol=1e-4)
        hit = (ids[lp.argmax(-1)] == tgt) & inside
        np.testing.assert_allclose(float(m["acc_stream"][j - 1]), hit.mean(), rtol=1e-6)


def test_stream_ids_are_not_trained_and_set_the_streams_vocabulary():
    """make_train_step(..., stream_ids=ids): the streams' softmax runs over `ids`, the step
    differentiates only the float parameters, and ss_loss falls back to ssp.stream_ids."""
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=0)
    toks = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 10)), jnp.int32)
    feats = precompute_main(CFG, sscfg, PARAMS, toks)
    ids = jnp.asarray(np.unique(np.asarray(toks)), jnp.int32)  # every target is inside
    opt = make_optimizer(1e-2, total_steps=3)
    step = make_train_step(CFG, sscfg, opt, chunk=8)
    state, m = step(PARAMS, init_train_state(ssp, opt), feats, toks, stream_ids=ids)
    assert state.ssp.stream_ids is None and np.isfinite(float(m["loss"]))
    _, m_ids = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks, stream_ids=ids)
    _, m_own = ss_loss_jit(CFG, sscfg, PARAMS, ssp.replace(stream_ids=ids), feats, toks)
    _, m_all = ss_loss_jit(CFG, sscfg, PARAMS, ssp, feats, toks)
    np.testing.assert_allclose(np.asarray(m_ids["nll_stream"]), np.asarray(m_own["nll_stream"]), rtol=1e-6)
    # A softmax over fewer rows gives each (inside) target more probability.
    assert np.all(np.asarray(m_ids["nll_stream"]) < np.asarray(m_all["nll_stream"]))


def test_gpu_training_timing_script_tiny(tmp_path):
    """experiments/gpu/train_ss_gpu.py --tiny (the script prepared for a GPU session) runs on CPU
    and records a step time and a throughput for every (batch, stream vocabulary) setting."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "experiments" / "gpu" / "train_ss_gpu.py"), "--tiny",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    p = json.loads((tmp_path / "train_ss_gpu_tiny.json").read_text())
    assert {row["stream_vocab"] for row in p["rows"]} == {64, 512}
    for row in p["rows"]:
        assert row["step_ms"] > 0 and row["train_tokens_per_s"] > 0 and row["feature_ms"] > 0
    assert p["short_run"]["finite"] and p["weights"].startswith("RANDOM")


def test_train_script_fine_tunes_a_saved_adapter(tmp_path):
    """experiments/train_ss_draft.py --tiny, then --init-from that adapter: the second run starts
    from the saved weights (its step-0 held-out figures are the first run's final ones), and its
    metadata names where it started."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    common = ["--tiny", "--num-tokens", "512", "--heldout-tokens", "128", "--seq-len", "32", "--eval-every", "3",
              "--ckpt-every", "3", "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r"),
              "--ckpt-root", str(tmp_path / "c"), "--lr", "3e-2"]

    def run(*extra):
        r = subprocess.run([sys.executable, str(repo / "experiments" / "train_ss_draft.py"), *common, *extra],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    # The first adapter's SS config is not the script's default; the fine-tune (run with the defaults)
    # must take it, and the first adapter's stream vocabulary, from the checkpoint.
    first = run("--name", "a", "--steps", "3", "--msa-layers", "1", "--lora-rank", "4", "--stream-vocab", "64")
    assert first["eval_after"]["loss"] != first["eval_before"]["loss"]  # the adapter moved
    for g in (4, 7):  # held-out evals carry the window model's tokens per forward from their hit rates
        want = tokens_per_forward(g, first["eval_after"]["acc_stream"])
        assert first["eval_after"][f"tokens_per_forward_g{g}"] == pytest.approx(want)
    second = run("--name", "b", "--steps", "2", "--init-from", str(tmp_path / "c" / "a"))
    np.testing.assert_allclose(second["eval_before"]["loss"], first["eval_after"]["loss"], rtol=1e-6)
    meta = json.loads((tmp_path / "c" / "b" / "metadata.json").read_text())
    meta_a = json.loads((tmp_path / "c" / "a" / "metadata.json").read_text())
    assert meta["init_from"]["steps"] == 3 and meta["steps"] == 2
    assert meta["ss_config"] == meta_a["ss_config"] and meta["ss_config"]["num_msa_layers"] == 1
    assert meta["leaves"]["stream_ids"] == meta_a["leaves"]["stream_ids"]  # 64 ids and the special ones
    assert meta_a["leaves"]["stream_ids"][0][0] >= 64
    r = subprocess.run([sys.executable, str(repo / "experiments" / "train_ss_draft.py"), *common, "--name", "c",
                        "--init-from", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no SS adapter there" in r.stderr


def test_train_script_self_rollouts(tmp_path):
    """--data self: the training rows are the tiny draft's own greedy continuations of its prompts
    (checked against `generate_ar`), labels sit on the root and the continuation, and the held-out
    rows are the held-out split's prompts."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mirror_jax.engine.autoregressive import generate_ar

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "experiments"))
    from train_ss_draft import tiny_models

    p, g = 12, 10
    r = subprocess.run([sys.executable, str(repo / "experiments" / "train_ss_draft.py"), "--tiny", "--data", "self",
                        "--name", "s", "--num-prompts", "10", "--eval-frac", "0.2", "--prompt-len", str(p),
                        "--gen-len", str(g), "--gen-batch", "4", "--steps", "2", "--eval-every", "1",
                        "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r"),
                        "--ckpt-root", str(tmp_path / "c")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "data: 12 rows x 22 tokens (10 train / 2 eval)" in r.stdout
    (data_file,) = [f for f in (tmp_path / "w" / "s").glob("distill_*self*.npz") if "partial" not in f.name]
    d = np.load(data_file)
    ids = d["ids"].astype(str).tolist()
    assert ids[:2] == ["heldout:0", "heldout:1"] and ids[2:] == [f"train:{i}" for i in range(10)]
    _, draft = tiny_models()
    ref = generate_ar(draft.cfg, draft.params, d["tokens"][:, :p].tolist(), g)
    for row, mask, cont in zip(d["tokens"], d["mask"], ref.tokens, strict=True):
        assert row[p : p + len(cont)].tolist() == list(cont)
        assert mask[: p - 1].sum() == 0 and mask[p - 1 : p + len(cont)].all()
    meta = json.loads((tmp_path / "c" / "s" / "metadata.json").read_text())
    assert "own greedy continuations" in meta["data"] and meta["train_args"]["data"] == "self"


def test_bench_ss_tiny_reports_hit_rates(tmp_path):
    """experiments/bench_ss.py --tiny: every SS window equals the AR window, and the teacher-forced
    hit rates (held-out text, the draft's own continuation) are reported per SS method."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "experiments" / "bench_ss.py"), "--tiny", "--num-prompts", "2",
                        "--windows", "2", "--gammas", "3", "--out", str(tmp_path / "ss")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "ss.json").read_text())
    assert res["ss_equals_ar_all_windows"]
    (h,) = res["hit_rates"].values()
    assert len(h["text"]) == len(h["own"]) == 2 and all(0.0 <= a <= 1.0 for a in h["text"] + h["own"])
    assert h["own_tokens_per_forward_est"] >= 1.0
    assert h["own_window_model"] == {"3": pytest.approx(tokens_per_forward(3, h["own"]))}
    assert "own continuation: stream 1 / 2" in (tmp_path / "ss.md").read_text()
