"""Training text for adapters (exit heads, SS streams) from what every machine has: the Python stdlib.

Files are split by a stable hash of their path (1 in 8 held out, the same split as
`experiments/train_ss_draft.py`), so held-out figures come from files never trained on. Test
packages, idlelib and installed third-party packages (site-/dist-packages) are skipped.
SpecBench prompts are evaluation data and are never used here.

`chat_items` turns functions and classes into chat exchanges in the target's own template (a user
request, the source or the docstring as the assistant's answer), so the hidden states an exit head
is trained on come from assistant turns, as when it decodes; `code_texts` gives the files' raw
source (what a code-completion prompt looks like, no template); `pack_sequences` cuts a token stream
into fixed-length rows, optionally mixing the two kinds. `prose_requests` asks for answers in prose
(explain, summarise, translate, questions, arithmetic word problems) built from the same files: the
stdlib has the questions but not the answers, which come from the target itself
(`experiments/train_exit.py --prose-frac`), so that text is the target's own chat, not code.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
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


def _parsed_modules(split: str) -> Iterator[tuple[str, str, ast.Module]]:
    """(dotted module name, source, syntax tree) of each stdlib file of `split` that parses."""
    for rel, path in stdlib_files(split):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield rel[:-3].replace("/", ".").removesuffix(".__init__"), src, tree


def _definitions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """The module's top-level functions and classes."""
    return (n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))


def chat_items(split: str, seed: int = 0, max_chars: int = 3000) -> Iterator[list[dict[str, str]]]:
    """Chat exchanges from the stdlib files of `split`, in a seeded random order: for each top-level
    function or class, "write it" -> its source (in a ```python block), and for each docstring,
    "what does it do" -> the docstring."""
    items = []
    for mod, src, tree in _parsed_modules(split):
        for node in _definitions(tree):
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


LANGUAGES = ("French", "German", "Spanish", "Chinese", "Japanese", "Russian", "Portuguese", "Italian")

def _math_problem(rng: np.random.Generator) -> str:
    """One arithmetic word problem with numbers drawn from `rng`, chosen so the problem is consistent
    (a third of a multiple of 3, a sum and difference of the same two numbers, a positive width);
    answers need not be whole numbers (average speeds, prices)."""
    a, b, c, d = (int(x) for x in rng.integers(3, 120, size=4))
    problems = (
        f"A bakery sells {a} loaves a day at ${b} each and pays ${c} a day in rent. How much does it earn "
        "in a week after rent? Reason step by step.",
        f"A train travels {a * 10} km at {b} km/h and then {c * 10} km at {d} km/h. What is its average speed "
        "over the whole trip? Show your work.",
        f"Tom has {3 * a} marbles. He gives a third of them to Ana, then buys {b} more and loses {c}. How many "
        "does he have now? Explain each step.",
        f"The sum of two numbers is {a + b} and their difference is {abs(a - b)}. What are the numbers? "
        "Solve it step by step.",
        f"A rectangle's length is {a} cm more than its width and its perimeter is {4 * b + 2 * a} cm. Find its "
        "area, showing each step.",
        f"A store marks a ${a} jacket up by {b % 50 + 5}% and later discounts it by {c % 40 + 5}%. What is the "
        "final price? Think it through step by step.",
    )
    return problems[int(rng.integers(len(problems)))]


