"""Train early-exit heads (`mirror_jax.exit`) for the default target on Python-stdlib chat data,
measure Omega_kappa on the held-out split, and save them with orbax under ``checkpoints/``.

Steps (each resumable: features are cached in --work; rerunning skips what is there):

1. Data: stdlib functions/classes/docstrings as chat exchanges in the target's template
   (`mirror_jax.corpus`, files split 7:1 by path hash; SpecBench is never used). With
   `--prose-frac F`, a share F of the training rows are instead the target's own greedy answers to
   prose requests built from the same files (`mirror_jax.corpus.prose_requests`: explain,
   summarise, translate, questions, arithmetic word problems), generated here and cached in --work;
   the held-out figures are then reported on both kinds of held-out text.
2. Features: one full target forward per row gives the hidden state after every candidate exit
   layer and the target's final top-32 log-probs (`exit_features`).
3. Train one `ExitHead` per layer with optax (soft cross-entropy against the target's top-32).
4. Held-out Omega_kappa per layer, untrained vs trained (full-vocabulary ranks); save the heads.

    python experiments/train_exit.py --train-tokens 16384 --heldout-tokens 2048 --steps 300 --save-layers 14 20
    python experiments/train_exit.py --train-tokens 32768 --prose-frac 0.5 --layers 14 20 24 \
        --compare checkpoints/exit_default_target --checkpoint /tmp/exit_prose

Writes --checkpoint (default checkpoints/exit_default_target/), experiments/results/<name>.{json,md,png}
and experiments/results/<name>_log.jsonl (--name, default exit_train). `--tiny` runs everything on random
tiny models (smoke).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KAPPAS = (1, 2, 4, 8, 16)
DEFAULT_LAYERS = (8, 10, 12, 14, 16, 18, 20, 22, 24)


def save_feats(path: Path, hidden, top_lp, top_ids) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, hidden=np.asarray(hidden).view(np.uint16), top_lp=np.asarray(top_lp), top_ids=np.asarray(top_ids))
    os.replace(tmp, path)


def load_feats(paths):
    import ml_dtypes

    hs, lps, ids = [], [], []
    for p in paths:
        d = np.load(p)
        hs.append(d["hidden"].view(ml_dtypes.bfloat16))
        lps.append(d["top_lp"])
        ids.append(d["top_ids"])
    return np.concatenate(hs, axis=1), np.concatenate(lps), np.concatenate(ids)


def extract(target, rows: np.ndarray, layers, work: Path, tag: str, batch: int, skip: int):
    """Features of `rows` in chunks of `batch` rows, cached as work/<tag>_<i>.npz. The first `skip`
    positions of every row (little context) are dropped."""
    import jax.numpy as jnp
    from tqdm import tqdm

    from mirror_jax.exit.train import exit_features

    paths = []
    for i in tqdm(range(0, len(rows), batch), desc=f"features ({tag})"):
        p = work / f"{tag}_{i:05d}.npz"
        paths.append(p)
        if p.exists():
            continue
        chunk = rows[i : i + batch]
        f = exit_features(target.cfg, target.params, chunk, layers=tuple(layers))
        b, t = chunk.shape
        keep = (np.arange(b * t) % t) >= skip
        hid = np.asarray(f.hidden.astype(jnp.bfloat16))[:, keep]
        save_feats(p, hid, np.asarray(f.top_lp)[keep], np.asarray(f.top_ids)[keep])
    return paths


def prose_rows(target, tok, split: str, num_tokens: int, seq_len: int, work: Path, *, new_tokens: int,
               batch: int, max_prompt: int, seed: int = 0) -> np.ndarray:
    """[N, seq_len] rows (N = num_tokens // seq_len) cut from one token stream of exchanges: a prose
    request (`prose_requests(split)`, at most `max_prompt` tokens in the target's chat template)
    followed by the target's own greedy answer of up to `new_tokens` tokens, generated `batch` at a
    time. After each batch every exchange so far is written to work/prose_<split>_s<seed>_n<new_tokens>.jsonl
    (the whole file, replaced atomically), so an interrupted run resumes after its last batch and a
    rerun reuses them; the rows depend only on the requests and the target's greedy answers."""
    from tqdm import tqdm

    from mirror_jax.corpus import prose_requests
    from mirror_jax.engine.autoregressive import generate_ar
    from mirror_jax.tokenizer import apply_chat_template

    n_rows = max(1, num_tokens // seq_len)
    path = work / f"prose_{split}_s{seed}_n{new_tokens}.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    have = sum(len(d["ids"]) for d in done)
    need = n_rows * seq_len
    requests = prose_requests(split, seed)
    count = done[-1]["request"] + 1 if done else 0  # requests consumed so far (answered or too long)
    for _ in range(count):
        next(requests)  # the requests already answered (their order is seeded)
    bar = tqdm(total=need, initial=min(have, need), desc=f"target answers ({split})")
    while have < need:
        todo = []
        for req in requests:
            ids = apply_chat_template(tok, [{"role": "user", "content": req}], target.chat_template)
            count += 1
            if len(ids) <= max_prompt:
                todo.append((count - 1, ids))
            if len(todo) == batch:
                break
        if not todo:
            raise ValueError(f"the {split} split ran out of prose requests at {have} of {need} tokens")
        gen = generate_ar(target.cfg, target.params, [ids for _, ids in todo], new_tokens).tokens
        for (i, ids), g in zip(todo, gen, strict=True):
            done.append({"request": i, "ids": list(ids) + [int(t) for t in g], "prompt_len": len(ids)})
            have += len(done[-1]["ids"])
            bar.update(len(done[-1]["ids"]))
        tmp = path.with_suffix(".tmp")  # whole file each batch: never a half-written line
        tmp.write_text("".join(json.dumps(d) + "\n" for d in done))
        os.replace(tmp, path)
    bar.close()
    stream = [t for d in done for t in d["ids"]]
    return np.asarray(stream[:need], np.int32).reshape(n_rows, seq_len)


def phase_times(target, draft, gamma: int, budget: int, reps: int = 5) -> dict:
    """Median seconds of the target's verification forward (gamma + 1 tokens) and of a draft
    window (gamma steps over budget + 1 rows: the path and the branches), at a 256-token context."""
    import jax
    import jax.numpy as jnp

    from mirror_jax import model as M
    from mirror_jax.bench.report import median_ms
    from mirror_jax.kv_cache import init_cache

    def timed(fn, *a):
        return median_ms(fn, *a, repeats=reps) / 1e3

    def fwd(cfg):
        return jax.jit(lambda p, t, c: M.forward(cfg, p, t, c)[0])

    ct = init_cache(target.cfg, 1, 512, target.params.embed.dtype).replace(lengths=jnp.array([256], jnp.int32))
    cd = init_cache(draft.cfg, budget + 1, 512, draft.params.embed.dtype).replace(
        lengths=jnp.full((budget + 1,), 256, jnp.int32))
    t_target = timed(fwd(target.cfg), target.params, jnp.zeros((1, gamma + 1), jnp.int32), ct)
    t_step = timed(fwd(draft.cfg), draft.params, jnp.zeros((budget + 1, 1), jnp.int32), cd)
    return {"target_verify_s": t_target, "draft_step_s": t_step, "draft_window_s": gamma * t_step,
            "gamma": gamma, "branch_budget": budget}


def predicted_round(t: dict, layer: int, num_layers: int, omega: float) -> float:
    """Two-device Mirror-SD round time at exit `layer` (spec section 4 latency model, channel ~0):
    T_target + max(0, T_draft - T_suffix(layer)) + (1 - Omega) * T_draft, with the suffix's share of
    the target forward taken as (N - layer) / N and a miss costing one more draft window (fallback)."""
    suffix = t["target_verify_s"] * (num_layers - layer) / num_layers
    return t["target_verify_s"] + max(0.0, t["draft_window_s"] - suffix) + (1.0 - omega) * t["draft_window_s"]


def train_and_report(args, info, target, draft, paths, data_hash, argv) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mirror_jax.bench.report import machine_md, markdown_table, write_results
    from mirror_jax.exit.checkpoint import save_exit_heads
    from mirror_jax.exit.train import active_vocab, omega_ranks, train_exit_head

    cfg, params = target.cfg, target.params
    h_tr, lp_tr, ids_tr = load_feats(paths["train"])
    heldout = {kind: load_feats(paths[split]) for kind, split in (("", "heldout"), ("prose_", "heldout_prose"))
               if split in paths}  # column prefix -> (hidden, top_lp, top_ids) of that held-out text
    h_ho = heldout[""][0]
    previous = None
    if args.compare:
        from mirror_jax.exit.checkpoint import restore_exit_heads

        previous = restore_exit_heads(args.compare, cfg, params)
    extracted = sorted(args.layers)
    layers = sorted(args.train_layers or extracted)
    vocab = active_vocab(ids_tr)
    print(f"train positions {h_tr.shape[1]}, held-out {h_ho.shape[1]}, active vocabulary {vocab.size}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{args.name}_log.jsonl"
    log_f = open(log_path, "w")

    def log(rec):
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    # Phase times first, on an idle machine (nothing else of this script runs yet).
    times = phase_times(target, draft, gamma=4, budget=2) if draft is not None else None
    print(f"phase times: {times}", flush=True)
    rows, heads = [], {}
    t_train = time.perf_counter()
    for layer in layers:
        li = extracted.index(layer)
        head = train_exit_head(cfg, params, h_tr[li], lp_tr, ids_tr, vocab, layer=layer, steps=args.steps,
                               batch=args.batch, lr=args.lr, log=log)
        heads[layer] = head
        row = {"exit_layer": layer}
        old = previous.heads.get(layer) if previous is not None else None
        for pre, (h, _, ids) in heldout.items():  # Omega_k on each kind of held-out text
            for name, hd in (("untrained", None), ("trained", head), ("previous", old)):
                if name == "previous" and hd is None:
                    continue
                ranks = omega_ranks(cfg, params, hd, h[li], ids[:, 0])
                row.update({f"{pre}{name}_{k}": float(np.mean(ranks < k)) for k in KAPPAS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    log_f.close()
    train_s = time.perf_counter() - t_train

    if times is not None:
        for row in rows:
            row["predicted_round_s"] = predicted_round(times, row["exit_layer"], cfg.num_layers, row["trained_4"])
            row["predicted_round_untrained_s"] = predicted_round(times, row["exit_layer"], cfg.num_layers,
                                                                 row["untrained_4"])
        chosen = min(rows, key=lambda r: r["predicted_round_s"])["exit_layer"]
    else:
        chosen = max(rows, key=lambda r: r["trained_4"])["exit_layer"]
    default_layer = args.default_layer or chosen
    save_layers = sorted(set(args.save_layers or layers) | {default_layer})
    command = "python experiments/train_exit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    source = (f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib chat exchanges "
              "(mirror_jax.corpus, train split of files)")
    if args.prose_frac:
        source += (f"; {args.prose_frac:.0%} of rows: the target's greedy answers (<= {args.prose_new_tokens} tokens) "
                   "to mirror_jax.corpus.prose_requests (explain, summarise, translate, questions, word problems)")
    extra = {"data": {"source": source, "sha256": data_hash,
                      "train_positions": int(h_tr.shape[1]), "heldout_positions": int(h_ho.shape[1]),
                      "heldout_prose_positions": int(heldout["prose_"][0].shape[1]) if "prose_" in heldout else 0,
                      "seq_len": args.seq_len},
             "steps": args.steps, "batch": args.batch, "lr": args.lr, "command": command,
             "heldout": [r for r in rows if r["exit_layer"] in save_layers], "chosen_by_latency_model": chosen,
             "phase_times": times, "machine": info.get("cpu", ""), "train_s": train_s}
    if not args.tiny:
        d = save_exit_heads(args.checkpoint, cfg, params, [heads[layer] for layer in save_layers],
                            default_layer=default_layer, extra=extra)
        print(f"saved {save_layers} to {d}", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, style in ((1, ":"), (4, "-"), (8, "--")):
        axes[0].plot(layers, [r[f"untrained_{k}"] for r in rows], style, color="gray", label=f"untrained k={k}")
        axes[0].plot(layers, [r[f"trained_{k}"] for r in rows], style, color="C0", marker=".", label=f"trained k={k}")
    if "prose_trained_4" in rows[0]:
        axes[0].plot(layers, [r["prose_trained_4"] for r in rows], "-", color="C2", marker="x",
                     label="trained k=4, prose")
    axes[0].axvline(default_layer, color="C3", lw=0.8)
    axes[0].set_xlabel("exit layer l_e")
    axes[0].set_ylabel("held-out Omega_kappa")
    axes[0].legend(fontsize=7)
    axes[0].set_title("target token in the exit's top-kappa (held-out stdlib)")
    if times is not None:
        axes[1].plot(layers, [r["predicted_round_s"] for r in rows], marker=".", label="trained exit")
        axes[1].plot(layers, [r["predicted_round_untrained_s"] for r in rows], color="gray", label="untrained exit")
        axes[1].axvline(default_layer, color="C3", lw=0.8)
        axes[1].set_xlabel("exit layer l_e")
        axes[1].set_ylabel("predicted two-device round (s)")
        axes[1].legend(fontsize=7)
        axes[1].set_title("latency model: hide the draft vs hit rate")
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)
    kinds = [w for w in ("untrained", "previous", "trained") if f"{w}_4" in rows[0]]
    cols = ["exit_layer"] + [f"{pre}{w}_{k}" for pre in heldout for k in (1, 4, 8) for w in kinds]
    cols += ["predicted_round_s"] if times is not None else []
    md = (f"# Trained early-exit heads ({target.name})\n\n" + machine_md(info)
          + f"\nCommand: `{command}`\n\nHeld-out Omega_kappa (stdlib held-out files, {h_ho.shape[1]} positions"
          + (f"; `prose_` columns: the target's answers to prose requests from held-out files, "
             f"{heldout['prose_'][0].shape[1]} positions" if "prose_" in heldout else "")
          + (f"; `previous`: the heads in {args.compare}" if previous is not None else "") + "; "
          + f"trained on {h_tr.shape[1]} positions, {args.steps} steps of {args.batch}, "
          f"{train_s:.0f} s for all layers). Default exit layer: {default_layer} "
          f"(latency model's choice: {chosen}; phase times {times}).\n\n"
          + markdown_table(rows, cols, {c: "{:.3f}" for c in cols[1:]}) + f"\n![]({args.name}.png)\n")
    write_results(str(out), args.name, {"machine": info, "args": vars(args), "rows": rows, "extra": extra}, md)
    print(md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tokens", type=int, default=16384)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip", type=int, default=16, help="positions dropped at the start of every row")
    ap.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    ap.add_argument("--train-layers", type=int, nargs="+", default=None,
                    help="train heads for these of --layers only (features are extracted for all of --layers)")
    ap.add_argument("--save-layers", type=int, nargs="+", default=None,
                    help="layers whose heads go into the checkpoint (default: all trained)")
    ap.add_argument("--default-layer", type=int, default=None, help="recorded as the checkpoint's default exit layer")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--features-only", action="store_true")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "mirror_jax" / "exit_features"))
    ap.add_argument("--checkpoint", default=str(HERE.parent / "checkpoints" / "exit_default_target"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="exit_train", help="results file stem under --out")
    ap.add_argument("--prose-frac", type=float, default=0.0,
                    help="share of training rows that are the target's own answers to prose requests")
    ap.add_argument("--prose-new-tokens", type=int, default=192)
    ap.add_argument("--prose-batch", type=int, default=8)
    ap.add_argument("--prose-max-prompt", type=int, default=320)
    ap.add_argument("--compare", default=None, help="an exit-head checkpoint to report on the same held-out text")
    ap.add_argument("--tiny", action="store_true", help="smoke run on random tiny models")
    args = ap.parse_args(argv)
    if not 0.0 <= args.prose_frac < 1.0:
        ap.error(f"--prose-frac must be in [0, 1), got {args.prose_frac}")

    import jax.numpy as jnp

    from mirror_jax.bench.report import machine_info
    from mirror_jax.corpus import pack_sequences

    info = machine_info()
    work = Path(args.work)
    if args.tiny:  # random tiny models and random token rows: exercises every step in seconds
        import types

        from mirror_jax.testing import noisy_pair

        (cfg_t, p_t), (cfg_d, p_d) = noisy_pair(layers=4)
        target = types.SimpleNamespace(cfg=cfg_t, params=p_t, name="tiny random")
        draft = types.SimpleNamespace(cfg=cfg_d, params=p_d)
        args.layers, args.train_layers = [1, 2, 3], [1, 3]
        args.steps, args.seq_len, work = 5, 32, work / "tiny"
        rng = np.random.default_rng(0)
        sizes = (("train", 8), ("heldout", 2)) + ((("heldout_prose", 2),) if args.prose_frac else ())
        data = {s: rng.integers(0, cfg_t.vocab_size, (n, args.seq_len)).astype(np.int32) for s, n in sizes}
    else:
        from mirror_jax.loading import default_pair

        target, draft, tok = default_pair(jnp.float32)
        work.mkdir(parents=True, exist_ok=True)
        n_prose = int(round(args.train_tokens // args.seq_len * args.prose_frac)) * args.seq_len
        data = {}
        for split, n in (("train", args.train_tokens - n_prose), ("heldout", args.heldout_tokens)):
            data[split] = pack_sequences(tok, target.chat_template, split, n, args.seq_len)
        if n_prose:
            pk = dict(new_tokens=args.prose_new_tokens, batch=args.prose_batch, max_prompt=args.prose_max_prompt)
            prose = prose_rows(target, tok, "train", n_prose, args.seq_len, work, **pk)
            order = np.random.default_rng(0).permutation(len(data["train"]) + len(prose))
            data["train"] = np.concatenate([data["train"], prose])[order]
            data["heldout_prose"] = prose_rows(target, tok, "heldout", args.heldout_tokens, args.seq_len, work, **pk)
        for split, rows in data.items():
            print(f"{split}: {rows.shape[0]} rows x {rows.shape[1]} tokens", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    data_hash = hashlib.sha256(b"".join(data[s].tobytes() for s in sorted(data))).hexdigest()
    tag = f"{data_hash[:12]}_L{'-'.join(map(str, sorted(args.layers)))}"
    paths = {s: extract(target, data[s], sorted(args.layers), work, f"{tag}_{s}", 2, args.skip) for s in data}
    if args.features_only:
        return 0
    return train_and_report(args, info, target, draft, paths, data_hash, argv)


if __name__ == "__main__":
    sys.exit(main())
