"""The preprocessed cache that `luna-prep` builds and every trainer and the analysis read.

No copy of a CT is kept where its own file can be read in place: a .mhd whose voxels are plain
little-endian int16 (LUNA16's .raw files) is memory-mapped where it lies, and every read (a crop, a
slice stack, or the whole CT) is clipped to [-1000, 1000] HU as it is made (ClippedVolume), bit for
bit what a copy would hold (luna-prep checks it on the CT it has just loaded).

Every record is bound to the data root it was built from (resolved to an absolute path): it is kept
under the key (root, uid), and it names its data file relative to that root. A cache folder may hold the
records of several roots (one --cache-dir shared by two roots, or a data root copied or moved with its
cache): each root sees only its own, so a root never reads another one's files. luna-prep builds a root's
missing records from its own files; training refuses to start without them, naming the root they were
built for.

Layout under the cache directory:
  volumes/<uid>-<digest of the data root>.npy
                      only for CTs that cannot be mapped (compressed, another voxel type, big-endian, a
                      data file outside the data root, ...) or all with build(copy_volumes=True): one per
                      series and data root, the CT in clipped HU, int16 (index,
                      row, col). Read with mmap like a mapped .raw, so a crop or a slice stack touches
                      only its own pages (both measured: `make bench` step cache_mapped_reads).
  meta/               a diskcache store, one record per series: shape, geometry, the nodule
                      label mask (as flat voxel indices: masks are >99.9% empty), the slices
                      holding nodule voxels, a fingerprint of the annotations and CT files the record
                      came from, and, for a mapped CT, its data file, the offset of its voxels, and
                      the file's identity when luna-prep read it (size, modification time, device and
                      inode). Keyed by (data root, uid).
  mined/<key>.npz     look-alikes and hits a U-Net proposed in the training series (luna-train-cls
                      --mine-with), keyed by everything they depend on, so they are mined once.
  luna-prep.lock      held by the luna-prep building the cache: a second one waits for it.
A series is cached when its record exists and its voxels are as luna-prep left them: a mapped data file
still has the recorded identity (readers check it when they first open the series;
a file changed or removed since is refused in one line, and luna-prep builds the record again); a
copied volume file is whole (as long as the record's shape says). The record is written only after
its volume file is complete (temp file + rename), so a killed run leaves nothing half-built that looks
whole, and a file damaged later is rebuilt. Records of another FORMAT_VERSION are not read: luna-prep
builds them again (a copy that is no longer needed is then deleted; records of versions before 3, keyed
by uid alone, are deleted with their copies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import sqlite3
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import diskcache
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from p2ch_app.data.ct import (
    CROP_SIZE,
    HU_MAX,
    HU_MIN,
    Geometry,
    RawLayout,
    extract_crop,
    find_series,
    load_ct,
    raw_int16_layout,
    series_on_disk,
    xyz_to_irc,
)
from p2ch_app.data.index import ANNOTATIONS_CSV, LunaIndex
from p2ch_app.data.workers import worker_pool
from p2ch_app.errors import UserError, brief
from p2ch_app.files import write_atomic

FORMAT_VERSION = 3  # 2: a CT whose file can be memory-mapped is read in place (record["source"]), not copied;
# 3: records keyed by (data root, uid), their data file named relative to that root, with its device and inode
MASK_THRESHOLD_HU = -700  # nodule tissue (solid and ground-glass) is denser than this; lung is not
LOCK_FILE = "luna-prep.lock"
_CHECK_VOXELS = 1 << 22  # luna-prep compares a mapped CT with the loaded one this many voxels at a time
_RAW_INT16 = np.dtype("<i2")


@dataclass(frozen=True)
class MappedFile:
    """A CT data file the cache reads where it lies, instead of keeping a copy: its path under the data
    root, where its voxels start, and its identity when luna-prep read it (size, modification time, and
    device and inode where the platform has them). A file whose identity differs (rewritten, replaced,
    removed) is not read."""

    path: str  # relative to the data root the record was built from: only that root's file is read
    offset: int
    size: int
    mtime_ns: int
    device: int | None  # None where the platform reports none
    inode: int | None

    @classmethod
    def of(cls, layout: RawLayout, data_root: Path) -> MappedFile | None:
        """The file of layout as it is now; None if it is gone (loading the CT then says so) or lies
        outside data_root (its header names a file elsewhere: the CT is copied instead)."""
        relative = Path(os.path.relpath(os.path.abspath(layout.file), os.path.abspath(data_root)))
        if relative.parts[:1] == ("..",):
            return None
        try:
            stat = os.stat(layout.file)
        except OSError:
            return None
        return cls(relative.as_posix(), layout.offset, *_identity(stat))

    def file(self, root: Path) -> Path:
        return Path(root) / self.path

    def unchanged(self, root: Path) -> bool:
        try:
            stat = os.stat(self.file(root))
        except OSError:
            return False
        return _identity(stat) == (self.size, self.mtime_ns, self.device, self.inode)


def _identity(stat: os.stat_result) -> tuple[int, int, int | None, int | None]:
    """(size, modification time, device, inode) of a file; a platform without inodes reports 0: None."""
    return stat.st_size, stat.st_mtime_ns, stat.st_dev or None, stat.st_ino or None


class ClippedVolume:
    """A cached CT as every reader sees it: read-only int16 HU (index, row, col). Indexing reads only
    the voxels asked for from the memory map under it (the series' own data file, or its copy in
    volumes/) and returns them as an array of their own, clipped to [HU_MIN, HU_MAX]; np.asarray of
    the volume is the whole CT, clipped, in memory (for consumers that run over all of it)."""

    def __init__(self, voxels: np.ndarray):
        self._voxels = voxels
        self.shape, self.ndim, self.dtype = voxels.shape, voxels.ndim, np.dtype(np.int16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        part = np.array(self._voxels[key], np.int16)  # a copy, in native byte order
        np.clip(part, HU_MIN, HU_MAX, out=part)
        return part if part.ndim else part[()]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("a cached CT is clipped as it is read: reading it whole makes a copy")
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)


@dataclass(eq=False)
class SeriesRecord:
    uid: str
    shape: tuple[int, int, int]
    geometry: Geometry
    mask_voxels: np.ndarray  # flat indices of nodule-label voxels
    nodule_slices: np.ndarray  # sorted slice (index) numbers holding nodule voxels
    fingerprint: str  # of the annotations the mask was grown from and of the CT's files
    source: MappedFile | None = None  # where the voxels are read in place; None: a copy, volume_path(uid)

    def mask_slice(self, index: int, margin: int = 0) -> np.ndarray:
        """The label mask of one slice, without building the whole volume's mask; with margin, the
        label grown by that many face steps in 3D (neighbour slices grow into this one too)."""
        box, r0, c0 = self.label_window(index, margin)
        grown = np.zeros(self.shape[1:], bool)
        grown[r0:r0 + box.shape[0], c0:c0 + box.shape[1]] = box
        return grown

    def label_window(self, index: int, margin: int = 0) -> tuple[np.ndarray, int, int]:
        """mask_slice's pixels inside the smallest box holding them all: (box, its first row, its first
        column); a 0x0 box where the slice has none. Each plane is grown only inside its own label's
        box plus the reach: the same pixels as growing whole planes, at a fraction of the cost (the
        segmentation loader's largest one)."""
        height, width = self.shape[1:]
        parts = []
        for k in range(max(index - margin, 0), min(index + margin, self.shape[0] - 1) + 1):
            reach, (rows, cols) = margin - abs(k - index), self._plane_pixels(k)
            if len(rows):
                r0, c0 = max(rows.min() - reach, 0), max(cols.min() - reach, 0)
                r1, c1 = min(rows.max() + reach + 1, height), min(cols.max() + reach + 1, width)
                part = np.zeros((r1 - r0, c1 - c0), bool)
                part[rows - r0, cols - c0] = True
                if reach:
                    part = ndimage.binary_dilation(part, ndimage.generate_binary_structure(2, 1), iterations=reach)
                parts.append((part, r0, c0))
        if not parts:
            return np.zeros((0, 0), bool), 0, 0
        r0, c0 = min(p[1] for p in parts), min(p[2] for p in parts)
        r1, c1 = max(p[1] + p[0].shape[0] for p in parts), max(p[2] + p[0].shape[1] for p in parts)
        box = np.zeros((r1 - r0, c1 - c0), bool)
        for part, pr, pc in parts:
            box[pr - r0:pr - r0 + part.shape[0], pc - c0:pc - c0 + part.shape[1]] |= part
        return box, int(r0), int(c0)

    def label_slices(self, margin: int = 0) -> np.ndarray:
        """Slices holding label voxels once the label is grown by margin."""
        near = self.nodule_slices[:, None] + np.arange(-margin, margin + 1)
        return np.unique(np.clip(near, 0, self.shape[0] - 1))

    def _plane_pixels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of one slice's label voxels."""
        plane = self.shape[1] * self.shape[2]
        lo, hi = np.searchsorted(self.mask_voxels, [index * plane, (index + 1) * plane])
        return np.divmod(self.mask_voxels[lo:hi] - index * plane, self.shape[2])

    def mask(self) -> np.ndarray:
        flat = np.zeros(int(np.prod(self.shape)), bool)
        flat[self.mask_voxels] = True
        return flat.reshape(self.shape)

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, "uid": self.uid, "shape": list(self.shape),
                "geometry": self.geometry.to_dict(), "mask_voxels": self.mask_voxels,
                "nodule_slices": self.nodule_slices, "fingerprint": self.fingerprint,
                "source": asdict(self.source) if self.source else None}

    @classmethod
    def from_dict(cls, d: dict) -> SeriesRecord:
        return cls(d["uid"], tuple(d["shape"]), Geometry.from_dict(d["geometry"]), d["mask_voxels"],
                   d["nodule_slices"], d["fingerprint"], MappedFile(**d["source"]) if d["source"] else None)


