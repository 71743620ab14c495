"""bfloat16 weights on XLA:CPU: the product forms that stream them at the memory bandwidth.

XLA:CPU (jax 0.10) has three bfloat16 kernels that matter here (``experiments/probe_bf16.py``,
``experiments/results/probe_bf16.md``, the 1.5B target's shapes, ms per product):

* **one row**, ``x @ w.T`` with a float32 result: XLA's own matrix-vector kernel, at ~35 GB/s of
  bfloat16 bytes, about twice float32's speed for the same matrix (gate_up 1.8 vs 3.6 ms) -- but
  only while the contraction is short: with more than ~2-4k input features (the MLP's down
  projection, K = 8960) it falls to a path that converts the whole weight on each call (~1 GB/s,
  23 ms). So such a weight is stored split along its input features, ``[C, out, K/C]`` with
  ``K/C <= SPLIT_K`` (`SplitKWeight`), and one row sums C short products (0.8 ms for down).
* **2 to ~200 rows**, the ``[out, M]`` product ``dot_general(w, x)`` with a float32 result, kept
  from fusing with its transpose (as float32's `mirror_jax.model._dense_f32_cpu`): ~15-18 GB/s,
  flat from 2 to 16 rows, so a verification window costs about what float32's does for half the
  memory. (Left to choose its own result type, a bfloat16 product with two or more rows ran at
  ~1 GB/s in every form: that was the "bfloat16 is 4x slower on CPU" of earlier runs.) A split
  weight takes one batched product over its chunks.
* **many rows** (a prefill), the plain ``[M, out]`` product: about twice float32's speed.

The one-row and the many-row kernels differ from the window kernel, so in bfloat16 a row's logits
are not bit-identical whatever the row count, and sd/mirror can differ from ar where two tokens
nearly tie (float32 keeps that promise; see the README's dtype paragraph for the measured rate).

Worked example (K = 8960, SPLIT_K = 2048 -> C = 5 chunks of 1792)::

    w [1536, 8960]  ->  chunks [5, 1536, 1792]      (chunks[c] = w[:, 1792 c : 1792 (c + 1)])
    x [1, 8960]:  y = sum_c x[:, 1792 c : 1792 (c + 1)] @ chunks[c].T     -> [1, 1536]

Only layers' matrices are split (an LM head or an embedding has K = hidden size). The loaders store
weights through `backend_layout` (`cpu_layout` when the default backend is CPU); code that needs the
plain ``[out, in]`` matrix (int8 quantization, LoRA merges, sharding, fingerprints) calls
`plain_weight` / `plain_params`.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

SPLIT_K = 2048  # longest contraction XLA:CPU's one-row bfloat16 kernel runs fast (2240 yes, 4480 no)
SPLIT_MANY_ROWS = 32  # from this many rows a split weight's per-chunk products beat the batched one
MANY_ROWS = 256  # from this many rows the plain [M, out] product (a prefill)
LAYER_MATRICES = ("w_qkv", "w_o", "w_gate_up", "w_down")
SIMD_PREFIXES = ("avx", "amx", "fma", "f16c")  # the flags that decide XLA:CPU's kernels (bfloat16 above all)
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 arithmetic: XLA:CPU's multi-row bf16 forms keep up


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The host CPU's vector-ISA flags (avx2, avx512_bf16, amx_bf16, ...), sorted; [] where unknown."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(SIMD_PREFIXES))
    except OSError:
        pass
    return []


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host CPU's model name ("AMD EPYC 7B13"); `platform.processor()` or "unknown" where /proc/cpuinfo
    has none."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def slow_bf16_windows() -> bool:
    """True where the host CPU is known to lack native bfloat16 arithmetic (no avx512_bf16 or
    amx_bf16 flag): there XLA:CPU's bfloat16 products of 2+ rows (sd/mirror verification windows)
    run slower than float32's (an AVX2 EPYC: an 8-token target forward 432 vs 286 ms,
    ``experiments/results/bench_decode.md``). False when the flags cannot be read."""
    flags = cpu_flags()
    return bool(flags) and not any(f in flags for f in FAST_BF16_FLAGS)


@struct.dataclass
class SplitKWeight:
    """A weight ``[out, in]`` stored as C contiguous chunks of its input features, ``[C, out, in/C]``."""

    chunks: jax.Array  # [C, out, K/C]

    @property
    def shape(self) -> tuple[int, int]:
        c, out, kc = self.chunks.shape
        return (out, c * kc)

    @property
    def dtype(self):
        return self.chunks.dtype

    def plain(self) -> jax.Array:
        """The ``[out, in]`` matrix."""
        c, out, kc = self.chunks.shape
        return self.chunks.transpose(1, 0, 2).reshape(out, c * kc)


def num_chunks(k: int, max_chunk: int = SPLIT_K) -> int:
    """The fewest chunks C dividing k with k / C <= max_chunk (k itself if no divisor fits)."""
    for c in range(-(-k // max_chunk), k + 1):
        if k % c == 0:
            return c
    return k


def split_k(w: jax.Array, max_chunk: int = SPLIT_K) -> SplitKWeight:
    """``[out, in]`` -> `SplitKWeight` with chunks of at most `max_chunk` input features."""
    out, k = w.shape
    c = num_chunks(k, max_chunk)
    return SplitKWeight(chunks=w.reshape(out, c, k // c).transpose(1, 0, 2))


def plain_weight(w):
    """The plain ``[out, in]`` array of a weight (a `SplitKWeight` joined; anything else unchanged)."""
    return w.plain() if isinstance(w, SplitKWeight) else w


def wants_split(w, max_chunk: int = SPLIT_K) -> bool:
    """A plain bfloat16 matrix whose contraction is too long for the one-row kernel."""
    return (isinstance(w, jax.Array) and w.ndim == 2 and w.dtype == jnp.bfloat16 and w.shape[1] > max_chunk)


def cpu_layout(params):
    """`ModelParams` with every layer's bfloat16 matrix of more than `SPLIT_K` inputs split
    (`split_k`); float32 and int8 weights, norms, embedding and head unchanged."""
    def layer(lp):
        return lp.replace(**{n: split_k(getattr(lp, n)) for n in LAYER_MATRICES if wants_split(getattr(lp, n))})

    return params.replace(layers=tuple(layer(lp) for lp in params.layers))


def backend_layout(params):
    """`params` as the loaders store them for the default backend: `cpu_layout` on CPU, else unchanged."""
    return cpu_layout(params) if jax.default_backend() == "cpu" else params


def plain_layer(lp):
    """A `LayerParams` with its matrices as plain ``[out, in]`` arrays (split ones joined back)."""
    return lp.replace(**{n: plain_weight(getattr(lp, n)) for n in LAYER_MATRICES})


def plain_params(params):
    """`ModelParams` with every `SplitKWeight` joined back into its ``[out, in]`` matrix."""
    return params.replace(layers=tuple(plain_layer(lp) for lp in params.layers))


def like_layer(ref, lp):
    """`lp`'s matrices (plain) in `ref`'s layout (split where `ref`'s are)."""
    return lp.replace(**{n: like(getattr(ref, n), getattr(lp, n)) for n in LAYER_MATRICES})


def like(w_ref, w: jax.Array):
    """`w` ([out, in]) in the layout of `w_ref` (split the same way if `w_ref` is split)."""
    if isinstance(w_ref, SplitKWeight):
        return SplitKWeight(chunks=w.reshape(w.shape[0], w_ref.chunks.shape[0], -1).transpose(1, 0, 2))
    return w


def _xw(x2: jax.Array, w: jax.Array) -> jax.Array:
    """[M, in] x [out, in] -> [M, out] float32. Written ``x @ w.T``: for one row the same product as
    ``dot_general(x, w)`` contracting both dim 1 reaches a ~20x slower kernel (``probe_bf16.md``)."""
    return jnp.matmul(x2, w.T, preferred_element_type=jnp.float32)


def _wx(x2: jax.Array, w: jax.Array) -> jax.Array:
    """[M, in] x [out, in] -> [M, out] float32 as the [out, M] product, kept from fusing with the transpose."""
    return lax.optimization_barrier(lax.dot_general(w, x2, (((1,), (1,)), ((), ())),
                                                    preferred_element_type=jnp.float32)).T


def dense_bf16_cpu(x2: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """[M, in] x bfloat16 [out, in] -> [M, out] in the fast form for M rows (module docstring)."""
    m = x2.shape[0]
    x2 = x2.astype(w.dtype)
    y = _xw(x2, w) if m == 1 or m >= MANY_ROWS else _wx(x2, w)
    return y.astype(out_dtype or w.dtype)


def dense_split_cpu(x2: jax.Array, w: SplitKWeight, out_dtype=None) -> jax.Array:
    """[M, in] x `SplitKWeight` -> [M, out]: one row and many rows sum the chunks' products (each
    kept apart, or XLA joins them back into the slow long product); a window takes one batched
    product over the chunks."""
    c, out, kc = w.chunks.shape
    m = x2.shape[0]
    x2 = x2.astype(w.dtype)
    if m == 1 or m >= SPLIT_MANY_ROWS:
        parts = [lax.optimization_barrier(_xw(x2[:, i * kc : (i + 1) * kc], w.chunks[i])) for i in range(c)]
        y = sum(parts[1:], parts[0])
    else:
        x3 = x2.reshape(m, c, kc).transpose(1, 0, 2)  # [C, M, Kc]
        dims = (((2,), (2,)), ((0,), (0,)))
        y3 = lax.dot_general(w.chunks, x3, dims, preferred_element_type=jnp.float32)  # [C, out, M]
        y = lax.optimization_barrier(y3).sum(0).T
    return y.astype(out_dtype or w.dtype)


def dense_split(x2: jax.Array, w: SplitKWeight, out_dtype=None) -> jax.Array:
    """[M, in] x `SplitKWeight` on any platform (other platforms: one einsum over the chunks)."""
    def other(x2, chunks):
        c, out, kc = chunks.shape
        y = jnp.einsum("mck,cok->mo", x2.reshape(x2.shape[0], c, kc), chunks, preferred_element_type=jnp.float32)
        return y.astype(out_dtype or chunks.dtype)

    return lax.platform_dependent(x2, w.chunks, cpu=lambda x2, ch: dense_split_cpu(x2, SplitKWeight(ch), out_dtype),
                                  default=other)
