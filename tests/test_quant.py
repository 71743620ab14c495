"""The int8 draft (`mirror_jax.quant`): weights per output row, activations per token (W8A8).

The product approximates the float one within the quantization error; its int32 accumulation is
exact, so a row's result does not depend on which other rows share the call (one row, padded to
two, gives the bits it gives inside a batch). The draft only proposes, so sd and mirror keep AR's
output with an int8 draft (greedy: host and device loop, with an SS adapter, two devices) and the
target's exact distribution under rejection sampling; it is the CPU default; bad settings are
refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.engine.api import ConfigError, _quant_setting, generate
from mirror_jax.engine.placement import Placement
from mirror_jax.kv_cache import init_cache
from mirror_jax.quant import Int8Weight, QuantError, dense_int8, params_quantized, quantize_int8, quantize_params
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts
from tests.test_engine_sampling import _exact_second_token_dist, chi2_pvalue

N_NEW = 24


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.02)


def test_weight_quantization_error_is_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32) * np.linspace(0.01, 3, 48)[:, None]
    w[5] = 0.0  # an all-zero row: scale 1, q 0
    qw = quantize_int8(jnp.asarray(w))
    assert qw.q.dtype == jnp.int8 and qw.scale.dtype == jnp.float32 and qw.shape == (48, 96)
    assert int(jnp.max(jnp.abs(qw.q.astype(jnp.int32)))) == 127
    err = np.abs(np.asarray(qw.dequantize()) - w)
    assert np.all(err <= np.asarray(qw.scale)[:, None] / 2 + 1e-7)
    assert np.all(np.asarray(qw.q[5]) == 0) and float(qw.scale[5]) == 1.0


def test_int8_product_approximates_the_float_one():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((200, 128)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    exact = np.asarray(x @ w.T)
    approx = np.asarray(M.dense(x, quantize_int8(w)))
    rel = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert rel < 0.02, rel  # two 8-bit roundings: ~1% relative error
    assert rel > 0  # and it is an approximation (the float path is not silently taken)
    assert np.asarray(M.dense(x, quantize_int8(w), out_dtype=jnp.float32)).dtype == np.float32


def test_rows_are_independent_bit_for_bit():
    """The int32 accumulation is exact: one row alone (padded to two) gives the bits it gives among
    seven others, so a window, a batch and a one-row step agree exactly."""
    rng = np.random.default_rng(2)
    qw = quantize_int8(jnp.asarray(rng.standard_normal((300, 64)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    f = jax.jit(dense_int8)
    many = np.asarray(f(x, qw))
    for r in (0, 3, 7):
        np.testing.assert_array_equal(np.asarray(f(x[r : r + 1], qw)), many[r : r + 1])
    np.testing.assert_array_equal(np.asarray(f(x[2:5], qw)), many[2:5])


def test_quantized_draft_forward_tracks_the_float_draft(models):
    (cfg, _), (_, dp) = models
    dq = quantize_params(dp)
    assert params_quantized(dq) and not params_quantized(dp)
    assert isinstance(dq.layers[0].w_gate_up, Int8Weight) and isinstance(dq.lm_head, Int8Weight)
    assert dq.embed is dp.embed and dq.layers[0].b_qkv is dp.layers[0].b_qkv  # the table and biases stay float
    assert quantize_params(dp, "none") is dp
    toks = jnp.asarray([prompts(1, seed=5, lo=12, hi=13)[0]])
    lf, _ = M.forward(cfg, dp, toks, init_cache(cfg, 1, 16))
    lq, _ = M.forward(cfg, dq, toks, init_cache(cfg, 1, 16))
    lf, lq = np.asarray(lf[0]), np.asarray(lq[0])
    assert np.corrcoef(lf.ravel(), lq.ravel())[0, 1] > 0.99
    assert np.abs(lf - lq).max() > 0  # really quantized


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_int8_draft_keeps_ar_output(models, method):
    target, draft = models
    ps = prompts(4, seed=12)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method=method, draft=draft, gamma=4, kappa=4, branch_budget=2 if method == "mirror" else None)
    flt = generate(target, ps, N_NEW, draft_quant="none", **kw)
    host = generate(target, ps, N_NEW, draft_quant="int8", **kw)
    dev = generate(target, ps, N_NEW, draft_quant="int8", loop="device", **kw)
    two = generate(target, ps[:2], N_NEW, draft_quant="int8", placement="cpu:0,cpu:1", **kw)
    assert host.tokens == ref == dev.tokens == flt.tokens and two.tokens == ref[:2]
    assert host.stats["draft_quant"] == dev.stats["draft_quant"] == "int8" and flt.stats["draft_quant"] == "none"
    assert host.stats["accepted_hist"] == dev.stats["accepted_hist"]  # rows are independent: the same rounds
    assert host.stats["mean_accepted"] > 0.5 * flt.stats["mean_accepted"]  # a useful draft still


def test_int8_ss_draft_keeps_ar_output(models):
    from mirror_jax.ss.model import SSConfig, init_ss_params

    target, (dcfg, dp) = models
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    adapter = (sscfg, init_ss_params(dcfg, sscfg, dp, seed=1))
    ps = prompts(3, seed=21)
    ref = generate(target, ps, N_NEW).tokens
    for method in ("sd", "mirror"):
        res = generate(target, ps, N_NEW, method=method, draft=(dcfg, dp), gamma=4, ss_adapter=adapter,
                       draft_quant="int8")
        assert res.tokens == ref and res.stats["draft_kind"] == "ss" and res.stats["draft_quant"] == "int8"


def test_int8_draft_rejection_sampling_distribution():
    """The second generated token follows the target's exact marginal with an int8 draft (its own q
    is the proposal rejection sampling corrects)."""
    target, draft = pair(noise=0.05, vocab=8)
    prompt = [1, 2, 3]
    exact = _exact_second_token_dist(*target, prompt)
    second = [generate(target, [prompt], 2, method="sd", draft=draft, gamma=2, temperature=1.0, seed=seed,
                       verifier="rejection", draft_quant="int8").tokens[0][1] for seed in range(400)]
    assert chi2_pvalue(np.array(second), exact / exact.sum()) > 1e-3


def test_cpu_default_is_int8_and_bad_settings_are_refused(models):
    target, draft = models
    ps = prompts(1)
    assert generate(target, ps, 6, method="sd", draft=draft).stats["draft_quant"] == "int8"
    for bad in ("int4", "fp8", 8, True):
        with pytest.raises(ConfigError, match="draft_quant"):
            generate(target, ps, 4, method="sd", draft=draft, draft_quant=bad)
    grouped = Placement.on(jax.devices()[0], tuple(jax.devices()[:2]))  # the draft sharded over a group
    with pytest.raises(ConfigError, match="one device"):
        _quant_setting("int8", grouped)
    assert _quant_setting("none", grouped) == "none" and _quant_setting(None, grouped) == "none"
    with pytest.raises(QuantError):
        quantize_params(draft[1], "int4")


def test_bench_sd_draft_compares_float_and_int8_drafts(tmp_path):
    """experiments/bench_sd_draft.py --tiny with a float and an int8 setting: one row each, both
    identical to ar, the quantization recorded per row and in the forward timings."""
    from tests.helpers import run_bench_sd_draft_tiny

    p = run_bench_sd_draft_tiny(tmp_path, "3:0:0:none,3:0:0:int8,3:0:40")
    sd = [row for row in p["rows"] if row["method"] == "sd"]
    assert [row["draft_quant"] for row in sd] == ["none", "int8", "int8"]  # the last: the CPU default
    assert all(row["identical_to_ar"] for row in p["rows"])
    assert set(p["draft_forward_ms"]) == {"0/none", "0/int8", "40/int8"}
    assert all(0.0 < row["start_s_median"] and 0.0 < row["start_share"] < 1.0 for row in p["rows"])


def test_quantized_draft_takes_a_reduced_head(models):
    """A draft quantized by the user (`quantize_params`) then given to generate with a reduced head
    (the CPU default draft_vocab): cutting the int8 head equals quantizing the cut head."""
    from mirror_jax.draft_vocab import restrict_head

    target, (dcfg, dp) = models
    ids = list(range(0, 64, 2))
    a, b = restrict_head(quantize_params(dp), dcfg, ids), quantize_params(restrict_head(dp, dcfg, ids))
    np.testing.assert_array_equal(np.asarray(a.lm_head.q), np.asarray(b.lm_head.q))
    np.testing.assert_array_equal(np.asarray(a.lm_head.scale), np.asarray(b.lm_head.scale))
    ps = prompts(2, seed=30)
    res = generate(target, ps, 12, method="sd", draft=(dcfg, quantize_params(dp)), draft_vocab=32, gamma=3)
    assert res.tokens == generate(target, ps, 12).tokens
    assert res.stats["draft_vocab"] == 32 and res.stats["draft_quant"] == "int8"
