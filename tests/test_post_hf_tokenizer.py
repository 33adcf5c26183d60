"""The exported tokenizer: ``AutoTokenizer`` on it encodes real held-out documents to the run's
sentencepiece ids (and to the ids stored in the shards), decodes them back, and carries
``<eod>`` as EOS and ``<pad>`` as pad; for the unigram model prep trains and for BPE."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.cli import main as prep_main
from data_prep.corpus import load_corpus, split_corpus
from data_prep.recipe import TokenizerConfig, recipe_from_dict
from data_prep.tokenizer import train_tokenizer
from megatron_sgtm.post import hf_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Unigram with the demo's vocabulary size; a subset of documents keeps the prep to seconds.
PREP = ["max_docs=600", "split.max_test_docs=60", "tokenizer.max_train_bytes=300000",
        "--no-progress", "--workers", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real prep output, its held-out raw texts (50 forget + 50 retain documents) and HF
    tokenizer directories for its unigram model and for a BPE model trained on the same text."""
    root = tmp_path_factory.mktemp("hf_tok")
    shards = root / "shards"
    assert prep_main(["--recipe", str(ROOT / "configs/data/bilingual.yaml"), "--out", str(shards),
                      *PREP]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    recipe = recipe_from_dict(manifest["recipe"])
    splits = split_corpus(load_corpus(recipe), recipe)
    held_out = {s: splits[s].texts[:50] for s in ("test_forget", "test_retain")}
    bpe = train_tokenizer(splits["train"].texts, TokenizerConfig(
        kind="bpe", vocab_size=1500, max_train_bytes=300000))
    (root / "bpe.model").write_bytes(bpe.model_bytes)
    # The test fixtures' small model has no byte fallback: unknown characters become <unk>.
    from megatron_sgtm.data.testing import sample_tokenizer

    (root / "nofallback.model").write_bytes(sample_tokenizer())
    models = {"unigram": shards / "tokenizer.model", "bpe": root / "bpe.model",
              "no_byte_fallback": root / "nofallback.model"}
    dirs = {}
    for kind, model in models.items():
        dirs[kind] = root / f"hf_{kind}"
        dirs[kind].mkdir()
        hf_tokenizer.write_hf_tokenizer(model, dirs[kind], model_max_length=64)
    return {"shards": shards, "manifest": manifest, "held_out": held_out, "dirs": dirs,
            "models": models}


def _tools(corpus, kind):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    return (AutoTokenizer.from_pretrained(str(corpus["dirs"][kind])),
            spm.SentencePieceProcessor(model_file=str(corpus["models"][kind])))


@pytest.mark.parametrize("kind", ["unigram", "bpe", "no_byte_fallback"])
def test_ids_equal_sentencepiece_on_100_held_out_documents(corpus, kind):
    hf, sp = _tools(corpus, kind)
    docs = corpus["held_out"]["test_forget"] + corpus["held_out"]["test_retain"]
    assert len(docs) == 100
    for text in docs:
        ids = sp.encode(text)
        assert hf(text)["input_ids"] == ids, text[:80]
        if sp.unk_id() not in ids:  # sentencepiece shows <unk> as " ⁇ ", transformers drops it
            assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids)
    assert type(hf).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")


def test_ids_equal_the_shards_prep_wrote(corpus):
    """The same documents, as `sgtm prep` tokenized them into the held-out shards."""
    from megatron_sgtm.data import open_split

    hf, _ = _tools(corpus, "unigram")
    eod = corpus["manifest"]["tokenizer"]["eod_id"]
    for split, texts in corpus["held_out"].items():
        shard = open_split(corpus["shards"], split)
        for i, text in enumerate(texts):
            assert hf(text)["input_ids"] + [eod] == shard.get_tokens(i).tolist()


@pytest.mark.parametrize("kind", ["unigram", "bpe", "no_byte_fallback"])
def test_whitespace_unicode_and_literal_reserved_pieces(corpus, kind):
    hf, sp = _tools(corpus, kind)
    assert hf_tokenizer.compare(corpus["dirs"][kind], corpus["models"][kind],
                                hf_tokenizer.PROBES) == []
    # Text that spells a reserved piece is text, in both: never the control id.
    ids = hf("say <eod> and <0x41>")["input_ids"]
    assert sp.eos_id() not in ids and ids == sp.encode("say <eod> and <0x41>")


def test_special_tokens_and_padding(corpus):
    hf, sp = _tools(corpus, "unigram")
    tok = corpus["manifest"]["tokenizer"]
    assert (hf.eos_token, hf.eos_token_id) == ("<eod>", tok["eod_id"])
    assert (hf.pad_token, hf.pad_token_id) == ("<pad>", tok["pad_id"])
    assert hf.bos_token is None and hf.model_max_length == 64
    assert hf("Hola")["input_ids"] == sp.encode("Hola")  # no BOS/EOS added
    batch = hf(["Hola", "Hello world, again"], padding=True)
    short = len(sp.encode("Hola"))
    assert batch["input_ids"][0][short:] == [tok["pad_id"]] * (len(batch["input_ids"][1]) - short)
    assert batch["attention_mask"][0][short:] == [0] * (len(batch["input_ids"][1]) - short)
    # A document stream (text, <eod>, text) decodes as sentencepiece decodes it.
    stream = sp.encode("Uno.") + [tok["eod_id"]] + sp.encode("Dos.")
    assert hf.decode(stream, skip_special_tokens=True) == sp.decode(stream)


def test_a_file_that_is_not_sentencepiece_is_refused(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model at all")
    (tmp_path / "out").mkdir()
    with pytest.raises(hf_tokenizer.TokenizerExportError, match="not a sentencepiece model"):
        hf_tokenizer.write_hf_tokenizer(bad, tmp_path / "out", 64)
