"""transformers' own greedy `generate` on a GGUF file, run in a child process by the real-model tests.

The reference model (1.5B in float32, ~9 GB peak while transformers loads it) lives in its own
process so its memory is returned in full when it exits, and the test process never holds it beside
mirror_jax's copy of the pair.

    python -m tests.hf_reference IN.json OUT.json

IN: ``{"mode": "generate", "gguf": path, "prompts": [[token ids], ...], "max_new_tokens": n}``;
OUT: ``{"tokens": [[new token ids], ...]}`` (the prompt stripped). With ``"mode": "last_logits"``
the child runs one forward per prompt instead and OUT is ``{"last_logits": [[V floats], ...]}``, the
logits at each prompt's last position."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def hf_greedy(
    gguf: str | Path, prompts: list[list[int]], max_new_tokens: int, *, timeout: float = 1800
) -> list[list[int]]:
    """Run this module in a child process and return its tokens (raises with the child's stderr)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens} (hf_last_logits runs one forward)")
    return _run_child({"mode": "generate", "max_new_tokens": max_new_tokens}, gguf, prompts, timeout)["tokens"]


def hf_last_logits(gguf: str | Path, prompts: list[list[int]], *, timeout: float = 1800) -> list[list[float]]:
    """transformers' logits at each prompt's last position, from a child process."""
    return _run_child({"mode": "last_logits"}, gguf, prompts, timeout)["last_logits"]


def _run_child(job: dict, gguf, prompts, timeout: float) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({**job, "gguf": str(gguf), "prompts": prompts}))
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(
            [sys.executable, "-m", "tests.hf_reference", str(src), str(dst)],
            cwd=root, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the transformers reference process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(dst.read_text())


def main(src: str, dst: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    job = json.loads(Path(src).read_text())
    path = Path(job["gguf"])
    torch.set_num_threads(2)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    if job["mode"] not in ("generate", "last_logits"):
        raise SystemExit(f"unknown mode {job['mode']!r}: 'generate' or 'last_logits'")
    if job["mode"] == "last_logits":
        with torch.no_grad():
            last = [ref(input_ids=torch.tensor([ids])).logits[0, -1].float().tolist() for ids in job["prompts"]]
        Path(dst).write_text(json.dumps({"last_logits": last}))
        return
    out_tokens = []
    for ids in job["prompts"]:
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([ids]), max_new_tokens=job["max_new_tokens"], do_sample=False, num_beams=1,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
        out_tokens.append(out[0, len(ids):].tolist())
    Path(dst).write_text(json.dumps({"tokens": out_tokens}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
