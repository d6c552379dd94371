"""Nodule diameters measured in the CT (inference/size.py) on synthetic nodules of known size."""

import numpy as np
import pytest
from scipy import ndimage

from p2ch_app.inference.size import measured_diameter, reported_diameters, sphere_diameters

SPACING_XYZ = np.array([0.7, 0.7, 1.25])  # LUNA16-like: fine pixels, thicker slices


def nodule_ct(axes_mm, core_hu=40.0, seed=0, grow=0):
    """Lung at -850 HU with scanner noise and an ellipsoid nodule (full diameters along x, y, z in mm),
    its edge partial-volumed over a voxel; plus a mask like the pipeline's (the U-Net's mask, eroded
    once): the nodule's voxels, or with grow > 0 the nodule grown by that many voxels (a U-Net that
    marks a little more than the nodule, as the demo's do)."""
    shape = (40, 64, 64)
    z, y, x = np.indices(shape, dtype=float)
    centre = np.array(shape) / 2 - 0.3
    radii = np.asarray(axes_mm, float)[::-1] / 2 / SPACING_XYZ[::-1]  # index, row, col
    level = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii)))
    inside = np.clip((1 - level) * radii.min() + 0.5, 0, 1)  # 1 inside, 0 outside, a voxel-wide ramp
    hu = -850 + (core_hu + 850) * inside + np.random.default_rng(seed).normal(0, 20, shape)
    mask = inside > 0.5
    mask = ndimage.binary_dilation(mask, iterations=grow) if grow else mask
    return hu.astype(np.int16), np.flatnonzero(mask), centre


@pytest.mark.parametrize("axes_mm", [(4, 4, 4), (6, 6, 6), (10, 10, 10), (16, 16, 16), (9, 6, 5), (5, 8, 12)])
@pytest.mark.parametrize("grow", [0, 1])
def test_measured_diameter_is_the_nodules_own(axes_mm, grow):
    hu, index, centre = nodule_ct(axes_mm, grow=grow)
    truth = float(np.cbrt(np.prod(axes_mm)))  # the sphere of the ellipsoid's volume
    measured = measured_diameter(hu, index, centre, SPACING_XYZ)
    assert measured == pytest.approx(truth, abs=0.5)
    if grow:  # the mask's own sphere is further off than the measurement
        assert float(sphere_diameters(len(index), SPACING_XYZ)) - truth > abs(measured - truth) + 0.5


def test_a_ground_glass_nodule_is_measured_at_its_own_contrast():
    hu, index, centre = nodule_ct((10, 10, 10), core_hu=-550)
    assert measured_diameter(hu, index, centre, SPACING_XYZ) == pytest.approx(10, abs=0.6)


def test_a_vessel_touching_the_nodule_is_left_out():
    hu, index, centre = nodule_ct((8, 8, 8))
    hu[20, 32, :] = 40  # a vessel one voxel thick through the nodule's centre row, far beyond it
    hu[20, 31, :] = 40
    measured = measured_diameter(hu, index, centre, SPACING_XYZ)
    assert measured == pytest.approx(8, abs=0.6)


def test_no_contrast_keeps_the_components_sphere():
    hu, index, centre = nodule_ct((8, 8, 8))
    flat = np.full_like(hu, -850)
    assert measured_diameter(flat, index, centre, SPACING_XYZ) is None
    spheres = np.array([5.0, 7.0])
    both = reported_diameters(flat, SPACING_XYZ, {1: index}, np.array([centre, centre]), spheres)
    assert both.tolist() == [5.0, 7.0]
    measured = reported_diameters(hu, SPACING_XYZ, {1: index}, np.array([centre, centre]), spheres)
    assert measured[0] == 5.0 and measured[1] == pytest.approx(8, abs=0.5)


def test_a_vessel_merged_into_the_mask_is_capped_off():
    """The U-Net marked a 6 mm nodule together with the 4 mm vessel it touches, across the CT: the
    bright region connected to that mask is over 10 mm as a sphere; the cap keeps the nodule."""
    hu, index, centre = nodule_ct((6, 6, 6))
    z, y, x = np.indices(hu.shape, dtype=float)
    axis_row = centre[1] + (3.0 + 1.6) / SPACING_XYZ[1]  # its wall runs 0.4 mm into the nodule
    distance_mm = np.hypot((z - centre[0]) * SPACING_XYZ[2], (y - axis_row) * SPACING_XYZ[1])
    vessel = distance_mm <= 2.0
    hu[vessel] = 40
    mask = np.zeros(hu.shape, bool)
    mask.flat[index] = True
    merged = np.flatnonzero(mask | vessel)
    bright = ndimage.binary_dilation(mask | vessel) & (hu > -350)
    assert float(sphere_diameters(int(bright.sum()), SPACING_XYZ)) > 10  # what an uncapped volume reads
    assert measured_diameter(hu, merged, centre, SPACING_XYZ) == pytest.approx(6, abs=0.8)


def test_a_centre_moved_off_its_component_measures_the_nodule_it_landed_on():
    """--recentre moved the centre from a U-Net mark a slice above a 6 mm nodule onto the nodule: the
    mark holds none of it, so the nodule is what is bright and connected to the centre."""
    hu, index, centre = nodule_ct((6, 6, 6))
    above = np.zeros(hu.shape, bool)
    above.flat[index] = True
    above = np.roll(above, 4, axis=0) & ~above  # 5 mm off in z, not touching the nodule's voxels
    assert measured_diameter(hu, np.flatnonzero(above), centre, SPACING_XYZ) == pytest.approx(6, abs=0.6)
