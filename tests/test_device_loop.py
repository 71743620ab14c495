"""The device loop (`generate(..., loop="device")`, `mirror_jax.engine.device_loop`): the whole
batch decoded inside one `lax.while_loop` gives the host loop's tokens and statistics, row by row,
for greedy and sampled decoding, with EOS and the SS draft; it runs inside a user's own `jax.jit`
without a host transfer and compiles once per bucket."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax.engine import device_loop as DL
from mirror_jax.engine.api import ConfigError, generate, resolve_settings
from mirror_jax.engine.placement import Placement
from mirror_jax.engine.prefill import cache_capacity, pad_prompts
from mirror_jax.sampling import SamplingParams
from mirror_jax.ss.model import SSConfig, init_ss_params
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts

N_NEW = 24
STAT_KEYS = ("rounds", "accepted_hist", "draft_forwards_per_round", "reuse", "fallback", "omega_kappa")


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.005)


@pytest.fixture(scope="module")
def batch():
    """Six prompts of different lengths (one bucket), and their greedy AR tokens."""
    target, _ = pair(noise=0.005)
    ps = prompts(6, seed=1)
    return ps, generate(target, ps, N_NEW).tokens


def _stats(res):
    return {k: res.stats.get(k) for k in STAT_KEYS}


@pytest.mark.parametrize("method", ["sd", "mirror"])
@pytest.mark.parametrize("gamma,kappa,exit_layer,budget", [(1, 1, 1, 1), (3, 4, 2, None), (3, 4, 2, 2),
                                                          (7, 8, 2, 64)])
def test_device_loop_matches_host_loop_greedy(models, batch, method, gamma, kappa, exit_layer, budget):
    """Batch 6 in one loop: AR's tokens, and the host loop's round statistics (same rounds,
    accepted-length histogram, draft forwards, reuse and Omega), so every row ran the same rounds."""
    target, draft = models
    ps, ref = batch
    kw = dict(method=method, draft=draft, gamma=gamma, kappa=kappa, exit_layer=exit_layer, branch_budget=budget)
    host = generate(target, ps, N_NEW, **kw)
    dev = generate(target, ps, N_NEW, loop="device", **kw)
    assert dev.tokens == ref == host.tokens
    assert _stats(dev) == _stats(host)
    assert dev.stats["mean_tokens_per_round"] > 1.2 and dev.stats["loop"] == "device" and dev.stats["batch"] == 6
    # Per-row statistics: each row's rounds equal its own batch-1 host run's.
    for b in (0, 3):
        one = generate(target, [ps[b]], N_NEW, **kw)
        assert dev.stats["per_row"][b]["rounds"] == one.stats["rounds"]
        assert dev.stats["per_row"][b]["accepted_hist"] == one.stats["accepted_hist"]


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_device_loop_eos_rows_finish_at_different_times(models, method):
    """Rows that commit an EOS stop (idle) while the others go on; each is truncated like AR."""
    target, draft = models
    ps = prompts(4, seed=5)
    plain = generate(target, ps, N_NEW).tokens
    eos = [plain[0][N_NEW // 2], plain[2][N_NEW // 3]]
    ref = generate(target, ps, N_NEW, eos_ids=eos).tokens
    assert len({len(r) for r in ref}) > 1  # rows really end at different lengths
    kw = dict(method=method, draft=draft, gamma=7, kappa=4, eos_ids=eos)
    dev = generate(target, ps, N_NEW, loop="device", **kw)
    host = generate(target, ps, N_NEW, **kw)
    assert dev.tokens == ref
    assert dev.stats["rounds"] == host.stats["rounds"]  # finished rows ran no further rounds


@pytest.mark.parametrize("n_new", [1, 2, 9])
def test_device_loop_max_new_tokens(models, batch, n_new):
    target, draft = models
    ps, _ = batch
    ref = generate(target, ps, n_new).tokens
    for method in ("sd", "mirror"):
        assert generate(target, ps, n_new, method=method, draft=draft, gamma=7, kappa=4, loop="device").tokens == ref


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_device_loop_sampling(method):
    """Sample-and-match reproduces AR's samples for the seed; rejection sampling commits the host
    loop's tokens (same position-keyed draws, also with several rows)."""
    target, draft = pair(noise=0.05)
    ps = prompts(3, seed=21)
    for seed in (0, 1):
        kw = dict(temperature=0.8, top_k=5, top_p=0.9, seed=seed)
        ref = generate(target, ps, 16, **kw).tokens
        assert generate(target, ps, 16, method=method, draft=draft, gamma=3, kappa=4, loop="device", **kw).tokens == ref
        kw = dict(method=method, draft=draft, gamma=3, kappa=4, temperature=1.0, seed=seed, verifier="rejection")
        host, dev = generate(target, ps, 16, **kw), generate(target, ps, 16, loop="device", **kw)
        assert dev.tokens == host.tokens
        assert dev.stats["accepted_hist"] == host.stats["accepted_hist"]


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_device_loop_with_ss_draft(models, batch, method):
    target, draft = models
    ps, ref = batch
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(draft[0], sscfg, draft[1], seed=3)
    kw = dict(method=method, draft=draft, gamma=4, kappa=4, ss_adapter=(sscfg, ssp))
    dev = generate(target, ps, N_NEW, loop="device", **kw)
    assert dev.tokens == ref and dev.stats["draft_kind"] == "ss"
    assert dev.stats["accepted_hist"] == generate(target, ps, N_NEW, **kw).stats["accepted_hist"]


