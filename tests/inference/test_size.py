"""Nodule diameters measured in the CT (inference/size.py) on synthetic nodules of known size."""

import numpy as np
import pytest

from p2ch_app.data.ct import xyz_to_irc
from p2ch_app.data.synth import PRESETS, Tiles, make_tiled_series
from p2ch_app.inference.size import measure_nodule, measure_nodules
from p2ch_app.inference.summary import size_category

SPACING_XYZ = np.array([0.7, 0.7, 1.25])  # LUNA16-like: fine pixels, thicker slices


def nodule_ct(axes_mm, core_hu=40.0, seed=0):
    """Lung at -850 HU with scanner noise and an ellipsoid nodule (full diameters along x, y, z in mm),
    its edge partial-volumed over a voxel; and the nodule's centre (voxels)."""
    shape = (40, 64, 64)
    z, y, x = np.indices(shape, dtype=float)
    centre = np.array(shape) / 2 - 0.3
    radii = np.asarray(axes_mm, float)[::-1] / 2 / SPACING_XYZ[::-1]  # index, row, col
    level = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii)))
    inside = np.clip((1 - level) * radii.min() + 0.5, 0, 1)  # 1 inside, 0 outside, a voxel-wide ramp
    hu = -850 + (core_hu + 850) * inside + np.random.default_rng(seed).normal(0, 20, shape)
    return hu.astype(np.int16), centre


def measured_diameter(hu, centre, spacing):
    measure = measure_nodule(hu, centre, spacing)
    return None if measure is None else measure.diameter_mm


@pytest.mark.parametrize("diameter", [4, 6, 10, 16])
def test_a_sphere_is_measured_to_a_fraction_of_a_voxel(diameter):
    hu, centre = nodule_ct((diameter,) * 3)
    assert measured_diameter(hu, centre, SPACING_XYZ) == pytest.approx(diameter, abs=0.15)


@pytest.mark.parametrize("axes_mm", [(9, 6, 5), (5, 8, 12)])
def test_an_ellipsoid_reads_as_the_sphere_of_its_volume(axes_mm):
    hu, centre = nodule_ct(axes_mm)
    assert measured_diameter(hu, centre, SPACING_XYZ) == pytest.approx(float(np.cbrt(np.prod(axes_mm))), abs=0.5)


def test_a_ground_glass_nodule_is_measured_at_its_own_contrast():
    hu, centre = nodule_ct((10, 10, 10), core_hu=-550)
    assert measured_diameter(hu, centre, SPACING_XYZ) == pytest.approx(10, abs=0.2)


@pytest.mark.parametrize("slices_off", [1, 2, 3])
def test_a_detection_at_the_nodules_rim_measures_the_whole_nodule(slices_off):
    """A candidate 1.25-3.75 mm above the centre of an 8 mm nodule: the fitted sphere moves onto it."""
    hu, centre = nodule_ct((8, 8, 8))
    measure = measure_nodule(hu, centre + [slices_off, 0, 0], SPACING_XYZ)
    assert measure.diameter_mm == pytest.approx(8, abs=0.15)
    assert np.abs((measure.centre_irc - centre) * SPACING_XYZ[::-1]).max() < 0.15  # mm


def test_a_vessel_through_the_nodule_is_left_out():
    hu, centre = nodule_ct((8, 8, 8))
    hu[20, 31:33, :] = 40  # a vessel two voxels wide through the nodule's centre row, far beyond it
    assert measured_diameter(hu, centre, SPACING_XYZ) == pytest.approx(8, abs=0.3)


def test_a_touching_vessel_wider_than_the_nodule_leaves_it_its_size():
    """A 6 mm nodule against a 4 mm vessel that runs across the CT: the nodule's size, not theirs."""
    hu, centre = nodule_ct((6, 6, 6))
    z, y, _ = np.indices(hu.shape, dtype=float)
    axis_row = centre[1] + (3.0 + 1.6) / SPACING_XYZ[1]  # its wall runs 0.4 mm into the nodule
    hu[np.hypot((z - centre[0]) * SPACING_XYZ[2], (y - axis_row) * SPACING_XYZ[1]) <= 2.0] = 40
    assert measured_diameter(hu, centre, SPACING_XYZ) == pytest.approx(6, abs=0.5)


def test_only_the_candidates_asked_for_and_with_contrast_are_measured():
    hu, centre = nodule_ct((8, 8, 8))
    flat = np.full_like(hu, -850)
    assert measure_nodule(flat, centre, SPACING_XYZ) is None
    assert measure_nodules(flat, SPACING_XYZ, np.array([centre, centre]), [1]) == {}
    measured = measure_nodules(hu, SPACING_XYZ, np.array([centre, centre]), [1])
    assert list(measured) == [1] and measured[1].diameter_mm == pytest.approx(8, abs=0.15)


def test_a_mark_inside_the_chest_wall_or_a_mass_past_any_nodule_is_not_measured():
    """Rays from a mark 3 mm inside a soft-tissue wall mostly run on through it, and a 40 mm mass is wider
    than any LUNA16 nodule: neither gets a diameter (the candidate's component sphere stands)."""
    hu, _ = nodule_ct((8, 8, 8))
    wall = hu.copy()
    wall[:, :, 48:] = 40  # from 5.6 mm beyond the nodule's edge on, soft tissue to the CT's end
    assert measure_nodule(wall, np.array([20.0, 32.0, 52.0]), SPACING_XYZ) is None
    big = np.full((60, 90, 90), -850, np.int16)
    z, y, x = np.indices(big.shape)
    big[(((z - 30) * 1.25) ** 2 + ((y - 45) * 0.7) ** 2 + ((x - 45) * 0.7) ** 2) <= 20 ** 2] = 40
    assert measure_nodule(big, np.array([30.0, 45.0, 45.0]), SPACING_XYZ) is None


def test_luna_synths_nodules_in_the_demos_pixels_are_measured_as_annotated():
    """The generator's own nodules (round, lobulated, spiculated; solid and ground glass; isolated, on a
    vessel or on the pleura) at ~1.3 mm pixels, measured from their annotated centres: within a
    quarter of a millimetre (median) and mostly in the annotated size band."""
    errors, same_band = [], []
    for seed in range(3):
        series = make_tiled_series(seed, PRESETS["demo"], (8,), Tiles(pixels=40, slices=36))
        for nodule in series.nodules:
            centre = xyz_to_irc(np.array(nodule.center_xyz)[None], series.geometry)[0]
            measured = measured_diameter(series.hu, np.round(centre), series.geometry.spacing)
            errors.append(measured - nodule.diameter_mm)
            same_band.append(size_category(measured) == size_category(nodule.diameter_mm))
    assert len(errors) == 24
    assert np.median(np.abs(errors)) < 0.3 and np.mean(same_band) >= 0.9
