"""Corpus preparation for SGTM: raw text -> token shards + per-token label sidecars.

Sharded and streaming (plan -> global sample stage -> one map task per shard -> reduce), in
bounded memory, resumable and byte-identical for any executor. Entry points:
:func:`data_prep.pipeline.prepare`, :func:`data_prep.relabel.relabel`,
:func:`data_prep.merge.merge_directory` and the ``sgtm prep`` command (:mod:`data_prep.cli`).
"""
from data_prep.errors import PrepError

__all__ = ["PrepError"]
