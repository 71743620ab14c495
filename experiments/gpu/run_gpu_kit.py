"""GPU timing kit: per-phase times of every method on one GPU, projected to speed-ups.

Runs on a machine with one GPU and nothing but jax/flax/optax/orbax/transformers/numpy installed,
no network and no model files. It imports `mirror_jax` from this repository (sys.path), builds
RANDOM-weight models (bf16) with the exact shapes of the default pair (Qwen2.5-1.5B target,
Qwen2.5-0.5B draft) and of a 7B-class target (Qwen2.5-7B), and times the real jitted round
functions of `mirror_jax.rounds` (target_prefix, target_suffix, target_full, draft_rollout,
draft_propose, verify, draft_select) and `mirror_jax.engine.autoregressive.decode_step` (ar):

* each phase blocked on and timed alone (median of --iters calls, compilation excluded);
* whole rounds dispatched the way the engine does it (asynchronously, one sync per round), so a
  GPU target + host-CPU draft placement ("gpu:0,cpu:0") shows the overlap it really gets;
* batch scaling (`measure_batch`): the device loop's sd round and ar's batched step at batch 1, 4, 8.

Random weights say nothing about acceptance, so speed-ups are PROJECTED with acceptance statistics
measured on CPU with the real weights by the SpecBench ladder (`mirror-jax bench`), read from
--acceptance (a run's acceptance.json or results.json): per method mean tokens per round and
Mirror-SD's fallback rate. Everything MODELED/PROJECTED is labelled so in the outputs.

    python experiments/gpu/run_gpu_kit.py --acceptance experiments/results/specbench_cpu_default/acceptance.json
    python experiments/gpu/run_gpu_kit.py --quick            # ~3-5 minutes: 1.5B and 7B on the GPU only
    python experiments/gpu/run_gpu_kit.py --tiny             # CPU smoke test on tiny shapes

Writes experiments/results/gpu/gpu_kit[_<tag>].json and .md, with the target decode step as a fraction
of the device's measured copy bandwidth (`step_bandwidth`). The whole run respects --budget-s
(default 540 s): a configuration is skipped when too little time is left, and every configuration
runs inside try/except so one failure (e.g. out of memory) does not lose the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from mirror_jax.config import SHAPES  # noqa: E402

METHODS = ("sd_ar", "sd_ss", "mirror_ar", "mirror_ss")


@dataclasses.dataclass
class KitConfig:
    name: str
    target: str
    draft: str
    placement: str
    gamma: int
    kappa: int
    budget: int
    draft_dtype: str = "bfloat16"  # float32 for a host-CPU draft (bf16 matmuls are slow on CPU)
    exit_layer: int | None = None  # the prefix/suffix split; None: half the target's layers


def model_cfg(shape: str):
    """The default pair's / a 7B-class target's exact shapes (`mirror_jax.config.SHAPES`), or the
    tiny shapes of the CPU smoke test."""
    from mirror_jax.testing import tiny_config

    if shape == "tiny-target":
        return tiny_config(num_layers=4, hidden_size=64, intermediate_size=128, head_dim=16, vocab_size=256)
    if shape == "tiny-draft":
        return tiny_config(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, vocab_size=256,
                           tie_embeddings=True)
    return SHAPES[shape]


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _median_ms(fn, setup, iters: int, budget: Budget, min_left: float = 5.0):
    """Median wall ms of fn(*setup()) over iters calls (blocked on), after one untimed call.
    Returns (median_ms, first_call_s, last_output)."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*setup()))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        if budget.left < min_left:
            break
        args = setup()
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return (1e3 * float(np.median(times)) if times else None), first, out


_COPY_GBS: dict = {}  # device -> (copy, read) GB/s, measured once per run


def step_bandwidth(params, cache, step_ms: float | None, device, tiny: bool) -> dict:
    """The ar decode step as a fraction of the device's measured bandwidth: bytes one step must
    read (weights except the embedding table, plus the whole K/V `cache`, which attention scans)
    over its median time, against a jitted in-place copy (read + write) and a sum (read) of a
    1 GiB buffer on the same device (64 MiB for --tiny)."""
    from mirror_jax.bench.report import jax_bandwidth_gbs
    from mirror_jax.params import param_bytes

    if device not in _COPY_GBS:
        _COPY_GBS[device] = jax_bandwidth_gbs((64 if tiny else 1024) << 20, 5, device=device)
    copy_gbs, read_gbs = _COPY_GBS[device]
    weights = param_bytes(params, exclude_embed=True)
    kv = sum(a.nbytes for a in cache.k + cache.v)
    out = {"device_copy_gbs": copy_gbs, "device_read_gbs": read_gbs, "step_weight_bytes": weights,
           "step_kv_bytes": kv, "ar_step_ms": step_ms}
    if step_ms:
        eff = (weights + kv) / (step_ms * 1e-3) / 1e9
        out.update(ar_effective_gbs=eff, fraction_of_copy=eff / copy_gbs, fraction_of_read=eff / read_gbs,
                   floor_ms_at_copy=(weights + kv) / (copy_gbs * 1e9) * 1e3)
    return out


