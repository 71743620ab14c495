"""Named model shapes: the default pair's exact configurations (for random-weight benchmarks where
the real weights cannot travel, e.g. a GPU machine) and a 7B-class target.

    cfg = QWEN25_1_5B          # same shapes as the default target's GGUF
    params = init_random(cfg)  # random weights run at the same speed as real ones
"""

from __future__ import annotations

from mirror_jax.config import ModelConfig

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

# A tiny Qwen2-shaped model for smoke runs of the experiments (--tiny) on any machine.
TINY_QWEN2 = ModelConfig(
    arch="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
    head_dim=8, qkv_bias=True,
)
