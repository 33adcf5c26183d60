"""The exported tokenizer: ``AutoTokenizer`` on it encodes real held-out documents to the run's
sentencepiece ids (and to the ids stored in the shards), decodes them back, and carries
``<eod>`` as EOS and ``<pad>`` as pad; for the unigram model prep trains and for BPE.

Long raw documents in English and Spanish (Wikipedia summaries joined into documents of about
50k characters, and a held-out set of software documentation) encode exactly for prep's model,
whose unigram scores sit on the float32-exact grid; a model off the grid diverges on them, and
its export names the case; every divergence is one of the cases the export names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.cli import main as prep_main
from data_prep.corpus import load_corpus
from data_prep.documents import DOMAIN_NAMES
from data_prep.plan import make_plan
from data_prep.sample import read_sample
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
    # The held-out documents exactly as prep chose them (its global sample stage).
    _caps, sample, chosen = read_sample(recipe, make_plan(recipe))
    held_out = {f"test_{DOMAIN_NAMES[d]}": [sample.docs[i].text for i in idx[:50]]
                for d, idx in chosen.items() if DOMAIN_NAMES[d] in ("forget", "retain")}
    bpe = train_tokenizer(load_corpus(recipe).texts, TokenizerConfig(
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


# Held-out software documentation, written for this test (not in any training text).
SOFTWARE_DOCS = {
    "en": [
        "To install the package, run `pip install sgtm-tools==2.1.0` in a fresh virtual "
        "environment. The command line interface is then available as `sgtm`; run "
        "`sgtm --help` to list its subcommands.",
        "The configuration file is YAML. Every key can be overridden on the command line as "
        "key=value, for example train.steps=100 or model.hidden_size=512. Unknown keys are "
        "reported together in one error, so a typo never goes unnoticed.",
        "Returns: a dictionary mapping each split name to its mean loss. Raises ValueError if "
        "the checkpoint directory does not exist or holds no complete checkpoint.",
        "Note: on Windows, paths must be quoted when they contain spaces, e.g. "
        "\"C:\\Program Files\\sgtm\\config.yaml\". Use forward slashes in the YAML file.",
        "The function `load_checkpoint(path, model, optimizer=None)` reads the latest step; "
        "pass strict=False to ignore missing keys (not recommended).",
        "Troubleshooting: if the process hangs at start-up, check that MASTER_ADDR and "
        "MASTER_PORT are set and that port 29500 is free (lsof -i :29500).",
        "Changelog 2.1.0 (2024-03-18): faster shard reader (~1.8x), fixed a race in the "
        "writer, deprecated --legacy-format; it will be removed in 3.0.",
    ],
    "es": [
        "Para instalar el paquete, ejecute `pip install sgtm-tools==2.1.0` en un entorno "
        "virtual nuevo. La interfaz de línea de comandos queda disponible como `sgtm`.",
        "El archivo de configuración está en formato YAML. Cada clave puede sobrescribirse "
        "en la línea de comandos como clave=valor; por lo tanto, no hace falta editar el "
        "archivo para cambiar el número de pasos.",
        "Devuelve: un diccionario que asigna a cada partición su pérdida media. Lanza "
        "ValueError si el directorio del punto de control no existe.",
        "Nota: en Windows, las rutas deben ir entre comillas cuando contienen espacios. Por "
        "lo tanto, se recomienda usar barras normales en el archivo YAML.",
        "La función `load_checkpoint(ruta, modelo, optimizador=None)` lee el último paso; "
        "por lo tanto, el optimizador es opcional y solo se restaura si se pasa.",
        "Solución de problemas: si el proceso se bloquea al arrancar, compruebe que "
        "MASTER_ADDR y MASTER_PORT estén definidos y que el puerto 29500 esté libre.",
        "Registro de cambios 2.1.0 (18 de marzo de 2024): lector de fragmentos más rápido "
        "(~1,8x), corrección de una condición de carrera; --legacy-format queda obsoleto.",
    ],
}


@pytest.fixture(scope="module")
def long_documents():
    """Raw long documents: 8 English and 8 Spanish of 100 Wikipedia summaries each, and 4
    software-documentation documents per language (the paragraphs in seeded orders)."""
    import numpy as np

    corpus = load_corpus(recipe_from_dict(__import__("yaml").safe_load(
        (ROOT / "configs/data/bilingual.yaml").read_text())))
    docs = []
    for truth in (0, 1):  # English (retain), Spanish (forget)
        ids = np.flatnonzero(corpus.truth == truth)[-800:]
        docs += ["\n\n".join(corpus.texts[i] for i in ids[k:k + 100]) for k in range(0, 800, 100)]
    rng = np.random.default_rng(0)
    for paragraphs in SOFTWARE_DOCS.values():
        for _ in range(4):
            docs.append("\n\n".join(paragraphs[i] for _ in range(30)
                                      for i in rng.permutation(len(paragraphs))))
    return docs


@pytest.fixture(scope="module")
def off_grid(corpus, tmp_path_factory):
    """A unigram model trained like prep's but without the score grid, and its export."""
    import io

    import sentencepiece as spm

    root = tmp_path_factory.mktemp("off_grid")
    lines = [line for text in load_corpus(recipe_from_dict(corpus["manifest"]["recipe"])).texts[:600]
             for line in text.split("\n") if line.strip()]
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=2048, model_type="unigram",
        byte_fallback=True, unk_id=0, eos_id=1, eos_piece="<eod>", pad_id=2, bos_id=-1,
        control_symbols=["<good>", "<bad>"], hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    (root / "tokenizer.model").write_bytes(buf.getvalue())
    (root / "hf").mkdir()
    hf_tokenizer.write_hf_tokenizer(root / "tokenizer.model", root / "hf", model_max_length=64)
    return root


