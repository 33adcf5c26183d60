"""Corpus preparation for SGTM: raw text -> token shards + per-token label sidecars.

Entry points: :func:`data_prep.pipeline.prepare`, :func:`data_prep.relabel.relabel`,
and the ``sgtm prep`` command (:mod:`data_prep.cli`).
"""
from data_prep.errors import PrepError

__all__ = ["PrepError"]