def measure_config(kc: KitConfig, ctx: int, iters: int, budget: Budget, models: dict, with_ss: bool,
                   res: dict) -> dict:
    """Per-phase and whole-round times of ar, sd and mirror (AR draft, and SS draft when the engine
    supports it) for one configuration, filled into `res` as they are measured (so a failure or
    the time budget keeps what was already measured)."""
    import jax
    import jax.numpy as jnp

    from mirror_jax import rounds as F
    from mirror_jax.engine.autoregressive import decode_step
    from mirror_jax.engine.placement import Placement
    from mirror_jax.kv_cache import init_cache
    from mirror_jax.params import init_random
    from mirror_jax.sampling import SamplingParams
    from mirror_jax.ss import ss_draft

    pl = Placement.parse(kc.placement)
    cfg_t, cfg_d = model_cfg(kc.target), model_cfg(kc.draft)
    tdt, ddt = jnp.bfloat16, getattr(jnp, kc.draft_dtype)
    if kc.target.startswith("tiny"):
        tdt = ddt = jnp.float32

    def get_model(shape, cfg, dtype, dev):
        key = (shape, str(dtype), str(dev))
        if key not in models:
            t0 = time.perf_counter()
            models[key] = jax.block_until_ready(init_random(cfg, 0, dtype, device=dev))  # drawn on the device
            print(f"  built {shape} ({dtype.__name__ if hasattr(dtype, '__name__') else dtype}) on {dev} "
                  f"in {time.perf_counter() - t0:.1f}s", flush=True)
        return models[key]

    p_t = get_model(kc.target, cfg_t, tdt, pl.target)
    p_d = get_model(kc.draft, cfg_d, ddt, pl.draft)
    g, kappa = kc.gamma, kc.kappa
    l_e = min(kc.exit_layer or cfg_t.num_layers // 2, cfg_t.num_layers - 1)
    cap = ctx + 4 * g + 64
    cap = -(-cap // 128) * 128
    samp = SamplingParams().arrays(row=0)
    samp_t, samp_d = pl.to_target(samp), pl.to_draft(samp)
    rng = np.random.default_rng(0)
    V = cfg_t.vocab_size
    win_np = rng.integers(0, V, size=(1, g)).astype(np.int32)
    last_np = rng.integers(0, V, size=(1,)).astype(np.int32)

    state = {"ct": init_cache(cfg_t, 1, cap, tdt, device=pl.target),
             "cd": init_cache(cfg_d, 1, cap, ddt, device=pl.draft)}

    def reset():  # fresh length buffers each time: the old ones were donated with the cache
        state["ct"] = state["ct"].replace(lengths=pl.to_target(np.array([ctx], np.int32)))
        state["cd"] = state["cd"].replace(lengths=pl.to_draft(np.array([ctx], np.int32)))

    last_t, last_d = pl.to_target(last_np), pl.to_draft(last_np)
    win_t, win_d = pl.to_target(win_np), pl.to_draft(win_np)
    res.update(ctx=ctx, capacity=cap, exit_layer=l_e)
    ph = res["phases_ms"]

    def timed(name, fn, setup):
        if budget.left < 15:
            raise TimeoutError(f"time budget exhausted before {name}")
        ms, first, out = _median_ms(fn, setup, iters, budget)
        ph[name] = ms
        res["compile_s"][name] = first
        return out

    # ar: one decode step of the target
    def ar_step(tok, cache):
        nxt, cache = decode_step(cfg_t, p_t, tok, cache, samp_t, greedy=True)
        state["ct"] = cache
        return nxt

    def ar_setup():
        reset()
        return last_t, state["ct"]

    timed("ar_step", ar_step, ar_setup)
    res["bandwidth"] = step_bandwidth(p_t, state["ct"], ph["ar_step"], pl.target, tiny=kc.target.startswith("tiny"))

    # sd: target_full + verify, draft_propose (gamma tokens), channels
    def t_full(cache):
        logits, state["ct"] = F.target_full(cfg_t, p_t, cache, last_t, win_t)
        return logits

    logits = timed("target_full", t_full, lambda: (reset(), state["ct"])[1:])

    def do_verify(cache, raw=None):
        r, state["ct"] = F.verify(logits, win_t, None, cache, samp_t, raw, rule="greedy")
        return r

    timed("verify", do_verify, lambda: (reset(), state["ct"])[1:])
    first_d = pl.to_draft(np.zeros((1, 1), np.int32))

    def make_propose(ss_kw):
        def propose(cache):
            prop, state["cd"] = F.draft_propose(cfg_d, p_d, cache, jnp.int32(0), first_d, samp_d, gamma=g, **ss_kw)
            return prop.window
        return propose

    small = np.zeros((1, g), np.int32)
    timed("channel", lambda x: pl.to_target(x), lambda: (small,))

    # mirror: prefix, channel_ee, rollout, suffix, verify, channel_fv, select (reuse / fallback)
    def prefix(cache):
        hidden, ch, state["ct"] = F.target_prefix(cfg_t, p_t, cache, last_t, win_t, exit_layer=l_e,
                                                  kappa=kappa)
        return hidden, ch

    hidden, ch = timed("prefix", prefix, lambda: (reset(), state["ct"])[1:])
    ch_d = timed("channel_ee", lambda x: pl.to_draft(x), lambda: (ch.channel,))

    def suffix(cache):
        lg, state["ct"] = F.target_suffix(cfg_t, p_t, hidden, cache, exit_layer=l_e)
        return lg

    timed("suffix", suffix, lambda: (reset(), state["ct"])[1:])

    variants = {"ar": {}}
    if with_ss:
        from mirror_jax.ss import SSConfig, init_ss_params

        sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=16)
        ssp = jax.device_put(init_ss_params(cfg_d, sscfg, p_d), pl.draft)
        variants["ss"] = {"ss": ss_draft(cfg_d, sscfg, p_d, ssp)}

    for vname, ss_kw in variants.items():
        timed(f"draft_propose_{vname}", make_propose(ss_kw), lambda: (reset(), state["cd"])[1:])

        def rollout(cache, ss_kw=ss_kw):  # reads the cache, donates nothing
            state["cd"] = cache
            return F.draft_rollout(cfg_d, p_d, cache, last_d, win_d, ch_d, samp_d, budget=kc.budget, **ss_kw)

        branches = timed(f"draft_rollout_{vname}", rollout, lambda: (reset(), state["cd"])[1:])
        depth, root = np.asarray(branches.depth), np.asarray(branches.root)
        a_hit, c_hit = pl.to_draft(jnp.int32(depth[0])), pl.to_draft(jnp.int32(root[0]))
        c_miss = next(v for v in range(V) if not np.any((depth == g) & (root == v)))
        a_miss, c_miss = pl.to_draft(jnp.int32(g)), pl.to_draft(jnp.int32(c_miss))

        def select(cache, a, c, ss_kw=ss_kw, branches=branches):
            hit, prop, state["cd"] = F.draft_select(cfg_d, p_d, cache, branches, a, c, samp_d, **ss_kw)
            return hit, prop.window

        timed(f"select_reuse_{vname}", select, lambda a=a_hit, c=c_hit: (reset(), state["cd"], a, c)[1:])
        timed(f"select_fallback_{vname}", select, lambda a=a_miss, c=c_miss: (reset(), state["cd"], a, c)[1:])

        # Whole rounds as the engine dispatches them: nothing blocks until the final device_get.
        def mirror_round(ct, cd, ss_kw=ss_kw, a_hit=a_hit, c_hit=c_hit):
            wt = pl.to_target(win_d)
            hidden, ch, ct = F.target_prefix(cfg_t, p_t, ct, last_t, wt, exit_layer=l_e,
                                             kappa=kappa)
            chd = pl.to_draft(ch.channel)
            br = F.draft_rollout(cfg_d, p_d, cd, last_d, win_d, chd, samp_d, budget=kc.budget, **ss_kw)
            lg, ct = F.target_suffix(cfg_t, p_t, hidden, ct, exit_layer=l_e)
            r, ct = F.verify(lg, wt, None, ct, samp_t, ch.top_ids, rule="greedy")
            a, c = pl.to_draft((r.a, r.c))
            # Random weights decide nothing useful: force the reuse branch (the fallback cost is added
            # per the measured fallback rate in `project`) while keeping select's wait on verify.
            a, c = a * 0 + a_hit, c * 0 + c_hit
            hit, prop, cd = F.draft_select(cfg_d, p_d, cd, br, a, c, samp_d, **ss_kw)
            state["ct"], state["cd"] = ct, cd
            return jax.device_get((r.a, r.c, hit, prop.window))

        timed(f"mirror_round_{vname}", mirror_round, lambda: (reset(), state["ct"], state["cd"])[1:])

        def sd_round(ct, cd, ss_kw=ss_kw):
            wt = pl.to_target(win_d)
            lg, ct = F.target_full(cfg_t, p_t, ct, last_t, wt)
            r, ct = F.verify(lg, wt, None, ct, samp_t, rule="greedy")
            a, c = jax.device_get((r.a, r.c))
            prop, cd = F.draft_propose(cfg_d, p_d, cd, jnp.int32(0), pl.to_draft(np.full((1, 1), c, np.int32)), samp_d,
                                       gamma=g, **ss_kw)
            state["ct"], state["cd"] = ct, cd
            return jax.device_get(prop.window)

        timed(f"sd_round_{vname}", sd_round, lambda: (reset(), state["ct"], state["cd"])[1:])
    return res


def measure_batch(target: str, draft: str, batches: list[int], gamma: int, ctx: int, iters: int, budget: Budget,
                  models: dict, tiny: bool) -> dict:
    """Batch scaling on one device: the device loop's vanilla-SD round (`engine.device_loop.sd_round`:
    one target forward over B x (gamma+1) tokens, verification, commit and the next B windows) and
    ar's batched decode step, each at batch B, timed alone (median, compilation excluded).

    A state is built directly (random committed context of `ctx` slots, random windows), so the round
    runs the same work every call. Random weights accept nothing, but a row's acceptance does not
    depend on its batch, so at the same acceptance batch B decodes B * t(1) / t(B) times the tokens
    per second of batch 1: the PROJECTED ratio the batch target compares (sd at batch 8 >= 3x its
    batch 1), against ar's own ratio from the same run."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.engine.autoregressive import decode_step
    from mirror_jax.engine.device_loop import DecodeState, LoopSpec, RowStats, sd_round
    from mirror_jax.engine.speculative import SpecSettings
    from mirror_jax.kv_cache import init_cache
    from mirror_jax.params import init_random
    from mirror_jax.sampling import SamplingParams

    cfg_t, cfg_d = model_cfg(target), model_cfg(draft)
    dt = jnp.float32 if tiny else jnp.bfloat16
    dev = jax.devices()[0]
    for shape, cfg in ((target, cfg_t), (draft, cfg_d)):
        key = (shape, str(dt), str(dev))
        if key not in models:
            models[key] = jax.block_until_ready(init_random(cfg, 0, dt, device=dev))
    p_t, p_d = models[(target, str(dt), str(dev))], models[(draft, str(dt), str(dev))]
    max_new = 64
    cap = -(-(ctx + max_new + 2 * gamma + 2) // 128) * 128
    spec = LoopSpec(cfg_t, cfg_d, SpecSettings("sd", gamma, 4, cfg_t.num_layers // 2, 0, "greedy"), max_new, cap)
    round_j = jax.jit(sd_round, static_argnums=0)
    rng = np.random.default_rng(1)
    out = {"target": target, "draft": draft, "gamma": gamma, "ctx": ctx, "capacity": cap, "rows": []}
    for b in batches:
        if budget.left < 30:
            out["rows"].append({"batch": b, "error": f"skipped: {budget.left:.0f}s of budget left"})
            continue
        samp = SamplingParams().arrays(row=np.arange(b))
        lengths = jnp.full((b,), ctx, jnp.int32)
        zeros = jnp.zeros((b,), jnp.int32)

        def state(b=b, lengths=lengths, zeros=zeros):
            return DecodeState(
                cache_t=init_cache(cfg_t, b, cap, dt).replace(lengths=lengths),
                cache_d=init_cache(cfg_d, b, cap, dt).replace(lengths=lengths),
                last=jnp.asarray(rng.integers(0, cfg_t.vocab_size, b), jnp.int32),
                window=jnp.asarray(rng.integers(0, cfg_t.vocab_size, (b, gamma)), jnp.int32), q=None,
                conf=jnp.zeros((b, gamma), jnp.float32), out=jnp.zeros((b, spec.out_width), jnp.int32),
                n_out=zeros + 1, done=jnp.zeros((b,), bool), pending=zeros,
                stats=RowStats(rounds=zeros, accepted_hist=jnp.zeros((b, gamma + 1), jnp.int32),
                               draft_forwards=zeros, reuse=zeros, omega_hits=zeros, drafted=zeros),
                length=zeros + gamma, limit=zeros + max_new)

        row = {"batch": b}
        try:
            row["sd_round_ms"], row["sd_round_compile_s"], _ = _median_ms(
                lambda st, samp=samp: round_j(spec, p_t, p_d, st, samp).last, lambda: (state(),), iters, budget)
            ar = lambda tok, c, samp=samp: decode_step(cfg_t, p_t, tok, c, samp, greedy=True)[0]
            row["ar_step_ms"], row["ar_step_compile_s"], _ = _median_ms(  # the step donates its cache: a new one
                ar, lambda b=b: (jnp.zeros((b,), jnp.int32),
                                 init_cache(cfg_t, b, cap, dt).replace(lengths=jnp.full((b,), ctx, jnp.int32))),
                iters, budget)
        except Exception as e:  # out of memory at a large batch: keep the smaller ones
            row["error"] = f"{type(e).__name__}: {e}"
        out["rows"].append(row)
        print(f"  batch {b}: {row}", flush=True)
    base = next((r for r in out["rows"] if r["batch"] == 1 and "error" not in r), None)
    for r in out["rows"]:
        if base and r.get("sd_round_ms") and r.get("ar_step_ms"):
            r["sd_tokens_per_s_vs_batch1_projected"] = r["batch"] * base["sd_round_ms"] / r["sd_round_ms"]
            r["ar_tokens_per_s_vs_batch1"] = r["batch"] * base["ar_step_ms"] / r["ar_step_ms"]
    return out


def batch_markdown(bt: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}"
    lines = [f"\n## Batch scaling ({bt['target']} / {bt['draft']}, one device, sd gamma {bt['gamma']}, context "
             f"{bt['ctx']})\n\nsd: the device loop's round at batch B; ar: the batched decode step. At equal per-row "
             "acceptance, batch B decodes B x t(1)/t(B) the tokens/s of batch 1 (PROJECTED for sd: random weights; "
             "measured for ar, which has no acceptance).\n\n| batch | sd round ms | ar step ms | sd tok/s vs its "
             "batch 1 (PROJECTED) | ar tok/s vs its batch 1 |\n|---|---|---|---|---|\n"]
    for r in bt["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['error']} | | | |\n")
            continue
        lines.append(f"| {r['batch']} | {f(r.get('sd_round_ms'))} | {f(r.get('ar_step_ms'))} | "
                     f"{f(r.get('sd_tokens_per_s_vs_batch1_projected'))} | {f(r.get('ar_tokens_per_s_vs_batch1'))} |\n")
    return "".join(lines)


def load_acceptance(path: str | None) -> dict | None:
    """acceptance.json (or a ladder results.json) -> {"methods": {m: {...}}, "source": ...}."""
    if not path:
        return None
    d = json.loads(Path(path).read_text())
    if "results" in d and "args" in d:  # an experiments/bench_methods.py run
        return {**acceptance_from_bench_methods(d), "source": str(path)}
    if "aggregate" in d:  # a ladder results.json
        from mirror_jax.bench.aggregate import acceptance_summary

        return {**acceptance_summary(d), "source": str(path)}
    if "methods" not in d:
        raise ValueError(f"{path}: neither an acceptance.json nor a ladder results.json")
    return d


def acceptance_from_bench_methods(d: dict) -> dict:
    """A `bench_methods.py` run (real weights, CPU) -> the kit's acceptance format: sd's tokens per round,
    and for Mirror-SD the mirror row that fell back least, its fallback rate taken as 1 - (its hit rate
    at the largest budget its curve reports): conservative for the kit's kappa*(gamma+1) branches."""
    args, rows = d["args"], d["results"]
    sd = next(r for r in rows if r["method"] == "sd")
    mirrors = [r for r in rows if r["method"].startswith("mirror") and r.get("hit_rate_by_budget")]
    common = {"gamma": args.get("gamma"), "kappa": args.get("kappa")}
    methods = {"sd_ar": {**common, "mean_tokens_per_round": sd["mean_tokens_per_round"], "rounds": sd["rounds"]}}
    if mirrors:
        m = min(mirrors, key=lambda r: r["fallback_rate"])
        hits = m["hit_rate_by_budget"]
        methods["mirror_ar"] = {**common, "mean_tokens_per_round": m["mean_tokens_per_round"], "rounds": m["rounds"],
                                "fallback_rate": 1.0 - hits[-1], "fallback_rate_at_cpu_budget": m["fallback_rate"],
                                "fallback_from": f"{m['method']}: 1 - hit rate with {len(hits)} branches",
                                "omega_kappa": m.get("omega_kappa"), "exit_layer": (m.get("exit") or [None])[0]}
    return {"methods": methods, "kappa": args.get("kappa")}


def project(res: dict, acc: dict | None) -> dict:
    """PROJECTED decode speed-ups over ar from the measured phase times and CPU acceptance stats."""
    ph = res["phases_ms"]
    ar = ph.get("ar_step")
    out = {}
    defaults = {"sd_ar": 1.0, "sd_ss": 1.0, "mirror_ar": 1.0, "mirror_ss": 1.0}
    for m in METHODS:
        engine, v = m.split("_")
        if ph.get(f"draft_propose_{v}") is None:
            continue
        a = (acc or {}).get("methods", {}).get(m) or {}
        tpr = a.get("mean_tokens_per_round") or defaults[m]
        fb = a.get("fallback_rate")
        fb = 1.0 if fb is None and engine == "mirror" else (fb or 0.0)
        g = lambda k: ph.get(k) or 0.0
        if engine == "sd":
            serial = g("target_full") + g("verify") + g("channel") + g(f"draft_propose_{v}")
            modeled, measured = serial, ph.get(f"sd_round_{v}")
        else:
            extra = max(0.0, g(f"select_fallback_{v}") - g(f"select_reuse_{v}"))
            common = g("prefix") + g("channel_ee") + g("verify") + g("channel") + g(f"select_reuse_{v}") + fb * extra
            serial = common + g("suffix") + g(f"draft_rollout_{v}")
            modeled = common + max(g("suffix"), g(f"draft_rollout_{v}"))
            m_round = ph.get(f"mirror_round_{v}")
            measured = None if m_round is None else m_round + fb * extra
        out[m] = {
            "tokens_per_round": tpr, "fallback_rate": fb if engine == "mirror" else None,
            "acceptance_from": "file" if a else "none (1 token/round placeholder)",
            "serial_round_ms": serial, "modeled_two_device_round_ms": modeled, "measured_placement_round_ms": measured,
            "projected_speedup_measured_placement": (tpr / measured * ar) if ar and measured else None,
            "projected_speedup_modeled_two_device": (tpr / modeled * ar) if ar and modeled else None,
        }
    return out


def default_configs(mode: str, acc: dict | None, have_gpu: bool, n_cpu: int, gamma: int | None = None,
                    kappa: int | None = None, exit_layer: int | None = None) -> list[KitConfig]:
    """gamma: --gamma, else the acceptance file's (so tokens/round fit the window), else 7; kappa:
    --kappa, else the paper's 8 (more candidates than the CPU run only lowers the fallback rate)."""
    if acc and gamma is None:
        gs = [m.get("gamma") for m in acc.get("methods", {}).values() if m.get("gamma")]
        gamma = gs[0] if gs else None
    if acc and exit_layer is None:
        ls = [m.get("exit_layer") for m in acc.get("methods", {}).values() if m.get("exit_layer")]
        exit_layer = ls[0] if ls else None
    configs = _configs(mode, have_gpu, n_cpu, gamma, kappa)
    return [dataclasses.replace(c, exit_layer=exit_layer) for c in configs]


def _configs(mode: str, have_gpu: bool, n_cpu: int, gamma: int | None, kappa: int | None) -> list[KitConfig]:
    if mode == "tiny":
        g = gamma or 4
        out = [KitConfig("tiny one device", "tiny-target", "tiny-draft", "cpu:0", g, 4, 4, "float32")]
        if n_cpu > 1:
            out.append(KitConfig("tiny two host devices", "tiny-target", "tiny-draft", "cpu:0,cpu:1", g, 4, 2,
                                 "float32"))
        return out
    dev = "gpu:0" if have_gpu else "cpu:0"
    g, k = gamma or 7, kappa or 8
    out = [KitConfig("1.5B/0.5B on one GPU", "qwen2.5-1.5b", "qwen2.5-0.5b", dev, g, k, k * (g + 1)),
           KitConfig("7B/0.5B on one GPU", "qwen2.5-7b", "qwen2.5-0.5b", dev, g, k, k * (g + 1))]
    if mode == "full":  # most important first: the budget may cut the last ones
        out.append(KitConfig("1.5B on GPU / 0.5B on host CPU", "qwen2.5-1.5b", "qwen2.5-0.5b", f"{dev},cpu:0",
                             g, min(k, 4), 2, "float32"))
        out.append(KitConfig("7B on GPU / 0.5B on host CPU", "qwen2.5-7b", "qwen2.5-0.5b", f"{dev},cpu:0",
                             g, min(k, 4), 2, "float32"))
    return out


def to_markdown(payload: dict) -> str:
    from mirror_jax.bench.report import machine_md

    lines = ["# GPU timing kit (random weights, real jitted code paths)\n\n", machine_md(payload["machine"]),
             f"\nMode: {payload['mode']}; context {payload['ctx']} tokens; {payload['iters']} timed calls per phase "
             f"(median); acceptance from: {payload['acceptance_source'] or 'none (placeholders: 1 token/round)'}.\n",
             "\nPROJECTED speed-ups combine the phase times measured here with acceptance statistics measured on "
             "CPU with the real weights (tokens per round, fallback rate). 'measured placement' uses the whole round "
             "as dispatched on this placement (one device: serialised); 'MODELED two-device' is the spec's formula "
             "prefix + channel + max(suffix, draft) + verify + channel + select(reuse) + fallback share, i.e. the "
             "draft on a second device of the same speed.\n"]
    for r in payload["results"]:
        c = r["config"]
        lines.append(f"\n## {c['name']} ({c['target']} / {c['draft']}, placement {c['placement']}, gamma={c['gamma']}, "
                     f"kappa={c['kappa']}, branches={c['budget']}, "
                     f"exit layer {r.get('exit_layer', c.get('exit_layer'))})\n\n")
        if "error" in r:
            lines.append(f"Incomplete: {r['error']}\n\n")
        if not r.get("phases_ms"):
            continue
        bw = r.get("bandwidth") or {}
        if bw.get("fraction_of_copy") is not None:
            lines.append(f"Target decode step (ar): {bw['ar_step_ms']:.3f} ms for "
                         f"{bw['step_weight_bytes'] / 1e9:.2f} GB of "
                         f"weights + {bw['step_kv_bytes'] / 1e9:.3f} GB of K/V = {bw['ar_effective_gbs']:.0f} GB/s, "
                         f"**{100 * bw['fraction_of_copy']:.0f}% of the device's measured copy bandwidth** "
                         f"({bw['device_copy_gbs']:.0f} GB/s read + write; {100 * bw['fraction_of_read']:.0f}% of its "
                         f"read bandwidth, {bw['device_read_gbs']:.0f} GB/s); floor at copy bandwidth "
                         f"{bw['floor_ms_at_copy']:.3f} ms.\n\n")
        lines.append("| phase | ms (median) | first call s (compile) |\n|---|---|---|\n")
        for k, v in r["phases_ms"].items():
            lines.append(f"| {k} | {'-' if v is None else f'{v:.3f}'} | {r['compile_s'].get(k, 0):.1f} |\n")
        lines.append("\n| method | tokens/round | fallback | serial round ms | measured-placement round ms | "
                     "MODELED two-device round ms | PROJECTED speed-up (measured placement) | PROJECTED speed-up "
                     "(MODELED two-device) |\n|---|---|---|---|---|---|---|---|\n")
        f = lambda v: "-" if v is None else f"{v:.2f}"
        for m, p in r.get("projection", {}).items():
            lines.append(f"| {m} | {f(p['tokens_per_round'])} | {f(p['fallback_rate'])} | {f(p['serial_round_ms'])} | "
                         f"{f(p['measured_placement_round_ms'])} | {f(p['modeled_two_device_round_ms'])} | "
                         f"{f(p['projected_speedup_measured_placement'])} | "
                         f"{f(p['projected_speedup_modeled_two_device'])} |\n")
    if payload.get("batch"):
        lines.append(batch_markdown(payload["batch"]))
    if payload.get("notes"):
        lines.append("\nNotes:\n" + "".join(f"- {n}\n" for n in payload["notes"]))
    return "".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acceptance", default=None, help="acceptance.json or results.json of a CPU ladder run")
    ap.add_argument("--quick", action="store_true", help="GPU-only configurations, fewer timed calls")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test of this script)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this many seconds")
    ap.add_argument("--ctx", type=int, default=None, help="committed context length (default 512; tiny 32)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per phase (default 20; quick 8)")
    ap.add_argument("--gamma", type=int, default=None, help="draft window (default: the acceptance file's, else 7)")
    ap.add_argument("--kappa", type=int, default=None, help="early-exit candidates (default 8; tiny 4)")
    ap.add_argument("--exit-layer", type=int, default=None,
                    help="prefix/suffix split (default: the acceptance file's exit layer, else half the layers)")
    ap.add_argument("--no-ss", action="store_true", help="skip the SS-draft variants")
    ap.add_argument("--batches", type=int, nargs="*", default=None,
                    help="batch sizes of the batch-scaling part (default 1 4 8; tiny 1 4; none: skip it)")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "gpu"))
    ap.add_argument("--tag", default=None, help="output name suffix: gpu_kit_<tag>.json")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)

    import jax

    from mirror_jax.bench.report import machine_info, write_results

    try:
        have_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        have_gpu = False
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    acc = load_acceptance(args.acceptance)
    notes = []
    if not have_gpu and mode != "tiny":
        notes.append("no GPU found: the configurations ran on the CPU instead (numbers are NOT GPU numbers)")
    with_ss = not args.no_ss
    if not with_ss:
        notes.append("SS-draft variants not measured (--no-ss)")
    else:
        notes.append("SS draft: a random LoRA adapter (2 streams, 2 MSA layers, rank 16); timing only")
    ctx = args.ctx or (32 if mode == "tiny" else 512)
    iters = args.iters or (3 if mode == "tiny" else 8 if mode == "quick" else 20)
    configs = default_configs(mode, acc, have_gpu, len(jax.devices("cpu")), args.gamma, args.kappa,
                              args.exit_layer)
    if acc is None:
        notes.append("no --acceptance file: projections use 1 token/round and fallback 1.0 placeholders")
    print(f"GPU kit ({mode}): {len(configs)} configurations, budget {args.budget_s:.0f}s, devices {jax.devices()}",
          flush=True)

    models: dict = {}
    results = []
    est = {"tiny": 5, "quick": 60, "full": 60}[mode]
    for kc in configs:
        if budget.left < est:
            results.append({"config": dataclasses.asdict(kc), "error": f"skipped: {budget.left:.0f}s of budget left"})
            print(f"- {kc.name}: skipped (budget)", flush=True)
            continue
        print(f"- {kc.name}", flush=True)
        t0 = time.perf_counter()
        r = {"config": dataclasses.asdict(kc), "compile_s": {}, "phases_ms": {}}
        try:
            measure_config(kc, ctx, iters, budget, models, with_ss, r)
        except Exception as e:  # OOM, a missing device, the budget: keep the other configurations
            r.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
            print(f"  failed: {type(e).__name__}: {e}", flush=True)
        r["projection"] = project(r, acc)
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        # drop models the remaining configurations do not use (frees GPU memory for the 7B target)
        rest = {c.target for c in configs[configs.index(kc) + 1:]} | {c.draft for c in configs[configs.index(kc) + 1:]}
        for key in [k for k in models if k[0] not in rest]:
            del models[key]
    batch = None
    batches = ([1, 4] if mode == "tiny" else [1, 4, 8]) if args.batches is None else args.batches
    if batches and budget.left > 60 * (mode != "tiny"):
        print(f"- batch scaling {batches}", flush=True)
        tgt, drf = ("tiny-target", "tiny-draft") if mode == "tiny" else ("qwen2.5-1.5b", "qwen2.5-0.5b")
        try:
            batch = measure_batch(tgt, drf, batches, args.gamma or 4, ctx, iters, budget, models, mode == "tiny")
        except Exception as e:
            batch = {"target": tgt, "draft": drf, "gamma": args.gamma or 4, "ctx": ctx,
                     "rows": [{"batch": 0, "error": f"{type(e).__name__}: {e}"}]}
            print(f"  failed: {type(e).__name__}: {e}", flush=True)
    elif batches:
        notes.append(f"batch scaling skipped: {budget.left:.0f}s of budget left")
    payload = {"mode": mode, "ctx": ctx, "iters": iters, "machine": machine_info(), "have_gpu": have_gpu,
               "acceptance_source": (acc or {}).get("source"), "acceptance": acc, "results": results, "batch": batch,
               "notes": notes, "elapsed_s": args.budget_s - budget.left}
    name = "gpu_kit" + (f"_{args.tag}" if args.tag else ("_tiny" if mode == "tiny" else ""))
    jp, mp = write_results(args.out, name, payload, to_markdown(payload))
    print(to_markdown(payload))
    print(f"wrote {jp} and {mp} in {payload['elapsed_s']:.0f}s")
    return 0 if any("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
