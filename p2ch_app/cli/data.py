"""luna-synth and luna-prep: a dataset in the LUNA16 layout, and the cache every trainer reads."""

from __future__ import annotations

import click

from p2ch_app.cli.options import app_command, cache_dir_of, cache_dir_option, require_dir, workers_default
from p2ch_app.errors import UserError
from p2ch_app.files import check_writable


@app_command("luna-synth")
@click.option("--series", type=click.IntRange(1), default=30, show_default=True, help="Number of CT series.")
@click.option("--subsets", type=click.IntRange(1, 10), default=10, show_default=True,
              help="Spread the series over subset0..subset{K-1}.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--size", type=click.Choice(["demo", "full"]), default="demo", show_default=True,
              help="demo: 256x256 slices, ~1.3 mm pixels (CPU-friendly); full: 512x512, LUNA16 spacing.")
@click.option("--matrix", type=click.IntRange(32), default=None, help="In-plane pixels (overrides --size).")
@click.option("--inplane-mm", type=(float, float), default=None, metavar="MIN MAX",
              help="Range of in-plane spacing in mm (overrides --size).")
@click.option("--slice-mm", type=(float, float), default=None, metavar="MIN MAX",
              help="Range of slice spacing in mm (overrides --size).")
@click.option("--nodules", type=click.IntRange(1, 12), default=None, metavar="N",
              help="N nodules in every series (as many as fit 10 mm apart), for a nodule-rich set such as "
                   "luna-finetune-mal's. [default: 0-4 per series, as in LUNA16]")
@click.option("--tiles", is_flag=True,
              help="Each series holds a chest's nodules, and half as many vessel spots, in tiles side by side "
                   "(a classifier crop around each and a margin), not the whole chest: a nodule-rich set for "
                   "luna-finetune-mal at a fraction of the time per nodule.")
@click.option("--tile-pixels", type=click.IntRange(8), default=54, show_default=True,
              help="With --tiles, a tile's rows and columns: 54 holds an unzoomed crop (48) and a margin; 30 "
                   "holds a crop_zoom 2 crop (24), as the demo's classifier takes, in 60% of the time.")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True,
              help="Processes generating series in parallel (the output does not depend on it).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --data-root.")
def synth(**opts):
    """Write a synthetic chest-CT dataset in the exact LUNA16 layout."""
    from p2ch_app.data.synth import NODULE_COUNTS, SynthRun, Tiles, geometry_for, write_dataset

    geometry = geometry_for(opts["size"], opts["matrix"], opts["inplane_mm"], opts["slice_mm"])
    counts = NODULE_COUNTS if opts["nodules"] is None else (opts["nodules"],)
    written = write_dataset(opts["data_root"], series=opts["series"], subsets=opts["subsets"], seed=opts["seed"],
                            geometry=geometry, nodule_counts=counts,
                            run=SynthRun(overwrite=opts["overwrite"], workers=opts["workers"]),
                            tiles=Tiles(pixels=opts["tile_pixels"]) if opts["tiles"] else None)
    click.echo(f"wrote {len(written)} synthetic series to {opts['data_root']}")


@app_command("luna-prep")
@cache_dir_option
@click.option("--workers", type=click.IntRange(1), default=workers_default, show_default=True,
              help="Parallel processes.")
@click.option("--series", "series_uids", multiple=True, metavar="UID",
              help="Only this series (repeatable).")
def prep(**opts):
    """Build the cache that training reads: CT geometry and nodule label masks, and a copy of a CT only
    where its file cannot be read in place (LUNA16's .mhd/.raw files are memory-mapped).

    Each record is bound to this data root: it names its data file relative to the root, with the
    file's size, time, device and inode. A root copied or moved (cache included) or a --cache-dir
    shared with another root gets records of its own here; another root's are never read.

    Idempotent: only missing or stale series are built, so an interrupted run resumes.
    """
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.data.ct import check_uid
    from p2ch_app.data.index import build_index

    data_root = require_dir(opts["data_root"], "data root", "pass --data-root DIR (or run luna-synth to make one)")
    try:
        uids = [check_uid(u) for u in opts["series_uids"]] or None
    except UserError as err:  # the library's fix serves every command; luna-prep can say where UIDs are
        raise err.with_fix("pass --series with a UID listed in candidates.csv") from None
    index = build_index(data_root)
    for uid in uids or []:
        if uid not in index.series_uids:
            raise UserError(f"series {uid} is not on disk under {data_root}/subset*/ or has no row in "
                            "candidates.csv; check the UID")
    cache = LunaCache(cache_dir_of(opts), data_root)
    for folder in (cache.dir, cache.dir / "volumes", cache.dir / "meta"):
        check_writable(folder, "--cache-dir", folder=True)
    done = cache.build(index, uids, workers=opts["workers"])
    mb = done["bytes"] / 2**20
    per_ct = mb / max(done["series"], 1)
    click.echo(f"cache {cache.dir}: built {done['built']}, already current {done['skipped']}; "
               f"{done['series']} series, {mb:.1f} MB ({per_ct:.1f} MB per CT)")
