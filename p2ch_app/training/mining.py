"""Mining for the classifier (luna-train-cls --mine-with): the U-Net's own candidates away from every
nodule as extra non-nodules (look-alikes), and those on a nodule as extra nodules (hits). candidates.csv
may lack what nodule-analyze will show the classifier: a U-Net marks diaphragm domes and heart borders
that no CSV candidate sits on, and its candidate on a small nodule is often a piece of it, off centre."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import irc_to_xyz
from p2ch_app.data.index import LunaIndex
from p2ch_app.data.workers import worker_pool
from p2ch_app.files import held_lock, write_atomic
from p2ch_app.inference.distributed import cpu_threads
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
    found = [_mine_series(cache, index, code, segmenter, device)
             for code in tqdm(series_codes, desc="mine candidates", unit="CT", disable=not progress)]
    return _joined(found)


def _mine_series(cache: LunaCache, index: LunaIndex, code: int, segmenter: NoduleSegmenter,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mine_candidates for one series."""
    uid = index.series_uids[code]
    centers, _, inside = propose(np.asarray(cache.volume(uid)), segmenter, device)  # the whole CT, clipped
    xyz = irc_to_xyz(centers[inside], cache.record(uid).geometry).reshape(-1, 3)
    mine = (index.series_code == code) & index.is_nodule
    clearance = np.maximum(index.diameter_mm[mine], MINED_CLEARANCE_MM)
    distance = distances(xyz, index.center_xyz[mine])  # (candidates, nodules), for both rules
    hit = np.any(distance < hit_radii(index.diameter_mm[mine]), axis=1)
    keep = hit | np.all(distance > clearance, axis=1)
    return np.full(int(keep.sum()), code, np.int32), xyz[keep], hit[keep]


def _joined(found: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes, xyz, hits = zip(*found) if found else ([np.zeros(0, np.int32)], [np.zeros((0, 3))], [np.zeros(0, bool)])
    return np.concatenate(codes), np.concatenate(xyz), np.concatenate(hits)


@dataclass(frozen=True)
class _MiningJob:
    """What a mining process needs to mine any series: it loads the U-Net once."""

    cache_dir: Path
    data_root: Path
    index: LunaIndex
    seg_checkpoint: Path
    threads: int  # its share of the CPU's cores


_worker_segmenter: dict[Path, NoduleSegmenter] = {}


def _mine_in_worker(job: _MiningJob, code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    torch.set_num_threads(job.threads)
    if job.seg_checkpoint not in _worker_segmenter:
        _worker_segmenter[job.seg_checkpoint] = load_segmenter(job.seg_checkpoint, torch.device("cpu"))
    cache = LunaCache(job.cache_dir, job.data_root)
    return _mine_series(cache, job.index, code, _worker_segmenter[job.seg_checkpoint], torch.device("cpu"))


def mine_in_processes(cache: LunaCache, index: LunaIndex, series_codes, seg_checkpoint: Path,
                      processes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mine_candidates on the CPU by `processes` processes, each with its share of the cores: on 2
    cores two one-thread processes mine about 1.2x faster than one process with two threads (4.95
    against 6.0 s per demo CT)."""
    job = _MiningJob(cache.dir, cache.data_root, index, Path(seg_checkpoint), cpu_threads(processes))
    with worker_pool(processes) as pool:
        found = list(tqdm(pool.imap(partial(_mine_in_worker, job), [int(c) for c in series_codes]),
                          total=len(series_codes), desc="mine candidates", unit="CT"))
    return _joined(found)


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
               device: torch.device, processes: int = 1, every: int = 1) -> tuple[LunaIndex, bool]:
    """(the index plus the look-alikes and hits this U-Net proposes in every `every`th training series,
    whether they were found in the cache). Validation series are left as they are. Mining runs the U-Net
    over each of those CTs, so its result is kept in the cache (keyed by the series mined): a resumed or
    repeated run does not mine again, and runs started together mine once (the others wait for it). With
    processes > 1 on the CPU, that many processes mine (mine_in_processes)."""
    segmenter = load_segmenter(seg_checkpoint, device)  # first: a bad file fails with its own message
    train_codes = np.flatnonzero(~index.validation_series(val_stride))[::every]
    path = cache.dir / "mined" / f"{_mining_key(cache, index, train_codes, val_stride, seg_checkpoint)}.npz"
    path.parent.mkdir(exist_ok=True)
    with held_lock(path.with_suffix(".lock")):
        if path.is_file():
            with np.load(path) as saved:
                code_of = {uid: code for code, uid in enumerate(index.series_uids)}
                codes = np.array([code_of[uid] for uid in saved["uids"]], np.int32)
                return index.with_mined(codes, saved["centers_xyz"], saved["hits"]), True
        if processes > 1 and device.type == "cpu":
            codes, centers, hits = mine_in_processes(cache, index, train_codes, seg_checkpoint, processes)
        else:
            codes, centers, hits = mine_candidates(cache, index, train_codes, segmenter, device, progress=True)
        uids = np.array([index.series_uids[code] for code in codes], dtype=str)
        write_atomic(path, lambda tmp: np.savez(tmp, uids=uids, centers_xyz=centers, hits=hits))
    return index.with_mined(codes, centers, hits), False
