"""Omega_kappa(l_e): how often the target's greedy token lies in the early-exit top-kappa, by exit
layer and kappa, on the default target (spec section 2 step 2: the target's own final norm + LM
head on the layer-l_e hidden state) and, at the layers they were trained for, the trained exit
heads (`mirror_jax.exit`, committed under checkpoints/exit_default_target). SpecBench prompts are
held out from the heads' training data (the stdlib), so this is a held-out measure for them.

The fallback rate of Mirror-SD is bounded by 1 - Omega_kappa (spec section 2), so this decides
where an untrained early exit can work. One forward per sequence over prompt + the target's own
greedy continuation; every layer's hidden state goes through the head.

    python experiments/omega_by_exit.py --prompts-per-task 2 --max-new-tokens 64

Writes experiments/results/omega_by_exit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KAPPAS = (1, 2, 4, 8, 16, 32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts-per-task", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--exit-heads", default="default",
                    help="trained exit heads to compare: 'default' (the committed ones), a checkpoint directory, "
                         "or 'none'")
    ap.add_argument("--compare", default=None,
                    help="a second exit-head checkpoint directory, reported as compare_<kappa> at its layers")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--name", default="omega_by_exit", help="results file stem under --out")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from mirror_jax import model as M
    from mirror_jax.bench.questions import load_questions
    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results
    from mirror_jax.engine.autoregressive import generate_ar
    from mirror_jax.exit.head import exit_logits
    from mirror_jax.kv_cache import init_cache
    from mirror_jax.loading import default_pair
    from mirror_jax.tokenizer import apply_chat_template

    info = machine_info()
    target, draft, tok = default_pair(jnp.float32, exit_heads=args.exit_heads == "default")
    del draft
    if args.exit_heads not in ("default", "none"):
        from mirror_jax.exit.checkpoint import restore_exit_heads

        heads = restore_exit_heads(args.exit_heads, target.cfg, target.params)
    else:
        heads = target.exit_heads if args.exit_heads == "default" else None
    head_list = tuple(heads.heads[layer] for layer in heads.layers) if heads is not None else ()
    n_main = len(head_list)  # heads after these are --compare's
    if args.compare:
        from mirror_jax.exit.checkpoint import restore_exit_heads

        other = restore_exit_heads(args.compare, target.cfg, target.params)
        head_list += tuple(other.heads[layer] for layer in other.layers)
    cfg = target.cfg
    params = target.params
    qs = load_questions(limit_per_category=args.prompts_per_task)

    def layer_ranks(params, head_list, tokens, n_prompt):
        """[L, G] rank of the final greedy token in each layer's early-exit distribution, at the G
        positions that predict generated tokens (only those go through the head: memory)."""
        n = tokens.shape[1]
        cache = init_cache(cfg, 1, n)
        pos = M.token_positions(cache, n)
        x = M.embed(params, tokens)
        mask = M.causal_cache_mask(pos, n)
        hidden = []
        for lp, kb, vb in zip(params.layers, cache.k, cache.v, strict=True):
            x, _, _ = M.layer_forward(cfg, lp, x, kb, vb, pos, mask)
            hidden.append(x[0, n_prompt - 1 : n - 1])  # [G, H]
        final = jnp.argmax(M.head(cfg, params, hidden[-1]), axis=-1)  # [G]
        def rank(logits):
            return jnp.sum(logits > jnp.take_along_axis(logits, final[:, None], axis=-1), axis=-1)

        ranks = jnp.stack([rank(M.head(cfg, params, h)) for h in hidden])
        trained = [rank(exit_logits(cfg, params, hd, hidden[hd.layer - 1])) for hd in head_list]
        return ranks, (jnp.stack(trained) if trained else None)

    layer_ranks = jax.jit(layer_ranks, static_argnums=3)  # params as an argument, not a 6 GB constant

    all_ranks, trained_ranks = [], []
    for q in tqdm(qs, desc="sequences"):
        ids = apply_chat_template(tok, [{"role": "user", "content": q["turns"][0]}], target.chat_template)
        gen = generate_ar(cfg, params, [ids], args.max_new_tokens).tokens[0]
        seq = ids + gen
        r0, r1 = layer_ranks(params, head_list, jnp.asarray([seq]), len(ids))
        all_ranks.append(np.asarray(r0))
        trained_ranks.append(None if r1 is None else np.asarray(r1))
    ranks = np.concatenate(all_ranks, axis=1)  # [L, positions]
    omega = {k: (ranks < k).mean(axis=1) for k in KAPPAS}  # per layer (1-based index l = i + 1)
    rows = []
    for i in range(cfg.num_layers):
        rows.append({"exit_layer": i + 1, **{f"omega_{k}": float(omega[k][i]) for k in KAPPAS}})
    if head_list:
        tr = np.concatenate(trained_ranks, axis=1)  # [heads, positions]
        for j, hd in enumerate(head_list):
            col = "trained" if j < n_main else "compare"
            rows[hd.layer - 1].update({f"{col}_{k}": float((tr[j] < k).mean()) for k in KAPPAS})

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, k in enumerate(KAPPAS):
        ax.plot(range(1, cfg.num_layers + 1), omega[k], marker=".", color=f"C{i}", label=f"kappa={k}")
        if n_main:
            xs = [hd.layer for hd in head_list[:n_main]]
            ax.plot(xs, [rows[x - 1][f"trained_{k}"] for x in xs], marker="*", ls="--", color=f"C{i}",
                    label=f"trained exit, kappa={k}")
        if len(head_list) > n_main:
            xs = [hd.layer for hd in head_list[n_main:]]
            ax.plot(xs, [rows[x - 1][f"compare_{k}"] for x in xs], marker="x", ls=":", color=f"C{i}",
                    label=f"--compare exit, kappa={k}")
    ax.axvline(cfg.num_layers // 2, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("early-exit layer l_e")
    ax.set_ylabel("Omega_kappa (target token in early-exit top-kappa)")
    ax.set_title(f"{target.name}: early exit (untrained; trained dashed), {ranks.shape[1]} positions", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, f"{args.name}.png"), dpi=120)

    cols = ["exit_layer"] + [f"omega_{k}" for k in KAPPAS] + ([f"trained_{k}" for k in KAPPAS] if n_main else [])
    cols += [f"compare_{k}" for k in KAPPAS] if len(head_list) > n_main else []
    md = (f"# Omega_kappa by early-exit layer ({target.name}, {len(qs)} SpecBench prompts, "
          f"{ranks.shape[1]} generated positions)\n\n" + machine_md(info)
          + f"\nCommand: `python experiments/omega_by_exit.py {' '.join(argv or sys.argv[1:])}`\n\n"
          + markdown_table(rows, cols, {c: "{:.3f}" for c in cols[1:]}) + f"\n![]({args.name}.png)\n")
    write_results(args.out, args.name, {"machine": info, "args": vars(args), "rows": rows,
                                              "positions": int(ranks.shape[1])}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
