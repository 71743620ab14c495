"""SpecBench ladder (`mirror-jax bench`) end to end on tiny random models, its error paths, the
round-time model, and the GPU timing kit's CPU path (--tiny)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirror_jax.bench.models import LADDER, LadderError, parse_methods
from mirror_jax.bench.questions import QuestionFileError
from mirror_jax.bench.runner import BenchConfig, run_ladder
from mirror_jax.cli import main as cli_main
from mirror_jax.engine.stats import modeled_round_ms

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--tiny", "--categories", "qa", "writing", "--limit-per-category", "1", "--max-new-tokens", "6",
            "--profile-max-new-tokens", "6", "--out", str(out), "--run-name", "tiny", "--no-progress",
            "--branch-budget", "2"]  # one device: without a budget Mirror-SD would roll out no branches
    rc = cli_main(argv)
    return rc, out / "tiny"


def test_bench_writes_every_artifact(tiny_run):
    rc, run = tiny_run
    assert rc == 0
    for name in ("results.json", "results.md", "acceptance.json"):
        assert (run / name).stat().st_size > 0, name
    for name in ("speedup.png", "phases.png", "accepted_hist.png"):
        assert (run / name).read_bytes()[:8] == PNG, name
    p = json.loads((run / "results.json").read_text())
    assert {"machine", "device_kinds", "config", "records", "aggregate", "placement"} <= p.keys()
    assert p["machine"]["versions"]["jax"]
    ran = set(p["methods"]) | set(p["skipped"])
    assert ran == set(LADDER)
    for m, why in p["skipped"].items():  # only the SS rungs may be skipped, and only with a reason
        assert m.endswith("_ss") and "ss_adapter" in why
    assert {"ar", "sd_ar", "mirror_ar"} <= set(p["methods"])
    assert set(p["aggregate"]["tasks"]) == {"qa", "mt_bench"}
    assert p["mismatches"] == [] and all(p["identical_to_ar"].values())
    ov = p["aggregate"]["overall"]
    assert ov["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    for m in p["methods"]:
        assert ov[m]["tokens_per_s"] > 0
        if m != "ar":
            assert ov[m]["mean_tokens_per_round"] >= 1
            assert ov[m]["phase_ms_median"] and ov[m]["modeled_round_ms"] > 0 and ov[m]["overlap_efficiency"] > 0
        if m.startswith("mirror"):
            assert 0 <= ov[m]["fallback_rate"] <= 1 and 0 <= ov[m]["omega_kappa"] <= 1
            assert ov[m]["modeled_round_ms"] <= ov[m]["serial_round_ms"] + 1e-9
    # multi-turn: the MT-bench question is fed turn by turn, every method with its own history
    writing = [r for r in p["records"] if r["category"] == "writing"]
    assert writing and all(len(r["turns"]) == 2 for r in writing)
    assert writing[0]["turns"][1]["prompt_tokens"] > writing[0]["turns"][0]["prompt_tokens"]
    md = (run / "results.md").read_text()
    assert "MODELED" in md and "| mirror_ar |" in md and "speedup.png" in md
    # the settings each method ran with, resolved (the run gave no gamma: the table names the value used)
    lines = md.splitlines()
    head = lines.index("| method | gamma | draft_stop | verify_rows | kappa | branch_budget | exit_layer | exit head |")
    row = next(x for x in lines[head:] if x.startswith("| mirror_ar | ")).split(" | ")
    gamma = {t["gamma"] for r in p["records"] if r["method"] == "mirror_ar" for t in r["turns"]}
    assert len(gamma) == 1 and row[1] == str(gamma.pop()) and row[5] == "2"  # --branch-budget 2
    assert row[3] == "off"  # rollouts verify full windows
    sd_rows = {tuple(t["verify_rows"]) for r in p["records"] if r["method"] == "sd_ar" for t in r["turns"]}
    row = next(x for x in lines[head:] if x.startswith("| sd_ar | ")).split(" | ")
    assert len(sd_rows) == 1 and row[3] == ("/".join(map(str, sd_rows.pop())) or "off")
    acc = json.loads((run / "acceptance.json").read_text())
    assert acc["methods"]["mirror_ar"]["mean_tokens_per_round"] >= 1


def test_settings_used_lists_what_each_method_ran_with():
    from mirror_jax.bench.report import settings_used

    turn = dict(gamma=7, draft_stop=0.6, verify_rows=[4], kappa=4, branch_budget=0, exit_layer=24, exit_head="trained")
    recs = [{"method": "ar", "turns": [{"new_tokens": 3}]},
            {"method": "sd_ar", "turns": [turn, {**turn, "gamma": 4}]},
            {"method": "mirror_ss", "turns": [turn, turn]}]
    used = settings_used(recs)
    assert set(used) == {"sd_ar", "mirror_ss"}
    assert used["sd_ar"]["gamma"] == [7, 4] and used["sd_ar"]["exit_layer"] == []  # sd has no exit
    assert used["sd_ar"]["verify_rows"] == [[4]]
    assert used["mirror_ss"]["exit_layer"] == [24] and used["mirror_ss"]["exit_head"] == ["trained"]


def test_malformed_question_file(tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{not json\n')
    rc = cli_main(["bench", "--tiny", "--questions", str(bad), "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text('{"question_id": 1, "category": "qa"}\n')
    with pytest.raises(QuestionFileError, match="turns"):
        run_ladder(BenchConfig(questions=str(bad), tiny=True, out=str(tmp_path)), progress=False)
    with pytest.raises(QuestionFileError, match="does not exist"):
        run_ladder(BenchConfig(questions=str(tmp_path / "missing.jsonl"), tiny=True), progress=False)


def test_unknown_category(tmp_path, capsys):
    rc = cli_main(["bench", "--tiny", "--categories", "qa", "poetry", "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown categories ['poetry']" in err and "translation" in err


def test_unknown_method(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--tiny", "--methods", "ar,eagle"])
    assert e.value.code == 2
    assert "unknown methods ['eagle']" in capsys.readouterr().err
    with pytest.raises(LadderError):
        parse_methods(["sd_ar", "medusa"])
    assert parse_methods("mirror_ss,sd_ar") == ["ar", "sd_ar", "mirror_ss"]  # ladder order, ar added


def test_round_time_model():
    ph = {"prefix": 2.0, "channel_ee": 0.1, "suffix": 3.0, "draft": 5.0, "verify": 0.5, "channel_fv": 0.2,
          "select_reuse": 0.3, "select_fallback": 4.3}
    m = modeled_round_ms(ph, "mirror", fallback_rate=0.25)
    common = 2.0 + 0.1 + 0.5 + 0.2 + 0.3 + 0.25 * 4.0
    assert m["modeled"] == pytest.approx(common + 5.0)
    assert m["serial"] == pytest.approx(common + 3.0 + 5.0)
    sd = modeled_round_ms({"target": 4.0, "verify": 0.5, "draft": 2.0, "channel_fv": 0.1}, "sd")
    assert sd["modeled"] == sd["serial"] == pytest.approx(6.6)


def test_specbench_questions_ship_with_the_package():
    """No data outside the package needed: the 480 SpecBench questions (and their provenance and licence) are package
    data, found without --questions, and declared so a wheel carries them."""
    import tomllib

    from mirror_jax.bench.questions import TASKS, default_question_file, load_questions

    path = default_question_file()
    assert path.is_file() and "mirror_jax" in path.parts
    rows = load_questions()
    assert len(rows) == 480 and {r["task"] for r in rows} == set(TASKS)
    assert [r["question_id"] for r in rows] == list(range(81, 561))
    for name in ("SOURCE.md", "LICENSE-Apache-2.0.txt"):
        assert (path.parent / name).is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(path.relative_to(REPO / "mirror_jax" / "bench").match(g) for g in data["mirror_jax.bench"])


def test_gpu_kit_tiny_cpu_path(tiny_run, tmp_path):
    _, run = tiny_run
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "experiments" / "gpu" / "run_gpu_kit.py"), "--tiny", "--out", str(tmp_path),
           "--acceptance", str(run / "acceptance.json"), "--budget-s", "120"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    p = json.loads((tmp_path / "gpu_kit_tiny.json").read_text())
    assert len(p["results"]) == 2 and all("error" not in x for x in p["results"]), p["results"]
    for res in p["results"]:
        ph = res["phases_ms"]
        for k in ("ar_step", "target_full", "verify", "prefix", "suffix", "draft_rollout_ar", "select_reuse_ar",
                  "select_fallback_ar", "mirror_round_ar", "sd_round_ar"):
            assert ph[k] is not None and ph[k] > 0, k
        bw = res["bandwidth"]  # the ar step against the device's measured copy bandwidth
        assert bw["device_copy_gbs"] > 0 and bw["step_weight_bytes"] > 0 and bw["step_kv_bytes"] > 0
        step_bytes = bw["step_weight_bytes"] + bw["step_kv_bytes"]
        assert bw["ar_effective_gbs"] == pytest.approx(step_bytes / ph["ar_step"] / 1e6)
        assert bw["fraction_of_copy"] == pytest.approx(bw["ar_effective_gbs"] / bw["device_copy_gbs"])
        proj = res["projection"]
        assert proj["mirror_ar"]["acceptance_from"] == "file"
        assert proj["mirror_ar"]["projected_speedup_modeled_two_device"] > 0
    bt = p["batch"]  # batch scaling: sd's device-loop round and ar's step at batch 1 and 4
    assert [r["batch"] for r in bt["rows"]] == [1, 4] and all("error" not in r for r in bt["rows"]), bt
    one, four = bt["rows"]
    assert one["sd_tokens_per_s_vs_batch1_projected"] == pytest.approx(1.0)
    assert four["sd_tokens_per_s_vs_batch1_projected"] == pytest.approx(4 * one["sd_round_ms"] / four["sd_round_ms"])
    assert four["ar_tokens_per_s_vs_batch1"] == pytest.approx(4 * one["ar_step_ms"] / four["ar_step_ms"])
    md = (tmp_path / "gpu_kit_tiny.md").read_text()
    assert "PROJECTED" in md and "MODELED" in md and "of the device's measured copy bandwidth" in md
    assert "## Batch scaling" in md


def _gpu_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "gpu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_gpu_kit_reads_acceptance_from_bench_methods(tmp_path):
    """A bench_methods.py run feeds the kit's projections: sd's tokens per round, and Mirror-SD's
    fallback as 1 - the hit rate with the most branches measured (the kit rolls out more), from the
    mirror row that falls back least; its exit layer becomes the configurations' prefix/suffix split."""
    kit = _gpu_script("run_gpu_kit")
    hits_a, hits_b = [0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.35, 0.4]
    run = {"args": {"gamma": 4, "kappa": 4}, "results": [
        {"method": "ar", "mean_tokens_per_round": None, "rounds": None, "hit_rate_by_budget": None},
        {"method": "sd", "mean_tokens_per_round": 2.8, "rounds": 109, "hit_rate_by_budget": None},
        {"method": "mirror_b2", "mean_tokens_per_round": 2.7, "rounds": 108, "fallback_rate": 0.65,
         "hit_rate_by_budget": hits_b, "exit": [14, "trained"], "omega_kappa": 0.8},
        {"method": "mirror_b2_x", "mean_tokens_per_round": 2.8, "rounds": 109, "fallback_rate": 0.59,
         "hit_rate_by_budget": hits_a, "exit": [24, "trained"], "omega_kappa": 0.85}]}
    path = tmp_path / "bench_methods_x.json"
    path.write_text(json.dumps(run))
    acc = kit.load_acceptance(str(path))
    assert acc["source"] == str(path)
    assert acc["methods"]["sd_ar"]["mean_tokens_per_round"] == 2.8 and acc["methods"]["sd_ar"]["gamma"] == 4
    m = acc["methods"]["mirror_ar"]
    assert m["fallback_rate"] == pytest.approx(1 - 0.6) and m["fallback_rate_at_cpu_budget"] == 0.59
    assert m["exit_layer"] == 24 and m["mean_tokens_per_round"] == 2.8
    configs = kit.default_configs("quick", acc, True, 1)
    assert [c.exit_layer for c in configs] == [24, 24] and all(c.gamma == 4 for c in configs)
    assert [c.exit_layer for c in kit.default_configs("quick", acc, True, 1, exit_layer=10)] == [10, 10]
    assert all(c.exit_layer is None for c in kit.default_configs("quick", None, True, 1))


