"""Static model configuration.

`ModelConfig` is frozen and hashable so it can be a static argument of `jax.jit`. It covers the
decoder-only families the library supports:

* ``qwen2``  - Qwen2 / Qwen2.5 (bias on q/k/v projections),
* ``llama``  - Llama / SmolLM2 (no biases, optional llama3 / linear RoPE scaling),
* ``qwen3``  - Qwen3 (RMSNorm on q and k per head, no biases).

Build one from a transformers config with `ModelConfig.from_hf`, or directly for tests. Named
shapes (`SHAPES`: the default pair's exact configurations and a 7B-class target) serve random-weight
benchmarks where the real weights cannot travel (e.g. a GPU machine)::

    cfg = QWEN25_1_5B                    # same shapes as the default target's GGUF
    params = init_random(cfg, device=d)  # random weights run at the same speed as real ones
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "qwen3")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's model type is not one mirror_jax implements."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    # RoPE scaling as a hashable tuple: ("llama3", factor, low, high, original_max) or
    # ("linear", factor) or None.
    rope_scaling: tuple | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int = 32768
    # Tensor-parallel shards the fused weights are laid out for (`engine.sharding.tp_layout`): the
    # rows of w_qkv / w_gate_up are grouped per shard, so each device's slice holds whole heads and
    # matching gate/up columns. 1 = the checkpoints' own layout.
    tp_shards: int = 1

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {self.arch!r} is not supported; mirror_jax implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] (float32), with the configured scaling."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if self.rope_scaling is None:
            pass
        elif self.rope_scaling[0] == "linear":
            inv = inv / self.rope_scaling[1]
        elif self.rope_scaling[0] == "llama3":
            _, factor, low, high, orig = self.rope_scaling
            low_wavelen = orig / low
            high_wavelen = orig / high
            wavelen = 2 * math.pi / inv
            smooth = (orig / wavelen - low) / (high - low)
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            mid = (1 - smooth) * scaled / factor + smooth * scaled
            is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(is_mid, mid, scaled)
        else:  # pragma: no cover - guarded in from_hf
            raise ValueError(f"unknown rope scaling {self.rope_scaling}")
        return inv.astype(np.float32)

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (Qwen2Config, LlamaConfig, Qwen3Config)."""
        arch = getattr(hf_config, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"model_type {arch!r} is not supported; mirror_jax implements "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/Qwen2.5, Llama/SmolLM2, Qwen3)"
            )
        c = hf_config
        num_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // num_heads
        rope_params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        theta = rope_params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rtype in (None, "default"):
            scaling = None
        elif rtype == "linear":
            scaling = ("linear", float(rope_params["factor"]))
        elif rtype == "llama3":
            scaling = (
                "llama3",
                float(rope_params["factor"]),
                float(rope_params["low_freq_factor"]),
                float(rope_params["high_freq_factor"]),
                float(rope_params["original_max_position_embeddings"]),
            )
        else:
            raise UnsupportedArchitectureError(
                f"RoPE scaling type {rtype!r} is not supported (supported: default, linear, llama3)"
            )
        if arch == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(getattr(c, "attention_bias", False))
        eos = c.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (int(eos),))
        return cls(
            arch=arch,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rms_norm_eps=float(c.rms_norm_eps),
            qkv_bias=qkv_bias,
            qk_norm=arch == "qwen3",
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            rope_scaling=scaling,
            bos_token_id=getattr(c, "bos_token_id", None),
            eos_token_ids=eos_ids,
            max_position_embeddings=int(getattr(c, "max_position_embeddings", 32768)),
        )

    def num_params(self) -> int:
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return layers * per_layer + emb + h


_QWEN2 = dict(arch="qwen2", vocab_size=151936, rope_theta=1e6, qkv_bias=True, tie_embeddings=False)

QWEN25_1_5B = ModelConfig(
    hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, **_QWEN2
)
QWEN25_0_5B = ModelConfig(
    hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, **_QWEN2
)
QWEN25_7B = ModelConfig(
    hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, **_QWEN2
)

SHAPES = {"qwen2.5-1.5b": QWEN25_1_5B, "qwen2.5-0.5b": QWEN25_0_5B, "qwen2.5-7b": QWEN25_7B}
