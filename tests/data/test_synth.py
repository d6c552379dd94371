import csv
import re

import numpy as np
import pytest
import SimpleITK as sitk

import p2ch_app.data.synth
from p2ch_app.data.ct import irc_to_xyz, load_ct, xyz_to_irc
from p2ch_app.data.index import read_excluded
from p2ch_app.data.synth import (
    EXCLUDED_CLEARANCE_MM,
    PRESETS,
    SynthRun,
    Tiles,
    _place_nodules,
    _sample_chest,
    _vessel_trees,
    make_series,
    make_tiled_series,
    write_dataset,
)
from p2ch_app.errors import UserError
from p2ch_app.metrics import roc_auc
from tests.conftest import small_geometry, snapshot

SMALL = small_geometry()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    written = write_dataset(root, series=3, subsets=2, seed=7, geometry=SMALL, run=SynthRun(progress=False))
    return root, written


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_layout_headers_and_uids(dataset):
    root, written = dataset
    assert sorted(p.name for p in root.iterdir()) == [
        "annotations.csv", "annotations_excluded.csv", "annotations_with_malignancy.csv", "candidates.csv", "subset0",
        "subset1"]
    assert [p.parent.name for _, p in written] == ["subset0", "subset1", "subset0"]
    for uid, mhd in written:
        assert (mhd.with_suffix(".raw")).is_file() and mhd.stem == uid
        assert len(uid) <= 64 and re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid)
    assert read_rows(root / "candidates.csv")[0] == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert read_rows(root / "annotations.csv")[0] == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    assert read_rows(root / "annotations_excluded.csv")[0] == ["seriesuid", "coordX", "coordY", "coordZ",
                                                               "diameter_mm"]
    mal = read_rows(root / "annotations_with_malignancy.csv")
    assert mal[0] == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "mal_bool", "mal_details",
                      "bboxLowX", "bboxLowY", "bboxLowZ", "bboxHighX", "bboxHighY", "bboxHighZ", "len_mal_details"]
    for row in mal[1:]:
        ratings = [int(r) for r in row[6].strip("[]").split(",")]
        assert row[5] in ("True", "False") and (np.mean(ratings) > 3) == (row[5] == "True")
        assert int(row[13]) == len(ratings)


def test_files_read_back_with_simpleitk(dataset):
    _, written = dataset
    for uid, mhd in written:
        image = sitk.ReadImage(str(mhd))
        assert image.GetPixelID() == sitk.sitkInt16 and image.GetSize()[:2] == (96, 96)
        assert 3.2 <= image.GetSpacing()[0] <= 3.6 and 3.0 <= image.GetSpacing()[2] <= 3.5
        ct = load_ct(mhd)
        assert ct.series_uid == uid and ct.hu.shape == image.GetSize()[::-1]


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    root, _ = dataset
    write_dataset(tmp_path / "again", series=3, subsets=2, seed=7, geometry=SMALL,
                  run=SynthRun(progress=False, workers=2))
    assert snapshot(tmp_path / "again") == snapshot(root)
    write_dataset(tmp_path / "other", series=1, subsets=2, seed=8, geometry=SMALL, run=SynthRun(progress=False))
    assert (tmp_path / "other" / "candidates.csv").read_bytes() != (root / "candidates.csv").read_bytes()


def test_annotations_inside_their_ct_on_nodule_tissue_and_class1_within_radius(dataset):
    root, written = dataset
    cts = {uid: load_ct(mhd) for uid, mhd in written}
    annotations = read_rows(root / "annotations.csv")[1:]
    assert annotations, "seed 7 must give nodules"
    for uid, x, y, z, diameter in annotations:
        ct = cts[uid]
        irc = np.rint(xyz_to_irc((float(x), float(y), float(z)), ct.geometry)).astype(int)
        assert ct.contains(irc)
        assert ct.hu[tuple(irc)] > -700, (uid, irc)
    by_series = {}
    for uid, x, y, z, d in annotations:
        by_series.setdefault(uid, []).append((np.array([float(x), float(y), float(z)]), float(d)))
    for uid, x, y, z, label in read_rows(root / "candidates.csv")[1:]:
        if label == "1":
            point = np.array([float(x), float(y), float(z)])
            assert any(np.linalg.norm(point - c) <= d / 2 for c, d in by_series[uid])


