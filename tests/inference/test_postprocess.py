"""Post-processing on hand-made volumes: the body mask, re-centring and duplicate suppression."""

import numpy as np
from scipy import ndimage

from p2ch_app.inference.postprocess import body_mask, fill_holes_in_plane, in_plane_structure, inside_body, recentred


def test_body_mask_keeps_the_lungs_and_drops_what_lies_outside():
    z, y, x = np.indices((6, 80, 80))
    hu = np.full((6, 80, 80), -1000, np.int16)
    body = ((y - 40) / 30) ** 2 + ((x - 40) / 35) ** 2 <= 1
    hu[body] = 40
    lung = ((y - 40) / 15) ** 2 + ((x - 28) / 10) ** 2 <= 1
    hu[lung] = -850
    hu[:, 2:5, 5:9] = 100  # a tube outside the patient
    mask = body_mask(hu)
    assert mask[3, 40, 28] and mask[3, 40, 60]  # in the lung, in soft tissue
    assert not mask[3, 3, 6] and not mask[3, 1, 1]  # the tube, the air


def test_fill_holes_in_plane_matches_scipys_fill_with_the_in_plane_structure():
    rng = np.random.default_rng(3)
    for density in (0.3, 0.5, 0.7):  # from scattered specks to a mask with many closed holes
        mask = ndimage.binary_opening(rng.random((5, 40, 50)) < density) | (rng.random((5, 40, 50)) < 0.05)
        mask[:, 10:30, 10] = mask[:, 10:30, 40] = mask[:, 10, 10:41] = mask[:, 30, 10:41] = True  # a ring
        expected = ndimage.binary_fill_holes(mask, structure=in_plane_structure())
        filled = fill_holes_in_plane(mask)
        assert np.array_equal(filled, expected), density
        assert filled[:, 20, 25].all()  # the ring's inside, in every slice (the first and last too)


def test_inside_body_on_full_size_slices_matches_the_full_resolution_mask():
    z, y, x = np.indices((4, 512, 512), sparse=True)
    hu = np.full((4, 512, 512), -1000, np.int16)
    hu[np.broadcast_to(((y - 256) / 200) ** 2 + ((x - 256) / 230) ** 2 <= 1, hu.shape)] = 40
    hu[np.broadcast_to(((y - 256) / 100) ** 2 + ((x - 170) / 60) ** 2 <= 1, hu.shape)] = -850  # a lung
    hu[:, 10:20, 30:60] = 100  # a tube outside the patient
    centers = np.array([[2, 256, 170], [1.6, 256.4, 400.2], [2, 15, 45], [0, 3, 3], [3, 511, 511]])
    expected = body_mask(hu)[tuple(np.rint(centers).astype(int).T)]
    assert expected.tolist() == [True, True, False, False, False]
    assert inside_body(hu, centers).tolist() == expected.tolist()
    assert inside_body(hu, np.zeros((0, 3))).shape == (0,)


def test_suppress_duplicates_drops_what_lies_within_a_more_probable_candidates_diameter():
    from p2ch_app.inference.postprocess import suppress_duplicates

    xyz = np.array([[0.0, 0, 0], [0, 0, 5.0], [0, 0, 9.0], [30.0, 0, 0], [30.0, 0, 2.0], [60.0, 0, 0]])
    diameters = np.array([6.0, 2.0, 2.0, 1.0, 10.0, 4.0])
    probs = np.array([0.9, 0.95, 0.3, 0.8, 0.2, 0.5])
    # 1 lies within 0's 6 mm, but 1 is the more probable and 0 lies outside its 2 mm; 3 lies within
    # 4's 10 mm, but 3 is the more probable and 4 lies outside its 1 mm: only the stronger's sphere counts
    assert suppress_duplicates(xyz, diameters, probs).tolist() == [True, True, True, True, True, True]
    probs[4] = 0.85  # now 4 is the stronger one and 3 lies within its diameter
    assert suppress_duplicates(xyz, diameters, probs).tolist() == [True, True, True, False, True, True]
    probs[0] = 0.99  # and 1, 5 mm from 0, within its 6 mm
    assert suppress_duplicates(xyz, diameters, probs).tolist() == [True, False, True, False, True, True]
    tied = suppress_duplicates(np.zeros((2, 3)), np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    assert tied.tolist() == [True, False]
    assert suppress_duplicates(np.zeros((0, 3)), np.zeros(0), np.zeros(0)).tolist() == []


def _ball_ct(centre_irc, radius_mm, spacing_xyz, shape=(30, 40, 40)):
    """Lung at -850 HU with one solid ball (40 HU) of this radius, partial-volumed over a voxel."""
    spacing = np.asarray(spacing_xyz, float)[::-1]
    grid = np.indices(shape, dtype=float)
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre_irc, spacing)))
    inside = np.clip((radius_mm - distance) / spacing.min() + 0.5, 0, 1)
    return (-850 + 890 * inside).astype(np.int16)


def test_recentred_moves_a_centre_a_slice_off_a_small_nodule_onto_it():
    spacing_xyz = (1.4, 1.4, 2.4)  # the demo's voxels: a 4.5 mm nodule spans two slices
    nodule = np.array([14.5, 20.3, 19.8])
    hu = _ball_ct(nodule, 2.25, spacing_xyz)
    off = nodule + [1.4, 0.4, -0.5]  # 3.4 mm away: outside its radius, as the U-Net's mark was
    moved = recentred(hu, np.array([off]), spacing_xyz)[0]
    assert np.linalg.norm((moved - nodule) * [2.4, 1.4, 1.4]) < 0.5


def test_recentred_leaves_centres_inside_a_large_nodule_or_far_from_anything():
    spacing_xyz = (0.7, 0.7, 1.25)
    hu = _ball_ct(np.array([15.0, 20.0, 20.0]), 8.0, spacing_xyz)
    inside, empty = [15.2, 19.6, 20.3], [2.0, 3.0, 3.0]  # 3 mm window all dense; no dense voxel near
    moved = recentred(hu, np.array([inside, empty]), spacing_xyz)
    assert np.allclose(moved, [inside, empty], atol=0.05)
    assert recentred(hu, np.zeros((0, 3)), spacing_xyz).shape == (0, 3)
