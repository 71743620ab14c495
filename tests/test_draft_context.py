"""A shortened draft context (``draft_context``): the draft prefills only the prompt's first
`CONTEXT_SINK` and last ``draft_context - CONTEXT_SINK`` tokens.

The draft only proposes, so every method's output stays the target's (greedy: AR's tokens, in the
host and the device loop, sd and mirror with branch rollouts); the draft's cache holds the shortened
prompt, and the two loops shorten the same way (they run the same rounds on a batch that mixes
prompts longer and shorter than the context)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax.engine import device_loop as DL
from mirror_jax.engine.api import ConfigError, generate, resolve_settings
from mirror_jax.engine.placement import Placement
from mirror_jax.engine.prefill import CONTEXT_SINK, draft_context_ids, draft_context_rows, pad_prompts
from mirror_jax.sampling import SamplingParams
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts
from tests.helpers import run_bench_sd_draft_tiny

CONTEXT, N_NEW = 80, 16


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.02)


def _prompts(seed: int = 4) -> list[list[int]]:
    """Six prompts of 20-150 tokens: some fit the context, some are cut."""
    ps = random_prompts(6, seed=seed, lo=20, hi=150)
    assert any(len(p) > CONTEXT for p in ps) and any(len(p) <= CONTEXT for p in ps)
    return ps


def test_rows_shorten_as_the_ids_do():
    """The traced row version keeps, per row, exactly the tokens of `draft_context_ids`."""
    ps = _prompts()
    toks, n = pad_prompts(ps)
    short, n_short = draft_context_rows(jnp.asarray(toks), jnp.asarray(n), CONTEXT)
    assert short.shape == (len(ps), CONTEXT)
    for b, p in enumerate(ps):
        want = draft_context_ids(p, CONTEXT)
        assert len(want) == min(len(p), CONTEXT) == int(n_short[b])
        assert np.asarray(short[b, : len(want)]).tolist() == want
        if len(p) > CONTEXT:
            assert want[:CONTEXT_SINK] == p[:CONTEXT_SINK] and want[CONTEXT_SINK:] == p[-(CONTEXT - CONTEXT_SINK):]
    tj, nj = jnp.asarray(toks), jnp.asarray(n)
    assert all(a is b for a, b in zip(draft_context_rows(tj, nj, 0), (tj, nj), strict=True))  # 0: unchanged
    assert all(a is b for a, b in zip(draft_context_rows(tj, nj, toks.shape[1]), (tj, nj), strict=True))  # all fit
    assert draft_context_ids(ps[0], 0) == ps[0]


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_a_shortened_draft_context_keeps_ar_tokens(models, method):
    """Greedy sd (host and device loop, the same rounds) and mirror with one rolled-out branch per
    round: AR's tokens with the draft reading 80 of up to 150 prompt tokens; the shortened context
    changes what the draft proposes (a different accepted-length histogram than the full context)."""
    target, draft = models
    ps = _prompts()
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method=method, draft=draft, gamma=4)
    if method == "mirror":
        kw.update(branch_budget=1, exit_layer=2)
    full = generate(target, ps, N_NEW, **kw)
    host = generate(target, ps, N_NEW, draft_context=CONTEXT, **kw)
    assert host.tokens == full.tokens == ref
    assert host.stats["settings"]["draft_context"] == CONTEXT and full.stats["settings"]["draft_context"] == 0
    assert host.stats["accepted_hist"] != full.stats["accepted_hist"]
    dev = generate(target, ps, N_NEW, draft_context=CONTEXT, loop="device", **kw)
    assert dev.tokens == ref
    if method == "sd":  # mirror's device loop maps rows differently; its tokens are what is promised
        for key in ("rounds", "accepted_hist"):
            assert dev.stats[key] == host.stats[key], key


def test_the_draft_cache_holds_the_shortened_prompt(models):
    """After the device loop's start, each row's draft cache holds min(len, context) prompt tokens
    plus the first window's feed, the target's the whole prompt."""
    (cfg, tp), (_, dp) = models
    ps = _prompts()
    s = resolve_settings("sd", cfg, Placement.parse(None), gamma=3, kappa=None, exit_layer=None, branch_budget=None,
                         verifier=None, sampling=SamplingParams(), profile=False, allow_full_exit=False,
                         draft_stop=0.0, draft_context=CONTEXT)
    spec = DL.LoopSpec(cfg, cfg, s, N_NEW, 256)
    toks, n = pad_prompts(ps)
    st = DL.start(spec, tp, dp, jnp.asarray(toks), jnp.asarray(n), SamplingParams().arrays(row=np.arange(len(ps))))
    np.testing.assert_array_equal(np.asarray(st.cache_t.lengths), n)
    fed = np.asarray(st.cache_d.lengths) - np.minimum(n, CONTEXT)  # the chain's feed: the same for every row
    assert (fed == fed[0]).all() and 0 <= fed[0] <= 3


def test_draft_context_settings_are_checked(models):
    target, draft = models
    for bad in (-1, 10, 2 * CONTEXT_SINK, 100.0, True, "256"):
        with pytest.raises(ConfigError, match="draft_context must be 0"):
            generate(target, [[1, 2, 3]], 4, method="sd", draft=draft, draft_context=bad)


def test_bench_sd_draft_runs_a_draft_context_setting(tmp_path):
    """experiments/bench_sd_draft.py --tiny with a ``cN`` setting: the row records its draft context
    and is named by it; its output is ar's."""
    p = run_bench_sd_draft_tiny(tmp_path, "3:0:0:int8,3:0:0:int8:c80")
    assert [row["draft_context"] for row in p["rows"]] == [None, 0, 80]
    assert all(row["identical_to_ar"] for row in p["rows"])
    assert set(p["per_prompt"][0]) >= {"ar", "3:0.0:0::int8", "3:0.0:0::int8:c80"}