def default_cache_dir(data_root: Path) -> Path:
    return Path(data_root) / "cache"


def require_cached(cache_dir: Path, index: LunaIndex, data_root: Path) -> None:
    """Refuse to train on an index whose series are not all in the cache for this data root, naming the fix."""
    cache = LunaCache(cache_dir, data_root)
    cached = set(cache.cached_uids())
    missing = [u for u in index.series_uids if u not in cached]
    if missing:
        raise cache.not_cached(missing)


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

    def get(self, key) -> dict | None:
        with self._guard():
            return self.store.get(key)

    def set(self, key, raw: dict) -> None:
        with self._guard():
            self.store.set(key, raw)

    def delete(self, key) -> None:
        with self._guard():
            self.store.delete(key)

    def keys(self) -> list:
        """(data root, uid) of every record; a bare uid for a record of a version before 3."""
        with self._guard():
            return list(self.store.iterkeys())


class LunaCache:
    """A cache folder as one data root sees it: read access to that root's records, and build() to fill
    in what is missing from that root's files. Records another root built are never read."""

    def __init__(self, cache_dir: Path, data_root: Path):
        self.dir, self.data_root = Path(cache_dir), Path(data_root)
        self.root = str(self.data_root.resolve())  # the records' key: one root under any spelling of its path
        self._volumes: dict[str, ClippedVolume] = {}
        self._records: dict[str, SeriesRecord] = {}

    @cached_property
    def _meta(self) -> _Records:
        # Opened lazily: each DataLoader worker process then opens its own sqlite connection.
        (self.dir / "volumes").mkdir(parents=True, exist_ok=True)
        return _Records(self.dir / "meta")

    def __getstate__(self):
        return {"dir": self.dir, "data_root": self.data_root, "root": self.root, "_volumes": {}, "_records": {}}

    def volume_path(self, uid: str) -> Path:
        """The copy of a series that cannot be read in place: one per data root, as its record."""
        digest = hashlib.sha1(self.root.encode()).hexdigest()[:12]
        return self.dir / "volumes" / f"{uid}-{digest}.npy"

    def record(self, uid: str) -> SeriesRecord:
        if uid not in self._records:
            raw = self._meta.get((self.root, uid))
            if raw is None or raw.get("version") != FORMAT_VERSION:
                raise self.not_cached([uid])
            self._records[uid] = SeriesRecord.from_dict(raw)
        return self._records[uid]

    def not_cached(self, missing: list[str]) -> UserError:
        """Why these series cannot be read for this data root, and the fix: their records were built
        for another data root (a copied or moved root, or a --cache-dir shared by two), or not at all."""
        built_for = {uid: root for root, uid in self._record_keys() if root != self.root}
        elsewhere = [uid for uid in missing if uid in built_for]
        if elsewhere:
            return UserError(f"the cache {self.dir} was built for the data root {built_for[elsewhere[0]]}, not "
                             f"{self.data_root} ({len(elsewhere)} series, e.g. {elsewhere[0]}); run luna-prep "
                             f"--data-root {self.data_root} to cache this root's own files")
        return UserError(f"{len(missing)} series (e.g. {missing[0]}) are not in the cache {self.dir} (or damaged "
                         f"there); run luna-prep --data-root {self.data_root} first")

    def _record_keys(self) -> list[tuple[str, str]]:
        """(data root, uid) of every record of this format's keys; none, and no folder made, before a build."""
        if not (self.dir / "meta").is_dir():
            return []
        return [key for key in self._meta.keys() if isinstance(key, tuple)]

    def volume(self, uid: str) -> ClippedVolume:
        """The CT in clipped HU, read as it is indexed (ClippedVolume). Whether its voxels are still as
        luna-prep left them is checked once, here, when this cache object first opens the series."""
        if uid not in self._volumes:
            self._volumes[uid] = ClippedVolume(self._map(self.record(uid)))
        return self._volumes[uid]

    def _map(self, record: SeriesRecord) -> np.ndarray:
        """The memory map of a series' voxels: its own data file in place, or its copy in volumes/."""
        source, uid = record.source, record.uid
        if source is None:
            if not self._volume_whole(uid, record.shape):
                raise UserError(f"the cached volume {self.volume_path(uid)} does not match its record (truncated "
                                "or replaced); run luna-prep again to rebuild it")
            return np.load(self.volume_path(uid), mmap_mode="r")
        path = source.file(self.root)
        changed = UserError(f"{path}, the CT file of series {uid}, was changed or removed after luna-prep "
                            "read it; run luna-prep again to update the cache")
        if not source.unchanged(self.root):
            raise changed
        try:
            return np.memmap(path, _RAW_INT16, "r", source.offset, record.shape)
        except (OSError, ValueError):  # removed or cut short since the check above
            raise changed from None

    def crop(self, uid: str, center_xyz, size=CROP_SIZE, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(crop, start_irc) around a patient-mm point: the one crop path for training and analysis."""
        center_irc = xyz_to_irc(center_xyz, self.record(uid).geometry)
        return extract_crop(self.volume(uid), center_irc, size, zoom=zoom)

    def is_current(self, uid: str, fingerprint: str) -> bool:
        raw = self._meta.get((self.root, uid))
        return raw is not None and raw.get("fingerprint") == fingerprint and self._readable(uid, raw)

    def cached_uids(self) -> list[str]:
        """The series of this data root whose record is here, with their voxels as luna-prep left them."""
        return sorted(uid for root, uid in self._record_keys()
                      if root == self.root and self._readable(uid, self._meta.get((root, uid))))

    def _readable(self, uid: str, raw: dict | None) -> bool:
        """Whether a record is of this format and its voxels are as it says: a mapped file unchanged
        since luna-prep read it, or a whole copy in volumes/."""
        if raw is None or raw.get("version") != FORMAT_VERSION:
            return False
        if raw["source"] is None:
            return self._volume_whole(uid, raw["shape"])
        return MappedFile(**raw["source"]).unchanged(self.root)

    def _volume_whole(self, uid: str, shape) -> bool:
        """Whether volume_path(uid) holds an int16 array of the recorded shape, every byte of it: a
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

    def build(self, index: LunaIndex, uids: list[str] | None = None, workers: int = 1, progress: bool = True,
              copy_volumes: bool = False) -> dict:
        """Cache every series of `uids` (default: all in the index) that is missing or stale for this
        data root, reading only this root's files (a record another root built is left to that root).

        CTs that can be memory-mapped are read in place unless copy_volumes, which keeps an int16 copy
        of every CT (as caches of FORMAT_VERSION 1 did: for a data root on a slow disk, or to compare).
        Returns counts: built, skipped (already current), bytes (cache size after).
        """
        uids = list(index.series_uids if uids is None else uids)
        with self._build_lock():
            self._remove_temp_files()  # of a run that died: every live one holds the lock
            self._drop_old_format()
            try:
                jobs = self._stale_jobs(index, uids, copy_volumes)
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

    def _drop_old_format(self) -> None:
        """Records of versions before 3 (keyed by uid alone, bound to no data root) and their copies."""
        for key in self._meta.keys():
            if not isinstance(key, tuple):
                self._meta.delete(key)
                (self.dir / "volumes" / f"{key}.npy").unlink(missing_ok=True)

    def _stale_jobs(self, index: LunaIndex, uids: list[str], copy: bool) -> list[tuple]:
        """The build jobs of the series that are missing, stale or damaged."""
        on_disk = series_on_disk(self.data_root)
        jobs = []
        for uid in uids:
            rows = index.for_series(uid)
            centers = rows.center_xyz[rows.has_annotation]
            key = fingerprint(centers, rows.line[rows.has_annotation], on_disk.get(uid), copy)
            if not self.is_current(uid, key):
                jobs.append((self.data_root, uid, centers, rows.line[rows.has_annotation],
                             str(self.volume_path(uid)), key, copy))
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
                self._meta.set((self.root, record.uid), record.to_dict())
                if record.source is not None:  # read in place now: a copy from an earlier build is not needed
                    self.volume_path(record.uid).unlink(missing_ok=True)
                bar.update()

    def _remove_temp_files(self) -> None:
        for tmp in (self.dir / "volumes").glob("*.tmp.npy"):
            tmp.unlink(missing_ok=True)


def fingerprint(centers_xyz: np.ndarray, lines: np.ndarray, mhd: Path | None = None, copy: bool = False) -> str:
    """Identifies what a series' cache entry was built from: its annotations and its CT files
    (size and modification time), so a changed annotations.csv or a rewritten CT is rebuilt; and
    whether the CT was to be copied even if it could be mapped (build's copy_volumes)."""
    digest = hashlib.sha1(np.ascontiguousarray(centers_xyz, np.float64).tobytes())
    digest.update(np.ascontiguousarray(lines, np.int64).tobytes())
    if copy:
        digest.update(b"copy volume")
    if mhd is not None:
        for path in (mhd, mhd.with_suffix(".raw")):
            if path.exists():
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _build_series(job) -> SeriesRecord:
    data_root, uid, centers_xyz, lines, volume_path, key, copy = job
    mhd = find_series(data_root, uid)
    layout = None if copy else raw_int16_layout(mhd)
    source = MappedFile.of(layout, data_root) if layout else None  # before the CT is read: any later change is noticed
    ct = load_ct(mhd, series_uid=uid)
    centers_irc = xyz_to_irc(centers_xyz, ct.geometry)
    outside = ~ct.contains(centers_irc)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        where = np.round(centers_xyz[i], 1).tolist()
        raise UserError(f"{data_root / ANNOTATIONS_CSV}:{lines[i]}: nodule at {where} mm "
                        f"lies outside CT {uid} (shape {list(ct.hu.shape)}); fix the row or the CT")
    mask = grow_nodule_mask(ct.hu, centers_irc)
    if source is not None and not _maps_as_loaded(layout, ct.hu):
        source = None
    if source is None:
        write_atomic(Path(volume_path), lambda tmp: np.save(tmp, ct.hu))
    voxels = np.flatnonzero(mask)
    return SeriesRecord(uid, ct.hu.shape, ct.geometry, voxels,
                        np.unique(voxels // (ct.hu.shape[1] * ct.hu.shape[2])), key, source)


def _maps_as_loaded(layout: RawLayout, hu: np.ndarray) -> bool:
    """Whether readers of the memory map of layout see, bit for bit, the CT as load_ct read it (the
    voxel order, the clipping): compared a slab at a time, from the pages the load just read."""
    if layout.shape != hu.shape:
        return False
    try:
        mapped = ClippedVolume(np.memmap(layout.file, _RAW_INT16, "r", layout.offset, layout.shape))
    except (OSError, ValueError):  # gone or shorter since its header was read: keep a copy of what was loaded
        return False
    step = max(1, _CHECK_VOXELS // (hu.shape[1] * hu.shape[2]))
    return all(np.array_equal(mapped[k:k + step], hu[k:k + step]) for k in range(0, len(hu), step))


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
