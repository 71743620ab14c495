"""An int8 draft: weights quantized per output row, activations per token (W8A8), lossless for SD.

A draft only proposes tokens; the target's verification decides what is committed (greedy: the
target's own argmax; sampling: rejection sampling against the draft's own q, whatever q is). So
the draft's weights can be approximated without changing any output: a cruder draft can only
cost acceptance, never correctness. On a CPU a draft forward streams its weights from memory, and
int8 weights are a quarter of float32's bytes.

The product. ``w = q * scale[:, None]`` with ``q`` int8 ``[out, in]`` and one float32 scale per
output row (``scale = max |w_row| / 127``). At run time each activation row is quantized the same
way (``x ~ xq * sx``, one scale per row), the integer product runs in int32 and is scaled back::

    y[m, o] = sum_i x[m, i] w[o, i]  ~  sx[m] * scale[o] * sum_i xq[m, i] q[o, i]

Why W8A8 and not int8 weights with float activations: XLA:CPU (jax 0.10) has no fused
dequantizing matmul; ``dot(x, q.astype(f32))`` converts the whole weight on every call (~10x
slower than float32). Its int8 x int8 -> int32 product with two or more rows runs in YNNPACK at
the memory bandwidth (a quarter of float32's bytes), while a one-row int8 product falls to a slow
kernel, so one row is padded to two (`experiments/probe_int8.py`, ``probe_int8.md``). Other
platforms get weight-only int8 (``x @ q.T * scale``, which GPU/TPU compilers fuse).

Worked example (one row, two outputs)::

    w = [[0.5, -1.0], [0.01, 0.02]]  ->  scale = [1/127, 0.02/127]
                                          q = [[64, -127], [64, 127]]
    x = [2.0, 1.0]  ->  sx = 2/127, xq = [127, 64]
    xq @ q.T = [127*64 - 64*127, 127*64 + 64*127] = [0, 16256]
    y ~ sx * scale * (xq @ q.T) = [0.0, 2/127 * 0.02/127 * 16256] = [0.0, 0.0403]   (exact: [0.0, 0.04])

Use: ``generate(..., draft_quant="int8")`` (`mirror_jax.engine.api`), or `quantize_params` on a
draft's `ModelParams` and pass ``draft=(cfg, params)``. The target is never quantized.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from mirror_jax.layout import plain_weight

QUANT_MODES = ("none", "int8")


class QuantError(ValueError):
    """An unknown quantization mode, or a quantization that cannot apply."""


@struct.dataclass
class Int8Weight:
    """A weight stored ``[out, in]`` as int8 rows with one float32 scale each (``w ~ q * scale[:, None]``)."""

    q: jax.Array  # [out, in] int8
    scale: jax.Array  # [out] float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale[:, None]).astype(dtype)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-row int8 quantization of x [M, K] (weight rows or activation rows):
    (q int8 [M, K], scale float32 [M, 1]) with ``x ~ q * scale``; an all-zero row gets scale 1."""
    xf = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1, keepdims=True)  # [M, 1]
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8), scale


def quantize_int8(w: jax.Array) -> Int8Weight:
    """Symmetric per-row int8 quantization of a weight ``[out, in]`` (`quantize_rows`)."""
    q, scale = quantize_rows(w)
    return Int8Weight(q=q, scale=scale[:, 0])


_quantize_int8_jit = jax.jit(quantize_int8)


def take_rows(w, ids):
    """Rows `ids` of a weight ``[out, in]``, float or `Int8Weight` (its rows keep their own scales, so
    cutting a quantized head equals quantizing the cut one)."""
    if isinstance(w, Int8Weight):
        return Int8Weight(q=jnp.take(w.q, ids, axis=0), scale=jnp.take(w.scale, ids, axis=0))
    return jnp.take(w, ids, axis=0)


def is_quantized(w) -> bool:
    return isinstance(w, Int8Weight)


def dense_int8(x2: jax.Array, w: Int8Weight, out_dtype=None) -> jax.Array:
    """[M, in] x int8 [out, in] -> [M, out] (`out_dtype`, default x's dtype); see the module docstring."""
    out_dtype = out_dtype or x2.dtype
    return lax.platform_dependent(x2, w.q, w.scale, cpu=partial(_w8a8, out_dtype=out_dtype),
                                  default=partial(_w8, out_dtype=out_dtype))


def _w8(x2, q, scale, *, out_dtype):
    """Weight-only int8: the convert is fused into the product by accelerator compilers."""
    y = jnp.matmul(x2, q.astype(x2.dtype).T, preferred_element_type=jnp.float32)
    return (y * scale).astype(out_dtype)


def _w8a8(x2, q, scale, *, out_dtype):
    """int8 x int8 -> int32 with per-row activation scales; one row padded to two (XLA:CPU's fast
    int8 kernel needs M >= 2)."""
    m = x2.shape[0]
    xq, sx = quantize_rows(x2)  # [M, in] int8, [M, 1]
    if m == 1:
        xq = jnp.concatenate([xq, xq])
    acc = lax.dot_general(xq, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)[:m]  # [M, out]
    return (acc.astype(jnp.float32) * sx * scale).astype(out_dtype)


def quantize_params(params, mode: str = "int8"):
    """A draft's `ModelParams` with its matrices (qkv, o, gate_up, down; the LM head) in `mode`.

    The embedding stays float (a step reads one row of it); a tied LM head becomes its own int8
    copy (a quarter of the float bytes; with a reduced head only its rows). ``mode="none"``
    returns `params` unchanged. Biases and norms stay float."""
    if check_mode(mode) == "none":
        return params
    return params.replace(layers=quantize_layers(params.layers, mode), lm_head=quantize_weight(params.lm_head, mode))


def quantize_layers(layers, mode: str = "int8") -> tuple:
    """`LayerParams` with their four matrices in `mode` (an SS draft's merged stream layers too)."""
    q = lambda w: quantize_weight(w, mode)
    return tuple(lp.replace(w_qkv=q(lp.w_qkv), w_o=q(lp.w_o), w_gate_up=q(lp.w_gate_up), w_down=q(lp.w_down))
                 for lp in layers)


def quantize_weight(w, mode: str = "int8"):
    """One weight ``[out, in]`` in `mode` (already quantized, or "none": unchanged)."""
    # a bfloat16 CPU layout (`mirror_jax.layout`) quantizes as its [out, in] matrix
    return w if check_mode(mode) == "none" or is_quantized(w) else _quantize_int8_jit(plain_weight(w))


def check_mode(mode) -> str:
    if mode not in QUANT_MODES:
        raise QuantError(f"draft_quant must be one of {QUANT_MODES}, got {mode!r}")
    return mode


def params_quantized(params) -> bool:
    """Whether any matrix of `params` is quantized."""
    return any(is_quantized(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized))
