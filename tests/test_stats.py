"""Second-moment statistics: one pass, exact token budget, padding, cache, .npz import,
corpus loaders, and the ``stats`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from editdecay.cli import app
from editdecay.editing.corpus import Corpus
from editdecay.editing.stats import (
    LayerStats, StatsCache, StatsKey, effective_max_length, import_npz, key_width, layer_stats,
    plan_tokens, second_moments,
)
from editdecay.errors import DataError, EditdecayError
from editdecay.models import model_identity
from editdecay.models.arch import get_arch

from conftest import TINY_CONFIGS, make_tiny_model


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and spinning thread pools make them very
    slow on a busy 2-core machine; restored after the module."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def char_tok():
    """Character-level fast tokenizer with ids < 101 (the tiny models' vocabulary);
    pad = eos = "<eos>" (id 0), which also occurs as real text in the test corpus."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="module")
def corpus():
    docs = list(Corpus.offline_default().documents[:60])
    docs.insert(3, "A document with the pad token <eos> inside <eos> twice.")
    return Corpus.from_texts(docs, id="test-docs")


def manual_keys(model, tok, corpus, layer, n, max_length):
    """Keys of the first n tokens (documents chunked at max_length), one unpadded
    sequence per forward through the whole model, collected by a plain hook."""
    ids = []
    for doc in corpus:
        toks = tok(doc)["input_ids"]
        for i in range(0, len(toks), max_length):
            ids.append(toks[i:i + max_length])
    got, total = [], 0
    mod = model.get_submodule(get_arch(model).rewrite_module_name(layer))
    h = mod.register_forward_hook(lambda m, args, out: got.append(args[0][0]))
    try:
        with torch.no_grad():
            for seq in ids:
                if total >= n:
                    break
                model(input_ids=torch.tensor([seq]), use_cache=False)
                total += len(seq)
    finally:
        h.remove()
    return torch.cat(got)[:n].to(torch.float64)


def manual_c(model, tok, corpus, layer, n, max_length):
    k = manual_keys(model, tok, corpus, layer, n, max_length)
    assert k.shape[0] == n
    return k.T @ k / n


# --- the pass --------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "gpt_neox"])
def test_one_pass_equals_per_layer_and_manual(model_type, char_tok, corpus):
    # float64 model: differences come only from the accumulation, not from fp32 kernels
    model = make_tiny_model(model_type).double()
    n = 1237  # not a multiple of any chunk: the last chunk is cut
    both = second_moments(model, char_tok, [2, 0], corpus, tokens=n, batch_size=1, progress=False)
    assert list(both) == [0, 2]
    for layer in (0, 2):
        c = both[layer]
        assert c.dtype == torch.float64 and c.shape == (64, 64)
        alone = second_moments(model, char_tok, [layer], corpus, tokens=n, batch_size=1, progress=False)[layer]
        torch.testing.assert_close(c, alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c, manual_c(model, char_tok, corpus, layer, n, 64), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(both[0], both[2])


def test_padding_excluded_batch_size_invariant(char_tok, corpus):
    model = make_tiny_model("llama")
    c1 = second_moments(model, char_tok, [0, 2], corpus, tokens=2000, batch_size=1, progress=False)
    c4 = second_moments(model, char_tok, [0, 2], corpus, tokens=2000, batch_size=4, progress=False)
    for layer in (0, 2):
        torch.testing.assert_close(c4[layer], c1[layer], rtol=1e-5, atol=1e-9)


def test_higher_blocks_never_run(char_tok, corpus):
    model = make_tiny_model("gpt2")
    spec = get_arch(model)
    calls = {i: 0 for i in range(3)}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(spec.get_blocks(model))]
    final = []
    hooks.append(model.get_submodule(spec.final_norm).register_forward_pre_hook(lambda m, a: final.append(1)))
    model.train()
    try:
        res = layer_stats(model, char_tok, [0], corpus, tokens=500, batch_size=4, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] > 0 and calls[1] == 0 and calls[2] == 0 and not final
    assert res[0].count == 500
    assert model.training  # mode restored


def test_token_budget_default_and_exact(char_tok, corpus):
    model = make_tiny_model("qwen3")
    res = layer_stats(model, char_tok, 1, corpus, progress=False)
    assert res[1].count == 20 * key_width(model, 1) == 1280
    assert res[1].key.tokens == 1280
    res = layer_stats(model, char_tok, [1], corpus, token_multiple=3, progress=False)
    assert res[1].count == 192
    seqs = plan_tokens(char_tok, corpus, 64, 1001)
    assert sum(map(len, seqs)) == 1001 and max(map(len, seqs)) <= 64


def test_plan_repeats_bos_per_chunk():
    class BosTok:
        bos_token_id = 7

        def __call__(self, texts, verbose=True):
            return {"input_ids": [[7] + [10 + (ord(c) % 50) for c in t] for t in texts]}

    seqs = plan_tokens(BosTok(), Corpus.from_texts(["a" * 25, "b" * 5]), 10, 33)
    assert [len(s) for s in seqs] == [10, 10, 8, 5]  # 25 tokens -> 9 + 9 + 7, each after a BOS
    assert all(s[0] == 7 for s in seqs) and sum(map(len, seqs)) == 33


def test_max_length_capped_never_defaulted(char_tok, corpus):
    model = make_tiny_model("llama")  # max_position_embeddings = 64
    assert effective_max_length(model, 256) == 64
    assert effective_max_length(model, 16) == 16
    res = layer_stats(model, char_tok, [0], corpus, tokens=300, max_length=256, progress=False)
    assert res[0].key.max_length == 64
    with pytest.raises(EditdecayError, match="max_length"):
        effective_max_length(model, 1)


def test_corpus_exhaustion_is_an_error(char_tok):
    model = make_tiny_model("llama")
    small = Corpus.from_texts(["tiny text", "more"], id="small")
    with pytest.raises(DataError, match=r"only 13 tokens.*50 were requested"):
        second_moments(model, char_tok, [0], small, tokens=50, progress=False)
    with pytest.raises(DataError, match="external"):
        second_moments(model, char_tok, [0], Corpus.external("rome-wikipedia", "ab" * 32), tokens=5, progress=False)


def test_bad_layers(char_tok, corpus):
    model = make_tiny_model("llama")
    with pytest.raises(EditdecayError, match="out of range"):
        second_moments(model, char_tok, [3], corpus, tokens=10, progress=False)
    with pytest.raises(EditdecayError, match="no layers"):
        second_moments(model, char_tok, [], corpus, tokens=10, progress=False)


# --- cache -----------------------------------------------------------------------------

def _no_forward(*a, **k):
    raise AssertionError("the model ran although the stats were cached")


def test_cache_hit_skips_model_and_key_fields(char_tok, corpus, tmp_path, monkeypatch):
    from safetensors import safe_open

    model = make_tiny_model("gpt2")
    cache = StatsCache(tmp_path)
    first = layer_stats(model, char_tok, [0], corpus, tokens=700, cache=cache, progress=False)
    assert not first[0].cached and first[0].path.is_file() and first[0].path.suffix == ".safetensors"
    assert first[0].path.is_relative_to(tmp_path / "stats")
    with safe_open(str(first[0].path), framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("layer", "corpus_id", "tokens", "max_length", "dtype", "count")} == {
        "layer": "0", "corpus_id": "test-docs", "tokens": "700", "max_length": "64", "dtype": "float32", "count": "700"}
    assert meta["corpus_sha256"] == corpus.sha256 and meta["model"] == model_identity(model)

    # layer 2 missing: computed (in one pass), layer 0 loaded
    both = layer_stats(model, char_tok, [0, 2], corpus, tokens=700, cache=cache, progress=False)
    assert both[0].cached and not both[2].cached
    torch.testing.assert_close(both[0].mom2, first[0].mom2, rtol=0, atol=0)

    monkeypatch.setattr(model, "forward", _no_forward)
    hit = layer_stats(model, char_tok, [0, 2], corpus, tokens=700, cache=cache, progress=False)
    assert hit[0].cached and hit[2].cached
    torch.testing.assert_close(hit[2].mom2, both[2].mom2, rtol=0, atol=0)
    # every key field changes the entry: a miss runs the (broken) model
    for src, kw in ((corpus, dict(tokens=701)), (corpus, dict(tokens=700, max_length=32)),
                    (Corpus.from_texts(corpus.documents, id="other-id"), dict(tokens=700)),
                    (Corpus.from_texts(corpus.documents[1:], id="test-docs"), dict(tokens=700))):
        with pytest.raises(AssertionError, match="cached"):
            layer_stats(model, char_tok, [0], src, cache=cache, progress=False, **kw)
    paths = {cache.path(StatsKey("m", 0, "c", "s", t, 64, "float32")) for t in (1, 2)}
    assert len(paths) == 2


def test_cache_rejects_mismatching_entry(char_tok, corpus, tmp_path):
    model = make_tiny_model("llama")
    cache = StatsCache(tmp_path)
    res = layer_stats(model, char_tok, [1], corpus, tokens=300, cache=cache, progress=False)[1]
    res.path.write_bytes(b"garbage")
    again = layer_stats(model, char_tok, [1], corpus, tokens=300, cache=cache, progress=False)[1]
    assert not again.cached
    torch.testing.assert_close(again.mom2, res.mom2, rtol=0, atol=0)
    assert cache.load(res.key) is not None


# --- .npz import -----------------------------------------------------------------------

def _rome_npz(path, mom2_sum, count):
    """A file in the layout of ROME's util/runningstats.py (CombinedStat(mom2=SecondMoment()))."""
    np.savez(path, **{
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.count": np.array(count),
        "mom2.mom2": mom2_sum,
        "sample_size": np.array(100000),
    })


def test_import_npz_round_trip(char_tok, tmp_path, monkeypatch):
    model = make_tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 64, generator=g, dtype=torch.float64)
    path = tmp_path / "transformer.h.1.mlp.c_proj_float32_mom2_100000.npz"
    _rome_npz(path, (keys.T @ keys).numpy().astype(np.float32), 500)

    plain = import_npz(path)
    assert isinstance(plain, LayerStats) and plain.count == 500 and plain.mom2.dtype == torch.float64
    torch.testing.assert_close(plain.mom2, keys.T @ keys / 500, rtol=1e-6, atol=1e-6)

    cache = StatsCache(tmp_path / "cache")
    stored = import_npz(path, cache=cache, model=model, layer=1, corpus_id="rome-wikipedia", max_length=64)
    assert stored.path.is_file() and stored.key.tokens == 500
    monkeypatch.setattr(model, "forward", _no_forward)
    ext = Corpus.external(stored.key.corpus_id, stored.key.corpus_sha256)
    c = second_moments(model, char_tok, [1], ext, tokens=500, max_length=64, cache=cache, progress=False)[1]
    torch.testing.assert_close(c, plain.mom2, rtol=0, atol=0)

    with pytest.raises(DataError, match="d_k 64 but layer 1"):
        import_npz(path, cache=cache, model=_wide_model(), layer=1, max_length=64)
    with pytest.raises(EditdecayError, match="needs model, layer and max_length"):
        import_npz(path, cache=cache, model=model, layer=1)