def test_excluded_findings_are_small_blobs_inside_their_ct_away_from_nodules(dataset):
    root, written = dataset
    cts = {uid: load_ct(mhd) for uid, mhd in written}
    rows = read_rows(root / "annotations_excluded.csv")[1:]
    assert {uid for uid, *_ in rows} == set(cts)  # one to three in every series
    nodules = {}
    for uid, x, y, z, d in read_rows(root / "annotations.csv")[1:]:
        nodules.setdefault(uid, []).append((np.array([float(x), float(y), float(z)]), float(d)))
    for uid, x, y, z, diameter in rows:
        centre, diameter = np.array([float(x), float(y), float(z)]), float(diameter)
        assert 2.0 <= diameter < 3.0  # under LUNA16's 3 mm: never a nodule to find
        assert cts[uid].contains(xyz_to_irc(centre, cts[uid].geometry))
        for nodule, d in nodules.get(uid, []):
            assert np.linalg.norm(centre - nodule) > d / 2 + diameter / 2 + EXCLUDED_CLEARANCE_MM
    excluded = read_excluded(root)  # what the evaluation reads
    assert sum(len(excluded.for_series(uid)[1]) for uid in cts) == len(rows)


def test_excluded_blobs_change_only_their_own_voxels(monkeypatch):
    """Painted from a generator of their own, last: without them every draw, row and other voxel is the same."""
    series = make_series(8, SMALL)
    monkeypatch.setattr(p2ch_app.data.synth, "_paint_excluded", lambda *args: [])
    before = make_series(8, SMALL)
    assert series.uid == before.uid and series.candidates == before.candidates and series.nodules == before.nodules
    assert len(series.excluded) == 3 and before.excluded == []
    changed = np.argwhere(series.hu != before.hu)
    spacing = series.geometry.spacing
    reach = [np.linalg.norm(irc_to_xyz(changed, series.geometry) - c, axis=1) for c, _ in series.excluded]
    # every changed voxel lies within a blob's painted box (radius + 1 mm + the partial-volume ramp)
    assert (np.min(reach, axis=0) <= 2.9 / 2 + 1 + np.cbrt(np.prod(spacing)) + np.linalg.norm(spacing)).all()
    for k in range(len(series.excluded)):  # each blob made some voxels denser
        mine = changed[np.argmin(reach, axis=0) == k]
        assert len(mine) and (series.hu[tuple(mine.T)] > before.hu[tuple(mine.T)]).all()


def inner_mean(series, nodule) -> float:
    """Mean HU within half the nodule's radius: its tissue, not its partial-volume rim."""
    shape = np.array(series.hu.shape)
    idx = np.stack(np.indices(shape), -1).reshape(-1, 3)
    center = xyz_to_irc(nodule.center_xyz, series.geometry)
    near = idx[np.all(np.abs(idx - center) <= nodule.diameter_mm / series.geometry.spacing[::-1].min(), axis=1)]
    dist = np.linalg.norm(irc_to_xyz(near, series.geometry) - nodule.center_xyz, axis=1)
    return float(series.hu[tuple(near[dist <= nodule.diameter_mm / 4].T)].mean())


def test_ground_glass_is_darker_than_solid():
    means = {"solid": [], "ground-glass": []}
    for seed in (20, 26, 28, 29):  # seeds whose series hold both kinds
        series = make_series(seed, SMALL)
        for n in series.nodules:
            if n.diameter_mm >= 6:
                means[n.kind].append(inner_mean(series, n))
    assert len(means["solid"]) >= 3 and len(means["ground-glass"]) >= 3
    assert max(means["ground-glass"]) < min(means["solid"]) - 200
    assert all(-700 < m < -250 for m in means["ground-glass"]) and all(m > -100 for m in means["solid"])


