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
per-question records, aggregates), ``results.md`` (tables), ``acceptance.json`` (per-method
acceptance statistics, the input of ``experiments/gpu/run_gpu_kit.py``) and three plots:
``speedup.png``, ``phases.png``, ``accepted_hist.png``.

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
import inspect
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LADDER = ("ar", "sd_ar", "sd_ss", "mirror_ar", "mirror_ss")
RUNGS = {  # method name -> (engine method, draft kind)
    "ar": ("ar", None),
    "sd_ar": ("sd", "ar"),
    "sd_ss": ("sd", "ss"),
    "mirror_ar": ("mirror", "ar"),
    "mirror_ss": ("mirror", "ss"),
}
MODELED_LABEL = "MODELED"


class LadderError(ValueError):
    """Invalid ladder settings (unknown methods, bad counts)."""


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """'ar,sd_ar' or ['ar', 'sd_ar'] -> validated list in ladder order; 'ar' is always included
    (it is the baseline of every speed-up). Raises LadderError for unknown names."""
    if spec is None:
        return list(LADDER)
    items = spec.split(",") if isinstance(spec, str) else [x for s in spec for x in str(s).split(",")]
    names = [x.strip() for x in items if x.strip()]
    unknown = [m for m in names if m not in RUNGS]
    if unknown:
        raise LadderError(f"unknown methods {unknown}; choose from {', '.join(LADDER)}")
    if not names:
        raise LadderError(f"no methods given; choose from {', '.join(LADDER)}")
    chosen = set(names) | {"ar"}
    return [m for m in LADDER if m in chosen]


def engine_supports_ss() -> bool:
    """True once `generate` accepts ``ss_adapter=(sscfg, ssp)``."""
    from mirror_jax.engine.api import generate

    return "ss_adapter" in inspect.signature(generate).parameters


# ----------------------------------------------------------------------------------------------
# Chat encoding: the model's chat template, or a byte codec for the tiny random models.


class HFChatCodec:
    """Messages -> ids with the model's chat template; ids -> text with the tokenizer."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def encode(self, messages: list[dict]) -> list[int]:
        from mirror_jax.tokenizer import apply_chat_template

        return apply_chat_template(self.tokenizer, messages, self.chat_template)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TinyChatCodec:
    """A lossless toy 'chat template' for tiny random models (vocab >= 8): role marker ids 0..2,
    content bytes mapped into [3, vocab) and cut to `max_content` tokens per message. Replies are
    decoded to private-use characters so re-encoding them gives the same ids back."""

    ROLE = {"system": 0, "user": 1, "assistant": 2}
    _PUA = 0xE000

    def __init__(self, vocab: int, max_content: int = 24):
        self.vocab, self.max_content = vocab, max_content

    def _content(self, text: str) -> list[int]:
        out = []
        for ch in text:
            o = ord(ch)
            if self._PUA <= o < self._PUA + self.vocab:
                out.append(o - self._PUA)
            else:
                out.extend(3 + b % (self.vocab - 3) for b in ch.encode())
        return out[: self.max_content]

    def encode(self, messages: list[dict]) -> list[int]:
        ids = []
        for m in messages:
            ids.append(self.ROLE.get(m["role"], 1))
            ids.extend(self._content(m["content"]))
        return ids + [self.ROLE["assistant"]]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(self._PUA + int(i)) for i in ids)


@dataclasses.dataclass
class BenchModels:
    """What the ladder decodes with. `target`/`draft`: LoadedModel or (cfg, params)."""

    name: str
    target: Any
    draft: Any
    codec: Any
    ss_adapter: tuple | None = None  # (sscfg, ssp)
    ss_note: str = ""
    eos_ids: tuple | None = None  # None: the target config's EOS ids

    def cfgs(self):
        get = lambda m: m[0] if isinstance(m, tuple) else m.cfg
        return get(self.target), get(self.draft)


def tiny_models(seed: int = 0, noise: float = 0.05, vocab: int = 64, layers: int = 4) -> BenchModels:
    """Tiny random target (4 layers, hidden 64) and a noisy copy as draft (they agree often but not
    always), a random SS adapter on the draft, and the toy codec. For CI and smoke runs only."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.config import ModelConfig
    from mirror_jax.params import init_random
    from mirror_jax.ss import SSConfig, init_ss_params

    cfg = ModelConfig(
        arch="qwen2", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
        num_kv_heads=2, head_dim=16, qkv_bias=True, eos_token_ids=(),
    )
    params = init_random(cfg, seed, scale=0.35)
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed + 1)
    noisy = [x + noise * jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves]
    draft = (cfg, jax.tree_util.tree_unflatten(tree, noisy))
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=4)
    ssp = init_ss_params(cfg, sscfg, draft[1], seed=seed)
    return BenchModels(
        name="tiny-random", target=(cfg, params), draft=draft, codec=TinyChatCodec(vocab),
        ss_adapter=(sscfg, ssp), ss_note="random (untrained) SS adapter on the tiny draft", eos_ids=(),
    )


