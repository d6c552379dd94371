"""The lungs, found in the CT alone (no model, no download), so that candidates outside them can be dropped.

Inside the patient but outside the lungs lie bowel gas, the stomach, the oesophagus and the soft tissue
beside the spine, where the book's models find false positives that the body mask keeps. The mask is
what grt123 and DeepLung build first: the air-like voxels inside the body (the body mask fills the
lungs in as holes of each axial slice, so air outside the patient never counts), the lungs chosen
among them by size, density and position, their vessels and nodules filled in, and the whole closed
and widened so that a nodule against the pleura or the mediastinum keeps its centre inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from p2ch_app.inference.postprocess import BODY_HU, body_mask, fill_holes_in_plane, mask_step, sample_mask

MIN_LUNG_ML = 150.0  # one lung in a chest CT holds litres; sinuses, the pharynx and most gas pockets far less
# Lung tissue averages -700 to -900 HU with its small vessels (emphysema rarely below -920); gas in
# the bowel or the stomach is air, -1000 HU. So a component must average above this to be a lung.
MIN_LUNG_MEAN_HU = -950.0
SECOND_LUNG_SHARE = 0.2  # a second lung holds at least this share of the first's voxels
CLOSE_MM = 16.0  # notches narrower than twice this close: nodules up to 30 mm against the pleura
MARGIN_MM = 5.0  # and the closed lungs are widened by this much
COARSER = 2  # the lungs are found on every COARSER-th pixel of the body mask's grid: ~2 mm on a chest CT


@dataclass
class Lungs:
    """The lung mask on every step-th row and column of the CT (all of its slices), as body_mask."""

    mask: np.ndarray  # (index, rows / step, cols / step) bool; all False when no lungs were found
    step: int
    voxel_ml: float  # the volume of one mask voxel
    air_litres: float  # the lungs' air-like voxels alone, before filling, closing and margin

    @property
    def found(self) -> bool:
        return bool(self.mask.any())

    @property
    def litres(self) -> float:
        """The mask's volume, margin included."""
        return float(self.mask.sum()) * self.voxel_ml / 1000

    def contains(self, centers_irc: np.ndarray) -> np.ndarray:
        """Whether each centre (index, row, col; continuous) lies in the mask."""
        return sample_mask(self.mask, centers_irc, self.step)

    def box(self, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        """The found mask's bounding box on the CT's own grid (shape): index, row and column slices."""
        index, rows, cols = _bounding_box(self.mask, np.zeros(3, int))
        on_grid = [slice(int(span.start) * self.step, min(int(span.stop) * self.step, n))
                   for span, n in ((rows, shape[1]), (cols, shape[2]))]
        return slice(int(index.start), int(index.stop)), on_grid[0], on_grid[1]

    def on_grid(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The mask on the CT's own grid (shape), each mask voxel repeated over its step x step pixels."""
        full = np.repeat(np.repeat(self.mask, self.step, axis=1), self.step, axis=2)
        return full[:, :shape[1], :shape[2]]


def find_lungs(hu: np.ndarray, spacing_xyz, body: np.ndarray, body_step: int) -> Lungs:
    """The lungs of a CT whose body mask (body_mask(hu, body_step)) is given: the one or two air-like
    components inside the body that pass _choose_lungs, with the holes of each axial slice filled,
    closed over CLOSE_MM and widened by MARGIN_MM. All False when no component passes (a head, an
    abdomen, a phantom): the caller then keeps what the body mask keeps.

    Every slice is used, but only every COARSER-th pixel of the body mask's rows and columns (every
    4th of a 512x512 slice): ample beside a 5 mm margin, and a quarter of the time."""
    step = body_step * COARSER
    body = body[:, ::COARSER, ::COARSER]
    spacing = np.array([spacing_xyz[2], spacing_xyz[1] * step, spacing_xyz[0] * step], float)  # (index, row, col)
    voxel_ml = float(np.prod(spacing)) / 1000
    hu = hu[:, ::step, ::step]
    labels, _ = ndimage.label(body & (hu <= BODY_HU))
    chosen = _choose_lungs(labels, hu, body, voxel_ml)
    mask = np.zeros(labels.shape, bool)
    if not chosen:
        return Lungs(mask, step, voxel_ml, 0.0)
    lungs = np.isin(labels, chosen)
    del labels
    box = _bounding_box(lungs, np.ceil((CLOSE_MM + MARGIN_MM) / spacing).astype(int) + 1)
    mask[box] = _close_and_widen(fill_holes_in_plane(lungs[box]), spacing)
    return Lungs(mask, step, voxel_ml, float(lungs.sum()) * voxel_ml / 1000)


def _choose_lungs(labels: np.ndarray, hu: np.ndarray, body: np.ndarray, voxel_ml: float) -> list[int]:
    """Labels of the lungs among the air-like components: the largest lung-dense one of MIN_LUNG_ML or
    more, and a second when one is found on the other side of the body's midline that reaches the
    first's mid-height and holds SECOND_LUNG_SHARE of its voxels or more. The stomach and the bowel lie
    below the lungs' mid-height, so they never pass as a second lung; the two lungs joined by the
    airways are one component. Sums run over the air voxels only, not the whole volume."""
    flat = np.flatnonzero(labels)
    component = labels.ravel()[flat]
    sizes = np.bincount(component)
    big = np.flatnonzero(sizes * voxel_ml >= MIN_LUNG_ML)
    if len(big) == 0:
        return []
    mean_hu = np.bincount(component, hu.ravel()[flat], len(sizes))[big] / sizes[big]
    dense = big[mean_hu > MIN_LUNG_MEAN_HU]
    if len(dense) == 0:
        return []
    dense = dense[np.argsort(-sizes[dense], kind="stable")]
    boxes = ndimage.find_objects(labels, max_label=int(dense.max()))
    first = dense[0]
    midline = np.flatnonzero(body.any(axis=(0, 1))).mean()
    mid_height = (boxes[first - 1][0].start + boxes[first - 1][0].stop - 1) / 2
    side = np.sign(_center_col(boxes[first - 1]) - midline)
    for other in dense[1:]:
        rows = boxes[other - 1][0]
        if (sizes[other] >= SECOND_LUNG_SHARE * sizes[first] and rows.start <= mid_height < rows.stop
                and np.sign(_center_col(boxes[other - 1]) - midline) == -side):
            return [int(first), int(other)]
    return [int(first)]


def _center_col(box: tuple[slice, slice, slice]) -> float:
    return (box[2].start + box[2].stop - 1) / 2


def _bounding_box(mask: np.ndarray, pad: np.ndarray) -> tuple[slice, slice, slice]:
    """The mask's bounding box widened by pad voxels per axis (within the volume): the closing and the
    margin reach no further, and working inside it spares the rest of the volume."""
    box = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(hit[0] - pad[axis], 0), min(hit[-1] + 1 + pad[axis], n)))
    return tuple(box)


def _close_and_widen(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Closing over a CLOSE_MM box (a nodule against the pleura is a notch in the air; the box fills
    it), then MARGIN_MM more: a dilation by CLOSE_MM + MARGIN_MM and an erosion by CLOSE_MM. Box
    filters are separable, so each costs the same whatever its size. The erosion treats the volume's
    edge as lung, so lungs cut by the scan's first or last slice are not eroded there."""
    grow = 2 * np.round((CLOSE_MM + MARGIN_MM) / spacing).astype(int) + 1
    shrink = 2 * np.round(CLOSE_MM / spacing).astype(int) + 1
    grown = ndimage.maximum_filter(mask.view(np.uint8), size=tuple(grow), mode="constant", cval=0)
    return ndimage.minimum_filter(grown, size=tuple(shrink), mode="nearest").astype(bool)


def lungs_of(hu: np.ndarray, spacing_xyz) -> Lungs:
    """find_lungs with the body mask made here, at the pipeline's step (postprocess.mask_step)."""
    step = mask_step(hu.shape)
    return find_lungs(hu, spacing_xyz, body_mask(hu, step), step)
