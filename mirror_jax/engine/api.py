"""One entry point for every decoding method: `generate(..., method="ar"|"sd"|"mirror")`.

Example::

    from mirror_jax import generate, default_pair
    target, draft, tok = default_pair()
    ids = tok.encode("def fib(n):")
    res = generate(target, [ids], 64, method="mirror", draft=draft, placement="cpu:0,cpu:1")
    res.tokens[0], res.stats["mean_tokens_per_round"], res.stats["fallback_rate"]

`target` and `draft` are `LoadedModel`s (from `mirror_jax.loading`) or ``(cfg, params)`` pairs.
All methods return the same tokens for the same seed: greedy output is token-identical to the
target's own greedy decoding; sampled output follows the target's distribution exactly.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.draft_vocab import DraftVocabError, reduced_vocab, restrict_head, vocab_ids
from mirror_jax.engine.autoregressive import GenerationResult, generate_ar
from mirror_jax.engine.device_loop import LoopSpec, run_device_loop
from mirror_jax.engine.placement import Placement
from mirror_jax.engine.prefill import CONTEXT_SINK, cache_capacity, pad_prompts, truncate_at_eos, validate_prompts
from mirror_jax.engine.speculative import DraftModel, SpecDecoder, SpecSettings, TargetModel
from mirror_jax.engine.stats import summarize, summarize_rows
from mirror_jax.exit.checkpoint import ExitHeads
from mirror_jax.exit.head import ExitHead, check_exit_head, restrict_exit
from mirror_jax.layout import slow_bf16_windows
from mirror_jax.quant import QuantError, check_mode, params_quantized, quantize_params
from mirror_jax.rounds.verify import VERIFIERS
from mirror_jax.sampling import SamplingParams
from mirror_jax.ss.rollout import ss_draft

METHODS = ("ar", "sd", "mirror")
LOOPS = ("host", "device")
STOP_RULES = ("token", "window")  # `SpecSettings.stop_rule`: how draft_stop ends a window


class ConfigError(ValueError):
    """Invalid decoding settings (gamma, kappa, exit layer, method, draft/target pairing)."""


# Defaults per device kind. Accelerators follow the paper (gamma 7, kappa 8, all branches). On a
# compute-bound CPU every extra branch costs real time, so fewer branches and a shorter window win.
DEVICE_DEFAULTS = {
    # Branch budgets apply where the draft has a device of its own (`default_branch_budget`: none
    # where it shares the target's). CPU: one branch. Measured (experiments/results/bench_methods*.md):
    # on one CPU device a 2-row draft forward costs ~1.8x a 1-row one, so budget 1 ran fastest of
    # budgets 1, 2, 4. Every draft on one CPU device: a 32768-token LM head (the draft forward
    # costs ~0.8x the whole head's and 98% of ar's tokens on code lie inside).
    # Vanilla SD's rounds (sd; mirror without rollouts; either draft) on CPU: windows of up to
    # sd_gamma = 7 tokens that end after a token the draft gives less than draft_stop = 0.6. In three
    # runs it beat gamma 4 with full windows: 1.25x vs 1.20x ar and 1.40x vs 1.31x on held-out code
    # (experiments/results/sd_draft.md at bdf5dc7 and 7d4e080), 0.98x vs 0.91x on five SpecBench
    # questions (sd_draft_specbench.md at 3bc0bdd).
    # The early exit keeps its whole LM head: at 32768 ids its prefix was 19 ms shorter but the branch
    # hit rate fell from 0.55 to 0.48 on code (experiments/results/bench_methods_code.md), a wash.
    # A batch of B rows in the device loop (vanilla SD's rounds): full windows of
    # max(2, min(sd_gamma, batch_rows // B - 1)). Two CPU cores are compute-bound once a verification
    # forward has a dozen or more rows, so a batch's windows shrink; a batch's window lasts until its
    # longest row stops, so early stops save little there. experiments/results/bench_loop.md (at
    # 9901f50) swept gamma 2/3/4/7: best at batch 4 gamma 2 (14.1 tok/s vs 13.6/11.4/10.5), at
    # batch 8 gamma 2 and 3 (19.0, 18.9 vs 15.1/14.2).
    # The draft's matrices in int8 (W8A8, `mirror_jax.quant`; lossless: the draft only proposes): on
    # this CPU a draft forward took 20 ms instead of 36 with the same tokens per round
    # (experiments/results/probe_int8.md, sd_int8_draft.md).
    # A window the draft ended early is verified by a forward over 4 rows instead of gamma + 1 = 8 when
    # it holds at most 3 tokens (most do: 70% of sd's rounds on the SpecBench ladder, specbench_cpu_ladder
    # at 597ce26): on this CPU a float32 target forward over 2 or 4 rows costs ~1.25x a 1-row step, over
    # 8 rows ~1.5x (experiments/results/bench_decode.md); the host reads the window's length first.
    "cpu": {"gamma": 4, "kappa": 4, "branch_budget": 1, "draft_vocab": 32768, "exit_vocab": 0,
            "sd_gamma": 7, "draft_stop": 0.6, "draft_stop_rule": "token", "batch_rows": 12, "draft_quant": "int8",
            "draft_context": 0, "verify_rows": (4,)},
    # Accelerators: not measured yet, so the whole heads, a float draft and the paper's full windows
    # of 7 (a batch's rows are nowhere near compute-bound there: no batch rule; nor is a verification
    # forward, so no shorter ones: verify_rows would only add a host read per round).
    "gpu": {"gamma": 7, "kappa": 8, "branch_budget": 64, "draft_vocab": 0, "exit_vocab": 0, "sd_gamma": 7,
            "draft_stop": 0.0, "draft_stop_rule": "token", "batch_rows": None, "draft_quant": "none",
            "draft_context": 0, "verify_rows": ()},
    "tpu": {"gamma": 7, "kappa": 8, "branch_budget": 64, "draft_vocab": 0, "exit_vocab": 0, "sd_gamma": 7,
            "draft_stop": 0.0, "draft_stop_rule": "token", "batch_rows": None, "draft_quant": "none",
            "draft_context": 0, "verify_rows": ()},
}


def default_branch_budget(placement: Placement, max_branches: int) -> int:
    """Mirror-SD's branch budget when none is given: the device default (`DEVICE_DEFAULTS`) where
    the draft has devices of its own, and 0 (no branch rollouts) where it shares the target's.

    Why 0 there: a branch rollout costs about what the fallback chain costs (gamma draft forwards,
    one row per branch), and on a shared device it runs in series with the target instead of under
    its suffix. A round with budget n therefore drafts ``T_rollout(n) + P(miss) * T_chain`` on the
    critical path against vanilla SD's ``T_chain``: more for every hit rate below 1. Measured on one
    CPU device (README, "Mirror-SD on one device"): budget 1 ran at ~0.8x sd, budget 0 at sd's
    speed. With budget 0 a Mirror-SD round is a vanilla-SD round (one unsplit verification forward,
    no early exit, the next window drafted after verification): fallback rate 1, no Omega_kappa.
    Pass ``branch_budget`` explicitly to roll out branches on one device anyway (e.g. to study
    hit rates)."""
    if not placement.separate:
        return 0
    return min(_device_defaults(placement)["branch_budget"], max_branches)


class PerformanceHint(UserWarning):
    """A setting that works, and is lossless, but runs slower than an alternative on this machine."""


def _hint_bf16_windows(params, pl: Placement) -> None:
    """Warn when sd/mirror verify bfloat16 target windows on a CPU without native bfloat16
    arithmetic (`mirror_jax.layout.slow_bf16_windows`), where float32 runs them faster."""
    w = params.layers[0].w_qkv
    if getattr(w, "dtype", None) == jnp.bfloat16 and all(d.platform == "cpu" for d in pl.target_group) \
            and slow_bf16_windows():
        warnings.warn(
            "bfloat16 target on a CPU without avx512_bf16/amx_bf16: XLA:CPU runs the multi-row products of "
            "sd/mirror verification windows slower in bfloat16 than in float32 here (an 8-token forward "
            "~1.5x float32's; see the README's dtype paragraph), and bfloat16 sd/mirror output can differ "
            "from ar's where two tokens nearly tie. Load both models with dtype=jnp.float32 for sd/mirror "
            "on this CPU (bfloat16 still pays for plain 'ar' decoding).",
            PerformanceHint, stacklevel=3)


def _unpack(model, what: str):
    if model is None:
        raise ConfigError(f"{what} model is required")
    if isinstance(model, tuple):
        cfg, params = model
        return cfg, params, None
    return model.cfg, model.params, getattr(model, "tokenizer", None)


def check_pair(target_cfg, draft_cfg, target_tok=None, draft_tok=None) -> None:
    """Draft and target must share the vocabulary (token ids cross the channel)."""
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ConfigError(
            f"draft vocabulary ({draft_cfg.vocab_size} tokens) differs from the target's "
            f"({target_cfg.vocab_size}): Mirror-SD exchanges token ids, so both models must use the same "
            f"tokenizer"
        )
    if target_tok is not None and draft_tok is not None:
        from mirror_jax.loading import check_same_tokenizer

        try:
            check_same_tokenizer(target_tok, draft_tok)
        except ValueError as e:
            raise ConfigError(f"draft and target tokenizers differ: {e}") from e


def resolve_exit(exit_head, target, target_cfg, exit_layer):
    """(exit layer or None, ExitHead or None) from `generate`'s `exit_head` and `exit_layer`.

    "auto": the heads attached to the target (`LoadedModel.exit_heads`; `default_pair` attaches the
    committed ones), their default layer unless `exit_layer` is given, and the untrained exit at a
    layer they have no head for. None: the untrained exit. An `ExitHeads`: like "auto" with those
    heads. An `ExitHead`: that head, at its own layer."""
    if isinstance(exit_head, str):
        if exit_head != "auto":
            raise ConfigError(f"exit_head must be 'auto', None, an ExitHead or ExitHeads, got {exit_head!r}")
        heads = getattr(target, "exit_heads", None)
    elif exit_head is None or isinstance(exit_head, ExitHeads):
        heads = exit_head
    elif isinstance(exit_head, ExitHead):
        heads = ExitHeads({exit_head.layer: exit_head}, default_layer=exit_head.layer)
    else:
        raise ConfigError(f"exit_head must be 'auto', None, an ExitHead or ExitHeads, got {type(exit_head).__name__}")
    if heads is None:
        return exit_layer, None
    layer = heads.default_layer if exit_layer is None else exit_layer
    # An explicit ExitHead must serve the layer asked for; heads without one fall back to the untrained exit.
    head = exit_head if isinstance(exit_head, ExitHead) else (None if layer is None else heads.for_layer(layer))
    try:
        check_exit_head(target_cfg, head, layer)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return layer, head


def resolve_settings(
    method, target_cfg, placement: Placement, *, gamma, kappa, exit_layer, branch_budget, verifier,
    sampling: SamplingParams, profile: bool, allow_full_exit: bool, draft_stop=None, ss: bool = False,
    batch: int = 1, draft_stop_rule: str | None = None, draft_context: int | None = None, ss_tail: bool = False,
    verify_rows=None, loop: str = "host",
) -> SpecSettings:
    """Fill in device defaults and validate every setting before any work starts.

    Vanilla SD's rounds (method "sd", and "mirror" without branch rollouts: `default_branch_budget`),
    with the plain or the SS draft (`ss`), take the device's ``sd_gamma`` and, when gamma is not given
    either, its ``draft_stop``; a batch of `batch` > 1 rows decoded together (the device loop) with
    the plain draft takes full windows of ``max(2, min(sd_gamma, batch_rows // batch - 1))`` where the
    device has a ``batch_rows`` (CPU). Mirror-SD with rollouts, and an SS batch, take ``gamma`` and
    full windows. `verify_rows` (host loop, windows that end early): see `generate`; None takes the
    device's where a window can end early (``draft_stop`` > 0) and () elsewhere."""
    d = _device_defaults(placement)
    no_rollouts = (default_branch_budget(placement, 1) if branch_budget is None else branch_budget) == 0
    # Vanilla SD's rounds, either draft; an SS batch (unmeasured: at the batch rule's gamma 2 its streams
    # could save no forward) keeps gamma and full windows.
    plain_sd = (method == "sd" or (method == "mirror" and no_rollouts)) and not (ss and batch > 1)
    batch_rule = plain_sd and batch > 1 and d["batch_rows"] is not None
    if draft_stop is None:  # the device's adaptive window goes with its window length, not with any gamma
        draft_stop = d["draft_stop"] if plain_sd and gamma is None and not batch_rule else 0.0
    if gamma is None:
        gamma = d["sd_gamma"] if plain_sd else d["gamma"]
        if batch_rule:
            gamma = max(2, min(gamma, d["batch_rows"] // batch - 1))
    kappa = d["kappa"] if kappa is None else kappa
    n = target_cfg.num_layers
    exit_layer = n // 2 if exit_layer is None else exit_layer
    if not isinstance(gamma, int) or gamma < 1:
        raise ConfigError(f"gamma (draft window length) must be an integer >= 1, got {gamma!r}")
    if not isinstance(kappa, int) or kappa < 1:
        raise ConfigError(f"kappa (early-exit candidates per position) must be an integer >= 1, got {kappa!r}")
    hi = n if allow_full_exit else n - 1
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= hi:
        extra = "" if allow_full_exit else f" (exit_layer={n} is a testing switch: allow_full_exit=True)"
        raise ConfigError(f"exit_layer must be in 1..{n - 1} for a {n}-layer target, got {exit_layer!r}{extra}")
    max_branches = kappa * (gamma + 1)
    if branch_budget is None:  # no rollouts where nothing can overlap them: see `default_branch_budget`
        budget = default_branch_budget(placement, max_branches)
    else:
        budget = branch_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= max_branches:
        raise ConfigError(f"branch_budget must be in 0..kappa*(gamma+1)={max_branches} (0: no branch rollouts), "
                          f"got {branch_budget!r}")
    if verifier is None:
        verifier = "greedy" if sampling.greedy else "sample_match"
    if verifier not in VERIFIERS:
        raise ConfigError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    if (verifier == "greedy") != sampling.greedy:
        raise ConfigError(
            f"verifier {verifier!r} does not fit temperature={sampling.temperature}: use 'greedy' with "
            f"temperature 0 and 'sample_match' or 'rejection' with temperature > 0"
        )
    if isinstance(draft_stop, bool) or not isinstance(draft_stop, int | float) or not 0.0 <= draft_stop < 1.0:
        raise ConfigError(f"draft_stop must be a probability in [0, 1) (0: full windows), got {draft_stop!r}")
    sd_rounds = method == "sd" or budget == 0  # vanilla SD's rounds: no branch rollouts
    if draft_stop > 0 and not sd_rounds:
        raise ConfigError(
            "draft_stop (ending a window early) applies to vanilla SD's rounds (method 'sd', "
            f"or 'mirror' with branch_budget=0); got method {method!r} with branch_budget={budget}"
            ": leave draft_stop at None or 0")
    rule = d["draft_stop_rule"] if draft_stop_rule is None else draft_stop_rule
    if rule not in STOP_RULES:
        raise ConfigError(f"draft_stop_rule must be one of {STOP_RULES}, got {draft_stop_rule!r}")
    context = d["draft_context"] if draft_context is None else draft_context
    if isinstance(context, bool) or not isinstance(context, int) or not (context == 0 or context > 2 * CONTEXT_SINK):
        raise ConfigError(f"draft_context must be 0 (the draft reads the whole prompt) or an int > "
                          f"{2 * CONTEXT_SINK} (the prompt's first {CONTEXT_SINK} and last draft_context - "
                          f"{CONTEXT_SINK} tokens), got {draft_context!r}")
    if not isinstance(ss_tail, bool):
        raise ConfigError(f"ss_tail must be True or False, got {ss_tail!r}")
    if ss_tail and not ss:
        raise ConfigError("ss_tail (the SS draft's lookahead tail) needs a speculative-streaming draft: "
                          "pass ss_adapter")
    if ss_tail and not sd_rounds:
        raise ConfigError(
            "ss_tail applies to vanilla SD's rounds (method 'sd', or 'mirror' with branch_budget=0): "
            f"branch rollouts need every window token's K/V; got method {method!r} with branch_budget={budget}")
    rows = _verify_rows(verify_rows, d["verify_rows"], gamma, draft_stop > 0 and sd_rounds and loop == "host")
    return SpecSettings(method, gamma, kappa, exit_layer, budget, verifier, profile, float(draft_stop), rule, context,
                        ss_tail, rows)


def _verify_rows(setting, default, gamma: int, applies: bool) -> tuple[int, ...]:
    """The checked `verify_rows` setting: sorted row counts in 2..gamma (a forward over all gamma + 1
    rows always remains for longer windows). They apply to vanilla SD's rounds in the host loop with
    windows that can end early (`applies`); None takes `default` there and () elsewhere."""
    if setting is None:
        return tuple(r for r in default if 2 <= r <= gamma) if applies else ()
    if isinstance(setting, int | np.integer) and not isinstance(setting, bool):
        setting = () if setting == 0 else (setting,)
    vals = list(setting) if isinstance(setting, Sequence) and not isinstance(setting, str) else [setting]
    ok = all(isinstance(r, int | np.integer) and not isinstance(r, bool) for r in vals)
    rows = tuple(sorted({int(r) for r in vals})) if ok else ()
    if not ok or any(not 2 <= r <= gamma for r in rows):
        raise ConfigError(f"verify_rows must list row counts in 2..gamma={gamma} (a window of up to r - 1 "
                          f"drafted tokens is verified by a forward over r rows; 0 or (): always gamma + 1), "
                          f"got {setting!r}")
    if rows and not applies:
        raise ConfigError(
            "verify_rows (shorter verification forwards for windows the draft ended early) applies to vanilla "
            "SD's rounds (method 'sd', or 'mirror' with branch_budget=0) in the host loop with draft_stop > 0 "
            "(full windows always need gamma + 1 rows): leave verify_rows at None or ()")
    return rows


def generate(
    target,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    *,
    method: str = "ar",
    draft=None,
    gamma: int | None = None,
    kappa: int | None = None,
    exit_layer: int | None = None,
    branch_budget: int | None = None,
    placement: str | Placement | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    verifier: str | None = None,
    eos_ids: Sequence[int] | None = None,
    max_len: int | None = None,
    profile: bool = False,
    allow_full_exit: bool = False,
    ss_adapter=None,
    progress=None,
    loop: str = "host",
    exit_head="auto",
    draft_stop: float | None = None,
    draft_vocab: int | Sequence[int] | None = None,
    exit_vocab: int | Sequence[int] | None = None,
    draft_quant: str | None = None,
    draft_stop_rule: str | None = None,
    draft_context: int | None = None,
    ss_tail: bool = False,
    verify_rows: int | Sequence[int] | None = None,
) -> GenerationResult:
    """Decode `prompts` (lists of token ids) with `method`; see the module docstring.

    ``loop="host"`` (default) runs the speculative methods one prompt at a time (batch 1), one host
    synchronisation per round, on one or two devices (`placement`), with per-round records and
    ``profile`` timings. ``loop="device"`` runs all prompts as one batch inside a single
    `lax.while_loop` on one device (`mirror_jax.engine.device_loop`): no host round trips, per-row
    statistics (``stats["per_row"]``), the same tokens. "ar" always batches its prompts. Stats include
    tokens/s, mean tokens per round, accepted-length histogram, reuse/fallback counts and
    Omega_kappa (mirror), and per-phase median times when `profile=True`.

    `ss_adapter`: a speculative-streaming adapter for the draft, ``(SSConfig, SSParams)`` or the
    ``(sscfg, ssp, metadata)`` returned by `mirror_jax.ss.checkpoint.load_default_ss_adapter`; the
    draft then emits several tokens per forward (the same tokens as the plain draft).

    `ss_tail` (vanilla SD's rounds with `ss_adapter`, host loop): once a draft forward leaves a
    window r <= streams tokens short, the streams' lookaheads fill it without the draft's own check
    (`mirror_jax.ss.rollout.ss_chain`'s ``tail``): fewer draft forwards per window, proposals the
    target accepts less often. Lossless like any draft (greedy output equals ar's; rejection sampling
    gets each tail token's stream distribution as q). Off by default.

    `exit_head` (mirror): the trained early exit, see `resolve_exit`. With the default pair the
    committed heads are used and `exit_layer` defaults to their recommended layer; ``None`` gives the
    untrained exit (the target's LM head on layer l_e). It changes which branches are rolled out,
    never the output.

    `draft_stop` (vanilla SD's rounds: sd, or mirror without rollouts; the plain or the SS draft): the
    draft ends a window after a token it gives less than this probability, so gamma is a maximum
    (adaptive draft length; lossless: verification never accepts past the drafted tokens; the SS
    draft ends its windows where the plain draft would, in fewer forwards). 0 keeps full windows;
    None takes the device default when gamma is not given either (CPU: windows of up to 7 ending below
    0.6, measured fastest there with the plain draft; with the SS draft ahead of full windows by the
    per-prompt median, level over all tokens; see the README; accelerators: full windows of 7), and
    full windows with an explicit gamma or an SS batch. A batch in the device loop on CPU takes full windows of
    max(2, min(7, 12 // B - 1)) when gamma is not given (B = 2: 5, B >= 4: 2; `DEVICE_DEFAULTS`).
    `draft_stop_rule`: "token" tests each drafted token's probability against `draft_stop`;
    "window" tests the product of the window's probabilities so far (the draft's own estimate that
    the whole window is right). None: the device default.

    `draft_vocab`: the draft's LM head covers only these token ids (a sequence), or the first N ids
    plus the EOS and special tokens (an int N); a cheaper draft forward that never proposes the other
    tokens (`mirror_jax.draft_vocab`; lossless). 0: the whole vocabulary; None: the device default
    (32768 for a draft on one CPU device, the whole vocabulary elsewhere).

    `exit_vocab` (mirror with branch rollouts): the early exit's LM head covers only these token
    ids, or the first N plus EOS/special tokens (`mirror_jax.exit.head.restrict_exit`); its
    candidates only choose which branches are rolled out, so the output never changes. 0: the whole
    vocabulary; None: the device default (the whole vocabulary on every device kind for now).

    `draft_quant`: "int8" runs the draft's matrices in int8 (per-row weight scales, activations
    quantized per token; `mirror_jax.quant`), "none" in the draft's own dtype. The draft only
    proposes, so this never changes the output, only acceptance and the draft's speed. None: the
    device default ("int8" for a draft on one CPU device, "none" elsewhere).

    `draft_context`: the draft prefills at most this many prompt tokens, the prompt's first 32 and
    its last ``draft_context - 32`` (`mirror_jax.engine.prefill.draft_context_ids`); a long prompt's
    draft prefill then costs a fraction, and the draft reads less of it: on SpecBench's long prompts
    acceptance fell more than the start shrank (README, "A shorter draft context does not pay"). The
    draft only proposes, so the output never changes. 0: the whole prompt; None: the device default
    (0 on every device kind).

    `verify_rows` (vanilla SD's rounds in the host loop with ``draft_stop`` > 0): row counts r of
    shorter verification forwards; a window of at most r - 1 drafted tokens is verified by a target
    forward over r rows ``[last, d_1 .. d_{r-1}]`` (the smallest such r) instead of gamma + 1, the
    host reading the window's length before it dispatches the forward (a second sync per round, on
    the critical path only for its dispatch latency). Lossless: verification never reads past the
    drafted tokens. Where the target forward is compute-bound it costs what its rows cost: on CPU a
    4-row forward ~1.25x a 1-row step, 8 rows ~1.5x. None: the device default ((4,) on CPU, () on
    accelerators, where a forward costs the same over 4 or 8 rows); 0 or (): every forward covers
    gamma + 1 rows."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {METHODS}")
    if loop not in LOOPS:
        raise ConfigError(f"loop must be one of {LOOPS}, got {loop!r}")
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    cfg_t, p_t, tok_t = _unpack(target, "target")
    prompts = validate_prompts(prompts, cfg_t.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pl = Placement.parse(placement)
    eos = tuple(cfg_t.eos_token_ids if eos_ids is None else eos_ids)
    if method == "ar":
        if loop != "host":
            raise ConfigError("loop='device' applies to methods 'sd' and 'mirror'; 'ar' already batches its prompts")
        res = generate_ar(
            *pl.place_target(cfg_t, p_t), prompts, max_new_tokens, sampling=sampling, eos_ids=eos, max_len=max_len
        )
        res.stats["tokens_per_s"] = res.num_generated / max(res.stats["total_s"], 1e-9)
        return res
    cfg_d, p_d, tok_d = _unpack(draft, "draft (needed for method 'sd'/'mirror')")
    check_pair(cfg_t, cfg_d, tok_t, tok_d)
    _hint_bf16_windows(p_t, pl)
    ids = _vocab_setting(draft_vocab, cfg_d, tok_d, "draft_vocab", "the draft", pl.draft_group,
                         default=_device_defaults(pl)["draft_vocab"])
    if ids is not None:
        p_d = _restricted(p_d, cfg_d, ids)
    quant = _quant_setting(draft_quant, pl)
    exit_layer, head = resolve_exit(exit_head, target, cfg_t, exit_layer) if method == "mirror" else (exit_layer, None)
    s = resolve_settings(
        method, cfg_t, pl, gamma=gamma, kappa=kappa, exit_layer=exit_layer, branch_budget=branch_budget,
        verifier=verifier, sampling=sampling, profile=profile, allow_full_exit=allow_full_exit,
        draft_stop=draft_stop, ss=ss_adapter is not None, batch=len(prompts) if loop == "device" else 1,
        draft_stop_rule=draft_stop_rule, draft_context=draft_context, ss_tail=ss_tail, verify_rows=verify_rows,
        loop=loop,
    )
    if ss_tail and loop == "device":
        raise ConfigError("ss_tail runs in the host loop (loop='host'): the device loop's windows keep every K/V")
    if method == "sd" and exit_vocab not in (None, 0):
        raise ConfigError("exit_vocab applies to method 'mirror' (vanilla SD has no early exit)")
    if s.rollouts:
        ids = _vocab_setting(exit_vocab, cfg_t, tok_t, "exit_vocab", "the target", pl.target_group,
                             default=_device_defaults(pl, pl.target)["exit_vocab"])
        if ids is not None:
            head = _restricted_exit(head, cfg_t, p_t, ids, s.exit_layer)
    capacity = cache_capacity(max(map(len, prompts)), max_new_tokens, s.margin(), max_len)
    sscfg, ssp = (None, None) if ss_adapter is None else tuple(ss_adapter)[:2]
    if ssp is not None and len(pl.draft_group) > 1:
        raise ConfigError("a speculative-streaming draft runs on one device: give the draft a single device")
    tgt = TargetModel(*pl.place_target(cfg_t, p_t), exit_head=None if head is None else pl.to_target(head))
    cfg_d, p_run = pl.place_draft(cfg_d, p_d if quant == "none" else _quantized(p_d, quant))
    ss = None if ssp is None else _ss_prepared(cfg_d, sscfg, p_d, p_run, ssp, quant, pl)
    drf = DraftModel(cfg_d, p_run, ss)
    if loop == "device":
        return _generate_device(tgt, drf, s, pl, prompts, max_new_tokens, sampling, eos, capacity)
    t0 = time.perf_counter()
    tokens, rounds, start_s = [], [], 0.0
    for row, prompt in enumerate(prompts):
        dec = SpecDecoder(tgt, drf, s, pl, sampling, capacity, row=row)
        toks, recs = dec.generate(prompt, max_new_tokens, eos_ids=eos, progress=progress)
        tokens.append(toks)
        rounds.extend(recs)
        start_s += dec.start_s
    total = time.perf_counter() - t0
    # start_s: prefills, first tokens and first windows (summed over prompts); decode_s (summarize): rounds
    stats = {"method": method, "loop": "host", "total_s": total, "start_s": start_s, "settings": dataclasses.asdict(s),
             "placement": pl.describe(), "draft_kind": "ar" if ssp is None else "ss", "exit_head": _exit_kind(tgt, s),
             "draft_vocab": _vocab_size(drf), "exit_vocab": _exit_vocab_size(tgt, s), "draft_quant": _quant_kind(drf)}
    stats.update(summarize(rounds, s.gamma))
    res = GenerationResult(tokens=tokens, stats=stats)
    res.stats["tokens_per_s"] = res.num_generated / max(total, 1e-9)
    res.stats["per_round"] = [r.to_dict() for r in rounds]
    return res


def _generate_device(tgt: TargetModel, drf: DraftModel, s: SpecSettings, pl: Placement, prompts, max_new_tokens: int,
                     sampling: SamplingParams, eos, capacity: int) -> GenerationResult:
    """`loop="device"`: every prompt in one batch, decoded by one compiled `lax.while_loop`."""
    if pl.separate:
        raise ConfigError(
            f"loop='device' runs the whole loop on one device, but the placement has two ({pl.describe()}); "
            f"use loop='host' for a two-device placement, or a single device such as placement='cpu:0'"
        )
    if s.profile:
        raise ConfigError("profile=True times each phase from the host: use loop='host' for per-phase profiles")
    # The length limit is traced: one compiled loop per (prompt bucket, capacity), whatever max_new_tokens.
    spec = LoopSpec(tgt.cfg, drf.cfg, s, None, capacity, tuple(int(e) for e in eos))
    toks, n_valid = pad_prompts(prompts)
    samp = pl.to_target(sampling.arrays(row=np.arange(len(prompts))))
    t0 = time.perf_counter()
    res = run_device_loop(spec, tgt.params, drf.params, pl.to_target(toks), pl.to_target(n_valid), samp, drf.ss,
                          tgt.exit_head, pl.to_target(np.int32(max_new_tokens)))
    out, n_out, counts = jax.device_get((res.tokens, res.n_out, dataclasses.asdict(res.stats)))  # the one sync
    total = time.perf_counter() - t0
    tokens = [truncate_at_eos(out[b, : n_out[b]].tolist(), set(eos), max_new_tokens) for b in range(len(prompts))]
    stats = {"method": s.method, "loop": "device", "batch": len(prompts), "total_s": total,
             "settings": dataclasses.asdict(s), "placement": pl.describe(),
             "draft_kind": "ar" if drf.ss is None else "ss", "exit_head": _exit_kind(tgt, s),
             "draft_vocab": _vocab_size(drf), "exit_vocab": _exit_vocab_size(tgt, s), "draft_quant": _quant_kind(drf)}
    stats.update(summarize_rows(counts, s.method, s.rollouts))
    res = GenerationResult(tokens=tokens, stats=stats)
    res.stats["tokens_per_s"] = res.num_generated / max(total, 1e-9)
    return res


def _vocab_setting(setting, cfg, tok, name: str, whose: str, group, default=0) -> np.ndarray | None:
    """The checked, sorted token ids of a `draft_vocab` / `exit_vocab` setting (an int N: the first
    N ids plus EOS and the tokenizer's special tokens; a sequence: those ids), or None for the whole
    vocabulary (0, or ids that cover it). None takes `default` (the device kind's) for a model on one
    device; a model sharded over a group keeps its whole head."""
    if setting is None:
        setting = default if len(group) == 1 else 0
    if isinstance(setting, int | np.integer) and not isinstance(setting, bool) and setting == 0:
        return None
    if len(group) > 1:
        raise ConfigError(f"a reduced vocabulary ({name}) needs {whose} on one device, not a group")
    try:
        if isinstance(setting, int | np.integer) and not isinstance(setting, bool):
            setting = reduced_vocab(cfg, int(setting), keep=getattr(tok, "all_special_ids", None) or ())
        ids = vocab_ids(setting, cfg.vocab_size)
    except (DraftVocabError, TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e} (give an int N >= 1 or a sequence of token ids)") from e
    return None if ids.size == cfg.vocab_size else ids


# (ids of the source arrays, vocabulary) -> (the sources, kept alive so their ids stay unique; result)
_RESTRICTED: dict = {}


def _memo(key, sources, make):
    """The last eight results of `make()` by `key` (a benchmark calls `generate` per prompt, and
    gathering a reduced LM head costs ~0.4 s for the default draft, more for the target)."""
    if key not in _RESTRICTED:
        while len(_RESTRICTED) >= 8:
            _RESTRICTED.pop(next(iter(_RESTRICTED)))
        _RESTRICTED[key] = (sources, make())
    return _RESTRICTED[key][1]


def forget_derived_params() -> None:
    """Drop the reduced LM heads, reduced exits, int8 drafts and SS stream paths `generate` remembers
    (`_memo`): they hold on to arrays of the models they came from (a tied embedding, the target's LM
    head), so call this after dropping your own references when the memory is needed back."""
    _RESTRICTED.clear()


def _quant_setting(setting, pl: Placement) -> str:
    """The checked `draft_quant` mode ("none" or "int8"). None: the device default for a draft on one
    device; a draft sharded over a group stays in its own dtype."""
    if setting is None:
        setting = _device_defaults(pl)["draft_quant"] if len(pl.draft_group) == 1 else "none"
    try:
        mode = check_mode(setting)
    except QuantError as e:
        raise ConfigError(f"{e} (None takes the device default)") from e
    if mode != "none" and len(pl.draft_group) > 1:
        raise ConfigError(f"draft_quant={mode!r} needs the draft on one device, not a group (give draft_quant='none')")
    return mode


def _quantized(p_d, mode: str):
    """`quantize_params`, remembered (`_memo`): ~3.6 s for the default draft on this CPU."""
    return _memo(("quant", mode, id(p_d.lm_head), id(p_d.layers[0].w_qkv)), (p_d.lm_head, p_d.layers[0].w_qkv),
                 lambda: quantize_params(p_d, mode))


def _ss_prepared(cfg_d, sscfg, p_d, p_run, ssp, quant: str, pl: Placement):
    """The SS draft's stream path on the draft's device: the adapter's LoRA merged into the float
    weights, the streams' head rows cut, both in `quant` (`ss_draft(...).quantized`). Remembered
    (`_memo`) by (draft weights, adapter, quantization, device): ~1 s for the default pair on this CPU,
    which every `generate` call paid before, at its start."""
    def make():
        p_merge = p_run if quant == "none" else pl.place_draft(cfg_d, p_d)[1]
        return ss_draft(cfg_d, sscfg, p_merge, pl.params_to_draft(ssp)).quantized(quant)

    # Everything the result reads: the adapter's arrays, the draft's top N_s layers and LM head (the
    # keyed arrays are kept alive with the result, so their ids stay unique), configs, mode, device.
    sources = (jax.tree_util.tree_leaves(ssp), jax.tree_util.tree_leaves(p_d.layers[sscfg.first_msa_layer(cfg_d):]),
               p_d.lm_head, p_d.head_ids)
    key = ("ss", tuple(map(id, jax.tree_util.tree_leaves(sources))), cfg_d, sscfg, quant,
           tuple(map(str, pl.draft_group)))
    return _memo(key, sources, make)


def _restricted(p_d, cfg_d, ids):
    """`restrict_head`, remembered (`_memo`)."""
    return _memo(("draft", id(p_d.lm_head), id(p_d.embed), ids.tobytes()), (p_d.lm_head, p_d.embed),
                 lambda: restrict_head(p_d, cfg_d, ids))


def _restricted_exit(head, cfg_t, p_t, ids, layer: int):
    """`restrict_exit`, remembered (`_memo`)."""
    return _memo(("exit", id(p_t.lm_head), id(head), layer, ids.tobytes()), (p_t.lm_head, head),
                 lambda: restrict_exit(head, cfg_t, p_t, ids, layer))


def _device_defaults(pl: Placement, device=None) -> dict:
    """`DEVICE_DEFAULTS` for the kind of `device` (default: the draft's; unknown kinds: the
    accelerator defaults)."""
    return DEVICE_DEFAULTS.get((device or pl.draft).platform, DEVICE_DEFAULTS["gpu"])


def _vocab_size(drf: DraftModel) -> int:
    """Tokens the draft's LM head covers."""
    return drf.cfg.vocab_size if drf.params.head_ids is None else int(drf.params.head_ids.shape[0])


def _quant_kind(drf: DraftModel) -> str:
    """How the draft's matrices run: "int8" or "none"."""
    return "int8" if params_quantized(drf.params) else "none"


def _exit_kind(tgt: TargetModel, s: SpecSettings) -> str | None:
    if not s.rollouts:  # sd, or mirror without rollouts: no early exit runs
        return None
    return "trained" if tgt.exit_head is not None and tgt.exit_head.trained else "untrained"


def _exit_vocab_size(tgt: TargetModel, s: SpecSettings) -> int | None:
    """Tokens the early exit's LM head covers (None: no early exit runs)."""
    if not s.rollouts:
        return None
    head = tgt.exit_head
    return tgt.cfg.vocab_size if head is None or head.vocab_ids is None else int(head.vocab_ids.shape[0])
