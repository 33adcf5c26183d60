"""Many shards' memory maps as one flat array.

``FlatConcat`` answers the two reads the batch builders make (an integer position array, or a
contiguous slice) by mapping global positions to (shard, local position); nothing is copied
beyond the values asked for.
"""
from __future__ import annotations

import numpy as np


class FlatConcat:
    """Read-only concatenation of 1-D arrays (memory maps) of one dtype."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(dtypes) != 1:
            raise ValueError(f"shards differ in dtype: {sorted(d.name for d in dtypes)}")
        self.parts = parts
        self.dtype = dtypes.pop()
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = []
        for i in range(max(first, 0), len(self.parts)):
            a, b = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if a >= stop:
                break
            if a < b:
                out.append(np.asarray(self.parts[i][a - self.starts[i]:b - self.starts[i]]))
        return np.concatenate(out) if out else np.zeros(0, self.dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("FlatConcat slices take step 1")
            return self._slice(start, stop)
        pos = np.asarray(key, dtype=np.int64)
        if pos.ndim == 0:
            return self._slice(int(pos), int(pos) + 1)[0]
        out = np.empty(pos.shape, self.dtype)
        part = np.searchsorted(self.starts, pos, side="right") - 1
        for i in np.unique(part):
            sel = part == i
            out[sel] = self.parts[int(i)][pos[sel] - self.starts[i]]
        return out

