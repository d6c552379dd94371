"""The preprocessed cache that `luna-prep` builds and every trainer and the analysis read.

Layout under the cache directory:
  volumes/<uid>.npy   the CT in clipped HU, int16 (index, row, col): read with mmap, so a crop
                      or a slice stack touches only its own pages (measured: `make bench`).
  meta/               a diskcache store, one record per series: shape, geometry, the nodule
                      label mask (as flat voxel indices: masks are >99.9% empty), the slices
                      holding nodule voxels, and a fingerprint of the annotations the mask came from.
  mined/<key>.npz     look-alikes a U-Net proposed in the training series (luna-train-cls
                      --mine-with), keyed by everything they depend on, so they are mined once.
  luna-prep.lock      held by the luna-prep building the cache: a second one waits for it.
A series is cached when its record exists and its volume file is whole (as long as the record's
shape says); the record is written only after its volume file is complete (temp file + rename), so
a killed run leaves nothing half-built that looks whole, and a file damaged later is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import pickle
import sqlite3
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import diskcache
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from p2ch_app.data.ct import CROP_SIZE, Geometry, extract_crop, load_series, series_on_disk, xyz_to_irc
from p2ch_app.data.index import ANNOTATIONS_CSV, LunaIndex
from p2ch_app.data.workers import worker_pool
from p2ch_app.errors import UserError, brief
from p2ch_app.files import write_atomic

FORMAT_VERSION = 1
MASK_THRESHOLD_HU = -700  # nodule tissue (solid and ground-glass) is denser than this; lung is not
LOCK_FILE = "luna-prep.lock"


@dataclass(eq=False)
class SeriesRecord:
    uid: str
    shape: tuple[int, int, int]
    geometry: Geometry
    mask_voxels: np.ndarray  # flat indices of nodule-label voxels
    nodule_slices: np.ndarray  # sorted slice (index) numbers holding nodule voxels
    fingerprint: str  # of the annotations the mask was grown from

    def mask_slice(self, index: int, margin: int = 0) -> np.ndarray:
        """The label mask of one slice, without building the whole volume's mask; with margin, the
        label grown by that many face steps in 3D (neighbour slices grow into this one too)."""
        grown = np.zeros(self.shape[1:], bool)
        for k in range(max(index - margin, 0), min(index + margin, self.shape[0] - 1) + 1):
            reach, plane = margin - abs(k - index), self._plane(k)
            if reach and plane.any():
                plane = ndimage.binary_dilation(plane, ndimage.generate_binary_structure(2, 1), iterations=reach)
            grown |= plane
        return grown

    def label_slices(self, margin: int = 0) -> np.ndarray:
        """Slices holding label voxels once the label is grown by margin."""
        near = self.nodule_slices[:, None] + np.arange(-margin, margin + 1)
        return np.unique(np.clip(near, 0, self.shape[0] - 1))

    def _plane(self, index: int) -> np.ndarray:
        plane = self.shape[1] * self.shape[2]
        lo, hi = np.searchsorted(self.mask_voxels, [index * plane, (index + 1) * plane])
        flat = np.zeros(plane, bool)
        flat[self.mask_voxels[lo:hi] - index * plane] = True
        return flat.reshape(self.shape[1:])

    def mask(self) -> np.ndarray:
        flat = np.zeros(int(np.prod(self.shape)), bool)
        flat[self.mask_voxels] = True
        return flat.reshape(self.shape)

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "uid": self.uid, "shape": list(self.shape),
                "geometry": self.geometry.to_dict(), "mask_voxels": self.mask_voxels,
                "nodule_slices": self.nodule_slices, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> SeriesRecord:
        return cls(d["uid"], tuple(d["shape"]), Geometry.from_dict(d["geometry"]), d["mask_voxels"],
                   d["nodule_slices"], d["fingerprint"])


def default_cache_dir(data_root: Path) -> Path:
    return Path(data_root) / "cache"


def require_cached(cache_dir: Path, index: LunaIndex, data_root: Path) -> None:
    """Refuse to train on an index whose series are not all in the cache, naming the fix."""
    cache = LunaCache(cache_dir)
    cached = set(cache.cached_uids()) if (Path(cache_dir) / "meta").is_dir() else set()
    missing = [u for u in index.series_uids if u not in cached]
    if missing:
        raise UserError(f"{len(missing)} series (e.g. {missing[0]}) are not in the cache {cache_dir} (or damaged "
                        f"there); run luna-prep --data-root {data_root} first")


class _Records:
    """meta/, the diskcache store of series records. A damaged database is one line saying how to
    rebuild it, wherever it is touched (luna-prep, training, analysis), not an sqlite traceback."""

    def __init__(self, folder: Path):
        self.folder = folder
        with self._guard():
            self.store = diskcache.Cache(str(folder))

    @contextlib.contextmanager
    def _guard(self):
        try:
            yield
        except (sqlite3.DatabaseError, pickle.UnpicklingError, EOFError) as err:
            if "full" in str(err):
                raise UserError(f"cannot write the cache database {self.folder}: disk full; free space or choose "
                                "another --cache-dir") from None
            if "locked" in str(err):
                raise UserError(f"the cache database {self.folder} is locked by another process; "
                                "retry when it is done") from None
            raise UserError(f"the cache database {self.folder} is damaged ({brief(err)}); delete {self.folder} "
                            "(or the whole cache folder) and run luna-prep again to rebuild it") from None

    def get(self, uid: str) -> dict | None:
        with self._guard():
            return self.store.get(uid)

    def set(self, uid: str, raw: dict) -> None:
        with self._guard():
            self.store.set(uid, raw)

    def uids(self) -> list[str]:
        with self._guard():
            return list(self.store.iterkeys())


class LunaCache:
    """Read access to a built cache; build() fills in what is missing."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        self._volumes: dict[str, np.ndarray] = {}
        self._records: dict[str, SeriesRecord] = {}

    @cached_property
    def _meta(self) -> _Records:
        # Opened lazily: each DataLoader worker process then opens its own sqlite connection.
        (self.dir / "volumes").mkdir(parents=True, exist_ok=True)
        return _Records(self.dir / "meta")

    def __getstate__(self):
        return {"dir": self.dir, "_volumes": {}, "_records": {}}

    def volume_path(self, uid: str) -> Path:
        return self.dir / "volumes" / f"{uid}.npy"

    def record(self, uid: str) -> SeriesRecord:
        if uid not in self._records:
            raw = self._meta.get(uid)
            if raw is None or raw.get("version") != FORMAT_VERSION:
                raise UserError(f"series {uid} is not in the cache {self.dir}; run luna-prep first")
            self._records[uid] = SeriesRecord.from_dict(raw)
        return self._records[uid]

    def volume(self, uid: str) -> np.ndarray:
        """The CT as a read-only memory map (int16 HU)."""
        if uid not in self._volumes:
            if not self._volume_whole(uid, self.record(uid).shape):
                raise UserError(f"the cached volume {self.volume_path(uid)} does not match its record (truncated "
                                "or replaced); run luna-prep again to rebuild it")
            self._volumes[uid] = np.load(self.volume_path(uid), mmap_mode="r")
        return self._volumes[uid]

    def crop(self, uid: str, center_xyz, size=CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """(crop, start_irc) around a patient-mm point: the one crop path for training and analysis."""
        center_irc = xyz_to_irc(center_xyz, self.record(uid).geometry)
        return extract_crop(self.volume(uid), center_irc, size)

    def is_current(self, uid: str, fingerprint: str) -> bool:
        raw = self._meta.get(uid)
        return (raw is not None and raw.get("version") == FORMAT_VERSION
                and raw.get("fingerprint") == fingerprint and self._volume_whole(uid, raw["shape"]))

    def cached_uids(self) -> list[str]:
        """The series whose record and whole volume are both here."""
        return sorted(k for k in self._meta.uids() if self._volume_whole(k, (self._meta.get(k) or {}).get("shape")))

    def _volume_whole(self, uid: str, shape) -> bool:
        """Whether volumes/<uid>.npy holds an int16 array of the recorded shape, every byte of it: a
        truncated or replaced file is not cached, so luna-prep rebuilds it and readers never map it."""
        path, fmt = self.volume_path(uid), np.lib.format
        try:
            with open(path, "rb") as f:
                version = fmt.read_magic(f)
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                found, fortran, dtype = read_header(f)
                data_start = f.tell()
            return (shape is not None and found == tuple(shape) and not fortran and dtype == np.dtype(np.int16)
                    and path.stat().st_size == data_start + int(np.prod(shape)) * 2)
        except (OSError, ValueError):
            return False

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.rglob("*") if f.is_file())

    def build(self, data_root: Path, index: LunaIndex, uids: list[str] | None = None, workers: int = 1,
              progress: bool = True) -> dict:
        """Cache every series of `uids` (default: all in the index) that is missing or stale.

        Returns counts: built, skipped (already current), bytes (cache size after).
        """
        uids = list(index.series_uids if uids is None else uids)
        with self._build_lock():
            self._remove_temp_files()  # of a run that died: every live one holds the lock
            try:
                jobs = self._stale_jobs(data_root, index, uids)
                self._run_jobs(jobs, workers, progress)
            finally:
                self._remove_temp_files()  # of workers stopped mid-write by an error or Ctrl-C
        return {"built": len(jobs), "skipped": len(uids) - len(jobs), "bytes": self.size_bytes(),
                "series": len(self.cached_uids())}

    @contextlib.contextmanager
    def _build_lock(self):
        """One luna-prep builds a cache at a time; a second waits, then finds the series built. So two
        runs never write the same volume, and a temp file seen while holding the lock is a dead run's."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"luna-prep: waiting for another luna-prep to finish building {self.dir}", file=sys.stderr,
                      flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _stale_jobs(self, data_root: Path, index: LunaIndex, uids: list[str]) -> list[tuple]:
        """The build jobs of the series that are missing, stale or damaged."""
        on_disk = series_on_disk(data_root)
        jobs = []
        for uid in uids:
            rows = index.for_series(uid)
            centers = rows.center_xyz[rows.has_annotation]
            key = fingerprint(centers, rows.line[rows.has_annotation], on_disk.get(uid))
            if not self.is_current(uid, key):
                jobs.append((Path(data_root), uid, centers, rows.line[rows.has_annotation],
                             str(self.volume_path(uid)), key))
        return jobs

    def _run_jobs(self, jobs: list[tuple], workers: int, progress: bool) -> None:
        with tqdm(total=len(jobs), desc="luna-prep", unit="CT", disable=not progress) as bar, \
                contextlib.ExitStack() as stack:
            if jobs and workers > 1:
                pool = stack.enter_context(worker_pool(min(workers, len(jobs))))
                done = pool.imap_unordered(_build_series, jobs)
            else:
                done = map(_build_series, jobs)
            for record in done:
                self._meta.set(record.uid, record.to_dict())
                bar.update()

    def _remove_temp_files(self) -> None:
        for tmp in (self.dir / "volumes").glob("*.tmp.npy"):
            tmp.unlink(missing_ok=True)


def fingerprint(centers_xyz: np.ndarray, lines: np.ndarray, mhd: Path | None = None) -> str:
    """Identifies what a series' cache entry was built from: its annotations and its CT files
    (size and modification time), so a changed annotations.csv or a rewritten CT is rebuilt."""
    digest = hashlib.sha1(np.ascontiguousarray(centers_xyz, np.float64).tobytes())
    digest.update(np.ascontiguousarray(lines, np.int64).tobytes())
    if mhd is not None:
        for path in (mhd, mhd.with_suffix(".raw")):
            if path.exists():
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _build_series(job) -> SeriesRecord:
    data_root, uid, centers_xyz, lines, volume_path, key = job
    ct = load_series(data_root, uid)
    centers_irc = xyz_to_irc(centers_xyz, ct.geometry)
    outside = ~ct.contains(centers_irc)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        where = np.round(centers_xyz[i], 1).tolist()
        raise UserError(f"{data_root / ANNOTATIONS_CSV}:{lines[i]}: nodule at {where} mm "
                        f"lies outside CT {uid} (shape {list(ct.hu.shape)}); fix the row or the CT")
    mask = grow_nodule_mask(ct.hu, centers_irc)
    write_atomic(Path(volume_path), lambda tmp: np.save(tmp, ct.hu))
    voxels = np.flatnonzero(mask)
    return SeriesRecord(uid, ct.hu.shape, ct.geometry, voxels,
                        np.unique(voxels // (ct.hu.shape[1] * ct.hu.shape[2])), key)


def grow_nodule_mask(hu: np.ndarray, centers_irc, threshold: int = MASK_THRESHOLD_HU) -> np.ndarray:
    """Label mask from annotation centres alone (LUNA16 has no outlines).

    From each centre, a half-width per axis grows until the voxels at +-r along that axis fall to
    lung density; the box so found, intersected with the voxels denser than the threshold, is
    the nodule. Vessels leaving the nodule are cut at the box.
    """
    mask = np.zeros(hu.shape, bool)
    upper = np.array(hu.shape) - 1
    for center in np.rint(np.asarray(centers_irc, float).reshape(-1, 3)).astype(int):
        radius = np.zeros(3, int)
        for axis in range(3):
            r = 1
            while True:
                lo, hi = center.copy(), center.copy()
                lo[axis] -= r
                hi[axis] += r
                if lo[axis] < 0 or hi[axis] > upper[axis] or hu[tuple(lo)] <= threshold or hu[tuple(hi)] <= threshold:
                    break
                r += 1
            radius[axis] = r
        box = tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip(center, radius))
        mask[box] |= hu[box] > threshold
    return mask
