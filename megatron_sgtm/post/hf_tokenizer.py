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
    mismatches = compare(out_dir, model_path, PROBES)
    if mismatches:
        raise TokenizerExportError(f"the exported tokenizer encodes {len(mismatches)} check "
                                   f"text(s) differently from sentencepiece, e.g. {mismatches[0]}")
    return ids


def compare(hf_dir: Path, model_path: Path, texts: Iterable[str]) -> list[dict]:
    """Texts whose ids, or decoded text (for ids without ``<unk>``), differ between
    AutoTokenizer(hf_dir) and sentencepiece."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    out = []
    for text in texts:
        want, got = sp.encode(text), hf(text)["input_ids"]
        if want != got:
            out.append({"text": text, "sentencepiece": want, "hf": got})
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
