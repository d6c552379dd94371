"""Nodule diameters as annotators give them, measured in the CT around each reported detection.

The U-Net's mask, eroded once before grouping, says where a nodule is but not how large. The CT
itself draws the nodule's edge, to a fraction of a voxel: its partial-volume ramp crosses the level
halfway from lung (-850 HU) to the nodule's core at the surface. So from the centre, rays in 300
directions are followed (trilinear samples every 0.1 mm) to where they first fall below that level.
A sphere fitted through those edge points moves the centre onto the nodule's (a detection may sit
at its rim), the core is re-read inside it, and the rays are cast again, three times over. Rays that
leave along a vessel, a spicule or into the pleura run far: only those within RAY_REACH times the
typical length count (the median from the detection, the lower quartile from a fitted centre), and
the diameter is twice their RAY_QUANTILE-th percentile, so lobes that dip under the annotated outline
do not make the nodule small. Nothing here reads the U-Net's mask, so a vessel marked with the nodule
does not make it large.

On the demos' found nodules (docs/experiments.md): median absolute error 0.19-0.21 mm and the same
size band for 89-94% of them, against 0.38-0.51 mm and 78-85% for the volume of the bright region
connected to the mask that this replaces.

A candidate's own sphere (`sphere_diameters`) still decides what --dedupe merges, so the candidates
and their order do not depend on this measurement. The fitted centre is where the malignancy model
looks (it learnt nodules at their annotated centres); the reported centre stays the candidate's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LUNG_HU = -850.0  # lung parenchyma, the background the edge level is drawn from
EDGE_LEVEL = 0.5  # the edge: where the partial-volume ramp is halfway from lung to the core
MIN_CONTRAST_HU = 100.0  # a core this close to lung has no edge to measure: the component's sphere stands
RAY_COUNT, RAY_STEP_MM, RAY_MAX_MM = 300, 0.1, 25.0  # 25 mm: past the radius of LUNA16's largest nodules
FIT_ROUNDS = 3  # sphere fits that move the centre onto the nodule's
MIN_EDGE_RAYS = 20  # fewer rays ending at an edge: nothing nodule-like to measure
CORE_DEPTH, CORE_QUANTILE = 0.8, 75  # the core: this percentile of the voxels within 0.8 median rays
# Rays longer than RAY_REACH typical rays ran off the nodule; the diameter is twice the RAY_QUANTILE-th
# percentile of the rest. Chosen among reaches of 1.3-1.6 and percentiles of 60-80 on 317 nodules of 40
# tiled chests (the demo's pixels) and the three demos' found nodules (docs/experiments.md)
RAY_REACH, RAY_QUANTILE = 1.45, 75
# Where under 40% of the rays count in the end, the diameter passes 35 mm (LUNA16's largest nodule is
# 32 mm) or the candidate's centre is off the nodule measured, the rays ran on into tissue that is
# no nodule, or the fit slid onto the surface of some (a mark inside the mediastinum or the chest wall)
MIN_COUNTED_SHARE, MAX_DIAMETER_MM = 0.4, 35.0
RIM_MM = 1.5  # a candidate on a nodule's rim lies up to about a voxel outside it (1.2 radii on the demos)


def sphere_diameters(voxels, spacing) -> np.ndarray:
    """The diameter (mm) of a sphere of each volume, given in voxels of this spacing."""
    return 2 * np.cbrt(3 * np.asarray(voxels) * float(np.prod(spacing)) / (4 * np.pi))


def _directions(n: int) -> np.ndarray:
    """n unit vectors spread evenly over the sphere (a Fibonacci lattice), in (index, row, col) order."""
    k = np.arange(n) + 0.5
    polar, turn = 1 - 2 * k / n, np.pi * (1 + 5 ** 0.5) * k
    ring = np.sqrt(1 - polar ** 2)
    return np.stack([polar, ring * np.sin(turn), ring * np.cos(turn)], axis=-1)


DIRECTIONS = _directions(RAY_COUNT)


def _ray_lengths(hu: np.ndarray, centre_irc: np.ndarray, spacing_irc: np.ndarray, level: float) -> np.ndarray:
    """How far (mm) each ray from centre_irc runs before the CT first falls below level (interpolated
    between samples); RAY_MAX_MM where it never does."""
    steps = np.arange(0.0, RAY_MAX_MM + RAY_STEP_MM / 2, RAY_STEP_MM)
    points = centre_irc + steps[None, :, None] * (DIRECTIONS / spacing_irc)[:, None, :]
    values = ndimage.map_coordinates(hu, points.reshape(-1, 3).T, output=np.float32, order=1,
                                     mode="nearest").reshape(len(DIRECTIONS), -1)
    below = values < level
    first = np.where(below.any(axis=1), below.argmax(axis=1), len(steps) - 1).clip(min=1)
    rays = np.arange(len(DIRECTIONS))
    inside, outside = values[rays, first - 1], values[rays, first]
    fraction = np.clip((inside - level) / np.maximum(inside - outside, 1e-6), 0, 1)
    return np.where(below.any(axis=1), steps[first - 1] + fraction * RAY_STEP_MM, RAY_MAX_MM)


def _sphere_through(points: np.ndarray) -> tuple[np.ndarray, float]:
    """The least-squares sphere through points (n, 3): its centre and radius."""
    design = np.c_[2 * points, np.ones(len(points))]
    solution, *_ = np.linalg.lstsq(design, (points ** 2).sum(axis=1), rcond=None)
    centre = solution[:3]
    return centre, float(np.sqrt(max(solution[3] + centre @ centre, 0.0)))


def _nearest_27(hu: np.ndarray, centre_irc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The voxel nearest the centre (inside the CT) and the up to 27 voxels' values around it."""
    nearest = np.clip(np.round(centre_irc).astype(int), 0, np.array(hu.shape) - 1)
    return nearest, hu[tuple(slice(max(c - 1, 0), c + 2) for c in nearest)]