def test_anatomy_intensities():
    series = make_series(3, SMALL)
    hu = np.clip(series.hu, -1000, 1000)
    z = hu.shape[0] // 2
    slab = hu[z - 2:z + 3]
    assert (slab > 300).any()  # bone: ribs and spine
    assert ((slab > -150) & (slab < -50)).mean() > 0.005  # fat
    assert ((slab > 0) & (slab < 80)).mean() > 0.05  # soft tissue
    lung_like = slab[(slab > -950) & (slab < -750)]
    assert lung_like.size > 0.05 * slab.size and -900 < lung_like.mean() < -800
    assert (hu[:, :3, :3] == -1000).all()  # air (or blanked field) in the corners


def sample_nodules(seed: int):
    """Nodules as make_series places them, without rendering a volume (fast)."""
    rng = np.random.default_rng(seed)
    chest = _sample_chest(rng, 340.0)
    return _place_nodules(chest, _vessel_trees(chest, rng), rng)[0]


def test_nodule_mix_over_many_series():
    nodules = [n for seed in range(150) for n in sample_nodules(seed)]
    diameters = np.array([n.diameter_mm for n in nodules])
    assert 3 <= diameters.min() and diameters.max() <= 30
    # LUNA16's annotations: 4% under 4 mm, 42% under 6 mm, median 6.4 mm
    assert (diameters < 4).mean() < 0.08 and 0.32 < (diameters < 6).mean() < 0.52 and 5.5 < np.median(diameters) < 7.5
    assert {n.shape for n in nodules} == {"round", "lobulated", "spiculated"}
    assert {n.attached for n in nodules} == {"isolated", "pleural", "vascular"}
    assert {n.kind for n in nodules} == {"solid", "ground-glass"}


# LUNA16's annotations_with_malignancy.csv (1,182 nodules): malignant share by size band, diameter-only AUC
LUNA16_MALIGNANT_SHARE = {(0, 6): 0.044, (6, 8): 0.164, (8, 15): 0.688, (15, 99): 0.944}
LUNA16_DIAMETER_AUC = 0.919


def draw_labelled(n: int, seed: int):
    """n nodules' morphology and malignancy as luna-synth draws them, without rendering a CT."""
    rng = np.random.default_rng(seed)
    nodules = [p2ch_app.data.synth.draw_morphology(rng) for _ in range(n)]
    labels = [p2ch_app.data.synth.draw_malignant(rng, *nodule) for nodule in nodules]
    return nodules, np.array(labels)


def test_malignancy_follows_luna16_by_size_and_morphology_moves_it():
    nodules, malignant = draw_labelled(4000, seed=3)
    diameters = np.array([d for d, _, _ in nodules])
    for (low, high), share in LUNA16_MALIGNANT_SHARE.items():
        band = (diameters >= low) & (diameters < high)
        assert abs(malignant[band].mean() - share) <= 0.05, (low, high, malignant[band].mean())
    assert roc_auc(malignant, diameters) == pytest.approx(LUNA16_DIAMETER_AUC, abs=0.02)
    # within a band, spiculated and lobulated nodules are malignant more often, ground glass less
    band = (diameters >= 6) & (diameters < 15)
    shape = np.array([s for _, _, s in nodules])
    kind = np.array([k for _, k, _ in nodules])
    for more, less in (("spiculated", "round"), ("lobulated", "round")):
        assert malignant[band & (shape == more)].mean() > malignant[band & (shape == less)].mean() + 0.15
    assert malignant[band & (kind == "ground-glass")].mean() < malignant[band & (kind == "solid")].mean() - 0.15
    # so a reader of the generator's own variables beats diameter alone (docs: the oracle AUC)
    oracle = [p2ch_app.data.synth.malignancy_probability(*nodule) for nodule in nodules]
    assert roc_auc(malignant, oracle) > roc_auc(malignant, diameters) + 0.03


