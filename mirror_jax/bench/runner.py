"""SpecBench method ladder: ar, SD and Mirror-SD with an AR or a speculative-streaming draft.

One run decodes the same SpecBench questions with every method of the ladder

=============  ===================================================================
``ar``         target alone (the baseline every speed-up is relative to)
``sd_ar``      vanilla speculative decoding, autoregressive draft
``sd_ss``      vanilla speculative decoding, speculative-streaming (SS) draft
``mirror_ar``  Mirror-SD, autoregressive draft
``mirror_ss``  Mirror-SD, SS draft
=============  ===================================================================

following SpecBench's conventions: batch 1, each model's chat template, multi-turn questions fed
turn by turn (each method's own reply is appended to the history before the next user turn),
compilation excluded from timing (a timed turn during which XLA compiled anything is re-run),
tokens counted from ids. Methods are interleaved per question so slow drifts of the machine hit
all of them alike.

Outputs (`run_ladder`): ``<out>/<run_name>/results.json`` (machine, versions, configuration,
per-question records with every round, aggregates), ``results.md`` (tables), ``acceptance.json``
(per-method acceptance statistics, the input of ``experiments/gpu/run_gpu_kit.py``) and three
plots: ``speedup.png``, ``phases.png``, ``accepted_hist.png`` (`mirror_jax.bench.report`). The
aggregation is `mirror_jax.bench.aggregate`; the models and codecs `mirror_jax.bench.models`.

Per-phase times come from a second, instrumented pass (``profile=True``: every phase blocked on
and timed on its own) over a subset of questions. From them the spec's round-time formula gives
the MODELED two-device round time (section 1)::

    T_mirror = T_prefix + T_rv_ee + max(T_suffix, T_draft) + T_verify + T_rv_fv
               + T_select(reuse) + fallback_rate * (T_select(fallback) - T_select(reuse))

which is reported next to the round time measured with the actual placement; "overlap efficiency"
is measured / modeled (1.0: the overlap the formula assumes is achieved; on one device the phases
run serialised and the ratio is well above 1).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from mirror_jax.bench.models import LADDER, RUNGS, BenchModels, LadderError, default_models, parse_methods, tiny_models


@dataclasses.dataclass
class BenchConfig:
    questions: str | None = None
    categories: list[str] | None = None
    limit_per_category: int | None = 2
    max_new_tokens: int = 128
    temperature: float = 0.0
    repeats: int = 1
    methods: list[str] = dataclasses.field(default_factory=lambda: list(LADDER))
    gamma: int | None = None
    draft_stop: float | None = None
    draft_stop_rule: str | None = None
    verify_rows: tuple[int, ...] | None = None
    draft_vocab: int | None = None
    draft_context: int | None = None
    draft_quant: str | None = None
    exit_vocab: int | None = None
    kappa: int | None = None
    branch_budget: int | None = None
    exit_layer: int | None = None
    placement: str | None = None
    profile_per_task: int = 1
    profile_max_new_tokens: int = 32
    profile_max_questions: int | None = None
    seed: int = 0
    out: str | None = None
    run_name: str | None = None
    tiny: bool = False
    checkpoints: str | None = None
    command: str = ""

    def validate(self) -> None:
        self.methods = parse_methods(self.methods)
        for name in ("max_new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise LadderError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit_per_category is not None and self.limit_per_category < 1:
            raise LadderError(f"limit_per_category must be >= 1, got {self.limit_per_category}")
        if self.temperature < 0:
            raise LadderError(f"temperature must be >= 0, got {self.temperature}")
        if self.profile_per_task < 0:
            raise LadderError(f"profile_per_task must be >= 0, got {self.profile_per_task}")



def default_results_dir() -> Path:
    """``./experiments/results`` (relative to the working directory; ``--out`` chooses another)."""
    return Path.cwd() / "experiments" / "results"


class _CompileWatch:
    """Counts XLA backend compilations (jax.monitoring), so timed runs that compiled are redone. A
    program loaded from the persistent compilation cache (`mirror_jax.compile_cache`) counts too:
    jax reports its load under the same event, so such a run is redone as well."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


_WATCH: _CompileWatch | None = None


def _watch() -> _CompileWatch:
    global _WATCH
    if _WATCH is None:
        _WATCH = _CompileWatch()
    return _WATCH


def _gen_kwargs(method: str, cfg: BenchConfig, models: BenchModels, profile: bool = False) -> dict:
    engine, draft_kind = RUNGS[method]
    kw = dict(method=engine, placement=cfg.placement, temperature=cfg.temperature, seed=cfg.seed,
              eos_ids=models.eos_ids)
    if engine == "ar":
        return kw
    kw.update(draft=models.draft, gamma=cfg.gamma, profile=profile, draft_vocab=cfg.draft_vocab,
              draft_quant=cfg.draft_quant, draft_context=cfg.draft_context)
    if engine == "mirror":
        kw.update(kappa=cfg.kappa, branch_budget=cfg.branch_budget, exit_layer=cfg.exit_layer,
                  exit_vocab=cfg.exit_vocab)
    if draft_kind == "ss":
        kw["ss_adapter"] = models.ss_adapter
    if engine == "sd":  # either draft ends its windows by the same rule
        kw["draft_stop"] = cfg.draft_stop
        kw["draft_stop_rule"] = cfg.draft_stop_rule
        kw["verify_rows"] = cfg.verify_rows
    return kw


