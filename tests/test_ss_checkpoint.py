"""Orbax save/restore of SS adapters: bit-exact, atomic, clear errors."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax.config import ModelConfig
from mirror_jax.files import CHECKPOINTS_ENV, CheckpointsNotFoundError, checkpoint_search_path, checkpoints_dir
from mirror_jax.params import init_random
from mirror_jax.ss.checkpoint import (
    DEFAULT_ADAPTER_NAME,
    CheckpointCorruptedError,
    CheckpointMismatchError,
    default_adapter_dirs,
    load_default_ss_adapter,
    read_metadata,
    restore_ss_checkpoint,
    save_ss_checkpoint,
)
from mirror_jax.ss.model import SSConfig, init_ss_params
from mirror_jax.testing import tiny_config

CFG = tiny_config(vocab_size=40, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
PARAMS = init_random(CFG, seed=0)


def _ssp(sscfg, seed=0):
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=seed)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), ssp)


@pytest.mark.parametrize("rank", [4, 0])
def test_roundtrip_bit_exact(tmp_path, rank):
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=rank)
    ssp = _ssp(sscfg)
    d = save_ss_checkpoint(tmp_path / "ck", CFG, PARAMS, sscfg, ssp, {"steps": 7, "data": "unit test"})
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp dirs left behind
    got_cfg, got, meta = restore_ss_checkpoint(d, CFG, PARAMS)
    assert got_cfg == sscfg and meta["steps"] == 7
    for a, b in zip(jax.tree_util.tree_leaves(ssp), jax.tree_util.tree_leaves(got), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(ssp) == jax.tree_util.tree_structure(got)
    # Overwriting an existing checkpoint works and replaces it.
    ssp2 = _ssp(sscfg, seed=5)
    save_ss_checkpoint(d, CFG, PARAMS, sscfg, ssp2, {"steps": 9})
    _, got2, meta2 = restore_ss_checkpoint(d, CFG, PARAMS, sscfg)
    assert meta2["steps"] == 9
    np.testing.assert_array_equal(np.asarray(got2.stream_embed), np.asarray(ssp2.stream_embed))


def test_mismatch_errors(tmp_path):
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    d = save_ss_checkpoint(tmp_path / "ck", CFG, PARAMS, sscfg, _ssp(sscfg))
    other = init_random(CFG, seed=1)
    with pytest.raises(CheckpointMismatchError, match="weights differ"):
        restore_ss_checkpoint(d, CFG, other)
    with pytest.raises(CheckpointMismatchError, match="num_streams"):
        restore_ss_checkpoint(d, CFG, PARAMS, SSConfig(num_streams=3, num_msa_layers=1, lora_rank=2))
    cfg2 = ModelConfig(**{**CFG.__dict__, "vocab_size": 41})
    with pytest.raises(CheckpointMismatchError, match="vocab_size"):
        restore_ss_checkpoint(d, cfg2, init_random(cfg2))


def test_corruption_errors(tmp_path):
    sscfg = SSConfig(num_streams=1, num_msa_layers=1, lora_rank=2)
    d = save_ss_checkpoint(tmp_path / "ck", CFG, PARAMS, sscfg, _ssp(sscfg))
    files = sorted(read_metadata(d)["files"], key=lambda r: -(d / r).stat().st_size)
    biggest = d / files[0]
    data = biggest.read_bytes()
    biggest.write_bytes(data[: len(data) // 2])  # truncate
    with pytest.raises(CheckpointCorruptedError, match="corrupted"):
        restore_ss_checkpoint(d, CFG, PARAMS)
    biggest.unlink()
    with pytest.raises(CheckpointCorruptedError, match="missing"):
        restore_ss_checkpoint(d, CFG, PARAMS)
    (d / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointCorruptedError, match="JSON"):
        restore_ss_checkpoint(d, CFG, PARAMS)
    with pytest.raises(CheckpointCorruptedError, match="does not exist"):
        restore_ss_checkpoint(tmp_path / "nope", CFG, PARAMS)


def test_load_default_adapter(tmp_path, monkeypatch):
    """The default adapter is looked up in a checkpoints directory (argument, $MIRROR_JAX_CHECKPOINTS,
    the checkout, ./checkpoints) and only returned for the model it was trained for."""
    class Draft:
        cfg, params = CFG, PARAMS

    monkeypatch.chdir(tmp_path)  # no ./checkpoints here
    monkeypatch.delenv(CHECKPOINTS_ENV, raising=False)
    assert load_default_ss_adapter(Draft, tmp_path / "absent") is None
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    ssp = _ssp(sscfg)
    save_ss_checkpoint(tmp_path / "ck" / DEFAULT_ADAPTER_NAME, CFG, PARAMS, sscfg, ssp)
    got = load_default_ss_adapter(Draft, tmp_path / "ck")
    assert got is not None and got[0] == sscfg and got[2]["directory"] == str(tmp_path / "ck" / DEFAULT_ADAPTER_NAME)
    np.testing.assert_array_equal(np.asarray(got[1].stream_embed), np.asarray(ssp.stream_embed))
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "ck"))
    assert default_adapter_dirs()[0] == tmp_path / "ck" / DEFAULT_ADAPTER_NAME
    assert load_default_ss_adapter(Draft) is not None

    class OtherDraft:
        cfg, params = CFG, init_random(CFG, seed=3)

    assert load_default_ss_adapter(OtherDraft, tmp_path / "ck") is None
    assert Path(tmp_path / "ck" / DEFAULT_ADAPTER_NAME / "metadata.json").is_file()


def test_checkpoints_dir_lookup_and_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CHECKPOINTS_ENV, raising=False)
    searched = checkpoint_search_path()
    assert searched[-1] == tmp_path / "checkpoints"
    if not any(p.is_dir() for p in searched):  # a non-editable install: nothing to find
        with pytest.raises(CheckpointsNotFoundError, match=CHECKPOINTS_ENV):
            checkpoints_dir()
    with pytest.raises(CheckpointsNotFoundError, match="nowhere"):
        checkpoints_dir(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    assert checkpoints_dir() == tmp_path / "checkpoints"


def test_format_1_checkpoints_still_load(tmp_path):
    """Checkpoints written while the base weights were stored [in, out] (format 1) carry a
    fingerprint of that layout; they load against the same model in today's [out, in] layout, and
    a different model is still refused."""
    import json

    from mirror_jax.ss.checkpoint import base_fingerprint

    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    ssp = _ssp(sscfg)
    d = save_ss_checkpoint(tmp_path / "old", CFG, PARAMS, sscfg, ssp)
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["format"] == 2 and meta["base_fingerprint"] == base_fingerprint(CFG, PARAMS)
    legacy = base_fingerprint(CFG, PARAMS, version=1)
    assert legacy != meta["base_fingerprint"]
    # The format-1 fingerprint is the one of the transposed matrices, sampled the old way.
    old_layout = PARAMS.replace(
        layers=tuple(lp.replace(w_qkv=lp.w_qkv.T, w_o=lp.w_o.T, w_gate_up=lp.w_gate_up.T, w_down=lp.w_down.T)
                     for lp in PARAMS.layers), lm_head=PARAMS.lm_head.T)
    assert legacy == base_fingerprint(CFG, old_layout)
    (d / "metadata.json").write_text(json.dumps({**meta, "format": 1, "base_fingerprint": legacy}))
    got_cfg, got, _ = restore_ss_checkpoint(d, CFG, PARAMS)
    np.testing.assert_array_equal(np.asarray(got.stream_embed), np.asarray(ssp.stream_embed))
    with pytest.raises(CheckpointMismatchError, match="fingerprint"):
        restore_ss_checkpoint(d, CFG, init_random(CFG, seed=5))


def test_stream_vocab_roundtrips_and_older_checkpoints_mean_the_whole_vocabulary(tmp_path):
    """SSConfig.stream_vocab is saved with the adapter; metadata written before the field existed
    loads as 0 (the whole vocabulary) and still matches an explicit SSConfig without it."""
    import json

    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2, stream_vocab=30)
    d = save_ss_checkpoint(tmp_path / "ck", CFG, PARAMS, sscfg, _ssp(sscfg))
    assert restore_ss_checkpoint(d, CFG, PARAMS)[0] == sscfg
    with pytest.raises(CheckpointMismatchError, match="stream_vocab"):
        restore_ss_checkpoint(d, CFG, PARAMS, SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2))
    meta = json.loads((d / "metadata.json").read_text())
    del meta["ss_config"]["stream_vocab"]
    (d / "metadata.json").write_text(json.dumps(meta))
    old = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    assert restore_ss_checkpoint(d, CFG, PARAMS)[0] == old
    assert restore_ss_checkpoint(d, CFG, PARAMS, old)[0] == old


def test_stream_ids_are_saved_with_the_adapter(tmp_path):
    """A frequency-ranked stream vocabulary (SSParams.stream_ids, int32) round-trips bit-exactly
    and is what `ss_draft` restricts the streams' head to."""
    from mirror_jax.ss.rollout import ss_draft

    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2, stream_vocab=5)
    ids = np.array([0, 3, 7, 11, 30, 31], np.int32)
    ssp = _ssp(sscfg).replace(stream_ids=ids)
    d = save_ss_checkpoint(tmp_path / "ck", CFG, PARAMS, sscfg, ssp)
    got_cfg, got, meta = restore_ss_checkpoint(d, CFG, PARAMS)
    assert got_cfg == sscfg and meta["leaves"]["stream_ids"] == [[6], "int32"]
    np.testing.assert_array_equal(np.asarray(got.stream_ids), ids)
    drf = ss_draft(CFG, got_cfg, PARAMS, got)
    np.testing.assert_array_equal(np.asarray(drf.stream_ids), ids)
    np.testing.assert_array_equal(np.asarray(drf.stream_lm_head), np.asarray(PARAMS.lm_head)[ids])
