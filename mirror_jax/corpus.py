"""Training text for adapters (exit heads, SS streams) from what every machine has: the Python stdlib.

Files are split by a stable hash of their path (1 in 8 held out, the same split as
`experiments/train_ss_draft.py`), so held-out figures come from files never trained on. Test
packages, idlelib and installed third-party packages (site-/dist-packages) are skipped.
SpecBench prompts are evaluation data and are never used here.

`chat_items` turns functions and classes into chat exchanges in the target's own template (a user
request, the source or the docstring as the assistant's answer), so the hidden states an exit head
is trained on come from assistant turns, as when it decodes; `pack_sequences` cuts a token stream
into fixed-length rows.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def split_of(relpath: str) -> str:
    """'heldout' for ~1 in 8 stdlib files (sha1 of the relative path), else 'train'."""
    return "heldout" if int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 8 == 0 else "train"


def stdlib_files(split: str) -> list[tuple[str, Path]]:
    """[(relative path, path)] of the stdlib's .py files in `split`, sorted."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "dist-packages")  # installed packages are not the stdlib
    files = sorted(p for p in root.rglob("*.py") if not any(x in p.parts for x in skip))
    return [(str(p.relative_to(root)), p) for p in files if split_of(str(p.relative_to(root))) == split]


def chat_items(split: str, seed: int = 0, max_chars: int = 3000) -> Iterator[list[dict[str, str]]]:
    """Chat exchanges from the stdlib files of `split`, in a seeded random order: for each top-level
    function or class, "write it" -> its source (in a ```python block), and for each docstring,
    "what does it do" -> the docstring."""
    items = []
    for rel, path in stdlib_files(split):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        mod = rel[:-3].replace("/", ".").removesuffix(".__init__")
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            code = ast.get_source_segment(src, node) or ""
            if len(code) >= 200:
                ask = f"Write the Python {kind} `{node.name}` of the `{mod}` module."
                items.append([{"role": "user", "content": ask},
                              {"role": "assistant", "content": f"```python\n{code[:max_chars]}\n```"}])
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                items.append([{"role": "user", "content": f"What does `{mod}.{node.name}` do?"},
                              {"role": "assistant", "content": doc[:max_chars]}])
    order = np.random.default_rng(seed).permutation(len(items))
    for i in order:
        yield items[i]


def pack_sequences(tokenizer, chat_template: str | None, split: str, num_tokens: int, seq_len: int,
                   seed: int = 0) -> np.ndarray:
    """[N, seq_len] int32 rows (N = num_tokens // seq_len) cut from one stream of chat exchanges
    rendered in `chat_template` (the tokenizer's own when None)."""
    rows, stream = [], []
    for msgs in chat_items(split, seed):
        text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        while len(stream) >= seq_len:
            rows.append(stream[:seq_len])
            stream = stream[seq_len:]
        if len(rows) * seq_len >= num_tokens:
            break
    if not rows:
        raise ValueError(f"the {split} split gave fewer than {seq_len} tokens")
    return np.asarray(rows[: max(1, num_tokens // seq_len)], np.int32)
