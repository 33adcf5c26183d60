"""The run's sentencepiece model as a Hugging Face tokenizer that encodes to the same ids.

``AutoTokenizer.from_pretrained(DIR)`` loads ``tokenizer.json`` through the generic
``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5): the model-specific
classes would impose their own pipeline (transformers 5's ``LlamaTokenizer`` is BPE-only and
has no normalizer), while ours is rebuilt from the sentencepiece model's own settings:

- normalizer, in sentencepiece's order: the precompiled charsmap (``nmt_nfkc`` by default),
  removal of leading, trailing and repeated spaces, spaces escaped as ``▁``, and the dummy
  prefix ``▁`` prepended to the whole text (``Prepend``, not ``Metaspace``: Metaspace skips the
  prefix when the text already starts with ``▁``, sentencepiece does not);
- model: Unigram (piece scores) or BPE (merges ranked by the merged piece's score), with byte
  fallback when the model has it;
- reserved pieces (``<unk>``, ``<eod>``, ``<pad>``, control tokens, ``<0xNN>`` bytes) are never
  matched from text by sentencepiece, but a Unigram trie holds every piece. A split
  pre-tokenizer cuts each literal occurrence of a reserved piece between two characters that
  no normal piece contains next to each other, so no normal piece is lost and the reserved one
  can no longer match; ``split_special_tokens`` keeps literal ``<eod>`` text from being read as
  the special token, as sentencepiece does.

No BOS is added (the run never used one); ``<eod>`` is the EOS and ``<pad>`` the pad token.

Where the two libraries cannot agree, the export says so: ``tokenizer_exactness.json`` names
each case (``inexact_cases``). Two are known:

- **float32 path sums** (unigram). sentencepiece's Viterbi adds piece scores along the whole
  text in float32; the tokenizers library adds them in float64. Two segmentations whose sums
  lie within float32 rounding of each other, rounding that grows with the position in the
  text (2**-11 at a sum of 2**13, about a thousand tokens in), are ranked differently, e.g.
  ``por lo tanto,`` as ``▁t an to`` against ``▁ ta nt o`` deep in a long document. ``sgtm prep``
  therefore keeps unigram scores on a grid of ``SCORE_QUANTUM`` (``exact_scores``): every sum
  of grid scores up to ``EXACT_SUM_LIMIT`` is exact in float32 as in float64, so both find the
  same best sum and break ties alike (the earliest-starting last piece). Models off the grid
  (trained elsewhere) keep the case, and so do texts whose best path passes the limit.
- **grapheme clusters** (a precompiled normalization rule, nmt_nfkc by default).
  transformers' ``Precompiled`` normalizer looks each grapheme cluster up as a whole and
  replaces it by the longest rule matching its start, dropping the rest of the cluster;
  sentencepiece matches from every position. ``″̶`` (U+2033 U+0336) becomes ``′′`` there and
  ``′′̶`` in sentencepiece. Clusters of 6 bytes or more are normalized character by character.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
# Unigram piece scores (log-probabilities, in nats) on multiples of this: a float32 sum of
# them is exact while it stays within EXACT_SUM_LIMIT, about 50k tokens of ordinary text.
SCORE_QUANTUM = 2.0 ** -5
EXACT_SUM_LIMIT = 2.0 ** 24 * SCORE_QUANTUM
EXACTNESS_FILE = "tokenizer_exactness.json"

# Texts every export is checked on: whitespace runs, newlines and tabs, full-width and
# compatibility characters (normalizer), characters outside the vocabulary (byte fallback),
# literal reserved pieces, a leading escaped-space character.
PROBES = ("Hello world.", "  leading,  inner   and trailing spaces  ", "line\nbreak\tand tab",
          "a\n\nb", "ﬁ ＡＢＣ ①", "日本語 ☃ 😀", "literal <eod> <pad> <unk> <good> <0x41> tokens",
          "a<eod>b", "▁escaped", "¿Dónde está? Años 1990-2000.", "", " ")


class TokenizerExportError(ValueError):
    """The sentencepiece model cannot be written as an equivalent HF tokenizer."""


@dataclass(frozen=True)
class SpecialIds:
    eos_id: int
    pad_id: Optional[int]
    unk_id: int
    vocab_size: int


def _proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as exc:  # protobuf raises DecodeError
        raise TokenizerExportError(f"not a sentencepiece model ({exc})") from None
    if not proto.pieces:
        raise TokenizerExportError("not a sentencepiece model (no pieces)")
    return proto


def special_ids(model_path: Path) -> SpecialIds:
    proto = _proto(Path(model_path).read_bytes())
    spec = proto.trainer_spec
    if spec.eos_id < 0:
        raise TokenizerExportError(f"{model_path}: has no end-of-document (eos) piece")
    return SpecialIds(spec.eos_id, spec.pad_id if spec.pad_id >= 0 else None, spec.unk_id,
                      len(proto.pieces))


def exact_scores(model_bytes: bytes) -> bytes:
    """The model with every normal unigram piece's score rounded to the ``SCORE_QUANTUM`` grid
    (at most 1/64 nat away; BPE models, whose scores rank merges, are returned as they are)."""
    proto = _proto(model_bytes)
    if proto.trainer_spec.model_type != UNIGRAM:
        return model_bytes
    for piece in proto.pieces:
        if piece.type == NORMAL:
            piece.score = round(piece.score / SCORE_QUANTUM) * SCORE_QUANTUM
    return proto.SerializeToString()


def scores_on_grid(proto) -> bool:
    """A unigram model whose normal pieces' scores are all multiples of ``SCORE_QUANTUM``."""
    return proto.trainer_spec.model_type == UNIGRAM and all(
        p.score / SCORE_QUANTUM == round(p.score / SCORE_QUANTUM)
        for p in proto.pieces if p.type == NORMAL)