def test_malignancy_probability_keeps_the_share_at_each_diameter():
    for diameter in (4.0, 7.0, 9.0, 12.0, 20.0):
        odds = p2ch_app.data.synth._shape_odds(diameter)
        ggn = 0.25 if diameter >= 5 else 0.0
        mean = sum(k_share * s_share * p2ch_app.data.synth.malignancy_probability(diameter, kind, shape)
                   for kind, k_share in (("solid", 1 - ggn), ("ground-glass", ggn))
                   for shape, s_share in zip(p2ch_app.data.synth.SHAPES, odds))
        assert mean == pytest.approx(p2ch_app.data.synth.malignant_share(diameter), abs=1e-6)


def test_nodules_option_fills_each_series():
    chest_rng = np.random.default_rng(4)
    chest = _sample_chest(chest_rng, 340.0)
    nodules, _ = _place_nodules(chest, _vessel_trees(chest, chest_rng), chest_rng, (6,))
    assert len(nodules) == 6


def test_refuses_to_overwrite_without_the_flag(dataset, tmp_path):
    root, _ = dataset
    before = snapshot(root)
    with pytest.raises(UserError, match="already holds a dataset.*--overwrite"):
        write_dataset(root, series=1, seed=1, geometry=SMALL, run=SynthRun(progress=False))
    assert snapshot(root) == before


def test_presets_match_luna16_and_demo_geometry():
    assert PRESETS["full"].matrix == 512 and PRESETS["full"].inplane_mm == (0.5, 0.9)
    assert PRESETS["full"].slice_mm == (0.6, 2.5) and PRESETS["demo"].matrix == 256


@pytest.mark.parametrize("tiles, crop", [(Tiles(pixels=30), (32, 24, 24)), (Tiles(), (32, 48, 48))])
def test_tiles_hold_each_nodule_and_its_crop_in_a_tile_of_its_own(tmp_path, tiles, crop):
    """crop: the voxels the classifier reads, at crop_zoom 2 and unzoomed."""
    written = write_dataset(tmp_path, series=2, seed=5, geometry=SMALL, nodule_counts=(4,),
                            run=SynthRun(progress=False), tiles=tiles)
    depth, cols = tiles.slices, tiles.pixels
    annotations = read_rows(tmp_path / "annotations.csv")[1:]
    candidates = read_rows(tmp_path / "candidates.csv")[1:]
    assert len(annotations) == 8 and sum(label == "1" for *_, label in candidates) == 8
    half = np.array(crop) // 2
    for uid, mhd in written:
        ct = load_ct(mhd)
        count = ct.hu.shape[2] // cols
        assert ct.hu.shape == (depth, cols, cols * count) and count == 4 + 2  # and half as many vessel spots
        used = []
        for row in [r for r in candidates if r[0] == uid]:
            irc = np.rint(xyz_to_irc(tuple(float(v) for v in row[1:4]), ct.geometry)).astype(int)
            used.append(irc[2] // cols)
            within = np.array([irc[0], irc[1], irc[2] % cols])
            assert np.all(within >= half) and np.all(within <= np.array([depth, cols, cols]) - half)
        assert sorted(used) == list(range(count))  # one candidate per tile
        for _, x, y, z, _ in [r for r in annotations if r[0] == uid]:
            irc = np.rint(xyz_to_irc((float(x), float(y), float(z)), ct.geometry)).astype(int)
            assert ct.hu[tuple(irc)] > -700  # nodule tissue at its centre


def test_tiled_nodules_are_drawn_as_whole_chests_draw_them():
    tiled = [make_tiled_series(seed, SMALL, (6,), Tiles(pixels=30)) for seed in range(20)]
    assert all(len(s.nodules) == 6 for s in tiled)
    diameters = np.array([n.diameter_mm for s in tiled for n in s.nodules])
    assert 5.0 < np.median(diameters) < 8.0  # LUNA16's median: 6.4 mm
    assert (make_tiled_series(3, SMALL, (6,), Tiles(pixels=30)).hu == tiled[3].hu).all()