def _wide_model():
    from transformers import AutoModelForCausalLM

    cfg = TINY_CONFIGS["llama"]()
    cfg.intermediate_size = 48
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_import_npz_errors(tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"mom2.mom2": np.array([{"a": 1}], dtype=object), "mom2.count": np.array(3)})
    with pytest.raises(DataError, match="pickle"):
        import_npz(pickled)
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, mean=np.zeros(3))
    with pytest.raises(DataError, match=r"nokeys\.npz: no second-moment.*'mom2\.mom2'.*found mean"):
        import_npz(nokeys)
    bare = tmp_path / "bare.npz"
    np.savez(bare, mom2=np.eye(3) * 4, count=np.array(2))
    torch.testing.assert_close(import_npz(bare).mom2, torch.eye(3, dtype=torch.float64) * 2)
    notnpz = tmp_path / "x.npz"
    notnpz.write_text("hello")
    with pytest.raises(DataError, match="x.npz"):
        import_npz(notnpz)
    badcount = tmp_path / "badcount.npz"
    np.savez(badcount, **{"mom2.mom2": np.eye(2), "mom2.count": np.array(0)})
    with pytest.raises(DataError, match="positive integer"):
        import_npz(badcount)
    with pytest.raises(DataError, match="does not exist"):
        import_npz(tmp_path / "missing.npz")