def _turn_record(res, prompt_len: int, seconds: float, retried: int, profile: bool = False) -> dict:
    """One generated turn: sizes, wall time and, for sd/mirror, the settings and every round record
    (`mirror_jax.engine.stats.RoundRecord` dicts; the branch lists only in the profiled pass)."""
    s = res.stats
    rec = {"prompt_tokens": prompt_len, "new_tokens": len(res.tokens[0]), "seconds": seconds,
           "retimed_after_compile": retried}
    if s.get("method") == "ar":
        rec.update(decode_s=s.get("decode_s"), decode_steps=s.get("decode_steps"))
        return rec
    rec.update({k: s["settings"][k] for k in ("gamma", "kappa", "branch_budget", "exit_layer", "draft_stop")})
    rec["verify_rows"] = list(s["settings"].get("verify_rows", ()))
    rec["exit_head"] = s.get("exit_head")
    keep = lambda r: r if profile else {k: v for k, v in r.items() if k not in ("branches", "phases")}
    rec["rounds"] = [keep(r) for r in s.get("per_round", [])]
    return rec


def timed_without_compiles(fn, max_retries: int = 2):
    """``fn()`` timed; run again (up to `max_retries` times) while XLA compiled something during the
    run (e.g. a prompt in a new length bucket), so timings never include compilation.

    Returns (result, seconds, retries)."""
    watch = _watch()
    attempt = 0
    for attempt in range(max_retries + 1):  # noqa: B007 (returned below)
        before = watch.count
        t0 = time.perf_counter()
        res = fn()
        seconds = time.perf_counter() - t0
        if watch.count == before:
            break
    return res, seconds, attempt


def _run_turn(generate, models, prompt, n_new, kw, max_retries: int = 2):
    """Generate once, timed (`timed_without_compiles`)."""
    return timed_without_compiles(lambda: generate(models.target, [prompt], n_new, **kw), max_retries)