def _core_hu(hu: np.ndarray, centre_irc: np.ndarray, spacing_irc: np.ndarray, radius_mm: float) -> float:
    """CORE_QUANTILE-th percentile of the voxels within radius_mm of the centre (of the 27 around it
    when fewer than 5 lie there): a vessel crossing a ground-glass nodule does not set its core."""
    nearest, around = _nearest_27(hu, centre_irc)
    reach = np.ceil(radius_mm / spacing_irc).astype(int)
    low, high = np.maximum(nearest - reach, 0), np.minimum(nearest + reach + 1, hu.shape)
    grids = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(low, high, centre_irc, spacing_irc)],
                        indexing="ij")
    values = hu[tuple(slice(a, b) for a, b in zip(low, high))][sum(g * g for g in grids) <= radius_mm ** 2]
    return float(np.percentile(values if values.size >= 5 else around, CORE_QUANTILE))


def _edge_rays(hu: np.ndarray, centre: np.ndarray, spacing_irc: np.ndarray, core: float,
               typical_quantile: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The rays' lengths from centre to the edge level of this core, and which of them count: those
    within RAY_REACH times the typical (this percentile of) length; None where there is no edge."""
    if core - LUNG_HU < MIN_CONTRAST_HU:
        return None
    lengths = _ray_lengths(hu, centre, spacing_irc, LUNG_HU + EDGE_LEVEL * (core - LUNG_HU))
    at_edge = lengths < RAY_MAX_MM
    if at_edge.sum() < MIN_EDGE_RAYS:
        return None
    typical = np.percentile(lengths[at_edge], typical_quantile)
    return lengths, at_edge & (lengths <= RAY_REACH * max(typical, 1.0))


def _refitted_centre(centre: np.ndarray, spacing_irc: np.ndarray, lengths: np.ndarray,
                     counted: np.ndarray) -> np.ndarray:
    """The centre (voxels) of the sphere through the counted rays' edge points; their centroid where
    that sphere does not hold the old centre (the fit left the nodule)."""
    edge_mm = centre * spacing_irc + lengths[counted, None] * DIRECTIONS[counted]
    fitted, radius = _sphere_through(edge_mm)
    if not np.isfinite(radius) or np.linalg.norm(fitted - centre * spacing_irc) > max(radius, 1.5):
        fitted = edge_mm.mean(axis=0)
    return fitted / spacing_irc


@dataclass(frozen=True)
class NoduleMeasure:
    diameter_mm: float
    centre_irc: np.ndarray  # the fitted sphere's centre (voxels): the nodule's own, where a detection may be off it


def measure_nodule(hu: np.ndarray, center_irc, spacing) -> NoduleMeasure | None:
    """The nodule at center_irc (voxels; spacing x, y, z in mm) as measured in the CT: its diameter (mm)
    and centre; None where its core is not brighter than lung by MIN_CONTRAST_HU, too few rays end at
    an edge, or what was measured is no nodule around the candidate (MIN_COUNTED_SHARE, MAX_DIAMETER_MM)."""
    spacing_irc = np.asarray(spacing, float)[::-1]
    centre = start = np.asarray(center_irc, float)
    core = float(np.median(_nearest_27(hu, centre)[1]))
    # the detection's own centre may lie at the nodule's rim: its rays are judged against the median;
    # from a fitted centre, against the shorter quarter, which vessels and spicules leave alone
    rays = _edge_rays(hu, centre, spacing_irc, core, 50)
    for _ in range(FIT_ROUNDS):
        if rays is None:
            return None
        centre = _refitted_centre(centre, spacing_irc, *rays)
        core = _core_hu(hu, centre, spacing_irc, CORE_DEPTH * float(np.median(rays[0][rays[1]])))
        rays = _edge_rays(hu, centre, spacing_irc, core, 25)
    if rays is None or rays[1].mean() < MIN_COUNTED_SHARE:
        return None
    lengths, counted = rays
    diameter = 2 * float(np.percentile(lengths[counted], RAY_QUANTILE))
    holds_start = np.linalg.norm((centre - start) * spacing_irc) <= diameter / 2 + RIM_MM
    return NoduleMeasure(diameter, centre) if holds_start and diameter <= MAX_DIAMETER_MM else None


def measure_nodules(hu: np.ndarray, spacing, centers_irc: np.ndarray, which: Iterable[int]) -> dict[int, NoduleMeasure]:
    """measure_nodule at each candidate numbered in `which`: those whose core stands out from lung."""
    found = {int(i): measure_nodule(hu, centers_irc[i], spacing) for i in which}
    return {i: measure for i, measure in found.items() if measure is not None}
