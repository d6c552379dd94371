"""`make bench`: speed and quality figures, printed and saved to bench-results/bench.json.

Works on its own copy of the demo dataset under data-unversioned/bench/, so the demo's data and
cache are never touched. Run from the project root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import diskcache
import numpy as np

from p2ch_app.checkpoints import load_checkpoint
from p2ch_app.cli import finetune_mal, synth, train_cls, train_seg
from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import CROP_SIZE, irc_to_xyz, slice_stack
from p2ch_app.data.index import build_index

BENCH_DIR = Path("data-unversioned/bench")
RESULTS = Path("bench-results/bench.json")
LUNA_CANDIDATE_ROWS = 551_065
LUNA_SERIES = 888


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def bench_synth(root: Path) -> dict:
    """luna-synth with the demo's own config, so the bench measures exactly the demo dataset."""
    shutil.rmtree(root, ignore_errors=True)
    seconds, _ = timed(run_command, synth, ["--config", "configs/demo.toml", "--data-root", str(root)])
    series = len(list(root.glob("subset*/*.mhd")))
    return {"series": series, "seconds": seconds, "seconds_per_series": seconds / series}


def bench_synth_tiles(chests: int = 5) -> dict:
    """Seconds per nodule of a nodule-rich set (8 per chest, the demo's geometry), one process: whole
    CTs against luna-synth --tiles at 54 and 30 pixels; medians over `chests` chests."""
    from p2ch_app.data.synth import PRESETS, Tiles, make_series, make_tiled_series

    makers = {"whole_ct": lambda seed: make_series(seed, PRESETS["demo"], (8,)),
              "tiles_54": lambda seed: make_tiled_series(seed, PRESETS["demo"], (8,), Tiles()),
              "tiles_30": lambda seed: make_tiled_series(seed, PRESETS["demo"], (8,), Tiles(pixels=30))}
    result = {}
    for name, make in makers.items():
        per_nodule = []
        for seed in range(chests):
            seconds, series = timed(make, seed)
            per_nodule.append(seconds / max(len(series.nodules), 1))
        result[f"{name}_seconds_per_nodule"] = float(np.median(per_nodule))
    return result


def bench_prep(root: Path, workers: int) -> dict:
    cache_dir = root / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    index = build_index(root)
    raw_bytes = sum(p.stat().st_size for p in root.glob("subset*/*.raw"))
    seconds, done = timed(LunaCache(cache_dir, root).build, index, workers=workers, progress=False)
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

    def read_memmap(zoom: float = 1.0):
        cache = LunaCache(cache_dir, root)
        for uid, xyz in picks:
            cache.crop(uid, xyz, zoom=zoom)  # a contiguous copy, ready for a batch

    volumes = list((cache_dir / "volumes").glob("*.npy"))
    read_memmap()
    warm, _ = timed(read_memmap)
    zoomed, _ = timed(read_memmap, 2)  # interpolated in-plane, as the demo's classifier (--crop-zoom 2) reads
    evict(volumes)
    cold, _ = timed(read_memmap)

    store_dir = BENCH_DIR / "crop-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    cache = LunaCache(cache_dir, root)
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
    return {"crops": n, "memmap_warm_per_s": n / warm, "memmap_zoom2_warm_per_s": n / zoomed,
            "memmap_cold_per_s": n / cold,
            "diskcache_warm_per_s": n / store_warm, "diskcache_cold_per_s": n / store_cold}


def _read_rates(cache_dir: Path, root: Path, crops: list, stacks: list, files: list[Path]) -> dict:
    """Crops (32x48x48, as the classifier trains) and whole-slice stacks (7 slices, as the U-Net trains
    without patches) per second, from a fresh LunaCache as each training process opens it: warm (the
    files in the page cache), then cold (evicted first)."""

    def read_crops():
        cache = LunaCache(cache_dir, root)
        for uid, xyz in crops:
            cache.crop(uid, xyz)

    def read_stacks():
        cache = LunaCache(cache_dir, root)
        for uid, k in stacks:
            slice_stack(cache.volume(uid), k, 3)

    out = {}
    for name, read, n in (("crops", read_crops, len(crops)), ("stacks", read_stacks, len(stacks))):
        read()
        warm, _ = timed(read)
        evict(files)
        cold, _ = timed(read)
        out |= {f"{name}_warm_per_s": n / warm, f"{name}_cold_per_s": n / cold}
    return out


def _cache_both_ways(root: Path, folder: Path) -> dict:
    """luna-prep's cache of root (the .raw files read in place) and one with int16 copies of the CTs
    (copy_volumes, as every cache was before): their folders, MB per CT, and prep seconds per CT."""
    index = build_index(root)
    out = {"index": index}
    for kind, copy in (("mapped", False), ("copied", True)):
        cache_dir = folder / kind
        shutil.rmtree(cache_dir, ignore_errors=True)
        seconds, done = timed(LunaCache(cache_dir, root).build, index, workers=min(2, os.cpu_count() or 1),
                              progress=False, copy_volumes=copy)
        out |= {f"{kind}_dir": cache_dir, f"{kind}_mb_per_ct": done["bytes"] / 2**20 / done["series"],
                f"{kind}_prep_s_per_ct": seconds / done["built"]}
    out["raw_mb_per_ct"] = sum(p.stat().st_size for p in root.glob("subset*/*.raw")) / 2**20 / len(index.series_uids)
    return out


