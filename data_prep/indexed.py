"""Megatron IndexedDataset files written in bounded memory.

megatron-core's ``IndexedDatasetBuilder`` keeps every sequence length in Python lists until
``finalize`` (about 36 bytes per document; its ``add_index`` merge does the same for every
input). The writers here produce byte-identical ``.bin``/``.idx`` files (a test compares them
with megatron's builder) but hold lengths in numpy buffers, and the merge streams each input's
index arrays through memory maps in bounded blocks.

Index layout (megatron-core 0.16.1 ``_IndexWriter``): header ``MMIDIDX\\0\\0``, version
``<Q 1``, dtype code ``<B``, sequence count ``<Q``, document count ``<Q``, then the int32
sequence lengths, the int64 byte pointers, the int64 document indices ``0..n``.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

# megatron-core's constants and the reader (a test checks them against megatron's own),
# kept apart from megatron-core so that prep workers never import it (6 s per process).
from megatron_sgtm.data.index_file import DTYPE_CODES, INDEX_HEADER, read_index

BLOCK = 1 << 20  # index entries per streamed block


def _header(dtype, n_seq: int) -> bytes:
    return (INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[np.dtype(dtype).name])
            + struct.pack("<Q", n_seq) + struct.pack("<Q", n_seq + 1))


class _Growing:
    """An int64 buffer that doubles; one array, not a Python list of ints."""

    def __init__(self) -> None:
        self.data, self.n = np.zeros(1024, np.int64), 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.data):
            self.data = np.resize(self.data, max(need, 2 * len(self.data)))
        self.data[self.n:need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.data[: self.n]


class IndexedWriter:
    """Append documents chunk by chunk; ``finalize`` writes the index. One sequence per document."""

    def __init__(self, prefix: Path, dtype) -> None:
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype).type
        self._bin: BinaryIO = open(str(prefix) + ".bin", "wb")
        self._lengths = _Growing()

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents of ``lengths`` tokens, concatenated in ``flat``."""
        if int(np.sum(lengths)) != len(flat):
            raise ValueError("lengths do not add up to the tokens given")
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._lengths.extend(np.asarray(lengths, np.int64))

    def finalize(self) -> None:
        self._bin.close()
        write_index(Path(str(self.prefix) + ".idx"), self.dtype, [self._lengths.view()])

    def close(self) -> None:
        self._bin.close()


def write_index(idx_path: Path, dtype, length_blocks: Iterable[np.ndarray] | list) -> None:
    """Write an index whose sequence lengths are the concatenation of ``length_blocks``.

    ``length_blocks`` is iterated three times (lengths, pointers, document indices), so it may
    be a list of memory maps; no block is held longer than it is written.
    """
    blocks = list(length_blocks)
    itemsize = np.dtype(dtype).itemsize
    n = int(sum(len(b) for b in blocks))
    with open(idx_path, "wb") as f:
        f.write(_header(dtype, n))
        for b in blocks:
            for a in range(0, len(b), BLOCK):
                f.write(np.asarray(b[a:a + BLOCK], np.int32).tobytes())
        offset = 0
        for b in blocks:
            for a in range(0, len(b), BLOCK):
                chunk = np.asarray(b[a:a + BLOCK], np.int64)
                csum = np.cumsum(chunk) * itemsize
                f.write((np.concatenate([[0], csum[:-1]]) + offset).astype(np.int64).tobytes())
                offset += int(csum[-1]) if len(csum) else 0
        for a in range(0, n + 1, BLOCK):
            f.write(np.arange(a, min(a + BLOCK, n + 1), dtype=np.int64).tobytes())


def read_lengths(prefix: Path) -> tuple[np.ndarray, type]:
    """Sequence lengths (a memory map into the .idx) and dtype of an index, no copy."""
    idx = Path(str(prefix) + ".idx")
    try:
        index = read_index(idx)
    except ValueError as e:
        raise ValueError(f"{idx}: not a megatron index ({e})") from None
    return index.lengths, index.dtype.type


def merge(prefixes: list[Path], out_prefix: Path) -> None:
    """Concatenate IndexedDatasets (same dtype) into one, streaming the .bin files and the
    index arrays; the same bytes as megatron's ``IndexedDatasetBuilder.add_index``."""
    blocks, dtype = [], None
    for p in prefixes:
        lengths, dt = read_lengths(p)
        if dtype is not None and dt != dtype:
            raise ValueError(f"{p}: dtype {np.dtype(dt).name}, the others are {np.dtype(dtype).name}")
        dtype = dt
        blocks.append(lengths)
    with open(str(out_prefix) + ".bin", "wb") as out:
        for p in prefixes:
            with open(str(p) + ".bin", "rb") as f:
                while True:
                    data = f.read(1 << 24)
                    if not data:
                        break
                    out.write(data)
    write_index(Path(str(out_prefix) + ".idx"), dtype, blocks)
