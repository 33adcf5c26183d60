"""The hf kind: a local transformers ``AutoModelForSequenceClassification`` directory (config,
weights and tokenizer, as ``save_pretrained`` writes them), e.g. a fine-tuned ModernBERT.

Score: the forget label's probability (softmax over the labels; a sigmoid per label for
``problem_type: multi_label_classification``; the sigmoid of the one logit for a one-label
model). Regression heads (scores that are not probabilities) are refused: wrap such a model
in a python entry point that maps its output to [0, 1].

**Windows.** A text is tokenized whole and cut into consecutive, non-overlapping windows of
``max_length`` tokens, special tokens included (default: the longest the model and its
tokenizer take; cut by the tokenizer's own overflow handling), at most ``max_windows`` of
them (the first). Its score is the ``max`` (default: one forget window flags the text) or the
``mean`` of its window scores. Windows are sorted by length and batched ``batch_size`` at a
time, so padding is small; padding never changes a score (the attention mask hides it;
checked in the tests to float rounding).

**Device.** ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``. On a GPU the local
executor runs the map in one process (a CUDA context does not survive fork); on SLURM give
each array task a GPU (``--sbatch-arg=--gres=gpu:1``). On CPU, ``threads`` torch threads per
process (default one, as for every step of a map process); forked ``--workers`` use one each:
torch's thread pool does not survive fork, and a worker that inherits a pool of several
threads that the parent used hangs.
Loading never touches the network (``local_files_only``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.classifiers.base import Scorer
from data_prep.errors import PrepError
from data_prep.recipe import ClassifierConfig


def quiet_transformers():
    """transformers prints load reports and warnings through its logger; prep speaks in
    errors only (a missing head is our error, below)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    def restore() -> None:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
    return restore


def resolve_device(device: str, who: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrepError(f"{who}: device {device} requested but torch sees no GPU")
    return device


class HFScorer(Scorer):
    def __init__(self, cfg: ClassifierConfig, where: str = "classifier"):
        try:
            import torch
            from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise PrepError(f"{where}: kind hf needs torch and transformers ({e})") from None
        path = Path(cfg.model)
        self.who = who = f"{where}.model {path}"
        if not (path / "config.json").is_file():
            raise PrepError(f"{who}: not a Hugging Face model directory (no config.json)")
        restore = quiet_transformers()
        try:
            try:
                config = AutoConfig.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, KeyError) as e:
                raise PrepError(f"{who}: config.json unreadable ({e})") from None
            if config.problem_type == "regression":
                raise PrepError(f"{who}: a regression head (its outputs are not probabilities); "
                                "map its output to [0, 1] in a python entry point instead")
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, local_files_only=True, output_loading_info=True, dtype=getattr(torch, cfg.dtype))
            except ValueError as e:  # an architecture without a sequence-classification class
                raise PrepError(f"{who}: no sequence-classification model for it ({str(e).splitlines()[0]})") from None
            except OSError as e:
                raise PrepError(f"{who}: weights unreadable ({e})") from None
            missing = sorted(info.get("missing_keys") or [])
            if missing:
                raise PrepError(f"{who}: has no trained classification head: {', '.join(missing[:6])}"
                                f"{' ...' if len(missing) > 6 else ''} missing from its weights "
                                f"(saved from {', '.join(config.architectures or ['an unknown class'])}; "
                                "these would be randomly initialised)")
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                raise PrepError(f"{who}: its tokenizer does not load ({e})") from None
        finally:
            restore()
        labels = {str(v): int(k) for k, v in model.config.id2label.items()}
        if cfg.forget_label not in labels:
            raise PrepError(f"{where}.forget_label: {cfg.forget_label!r} is not a label of {path} "
                            f"(its id2label: {', '.join(sorted(labels, key=labels.get))})")
        if self.tokenizer.pad_token_id is None:
            raise PrepError(f"{who}: its tokenizer has no padding token; set pad_token in "
                            "tokenizer_config.json to batch texts")
        positions = getattr(model.config, "max_position_embeddings", None)
        if cfg.max_length is not None and positions is not None and cfg.max_length > positions:
            raise PrepError(f"{where}.max_length: {cfg.max_length} is more than the model's {positions} positions")
        # Unset: the model's positions or its tokenizer's limit (a huge sentinel when none is set).
        limits = [x for x in (positions, self.tokenizer.model_max_length) if x and x < 1 << 30]
        if cfg.max_length is None and not limits:
            raise PrepError(f"{where}.max_length: {path} states no maximum length; set one")
        self.max_length = cfg.max_length or int(min(limits))
        self.label = labels[cfg.forget_label]
        self.sigmoid = model.config.num_labels == 1 or model.config.problem_type == "multi_label_classification"
        self.device = resolve_device(cfg.device, who)
        self.fork_safe = self.device == "cpu"
        if self.device == "cpu":
            # Several OpenMP threads per process on cores that other workers also use make
            # every forward wait on the others (measured: an hf prep test took 113 s with torch's
            # default thread count, 10 s with one, on 2 cores under a load average of about 20).
            torch.set_num_threads(cfg.threads)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self._torch = torch

    def after_fork(self) -> None:
        # The parent may have run the model on several threads (probe, held-out split); a
        # forked child using that pool deadlocks, one with a single thread does not.
        self._torch.set_num_threads(1)

    def windows(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of every window and the text each belongs to."""
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, stride=0,
                             return_overflowing_tokens=True, padding=False)
        owner = enc.get("overflow_to_sample_mapping")
        if owner is None:
            raise PrepError(f"{self.who}: its tokenizer cannot cut long texts into windows "
                            "(no overflow support; a fast tokenizer, tokenizer.json, is needed)")
        ids, owner = list(enc["input_ids"]), np.asarray(owner, np.int64)
        if self.cfg.max_windows is not None:
            # Windows of one text are consecutive: keep the first max_windows of each.
            first = np.searchsorted(owner, owner, side="left")
            keep = np.flatnonzero(np.arange(len(owner)) - first < self.cfg.max_windows)
            ids, owner = [ids[i] for i in keep], owner[keep]
        return ids, owner

    def window_scores(self, ids: list[list[int]]) -> np.ndarray:
        torch = self._torch
        out = np.zeros(len(ids), np.float32)
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        pad = self.tokenizer.pad_token_id
        for b in range(0, len(order), self.cfg.batch_size):
            rows = order[b:b + self.cfg.batch_size]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                mask[r, :len(ids[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            p = torch.sigmoid(logits[:, self.label]) if self.sigmoid else torch.softmax(logits, -1)[:, self.label]
            out[rows] = p.cpu().numpy()
        return out

    def score(self, texts: list[str]) -> np.ndarray:
        ids, owner = self.windows(texts)
        s = self.window_scores(ids)
        if self.cfg.window_aggregation == "max":
            agg = np.zeros(len(texts), np.float32)
            np.maximum.at(agg, owner, s)
        else:
            agg = (np.bincount(owner, weights=s, minlength=len(texts))
                   / np.maximum(np.bincount(owner, minlength=len(texts)), 1)).astype(np.float32)
        return np.clip(agg, 0.0, 1.0)
