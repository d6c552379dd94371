"""The lung mask on hand-made chests whose lungs, nodules and gas are known, on CTs without lungs, and
on the demo's own synthetic series; and --lung-only in the pipeline."""

import numpy as np
import pytest

from p2ch_app.data.ct import CtVolume, Geometry, xyz_to_irc
from p2ch_app.inference.lungs import CLOSE_MM, MARGIN_MM, find_lungs, lungs_of
from p2ch_app.inference.pipeline import AnalysisSettings, Models, analyze
from p2ch_app.inference.postprocess import body_mask
from tests.inference.test_pipeline import CentreSliceThreshold, CentreVoxelClassifier

SPACING = (2.0, 2.0, 4.0)  # xyz mm
SHAPE = (60, 160, 160)  # z 0..236 mm, x and y -160..158 mm
LUNG_CENTERS = ((-65.0, -5.0, 170.0), (65.0, -5.0, 170.0))  # right lung at -x, left at +x
LUNG_AXES = (50.0, 75.0, 90.0)  # the top of each lung is cut by the scan's last slice, as apices often are
# (centre xyz mm, diameter mm): against the pleura (a 30 mm mass, the largest LUNA16 annotates), against
# the mediastinum, on the diaphragm, and one the lung surrounds
NODULES = {"pleural 30 mm": ((-115 + 0.85 * 15, -5.0, 170.0), 30.0),
           "pleural 8 mm, back": ((65.0, -5 + 75 - 0.85 * 4, 170.0), 8.0),
           "mediastinal 20 mm": ((15 + 0.85 * 10, -5.0, 160.0), 20.0),
           "diaphragm 15 mm": ((-65.0, -5.0, 80 + 0.85 * 7.5), 15.0),
           "inside 12 mm": ((-60.0, 10.0, 150.0), 12.0)}
STOMACH = ((60.0, -20.0, 45.0), (45.0, 35.0, 30.0))  # about 200 mL of gas under the left lung
BOWEL = (((-50.0, 30.0, 30.0), 12.0), ((10.0, 50.0, 20.0), 10.0))
NOT_LUNG = {"stomach": STOMACH[0], "bowel": BOWEL[0][0], "chest wall 12 mm out": (-127.0, -5.0, 130.0),
            "heart, 25 mm from both lungs": (0.0, -40.0, 150.0), "outside the body": (0.0, -150.0, 150.0)}


def _mm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = np.indices(SHAPE, dtype=np.float32)
    return x * SPACING[0] - 160, y * SPACING[1] - 160, z * SPACING[2]


def _ellipsoid(x, y, z, center, axes) -> np.ndarray:
    return sum(((c - m) / a) ** 2 for c, m, a in zip((x, y, z), center, axes)) <= 1


def _ct(hu: np.ndarray, uid: str) -> CtVolume:
    return CtVolume(hu.astype(np.int16), Geometry(np.array([-160.0, -160.0, 0.0]), np.array(SPACING), np.eye(3)), uid)


def _body(x, y, rng) -> np.ndarray:
    """Air around a 300 x 200 mm soft-tissue body on a table, with noise."""
    hu = rng.normal(-1000, 10, SHAPE)
    hu[((x / 150) ** 2 + (y / 100) ** 2 <= 1)] = 40 + rng.normal(0, 10, SHAPE)[((x / 150) ** 2 + (y / 100) ** 2 <= 1)]
    hu[(y > 115) & (y < 125)] = 120  # the table, apart from the body
    return hu


def chest(gas: bool = True) -> tuple[CtVolume, np.ndarray]:
    """A chest and upper abdomen: two lungs of mottled -850 HU crossed by vessels, the NODULES, and
    (with gas) pure-air stomach and bowel gas below them. Returns the CT and the true lungs."""
    rng = np.random.default_rng(0)
    x, y, z = _mm()
    hu = _body(x, y, rng)
    lungs = np.zeros(SHAPE, bool)
    for center in LUNG_CENTERS:
        lungs |= _ellipsoid(x, y, z, center, LUNG_AXES)
    hu[lungs] = rng.normal(-850, 25, SHAPE)[lungs]
    for cx in (-65.0, 65.0):  # vessels: 6 mm tubes along y and z, holes in the air of every slice they cross
        hu[lungs & ((x - cx) ** 2 + (z - 150) ** 2 <= 9)] = 40
        hu[lungs & ((x - cx - 15) ** 2 + (y - 20) ** 2 <= 9)] = 40
    for center, diameter in NODULES.values():
        hu[_ellipsoid(x, y, z, center, (diameter / 2,) * 3)] = 40
    if gas:
        hu[_ellipsoid(x, y, z, *STOMACH)] = rng.normal(-1000, 10, SHAPE)[_ellipsoid(x, y, z, *STOMACH)]
        for center, radius in BOWEL:
            hu[_ellipsoid(x, y, z, center, (radius,) * 3)] = -1000
    return _ct(hu, "1.2.840.99.70"), lungs