def inexact_cases(proto) -> list[dict]:
    """The inputs on which the export may encode differently from sentencepiece, and why."""
    cases = []
    pieces = list(proto.pieces)
    if proto.trainer_spec.model_type == UNIGRAM:
        normal = [p.score for p in pieces if p.type == NORMAL]
        if not scores_on_grid(proto):
            cases.append({
                "case": "float32 path sums",
                "where": "a word with two segmentations whose score sums are within float32 "
                         "rounding at its position in the text; most often deep in long "
                         "documents (seen: 'por lo tanto,' as '▁t an to' vs '▁ ta nt o')",
                "why": "sentencepiece sums piece scores in float32, transformers in float64; "
                       "these scores are off the 2**-5 grid `sgtm prep` trains on"})
        else:
            typical = sorted(-x for x in normal)[len(normal) // 2] if normal else 1.0
            cases.append({
                "case": "float32 path sums beyond the exact range",
                "where": f"a text whose best segmentation's score sum passes "
                         f"{EXACT_SUM_LIMIT:.0f} in magnitude (about "
                         f"{int(EXACT_SUM_LIMIT / max(typical, 1e-9)):,} tokens)",
                "why": "float32 holds every multiple of the score grid only up to there"})
        if any(p.type == USER_DEFINED for p in pieces):
            cases.append({
                "case": "user-defined pieces",
                "where": "text containing a user-defined piece",
                "why": "sentencepiece scores them as byte length x the best score - 0.1; the "
                       "export keeps their stored scores"})
    if proto.normalizer_spec.precompiled_charsmap:
        cases.append({
            "case": "grapheme clusters",
            "where": "a grapheme cluster whose first characters the normalization rule "
                     "rewrites and which goes on past them (e.g. U+2033 U+0336), or one of 6 "
                     "bytes or more that a rule spanning characters would rewrite",
            "why": "transformers' Precompiled normalizer rewrites whole grapheme clusters by "
                   "the longest rule matching their start; sentencepiece matches at every "
                   "position"})
    return cases


def _normalizer(proto):
    from tokenizers import Regex, normalizers

    spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise TokenizerExportError("treat_whitespace_as_suffix models are not supported")
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # sentencepiece collapses the ASCII space only (newlines and tabs stay as they are,
        # unless the charsmap maps them to spaces first).
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps)


