"""`make bench`: the speed figures of the data layer, printed and saved to bench-results/bench.json.

Works on its own copy of the demo dataset under data-unversioned/bench/, so the demo's data and
cache are never touched. Run from the project root.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import diskcache
import numpy as np

from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import CROP_SIZE
from p2ch_app.data.index import build_index
from p2ch_app.data.synth import PRESETS, write_dataset

BENCH_DIR = Path("data-unversioned/bench")
RESULTS = Path("bench-results/bench.json")
DEMO_SERIES = 30  # as configs/demo.toml
LUNA_CANDIDATE_ROWS = 551_065
LUNA_SERIES = 888


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def bench_synth(root: Path) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    seconds, _ = timed(write_dataset, root, series=DEMO_SERIES, subsets=10, seed=1,
                       geometry=PRESETS["demo"], progress=False)
    return {"series": DEMO_SERIES, "seconds": seconds, "seconds_per_series": seconds / DEMO_SERIES}


def bench_prep(root: Path, workers: int) -> dict:
    cache_dir = root / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    index = build_index(root)
    raw_bytes = sum(p.stat().st_size for p in root.glob("subset*/*.raw"))
    seconds, done = timed(LunaCache(cache_dir).build, root, index, workers=workers, progress=False)
    n = done["built"]
    return {"workers": workers, "series": n, "seconds": seconds, "cts_per_s": n / seconds,
            "input_mb_per_s": raw_bytes / 2**20 / seconds, "cache_bytes_per_ct": done["bytes"] / n}


def evict(paths) -> None:
    """Drop files from the page cache so the next read comes from disk (a cold read)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_crops(root: Path, n: int = 2000) -> dict:
    """Crops cut from the memory-mapped volumes versus crops stored whole in diskcache."""
    index = build_index(root)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(index), size=n, replace=len(index) < n)
    picks = [(index.series_uids[index.series_code[i]], index.center_xyz[i]) for i in rows]
    cache_dir = root / "cache"

    def read_memmap():
        cache = LunaCache(cache_dir)
        for uid, xyz in picks:
            cache.crop(uid, xyz)  # a contiguous copy, ready for a batch

    volumes = list((cache_dir / "volumes").glob("*.npy"))
    read_memmap()
    warm, _ = timed(read_memmap)
    evict(volumes)
    cold, _ = timed(read_memmap)

    store_dir = BENCH_DIR / "crop-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    cache = LunaCache(cache_dir)
    with diskcache.Cache(str(store_dir)) as store:
        for k, (uid, xyz) in enumerate(picks):
            store.set(k, cache.crop(uid, xyz)[0].tobytes())

    def read_store():
        with diskcache.Cache(str(store_dir)) as store:
            for k in range(n):
                np.frombuffer(store[k], np.int16).reshape(CROP_SIZE)

    read_store()
    store_warm, _ = timed(read_store)
    evict([p for p in store_dir.rglob("*") if p.is_file()])
    store_cold, _ = timed(read_store)
    return {"crops": n, "memmap_warm_per_s": n / warm, "memmap_cold_per_s": n / cold,
            "diskcache_warm_per_s": n / store_warm, "diskcache_cold_per_s": n / store_cold}


def write_luna_scale_csvs(folder: Path) -> None:
    """candidates.csv with the real row count (551,065) over 888 series, plus 1186 annotations."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    uids = [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{int.from_bytes(rng.bytes(12), 'big') + 10**29}" for _ in range(LUNA_SERIES)]
    which = rng.integers(0, LUNA_SERIES, LUNA_CANDIDATE_ROWS)
    xyz = rng.uniform(-300, 300, (LUNA_CANDIDATE_ROWS, 3))
    label = (rng.random(LUNA_CANDIDATE_ROWS) < 1557 / LUNA_CANDIDATE_ROWS).astype(int)
    with open(folder / "candidates.csv", "w") as f:
        f.write("seriesuid,coordX,coordY,coordZ,class\n")
        f.writelines(f"{uids[s]},{x:.6f},{y:.6f},{z:.6f},{c}\n" for s, (x, y, z), c in zip(which, xyz, label))
    nodules = np.flatnonzero(label)[:1186]
    with open(folder / "annotations.csv", "w") as f:
        f.write("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
        f.writelines(f"{uids[which[i]]},{xyz[i, 0]:.6f},{xyz[i, 1]:.6f},{xyz[i, 2]:.6f},{rng.uniform(3, 30):.3f}\n"
                     for i in nodules)


def bench_index(folder: Path) -> dict:
    if not (folder / "candidates.csv").is_file():
        write_luna_scale_csvs(folder)
    runs = [timed(build_index, folder, require_on_disk=False) for _ in range(3)]
    return {"rows": LUNA_CANDIDATE_ROWS, "seconds_median": float(np.median([s for s, _ in runs])),
            "index_rows": len(runs[0][1])}


def main() -> None:
    results = {}
    demo = BENCH_DIR / "demo"
    steps = [("luna_synth_demo", lambda: bench_synth(demo)),
             ("luna_prep_demo", lambda: bench_prep(demo, workers=min(2, os.cpu_count() or 1))),
             ("crop_extraction", lambda: bench_crops(demo)),
             ("index_build_luna_scale", lambda: bench_index(BENCH_DIR / "luna-scale-csv"))]
    for name, step in steps:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = step()
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in results[name].items()), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