def test_probe_step_tiny_cpu_path(tmp_path):
    """experiments/gpu/probe_step_gpu.py --tiny: the decode step against the measured bandwidth, the
    matmul-only chain, the forward-cost curve and a kernel profile from the trace, on the CPU."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "experiments" / "gpu" / "probe_step_gpu.py"), "--tiny", "--out", str(tmp_path),
           "--tokens", "1", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    p = json.loads((tmp_path / "probe_step_gpu_tiny.json").read_text())
    (res,) = p["results"]
    assert "error" not in res, res
    step_bytes = res["weight_bytes"] + res["kv_bytes"]
    assert res["ar_step_ms"] > 0 and res["matmul_chain_ms"] > 0
    assert res["ar_gbs"] == pytest.approx(step_bytes / res["ar_step_ms"] / 1e6)
    assert res["ar_fraction_of_copy"] == pytest.approx(res["ar_gbs"] / res["copy_gbs"])
    assert set(res["forward_ms_by_tokens"]) == {"1", "5"}
    assert res["forward_cost_vs_step"]["5"] == pytest.approx(res["forward_ms_by_tokens"]["5"] / res["ar_step_ms"])
    prof = res["profile"]  # on the CPU: the XLA thunks of the host plane
    assert prof["device_busy_ms_per_step"] > 0 and prof["top"] and prof["steps"] == 3
    assert prof["device_busy_ms_per_step"] == pytest.approx(sum(g["ms_per_step"] for g in prof["groups"].values()))
    md = (tmp_path / "probe_step_gpu_tiny.md").read_text()
    assert "matmul-only chain" in md and "forward over T tokens" in md and "Kernel profile" in md


def test_results_say_when_the_code_was_not_the_recorded_commit(tmp_path):
    """machine_info records git_dirty (tracked files changed since the commit) and machine_md says
    so next to the commit; outside a checkout it is None."""
    from mirror_jax.bench.report import _git_dirty, machine_md

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path, check=True,
                       capture_output=True)

    if subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("the temporary directory is inside a git checkout")
    assert _git_dirty(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    for name in ("f.py", "README.md", "experiments/results/r.json"):
        (tmp_path / name).write_text("x = 1\n")
        git("add", name)
    git("commit", "-q", "-m", "c")
    (tmp_path / "new.py").write_text("untracked\n")
    assert _git_dirty(tmp_path) is False  # untracked files do not count
    (tmp_path / "README.md").write_text("changed\n")
    (tmp_path / "experiments" / "results" / "r.json").write_text("changed\n")
    assert _git_dirty(tmp_path) is False  # nor do documents and results
    (tmp_path / "f.py").write_text("x = 2\n")
    assert _git_dirty(tmp_path) is True
    info = {"cpu": "c", "cores": 2, "mem_gib": 1, "devices": ["cpu:0"], "versions": {}, "git_commit": "a" * 40,
            "date": "d", "load_average": None}
    assert "uncommitted" not in machine_md({**info, "git_dirty": False})
    assert f"commit {'a' * 10} plus uncommitted changes;" in machine_md({**info, "git_dirty": True})


def test_results_name_the_cpus_vector_isa(monkeypatch, tmp_path):
    """XLA:CPU's bfloat16 speed depends on avx512_bf16: machine_info lists the vector flags from
    /proc/cpuinfo and machine_md names the ones that decide the kernels (nothing when unknown)."""
    from mirror_jax.bench import report

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: X\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile\n")
    real_path = report.Path
    monkeypatch.setattr(report, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert report._cpu_flags() == ["amx_tile", "avx2", "avx512_bf16", "avx512f", "fma"]  # not fpu, sse2
    info = {"cpu": "X", "cores": 2, "mem_gib": 1, "devices": ["cpu:0"], "versions": {}, "git_commit": "a" * 40,
            "date": "d", "load_average": None, "git_dirty": False}
    md = report.machine_md({**info, "cpu_flags": report._cpu_flags()})
    assert md.startswith("Machine: X (avx2 avx512_bf16 avx512f), ")
    assert report.machine_md(info).startswith("Machine: X, 2 cores")
