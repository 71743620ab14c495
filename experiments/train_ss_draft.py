"""Train a speculative-streaming adapter for the draft on Python-stdlib text.

Two recipes (``--data``):

* ``text`` (default): teacher forcing, no generation. Rows of ``--seq-len`` tokens are cut from
  stdlib code and docstrings rendered as chat exchanges in the draft's template
  (`mirror_jax.corpus.pack_sequences`, train split of files; held-out split for evaluation). One
  frozen draft forward per row gives every label (``--labels self``, `mirror_jax.ss.train.self_labels`):
  stream j at t learns the draft's own greedy token at t+1+j, exactly where the draft's greedy
  continuation follows the text (the lossless SS draft emits the draft's tokens, not the text's).
  ``--max-rows`` evaluates the LM head only on stream rows that carry a label. ``--raw-frac F`` cuts
  that share of the rows from the files' raw source instead (code-completion text, no template).
* ``self``: the draft's own rollouts. Prompts are the first ``--prompt-len`` tokens of rows cut as
  for ``text`` (chat exchanges, ``--raw-frac`` of them raw source); the DRAFT greedily continues each
  by ``--gen-len`` tokens, and the streams learn from that continuation with ``--labels self`` (every
  continuation position carries an exact label, since the text is the draft's greedy output). This is
  the distribution the streams see when decoding: the text-trained adapter `ss_default_draft` hits
  0.45 / 0.30 (stream 1 / 2) of its labels on held-out text but 0.35 / 0.19 on the draft's own
  continuations of held-out prompts (`experiments/bench_ss.py`), and decoding runs on the latter.
  The continuations come from the float32 draft; decoding on CPU uses the int8 draft, whose greedy
  tokens differ from them in a few places. Held-out
  rows: ``--eval-frac`` as many prompts from the held-out files.
* ``distill``: the original recipe, kept for comparison:

1. Prompts: for every function with a docstring in the Python standard library
   (`mirror_jax.corpus.stdlib_files`: no test packages, no installed site-packages), the source up to the end of the
   docstring, left-truncated to exactly ``--prompt-len`` tokens. Files are split train/held-out by
   a hash of their path (`split_of`); ``experiments/bench_ss.py`` uses the held-out files.
2. Distillation: the TARGET model greedily continues each prompt by ``--gen-len`` tokens
   (`mirror_jax.engine.autoregressive.generate_ar`). Cached as an .npz under ``--work-dir``; the target is then
   freed before training.
3. Frozen main-stream features of the draft (hidden state at L0 = N - N_s and the MSA layers' K/V)
   are computed once for the whole data set (`precompute_main`).
4. Training: AdamW, linear warm-up then linear/cosine decay; loss on the continuation tokens only.
   Logs JSONL + a PNG loss curve to ``--results-dir``; the full train state is saved to
   ``--work-dir`` every ``--ckpt-every`` steps (atomic) and a re-run resumes from it.
5. The adapter goes to ``checkpoints/<name>/`` (orbax + metadata.json).

In both, frozen main-stream features are computed once, training is AdamW (resumable, time-budgeted)
and the adapter goes to ``checkpoints/<name>/`` (orbax + metadata.json: data hash, steps, command,
held-out figures).

Usage::

    python experiments/train_ss_draft.py --name tiny --tiny --steps 30 --ckpt-root /tmp/ss   # smoke test
    python experiments/train_ss_draft.py --name my_text --num-tokens 65536 --steps 300 --time-budget-min 25
    python experiments/train_ss_draft.py --name my_distill --data distill --labels text --num-prompts 320
    python experiments/train_ss_draft.py --name my_ft --init-from checkpoints/ss_default_draft --raw-frac 0.5
    python experiments/train_ss_draft.py --name my_self --data self --init-from checkpoints/ss_self_draft

``--name`` is required: it names the checkpoint directory (an existing one is replaced), so a run
never overwrites a committed adapter by default.
"""

