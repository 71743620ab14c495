"""Load a Hugging Face checkpoint directory (config.json + safetensors) into a `LoadedModel`.

Works offline on a local directory: ``config.json`` is read with ``transformers.AutoConfig``, the
weights from one ``model.safetensors`` or several shards (with or without
``model.safetensors.index.json``), the tokenizer with ``transformers.AutoTokenizer`` when its files
are present. bfloat16 tensors are read through the ``flax`` (JAX) framework of safetensors, other
dtypes through numpy; everything is converted on the host and put on device once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.loading.keymap import LoadedModel, WeightLoadError, build_params, quiet_transformers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise WeightLoadError(
                f"{index} is not a valid safetensors index ({e}); delete it or re-save the model"
            ) from e
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise WeightLoadError(
                f"{index} lists shard(s) that are not in {path}: {', '.join(absent)}; copy the missing "
                "shards or re-save the model"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise WeightLoadError(
            f"no *.safetensors weights in {path} (found: {found}); save the model with "
            "`model.save_pretrained(path, safe_serialization=True)` (PyTorch .bin files are not supported)"
        )
    return files


class _SafetensorsReader:
    """Shapes of every tensor across the shards, and lazy reads by name."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._error_type = SafetensorError
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="np") as st:
                    for k in st.keys():
                        sl = st.get_slice(k)
                        if k in self.shapes:
                            raise WeightLoadError(
                                f"tensor {k} appears in two shards ({self._where[k][0]}, {f})"
                            )
                        self.shapes[k] = tuple(sl.get_shape())
                        self._where[k] = (f, sl.get_dtype())
            except (SafetensorError, OSError) as e:
                raise self._corrupt(f, e) from e

    @staticmethod
    def _corrupt(f: Path, e: Exception) -> WeightLoadError:
        return WeightLoadError(
            f"cannot read safetensors file {f}: {e}. The file is truncated or corrupt; delete it and "
            "re-save or re-download the model"
        )

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        f, st_dtype = self._where[name]
        framework = "flax" if st_dtype.upper() in ("BF16", "F8_E4M3", "F8_E5M2") else "np"
        try:
            with safe_open(str(f), framework=framework) as st:
                arr = st.get_tensor(name)
        except (self._error_type, OSError) as e:
            raise self._corrupt(f, e) from e
        return np.asarray(arr, dtype=np.float32) if framework == "flax" else arr


def _hf_config(path: Path):
    quiet_transformers()
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightLoadError(
            f"{path} has no config.json; a Hugging Face model directory needs config.json next to its "
            "*.safetensors files (save it with `model.save_pretrained(path)`)"
        )
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except ValueError as e:
        raise WeightLoadError(f"{cfg_file} is not valid JSON ({e}); re-save the model config") from e
    # ModelConfig.from_hf raises UnsupportedArchitectureError with the list of supported types; check
    # first so an unknown model_type never reaches AutoConfig (which would raise its own ValueError).
    from mirror_jax.config import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError

    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{cfg_file}: model_type {model_type!r} is not supported; mirror_jax implements "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/Qwen2.5, Llama/SmolLM2, Qwen3)"
        )
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def load_tokenizer_dir(path: str | os.PathLike):
    """The fast tokenizer saved in a directory, or None if it holds no tokenizer files."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32, *, progress: bool = False) -> LoadedModel:
    """Load a local Hugging Face model directory (config.json + safetensors) into a `LoadedModel`.

    Args:
        path: directory written by ``save_pretrained`` (single or sharded safetensors).
        dtype: dtype of the parameters on device (float32 by default).
        progress: show a tqdm bar over tensors.

    Raises:
        WeightLoadError: missing directory/config/weights, corrupt file, key or shape mismatch.
        UnsupportedArchitectureError: the config's model_type is not qwen2/llama/qwen3.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WeightLoadError(
            f"model directory {path} does not exist (or is not a directory); pass the folder that holds "
            "config.json and the *.safetensors files"
        )
    hf_cfg = _hf_config(path)
    cfg = ModelConfig.from_hf(hf_cfg)
    reader = _SafetensorsReader(_safetensors_files(path))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(reader.shapes), desc=f"loading {path.name}", unit="tensor")
    try:
        params = build_params(
            cfg,
            reader.shapes,
            reader.get,
            dtype=dtype,
            source=str(path),
            progress=bar.update if bar else None,
        )
    finally:
        if bar is not None:
            bar.close()
    tokenizer = load_tokenizer_dir(path)
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return LoadedModel(
        cfg=cfg,
        params=params,
        name=path.name,
        source=str(path),
        sha256=None,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
