"""Torch datasets over the cache, and the epoch sampling that balances them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import CROP_SIZE, slice_stack


def interleave(groups: list[np.ndarray], pattern: list[int], n: int, rng: np.random.Generator,
               weights: list[np.ndarray | None] | None = None) -> np.ndarray:
    """n rows whose groups follow `pattern` (e.g. [0, 1, 1]: one positive per two negatives).

    Each group is drawn through fresh shuffles of itself, so every member is used before any
    repeats, or, when it has weights, with replacement in proportion to them. The epoch is
    shuffled at the end so batches mix. Groups in `pattern` must be non-empty.
    """
    slots = np.resize(np.asarray(pattern), n)
    rows = np.empty(n, np.int64)
    for g, members in enumerate(groups):
        need = int(np.sum(slots == g))
        if need == 0:
            continue
        if weights is not None and weights[g] is not None:
            drawn = rng.choice(members, need, p=weights[g] / weights[g].sum())
        else:
            cycles = -(-need // len(members))
            drawn = np.concatenate([rng.permutation(members) for _ in range(cycles)])[:need]
        rows[slots == g] = drawn
    return rows[rng.permutation(n)]


class CropDataset(Dataset):
    """Candidate crops cut from the cache: items are (crop 1xDxHxW, label, row); int16 HU, or float32
    when zoomed (extract_crop)."""

    def __init__(self, cache: LunaCache, uids: np.ndarray, centers_xyz: np.ndarray, labels: np.ndarray,
                 rows: np.ndarray, size=CROP_SIZE, zoom: float = 1.0):
        self.cache = cache
        self.uids, self.centers, self.labels = uids, centers_xyz, labels
        self.rows, self.size, self.zoom = np.asarray(rows), tuple(size), zoom

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        crop, _ = self.cache.crop(self.uids[row], self.centers[row], self.size, self.zoom)
        return torch.from_numpy(crop)[None], int(self.labels[row]), row


@dataclass(frozen=True)
class Patches:
    """Training patches instead of whole slices: crop x crop pixels at a random place inside a
    window x window square around a centre. Randomness comes from (seed, epoch, item), so epochs
    repeat exactly."""

    crop: int
    window: int = 96
    seed: int = 0
    epoch: int = 0


class SliceDataset(Dataset):
    """(2C+1)-slice stacks with the centre slice's nodule mask (grown by `margin` voxels): items are
    (int16 stack, bool 1xHxW mask).

    Samples are rows of (uid code, slice) or (uid code, slice, row, col). With patches, each item is
    a patch around (row, col) where `centred` says the row has one (a look-alike to learn from),
    else around a random nodule pixel of the slice; without, the whole slice.
    """

    def __init__(self, cache: LunaCache, uids: list[str], samples: np.ndarray, context: int,
                 patches: Patches | None = None, margin: int = 0, centred: np.ndarray | None = None):
        self.cache = cache
        rows = np.asarray(samples, np.int64)
        rows = rows.reshape(-1, rows.shape[-1] if rows.size else 2)
        self.uids, self.samples = uids, np.pad(rows, ((0, 0), (0, 4 - rows.shape[1])))
        self.centred = np.zeros(len(rows), bool) if centred is None else np.asarray(centred, bool)
        self.context, self.patches, self.margin = context, patches, margin

    def __len__(self) -> int:
        return len(self.samples)

    def _patch(self, i: int, label: tuple[np.ndarray, int, int], shape) -> tuple[slice, slice]:
        code, index, row, col = (int(v) for v in self.samples[i])
        crop, window = self.patches.crop, max(self.patches.window, self.patches.crop)
        height, width = shape
        rng = np.random.default_rng([self.patches.seed, self.patches.epoch, i])
        if self.centred[i]:
            cy, cx = row, col
        else:
            box, r0, c0 = label
            ys, xs = np.nonzero(box)  # in the order np.nonzero gives them over the whole slice
            pick = rng.integers(len(ys)) if len(ys) else None
            cy, cx = (ys[pick] + r0, xs[pick] + c0) if pick is not None else (height // 2, width // 2)
        dy, dx = rng.integers(0, window - crop + 1, size=2)
        r0 = int(np.clip(cy - window // 2 + dy, 0, max(height - crop, 0)))
        c0 = int(np.clip(cx - window // 2 + dx, 0, max(width - crop, 0)))
        return slice(r0, r0 + crop), slice(c0, c0 + crop)

    def __getitem__(self, i: int):
        code, index = (int(v) for v in self.samples[i, :2])
        uid = self.uids[code]
        record, volume = self.cache.record(uid), self.cache.volume(uid)
        if not self.patches:
            mask = record.mask_slice(index, self.margin)
            return torch.from_numpy(slice_stack(volume, index, self.context)), torch.from_numpy(mask)[None]
        label = record.label_window(index, self.margin)
        rows, cols = self._patch(i, label, record.shape[1:])
        stack = slice_stack(volume, index, self.context, rows, cols)
        return torch.from_numpy(stack), _cut(label, rows, cols, stack.shape[1:])[None]


def _cut(label: tuple[np.ndarray, int, int], rows: slice, cols: slice, shape) -> torch.Tensor:
    """The label pixels (label_window's box at its place in the slice) inside rows x cols, which cover
    `shape` pixels of the slice (fewer than the patch where the slice is smaller)."""
    box, r0, c0 = label
    mask = torch.zeros(shape, dtype=torch.bool)
    top, left = max(rows.start, r0), max(cols.start, c0)
    bottom, right = min(rows.stop, r0 + box.shape[0]), min(cols.stop, c0 + box.shape[1])
    if bottom > top and right > left:
        mask[top - rows.start:bottom - rows.start, left - cols.start:right - cols.start] = torch.from_numpy(
            box[top - r0:bottom - r0, left - c0:right - c0])
    return mask


def pad_collate(batch):
    """Stack items of different slice sizes by padding to the largest (air for images, no nodule for masks)."""
    height = max(item[0].shape[-2] for item in batch)
    width = max(item[0].shape[-1] for item in batch)
    stacks, masks = [], []
    for stack, mask in batch:
        pad = (0, width - stack.shape[-1], 0, height - stack.shape[-2])
        stacks.append(torch.nn.functional.pad(stack, pad, value=-1000))
        masks.append(torch.nn.functional.pad(mask, pad, value=False))
    return torch.stack(stacks), torch.stack(masks)
