"""`mirror-jax generate` end to end on tiny HF directories (real loader, real tokenizer files): the
SS options reach `generate` and keep the output identical to ar; bad options end with ``error:`` and
exit status 2 before any model is loaded where no model is needed."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import mirror_jax.engine.api as api
from mirror_jax.cli import main
from mirror_jax.loading import load_hf_dir
from mirror_jax.ss.checkpoint import save_ss_checkpoint
from mirror_jax.ss.model import SSConfig, init_ss_params
from tests.helpers import make_tiny_hf_model

PROMPT = "t5 t9 t17 t33 t60 t61"


def _save_tokenizer(path, vocab_size=128):
    """A word-level tokenizer whose tokens t0..t{V-2} and <|endoftext|> (the special token the Qwen2
    tokenizer class adds, chosen from config.json) cover the tiny models' vocabulary (t1 BOS, t2 EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(
        str(path))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    target, _ = make_tiny_hf_model(root / "target", seed=0)
    draft, _ = make_tiny_hf_model(root / "draft", seed=1)
    for d in (target, draft):
        _save_tokenizer(d)
    loaded = load_hf_dir(draft, jnp.float32)
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=4)
    ss_dir = save_ss_checkpoint(root / "ss", loaded.cfg, loaded.params, sscfg,
                                init_ss_params(loaded.cfg, sscfg, loaded.params, seed=3), {"steps": 0})
    return {"target": str(target), "draft": str(draft), "ss": str(ss_dir)}


@pytest.fixture
def calls(monkeypatch):
    """The (kwargs, result) of every `generate` call the CLI makes (warm-up first, then the timed one)."""
    seen = []
    real = api.generate

    def recording(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append((kwargs, res))
        return res

    monkeypatch.setattr(api, "generate", recording)
    return seen


def _argv(dirs, *extra):
    return ["generate", "--prompt", PROMPT, "--raw", "--max-new-tokens", "12", "--target", dirs["target"],
            "--draft", dirs["draft"], *extra]


def test_ss_options_reach_generate_and_keep_ar_output(dirs, calls, capsys):
    assert main(_argv(dirs, "--method", "ar")) == 0
    ref = calls[-1][1].tokens
    assert main(_argv(dirs, "--method", "sd", "--gamma", "4", "--ss-adapter", dirs["ss"], "--ss-tail")) == 0
    kwargs, res = calls[-1]
    assert kwargs["ss_tail"] is True and kwargs["ss_adapter"][0].num_streams == 2
    assert res.stats["draft_kind"] == "ss" and res.stats["settings"]["ss_tail"] is True
    assert res.tokens == ref
    # sd warms up on the whole request (its compiles depend on the rounds it meets), ar on 8 tokens.
    assert calls[-2][1].tokens == ref and len(calls[0][1].tokens[0]) == 8
    out = capsys.readouterr().out
    assert "[sd] 12 tokens" in out and "tokens/round" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--method", "ar", "--ss-tail"), "use them with --method sd or mirror"),
        (("--method", "sd", "--ss-tail"), "needs a speculative-streaming draft"),
        (("--method", "sd", "--ss-adapter", "default"), "no committed SS adapter for this draft"),
        (("--method", "sd", "--ss-adapter", "/nonexistent/ss"), "/nonexistent/ss"),
        (("--method", "sd", "--gamma", "0"), "gamma"),
    ],
)
def test_bad_options_exit_2_with_the_reason(dirs, capsys, extra, message):
    assert main(_argv(dirs, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_settings_errors_come_before_the_model_load(capsys):
    """No model is read for a setting that needs none: the target path does not even exist."""
    argv = ["generate", "--prompt", "x", "--target", "/nonexistent/target"]
    assert main([*argv, "--method", "sd"]) == 2
    assert "needs --draft when --target is given" in capsys.readouterr().err
    assert main([*argv, "--method", "ar", "--ss-adapter", "default"]) == 2
    assert "use them with --method sd or mirror" in capsys.readouterr().err
