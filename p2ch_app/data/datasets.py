"""Torch datasets over the cache, and the epoch sampling that balances them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import CROP_SIZE


def interleave(groups: list[np.ndarray], pattern: list[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows whose groups follow `pattern` (e.g. [0, 1, 1]: one positive per two negatives).

    Each group is drawn through fresh shuffles of itself, so every member is used before any
    repeats; the epoch is shuffled at the end so batches mix. Groups in `pattern` must be non-empty.
    """
    slots = np.resize(np.asarray(pattern), n)
    rows = np.empty(n, np.int64)
    for g, members in enumerate(groups):
        need = int(np.sum(slots == g))
        if need == 0:
            continue
        cycles = -(-need // len(members))
        drawn = np.concatenate([rng.permutation(members) for _ in range(cycles)])[:need]
        rows[slots == g] = drawn
    return rows[rng.permutation(n)]


class CropDataset(Dataset):
    """Candidate crops cut from the cache: items are (int16 crop 1xDxHxW, label, row)."""

    def __init__(self, cache_dir: Path, uids: np.ndarray, centers_xyz: np.ndarray, labels: np.ndarray,
                 rows: np.ndarray, size=CROP_SIZE):
        self.cache = LunaCache(cache_dir)
        self.uids, self.centers, self.labels = uids, centers_xyz, labels
        self.rows, self.size = np.asarray(rows), tuple(size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        crop, _ = self.cache.crop(self.uids[row], self.centers[row], self.size)
        return torch.from_numpy(crop)[None], int(self.labels[row]), row