def default_models(dtype=None) -> BenchModels:
    """The default Qwen2.5-Coder 1.5B/0.5B pair (float32 on CPU, bf16 on accelerators) and the
    committed SS adapter when there is one."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.loading import default_pair
    from mirror_jax.ss.checkpoint import load_default_ss_adapter

    if dtype is None:
        dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    target, draft, tok = default_pair(dtype)
    ss = load_default_ss_adapter(draft)
    note = "committed adapter checkpoints/ss_default_draft" if ss else (
        "no trained SS adapter for this draft (checkpoints/ss_default_draft missing or mismatched)"
    )
    return BenchModels(
        name="Qwen2.5-Coder-1.5B-Instruct / 0.5B-Instruct (Q4_K_M dequantised)", target=target, draft=draft,
        codec=HFChatCodec(tok, target.chat_template), ss_adapter=None if ss is None else (ss[0], ss[1]), ss_note=note,
    )


# ----------------------------------------------------------------------------------------------
# Configuration


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
    """`experiments/results` of the repository this package lives in, else ./experiments/results."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "experiments").is_dir():
        return repo / "experiments" / "results"
    return Path.cwd() / "experiments" / "results"


# ----------------------------------------------------------------------------------------------
# Running


class _CompileWatch:
    """Counts XLA backend compilations (jax.monitoring), so timed runs that compiled are redone."""

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
    kw.update(draft=models.draft, gamma=cfg.gamma, profile=profile)
    if engine == "mirror":
        kw.update(kappa=cfg.kappa, branch_budget=cfg.branch_budget, exit_layer=cfg.exit_layer)
    if draft_kind == "ss":
        kw["ss_adapter"] = models.ss_adapter
    return kw


def _turn_record(res, prompt_len: int, seconds: float, retried: int) -> dict:
    s = res.stats
    rec = {"prompt_tokens": prompt_len, "new_tokens": len(res.tokens[0]), "seconds": seconds,
           "retimed_after_compile": retried}
    if s.get("method") == "ar":
        rec.update(decode_s=s.get("decode_s"), decode_steps=s.get("decode_steps"))
        return rec
    rounds = s.get("per_round", [])
    rec.update(
        rounds=len(rounds),
        round_tokens=int(sum(r["a"] + 1 for r in rounds)),
        accepted=[int(r["a"]) for r in rounds],
        round_wall_ms=[round(1e3 * r["wall_s"], 4) for r in rounds],
        decode_s=float(sum(r["wall_s"] for r in rounds)),
        gamma=s.get("settings", {}).get("gamma"),
        kappa=s.get("settings", {}).get("kappa"),
        branch_budget=s.get("settings", {}).get("branch_budget"),
        exit_layer=s.get("settings", {}).get("exit_layer"),
        draft_forwards=int(sum(r.get("draft_forwards", 0) for r in rounds)),
    )
    if s.get("method") == "mirror":
        rec.update(reuse=int(sum(bool(r["hit"]) for r in rounds)),
                   fallback=int(sum(not r["hit"] for r in rounds)),
                   omega_hits=int(sum(r["omega_hits"] for r in rounds)))
    return rec


