"""Small classifiers made from text at hand, for the worked examples in data_prep/README.md,
the tests and ``bench/prep_speed.py``: a python entry point and a tiny Hugging Face model.

- :func:`spanish_function_words` is a complete ``classifier.kind: python`` entry point
  (``data_prep.classifiers.examples:spanish_function_words``): the share of a text's words
  that are common Spanish function words, scaled so that a share of 10 % scores 0.5.
- :func:`tiny_hf_classifier` saves a randomly initialised two-layer BERT sequence classifier
  with a WordPiece tokenizer trained on the given texts: a real ``hf`` directory (config,
  safetensors weights, tokenizer.json) for exercising loading, windowing and batching. Its
  scores mean nothing; train your own model for real labels.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+")
SPANISH_FUNCTION_WORDS = frozenset(
    "de la el en y que los las del se por un una con para es al lo como su sus más pero "
    "fue son entre desde sobre también esta este".split())


def spanish_function_words(texts: list[str]) -> np.ndarray:
    """Forget score = min(1, 5 x share of Spanish function words among the words)."""
    out = np.zeros(len(texts), np.float32)
    for i, t in enumerate(texts):
        words = _WORD.findall(t.lower())
        if words:
            out[i] = min(1.0, 5.0 * sum(w in SPANISH_FUNCTION_WORDS for w in words) / len(words))
    return out


def tiny_hf_classifier(out_dir: str | Path, texts: list[str], seed: int = 0, vocab_size: int = 2000,
                       labels: tuple[str, ...] = ("retain", "forget"), head: bool = True) -> Path:
    """Save a tiny random BERT classifier (``head=False``: the bare encoder, no
    classification head) and its tokenizer to ``out_dir``; returns the directory."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    from data_prep.classifiers.hf_model import quiet_transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if head else BertModel)(config)
    restore = quiet_transformers()
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        restore()
    return out
