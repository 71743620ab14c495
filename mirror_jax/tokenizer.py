"""Small tokenizer helpers: chat templating and plain encoding to ``list[int]``.

The tokenizer is a transformers fast tokenizer (from `mirror_jax.loading`). A chat template can come
from the tokenizer itself or, for GGUF files, from the ``tokenizer.chat_template`` metadata
(`LoadedModel.chat_template`); it is rendered with Jinja2 by transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if isinstance(messages, str):
        raise ValueError(
            "apply_chat_template expects a list of messages like [{'role': 'user', 'content': '...'}], "
            "not a string; use encode(tokenizer, text) for raw text"
        )
    if not messages:
        raise ValueError("empty prompt: pass at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' keys, got {m!r}")
    if not any(isinstance(m["content"], str) and m["content"].strip() for m in messages):
        raise ValueError("empty prompt: every message has empty content")


def render_chat(tokenizer, messages: Sequence[dict[str, Any]], chat_template: str | None = None) -> str:
    """The chat prompt as text (``add_generation_prompt=True``), using ``chat_template`` if given, else
    the tokenizer's own template."""
    _check_messages(messages)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "no chat template: the tokenizer has none and none was given; pass the model's template "
            "(LoadedModel.chat_template) or use encode(tokenizer, text) for a raw prompt"
        )
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, add_generation_prompt=True, tokenize=False
    )


def apply_chat_template(
    tokenizer, messages: Sequence[dict[str, Any]], chat_template: str | None = None
) -> list[int]:
    """Token ids of a chat prompt ready for generation (the assistant turn is opened).

    Args:
        tokenizer: a transformers fast tokenizer.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        chat_template: a Jinja template overriding the tokenizer's (e.g. `LoadedModel.chat_template`
            from a GGUF file).

    Raises:
        ValueError: no messages / only empty contents, malformed messages, or no template available.
    """
    text = render_chat(tokenizer, messages, chat_template)
    # The template writes any BOS/special tokens itself; do not add them a second time.
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in ids]


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a raw text prompt (BOS added if the tokenizer is configured to add it).

    Raises:
        ValueError: the text is empty (or only whitespace) or encodes to no tokens.
    """
    if not isinstance(text, str):
        raise ValueError(f"encode expects a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty prompt: the text to encode is empty; pass a non-empty prompt")
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=add_special_tokens)]
    if not ids:
        raise ValueError(f"the prompt {text!r} encodes to no tokens")
    return ids


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of token ids (special tokens dropped by default)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