def _spec_and_inputs(models, ps, method="mirror", n_new=N_NEW):
    (cfg, tp), (_, dp) = models
    pl = Placement.parse("cpu:0")
    samp = SamplingParams()
    s = resolve_settings(method, cfg, pl, gamma=3, kappa=4, exit_layer=2, branch_budget=4, verifier=None,
                         sampling=samp, profile=False, allow_full_exit=False)
    cap = cache_capacity(max(map(len, ps)), n_new, s.margin())
    spec = DL.LoopSpec(cfg, cfg, s, n_new, cap)
    toks, n_valid = pad_prompts(ps)
    return spec, tp, dp, jnp.asarray(toks), jnp.asarray(n_valid), samp.arrays(row=np.arange(len(ps)))


def test_decode_inside_a_user_jit_makes_no_host_transfer(models, batch):
    """`start` and `decode` are traceable: a user's own jitted function runs the whole decode and
    post-processes on device. The call transfers nothing to or from the host (negative control:
    the same call with one host array as input is caught by the guard), and the compiled program is
    one while loop with no host callback in it (negative control: a `jax.debug.callback` in the
    round shows up)."""
    ps, ref = batch
    spec, tp, dp, toks, n_valid, samp = _spec_and_inputs(models, ps)

    def user_fn(tp, dp, toks, n_valid, samp):
        st = DL.decode(spec, tp, dp, DL.start(spec, tp, dp, toks, n_valid, samp), samp)
        return st.out, st.n_out, jnp.sum(st.stats.rounds)

    args = jax.device_put((tp, dp, toks, n_valid, samp))
    fn = jax.jit(user_fn)
    jax.block_until_ready(fn(*args))  # compile outside the guard
    with jax.transfer_guard("disallow"):
        out, n_out, rounds = fn(*args)
        jax.block_until_ready(out)
    out, n_out = np.asarray(out), np.asarray(n_out)
    assert [out[b, : min(n_out[b], N_NEW)].tolist() for b in range(len(ps))] == ref
    assert int(rounds) < len(ps) * N_NEW  # several tokens per round
    with pytest.raises(Exception, match="[Dd]isallowed"), jax.transfer_guard("disallow"):
        fn(*args[:2], np.asarray(toks), *args[3:])

    hlo = fn.lower(*args).compile().as_text()
    assert " while(" in hlo and "callback" not in hlo

    def leaky_fn(tp, dp, toks, n_valid, samp):
        st = DL.start(spec, tp, dp, toks, n_valid, samp)
        st = DL.decode(spec, tp, dp, st, samp)
        jax.debug.callback(lambda x: None, st.n_out)
        return st.out

    assert "callback" in jax.jit(leaky_fn).lower(*args).compile().as_text()


def test_device_loop_compiles_once_per_bucket(models):
    """New prompts in the same bucket, and other max_new_tokens within the same cache capacity (the
    limit is traced), reuse the compiled loop; the outputs still equal ar's."""
    target, draft = models
    kw = dict(draft=draft, gamma=3, kappa=4, loop="device")
    for m in ("sd", "mirror"):
        generate(target, prompts(3, seed=8, lo=5, hi=9), N_NEW, method=m, **kw)
    size = DL.run_device_loop._cache_size()
    ps = prompts(3, seed=9, lo=5, hi=9)
    for m in ("sd", "mirror"):
        generate(target, ps, N_NEW, method=m, **kw)  # same bucket, new prompts
        for n in (N_NEW - 3, N_NEW + 4):
            assert generate(target, ps, n, method=m, **kw).tokens == generate(target, ps, n).tokens
    assert DL.run_device_loop._cache_size() == size


def test_traced_length_limit_per_row(models, batch):
    """LoopSpec(max_new_tokens=None): the limit is a traced argument, one per row; each row stops at
    its own limit with ar's tokens. Giving the limit twice, or not at all, is an error."""
    ps, ref = batch
    spec, tp, dp, toks, n_valid, samp = _spec_and_inputs(models, ps)
    traced = dataclasses.replace(spec, max_new_tokens=None)
    limits = np.asarray([1, 4, N_NEW, 7, 2, 9][: len(ps)], np.int32)
    res = DL.run_device_loop(traced, tp, dp, toks, n_valid, samp, max_new=jnp.asarray(limits))
    out, n_out = np.asarray(res.tokens), np.asarray(res.n_out)
    assert out.shape[1] == spec.capacity
    for b, lim in enumerate(limits):
        assert n_out[b] >= min(lim, len(ref[b])) and out[b, :lim].tolist()[: len(ref[b][:lim])] == ref[b][:lim]
    assert np.sum(np.asarray(res.stats.rounds)) < np.sum(np.asarray(DL.run_device_loop(
        spec, tp, dp, toks, n_valid, samp).stats.rounds))  # shorter limits: fewer rounds (negative control)
    with pytest.raises(ValueError, match="give the length limit once"):
        DL.run_device_loop(spec, tp, dp, toks, n_valid, samp, max_new=jnp.int32(3))
    with pytest.raises(ValueError, match="give the length limit once"):
        DL.run_device_loop(traced, tp, dp, toks, n_valid, samp)


def test_device_loop_bad_settings(models):
    target, draft = models
    ps = prompts(2)
    with pytest.raises(ConfigError, match="loop='host' for a two-device placement"):
        generate(target, ps, 4, method="sd", draft=draft, loop="device", placement="cpu:0,cpu:1")
    with pytest.raises(ConfigError, match="per-phase"):
        generate(target, ps, 4, method="mirror", draft=draft, loop="device", profile=True)
    with pytest.raises(ConfigError, match="applies to methods"):
        generate(target, ps, 4, loop="device")
    with pytest.raises(ConfigError, match="loop must be one of"):
        generate(target, ps, 4, method="sd", draft=draft, loop="gpu")