def no_lungs(kind: str) -> CtVolume:
    """A head (skull, brain, small sinuses), an abdomen (bowel gas and a 400 mL stomach bubble of air),
    or a phantom (a water cylinder with an air-filled insert): air inside the body, but no lungs."""
    rng = np.random.default_rng(1)
    x, y, z = _mm()
    if kind == "phantom":
        hu = rng.normal(-1000, 10, SHAPE)
        hu[x ** 2 + y ** 2 <= 100 ** 2] = rng.normal(0, 5, SHAPE)[x ** 2 + y ** 2 <= 100 ** 2]
        hu[(x - 40) ** 2 + y ** 2 <= 15 ** 2] = -1000
        return _ct(hu, "1.2.840.99.73")
    hu = _body(x, y, rng)
    if kind == "head":
        skull = _ellipsoid(x, y, z, (0, 0, 120), (80, 95, 110))
        hu[skull] = 700
        hu[_ellipsoid(x, y, z, (0, 0, 120), (74, 89, 104))] = 35
        for cx in (-20.0, 20.0):
            hu[_ellipsoid(x, y, z, (cx, -70, 60), (10, 12, 15))] = -1000  # maxillary sinuses, ~8 mL each
        return _ct(hu, "1.2.840.99.71")
    hu[_ellipsoid(x, y, z, (40, -20, 150), (60, 45, 35))] = -1000  # the stomach's gas, ~400 mL
    for center in ((-60, 20, 100), (-30, 40, 60), (50, 40, 30)):
        hu[_ellipsoid(x, y, z, center, (15, 12, 30))] = -1000  # colon gas
    return _ct(hu, "1.2.840.99.72")


def inside(lungs, points_xyz, ct: CtVolume) -> np.ndarray:
    return lungs.contains(xyz_to_irc(np.array(points_xyz, float).reshape(-1, 3), ct.geometry))


@pytest.fixture(scope="module")
def made_chest():
    return chest()


def test_lungs_hold_every_nodule_and_leave_out_gas_heart_and_wall(made_chest):
    ct, true_lungs = made_chest
    lungs = lungs_of(ct.hu, ct.geometry.spacing)
    assert lungs.found
    for name, (center, _) in NODULES.items():
        assert inside(lungs, center, ct).all(), name
    for name, point in NOT_LUNG.items():
        assert not inside(lungs, point, ct).any(), name
    mask = lungs.on_grid(ct.hu.shape)
    right = true_lungs & (np.indices(SHAPE)[2] < SHAPE[2] // 2)
    # both lungs (no airway joins them: the left one is found as a second lung), their edge voxels too
    assert mask[right].mean() > 0.995 and mask[true_lungs & ~right].mean() > 0.995
    assert mask[-1].sum() >= 0.99 * true_lungs[-1].sum()  # not eroded away at the last slice
    true_litres = true_lungs.sum() * np.prod(SPACING) / 1e6
    assert true_litres < lungs.litres < 1.6 * true_litres  # the margin, not half the abdomen
    assert 0.9 * true_litres < lungs.air_litres < true_litres  # the air alone: vessels and nodules are not air


def test_pleural_nodule_centre_is_kept_only_by_the_closing_and_margin(made_chest):
    """The 30 mm pleural mass's centre lies 15 mm from the nearest lung air: without the closing it
    would fall outside a 5 mm margin. The mask's edge there: its centre in, the wall beside it out."""
    ct, _ = made_chest
    lungs = lungs_of(ct.hu, ct.geometry.spacing)
    (cx, cy, cz), diameter = NODULES["pleural 30 mm"]
    assert diameter / 2 > MARGIN_MM and diameter / 2 <= CLOSE_MM
    assert inside(lungs, (cx, cy, cz), ct).all()
    assert not inside(lungs, (-115 - MARGIN_MM - 8, cy, cz), ct).any()  # beyond the lung's edge plus the margin


@pytest.mark.parametrize("kind", ["head", "abdomen", "phantom"])
def test_no_lungs_in_a_head_an_abdomen_or_a_phantom(kind):
    ct = no_lungs(kind)
    lungs = lungs_of(ct.hu, ct.geometry.spacing)
    assert not lungs.found and lungs.litres == 0 and lungs.mask.shape[0] == SHAPE[0]


def test_find_lungs_works_on_the_body_masks_grid(made_chest):
    ct, _ = made_chest
    for step in (1, 2):
        lungs = find_lungs(ct.hu, ct.geometry.spacing, body_mask(ct.hu, step), step)
        assert lungs.step == 2 * step and lungs.on_grid(ct.hu.shape).shape == ct.hu.shape
        assert all(inside(lungs, center, ct).all() for center, _ in NODULES.values())


def test_lung_box_spans_the_mask_on_the_cts_grid():
    from p2ch_app.inference.lungs import Lungs

    mask = np.zeros((6, 5, 8), bool)  # every second row and column of a 6 x 9 x 16 CT
    mask[1, 2, 3] = mask[4, 3, 5] = True
    box = Lungs(mask, 2, 1.0, 0.0).box((6, 9, 16))
    assert box == (slice(1, 5), slice(4, 8), slice(6, 12))
    mask[5, 4, 7] = True  # the last mask row and column cover the CT's last row, but not beyond it
    assert Lungs(mask, 2, 1.0, 0.0).box((6, 9, 16)) == (slice(1, 6), slice(4, 9), slice(6, 16))


def stand_in_models() -> Models:
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 100).float()  # anything denser than 100 HU
    return models


