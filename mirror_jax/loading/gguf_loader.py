"""Load a GGUF file (llama.cpp format) into a `LoadedModel`, without torch.

* Config: read from the ``{arch}.*`` metadata (``qwen2``, ``llama``, ``qwen3``).
* Weights: ``gguf.GGUFReader`` + ``gguf.quants.dequantize`` (vectorised numpy) to float32. GGUF lists
  dimensions innermost-first, so a tensor is reshaped to ``reversed(tensor.shape)`` (the PyTorch
  ``[out, in]`` layout), then mapped with the strict key map (`keymap.build_params`).
* llama.cpp permutes the rows of ``attn_q``/``attn_k`` (weights and biases) for the ``llama``
  architecture (not qwen2/qwen3); that permutation is undone exactly as transformers does.
* Tokenizer: built from the ``tokenizer.ggml.*`` metadata with transformers' GGUF tokenizer converter
  (no torch needed), wrapped in a fast tokenizer; chat template from ``tokenizer.chat_template``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from mirror_jax.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedArchitectureError
from mirror_jax.loading.keymap import (
    LoadedModel,
    WeightLoadError,
    build_params,
    gguf_to_hf_name,
    llama_unpermute,
    quiet_transformers,
)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _plain_reader_class():
    """``gguf.GGUFReader`` reading through a plain ndarray view of its memory map.

    The reader slices its ``np.memmap`` once or more per metadata element, and each slice of a
    memmap runs ``memmap.__array_finalize__``/``__getitem__`` in Python: opening a Qwen2.5 GGUF
    (151k tokenizer strings, 151k merges) took ~9 s per file on a 2-core EPYC, ~3 s through a plain
    view of the same mapping (the same bytes, nothing copied; the fields and tensors are identical,
    `tests/test_loading_errors.py`). The map stays referenced as ``_mm``."""
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._mm = mapped
            self._plain = mapped.view(np.ndarray)

    return PlainViewReader


def _open(path: Path):
    if not path.is_file():
        raise WeightLoadError(f"GGUF file {path} does not exist; check the path (or run default_pair())")
    try:
        return _plain_reader_class()(str(path), "r")
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on bad files
        raise WeightLoadError(
            f"cannot read GGUF file {path}: {type(e).__name__}: {e}. The file is truncated or not a "
            "GGUF; delete it and re-create/re-download it"
        ) from e


def gguf_config(reader) -> ModelConfig:
    """A `ModelConfig` from the metadata of an open ``gguf.GGUFReader``."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; mirror_jax implements "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/Qwen2.5, Llama/SmolLM2, Qwen3)"
        )

    def req(key: str):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise WeightLoadError(f"GGUF metadata key {arch}.{key} is missing; the file is incomplete")
        return v

    names = {t.name for t in reader.tensors}
    hidden = int(req("embedding_length"))
    heads = int(req("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = _field(reader, f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = _field(reader, f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden // heads
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise WeightLoadError("GGUF has no token_embd.weight tensor; the file is incomplete")
        vocab = int(emb.shape[-1])
    scaling = None
    stype = _field(reader, f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in names:
        raise UnsupportedArchitectureError(
            "this GGUF carries per-frequency RoPE factors (rope_freqs.weight, llama3-style scaling), "
            "which mirror_jax cannot read from a GGUF; load the Hugging Face checkpoint instead"
        )
    if stype in (None, "none"):
        pass
    elif stype == "linear":
        scaling = ("linear", float(req("rope.scaling.factor")))
    else:
        raise UnsupportedArchitectureError(f"GGUF RoPE scaling {stype!r} is not supported (none, linear)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=int(req("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        # stored as float32 in the file: 1e-6 reads back as 9.99999997e-07; round to 7 digits
        rms_norm_eps=float(f"{float(req('attention.layer_norm_rms_epsilon')):.7g}"),
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
        qk_norm=arch == "qwen3",
        tie_embeddings="output.weight" not in names,
        rope_scaling=scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 32768)),
    )


def gguf_tokenizer(reader) -> Any:
    """A transformers fast tokenizer built from the ``tokenizer.ggml.*`` metadata, or None if absent.

    Uses transformers' GGUF tokenizer converter (the same one ``AutoTokenizer(..., gguf_file=...)``
    uses) on metadata read with the ``gguf`` package, so torch is not needed."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None
    quiet_transformers()
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    groups = {
        group: {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict = {k: v for k, v in groups["tokenizer"].items() if v is not None}
    tok_config = {k: v for k, v in groups["tokenizer_config"].items() if v is not None}
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        tok_config[name] = tok_dict["tokens"][int(token_id)] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tok_dict)
    tok_config.update(extra)
    tok_config = {k: v for k, v in tok_config.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config)


def _tokenizer_and_template(reader, load_tokenizer: bool = True) -> tuple[Any, str | None]:
    tokenizer = gguf_tokenizer(reader) if load_tokenizer else None
    chat_template = _field(reader, "tokenizer.chat_template")
    if tokenizer is not None and chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer, chat_template


def load_gguf_tokenizer(path: str | os.PathLike) -> tuple[Any, str | None]:
    """``(tokenizer, chat_template)`` of a GGUF file without reading its weights (the tokenizer is
    None when the file has no ``tokenizer.ggml.*`` metadata). The same tokenizer `load_gguf` attaches.
    Raises `WeightLoadError` for a missing or unreadable file."""
    return _tokenizer_and_template(_open(Path(path).expanduser()))


def load_gguf(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    sha256: str | None = None,
    progress: bool = True,
    load_tokenizer: bool = True,
) -> LoadedModel:
    """Load a GGUF file (any quantisation the ``gguf`` package dequantises) into a `LoadedModel`.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the parameters on device (float32 by default; weights are dequantised to
            float32 on the host first).
        sha256: the file's known hash, recorded in the result; when None, a ``<path>.sha256`` sidecar
            written by `default_pair` is used if present (nothing is hashed here).
        progress: show a tqdm bar over tensors.
        load_tokenizer: build the tokenizer from the metadata (set False to skip it).

    Raises:
        WeightLoadError: missing/corrupt file, unknown or missing tensors, shape mismatch.
        UnsupportedArchitectureError: architecture other than qwen2/llama/qwen3, unsupported RoPE.
    """
    from gguf.quants import dequantize

    path = Path(path).expanduser()
    reader = _open(path)
    cfg = gguf_config(reader)

    tensors = {}
    unknown = []
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            unknown.append(t.name)
        else:
            tensors[hf] = t
    if unknown:
        raise WeightLoadError(
            f"GGUF {path} has tensors mirror_jax does not know: {', '.join(sorted(unknown)[:12])}; only "
            "plain Qwen2/Llama/Qwen3 decoders are supported"
        )
    shapes = {hf: tuple(int(d) for d in reversed(t.shape)) for hf, t in tensors.items()}

    def get(hf_name: str) -> np.ndarray:
        t = tensors[hf_name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise WeightLoadError(
                f"{path}: cannot dequantise tensor {t.name} ({t.tensor_type.name}): {e}; the file may be "
                "corrupt or use a quantisation the gguf package does not support"
            ) from e
        w = np.asarray(w, dtype=np.float32).reshape(shapes[hf_name])
        if cfg.arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            kv = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
            w = llama_unpermute(w, cfg.num_heads, kv)
        return w

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tensors), desc=f"loading {path.name}", unit="tensor")
    try:
        params = build_params(
            cfg, shapes, get, dtype=dtype, source=str(path), progress=bar.update if bar else None
        )
    finally:
        if bar is not None:
            bar.close()

    tokenizer, chat_template = _tokenizer_and_template(reader, load_tokenizer)
    if sha256 is None:
        side = path.with_name(path.name + ".sha256")
        if side.is_file():
            sha256 = side.read_text().split()[0] if side.read_text().strip() else None
    return LoadedModel(
        cfg=cfg,
        params=params,
        name=str(_field(reader, "general.name", path.stem)),
        source=str(path),
        sha256=sha256,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