from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax.corpus import stdlib_files  # noqa: E402
from mirror_jax.ss.checkpoint import base_fingerprint, save_ss_checkpoint  # noqa: E402
from mirror_jax.ss.model import SSConfig, init_ss_params  # noqa: E402
from mirror_jax.ss.train import (  # noqa: E402
    init_train_state,
    make_eval_loss,
    make_optimizer,
    make_train_step,
    precompute_main,
)
from mirror_jax.ss.window import tokens_per_forward  # noqa: E402


def stdlib_prompt_texts(split: str, limit: int, seed: int = 0) -> list[tuple[str, str]]:
    """[(source id, text)] : source up to the end of a function docstring, from the stdlib files of
    `split`. Deterministic for a given seed."""
    out = []
    for rel, f in stdlib_files(split):  # the stdlib proper: installed site-/dist-packages excluded
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node):
                doc = node.body[0]
                text = "".join(lines[: doc.end_lineno])
                out.append((f"{rel}:{node.name}", text))
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(out))[:limit]
    return [out[i] for i in sorted(idx)]


def make_prompts(tokenizer, split: str, n: int, prompt_len: int, seed: int = 0):
    texts = stdlib_prompt_texts(split, n * 2, seed)
    prompts, ids = [], []
    for sid, text in texts:
        toks = tokenizer.encode(text[-8 * prompt_len :])
        if len(toks) >= prompt_len:
            prompts.append(list(toks[-prompt_len:]))
            ids.append(sid)
        if len(prompts) == n:
            break
    return prompts, ids


