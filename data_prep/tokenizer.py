"""Sentencepiece tokenizer: train on the recipe's training text, or load an existing one.

Reserved pieces: ``<unk>`` (0), ``<eod>`` (1, appended to every document), ``<pad>`` (2)
and the control tokens ``<good>`` / ``<bad>`` for the conditional-training baseline.
They are control symbols, so text that happens to contain "<good>" never encodes to them.
Unigram piece scores are rounded to multiples of 2**-5 after training, so the exported HF
tokenizer encodes raw text to the same ids (``megatron_sgtm/post/hf_tokenizer.py``).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import PrepError
from data_prep.recipe import TokenizerConfig

EOD, GOOD, BAD = "<eod>", "<good>", "<bad>"


@dataclass
class TokenizerInfo:
    model_bytes: bytes
    vocab_size: int
    eod_id: int
    good_id: int
    bad_id: int
    pad_id: int | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    @property
    def token_dtype(self) -> type:
        return np.uint16 if self.vocab_size < 65500 else np.int32

    def to_manifest(self) -> dict:
        return {"path": "tokenizer.model", "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eod_id": self.eod_id, "good_id": self.good_id, "bad_id": self.bad_id,
                "pad_id": self.pad_id}


def describe(model_bytes: bytes, origin: str) -> TokenizerInfo:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
        raise PrepError(f"tokenizer {origin}: not a sentencepiece model ({e})") from None
    ids = {p: sp.piece_to_id(p) for p in (GOOD, BAD)}
    missing = [p for p, i in ids.items() if i == sp.unk_id() or sp.id_to_piece(i) != p]
    eod = sp.eos_id()
    if eod < 0:
        missing.append("an end-of-document (eos) piece")
    if missing:
        raise PrepError(f"tokenizer {origin}: lacks reserved pieces {', '.join(missing)}; "
                        "train one with `sgtm prep` (tokenizer.model: null)")
    pad = sp.pad_id()
    return TokenizerInfo(model_bytes, sp.vocab_size(), eod, ids[GOOD], ids[BAD], pad if pad >= 0 else None)


def load_tokenizer(path: str) -> TokenizerInfo:
    p = Path(path)
    if not p.is_file():
        raise PrepError(f"tokenizer {p}: no such file")
    return describe(p.read_bytes(), str(p))


def _training_lines(texts: list[str], cfg: TokenizerConfig) -> list[str]:
    """A seeded sample of whole documents, capped at ``max_train_bytes``, split into lines."""
    rng = np.random.default_rng(cfg.seed)
    lines, total = [], 0
    for i in rng.permutation(len(texts)):
        for line in texts[i].split("\n"):
            if line.strip():
                lines.append(line)
                total += len(line.encode("utf-8"))
        if total >= cfg.max_train_bytes:
            break
    return lines


def train_tokenizer(texts: list[str], cfg: TokenizerConfig) -> TokenizerInfo:
    import sentencepiece as spm

    lines = _training_lines(texts, cfg)
    buf = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=cfg.vocab_size,
            model_type=cfg.kind, byte_fallback=True, character_coverage=cfg.character_coverage,
            unk_id=0, eos_id=1, eos_piece=EOD, pad_id=2, bos_id=-1,
            control_symbols=[GOOD, BAD], max_sentence_length=1 << 16,
            shuffle_input_sentence=False, num_threads=cfg.num_threads, minloglevel=2,
            # Small corpora may not support the requested vocab; unigram then shrinks it.
            **({"hard_vocab_limit": False} if cfg.kind == "unigram" else {}),
        )
    except RuntimeError as e:
        raise PrepError(f"tokenizer training failed: {e}") from None
    # Unigram scores on a float32-exact grid: sentencepiece's float32 path sums then rank
    # segmentations exactly as the HF export's float64 ones (megatron_sgtm/post/hf_tokenizer.py).
    from megatron_sgtm.post.hf_tokenizer import exact_scores

    return describe(exact_scores(buf.getvalue()), "(trained)")
