"""The SS window model (`mirror_jax.ss.window`): exact against a closed form and against a direct
simulation of `ss_chain`'s rule, its ceiling, and its inverse."""

import math

import numpy as np
import pytest

from mirror_jax.ss.window import acceptance_needed, expected_forwards, max_tokens_per_forward, tokens_per_forward


def simulate(gamma: int, accept, trials: int, rng) -> np.ndarray:
    """Forwards per window, drawn as `ss_chain` runs a window: the root emits one token; a forward
    with r tokens left feeds min(s, r - 1) lookaheads and emits 1 + (leading matches)."""
    s, out = len(accept), np.empty(trials)
    for n in range(trials):
        left, forwards = gamma - 1, 1
        while left > 0:
            m = min(s, left - 1)
            a = 0
            while a < m and rng.random() < accept[a]:
                a += 1
            left -= 1 + a
            forwards += 1
        out[n] = forwards
    return out


@pytest.mark.parametrize("gamma,accept", [(4, [0.41, 0.24]), (7, [0.41, 0.24]), (7, [0.8, 0.6, 0.3]),
                                          (5, [0.5]), (9, [0.9, 0.9])])
def test_expected_forwards_matches_a_simulation_of_the_window(gamma, accept):
    draws = simulate(gamma, accept, 20000, np.random.default_rng(0))
    se = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - expected_forwards(gamma, accept)) < 4 * se + 1e-12


def test_gamma_4_two_streams_closed_form():
    for p1, p2 in [(0.0, 0.0), (1.0, 1.0), (0.41, 0.24), (0.9, 0.1)]:
        closed = 2 + p1 * (1 - p2) + (1 - p1) * (2 - p1)
        assert expected_forwards(4, [p1, p2]) == pytest.approx(closed, abs=1e-12)


def test_no_acceptance_is_one_forward_per_token_and_ceiling_formula():
    for gamma in range(1, 12):
        for s in range(0, 5):
            assert expected_forwards(gamma, [0.0] * s) == pytest.approx(gamma)
            ceil = gamma / (1 + math.ceil((gamma - 1) / (s + 1)))
            assert max_tokens_per_forward(gamma, s) == pytest.approx(ceil)
    assert max_tokens_per_forward(4, 2) == 2.0 and max_tokens_per_forward(4, 4) == 2.0  # root forward bound


def test_acceptance_needed_inverts_the_model():
    p = acceptance_needed(4, 2, 1.8)
    assert p == pytest.approx(8 / 9, abs=1e-6)  # 4 / (2 + 2 (1 - p)) = 1.8
    assert tokens_per_forward(4, [p, p]) == pytest.approx(1.8, abs=1e-6)
    assert acceptance_needed(7, 3, 1.8) < acceptance_needed(7, 2, 1.8) < p
    assert acceptance_needed(4, 1, 1.8) is None  # ceiling 4/3
    assert acceptance_needed(4, 2, 1.0) == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma >= 1"):
        expected_forwards(0, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_forwards(4, [1.5, 0.1])


def test_window_model_experiment_explains_the_committed_ss_benchmarks(tmp_path):
    """`experiments/ss_window_model.py` over the committed `bench_ss.py` results: every row gets the
    model's forwards from its measured hit rates, within 5% of the measured forwards (README)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "ss_window_model.py"
    spec = importlib.util.spec_from_file_location("ss_window_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "ss_window_model.json").read_text())
    assert len(payload["rows"]) >= 6 and {r["gamma"] for r in payload["rows"]} == {4, 7}
    assert all(abs(r["model error"]) < 0.05 for r in payload["rows"])
    assert all(r["measured tokens/forward"] <= r["ceiling"] + 1e-9 for r in payload["rows"])
    assert (tmp_path / "ss_window_model.png").stat().st_size > 0
