"""The ladder's rungs and what they decode with: the models, the SS adapter, and a chat codec.

* `LADDER` / `RUNGS`: the methods (ar, sd_ar, sd_ss, mirror_ar, mirror_ss) as (engine method,
  draft kind); `parse_methods` validates a selection.

* `default_models()`: the default Qwen2.5-Coder 1.5B/0.5B pair (float32 on CPU, bfloat16 on
  accelerators), its chat template, and the committed speculative-streaming adapter when one is
  found (`mirror_jax.ss.checkpoint.default_adapter_dirs`).
* `tiny_models()`: `mirror_jax.testing.noisy_pair` with a random SS adapter and a toy byte codec:
  the CI / smoke configuration (``mirror-jax bench --tiny``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

LADDER = ("ar", "sd_ar", "sd_ss", "mirror_ar", "mirror_ss")
RUNGS = {  # method name -> (engine method, draft kind)
    "ar": ("ar", None),
    "sd_ar": ("sd", "ar"),
    "sd_ss": ("sd", "ss"),
    "mirror_ar": ("mirror", "ar"),
    "mirror_ss": ("mirror", "ss"),
}


class LadderError(ValueError):
    """Invalid ladder settings (unknown methods, bad counts)."""


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """'ar,sd_ar' or ['ar', 'sd_ar'] -> validated list in ladder order; 'ar' is always included
    (it is the baseline of every speed-up). Raises LadderError for unknown names."""
    if spec is None:
        return list(LADDER)
    items = spec.split(",") if isinstance(spec, str) else [x for s in spec for x in str(s).split(",")]
    names = [x.strip() for x in items if x.strip()]
    unknown = [m for m in names if m not in RUNGS]
    if unknown:
        raise LadderError(f"unknown methods {unknown}; choose from {', '.join(LADDER)}")
    if not names:
        raise LadderError(f"no methods given; choose from {', '.join(LADDER)}")
    chosen = set(names) | {"ar"}
    return [m for m in LADDER if m in chosen]



class HFChatCodec:
    """Messages -> ids with the model's chat template; ids -> text with the tokenizer."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def encode(self, messages: list[dict]) -> list[int]:
        from mirror_jax.tokenizer import apply_chat_template

        return apply_chat_template(self.tokenizer, messages, self.chat_template)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TinyChatCodec:
    """A lossless toy 'chat template' for tiny random models (vocab >= 8): role marker ids 0..2,
    content bytes mapped into [3, vocab) and cut to `max_content` tokens per message. Replies are
    decoded to private-use characters so re-encoding them gives the same ids back."""

    ROLE = {"system": 0, "user": 1, "assistant": 2}
    _PUA = 0xE000

    def __init__(self, vocab: int, max_content: int = 24):
        self.vocab, self.max_content = vocab, max_content

    def _content(self, text: str) -> list[int]:
        out = []
        for ch in text:
            o = ord(ch)
            if self._PUA <= o < self._PUA + self.vocab:
                out.append(o - self._PUA)
            else:
                out.extend(3 + b % (self.vocab - 3) for b in ch.encode())
        return out[: self.max_content]

    def encode(self, messages: list[dict]) -> list[int]:
        ids = []
        for m in messages:
            ids.append(self.ROLE.get(m["role"], 1))
            ids.extend(self._content(m["content"]))
        return ids + [self.ROLE["assistant"]]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(self._PUA + int(i)) for i in ids)


@dataclasses.dataclass
class BenchModels:
    """What the ladder decodes with. `target`/`draft`: LoadedModel or (cfg, params)."""

    name: str
    target: Any
    draft: Any
    codec: Any
    ss_adapter: tuple | None = None  # (sscfg, ssp)
    ss_note: str = ""
    eos_ids: tuple | None = None  # None: the target config's EOS ids

    def cfgs(self):
        get = lambda m: m[0] if isinstance(m, tuple) else m.cfg
        return get(self.target), get(self.draft)


def tiny_models(seed: int = 0, noise: float = 0.05, vocab: int = 64, layers: int = 4) -> BenchModels:
    """Tiny random target (4 layers, hidden 64) and a noisy copy as draft (they agree often but not
    always), a random SS adapter on the draft, and the toy codec. For CI and smoke runs only."""
    from mirror_jax.ss import SSConfig, init_ss_params
    from mirror_jax.testing import noisy_pair

    target, draft = noisy_pair(noise=noise, layers=layers, vocab=vocab, seed=seed)
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=4)
    ssp = init_ss_params(draft[0], sscfg, draft[1], seed=seed)
    return BenchModels(
        name="tiny-random", target=target, draft=draft, codec=TinyChatCodec(vocab),
        ss_adapter=(sscfg, ssp), ss_note="random (untrained) SS adapter on the tiny draft", eos_ids=(),
    )


def default_models(dtype=None, checkpoints=None) -> BenchModels:
    """The default Qwen2.5-Coder 1.5B/0.5B pair (float32 on CPU, bf16 on accelerators) and the
    committed SS adapter when there is one."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.loading import default_pair
    from mirror_jax.ss.checkpoint import default_adapter_dirs, load_default_ss_adapter

    if dtype is None:
        dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    target, draft, tok = default_pair(dtype)
    ss = load_default_ss_adapter(draft, checkpoints)
    note = f"committed adapter {ss[2]['directory']}" if ss else (
        "no trained SS adapter for this draft in " + ", ".join(map(str, default_adapter_dirs(checkpoints)))
        + " (missing or trained for another model); pass --checkpoints DIR or set MIRROR_JAX_CHECKPOINTS"
    )
    return BenchModels(
        name="Qwen2.5-Coder-1.5B-Instruct / 0.5B-Instruct (Q4_K_M dequantised)", target=target, draft=draft,
        codec=HFChatCodec(tok, target.chat_template), ss_adapter=None if ss is None else (ss[0], ss[1]), ss_note=note,
    )