def run_conversation(generate, models: BenchModels, question: dict, n_new: int, kw: dict,
                     max_turns: int | None = None, profile: bool = False):
    """Feed a question's user turns one at a time; each reply joins the history. Returns the turn
    records and the generated ids per turn."""
    history, recs, ids = [], [], []
    for turn in question["turns"][:max_turns]:
        history.append({"role": "user", "content": turn})
        prompt = models.codec.encode(history)
        if profile:
            t0 = time.perf_counter()
            res = generate(models.target, [prompt], n_new, **kw)
            res_s, retried = time.perf_counter() - t0, 0
        else:
            res, res_s, retried = _run_turn(generate, models, prompt, n_new, kw)
        recs.append(_turn_record(res, len(prompt), res_s, retried, profile))
        ids.append([int(t) for t in res.tokens[0]])
        history.append({"role": "assistant", "content": models.codec.decode(res.tokens[0])})
    return recs, ids


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_ladder(cfg: BenchConfig, models: BenchModels | None = None, *, progress: bool = True,
               log: Callable[[str], None] = print) -> tuple[dict, Path]:
    """Run the ladder and write every artifact; returns (payload, run directory)."""
    from mirror_jax.bench.aggregate import aggregate
    from mirror_jax.bench.questions import load_questions
    from mirror_jax.bench.report import machine_info, write_artifacts
    from mirror_jax.engine.api import generate

    cfg.validate()
    questions = load_questions(cfg.questions, cfg.categories, cfg.limit_per_category)  # QuestionFileError
    info = machine_info()
    if models is None:
        models = tiny_models(cfg.seed) if cfg.tiny else default_models(checkpoints=cfg.checkpoints)
    _watch()

    skipped: dict[str, str] = {}
    methods = list(cfg.methods)
    for m in methods:
        if RUNGS[m][1] == "ss" and models.ss_adapter is None:
            skipped[m] = f"skipped: {models.ss_note}"
    for m, why in skipped.items():
        log(f"[bench] {m}: {why}")
    methods = [m for m in methods if m not in skipped]

    # Warm-up (excluded): one short generation per method compiles the round functions.
    warm = models.codec.encode([{"role": "user", "content": questions[0]["turns"][0]}])
    for m in list(methods):
        try:
            generate(models.target, [warm], min(8, cfg.max_new_tokens), **_gen_kwargs(m, cfg, models))
        except Exception as e:  # a rung that cannot run must not take the others down
            if m == "ar":
                raise
            skipped[m] = f"failed at warm-up: {type(e).__name__}: {e}"
            log(f"[bench] {m}: {skipped[m]}")
            methods.remove(m)

    records, outputs = [], {}
    bar = _progress(len(questions) * len(methods) * cfg.repeats, progress, "SpecBench ladder")
    for q in questions:
        for m in methods:
            kw = _gen_kwargs(m, cfg, models)
            for rep in range(cfg.repeats):
                bar.set_postfix_str(f"q{q['question_id']} {m}")
                try:
                    turns, ids = run_conversation(generate, models, q, cfg.max_new_tokens, kw)
                except Exception as e:
                    records.append({"question_id": q["question_id"], "category": q["category"], "task": q["task"],
                                    "method": m, "repeat": rep, "error": f"{type(e).__name__}: {e}"})
                    log(f"[bench] q{q['question_id']} {m}: {type(e).__name__}: {e}")
                    bar.update(1)
                    continue
                rec = {"question_id": q["question_id"], "category": q["category"], "task": q["task"], "method": m,
                       "repeat": rep, "turns": turns, "tokens": sum(t["new_tokens"] for t in turns),
                       "seconds": sum(t["seconds"] for t in turns)}
                if rep == 0:
                    rec["output_ids"] = ids
                    outputs[(q["question_id"], m)] = ids
                records.append(rec)
                bar.update(1)
    bar.close()

    mismatches = []
    for q in questions:
        ref = outputs.get((q["question_id"], "ar"))
        for m in methods:
            got = outputs.get((q["question_id"], m))
            if m == "ar" or ref is None or got is None:
                continue
            for t, (a, b) in enumerate(zip(ref, got, strict=False)):
                d = _first_diff(a, b)
                if d is not None:
                    mismatches.append({"question_id": q["question_id"], "method": m, "turn": t, "first_diff": d})
    for mm in mismatches:
        log(f"[bench] MISMATCH vs ar: {mm}")

    profile = _profile_pass(generate, models, cfg, questions, [m for m in methods if m != "ar"], progress, log)
    agg = aggregate(records, profile, methods)
    identical = {m: not any(x["method"] == m for x in mismatches) for m in methods}
    run_name = cfg.run_name or (
        f"specbench_{'tiny' if cfg.tiny else 'default'}_{_dt.datetime.now().strftime('%Y%m%d_%H%M%S')}")
    out_dir = Path(cfg.out) if cfg.out else default_results_dir()
    run_dir = out_dir / run_name
    tcfg, dcfg = models.cfgs()
    payload = {
        "run_name": run_name,
        "machine": info,
        "device_kinds": sorted({d.split(" ")[0].split(":")[0] for d in info["devices"]}),
        "placement": _describe_placement(cfg.placement),
        "models": {"name": models.name, "target": dataclasses.asdict(tcfg), "draft": dataclasses.asdict(dcfg),
                   "ss_adapter": None if models.ss_adapter is None else str(models.ss_adapter[0]),
                   "ss_note": models.ss_note},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "methods": methods,
        "skipped": skipped,
        "questions": [{k: q[k] for k in ("question_id", "category", "task")} for q in questions],
        "aggregate": agg,
        "identical_to_ar": identical,
        "mismatches": mismatches,
        "profile": {m: {t: v for t, v in d.items() if t != "rounds"} for m, d in profile.items()},
        "records": records,
    }
    write_artifacts(payload, run_dir)
    return payload, run_dir


def _describe_placement(spec) -> str:
    from mirror_jax.engine.placement import Placement

    return Placement.parse(spec).describe()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run")


def _profile_pass(generate, models, cfg: BenchConfig, questions, methods, progress, log) -> dict:
    """profile=True on `profile_per_task` questions per task, first turn only. Returns per method
    {"rounds": [per-round dicts with task], "tasks": [...]}."""
    if cfg.profile_per_task == 0 or not methods:
        return {}
    seen: dict[str, int] = defaultdict(int)
    subset = []
    for q in questions:
        if seen[q["task"]] < cfg.profile_per_task:
            subset.append(q)
            seen[q["task"]] += 1
    subset = subset[: cfg.profile_max_questions] if cfg.profile_max_questions else subset
    n_new = min(cfg.max_new_tokens, cfg.profile_max_new_tokens)
    out = {}
    bar = _progress(len(subset) * len(methods), progress, "profile pass")
    for m in methods:
        kw = _gen_kwargs(m, cfg, models, profile=True)
        rounds = []
        for q in subset:
            try:
                recs, _ = run_conversation(generate, models, q, n_new, kw, max_turns=1, profile=True)
                rounds.extend({**r, "task": q["task"]} for r in recs[0].get("rounds", []))
            except Exception as e:
                log(f"[bench] profile q{q['question_id']} {m}: {type(e).__name__}: {e}")
            bar.update(1)
        out[m] = {"rounds": rounds, "questions": [q["question_id"] for q in subset], "max_new_tokens": n_new}
    bar.close()
    return out
