"""Mining for the classifier (luna-train-cls --mine-with): the U-Net's own candidates away from every
nodule as extra non-nodules (look-alikes), and those on a nodule as extra nodules (hits). candidates.csv
may lack what nodule-analyze will show the classifier: a U-Net marks diaphragm domes and heart borders
that no CSV candidate sits on, and its candidate on a small nodule is often a piece of it, off centre."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import irc_to_xyz
from p2ch_app.data.index import LunaIndex
from p2ch_app.files import write_atomic
from p2ch_app.inference.pipeline import load_segmenter, propose
from p2ch_app.inference.runtime import keep_freed_memory
from p2ch_app.metrics import distances, hit_radii
from p2ch_app.models import NoduleSegmenter

MINED_CLEARANCE_MM = 6.0  # a mined look-alike lies at least this far from any nodule's centre
MINING_VERSION = 2  # part of the mined rows' cache key: raise it when propose() or mining changes


def mine_candidates(cache: LunaCache, index: LunaIndex, series_codes, segmenter: NoduleSegmenter,
                    device: torch.device, progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(series code, centre xyz, whether a hit) of the in-body candidates the U-Net proposes in the given
    series that are look-alikes, farther than the nodule's diameter (at least MINED_CLEARANCE_MM) from
    every nodule's centre, or hits, strictly within a nodule's radius as the LUNA16 scoring counts them."""
    keep_freed_memory()
    codes, found, hits = [], [], []
    for code in tqdm(series_codes, desc="mine candidates", unit="CT", disable=not progress):
        uid = index.series_uids[code]
        centers, _, inside = propose(np.asarray(cache.volume(uid)), segmenter, device)  # the whole CT, clipped
        xyz = irc_to_xyz(centers[inside], cache.record(uid).geometry).reshape(-1, 3)
        mine = (index.series_code == code) & index.is_nodule
        clearance = np.maximum(index.diameter_mm[mine], MINED_CLEARANCE_MM)
        distance = distances(xyz, index.center_xyz[mine])  # (candidates, nodules), for both rules
        hit = np.any(distance < hit_radii(index.diameter_mm[mine]), axis=1)
        keep = hit | np.all(distance > clearance, axis=1)
        codes.append(np.full(int(keep.sum()), code, np.int32))
        found.append(xyz[keep])
        hits.append(hit[keep])
    return (np.concatenate(codes or [np.zeros(0, np.int32)]), np.concatenate(found or [np.zeros((0, 3))]),
            np.concatenate(hits or [np.zeros(0, bool)]))


def _mining_key(cache: LunaCache, index: LunaIndex, train_codes: np.ndarray, val_stride: int,
                seg_checkpoint: Path) -> str:
    """A digest of everything mining depends on: the checkpoint's bytes, the training series and their nodules."""
    key = hashlib.sha256(Path(seg_checkpoint).read_bytes())
    key.update(cache.root.encode())  # another data root's series are other CTs, even where their files match
    for code in train_codes:
        uid = index.series_uids[code]
        key.update(f"{uid} {cache.record(uid).fingerprint}".encode())
    nodules = ~index.is_validation(val_stride) & index.is_nodule
    for values in (index.series_code[nodules], index.center_xyz[nodules], index.diameter_mm[nodules],
                   np.array([MINED_CLEARANCE_MM, MINING_VERSION])):
        key.update(np.ascontiguousarray(values).tobytes())
    return key.hexdigest()[:24]


def with_mined(cache: LunaCache, index: LunaIndex, val_stride: int, seg_checkpoint: Path,
               device: torch.device) -> tuple[LunaIndex, bool]:
    """(the index plus the look-alikes and hits this U-Net proposes in the training series, whether they
    were found in the cache). Validation series are left as they are. Mining runs the U-Net over every
    training CT, so its result is kept in the cache: a resumed or repeated run does not mine again."""
    segmenter = load_segmenter(seg_checkpoint, device)  # first: a bad file fails with its own message
    train_codes = np.flatnonzero(~index.validation_series(val_stride))
    path = cache.dir / "mined" / f"{_mining_key(cache, index, train_codes, val_stride, seg_checkpoint)}.npz"
    if path.is_file():
        with np.load(path) as saved:
            code_of = {uid: code for code, uid in enumerate(index.series_uids)}
            codes = np.array([code_of[uid] for uid in saved["uids"]], np.int32)
            return index.with_mined(codes, saved["centers_xyz"], saved["hits"]), True
    codes, centers, hits = mine_candidates(cache, index, train_codes, segmenter, device, progress=True)
    path.parent.mkdir(exist_ok=True)
    uids = np.array([index.series_uids[code] for code in codes], dtype=str)
    write_atomic(path, lambda tmp: np.savez(tmp, uids=uids, centers_xyz=centers, hits=hits))
    return index.with_mined(codes, centers, hits), False