def distill(target, prompts, gen_len: int, batch: int, partial: Path, budget_s: float = 0.0,
            desc: str = "distill (target)"):
    """Greedy target continuations -> tokens [N, P+G] and continuation mask [N, P+G] (0 after EOS).

    Saved to `partial` after every batch (resumable); with `budget_s` > 0 generation stops after that
    many seconds and only the finished rows are returned."""
    from mirror_jax.engine.autoregressive import generate_ar

    p = len(prompts[0])
    toks = np.zeros((len(prompts), p + gen_len), np.int32)
    mask = np.zeros_like(toks, dtype=np.float32)
    done = 0
    if partial.exists():
        d = np.load(partial)
        done = int(d["done"])
        toks[:done], mask[:done] = d["tokens"][:done], d["mask"][:done]
    t0 = time.time()
    for i in tqdm(
        range(done, len(prompts), batch),
        desc=desc,
        initial=done // batch,
        total=-(-len(prompts) // batch),
    ):
        if budget_s and time.time() - t0 > budget_s:
            break
        chunk = prompts[i : i + batch]
        res = generate_ar(target.cfg, target.params, chunk, gen_len)
        for j, (pr, cont) in enumerate(zip(chunk, res.tokens, strict=True)):
            pad = [cont[-1] if cont else 0] * (gen_len - len(cont))
            toks[i + j] = np.asarray(pr + list(cont) + pad, np.int32)
            mask[i + j, p : p + len(cont)] = 1.0
        done = i + len(chunk)
        tmp = partial.with_name(partial.stem + ".tmp.npz")
        np.savez(tmp, tokens=toks[:done], mask=mask[:done], done=done)
        os.replace(tmp, partial)
    return toks[:done], mask[:done]


def self_rollouts(args, data_path: Path, part_path: Path):
    """--data self: (the draft, description); writes `data_path` (tokens [N, P+G], mask [N, P+G] over
    the stream positions t that carry a label: the root P-1 and the continuation, ids "train:i" /
    "heldout:i", held-out first) from the draft's greedy continuations of rows cut as for --data text."""
    if args.tiny:
        _, draft = tiny_models()
    else:
        from mirror_jax.loading.default_pair import DRAFT_SPEC, assemble_default_files
        from mirror_jax.loading.gguf_loader import load_gguf

        _, draft_path = assemble_default_files()
        draft = load_gguf(draft_path, jnp.float32, sha256=DRAFT_SPEC.sha256, progress=False)
    p, n_eval = args.prompt_len, max(1, int(round(args.num_prompts * args.eval_frac)))
    if not data_path.exists():
        prompts, ids = [], []
        for split, n in (("heldout", n_eval), ("train", args.num_prompts)):  # a budgeted run keeps held-out rows
            if args.tiny:
                rng = np.random.default_rng((args.seed, len(split)))
                rows = rng.integers(2, draft.cfg.vocab_size, (n, p)).astype(np.int32)
            else:
                from mirror_jax.corpus import pack_sequences

                rows = pack_sequences(draft.tokenizer, draft.chat_template, split, n * p, p, args.seed,
                                      raw_frac=args.raw_frac)
            prompts += rows.tolist()
            ids += [f"{split}:{i}" for i in range(len(rows))]
        toks, mask = distill(draft, prompts, args.gen_len, args.gen_batch, part_path, 60 * args.distill_budget_min,
                             desc="self rollouts (draft)")
        mask[:, p - 1] = mask[:, p]  # the root's streams give the first lookaheads of a window
        np.savez(data_path, tokens=toks, mask=mask, ids=np.array(ids[: len(toks)]))
    raw = f", {args.raw_frac:.0%} of them raw source" if args.raw_frac else ""
    desc = ("tiny random model; random-token prompts; its own greedy continuations" if args.tiny else
            f"the draft's own greedy {args.gen_len}-token continuations of {args.prompt_len}-token prompts cut from "
            f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib chat exchanges in its template{raw} "
            f"(mirror_jax.corpus.pack_sequences; {args.num_prompts} train-split prompts, {n_eval} held-out-split "
            f"prompts); labels: {args.labels}, on the root and the continuation")
    return draft, desc


METRICS = ("loss", "nll_main", "nll_stream", "p_stream", "label_frac", "acc_stream", "tokens_per_forward_est",
           "tokens_per_forward_g4", "tokens_per_forward_g7")
WINDOW_GAMMAS = (4, 7)  # held-out evals also report the window model's tokens per forward at these gammas


def window_estimates(acc_stream) -> dict:
    """Tokens per draft forward that held-out stream hit rates imply for a window of each of
    `WINDOW_GAMMAS` (`mirror_jax.ss.window`: the root forward emits one token, so a gamma-4 window
    never beats 2.0), next to the unbounded `tokens_per_forward_est`."""
    acc = [min(max(float(a), 0.0), 1.0) for a in np.asarray(acc_stream).ravel()]
    return {f"tokens_per_forward_g{g}": tokens_per_forward(g, acc) for g in WINDOW_GAMMAS}


def text_rows(args, data_path: Path):
    """--data text: (train rows [N, seq_len], held-out rows, draft, description); rows cached."""
    if args.tiny:
        _, draft = tiny_models()
        rng = np.random.default_rng(args.seed)
        rows = rng.integers(2, draft.cfg.vocab_size, (args.num_tokens // args.seq_len, args.seq_len))
        held = rng.integers(2, draft.cfg.vocab_size, (max(1, args.heldout_tokens // args.seq_len), args.seq_len))
        return rows.astype(np.int32), held.astype(np.int32), draft, "tiny random model; random-token rows"
    from mirror_jax.corpus import pack_sequences
    from mirror_jax.loading.default_pair import DRAFT_SPEC, assemble_default_files
    from mirror_jax.loading.gguf_loader import load_gguf

    _, draft_path = assemble_default_files()
    draft = load_gguf(draft_path, jnp.float32, sha256=DRAFT_SPEC.sha256, progress=False)
    if data_path.exists():
        d = np.load(data_path)
        rows, held = d["train"], d["heldout"]
    else:
        rows = pack_sequences(draft.tokenizer, draft.chat_template, "train", args.num_tokens, args.seq_len, args.seed,
                              raw_frac=args.raw_frac)
        held = pack_sequences(draft.tokenizer, draft.chat_template, "heldout", args.heldout_tokens, args.seq_len,
                              args.seed, raw_frac=args.raw_frac)
        np.savez(data_path, train=rows, heldout=held)
    raw = (f"; {args.raw_frac:.0%} of the rows the files' raw source, no template (mirror_jax.corpus.code_texts)"
           if args.raw_frac else "")
    desc = (f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib code and docstrings as chat exchanges "
            f"in the draft's template (mirror_jax.corpus.pack_sequences){raw}, {rows.shape[0]} train rows x "
            f"{args.seq_len} tokens (train split of files), {held.shape[0]} held-out rows (held-out files); "
            f"labels: {args.labels}")
    return rows, held, draft, desc


def save_features(path: Path, feats) -> None:
    """Frozen main-stream features to an .npz (atomic), so a re-run skips the draft forwards."""
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(feats))}
    tmp = path.with_name(path.stem + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **leaves)
    os.replace(tmp, path)


def load_features(path: Path, cfg, sscfg, params):
    """The features saved by `save_features`, or None when absent."""
    if not path.exists():
        return None
    from mirror_jax.ss.train import MainFeatures

    like = jax.eval_shape(lambda: precompute_main(cfg, sscfg, params, jnp.zeros((1, 2), jnp.int32)))
    d = np.load(path)
    leaves = [d[f"leaf{i}"] for i in range(len(d.files))]
    feats = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
    assert isinstance(feats, MainFeatures)
    print(f"main-stream features from {path}", flush=True)
    return feats


def tiny_models():
    from mirror_jax.params import init_random
    from mirror_jax.testing import tiny_config

    class M:
        def __init__(self, cfg, seed):
            self.cfg, self.params, self.sha256 = cfg, init_random(cfg, seed, scale=0.2), None

    cfg = tiny_config(vocab_size=128, num_layers=4, eos_token_ids=(1,))
    return M(cfg, 1), M(cfg, 2)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def plot_curve(log_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    tr = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    for j in range(len(tr[0]["nll_stream"]) if tr else 0):
        ax[0].plot([r["step"] for r in tr], [r["nll_stream"][j] for r in tr], label=f"stream {j + 1} (train)")
        if ev:
            ax[0].plot(
                [r["step"] for r in ev],
                [r["nll_stream"][j] for r in ev],
                "o--",
                label=f"stream {j + 1} (eval)",
            )
    if tr:
        ax[0].axhline(tr[-1]["nll_main"], color="k", lw=0.8, ls=":", label="main stream (frozen)")
    ax[0].set_xlabel("step"), ax[0].set_ylabel("NLL (nats/token)"), ax[0].legend(fontsize=7)
    ax[1].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="SS loss (train)")
    if ev:
        ax[1].plot([r["step"] for r in ev], [r["loss"] for r in ev], "o--", label="SS loss (eval)")
    ax[1].set_xlabel("step"), ax[1].legend(fontsize=7)
    acc = [r for r in ev if "acc_stream" in r]
    if acc:  # held-out: how often each stream's argmax is its label, and the tokens per forward it implies
        for j in range(len(acc[0]["acc_stream"])):
            ax[2].plot([r["step"] for r in acc], [r["acc_stream"][j] for r in acc], "o-", label=f"stream {j + 1} match")
        ax2 = ax[2].twinx()
        ax2.plot([r["step"] for r in acc], [r["tokens_per_forward_est"] for r in acc], "ks--", label="tokens/forward")
        if "tokens_per_forward_g4" in acc[0]:
            ax2.plot([r["step"] for r in acc], [r["tokens_per_forward_g4"] for r in acc], "k^:",
                     label="tokens/forward, gamma-4 window")
        ax2.set_ylabel("est. tokens per SS forward"), ax2.legend(fontsize=7, loc="lower right")
        ax[2].set_xlabel("step"), ax[2].set_ylabel("held-out hard match"), ax[2].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True,
                    help="the adapter's name: checkpoints/<name>/ (replaced if it exists), the work dir, result files")
    ap.add_argument("--data", default="text", choices=["text", "self", "distill"],
                    help="text: stdlib chat rows, teacher forcing (no generation); self: the draft's own greedy "
                         "continuations of prompts cut from such rows; distill: target continuations")
    ap.add_argument("--labels", default="self", choices=["self", "text"],
                    help="self: the draft's own greedy continuation (exact where it follows the text); text: the text")
    ap.add_argument("--num-tokens", type=int, default=65536, help="--data text: training tokens")
    ap.add_argument("--heldout-tokens", type=int, default=8192, help="--data text: held-out tokens")
    ap.add_argument("--seq-len", type=int, default=128, help="--data text: tokens per row")
    ap.add_argument("--raw-frac", type=float, default=0.0,
                    help="--data text/self: share of rows cut from the files' raw source (code-completion text, "
                         "no chat template); the rest are chat exchanges")
    ap.add_argument("--init-from", default=None,
                    help="start from this saved adapter (its SS config and stream vocabulary; fine-tuning)")
    ap.add_argument("--max-rows", type=int, default=0, help="LM-head rows per step (0: all); weighted rows first")
    ap.add_argument("--tiny", action="store_true", help="random tiny models + random-token prompts (smoke test)")
    ap.add_argument("--num-prompts", type=int, default=320)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--distill-budget-min", type=float, default=0.0, help="stop distillation after this long")
    ap.add_argument("--eval-frac", type=float, default=0.1)
    ap.add_argument("--num-streams", type=int, default=2)
    ap.add_argument("--msa-layers", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--stream-vocab", type=int, default=0,
                    help="streams choose among N token ids (SSConfig.stream_vocab; 0: the whole vocabulary)")
    ap.add_argument("--stream-ranking", default="freq", choices=["freq", "id"],
                    help="which N: the most frequent in the train rows and their labels, or the first N ids")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--schedule", default="linear", choices=["linear", "cosine"])
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--time-budget-min", type=float, default=0.0, help="stop training after this long (0 = off)")
    ap.add_argument("--feat-batch", type=int, default=16, help="rows per frozen-feature forward")
    ap.add_argument("--prepare-only", action="store_true", help="build the data and frozen features, then stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "mirror_jax" / "ss_runs"))
    ap.add_argument("--results-dir", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--ckpt-root", default=str(ROOT / "checkpoints"))
    args = ap.parse_args(argv)

    sscfg = SSConfig(num_streams=args.num_streams, num_msa_layers=args.msa_layers, lora_rank=args.lora_rank,
                     stream_vocab=args.stream_vocab)
    init_meta = None  # --init-from: the saved adapter's metadata (its SS config now; its origin in ours)
    if args.init_from:  # fine-tune a saved adapter: its SS config (and, below, its weights and stream vocabulary)
        meta_path = Path(args.init_from) / "metadata.json"
        if not meta_path.exists():
            raise SystemExit(f"--init-from {args.init_from}: no SS adapter there (no metadata.json)")
        init_meta = json.loads(meta_path.read_text())
        sscfg = SSConfig(**init_meta["ss_config"])
    work = Path(args.work_dir) / args.name
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    kind = "tiny" if args.tiny else "default"
    if args.data == "self":
        tag = f"{args.name}_{kind}_self{args.num_prompts}_{args.prompt_len}_{args.gen_len}_e{args.eval_frac:g}"
    elif args.data == "text":
        tag = f"{args.name}_{kind}_text{args.num_tokens}_{args.heldout_tokens}_{args.seq_len}"
    else:
        tag = f"{args.name}_{kind}_p{args.num_prompts}_{args.prompt_len}_{args.gen_len}"
    if args.raw_frac and args.data != "distill":
        tag += f"_raw{args.raw_frac:g}"
    data_path = work / f"distill_{tag}.npz"
    part_path = work / f"distill_{tag}.partial.npz"

    # ---- models + data --------------------------------------------------------------------------------
    ev_rows = None  # --data text: held-out rows (other files); distill: a random share of the rows
    if args.data == "text":
        tokens_all, ev_rows, draft, data_desc = text_rows(args, data_path)
    elif args.data == "self":
        draft, data_desc = self_rollouts(args, data_path, part_path)
    elif args.tiny:
        target, draft = tiny_models()
        if not data_path.exists():
            rng = np.random.default_rng(args.seed)
            prompts = rng.integers(2, target.cfg.vocab_size, (args.num_prompts, args.prompt_len)).tolist()
            toks, mask = distill(target, prompts, args.gen_len, args.gen_batch, part_path, 60 * args.distill_budget_min)
            np.savez(data_path, tokens=toks, mask=mask, ids=np.array([f"random:{i}" for i in range(len(toks))]))
        data_desc = "tiny random models; random-token prompts; greedy continuations of the tiny target"
    else:
        from mirror_jax.loading.default_pair import DRAFT_SPEC, TARGET_SPEC, assemble_default_files
        from mirror_jax.loading.gguf_loader import load_gguf

        # One model in memory at a time: the target only while distilling, then the draft.
        target_path, draft_path = assemble_default_files()
        target_name = Path(target_path).name
        if not data_path.exists():
            target = load_gguf(target_path, jnp.float32, sha256=TARGET_SPEC.sha256, progress=False)
            prompts, ids = make_prompts(target.tokenizer, "train", args.num_prompts, args.prompt_len, args.seed)
            print(f"{len(prompts)} stdlib prompts of {args.prompt_len} tokens", flush=True)
            toks, mask = distill(target, prompts, args.gen_len, args.gen_batch, part_path, 60 * args.distill_budget_min)
            np.savez(data_path, tokens=toks, mask=mask, ids=np.array(ids[: len(toks)]))
        data_desc = (
            f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib (train split of files by "
            f"sha1(path) % 8 != 0): source up to a function docstring, last {args.prompt_len} tokens as "
            f"prompt; {args.gen_len}-token greedy continuations by the target "
            f"({target_name}); loss on continuation tokens only"
        )
        target = None
        gc.collect()
        draft = load_gguf(draft_path, jnp.float32, sha256=DRAFT_SPEC.sha256, progress=False)
    target = None
    gc.collect()
    if ev_rows is None:  # --data self / distill: rows and masks from the cached file
        data = np.load(data_path)
        tokens_all, mask_all = data["tokens"], data["mask"]
        n = len(tokens_all)
        if args.data == "self":  # held-out rows: prompts from the held-out files
            held = np.char.startswith(data["ids"].astype(str), "heldout")
            ev_idx, tr_idx = np.flatnonzero(held), np.flatnonzero(~held)
            if not len(tr_idx):
                raise SystemExit(f"{data_path}: no train rows (the rollout budget ended inside the held-out "
                                 "prompts); raise --distill-budget-min or delete the file")
        else:  # a random share of the rows
            perm = np.random.default_rng(args.seed).permutation(n)
            n_eval = max(1, int(round(n * args.eval_frac)))
            ev_idx, tr_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        n_eval = len(ev_idx)
    else:  # train rows then held-out rows, every position a stream position
        n_eval = len(ev_rows)
        tr_idx = np.arange(len(tokens_all))
        tokens_all = np.concatenate([tokens_all, ev_rows])
        n = len(tokens_all)
        ev_idx = np.arange(n - n_eval, n)
        mask_all = np.ones(tokens_all.shape, np.float32)
    data_hash = hashlib.sha256(tokens_all.tobytes()).hexdigest()
    print(f"data: {n} rows x {tokens_all.shape[1]} tokens ({len(tr_idx)} train / {n_eval} eval)", flush=True)

    # ---- frozen main-stream features (once) -------------------------------------------------------
    cfg, params = draft.cfg, draft.params
    feats_path = work / f"feats_{data_hash[:12]}_L{sscfg.first_msa_layer(cfg)}.npz"
    feats_all = load_features(feats_path, cfg, sscfg, params)
    if feats_all is None:
        feats_host = []
        for i in tqdm(range(0, n, args.feat_batch), desc="main-stream features (draft)"):
            f = precompute_main(cfg, sscfg, params, jnp.asarray(tokens_all[i : i + args.feat_batch]))
            feats_host.append(jax.tree_util.tree_map(np.asarray, f))
        feats_all = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *feats_host)
        del feats_host
        save_features(feats_path, feats_all)
    if args.prepare_only:
        print(f"data and features ready: {feats_path}", flush=True)
        return None
    if args.labels == "self":
        from mirror_jax.ss.train import self_labels

        w = np.asarray(self_labels(jnp.asarray(tokens_all[tr_idx]), jnp.asarray(feats_all.greedy[tr_idx]),
                                   sscfg.num_streams)[1])
        print("share of stream positions with an exact self label (train): "
              + ", ".join(f"stream {j + 1}: {w[..., j].mean():.3f}" for j in range(w.shape[-1])), flush=True)

    stream_ids = None  # the streams' vocabulary: the most frequent tokens of the train rows and their labels
    init_ssp = None
    if args.init_from:
        from mirror_jax.ss.checkpoint import restore_ss_checkpoint

        _, init_ssp, _ = restore_ss_checkpoint(args.init_from, cfg, params, sscfg)
        stream_ids = None if init_ssp.stream_ids is None else jnp.asarray(init_ssp.stream_ids)
        init_ssp = init_ssp.replace(stream_ids=None)
        print(f"fine-tuning {args.init_from}", flush=True)
    elif sscfg.stream_vocab:
        from mirror_jax.draft_vocab import coverage, rank_by_frequency, reduced_vocab

        ranking = None if args.stream_ranking == "id" else rank_by_frequency(
            [tokens_all[tr_idx].ravel(), np.asarray(feats_all.greedy[tr_idx]).ravel()], cfg.vocab_size)
        keep = list(getattr(getattr(draft, "tokenizer", None), "all_special_ids", None) or [])
        ids_np = reduced_vocab(cfg, sscfg.stream_vocab, keep=keep, ranking=ranking)
        stream_ids = jnp.asarray(ids_np)
        print(f"stream vocabulary: {ids_np.size} ids ({args.stream_ranking} ranking); held-out draft greedy tokens "
              f"inside: {coverage(ids_np, np.asarray(feats_all.greedy[ev_idx]).ravel()):.3f}", flush=True)

    def batch_of(idx):
        f = jax.tree_util.tree_map(lambda x: jnp.asarray(x[idx]), feats_all)
        return f, jnp.asarray(tokens_all[idx]), jnp.asarray(mask_all[idx])

    # ---- training -----------------------------------------------------------------------------------
    # stream j at t targets t+1+j; continuation targets start at prompt_len, so t >= P - 1 - s.
    start = max(0, args.prompt_len - 1 - sscfg.num_streams) if args.data in ("distill", "self") else 0
    opt = make_optimizer(args.lr, args.steps, args.warmup, schedule=args.schedule)
    kw = dict(chunk=256, start=start, labels=args.labels, max_rows=args.max_rows or None)
    step_fn = make_train_step(cfg, sscfg, opt, **kw)
    eval_fn = make_eval_loss(cfg, sscfg, **kw)
    state = init_train_state(init_ssp if init_ssp is not None else init_ss_params(cfg, sscfg, params, seed=args.seed),
                             opt)
    state_path = work / "train_state.msgpack"
    log_path = results / f"{args.name}_train_log.jsonl"
    if state_path.exists():
        state = serialization.from_bytes(state, state_path.read_bytes())
        print(f"resumed from step {int(state.step)}", flush=True)
        if log_path.exists():  # drop log lines written after the restored checkpoint
            keep = [
                x for x in log_path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= int(state.step)
            ]
            log_path.write_text("".join(k + "\n" for k in keep))
    elif log_path.exists():
        log_path.unlink()

    def evaluate(ssp):
        ms = [eval_fn(params, ssp, *batch_of(ev_idx[i : i + args.batch]), stream_ids=stream_ids)
              for i in range(0, n_eval, args.batch)]
        out = {k: np.mean([np.asarray(m[k]) for m in ms], axis=0) for k in ms[0]}
        return {**out, **window_estimates(out["acc_stream"])}

    def to_json(m):
        return {k: (np.asarray(v).tolist()) for k, v in m.items()}

    t0 = time.time()
    first = int(state.step)
    bar = tqdm(range(first, args.steps), initial=first, total=args.steps, desc="train SS")
    with open(log_path, "a") as log:
        if first == 0:
            log.write(json.dumps({"kind": "eval", "step": 0, **to_json(evaluate(state.ssp))}) + "\n")
        for step in bar:
            rng = np.random.default_rng((args.seed, step))  # resumable data order
            idx = np.sort(rng.choice(tr_idx, size=min(args.batch, len(tr_idx)), replace=False))
            state, m = step_fn(params, state, *batch_of(idx), stream_ids=stream_ids)
            m = to_json(m)
            log.write(json.dumps({"kind": "train", "step": step + 1, "time_s": time.time() - t0, **m}) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", s1=f"{m['nll_stream'][0]:.2f}")
            done = step + 1 == args.steps or (args.time_budget_min and time.time() - t0 > 60 * args.time_budget_min)
            if (step + 1) % args.eval_every == 0 or done:
                log.write(json.dumps({"kind": "eval", "step": step + 1, **to_json(evaluate(state.ssp))}) + "\n")
                log.flush()
            if (step + 1) % args.ckpt_every == 0 or done:
                atomic_write_bytes(state_path, serialization.to_bytes(state))
            if done:
                break
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    last_ev = [r for r in rows if r["kind"] == "eval"][-1]
    first_ev = [r for r in rows if r["kind"] == "eval"][0]
    last_tr = [r for r in rows if r["kind"] == "train"][-1]
    png = results / f"{args.name}_train_loss.png"
    plot_curve(
        log_path,
        png,
        f"SS adapter {args.name}: s={sscfg.num_streams}, N_s={sscfg.num_msa_layers}, "
        f"LoRA r={sscfg.lora_rank}, {int(state.step)} steps",
    )
    extra = {
        "steps": int(state.step),
        "base_sha256": getattr(draft, "sha256", None),
        "base_name": getattr(draft, "name", "tiny-random"),
        "data": data_desc,
        "data_sha256": data_hash,
        "labels": args.labels,
        "command": "python experiments/train_ss_draft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "num_rows": int(n),
        "row_tokens": int(tokens_all.shape[1]),
        "train_args": vars(args),
        "final_train": {k: last_tr[k] for k in METRICS if k in last_tr},
        "eval_before": {k: first_ev[k] for k in METRICS if k in first_ev},
        "eval_after": {k: last_ev[k] for k in METRICS if k in last_ev},
    }
    if init_meta is not None:  # the fine-tuned adapter's origin (its own steps and data come on top of these)
        extra["init_from"] = {"directory": str(args.init_from), **{k: init_meta.get(k) for k in
                                                                  ("steps", "data", "data_sha256", "command")}}
    out = save_ss_checkpoint(
        Path(args.ckpt_root) / args.name,
        cfg,
        params,
        sscfg,
        state.ssp if stream_ids is None else state.ssp.replace(stream_ids=stream_ids),
        extra,
        fingerprint=base_fingerprint(cfg, params),
    )
    print(json.dumps({"checkpoint": str(out), **{k: extra[k] for k in ("steps", "eval_before", "eval_after")}}))
    return out


if __name__ == "__main__":
    main()