# --- corpora ---------------------------------------------------------------------------

def test_corpus_loaders_agree(tmp_path):
    docs = ["First document here.", "Second one, with \"quotes\".", "Third: ünïcode ✓"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(docs))
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in docs]))
    loaded = [Corpus.from_path(tmp_path / f) for f in ("a.txt", "a.jsonl", "a.json", "b.json")]
    for c in loaded:
        assert list(c) == docs and c.sha256 == loaded[0].sha256
    assert loaded[0].id == "file:a.txt"
    assert Corpus.from_texts(docs, id="x") == Corpus.from_texts(docs, id="x") != Corpus.from_texts(docs[:2], id="x")


def test_txt_paragraphs(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("Call me Ishmael. Some years ago,\nnever mind how long.\n\n  \nIt is a way I have\nof driving off the spleen.\n")
    assert list(Corpus.from_path(p)) == [
        "Call me Ishmael. Some years ago,\nnever mind how long.", "It is a way I have\nof driving off the spleen."]


@pytest.mark.parametrize("name,content,pattern", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"bad\.jsonl: line 2 is not valid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"nofield\.jsonl: line 3 has no field 'text'"),
    ("type.jsonl", '{"text": 5}\n', r"type\.jsonl: line 1 field 'text' is a int"),
    ("list.jsonl", '["a"]\n', r"list\.jsonl: line 1 is a list"),
    ("obj.json", '{"text": "x"}', r"obj\.json: top level is a dict"),
    ("rec.json", '["a", {"text": null}]', r"rec\.json: record 1 field 'text' is a NoneType"),
    ("num.json", '["a", 3]', r"num\.json: record 1 is a int"),
    ("broken.json", '["a",', r"broken\.json: not valid JSON"),
    ("empty.txt", "\n \n", r"empty\.txt: the corpus has no non-empty documents"),
    ("data.csv", "a,b", r"data\.csv: unsupported corpus format '\.csv'"),
])
def test_corpus_malformed(tmp_path, name, content, pattern):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=pattern) as e:
        Corpus.from_path(p)
    assert "\n" not in str(e.value)