def with_dense_spots(ct: CtVolume, points_xyz) -> CtVolume:
    """The CT with a 16 mm ball of 600 HU at each point: what the stand-in models find."""
    x, y, z = _mm()
    hu = ct.hu.copy()
    for point in points_xyz:
        hu[_ellipsoid(x, y, z, point, (8, 8, 8))] = 600
    return CtVolume(hu, ct.geometry, ct.series_uid)


def test_lung_only_drops_candidates_outside_the_lungs(made_chest):
    in_lung, in_belly, in_heart = (-60.0, -20.0, 190.0), (-20.0, 0.0, 40.0), (0.0, -40.0, 150.0)
    ct = with_dense_spots(made_chest[0], [in_lung, in_belly, in_heart])
    notes, seen, runs = [], {}, {}
    for name, lung_only in (("plain", False), ("lung_only", True)):
        models = stand_in_models()
        dense = models.segmenter.forward
        models.segmenter.forward = lambda x, name=name: seen.setdefault(name, []).append(x[:, 0].numel()) or dense(x)
        runs[name] = analyze(ct, models, AnalysisSettings(threshold=0.5, lung_only=lung_only), note=notes.append)
    assert len(runs["plain"]) == 3 and notes == []
    (kept,) = runs["lung_only"]
    assert kept.center_xyz == pytest.approx(in_lung, abs=1.0) and kept == next(
        d for d in runs["plain"] if d.center_xyz == kept.center_xyz)
    # the U-Net saw the lungs' box and its halo, not the whole CT
    assert sum(seen["lung_only"]) < 0.8 * sum(seen["plain"]) == 0.8 * ct.hu.size


@pytest.mark.parametrize("kind", ["head", "abdomen", "phantom"])
def test_lung_only_without_lungs_keeps_the_body_masks_candidates_and_says_so(kind):
    ct = with_dense_spots(no_lungs(kind), [(-20.0, 0.0, 100.0), (30.0, 30.0, 140.0)])
    notes = []
    plain = analyze(ct, stand_in_models(), AnalysisSettings(), note=notes.append)
    lung_only = analyze(ct, stand_in_models(), AnalysisSettings(lung_only=True), note=notes.append)
    assert len(plain) >= 2 and lung_only == plain
    assert notes == [f"no lungs found in {ct.series_uid}; keeping its candidates inside the body"]


DEMO_SERIES = (1, 4, 8)  # of the demo's 40 (configs/demo.toml, seed 1): 9 nodules, 3 pleural, 3 vascular


@pytest.fixture(scope="module")
def demo_series():
    from p2ch_app.data.synth import PRESETS, make_series

    seeds = np.random.SeedSequence(1).spawn(40)  # as luna-synth --config configs/demo.toml draws them
    return [make_series(int(seeds[i].generate_state(1)[0]), PRESETS["demo"]) for i in DEMO_SERIES]


def test_every_nodule_of_demo_series_lies_in_the_mask(demo_series):
    """luna-synth's nodules, pleural- and vessel-attached among them, all inside (make bench and
    docs/benchmarks.md: all 60 series of the demo's two sets)."""
    kinds = set()
    for series in demo_series:
        ct = CtVolume(series.hu, series.geometry, series.uid)
        lungs = lungs_of(ct.hu, ct.geometry.spacing)
        assert 2.0 < lungs.litres < 10.0
        for nodule in series.nodules:
            assert inside(lungs, nodule.center_xyz, ct).all(), (series.uid, nodule)
            kinds.add(nodule.attached)
    assert kinds == {"isolated", "pleural", "vascular"}  # the test sees each kind