def _run_turn(generate, models, prompt, n_new, kw, max_retries: int = 2):
    """Generate once, timed; re-run (up to max_retries) when XLA compiled during the run."""
    watch = _watch()
    attempt = 0
    for attempt in range(max_retries + 1):  # noqa: B007 (returned below)
        before = watch.count
        t0 = time.perf_counter()
        res = generate(models.target, [prompt], n_new, **kw)
        seconds = time.perf_counter() - t0
        if watch.count == before:
            break
    return res, seconds, attempt


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
        recs.append(_turn_record(res, len(prompt), res_s, retried) | (
            {"per_round": res.stats.get("per_round", [])} if profile else {}))
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
    from mirror_jax.bench.report import machine_info
    from mirror_jax.bench.specbench import load_questions
    from mirror_jax.engine.api import generate

    cfg.validate()
    questions = load_questions(cfg.questions, cfg.categories, cfg.limit_per_category)  # QuestionFileError
    info = machine_info()
    if models is None:
        models = tiny_models(cfg.seed) if cfg.tiny else default_models()
    _watch()

    skipped: dict[str, str] = {}
    methods = list(cfg.methods)
    for m in methods:
        if RUNGS[m][1] == "ss":
            if not engine_supports_ss():
                skipped[m] = ("skipped: the engine's generate() has no ss_adapter keyword yet (SS draft not "
                              "wired into sd/mirror in this checkout)")
            elif models.ss_adapter is None:
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
                rounds.extend({**r, "task": q["task"]} for r in recs[0]["per_round"])
            except Exception as e:
                log(f"[bench] profile q{q['question_id']} {m}: {type(e).__name__}: {e}")
            bar.update(1)
        out[m] = {"rounds": rounds, "questions": [q["question_id"] for q in subset], "max_new_tokens": n_new}
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# Aggregation and the spec's round-time model


_NOT_PHASES = {"a", "c", "hit", "omega_hits", "wall_s", "task", "draft_forwards", "branches"}


def phase_summary(rounds: list[dict], engine: str) -> dict:
    """Median per-phase ms over profiled rounds, with select split into reuse / fallback rounds."""
    if not rounds:
        return {}
    names = sorted({k for r in rounds for k, v in r.items() if k not in _NOT_PHASES and isinstance(v, float)})
    ph = {k: 1e3 * float(np.median([r.get(k, 0.0) for r in rounds])) for k in names}
    if engine == "mirror" and "select" in ph:
        hit = [1e3 * r.get("select", 0.0) for r in rounds if r.get("hit")]
        miss = [1e3 * r.get("select", 0.0) for r in rounds if not r.get("hit")]
        ph["select_reuse"] = float(np.median(hit)) if hit else ph["select"]
        ph["select_fallback"] = float(np.median(miss)) if miss else None
    return ph


def modeled_round_ms(ph: dict, engine: str, fallback_rate: float | None = None,
                     fallback_extra_ms: float | None = None) -> dict:
    """Round times from isolated phase medians (ms).

    sd: serial by construction, ``target + verify + draft + channel_fv``.
    mirror: ``serial`` (one device: every phase in turn) and ``modeled`` (spec section 1, prefix/
    suffix and draft on separate devices): prefix + channel_ee + max(suffix, draft) + verify +
    channel_fv + select(reuse) + fallback_rate * (select(fallback) - select(reuse))."""
    g = lambda k: ph.get(k) or 0.0
    if not ph:
        return {"serial": None, "modeled": None}
    if engine == "sd":
        t = g("target") + g("verify") + g("draft") + g("channel_fv")
        return {"serial": t, "modeled": t}
    extra = fallback_extra_ms
    if extra is None:
        sf = ph.get("select_fallback")
        extra = max(0.0, sf - g("select_reuse")) if sf is not None else 0.0
    fb = (fallback_rate or 0.0) * extra
    select = ph["select_reuse"] if ph.get("select_reuse") is not None else g("select")
    common = g("prefix") + g("channel_ee") + g("verify") + g("channel_fv") + select + fb
    return {"serial": common + g("suffix") + g("draft"), "modeled": common + max(g("suffix"), g("draft")),
            "fallback_share": fb}


