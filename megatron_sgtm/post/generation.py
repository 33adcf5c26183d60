"""Sampling from the model and a generation-based capability rate (beyond the paper).

Every TP rank samples from the same gathered logits with the same seeded generator, so all
ranks produce the same tokens without a broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .common import frozen, full_logits, logits

Classifier = Callable[[list[str]], np.ndarray]  # texts -> forget-domain scores in [0, 1]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.max_new_tokens <= 0:
            out.append(f"max_new_tokens: must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            out.append(f"temperature: must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            out.append(f"top_k: must be >= 0, got {self.top_k}")
        return out


def _next_token(last: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.temperature == 0:
        return last.argmax(-1)
    scores = last.float() / cfg.temperature
    if cfg.top_k:
        kth = scores.topk(min(cfg.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(1).to(last.device)


@torch.no_grad()
def generate(model, prompts: torch.Tensor, cfg: SamplingConfig, eod_id: Optional[int] = None,
             logit_bias: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Continue each prompt row ``[b, p]``; returns the new tokens per row (cut at EOD).

    No KV cache: each step re-runs the (small) model on the last ``seq_length`` tokens, which
    also keeps learned positions within range. ``logit_bias``: a calibrated bias (vocab shard)."""
    window = model.core.model.seq_length
    gen = torch.Generator().manual_seed(cfg.seed)
    seq = prompts
    with frozen(model):
        for _ in range(cfg.max_new_tokens):
            vp = logits(model, seq[:, -window:])
            if logit_bias is not None:
                vp = vp + logit_bias
            nxt = _next_token(full_logits(vp)[:, -1], cfg, gen)
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
    out = []
    for row in seq[:, prompts.shape[1]:].tolist():
        if eod_id is not None and eod_id in row:
            row = row[:row.index(eod_id)]
        out.append(row)
    return out


def language_classifier(languages: Sequence[str] = ("en", "es"), target: str = "es",
                        max_chars: int = 300) -> Classifier:
    """py3langid restricted to ``languages``; score = P(target language) (data prep's family)."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
    ident.set_languages(list(languages))

    def score(texts: list[str]) -> np.ndarray:
        return np.array([dict(ident.rank(t[:max_chars])).get(target, 0.0) if t.strip() else 0.0
                         for t in texts], dtype=np.float32)

    return score


def recipe_classifier(manifest: dict) -> Optional[Classifier]:
    """The prep recipe's own forget classifier, as a function of texts, for classifying
    generated continuations with the family that labelled the corpus: py3langid for language
    recipes (and the oracle of a language split), the user's model for ``fasttext``, ``hf``,
    ``keywords``, ``python`` and ``cascade`` (loaded from the files the manifest names, as
    prep loaded them). None for ``topic`` and a topical oracle: a TF-IDF classifier has to be
    fit on the corpus first (``sgtm study`` refits one on the training documents)."""
    recipe = manifest.get("recipe") or {}
    cfg = recipe.get("classifier") or {}
    kind = cfg.get("kind", "language")
    topical = bool((recipe.get("topics") or {}).get("forget"))
    if kind == "language" or (kind == "oracle" and not topical):
        return language_classifier(tuple(cfg.get("languages", ("en", "es"))),
                                   cfg.get("forget_language", "es"), cfg.get("max_chars", 300))
    if kind in ("topic", "oracle"):
        return None
    from data_prep.classifiers.registry import make_scorer
    from data_prep.recipe import recipe_from_dict

    scorer = make_scorer(recipe_from_dict(recipe).classifier, Path())
    return lambda texts: scorer.trace(list(texts)).scores


def capability_rate(texts: list[str], classifier: Classifier, threshold: float = 0.5) -> dict:
    """Share of continuations the classifier calls forget-domain (empty ones count as not)."""
    if not texts:
        raise ValueError("capability rate needs at least one continuation")
    scores = np.asarray(classifier(texts), dtype=np.float64)
    flagged = int((scores >= threshold).sum())
    return {"rate": flagged / len(texts), "flagged": flagged, "total": len(texts),
            "mean_score": float(scores.mean()), "threshold": threshold}