def _bpe_merges(pieces: list) -> list[tuple[str, str]]:
    """sentencepiece BPE merges the adjacent pair whose union is the best-scoring piece;
    HF BPE merges the lowest-ranked pair: rank every (left, right) split of a normal piece by
    that piece's score (then id, as sentencepiece breaks ties by position in the vocabulary)."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _reserved_cuts(pieces: list) -> Optional[str]:
    """A regex whose matches end inside each reserved piece's literal text, at a character
    boundary no normal piece spans (so cutting there never removes a path sentencepiece has)."""
    normal = [p.piece for p in pieces if p.type in (NORMAL, USER_DEFINED)]
    bigrams = {piece[i:i + 2] for piece in normal for i in range(len(piece) - 1)}
    alternatives = []
    for p in pieces:
        if p.type in (NORMAL, USER_DEFINED) or len(p.piece) < 2:
            continue
        cut = next((k for k in range(1, len(p.piece)) if p.piece[k - 1:k + 1] not in bigrams), None)
        if cut is None:
            raise TokenizerExportError(f"reserved piece {p.piece!r}: every character pair of it "
                                       "occurs inside a normal piece; it cannot be kept unmatched")
        alternatives.append(re.escape(p.piece[:cut]) + "(?=" + re.escape(p.piece[cut:]) + ")")
    return "|".join(alternatives) or None


def build_tokenizer(model_bytes: bytes):
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    proto = _proto(model_bytes)
    spec = proto.trainer_spec
    pieces = list(proto.pieces)
    byte_fallback = bool(spec.byte_fallback)
    if spec.model_type == UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=spec.unk_id,
                               byte_fallback=byte_fallback)
    elif spec.model_type == BPE:
        model = models.BPE({p.piece: i for i, p in enumerate(pieces)}, _bpe_merges(pieces),
                           unk_token=pieces[spec.unk_id].piece, fuse_unk=True,
                           byte_fallback=byte_fallback)
    else:
        raise TokenizerExportError(f"sentencepiece model type {spec.model_type} is not supported "
                                   "(unigram and bpe are)")
    tok = Tokenizer(model)
    tok.normalizer = _normalizer(proto)
    cuts = _reserved_cuts(pieces) if spec.model_type == UNIGRAM else None
    if cuts:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(cuts), behavior="merged_with_previous")
    steps = [decoders.Replace("▁", " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (UNKNOWN, CONTROL)])
    return tok


def tokenizer_config(ids: SpecialIds, pieces: list[str], model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": pieces[ids.eos_id],
        "pad_token": pieces[ids.pad_id] if ids.pad_id is not None else pieces[ids.eos_id],
        "unk_token": pieces[ids.unk_id],
        "add_bos_token": False,
        "add_eos_token": False,
        # Literal "<eod>" in text is text, as in sentencepiece.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "padding_side": "right",
    }


def write_hf_tokenizer(model_path: Path, out_dir: Path, model_max_length: int) -> SpecialIds:
    """Write tokenizer.model (for sentencepiece users), tokenizer.json, tokenizer_config.json
    and special_tokens_map.json into ``out_dir``; check the result on ``PROBES``."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    model_bytes = model_path.read_bytes()
    proto = _proto(model_bytes)
    ids = special_ids(model_path)
    pieces = [p.piece for p in proto.pieces]
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    build_tokenizer(model_bytes).save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(ids, pieces, model_max_length)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json",
                {k: config[k] for k in ("eos_token", "pad_token", "unk_token")})
    cases = inexact_cases(proto)
    _write_json(out_dir / EXACTNESS_FILE, {
        "exact": not cases, "score_grid": SCORE_QUANTUM if scores_on_grid(proto) else None,
        "inexact_cases": cases})
    mismatches = compare(out_dir, model_path, PROBES)
    if mismatches:
        raise TokenizerExportError(f"the exported tokenizer encodes {len(mismatches)} check "
                                   f"text(s) differently from sentencepiece, e.g. {mismatches[0]}")
    return ids


def tokenizer_note(hf_dir: Path) -> str:
    """One line on what the export's tokenizer encodes exactly (from ``EXACTNESS_FILE``)."""
    record = json.loads((Path(hf_dir) / EXACTNESS_FILE).read_text(encoding="utf-8"))
    if record["exact"]:
        return "the tokenizer encodes every text to the run's sentencepiece ids"
    names = "; ".join(c["case"] for c in record["inexact_cases"])
    return (f"the tokenizer encodes to the run's sentencepiece ids except in the cases "
            f"{EXACTNESS_FILE} names: {names}")


def compare(hf_dir: Path, model_path: Path, texts: Iterable[str]) -> list[dict]:
    """Texts whose ids, or decoded text (for ids without ``<unk>``), differ between
    AutoTokenizer(hf_dir) and sentencepiece; an id difference names its ``case``: "grapheme
    clusters" when the two normalizers' outputs differ, else "path sums"."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    normalizer = hf.backend_tokenizer.normalizer
    out = []
    for text in texts:
        want, got = sp.encode(text), hf(text)["input_ids"]
        if want != got:
            same = normalizer is None or normalizer.normalize_str(text) == sp.normalize(text)
            out.append({"text": text, "sentencepiece": want, "hf": got,
                        "case": "path sums" if same else "grapheme clusters"})
        elif sp.unk_id() not in want and \
                sp.decode(want) != hf.decode(got, skip_special_tokens=True):
            # (An unknown piece, possible only without byte fallback, is " ⁇ " to
            # sentencepiece and a skipped special token to transformers.)
            out.append({"text": text, "decoded": [sp.decode(want),
                                                  hf.decode(got, skip_special_tokens=True)]})
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
