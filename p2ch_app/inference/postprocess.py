"""What the pipeline does to candidates besides finding and scoring them: keep those inside the
patient, and drop those that repeat a more probable one."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

BODY_HU = -500  # denser than this is patient (or table); the lungs are filled in as holes


def body_mask(hu: np.ndarray, step: int = 1) -> np.ndarray:
    """The patient: the largest 3D component denser than BODY_HU, with the holes of each axial slice
    (lungs, airways) filled. Tubes, cables and the table fall outside it. With step, the mask is
    found on every step-th row and column (a quarter of the memory and time for step 2)."""
    dense = hu[:, ::step, ::step] > BODY_HU
    filled = ndimage.binary_fill_holes(dense, structure=in_plane_structure())
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
