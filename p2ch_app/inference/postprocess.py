"""What the pipeline does to candidates besides finding and scoring them: keep those inside the
patient, move their centres onto the tissue they found, and drop those that repeat a more probable one."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

BODY_HU = -500  # denser than this is patient (or table); the lungs are filled in as holes
# recentred(): voxels denser than RECENTRE_HU within RECENTRE_MM pull a centre, for up to RECENTRE_STEPS
# steps (3 mm: a small nodule's radius, so a neighbour does not pull; the one setting tried, docs/experiments.md)
RECENTRE_MM, RECENTRE_HU, RECENTRE_STEPS = 3.0, -400.0, 3


def body_mask(hu: np.ndarray, step: int = 1) -> np.ndarray:
    """The patient: the largest 3D component denser than BODY_HU, with the holes of each axial slice
    (lungs, airways) filled. Tubes, cables and the table fall outside it. With step, the mask is
    found on every step-th row and column (a quarter of the memory and time for step 2)."""
    dense = hu[:, ::step, ::step] > BODY_HU
    filled = fill_holes_in_plane(dense)
    del dense
    labels, count = ndimage.label(filled)
    if count == 0:
        return filled
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def in_plane_structure() -> np.ndarray:
    """Face connectivity within each axial slice only: holes are filled slice by slice."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure


def fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """The mask with the holes of each axial slice filled (lungs and airways inside the body; vessels,
    nodules and masses inside the lungs): what is not mask and not connected within its slice to the
    slice's border. What ndimage.binary_fill_holes gives with in_plane_structure, found by labelling the
    background: 0.14-0.19 s against its propagation's 0.42-0.65 s for a demo CT's body mask."""
    background, count = ndimage.label(~mask, structure=in_plane_structure())
    border = np.zeros(mask.shape[1:], bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    hole = np.ones(count + 1, bool)  # by background label; 0 is the mask itself
    hole[background[:, border]] = False
    return hole[background] | mask


def mask_step(shape: tuple[int, ...]) -> int:
    """The step at which the body and lung masks are found: slices of 512 pixels at every second pixel
    (about 1 mm), ample for telling the body from tubes and table, or the lungs from the abdomen, at a
    quarter of the cost."""
    return max(1, shape[1] // 256)


def sample_mask(mask: np.ndarray, centers_irc: np.ndarray, step: int) -> np.ndarray:
    """The value of a mask made at step (every step-th row and column) at each centre's nearest voxel."""
    if len(centers_irc) == 0:
        return np.zeros(0, bool)
    idx = np.rint(centers_irc).astype(int) // np.array([1, step, step])
    return mask[tuple(idx.T)]


def inside_body(hu: np.ndarray, centers_irc: np.ndarray) -> np.ndarray:
    """Whether each centre lies in the patient (body_mask at mask_step)."""
    if len(centers_irc) == 0:
        return np.zeros(0, bool)
    step = mask_step(hu.shape)
    return sample_mask(body_mask(hu, step), centers_irc, step)


def recentred(hu: np.ndarray, centers_irc: np.ndarray, spacing_xyz) -> np.ndarray:
    """Each centre moved onto the dense tissue around it: up to RECENTRE_STEPS mean-shift steps, each to
    the centroid of the voxels denser than RECENTRE_HU within RECENTRE_MM, weighted by how much denser.

    The U-Net's component of a small nodule often lies a slice off it (its labels were grown by a
    voxel, its mask eroded by one), and a component that holds a nodule and a vessel has its centre
    between them: scored by LUNA16's rule (within the nodule's radius) such a candidate misses the
    nodule it found, and the classifier sees it off centre. Inside a larger nodule the window is all
    dense, so the centre stays; where nothing dense is near, it stays too."""
    spacing = np.asarray(spacing_xyz, float)[::-1]  # index, row, col
    half = np.ceil(RECENTRE_MM / spacing).astype(int)
    moved = np.array(centers_irc, float, copy=True).reshape(-1, 3)
    for n in range(len(moved)):
        for _ in range(RECENTRE_STEPS):
            step = _dense_centroid(hu, moved[n], half, spacing)
            if step is None:
                break
            shift = np.linalg.norm((step - moved[n]) * spacing)
            moved[n] = step
            if shift < 0.1:
                break
    return moved


def _dense_centroid(hu: np.ndarray, center: np.ndarray, half: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """recentred()'s one step from center: the weighted centroid, or None where nothing is dense."""
    nearest = np.rint(center).astype(int)
    low, high = np.maximum(nearest - half, 0), np.minimum(nearest + half + 1, hu.shape)
    if np.any(high <= low):
        return None
    axes = [np.arange(a, b) for a, b in zip(low, high)]
    grid = np.meshgrid(*axes, indexing="ij")
    near = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= RECENTRE_MM ** 2
    excess = hu[tuple(slice(a, b) for a, b in zip(low, high))].astype(np.float64) - RECENTRE_HU
    weight = np.where(near & (excess > 0), excess, 0.0)
    total = weight.sum()
    if total == 0:
        return None
    return np.array([(g * weight).sum() / total for g in grid])


def suppress_duplicates(centers_xyz: np.ndarray, diameters_mm: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Which candidates to keep: not those whose centre lies within the diameter of a more probable
    candidate (a sphere of that component's volume). A nodule's mask can come apart at its rim after
    the erosion, and each piece, scored as a nodule because the nodule fills its crop, would count
    as a false positive beside the hit. Ties go to the earlier candidate."""
    keep = np.ones(len(probs), bool)
    if len(probs) < 2:
        return keep
    pairs = cKDTree(centers_xyz).query_pairs(float(diameters_mm.max()), output_type="ndarray")
    rank = np.empty(len(probs), np.int64)
    rank[np.argsort(-probs, kind="stable")] = np.arange(len(probs))
    first, second = pairs.T
    stronger = np.where(rank[first] < rank[second], first, second)
    weaker = first + second - stronger
    covered = np.linalg.norm(centers_xyz[stronger] - centers_xyz[weaker], axis=1) <= diameters_mm[stronger]
    keep[weaker[covered]] = False
    return keep