def prose_requests(split: str, seed: int = 0, max_chars: int = 1500) -> Iterator[str]:
    """User requests whose answers are prose rather than code, built from the stdlib files of `split`
    in a seeded random order: explain a function in plain words, summarise, translate (into one of
    `LANGUAGES`) or answer a question about a docstring, introduce a module to beginners, and, one
    request in six, an arithmetic word problem. Only the requests: the answers are generated by the
    model being trained for (`experiments/train_exit.py --prose-frac`).

    Example: ``next(prose_requests("train"))`` might be "Summarize the following documentation of
    `json.dumps` in two or three sentences:\n\n<the docstring>"."""
    rng = np.random.default_rng(seed)
    items = []
    for mod, src, tree in _parsed_modules(split):
        if mod_doc := ast.get_docstring(tree):
            items.append(("module", mod, mod_doc[:max_chars]))
        for node in _definitions(tree):
            doc = ast.get_docstring(node)
            code = ast.get_source_segment(src, node) or ""
            if doc and len(doc) >= 120:
                items.append(("doc", f"{mod}.{node.name}", doc[:max_chars]))
            elif 200 <= len(code) <= max_chars:
                items.append(("code", f"{mod}.{node.name}", code))
    for i in rng.permutation(len(items)):
        kind, name, text = items[i]
        if rng.random() < 1 / 6:
            yield _math_problem(rng)
        if kind == "code":
            yield f"Explain in plain English, for someone new to Python, what `{name}` does:\n\n```python\n{text}\n```"
        elif kind == "module":
            yield (f"Write a short, friendly introduction to Python's `{name}` module for beginners, based on "
                   f"its documentation:\n\n{text}")
        else:
            ask = int(rng.integers(3))
            if ask == 0:
                yield f"Summarize the following documentation of `{name}` in two or three sentences:\n\n{text}"
            elif ask == 1:
                lang = LANGUAGES[int(rng.integers(len(LANGUAGES)))]
                first = text.split("\n\n")[0]
                yield f"Translate the following text into {lang}:\n\n{first}"
            else:
                yield (f"Here is the documentation of `{name}`:\n\n{text}\n\nWhen would someone use it, and "
                       "what should they be careful about? Answer in a short paragraph.")


def code_texts(split: str, seed: int = 0, max_chars: int = 12000) -> Iterator[str]:
    """Raw source of the stdlib files of `split` (the first `max_chars` characters of each, so no one
    long file dominates), in a seeded random order."""
    files = stdlib_files(split)
    for i in np.random.default_rng(seed).permutation(len(files)):
        try:
            text = files[i][1].read_text(encoding="utf-8")
        except (UnicodeDecodeError, ValueError):
            continue
        if text.strip():
            yield text[:max_chars]


def _rows_from(texts: Iterable[str], encode, n_rows: int, seq_len: int) -> list[list[int]]:
    """Up to `n_rows` rows of `seq_len` tokens cut from the concatenated token stream of `texts`."""
    rows, stream = [], []
    for text in texts:
        stream.extend(encode(text))
        while len(stream) >= seq_len and len(rows) < n_rows:
            rows.append(stream[:seq_len])
            stream = stream[seq_len:]
        if len(rows) >= n_rows:
            break
    return rows


def pack_sequences(tokenizer, chat_template: str | None, split: str, num_tokens: int, seq_len: int,
                   seed: int = 0, raw_frac: float = 0.0) -> np.ndarray:
    """[N, seq_len] int32 rows (N = num_tokens // seq_len): round(N * raw_frac) of them cut from the
    files' raw source (`code_texts`), the rest from one stream of chat exchanges rendered in
    `chat_template` (the tokenizer's own when None), the two kinds interleaved in a seeded order.

    Example: N = 4, raw_frac = 0.5 -> two chat rows and two raw-source rows, e.g. [raw, chat, chat, raw].
    """
    if not 0.0 <= raw_frac <= 1.0:
        raise ValueError(f"raw_frac must be in [0, 1], got {raw_frac}")
    n = max(1, num_tokens // seq_len)
    n_raw = int(round(n * raw_frac))

    def chat_texts():
        for msgs in chat_items(split, seed):
            yield tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False)

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    chat = _rows_from(chat_texts(), encode, n - n_raw, seq_len) if n > n_raw else []
    raw = _rows_from(code_texts(split, seed), encode, n_raw, seq_len) if n_raw else []
    rows = chat + raw
    if not rows:
        raise ValueError(f"the {split} split gave fewer than {seq_len} tokens")
    if raw and chat:  # interleave, so any prefix of the rows (a time-budgeted run) sees both kinds
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    return np.asarray(rows, np.int32)