def write_luna_sized_ct(root: Path, shape=(300, 512, 512)) -> None:
    """One CT of LUNA16's size, written as LUNA16 writes them (.mhd + little-endian int16 .raw): air
    outside the scan circle at -3024 HU (clipped as it is read), lung, one solid nodule annotated."""
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.300512512"
    folder = root / "subset0"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.ogrid[:shape[1], :shape[2]]
    plane = np.where((yy - 256) ** 2 + (xx - 256) ** 2 < 250 ** 2, -850, -3024).astype("<i2")
    hu = np.broadcast_to(plane, shape).copy()
    hu[140:160, 246:266, 166:186] = 40  # the nodule: 20 voxels across
    hu.tofile(folder / f"{uid}.raw")
    (folder / f"{uid}.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = -180 -180 -400\nElementSpacing = 0.7 0.7 1.25\n"
        f"DimSize = {shape[2]} {shape[1]} {shape[0]}\nElementType = MET_SHORT\nElementDataFile = {uid}.raw\n")
    x, y, z = -180 + 0.7 * 175.5, -180 + 0.7 * 255.5, -400 + 1.25 * 149.5
    (root / "annotations.csv").write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid},{x},{y},{z},14.0\n")
    offsets = ((0, 0, 0), (-60, 40, 90), (50, -70, -120))  # the nodule (class 1) and two class-0 candidates
    (root / "candidates.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "".join(
        f"{uid},{x + dx},{y + dy},{z + dz},{int(dx == 0)}\n" for dx, dy, dz in offsets))


def _bench_cache_of(root: Path, folder: Path, n_crops: int, n_stacks: int) -> dict:
    """_cache_both_ways and _read_rates of one data root: crops centred on random voxels of random
    series, stacks around random slices of random series."""
    built = _cache_both_ways(root, folder)
    uids, rng, mapped = built.pop("index").series_uids, np.random.default_rng(0), LunaCache(built["mapped_dir"], root)
    records = {uid: mapped.record(uid) for uid in uids}
    crop_picks = [(uids[i], irc_to_xyz(rng.uniform(0, records[uids[i]].shape), records[uids[i]].geometry))
                  for i in rng.integers(len(uids), size=n_crops)]
    stack_picks = [(uids[i], int(rng.integers(records[uids[i]].shape[0])))
                   for i in rng.integers(len(uids), size=n_stacks)]
    out = {}
    for kind in ("mapped", "copied"):
        cache_dir = built.pop(f"{kind}_dir")
        files = list(root.glob("subset*/*.raw")) if kind == "mapped" else list(cache_dir.glob("volumes/*.npy"))
        out |= {f"{kind}_{k}": v for k, v in _read_rates(cache_dir, root, crop_picks, stack_picks, files).items()}
    return out | built


