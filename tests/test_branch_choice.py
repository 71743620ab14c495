"""The acceptance-model fit behind `mirror_jax.rounds.draft.ACCEPT_LOGIT` (experiments/branch_choice.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bc():
    spec = importlib.util.spec_from_file_location("branch_choice", REPO / "experiments" / "branch_choice.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["branch_choice"] = mod
    spec.loader.exec_module(mod)
    return mod


def synthetic_rounds(w, n, gamma=4, kappa=4, prompts=6, seed=0):
    """Rounds whose acceptance follows the logistic model with weights `w`: the target accepts d_j
    with probability sigmoid(b + w_exit p_exit(d_j) + w_draft q(d_j)) until it first rejects."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, q = rng.uniform(0.02, 1.0, gamma), rng.uniform(0.02, 1.0, gamma)
        acc = rng.random(gamma) < 1 / (1 + np.exp(-(w[0] + w[1] * p + w[2] * q)))
        a = int(np.argmin(acc)) if not acc.all() else gamma
        cand_lp = np.log(rng.dirichlet(np.ones(kappa + 1), gamma + 1)[:, :kappa])
        cand_ids = rng.choice(1000, (gamma + 1, kappa), replace=False)
        out.append(dict(prompt=i % prompts, a=a, c=int(cand_ids[a, 0]), path_lp=np.log(p).tolist(),
                        conf=np.log(q).tolist(), cand_lp=cand_lp.tolist(), cand_ids=cand_ids.tolist()))
    return out


def test_fit_accept_recovers_the_weights_that_generated_the_rounds(bc):
    true = np.array([-1.0, 2.5, 1.2])
    w = bc.fit_accept(synthetic_rounds(true, 4000), l2=1e-4)
    np.testing.assert_allclose(w, true, atol=0.25)
    other = bc.fit_accept(synthetic_rounds(np.array([0.5, 0.0, 3.0]), 4000, seed=1), l2=1e-4)
    assert abs(other[1]) < 0.3 and other[2] > 2.5  # a different truth gives a different fit


def test_offline_scores_are_the_library_rule(bc):
    """branch_choice ranks branches with its numpy copy of the rule; it must equal
    `mirror_jax.rounds.draft.branch_scores` (the engine's), for the library weights and others."""
    from mirror_jax.rounds.draft import ACCEPT_LOGIT, branch_scores
    from mirror_jax.rounds.payloads import Channel

    for r in synthetic_rounds(np.array([-0.5, 2.0, 1.5]), 5, seed=2):
        ch = Channel(cand_ids=jnp.asarray(r["cand_ids"]), cand_lp=jnp.asarray(r["cand_lp"], jnp.float32),
                     path_lp=jnp.asarray(r["path_lp"], jnp.float32))
        conf = jnp.asarray(r["conf"], jnp.float32)
        for w in (ACCEPT_LOGIT, (0.3, 1.0, -0.5)):
            np.testing.assert_allclose(bc.logistic_scores(r, w), branch_scores(ch, conf, accept_logit=w),
                                       rtol=1e-4, atol=1e-4)


def test_leave_one_prompt_out_ranks_every_round_once(bc):
    rounds = synthetic_rounds(np.array([-0.5, 2.0, 1.5]), 60, prompts=5, seed=3)
    pool = synthetic_rounds(np.array([-0.5, 2.0, 1.5]), 40, seed=4)
    for ranks in (bc.loo_ranks(rounds), bc.loo_ranks(rounds, pool)):
        assert len(ranks) == len(rounds)
        assert all(0 <= k < 20 for k in ranks)  # (gamma + 1) * kappa candidates, c always among them
