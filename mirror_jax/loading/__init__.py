"""Weight loading: Hugging Face safetensors directories, GGUF files and the default model pair.

Public API::

    load_hf_dir(path, dtype=jnp.float32) -> LoadedModel
    load_gguf(path, dtype=jnp.float32, *, sha256=None, progress=True) -> LoadedModel
    load_gguf_tokenizer(path) -> (tokenizer, chat_template)  # no weights read
    default_pair(dtype=jnp.float32, cache_dir=None) -> (target, draft, tokenizer)
    assemble_default_files(cache_dir=None) -> (target_path, draft_path)
    check_same_tokenizer(tok_a, tok_b)  # raises TokenizerMismatchError

Errors: `WeightLoadError`, `MissingModelPackagesError`, `ChecksumError`, `TokenizerMismatchError`, and
`mirror_jax.config.UnsupportedArchitectureError` for model types other than qwen2/llama/qwen3.
"""

from mirror_jax.config import UnsupportedArchitectureError
from mirror_jax.loading.default_pair import (
    DRAFT_SPEC,
    TARGET_SPEC,
    ChecksumError,
    MissingModelPackagesError,
    PartSpec,
    TokenizerMismatchError,
    assemble_default_files,
    check_same_tokenizer,
    default_cache_dir,
    default_pair,
)
from mirror_jax.loading.gguf_loader import load_gguf, load_gguf_tokenizer
from mirror_jax.loading.hf import load_hf_dir
from mirror_jax.loading.keymap import LoadedModel, WeightLoadError

__all__ = [
    "DRAFT_SPEC",
    "TARGET_SPEC",
    "ChecksumError",
    "LoadedModel",
    "MissingModelPackagesError",
    "PartSpec",
    "TokenizerMismatchError",
    "UnsupportedArchitectureError",
    "WeightLoadError",
    "assemble_default_files",
    "check_same_tokenizer",
    "default_cache_dir",
    "default_pair",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_hf_dir",
]