def _agg_group(recs: list[dict]) -> dict:
    turns = [t for r in recs for t in r["turns"]]
    tokens = sum(t["new_tokens"] for t in turns)
    seconds = sum(t["seconds"] for t in turns)
    out = {"questions": len({r["question_id"] for r in recs}), "runs": len(recs), "turns": len(turns),
           "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None}
    decode_s = sum(t.get("decode_s") or 0.0 for t in turns)
    if "rounds" in (turns[0] if turns else {}):
        rounds = sum(t["rounds"] for t in turns)
        rt = sum(t["round_tokens"] for t in turns)
        walls = [w for t in turns for w in t["round_wall_ms"]]
        acc = [a for t in turns for a in t["accepted"]]
        gamma = max((t.get("gamma") or 0) for t in turns)
        out.update(rounds=rounds, mean_tokens_per_round=rt / rounds if rounds else None,
                   round_wall_ms_median=float(np.median(walls)) if walls else None,
                   accepted_hist=np.bincount(acc, minlength=gamma + 1).tolist() if acc else [],
                   decode_ms_per_token=1e3 * decode_s / rt if rt else None,
                   draft_forwards_per_round=sum(t.get("draft_forwards", 0) for t in turns) / rounds if rounds else None)
        if "reuse" in turns[0]:
            fb = sum(t["fallback"] for t in turns)
            out.update(reuse=sum(t["reuse"] for t in turns), fallback=fb,
                       fallback_rate=fb / rounds if rounds else None,
                       omega_kappa=sum(t["omega_hits"] for t in turns) / rt if rt else None)
    else:
        steps = sum(t.get("decode_steps") or 0 for t in turns)
        out.update(mean_tokens_per_round=1.0, decode_ms_per_token=1e3 * decode_s / steps if steps else None)
    return out


def aggregate(records: list[dict], profile: dict, methods: list[str]) -> dict:
    """{"overall": {method: stats}, "tasks": {task: {method: stats}}} with speed-ups over ar,
    phase medians, modeled round times and overlap efficiency."""
    ok = [r for r in records if "error" not in r]
    tasks = sorted({r["task"] for r in ok})
    groups = {"overall": {m: [r for r in ok if r["method"] == m] for m in methods}}
    for t in tasks:
        groups[t] = {m: [r for r in ok if r["method"] == m and r["task"] == t] for m in methods}
    result: dict = {"overall": {}, "tasks": {}}
    for gname, by_m in groups.items():
        stats = {m: _agg_group(rs) for m, rs in by_m.items() if rs}
        ar = stats.get("ar", {})
        for m, s in stats.items():
            engine = RUNGS[m][0]
            s["speedup_vs_ar"] = (s["tokens_per_s"] / ar["tokens_per_s"]
                                  if ar.get("tokens_per_s") and s.get("tokens_per_s") else None)
            if engine == "ar" or m not in profile:
                continue
            rounds = profile[m]["rounds"] if gname == "overall" else [
                r for r in profile[m]["rounds"] if r["task"] == gname]
            s["phase_source"] = "profiled questions of this task"
            if not rounds and gname != "overall":  # no profiled question of this task: use all
                rounds = profile[m]["rounds"]
                s["phase_source"] = "all profiled questions (none of this task)"
            ph = phase_summary(rounds, engine)
            mod = modeled_round_ms(ph, engine, s.get("fallback_rate"))
            s["phase_ms_median"] = ph
            s["serial_round_ms"] = mod["serial"]
            s["modeled_round_ms"] = mod["modeled"]
            meas = s.get("round_wall_ms_median")
            s["overlap_efficiency"] = meas / mod["modeled"] if meas and mod["modeled"] else None
            ar_ms = ar.get("decode_ms_per_token")
            tpr = s.get("mean_tokens_per_round")
            if ar_ms and tpr and mod["modeled"]:
                s["modeled_speedup_vs_ar"] = tpr / mod["modeled"] * ar_ms
            if ar_ms and tpr and meas:
                s["measured_round_speedup_vs_ar"] = tpr / meas * ar_ms
        result["overall" if gname == "overall" else "tasks"].update(
            stats if gname == "overall" else {gname: stats})
    return result


def acceptance_summary(payload: dict) -> dict:
    """Per-method acceptance statistics for the GPU kit's projections."""
    ov = payload["aggregate"]["overall"]
    s = payload["config"]
    out = {"source": payload["run_name"], "models": payload["models"]["name"],
           "temperature": s["temperature"], "max_new_tokens": s["max_new_tokens"], "methods": {}}
    for m, st in ov.items():
        out["methods"][m] = {k: st.get(k) for k in ("mean_tokens_per_round", "fallback_rate", "omega_kappa",
                                                    "accepted_hist", "rounds", "draft_forwards_per_round")}
        rec = next((r for r in payload["records"] if r["method"] == m and r.get("turns")), None)
        for k in ("gamma", "kappa", "branch_budget", "exit_layer"):
            if rec and rec["turns"][0].get(k) is not None:
                out["methods"][m][k] = rec["turns"][0][k]
                if k == "kappa" and m.startswith("mirror"):
                    out["kappa"] = rec["turns"][0][k]
    return out


# ----------------------------------------------------------------------------------------------
# Artifacts


def _f(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def results_markdown(p: dict) -> str:
    from mirror_jax.bench.report import machine_md

    c = p["config"]
    agg = p["aggregate"]
    methods = p["methods"]
    lines = [f"# SpecBench method ladder: {p['run_name']}\n", machine_md(p["machine"]),
             f"\nModels: {p['models']['name']}. Placement: {p['placement']}. SS draft: {p['models']['ss_note']}.\n",
             f"\nSettings: {len(p['questions'])} questions, max_new_tokens={c['max_new_tokens']}, "
             f"temperature={c['temperature']}, repeats={c['repeats']}, gamma={c['gamma'] or 'device default'}, "
             f"kappa={c['kappa'] or 'device default'}, branch_budget={c['branch_budget'] or 'device default'}, "
             f"exit_layer={c['exit_layer'] or 'N/2'}, batch 1.\n"]
    if c.get("command"):
        lines.append(f"\nCommand: `{c['command']}`\n")
    for m, why in p["skipped"].items():
        lines.append(f"\n**{m}**: {why}\n")
    cols = ["method", "tokens/s", "speedup", "tokens/round", "draft forwards/round", "fallback", "Omega_kappa",
            "round ms (measured)", "identical to ar"]
    lines.append("\n## Overall\n\n" + _table(cols, [[
        m, _f(s.get("tokens_per_s")), _f(s.get("speedup_vs_ar")), _f(s.get("mean_tokens_per_round")),
        _f(s.get("draft_forwards_per_round")), _f(s.get("fallback_rate")), _f(s.get("omega_kappa")),
        _f(s.get("round_wall_ms_median")),
        "yes" if p["identical_to_ar"].get(m) else "NO"] for m, s in agg["overall"].items()]))
    lines.append("\n## Per task: speed-up over ar (tokens/s ratio)\n\n" + _table(
        ["task"] + methods, [[t] + [_f(st.get(m, {}).get("speedup_vs_ar")) for m in methods]
                             for t, st in agg["tasks"].items()]))
    lines.append("\n## Per task: tokens/s | tokens per round | fallback rate\n\n" + _table(
        ["task"] + methods, [[t] + [" / ".join(_f(st.get(m, {}).get(k)) for k in
                                               ("tokens_per_s", "mean_tokens_per_round", "fallback_rate"))
                                    for m in methods] for t, st in agg["tasks"].items()]))
    spec = [m for m in methods if m != "ar"]
    lines.append("\n## Per task: Omega_kappa | measured round ms | MODELED round ms | overlap efficiency\n\n"
                 "(phase times per task come from that task's profiled questions, else from all profiled ones)\n\n"
                 + _table(["task"] + spec, [[t] + [" / ".join(_f(st.get(m, {}).get(k)) for k in (
                     "omega_kappa", "round_wall_ms_median", "modeled_round_ms", "overlap_efficiency"))
                     for m in spec] for t, st in agg["tasks"].items()]))
    prof = {m: s for m, s in agg["overall"].items() if s.get("phase_ms_median")}
    if prof:
        names = sorted({k for s in prof.values() for k in s["phase_ms_median"]})
        lines.append("\n## Per-phase medians (ms, instrumented pass: each phase blocked on and timed alone)\n\n"
                     + _table(["method"] + names, [[m] + [_f(s["phase_ms_median"].get(k)) for k in names]
                                                   for m, s in prof.items()]))
        lines.append(
            f"\n## {MODELED_LABEL} multi-device round time vs measured\n\n"
            "MODELED = the spec's formula from the isolated phase times above, as if prefix/suffix and draft "
            "ran on separate devices: `T_prefix + T_rv_ee + max(T_suffix, T_draft) + T_verify + T_rv_fv + "
            "T_select(reuse) + fallback_rate x (T_select(fallback) - T_select(reuse))` (sd: serial sum). "
            "Measured = median round wall time of the timed pass with the actual placement "
            f"({p['placement']}). Overlap efficiency = measured / modeled. Speed-ups here are decode-only "
            "(tokens per round / round time, against ar's decode ms per token).\n\n"
            + _table(["method", "serial sum ms", f"{MODELED_LABEL} round ms", "measured round ms",
                      "overlap efficiency", "measured decode speed-up", f"{MODELED_LABEL} speed-up"],
                     [[m, _f(s.get("serial_round_ms")), _f(s.get("modeled_round_ms")),
                       _f(s.get("round_wall_ms_median")), _f(s.get("overlap_efficiency")),
                       _f(s.get("measured_round_speedup_vs_ar")), _f(s.get("modeled_speedup_vs_ar"))]
                      for m, s in prof.items()]))
    lines.append("\n## Output identity (greedy / sample-match outputs must equal ar's)\n\n")
    if p["mismatches"]:
        lines.append(_table(["question", "method", "turn", "first differing token"],
                            [[x["question_id"], x["method"], x["turn"], x["first_diff"]] for x in p["mismatches"]]))
    else:
        lines.append("Every method's output equals ar's on every question and turn.\n")
    errs = [r for r in p["records"] if "error" in r]
    if errs:
        lines.append("\n## Errors\n\n" + "".join(f"- q{r['question_id']} {r['method']}: {r['error']}\n" for r in errs))
    lines.append("\nColumns: tokens/s = generated tokens / wall time (prefill included, compilation excluded); "
                 "speedup = tokens/s over ar's on the same questions in this run; tokens/round = mean accepted "
                 "length + 1; fallback = share of Mirror-SD rounds whose next window was not among the "
                 "precomputed branches; Omega_kappa = share of target tokens inside the early-exit top-kappa.\n")
    lines.append("\nPlots: ![speed-up](speedup.png) ![phases](phases.png) ![accepted](accepted_hist.png)\n")
    return "".join(lines)


def _table(cols, rows) -> str:
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def make_plots(p: dict, run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = p["aggregate"]
    methods = [m for m in p["methods"] if m != "ar"]
    paths = []

    # 1. speed-up per task per method
    groups = list(agg["tasks"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [(agg["overall"] if g == "overall" else agg["tasks"][g]).get(m, {}).get("speedup_vs_ar") or 0
                for g in groups]
        ax.bar(np.arange(len(groups)) + i * w - 0.4 + w / 2, vals, w, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20)
    ax.set_ylabel("speed-up over ar (tokens/s)")
    ax.set_title(f"SpecBench speed-up ({p['placement']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "speedup.png"))

    # 2. per-phase breakdown (stacked) with measured and MODELED round times
    prof = {m: s for m, s in agg["overall"].items() if s.get("phase_ms_median")}
    fig, ax = plt.subplots(figsize=(7, 0.7 * max(2, len(prof)) + 1.5))
    phase_names = ["prefix", "channel_ee", "suffix", "target", "draft", "verify", "channel_fv", "select"]
    colors = dict(zip(phase_names, plt.cm.tab10.colors, strict=False))
    for i, s in enumerate(prof.values()):
        left = 0.0
        for k in phase_names:
            v = s["phase_ms_median"].get(k)
            if v:
                ax.barh(i, v, left=left, color=colors[k], label=k)
                left += v
        if s.get("round_wall_ms_median"):
            ax.plot(s["round_wall_ms_median"], i, "k|", ms=22, mew=2)
        if s.get("modeled_round_ms"):
            ax.plot(s["modeled_round_ms"], i, "rv", ms=9)
    ax.set_yticks(range(len(prof)), list(prof))
    ax.set_xlabel("ms per round\nbars: isolated phase medians  |: measured round  red v: MODELED two-device",
                  fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=4, loc="lower right")
    ax.set_title("Per-phase time breakdown", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "phases.png"))

    # 3. accepted-length histogram
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hs = {m: agg["overall"][m].get("accepted_hist") for m in methods if agg["overall"].get(m, {}).get("accepted_hist")}
    n = max((len(h) for h in hs.values()), default=1)
    w = 0.8 / max(1, len(hs))
    for i, (m, h) in enumerate(hs.items()):
        h = np.asarray(h, float)
        ax.bar(np.arange(len(h)) + i * w - 0.4 + w / 2, h / max(h.sum(), 1), w, label=m)
    ax.set_xticks(range(n))
    ax.set_xlabel("accepted draft tokens per round (A)")
    ax.set_ylabel("share of rounds")
    ax.set_title("Accepted-length histogram", fontsize=9)
    if hs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "accepted_hist.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_artifacts(payload: dict, run_dir: Path) -> dict:
    from mirror_jax.bench.report import _atomic_write, write_results

    run_dir = Path(run_dir)
    jp, mp = write_results(run_dir, "results", payload, results_markdown(payload))
    acc = run_dir / "acceptance.json"
    _atomic_write(acc, json.dumps(acceptance_summary(payload), indent=2))
    plots = make_plots(payload, run_dir)
    return {"json": jp, "md": mp, "acceptance": acc, "plots": plots}
