"""The Megatron ``.idx`` format (megatron-core 0.16.1 ``_IndexWriter``), read without
importing megatron-core (6 s per process; a start's checks need only the arrays).

Layout: header ``MMIDIDX\\0\\0``, version ``<Q 1``, dtype code ``<B``, sequence count ``<Q``,
document count ``<Q``, then the int32 sequence lengths, the int64 byte pointers, the int64
document indices. ``data_prep.indexed`` writes it; a test checks the constants and the
bytes against megatron-core's own builder and reader.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6,
               "float32": 7, "uint16": 8}
PREAMBLE = len(INDEX_HEADER) + 8 + 1 + 8 + 8


@dataclass
class IndexFile:
    dtype: np.dtype  # of the .bin entries
    sequence_count: int
    document_count: int
    lengths: np.ndarray = field(repr=False)  # int32 [sequences], a memory map
    pointers: np.ndarray = field(repr=False)  # int64 [sequences] byte offsets, a memory map


def read_index(path: Path) -> IndexFile:
    """The arrays of an ``.idx`` as memory maps (nothing beyond the header read yet).
    ValueError when the file is not a complete index."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(PREAMBLE)
    if len(head) < PREAMBLE or not head.startswith(INDEX_HEADER):
        raise ValueError("bad header")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise ValueError(f"version {version}, expected 1")
    names = {v: k for k, v in DTYPE_CODES.items()}
    if head[17] not in names:
        raise ValueError(f"unknown dtype code {head[17]}")
    n, docs = struct.unpack("<QQ", head[18:PREAMBLE])
    need = PREAMBLE + 12 * n + 8 * docs
    if path.stat().st_size < need:
        raise ValueError(f"{path.stat().st_size} bytes, the header needs {need}")
    if n == 0:
        empty32, empty64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
        return IndexFile(np.dtype(names[head[17]]), 0, int(docs), empty32, empty64)
    return IndexFile(np.dtype(names[head[17]]), int(n), int(docs),
                     np.memmap(path, dtype=np.int32, mode="r", offset=PREAMBLE, shape=(n,)),
                     np.memmap(path, dtype=np.int64, mode="r", offset=PREAMBLE + 4 * n, shape=(n,)))


__all__ = ["DTYPE_CODES", "INDEX_HEADER", "IndexFile", "PREAMBLE", "read_index"]