def bench_cache_reads(demo: Path, crops: int = 2000, stacks: int = 300) -> dict:
    """What luna-prep's cache costs and how fast trainers read it, now that LUNA16-style .raw files are
    read where they lie (clipped as read) instead of copied: crops and slice stacks per second, cold
    and warm, mapped versus copied, and the cache's MB per CT, for the demo data and one 512x512x300 CT."""
    if not (demo / "candidates.csv").is_file():
        bench_synth(demo)
    luna_sized = BENCH_DIR / "luna-sized-ct"
    if not (luna_sized / "candidates.csv").is_file():
        write_luna_sized_ct(luna_sized)
    out = {}
    for name, root, n_crops, n_stacks in (("demo", demo, crops, stacks), ("luna_sized", luna_sized, crops // 4,
                                                                          stacks // 3)):
        found = _bench_cache_of(root, BENCH_DIR / "cache-reads" / name, n_crops, n_stacks)
        out |= {f"{name}_{k}": v for k, v in found.items()}
    return out


def write_luna_scale_csvs(folder: Path) -> None:
    """candidates.csv with the real row count (551,065) over 888 series, plus 1186 annotations."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    uids = [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{int.from_bytes(rng.bytes(12), 'big') + 10**29}"
            for _ in range(LUNA_SERIES)]
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


def run_command(command, args: list[str]) -> None:
    """Run a click command in this process; a failure stops the bench instead of skewing it."""
    code = command.main(args, standalone_mode=False)
    if code:
        sys.exit(f"bench stopped: {command.name} {' '.join(args)} exited with {code}")


def newest_run(runs: Path, command: str) -> Path:
    return max((runs / command).iterdir(), key=lambda p: p.stat().st_mtime)


def bench_demo_models(root: Path) -> dict:
    """The demo's three trainings (configs/demo.toml) and their validation figures and speeds."""
    runs = BENCH_DIR / "runs"
    common = ["--config", "configs/demo.toml", "--data-root", str(root), "--runs-dir", str(runs)]
    run_command(train_seg, [*common, "--comment", "bench-demo"])
    seg = load_checkpoint(newest_run(runs, "luna-train-seg") / "best.pt")
    run_command(train_cls, [*common, "--comment", "bench-demo"])
    cls_best = newest_run(runs, "luna-train-cls") / "best.pt"
    run_command(finetune_mal, [*common, "--from", str(cls_best), "--comment", "bench-demo"])
    cls_val = load_checkpoint(cls_best)["metrics"]["val"]
    mal_val = load_checkpoint(newest_run(runs, "luna-finetune-mal") / "best.pt")["metrics"]["val"]
    return {"seg_train_samples_per_s": seg["timing"]["train_samples_per_s"],
            "seg_val_recall": seg["metrics"]["val"]["recall"], "seg_val_precision": seg["metrics"]["val"]["precision"],
            "cls_val_f1": cls_val["f1"], "cls_val_auc": cls_val["auc"], "mal_val_auc": mal_val["auc"],
            "mal_val_diameter_auc": mal_val["diameter_auc"]}


REAL_CT = Path("../shared/data/real-ct/cptac-C3N-00247-lung-3.0-B70f")
BOOK_MODELS = Path("../shared/models/book")
BOOK_CANDIDATES = Path("../shared/data/reference/cptac-book-candidates.csv")
REAL_CT_MASS_XYZ = (-83.0, -192.0, -195.0)  # the 19.4 mm mass at the right lung's base (docs/benchmarks.md)


def _real_ct_mass_irc(ct) -> np.ndarray:
    from p2ch_app.data.ct import xyz_to_irc

    return xyz_to_irc(np.array([REAL_CT_MASS_XYZ]), ct.geometry)


def _lungs_over(root: Path, uids: list[str]) -> tuple[int, int, list[float]]:
    """(annotated nodules, those inside the lung mask, litres per series) over a data root's series."""
    from p2ch_app.data.ct import load_series, xyz_to_irc
    from p2ch_app.inference.lungs import lungs_of

    index = build_index(root)
    nodules = inside = 0
    litres = []
    for uid in uids:
        ct = load_series(root, uid)
        lungs = lungs_of(ct.hu, ct.geometry.spacing)
        truth = index.for_series(uid)
        centers = truth.center_xyz[truth.has_annotation]
        nodules += len(centers)
        inside += int(lungs.contains(xyz_to_irc(centers, ct.geometry).reshape(-1, 3)).sum()) if lungs.found else 0
        litres.append(lungs.litres)
    return nodules, inside, litres


def demo_sets() -> dict[str, tuple[Path, list[str]]]:
    """The demo's validation series (every 4th of its 40, configs/demo.toml) and 20 further series that
    nothing was tuned on (seed 7, docs/experiments.md), both made here when missing."""
    from p2ch_app.data.synth import SynthRun, write_dataset

    demo, further = BENCH_DIR / "demo", BENCH_DIR / "further"
    if not (demo / "candidates.csv").is_file():
        bench_synth(demo)
    if not (further / "candidates.csv").is_file():
        write_dataset(further, series=20, seed=7, run=SynthRun(overwrite=True, progress=False))
    index = build_index(demo)
    val = [u for u, v in zip(index.series_uids, index.validation_series(4)) if v]
    return {"validation": (demo, val), "further": (further, build_index(further).series_uids)}


def bench_lung_mask(runs: int = 5) -> dict:
    """The lung mask of --lung-only: its time on the real CT beside the body mask's (medians of `runs`),
    its volume and whether the 19.4 mm mass stays in it; on all 40 demo series and the 20 further ones,
    the annotated nodules inside it (all of them, pleural- and vessel-attached included) and its volumes."""
    from p2ch_app.data.ct import load_ct
    from p2ch_app.inference.lungs import find_lungs
    from p2ch_app.inference.postprocess import body_mask, mask_step

    result = {}
    if REAL_CT.is_dir():
        ct = load_ct(REAL_CT)
        step = mask_step(ct.hu.shape)
        body_s = [timed(body_mask, ct.hu, step)[0] for _ in range(runs)]
        body = body_mask(ct.hu, step)
        lung_s = [timed(find_lungs, ct.hu, ct.geometry.spacing, body, step)[0] for _ in range(runs)]
        lungs = find_lungs(ct.hu, ct.geometry.spacing, body, step)
        result.update(real_ct_lungs_s_median=float(np.median(lung_s)), real_ct_body_s_median=float(np.median(body_s)),
                      real_ct_lungs_and_body_s_median=float(np.median(np.add(lung_s, body_s))),
                      real_ct_lung_litres=lungs.litres, real_ct_lung_air_litres=lungs.air_litres,
                      real_ct_mass_inside=bool(lungs.contains(_real_ct_mass_irc(ct))[0]))
    sets = demo_sets()
    for name, root in (("demo", sets["validation"][0]), ("further", sets["further"][0])):
        nodules, inside, litres = _lungs_over(root, build_index(root).series_uids)
        result.update({f"{name}_nodules": nodules, f"{name}_nodules_inside": inside,
                       f"{name}_litres_min": min(litres), f"{name}_litres_max": max(litres)})
    return result


def _segment_both_ways(ct, segmenter, device, runs: int) -> tuple[list[float], list[float], bool, float]:
    """segment() over the whole CT and within the lungs' box: each one's seconds (`runs` times), whether
    the box holds the whole CT's mask, and the share of each slice the U-Net then sees (halo included)."""
    from p2ch_app.inference.lungs import lungs_of
    from p2ch_app.inference.pipeline import segment
    from p2ch_app.inference.runtime import around

    box = lungs_of(ct.hu, ct.geometry.spacing).box(ct.hu.shape)
    whole = [timed(segment, ct.hu, segmenter, device) for _ in range(runs)]
    boxed = [timed(segment, ct.hu, segmenter, device, box=box) for _ in range(runs)]
    interior = tuple(slice(span.start + 1, span.stop - 1) for span in box)  # the erosion eats the box's rim
    same = bool(np.array_equal(whole[-1][1][interior], boxed[-1][1][interior]))
    rows, cols = (around(span, size, segmenter) for span, size in zip(box[1:], ct.hu.shape[1:]))
    seen = (rows.stop - rows.start) * (cols.stop - cols.start) * (box[0].stop - box[0].start) / ct.hu.size
    return [s for s, _ in whole], [s for s, _ in boxed], same, seen


def bench_lung_box(runs: int = 3) -> dict:
    """--lung-only runs the U-Net within the lungs' box: segmentation's seconds over the whole CT and
    within the box (medians of `runs`; the book's U-Net on the real CT, the demo's on 4 of its
    validation series), whether the box holds the whole CT's mask to the bit, and the share seen."""
    import torch

    device, result = torch.device("cpu"), {}
    if BOOK_MODELS.is_dir() and REAL_CT.is_dir():
        from p2ch_app.data.ct import load_ct

        whole, boxed, same, seen = _segment_both_ways(load_ct(REAL_CT), _book_models(device).segmenter, device, runs)
        result.update(real_ct_whole_s_median=float(np.median(whole)), real_ct_box_s_median=float(np.median(boxed)),
                      real_ct_box_same_mask=same, real_ct_share_seen=seen)
    models, _ = _demo_own_models(device)
    if models is None:
        return {**result, "demo": "skipped: no models of make demo in runs/ (or P2CH_DEMO_RUNS)"}
    from p2ch_app.data.ct import load_series

    root, uids = demo_sets()["validation"]
    measured = [_segment_both_ways(load_series(root, uid), models.segmenter, device, runs) for uid in uids[:4]]
    result.update(demo_whole_s_median=float(np.median([np.median(m[0]) for m in measured])),
                  demo_box_s_median=float(np.median([np.median(m[1]) for m in measured])),
                  demo_box_same_mask=all(m[2] for m in measured),
                  demo_share_seen=float(np.mean([m[3] for m in measured])))
    return result


def _variants(ct, models, device) -> dict[str, list]:
    """The detections (threshold 0) of nodule-analyze with and without --lung-only, alone and with
    --tta --dedupe, from one segmentation and one classification of the CT: each candidate's plain and
    mirror-averaged probabilities, then the lungs and the duplicates filtered in analyze()'s order."""
    from p2ch_app.data.ct import irc_to_xyz
    from p2ch_app.inference.lungs import lungs_of
    from p2ch_app.inference.pipeline import AnalysisSettings, Detection, classify, propose
    from p2ch_app.inference.postprocess import suppress_duplicates
    from p2ch_app.inference.size import sphere_diameters

    centers, voxels, inside = propose(ct.hu, models.segmenter, device)
    centers, voxels = centers[inside], voxels[inside]
    plain = classify(ct.hu, centers, models.classifier, device)
    mirrored = plain.copy()
    chosen = plain >= AnalysisSettings().tta_floor
    mirrored[chosen] = classify(ct.hu, centers[chosen], models.classifier, device,
                                AnalysisSettings(tta=True, tta_floor=0.0))
    lungs = lungs_of(ct.hu, ct.geometry.spacing)
    in_lungs = lungs.contains(centers) if lungs.found else np.ones(len(centers), bool)
    xyz, diameters = irc_to_xyz(centers, ct.geometry).reshape(-1, 3), sphere_diameters(voxels, ct.geometry.spacing)
    found = {}
    for name, probs, dedupe in (("plain", plain, False), ("tta_dedupe", mirrored, True)):
        for lung_only in (False, True):
            keep = np.flatnonzero(in_lungs) if lung_only else np.arange(len(centers))
            if dedupe:
                keep = keep[suppress_duplicates(xyz[keep], diameters[keep], probs[keep])]
            keep = keep[np.argsort(-probs[keep], kind="stable")]
            found[name + ("_lung_only" if lung_only else "")] = [
                Detection(tuple(xyz[i]), tuple(centers[i]), float(probs[i]), None, float(diameters[i]), int(voxels[i]),
                          True) for i in keep]
    return found


def _scores_on(root: Path, uids: list[str], models, device) -> dict:
    """CPM and false positives per scan at 0.5 of each _variants() variant over a set of series."""
    from p2ch_app.data.ct import load_series
    from p2ch_app.data.index import read_excluded
    from p2ch_app.evaluation.scoring import evaluate
    from p2ch_app.evaluation.series import scan_result

    index, excluded = build_index(root), read_excluded(root)
    scans: dict[str, list] = {}
    for uid in uids:
        for name, detections in _variants(load_series(root, uid), models, device).items():
            scans.setdefault(name, []).append(scan_result(detections, index.for_series(uid), False,
                                                          excluded.for_series(uid)))
    result = {}
    for name, results in scans.items():
        metrics = evaluate(results, 0.5)
        result[f"{name}_cpm"] = metrics["cpm"]
        result[f"{name}_fp_per_scan"] = metrics["confusion"]["Non-nodule"]["Pred. nodule"] / len(results)
    return result


def _demo_own_models(device):
    """The models `make demo` trained (the averaged U-Net and classifier of runs/luna-average, or its
    newest best.pt files); P2CH_DEMO_RUNS names another runs folder. None when there are none."""
    from p2ch_app.inference.pipeline import load_models

    runs = Path(os.environ.get("P2CH_DEMO_RUNS", "runs"))
    found = []
    for command in ("luna-train-seg", "luna-train-cls"):
        averaged = sorted((runs / "luna-average").glob(f"{command}-*.pt"), key=lambda p: p.stat().st_mtime)
        best = sorted((runs / command).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
        if not averaged and not best:
            return None, None
        found.append((averaged or best)[-1])
    return load_models(found[0], found[1], None, device), [str(p) for p in found]


def bench_lung_only_book() -> dict:
    """--lung-only's effect with the book's models: CPM and false positives per scan at 0.5, with and
    without it, alone and with --tta --dedupe, on the demo's validation series and its 20 further
    series; and on the real CT, how many detections at 0.5 remain and the 19.4 mm mass's rank (0: gone)."""
    import torch

    if not BOOK_MODELS.is_dir():
        return {"skipped": f"{BOOK_MODELS} is absent"}
    device = torch.device("cpu")
    models = _book_models(device)
    result = {}
    for name, (root, uids) in demo_sets().items():
        result.update({f"{name}_{k}": v for k, v in _scores_on(root, uids, models, device).items()})
    if REAL_CT.is_dir():
        from p2ch_app.data.ct import load_ct

        ct = load_ct(REAL_CT)
        mass = _real_ct_mass_irc(ct)[0]
        for name, detections in _variants(ct, models, device).items():
            reported = [d for d in detections if d.nodule_prob >= 0.5]
            result[f"real_ct_{name}_detections"] = len(reported)
            result[f"real_ct_{name}_mass_rank"] = next(
                (rank for rank, d in enumerate(reported, 1) if np.linalg.norm(np.subtract(d.center_irc, mass)) < 5), 0)
    return result


def bench_lung_only_demo() -> dict:
    """As bench_lung_only_book on the demo's sets, with the models `make demo` trained."""
    import torch

    device = torch.device("cpu")
    models, paths = _demo_own_models(device)
    if models is None:
        return {"skipped": "no models of make demo in runs/ (or P2CH_DEMO_RUNS)"}
    result = {"models": paths}
    for name, (root, uids) in demo_sets().items():
        result.update({f"{name}_{k}": v for k, v in _scores_on(root, uids, models, device).items()})
    return result

def _cached_root(root: Path) -> Path:
    """root with its cache built (series already cached are skipped)."""
    LunaCache(root / "cache", root).build(build_index(root), workers=2, progress=False)
    return root


def training_sets() -> dict[str, Path]:
    """The demo's data, and six LUNA16-sized series (512x512 slices at LUNA16's spacing, six nodules
    each so the malignancy trainer has benign and malignant ones to validate on), made when missing."""
    from p2ch_app.data.synth import PRESETS, SynthRun, write_dataset

    demo, luna_sized = demo_sets()["validation"][0], BENCH_DIR / "luna-sized-train"
    if not (luna_sized / "candidates.csv").is_file():
        write_dataset(luna_sized, series=6, seed=11, geometry=PRESETS["full"], nodule_counts=(6,),
                      run=SynthRun(overwrite=True, progress=False, workers=2))
    return {"demo": _cached_root(demo), "luna_sized": _cached_root(luna_sized)}


def bench_train() -> dict:
    """Each trainer's stages (scripts/train_stages.py) on the demo's data and on LUNA16-sized series,
    and the book's trainers beside ours on the demo's data, same batch size and workers
    (scripts/book_trainers.py; skipped without the book's code)."""
    from book_trainers import DEFAULT_BOOK_CODE, book_training_rate
    from train_stages import StageRun, measure, table

    shapes = {"cls": (24, 480), "seg": (16, 1920), "mal": (24, 1920)}  # batch size, samples of the timed epoch
    result, tables, sets = {}, [], training_sets()
    for set_name, root in sets.items():
        found = {kind: measure(StageRun(kind, root, batch, samples=n, runs_dir=BENCH_DIR / "stage-runs"))
                 for kind, (batch, n) in shapes.items()}
        tables.append(f"{set_name}:\n{table(found)}")
        result.update({f"{set_name}_{kind}_{k}": v for kind, figures in found.items() for k, v in figures.items()})
    for kind in ("cls", "seg"):
        batch, n = shapes[kind]
        book = book_training_rate(DEFAULT_BOOK_CODE, sets["demo"], BENCH_DIR / "book-work", kind, batch,
                                  workers=2, samples=n, augmented=True)
        if "skipped" in book:
            result["book_skipped"] = book["skipped"]
            break
        steady = book["steady_samples_per_s"] or book["samples_per_s"]  # after its first two batches: warm, as ours
        result.update({f"book_{kind}_samples_per_s": book["samples_per_s"], f"book_{kind}_steady": steady,
                       f"ours_vs_book_{kind}": result[f"demo_{kind}_whole"] / steady})
        result["book_commit"] = book["commit"]
    print("\n\n".join(tables), flush=True)
    return result


def _book_models(device):
    from p2ch_app.inference.pipeline import load_models

    return load_models(next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state")), None, device)


def bench_conv_floor(models, slices: int, crops: int, batch_size: int = 8, repeats: int = 10) -> dict:
    """How fast the pipeline's own convolutions run on this CPU, layer by layer (each alone, on its
    real input shape: one 512x512 slice for the U-Net, a batch of crops for the classifier), and
    what the real CT's convolutions alone would take: at these rates, and all at the best rate any
    layer reached (a floor for direct convolution, the only kind oneDNN runs on a CPU without AVX-512)."""
    import torch
    from train_stages import conv_flops

    context = models.segmenter.config.context
    stack = torch.randn(1, 2 * context + 1, 512, 512).contiguous(memory_format=torch.channels_last)
    batch = torch.randn(batch_size, 1, *CROP_SIZE).mul(300).contiguous(memory_format=torch.channels_last_3d)
    result, best = {}, 0.0
    for name, model, x, calls in (("segment", models.segmenter, stack, slices),
                                  ("classify", models.classifier, batch, crops / batch_size)):
        seconds = flop = 0.0
        with torch.inference_mode():
            for layer, inputs, layer_flop in conv_flops(model, x):
                layer(inputs)
                took, _ = timed(lambda: [layer(inputs) for _ in range(repeats)])
                seconds, flop = seconds + took / repeats, flop + layer_flop
                best = max(best, layer_flop * repeats / took)
        result[f"{name}_conv_tflop"] = flop * calls / 1e12
        result[f"{name}_conv_seconds_at_layer_rates"] = seconds * calls
        result[f"{name}_conv_gflop_per_s"] = flop / seconds / 1e9
    result["best_layer_gflop_per_s"] = best / 1e9
    total_tflop = result["segment_conv_tflop"] + result["classify_conv_tflop"]
    result["conv_floor_seconds_at_best_rate"] = total_tflop * 1e12 / best
    return result


def _peak_of_command(command: list[str]) -> tuple[float, float]:
    """(seconds, peak GiB) of one run of command. Linux counts the memory of the process that starts
    a child in the child's peak (it is the child's until exec), and this process has grown by now:
    so a small launcher starts the command and reads the command's peak, with the launcher's
    ~10 MB as the least it can report."""
    import subprocess

    launcher = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
                "stderr=subprocess.DEVNULL); _, status, usage = os.wait4(child.pid, 0); "
                "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", launcher, *command], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    status, peak_kib = map(int, done.stdout.split())
    if status != 0:
        raise RuntimeError(f"{command[0]} failed with status {status}")
    return seconds, peak_kib / 2**20


def _network_alone(model, inputs: list) -> float:
    """Seconds for model's forward passes over ready-made inputs: a stage's floor, nothing else left."""
    import torch

    with torch.inference_mode():
        seconds, _ = timed(lambda: [model(x) for x in inputs])
    return seconds


def _segment_floor(models, hu: np.ndarray) -> float:
    """The U-Net alone on the segment stage's inputs: every slice's stack, in the same pieces."""
    import torch

    from p2ch_app.data.ct import context_stacks
    from p2ch_app.inference.runtime import in_pieces

    windows = context_stacks(hu, 0, len(hu), models.segmenter.config.context)  # (slices, H, W, 2C+1)
    stacks = [torch.from_numpy(windows[i:i + 1].astype(np.float32)).permute(0, 3, 1, 2)  # channels-last, as
              for i in range(len(hu))]                                                 # slice_probabilities
    return _network_alone(lambda x: in_pieces(models.segmenter, x), stacks)


def _classify_floor(models, hu: np.ndarray, centers: np.ndarray, batch_size: int) -> float:
    """The classifier alone on the classify stage's inputs: the same crops, gathered beforehand."""
    import torch

    from p2ch_app.data.ct import gather_crops

    config = models.classifier.config  # cut as the classify stage cuts them: the model's size and zoom
    batches = [torch.from_numpy(gather_crops(hu, centers[i:i + batch_size], config.crop_size,
                                             zoom=config.crop_zoom)).float()[:, None]
               .contiguous(memory_format=torch.channels_last_3d) for i in range(0, len(centers), batch_size)]
    return _network_alone(models.classifier, batches)


def _stages(models, device, batch_size: int) -> tuple[dict, dict]:
    """Each stage of nodule-analyze on the real CT timed alone and, for the two network stages, beside
    its floor (the network alone on the inputs that stage runs): (figures, what the stages found)."""
    from p2ch_app.data.ct import load_ct
    from p2ch_app.inference.pipeline import AnalysisSettings, classify, group, segment
    from p2ch_app.inference.postprocess import inside_body
    from p2ch_app.inference.runtime import keep_freed_memory

    keep_freed_memory()  # as nodule-analyze does
    stage = {}
    stage["load"], ct = timed(load_ct, REAL_CT)
    hu = ct.hu
    stage["segment"], mask = timed(segment, hu, models.segmenter, device)
    stage["group"], (centers, voxels) = timed(group, mask, hu)
    stage["body_mask"], inside = timed(inside_body, hu, centers)
    settings = AnalysisSettings(batch_size=batch_size)
    stage["classify"], probs = timed(classify, hu, centers[inside], models.classifier, device, settings)
    figures = {f"stage_{k}_s": v for k, v in stage.items()}
    for name, floor in (("segment", _segment_floor(models, hu)),
                        ("classify", _classify_floor(models, hu, centers[inside], batch_size))):
        figures.update({f"stage_{name}_floor_s": floor, f"stage_{name}_over_floor": stage[name] / floor})
    found = {"hu": hu, "centers": centers, "voxels": voxels, "inside": inside, "probs": probs}
    return figures, found


def _against_book(csv_path: Path) -> dict:
    """The command's candidates (default mode) beside the book's own pipeline's on the same CT: the
    reference's candidates inside our body mask, compared one to one (evaluation.reference)."""
    from dataclasses import asdict

    from p2ch_app.data.ct import load_ct
    from p2ch_app.evaluation.reference import compare, read_candidates
    from p2ch_app.inference.postprocess import inside_body

    book = read_candidates(BOOK_CANDIDATES)
    inside = inside_body(load_ct(REAL_CT).hu, book["irc"])
    comparison = compare(read_candidates(csv_path), {k: v[inside] for k, v in book.items()})
    return {"book_candidates": len(book["xyz"]), **{f"vs_book_{k}": v for k, v in asdict(comparison).items()},
            "vs_book_exact": comparison.exact(1e-4)}


def _fast_effect(models, device, found: dict, batch_size: int) -> dict:
    """How --fast (bfloat16 on CPU) moves probabilities and masks, and its speed here. On CPUs without
    bf16 instructions it is emulated (many times slower), so a small sample suffices."""
    from p2ch_app.inference.pipeline import AnalysisSettings, classify, segment

    hu, centers, probs = found["hu"], found["centers"][found["inside"]], found["probs"]
    sample = np.random.default_rng(0).choice(len(centers), size=min(48, len(centers)), replace=False)
    plain, fast = AnalysisSettings(batch_size=batch_size), AnalysisSettings(batch_size=batch_size, fast=True)
    fast_s, fast_probs = timed(classify, hu, centers[sample], models.classifier, device, fast)
    plain_s, _ = timed(classify, hu, centers[sample], models.classifier, device, plain)
    fast_seg_s, fast_mask = timed(segment, hu[40:48], models.segmenter, device, True)
    plain_seg_s, plain_mask = timed(segment, hu[40:48], models.segmenter, device, False)
    return {"fast_classify_speedup": plain_s / fast_s, "fast_segment_speedup": plain_seg_s / fast_seg_s,
            "fast_max_prob_diff": float(np.abs(fast_probs - probs[sample]).max()),
            "fast_mean_prob_diff": float(np.abs(fast_probs - probs[sample]).mean()),
            "fast_mask_voxels_changed_share": float((fast_mask != plain_mask).sum() / max(plain_mask.sum(), 1))}


def bench_real_ct(batch_size: int = 8, runs: int = 3) -> dict:
    """nodule-analyze on the real CT with the book's models, default options: the whole command's
    median time and peak memory over `runs` runs, its candidates beside the book's own pipeline's,
    each stage beside its floor, the convolutions layer by layer, and what --fast changes."""
    import torch

    if not REAL_CT.is_dir() or not BOOK_CANDIDATES.is_file():
        return {"skipped": f"{REAL_CT} or {BOOK_CANDIDATES} is absent"}
    out_csv = BENCH_DIR / "real-ct.csv"
    command = [str(Path(sys.executable).parent / "nodule-analyze"), "--ct", str(REAL_CT), "--batch-size",
               str(batch_size), "--seg-model", str(next(BOOK_MODELS.glob("seg_*.state"))), "--cls-model",
               str(next(BOOK_MODELS.glob("cls_*.state"))), "--runs-dir", str(BENCH_DIR / "runs"),
               "--threshold", "0", "--output", str(out_csv)]
    measured = [_peak_of_command(command) for _ in range(runs)]
    result = {"command_seconds_median": float(np.median([s for s, _ in measured])),
              "command_seconds_all": [round(s, 1) for s, _ in measured],
              "command_peak_rss_gib": max(p for _, p in measured), **_against_book(out_csv)}
    device = torch.device("cpu")
    models = _book_models(device)
    stages, found = _stages(models, device, batch_size)
    inside = found["inside"]
    result.update(stages, candidates=len(found["centers"]), candidates_inside_body=int(inside.sum()),
                  single_voxel_candidates=int((found["voxels"] == 1).sum()),
                  classify_crops_per_s=int(inside.sum()) / stages["stage_classify_s"])
    result.update(bench_conv_floor(models, len(found["hu"]), int(inside.sum()), batch_size))
    result.update(_fast_effect(models, device, found, batch_size))
    return result


def bench_luna_sized(slices: int = 300) -> dict:
    """nodule-analyze with the book's models on one synthetic chest CT of LUNA16's size (512x512, 1 mm
    slices, about `slices` of them): the whole command's time and peak memory per CT."""
    from p2ch_app.data.synth import SynthRun, geometry_for, write_dataset

    if not BOOK_MODELS.is_dir():
        return {"skipped": f"{BOOK_MODELS} is absent"}
    root = BENCH_DIR / "luna-sized-chest"
    if not (root / "candidates.csv").is_file():
        write_dataset(root, 1, subsets=1, seed=23, geometry=geometry_for("full", slice_mm=(1.0, 1.0)),
                      run=SynthRun(overwrite=True, progress=False))
    mhd = next(root.glob("subset0/*.mhd"))
    command = [str(Path(sys.executable).parent / "nodule-analyze"), "--ct", str(mhd), "--seg-model",
               str(next(BOOK_MODELS.glob("seg_*.state"))), "--cls-model", str(next(BOOK_MODELS.glob("cls_*.state"))),
               "--runs-dir", str(BENCH_DIR / "runs")]
    seconds, peak = _peak_of_command(command)
    shape = [int(v) for v in next(line for line in mhd.read_text().splitlines()
                                  if line.startswith("DimSize")).split("=")[1].split()]
    return {"shape_xyz": shape, "command_seconds_per_ct": seconds, "command_peak_rss_gib": peak}


def bench_realism(series: int = 20, min_diameter: float = 6.0) -> dict:
    """Full-size synthetic CTs (512x512, LUNA spacing) through the book's models, which never saw our
    data: the share of nodules >= 6 mm they find (confusion-table rule: a detection with nodule
    probability >= 0.5 within 0.7 diameters) and their false positives per scan."""
    from dataclasses import replace

    import torch

    import p2ch_app.data.synth as synth_module
    from p2ch_app.data.synth import PRESETS, SynthRun, write_dataset
    from p2ch_app.evaluation.scoring import confusion, cpm
    from p2ch_app.evaluation.series import analyze_series
    from p2ch_app.inference.pipeline import AnalysisSettings

    if not BOOK_MODELS.is_dir():
        return {"skipped": f"{BOOK_MODELS} is absent"}
    root = BENCH_DIR / "full"
    stamp = root / "generator.sha256"  # the synth.py that wrote the data: a changed generator writes it afresh
    generator = hashlib.sha256(Path(synth_module.__file__).read_bytes()).hexdigest()
    if (not (root / "candidates.csv").is_file() or len(build_index(root).series_uids) != series
            or not stamp.is_file() or stamp.read_text().strip() != generator):
        write_dataset(root, series, subsets=1, seed=11, geometry=PRESETS["full"],
                      run=SynthRun(overwrite=True, workers=2))
        stamp.write_text(generator)
    index = build_index(root)
    device = torch.device("cpu")
    seconds, results = timed(analyze_series, root, index, index.series_uids, _book_models(device),
                             AnalysisSettings(), device)
    scans = [scan for _, _, scan in results]
    table = confusion(scans)
    big = [replace(s, nodules_xyz=s.nodules_xyz[s.diameters_mm >= min_diameter],
                   diameters_mm=s.diameters_mm[s.diameters_mm >= min_diameter],
                   malignant=s.malignant[s.diameters_mm >= min_diameter]) for s in scans]
    big_table = confusion(big)
    nodules = sum(sum(big_table[row].values()) for row in ("Benign", "Malignant"))
    found = sum(big_table[row]["Pred. nodule"] for row in ("Benign", "Malignant"))
    segmented = nodules - sum(big_table[row]["Complete miss"] for row in ("Benign", "Malignant"))
    return {"series": len(scans), "nodules_6mm_plus": nodules, "found_share_6mm_plus": found / max(nodules, 1),
            "segmented_share_6mm_plus": segmented / max(nodules, 1),
            "false_positives_per_scan": table["Non-nodule"]["Pred. nodule"] / len(scans),
            "candidates_per_scan": sum(len(d) for _, d, _ in results) / len(scans),
            "cpm_all_sizes": cpm(scans, bootstrap=0)["cpm"], "analyze_seconds_per_scan": seconds / len(scans)}


def _median_ms(runners: dict, x, runs: int) -> dict:
    """Median milliseconds per call of each runner on x, the runners taking turns call by call (so a
    machine that slows down for a while slows all of them alike), after two warm-up calls each."""
    for run in runners.values():
        run(x)
        run(x)
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def _channels_last_runner(model, x):
    """PyTorch as nodule-analyze runs it: a copy of the model and its input laid out channels-last
    (channels_last_3d for the classifier's crops), the input's layout made beforehand."""
    import copy

    import torch

    layout = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    model = copy.deepcopy(model).to(memory_format=layout)
    batch = torch.from_numpy(x).contiguous(memory_format=layout)

    def run(_):
        with torch.inference_mode():
            return model(batch)

    return run


def bench_export_runtimes(runs: int = 10) -> dict:
    """The book's two models exported by luna-export's library (each export checked on the real CT first),
    then timed in their runtimes beside PyTorch on the same input: TorchScript (torch.jit) for the .pt file,
    ONNX Runtime for the .onnx file. U-Net: one 512x512 7-slice stack of the real CT; classifier: a batch of 8
    crops; PyTorch also channels-last, as nodule-analyze runs both. ONNX Runtime gets as many
    intra-op threads as torch has."""
    import importlib.util

    import torch

    from p2ch_app.checkpoints import CLASSIFIER, SEGMENTER, load_model
    from p2ch_app.export import (
        ONNX_MODULES,
        VerifyPlan,
        crop_samples,
        eager_outputs,
        export_checkpoint,
        load_export,
        stack_samples,
        verification_ct,
    )

    if not REAL_CT.is_dir() or not BOOK_MODELS.is_dir():
        return {"skipped": f"{REAL_CT} or {BOOK_MODELS} is absent"}
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed; pip install -e '.[export]'"}
    threads = torch.get_num_threads()
    hu, _ = verification_ct(REAL_CT)
    out_dir = BENCH_DIR / "export"
    result = {"threads": threads, "runs": runs}
    for net, prefix, kind in (("unet", "seg", SEGMENTER), ("classifier", "cls", CLASSIFIER)):
        path = next(BOOK_MODELS.glob(f"{prefix}_*.state"))
        model = load_model(path, kind)
        if kind == SEGMENTER:
            x = stack_samples(hu, model.config.context, VerifyPlan(stacks=((1, 512, 512),)))[0].x
        else:
            x = crop_samples(hu, model.config, VerifyPlan(crop_batches=(8,)))[0].x
        runners = {"pytorch": lambda v, model=model: eager_outputs(model, v),
                   "pytorch_channels_last": _channels_last_runner(model, x)}
        for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
            report = export_checkpoint(path, fmt, out_dir / f"{net}{suffix}", REAL_CT)
            result[f"{net}_{fmt}_max_abs_diff"] = report.max_diff
            runners[fmt] = load_export(report.output, fmt, threads)
        result[f"{net}_input"] = "x".join(map(str, x.shape))
        result.update({f"{net}_{name}_ms": ms for name, ms in _median_ms(runners, x, runs).items()})
    return result


SERVE_CLIENTS = (1, 4, 16, 64)


def bench_serve(seconds: float = 8.0) -> dict:
    """nodule-serve's /predict at 1, 4, 16 and 64 concurrent clients, batched (the defaults) and with
    --max-batch 1 (the book's server, one request at a time); then 4 concurrent /analyze of the real CT."""
    from p2ch_app.serve.client import Client, free_port, launch, predict_load, stop

    if not BOOK_MODELS.is_dir():
        return {"skipped": f"{BOOK_MODELS} is absent"}
    book_args = ["--seg-model", str(next(BOOK_MODELS.glob("seg_*.state"))), "--cls-model",
                 str(next(BOOK_MODELS.glob("cls_*.state")))]
    crop = np.random.default_rng(0).normal(-600, 300, (1, 32, 48, 48)).astype(np.float32)
    out = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    for name, extra in (("batched", []), ("max_batch_1", ["--max-batch", "1"])):
        port = free_port()
        process = launch(port, [*book_args, "--results-dir", str(BENCH_DIR / "serve-results"), *extra])
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(20):  # warm-up
                Client(url).predict(np.zeros((1, 32, 48, 48), np.float32))
            for clients in SERVE_CLIENTS:
                for key, value in predict_load(url, crop, clients, seconds).items():
                    out[f"{name}_c{clients}_{key}"] = value
        finally:
            stop(process)
    out["speedup_c16"] = out["batched_c16_requests_per_s"] / out["max_batch_1_c16_requests_per_s"]
    out["goal_c16_4x_and_lower_p99"] = bool(out["speedup_c16"] >= 4 and
                                            out["batched_c16_p99_ms"] < out["max_batch_1_c16_p99_ms"])
    out.update(_bench_serve_analyze(book_args))
    return out


def _bench_serve_analyze(book_args: list[str], uploads: int = 4) -> dict:
    """`uploads` concurrent /analyze of the real CT (its DICOM series zipped): all must finish, and each
    result must equal nodule-analyze --output x.json on that CT."""
    import subprocess
    import threading
    import zipfile

    from p2ch_app.serve.client import Client, free_port, launch, stop

    if not REAL_CT.is_dir():
        return {"analyze_skipped": f"{REAL_CT} is absent"}
    archive = BENCH_DIR / "real-ct.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(REAL_CT.iterdir()):
            zipped.write(path, path.name)
    expected = BENCH_DIR / "real-ct-analyze.json"
    subprocess.run([str(Path(sys.executable).parent / "nodule-analyze"), "--ct", str(REAL_CT), *book_args,
                    "--runs-dir", str(BENCH_DIR / "runs"), "--output", str(expected)], check=True,
                   stdout=subprocess.DEVNULL)
    port = free_port()
    process = launch(port, [*book_args, "--results-dir", str(BENCH_DIR / "serve-results")])
    jobs = []
    start = time.perf_counter()
    try:
        def upload():
            client = Client(f"http://127.0.0.1:{port}", timeout=600)
            status, job = client.submit(archive)
            jobs.append(client.wait(job["id"], timeout=1800) if status == 202 else {"state": f"HTTP {status}"})

        threads = [threading.Thread(target=upload) for _ in range(uploads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    finally:
        peak = stop(process)
    reference = json.loads(expected.read_text())
    return {"analyze_uploads": uploads, "analyze_done": sum(job["state"] == "done" for job in jobs),
            "analyze_all_equal_nodule_analyze": all(job.get("result") == reference for job in jobs),
            "analyze_seconds_all": seconds, "analyze_server_peak_rss_gib": peak}


def main() -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    demo = BENCH_DIR / "demo"
    steps = [("luna_synth_demo", lambda: bench_synth(demo)),
             ("luna_prep_demo", lambda: bench_prep(demo, workers=min(2, os.cpu_count() or 1))),
             ("luna_synth_tiles", bench_synth_tiles),
             ("crop_extraction", lambda: bench_crops(demo)),
             ("cache_mapped_reads", lambda: bench_cache_reads(demo)),
             ("index_build_luna_scale", lambda: bench_index(BENCH_DIR / "luna-scale-csv")),
             ("train", bench_train),
             ("demo_models", lambda: bench_demo_models(demo)),
             ("real_ct_book_models", bench_real_ct),
             ("lung_mask", bench_lung_mask),
             ("lung_only_book_models", bench_lung_only_book),
             ("lung_only_demo_models", bench_lung_only_demo),
             ("lung_box_segment", bench_lung_box),
             ("luna_sized_ct", bench_luna_sized),
             ("realism_full_size_book_models", bench_realism),
             ("export_runtimes", bench_export_runtimes),
             ("serve", bench_serve)]
    wanted = sys.argv[1:]  # step names to run (the others keep their saved figures); none: all
    unknown = set(wanted) - {name for name, _ in steps}
    if unknown:
        sys.exit(f"unknown bench step(s) {', '.join(sorted(unknown))}; steps: {', '.join(n for n, _ in steps)}")
    for name, step in steps:
        if wanted and name not in wanted:
            continue
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = step()
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in results[name].items()), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