def test_corpus_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Corpus.from_path(tmp_path / "nope.txt")


def test_offline_default_deterministic():
    c = Corpus.offline_default()
    assert c.id == f"stdlib-docstrings-py{sys.version_info.major}.{sys.version_info.minor}"
    assert c.n_chars > 100_000 and len(c) > 500 and len(set(c.documents)) == len(c)
    assert any("regular expression" in d for d in c)
    code = "from editdecay.editing.corpus import Corpus; c = Corpus.offline_default(); print(c.sha256, len(c))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.split() == [c.sha256, str(len(c))]


def test_from_hf_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when not installed
    with pytest.raises(EditdecayError, match="datasets"):
        Corpus.from_hf("wikitext", "wikitext-103-raw-v1")


# --- CLI (embedded model, one short run) -------------------------------------------------

def test_cli_stats_json(embedded, tmp_path, monkeypatch):
    from editdecay.cache import cache_root

    models = cache_root() / "models"
    (tmp_path / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("EDITDECAY_CACHE", str(tmp_path))
    runner = CliRunner()
    r = runner.invoke(app, ["stats", "--layers", "3,4", "--tokens", "2000", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"model", "corpus", "tokens", "max_length", "layers"}
    assert isinstance(doc["model"], str) and set(doc["corpus"]) == {"id", "sha256"}
    assert doc["corpus"]["id"].startswith("stdlib-docstrings-py") and len(doc["corpus"]["sha256"]) == 64
    assert doc["tokens"] == 2000 and doc["max_length"] == 256
    assert [row["layer"] for row in doc["layers"]] == [3, 4]
    for row in doc["layers"]:
        assert set(row) == {"layer", "d_k", "count", "trace", "cached", "path"}
        assert row["d_k"] == 1536 and row["count"] == 2000 and row["trace"] > 0 and row["cached"] is False
        assert row["path"].startswith(str(tmp_path / "stats")) and os.path.isfile(row["path"])
    r2 = runner.invoke(app, ["stats", "--layers", "4", "-l", "3", "--tokens", "2000", "--json"])
    assert r2.exit_code == 0, r2.output
    doc2 = json.loads(r2.stdout)
    assert [row["cached"] for row in doc2["layers"]] == [True, True]
    assert [row["trace"] for row in doc2["layers"]] == [row["trace"] for row in doc["layers"]]
    r3 = runner.invoke(app, ["stats", "--layers", "x", "--tokens", "10"])
    assert r3.exit_code != 0