def _viterbi(model_path, text: str, float32: bool) -> list[int]:
    """sentencepiece's unigram Viterbi over the normalized text (no pre-tokenization), adding
    scores in float32 (as sentencepiece) or float64 (as the tokenizers library); ties keep the
    earliest-starting last piece, as both do. A character without a piece is an unknown node
    (the lowest score - 10), written as its bytes (byte fallback)."""
    import numpy as np
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    pieces = {p.piece.encode(): (i, p.score) for i, p in enumerate(proto.pieces) if p.type == 1}
    unknown = min(score for _, score in pieces.values()) - 10.0
    longest = max(map(len, pieces))
    add = (lambda a, b: float(np.float32(np.float32(a) + np.float32(b)))) if float32 else \
        (lambda a, b: a + b)
    data = sp.normalize(text).encode()
    best: list = [(0.0, -1, None)] + [None] * len(data)
    start = 0
    while start < len(data):
        lead = data[start]
        width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        for end in range(start + 1, min(len(data), start + longest) + 1):
            hit = pieces.get(data[start:end])
            if hit is not None:
                score = add(hit[1], best[start][0])
                if best[end] is None or score > best[end][0]:
                    best[end] = (score, start, hit[0])
        if data[start:start + width] not in pieces:
            score = add(unknown, best[start][0])
            if best[start + width] is None or score > best[start + width][0]:
                best[start + width] = (score, start, None)
        start += width
    ids, end = [], len(data)
    while end > 0:
        _, begin, piece = best[end]
        ids[:0] = [piece] if piece is not None else \
            [sp.piece_to_id(f"<0x{b:02X}>") for b in data[begin:end]]
        end = begin
    return ids


def _exactness(directory):
    return json.loads((Path(directory) / hf_tokenizer.EXACTNESS_FILE).read_text())


def test_long_raw_documents_encode_exactly_with_prep_scores(corpus, long_documents):
    assert len(long_documents) == 24 and sum(map(len, long_documents)) > 1_000_000
    assert any("por lo tanto," in d for d in long_documents)
    bad = hf_tokenizer.compare(corpus["dirs"]["unigram"], corpus["models"]["unigram"],
                               long_documents)
    # Only the named normalizer case may differ (the Wikipedia text has one such cluster).
    assert [m for m in bad if m.get("case") != "grapheme clusters"] == [], \
        [m.get("case") for m in bad]
    assert len(bad) <= 1
    record = _exactness(corpus["dirs"]["unigram"])
    assert record["score_grid"] == hf_tokenizer.SCORE_QUANTUM
    assert [c["case"] for c in record["inexact_cases"]] == [
        "float32 path sums beyond the exact range", "grapheme clusters"]


def test_scores_off_the_grid_diverge_on_long_documents_and_the_export_says_so(off_grid,
                                                                              long_documents):
    record = _exactness(off_grid / "hf")
    assert record["score_grid"] is None and not record["exact"]
    assert record["inexact_cases"][0]["case"] == "float32 path sums"
    bad = hf_tokenizer.compare(off_grid / "hf", off_grid / "tokenizer.model", long_documents)
    sums = [m for m in bad if m["case"] == "path sums"]
    assert sums, "the long documents no longer show the float32 divergence (test is vacuous)"
    # Why: the same Viterbi gives sentencepiece's ids adding in float32, the export's in float64.
    first = min(sums, key=lambda m: len(m["text"]))
    assert _viterbi(off_grid / "tokenizer.model", first["text"], True) == first["sentencepiece"]
    assert _viterbi(off_grid / "tokenizer.model", first["text"], False) == first["hf"]
    # The same model with its scores put on the grid encodes them all alike.
    exact = off_grid / "exact.model"
    exact.write_bytes(hf_tokenizer.exact_scores((off_grid / "tokenizer.model").read_bytes()))
    (off_grid / "hf_exact").mkdir()
    hf_tokenizer.write_hf_tokenizer(exact, off_grid / "hf_exact", model_max_length=64)
    again = hf_tokenizer.compare(off_grid / "hf_exact", exact, [m["text"] for m in sums])
    assert again == []


def test_the_grapheme_cluster_case_is_named(corpus):
    text = "an alternative symbol is lbm, #, and ℔ or ″\u0336."
    bad = hf_tokenizer.compare(corpus["dirs"]["unigram"], corpus["models"]["unigram"], [text])
    assert [m["case"] for m in bad] == ["grapheme clusters"]
