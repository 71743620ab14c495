"""SpecBench questions: loading, validation and task grouping.

The file is JSON lines with ``question_id``, ``category`` and ``turns`` (a list of user messages).
SpecBench's six tasks: the eight MT-bench categories form "mt_bench" (multi-turn conversation);
the others are translation, summarization, qa, math_reasoning and rag.

The 480 SpecBench questions ship with the package (``mirror_jax/bench/data/spec_bench/``, Apache-2.0;
provenance in its SOURCE.md); ``$MIRROR_JAX_SPECBENCH`` or an explicit path selects another file.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


class QuestionFileError(ValueError):
    """The question file is missing or malformed."""


def default_question_file() -> Path:
    """``$MIRROR_JAX_SPECBENCH`` if set, else the copy shipped with the package."""
    env = os.environ.get("MIRROR_JAX_SPECBENCH")
    if env:
        return Path(env)
    return Path(str(resources.files("mirror_jax.bench").joinpath("data", "spec_bench", "question.jsonl")))


def task_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH else category


def load_questions(path=None, categories=None, limit_per_category: int | None = None) -> list[dict]:
    """Questions as dicts with question_id, category, task, turns. `categories` may name tasks
    (e.g. "mt_bench", "qa") or raw MT-bench categories ("coding")."""
    path = Path(path) if path is not None else default_question_file()
    if not path.exists():
        raise QuestionFileError(f"question file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict) or not {"question_id", "category", "turns"} <= r.keys():
            raise QuestionFileError(f"{path}:{n}: each line needs question_id, category and turns")
        turns = r["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise QuestionFileError(f"{path}:{n}: turns must be a non-empty list of non-empty strings")
        rows.append({**r, "task": task_of(r["category"])})
    if not rows:
        raise QuestionFileError(f"{path} holds no questions")
    if categories:
        known = {r["task"] for r in rows} | {r["category"] for r in rows}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise QuestionFileError(f"unknown categories {unknown}; this file has {sorted(known)}")
        rows = [r for r in rows if r["task"] in categories or r["category"] in categories]
    if limit_per_category:
        seen: dict[str, int] = {}
        kept = []
        for r in rows:
            if seen.get(r["task"], 0) < limit_per_category:
                kept.append(r)
                seen[r["task"]] = seen.get(r["task"], 0) + 1
        rows = kept
    return rows
