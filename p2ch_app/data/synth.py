"""Synthetic chest CTs in the exact LUNA16 layout: the embedded default dataset.

Each series is an analytic phantom in patient millimetres (body, fat, lungs with a domed
diaphragm, mediastinum and heart, ribs, spine, airways, branching tapering vessels, nodules,
non-nodule look-alikes), rendered at the series' own voxel spacing with partial-volume edges and
scanner noise. Everything is drawn from one seeded generator, so a seed gives the same bytes. The
findings LUNA16 would exclude from scoring (annotations_excluded.csv: here nodule-like blobs under
3 mm) come from a second generator of that seed and are painted last, so they leave every other draw,
voxel and row as the seed made them before they existed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

from p2ch_app.data.ct import Geometry
from p2ch_app.data.index import ANNOTATIONS_CSV, CANDIDATES_CSV, EXCLUDED_CSV, MALIGNANCY_CSV
from p2ch_app.data.workers import worker_pool
from p2ch_app.errors import UserError
from p2ch_app.files import write_csv_atomic

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG = -1000.0, -100.0, 40.0, -850.0
# Nodule diameters follow LUNA16's annotations: 3 mm (its smallest accepted size) plus a log-normal
# excess, fitted to the 1,186 annotated diameters (log(d - 3 mm): mean 1.33, sd 0.82). It gives their
# quantiles (5%: 4.0 mm, median 6.4 mm, 95%: 17.5 mm against 4.1, 6.4 and 19.0). A plain log-normal
# clipped at 3 mm put 17% of nodules under 4 mm, against LUNA16's 4%.
NODULE_FLOOR_MM, NODULE_LOG_EXCESS = 3.0, (1.33, 0.82)
# Excluded findings: solid blobs under LUNA16's 3 mm, drawn from default_rng([series seed, EXCLUDED_TAG])
EXCLUDED_TAG = 0x65786331  # "exc1"
EXCLUDED_DIAMETER_MM = (2.0, 2.9)
EXCLUDED_CLEARANCE_MM = 8.0  # free space between a blob and any nodule's reach, look-alike or other blob
# Nodule morphology: ground glass from 5 mm on (smaller GGNs go unannotated); irregular shapes more often
# in larger nodules.
GROUND_GLASS_SHARE, GROUND_GLASS_MIN_MM = 0.25, 5.0
NODULE_COUNTS = (0, 1, 1, 2, 2, 2, 3, 3, 4)  # nodules per series, drawn from these with equal odds
SHAPES = ("round", "lobulated", "spiculated")
# Malignancy as LUNA16 annotates it (docs/experiments.md, "Synthetic malignancy"). The malignant share at
# a diameter is floor + (ceiling - floor) * sigmoid((d - midpoint) / width), fitted on this generator's
# own diameters to LUNA16's shares by size (4.4% under 6 mm, 16.4% at 6-8, 68.8% at 8-15, 94.4% from
# 15 mm) and to its diameter-only AUC (0.919). Morphology then moves the odds as it moves radiologists'
# ratings, and the baseline at each diameter is solved so the mix of morphologies keeps that share.
MALIGNANT_SHARE = {"floor": 0.0125, "ceiling": 0.945, "midpoint_mm": 8.79, "width_mm": 1.08}
MORPHOLOGY_LOG_ODDS = {"round": 0.0, "lobulated": 2.0, "spiculated": 4.0, "solid": 0.0, "ground-glass": -3.0}


@dataclass(frozen=True)
class SynthGeometry:
    matrix: int  # in-plane pixels (rows = cols)
    inplane_mm: tuple[float, float]  # range of in-plane spacing, drawn per series
    slice_mm: tuple[float, float]  # range of slice spacing, drawn per series


PRESETS = {
    # half LUNA16's in-plane resolution, its slice spacing: small nodules stay a few voxels across
    "demo": SynthGeometry(256, (1.15, 1.45), (1.25, 2.5)),
    "full": SynthGeometry(512, (0.5, 0.9), (0.6, 2.5)),
}


def geometry_for(size: str, matrix: int | None = None, inplane_mm: tuple[float, float] | None = None,
                 slice_mm: tuple[float, float] | None = None) -> SynthGeometry:
    """A preset's geometry with the given parts replaced; a range must be 0 < MIN <= MAX."""
    geometry = PRESETS[size]
    for name, value in (("matrix", matrix), ("inplane_mm", inplane_mm), ("slice_mm", slice_mm)):
        if value is not None:
            if isinstance(value, tuple) and not 0 < value[0] <= value[1]:
                raise UserError(f"--{name.replace('_', '-')} {value[0]} {value[1]}: give 0 < MIN <= MAX")
            geometry = replace(geometry, **{name: value})
    return geometry


@dataclass
class SynthNodule:
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    kind: str  # "solid" or "ground-glass"
    shape: str  # "round", "lobulated" or "spiculated"
    attached: str  # "isolated", "pleural" or "vascular"
    malignant: bool


@dataclass
class SynthSeries:
    uid: str
    hu: np.ndarray  # int16 (index, row, col): what is written to disk
    geometry: Geometry
    nodules: list[SynthNodule]
    candidates: list[tuple[tuple[float, float, float], int]]  # (center_xyz, class) for candidates.csv
    excluded: list[tuple[tuple[float, float, float], float]] = field(default_factory=list)  # (centre, diameter)


@dataclass
class _Segment:
    """A tube piece from p0 to p1 whose radius tapers from r0 to r1 (vessels, ribs, spicules)."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    parent: int = -1


# Each lung is an ellipse (semi-axes LUNG_HALF_WIDTH and LUNG_HALF_DEPTH of the cavity's) whose centre
# lies LUNG_OFFSET of the cavity's half-width to the side and LUNG_SHIFT of its half-depth back
LUNG_OFFSET, LUNG_SHIFT, LUNG_HALF_WIDTH, LUNG_HALF_DEPTH = 0.52, 0.02, 0.5, 0.93


@dataclass
class _Chest:
    """The sampled anatomy of one patient, as functions of patient mm."""

    cx: float
    cy: float
    body_a: float  # lateral semi-axis of the skin
    body_b: float  # antero-posterior semi-axis
    fat: float  # subcutaneous fat thickness
    wall: float  # muscle + rib layer inside the fat
    z0: float  # scan start (inferior)
    length: float  # scan length
    lung_base: float  # t (0..1 along the scan) of the diaphragm's lowest point
    lung_apex: float
    dome: float  # diaphragm dome height, mm
    heart: np.ndarray = field(default_factory=lambda: np.zeros(6))  # centre xyz, semi-axes xyz

    def t(self, z):
        return (np.asarray(z, float) - self.z0) / self.length

    def cavity(self, z):
        """Semi-axes of the thoracic cavity (inside the ribs) at height z."""
        widen = 0.94 + 0.08 * np.clip(self.t(z), 0, 1)
        return (self.body_a * widen - self.fat - self.wall, self.body_b - 0.8 * self.fat - self.wall)

    def in_body(self, x, y, z, inset: float = 0.0):
        widen = 0.94 + 0.08 * np.clip(self.t(z), 0, 1)
        a, b = self.body_a * widen - inset, self.body_b - 0.8 * inset
        return ((x - self.cx) / a) ** 2 + ((y - self.cy) / b) ** 2 <= 1.0

    def in_heart(self, x, y, z):
        c, r = self.heart[:3], self.heart[3:]
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0

    def lung_extent(self, z: float) -> tuple[float, float, float, float]:
        """x and y bounds (mm) of both lungs' ellipses at height z: in_lung is False outside them."""
        a, b = self.cavity(z)
        half_x = (LUNG_OFFSET + LUNG_HALF_WIDTH) * a
        return self.cx - half_x, self.cx + half_x, self.cy + (LUNG_SHIFT - LUNG_HALF_DEPTH) * b, \
            self.cy + (LUNG_SHIFT + LUNG_HALF_DEPTH) * b

    def in_lung(self, x, y, z):
        """Both lungs: ellipses tapering to the apex, cut by the mediastinum, spine, heart and diaphragm."""
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
        a, b = self.cavity(z)
        t = self.t(z)
        top = np.clip((t - self.lung_apex + 0.25) / 0.25, 0, None)  # 0 below the taper, 1 at the apex
        scale = np.sqrt(np.clip(1 - top ** 2, 0, 1))
        out = np.zeros(x.shape, bool)
        for side in (-1.0, 1.0):
            lx, ly = self.cx + side * LUNG_OFFSET * a, self.cy + LUNG_SHIFT * b
            u = (x - lx) / (LUNG_HALF_WIDTH * a * np.maximum(scale, 1e-6))
            v = (y - ly) / (LUNG_HALF_DEPTH * b * np.maximum(scale, 1e-6))
            rho2 = u ** 2 + v ** 2
            # the right hemidiaphragm (patient's right = -x) sits a little higher
            base = self.z0 + self.length * self.lung_base + (8.0 if side < 0 else 0.0)
            diaphragm = base + self.dome * np.clip(1 - rho2, 0, 1)
            out |= (rho2 <= 1) & (z >= diaphragm) & (scale > 0)
        mediastinum = (0.10 + 0.12 * np.clip((0.62 - t) / 0.4, 0, 1)) * a
        out &= np.abs(x - self.cx) > mediastinum
        out &= ~(((x - self.cx) ** 2 + (y - self.cy - 0.78 * b) ** 2) <= (0.3 * b) ** 2)  # spine notch
        out &= ~self.in_heart(x, y, z)
        return out


class _Canvas:
    """A float volume with its geometry; objects are blended in within their own bounding box."""

    def __init__(self, shape, origin, spacing):
        self.hu = np.empty(shape, np.float32)
        self.origin, self.spacing = np.asarray(origin, float), np.asarray(spacing, float)
        self.edge = float(np.cbrt(np.prod(spacing)))  # width of the partial-volume ramp
        self.lung: np.ndarray | None = None

    def box(self, lo, hi):
        """Slices and broadcastable x, y, z coordinate arrays of the voxels in the mm box [lo, hi]."""
        # on plain numbers: four thousand tubes a CT make numpy's per-call cost on 3-vectors count
        shape_xyz = self.hu.shape[::-1]
        low = ((np.asarray(lo) - self.origin) / self.spacing).tolist()
        high = ((np.asarray(hi) - self.origin) / self.spacing).tolist()
        i0 = [min(max(math.floor(v), 0), n) for v, n in zip(low, shape_xyz)]
        i1 = [min(max(math.ceil(v) + 1, 0), n) for v, n in zip(high, shape_xyz)]
        if any(b <= a for a, b in zip(i0, i1)):
            return None
        ax = [self.origin[k] + self.spacing[k] * np.arange(i0[k], i1[k]) for k in range(3)]
        region = (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))
        return region, ax[0][None, None, :], ax[1][None, :, None], ax[2][:, None, None]

    def blend(self, region, alpha, value, lung_only: bool, outside_lung: bool = False):
        if lung_only:
            alpha = alpha * self.lung[region]
        elif outside_lung:
            alpha = alpha * ~self.lung[region]
        view = self.hu[region]
        view += alpha * (value - view)

    def capsule(self, seg: _Segment, value: float, lung_only=False, outside_lung=False):
        reach = max(seg.r0, seg.r1) + self.edge
        found = self.box(np.minimum(seg.p0, seg.p1) - reach, np.maximum(seg.p0, seg.p1) + reach)
        if found is None:
            return
        region, x, y, z = found
        d = seg.p1 - seg.p0
        dx, dy, dz = x - seg.p0[0], y - seg.p0[1], z - seg.p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / max(d @ d, 1e-9), 0, 1)
        dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
        r = seg.r0 + t * (seg.r1 - seg.r0)
        # tubes thinner than a voxel only fill part of it: they look fainter, as on a real scanner
        alpha = np.clip((r - dist) / self.edge + 0.5, 0, 1) * np.clip(2 * r / self.edge, 0, 1)
        self.blend(region, alpha, value, lung_only, outside_lung)

    def blob(self, center, radius_of, max_radius: float, value, lung_only=True, edge=None):
        """A star-shaped solid: radius_of(unit directions) gives its surface."""
        found = self.box(np.asarray(center) - max_radius - self.edge, np.asarray(center) + max_radius + self.edge)
        if found is None:
            return
        region, x, y, z = found
        dx, dy, dz = np.broadcast_arrays(x - center[0], y - center[1], z - center[2])
        dist = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
        units = np.stack([dx, dy, dz], -1) / np.maximum(dist, 1e-9)[..., None]
        alpha = np.clip((radius_of(units) - dist) / (edge or self.edge) + 0.5, 0, 1)
        if callable(value):
            value = value(alpha.shape)
        self.blend(region, alpha, value, lung_only)


def make_series(seed: int, geometry: SynthGeometry, nodule_counts: tuple[int, ...] = NODULE_COUNTS) -> SynthSeries:
    """One synthetic chest CT with its nodules and candidate list, fully determined by seed. Its number
    of nodules is drawn from nodule_counts (placement permitting: each keeps 10 mm from the others)."""
    rng = np.random.default_rng(seed)
    uid, spacing, fov, chest = _draw_scan(rng, geometry)
    n_slices = int(round(chest.length / spacing[2]))
    origin = np.array([-fov / 2 + rng.uniform(-10, 10), -fov / 2 + rng.uniform(-10, 10), chest.z0])
    canvas = _Canvas((n_slices, geometry.matrix, geometry.matrix), origin, spacing)

    _paint_anatomy(canvas, chest, rng)
    _paint_ribs(canvas, _ribs(chest, rng))
    for seg in _airways(chest):
        canvas.capsule(_Segment(seg.p0, seg.p1, seg.r0 + 1.5, seg.r1 + 1.5), HU_SOFT, outside_lung=True)
        canvas.capsule(seg, HU_AIR)
    vessels = _vessel_trees(chest, rng)
    nodules, nodule_shapes = _place_nodules(chest, vessels, rng, nodule_counts)
    _paint_vessels_and_nodules(canvas, vessels, list(zip(nodules, nodule_shapes)), rng)
    decoys = _paint_decoys(canvas, chest, rng, n=int(rng.integers(4, 9)))
    # last, from their own generator: no draw of rng moves, and _finish only adds noise on top
    excluded = _paint_excluded(canvas, chest, nodules, decoys, np.random.default_rng([seed, EXCLUDED_TAG]))
    hu = _finish(canvas, rng, fov)

    candidates = _candidates(chest, vessels, nodules, decoys, rng, per_series=45 if geometry.matrix <= 256 else 140)
    geo = Geometry(origin, spacing, np.eye(3))
    return SynthSeries(uid, hu, geo, nodules, candidates, excluded)


def _draw_scan(rng, geometry: SynthGeometry) -> tuple[str, np.ndarray, float, _Chest]:
    """A series' first draws: its UID, voxel spacing (x, y, z), field of view (mm) and patient."""
    uid = f"2.25.{int.from_bytes(rng.bytes(16), 'big')}"
    inplane = rng.uniform(*geometry.inplane_mm)
    slice_mm = rng.uniform(*geometry.slice_mm)
    fov = geometry.matrix * inplane
    return uid, np.array([inplane, inplane, slice_mm]), fov, _sample_chest(rng, fov)


def _paint_ribs(canvas: _Canvas, ribs: list[_Segment]) -> None:
    """Cortex, then marrow inside it; outside the lungs."""
    for seg in ribs:
        canvas.capsule(seg, 850.0, outside_lung=True)
        canvas.capsule(_Segment(seg.p0, seg.p1, seg.r0 - 1.6, seg.r1 - 1.6), 280.0, outside_lung=True)


def _paint_vessels_and_nodules(canvas: _Canvas, vessels: list[_Segment], nodules: list, rng) -> None:
    """nodules: (SynthNodule, shape) pairs. Ground glass first, so the vessels run through it; solid
    nodules last, over the vessels they touch."""
    for nodule, shape in nodules:
        if nodule.kind == "ground-glass":
            _paint_nodule(canvas, nodule, shape, rng)
    for seg in vessels:
        canvas.capsule(seg, HU_SOFT + 10, lung_only=True)
    for nodule, shape in nodules:
        if nodule.kind == "solid":
            _paint_nodule(canvas, nodule, shape, rng)


@dataclass(frozen=True)
class Tiles:
    """luna-synth --tiles: each series a chest's nodules in tiles of slices x pixels x pixels voxels, side by
    side. A tile must hold the classifier's crop around its centre, plus a margin for the candidate's
    offset: 32 x 48 x 48 voxels unzoomed, 32 x 24 x 24 at crop_zoom 2 (pixels 30 then)."""

    pixels: int = 54
    slices: int = 36


def make_tiled_series(seed: int, geometry: SynthGeometry, nodule_counts: tuple[int, ...] = NODULE_COUNTS,
                      tiles: Tiles = Tiles()) -> SynthSeries:
    """One chest's nodules, each in a tile around it, and half as many tiles around vessel points, side
    by side in one small CT: the nodules and their lungs as make_series paints them, at a fraction of
    its time per nodule (luna-synth --tiles: a nodule-rich set for luna-finetune-mal)."""
    rng = np.random.default_rng(seed)
    uid, spacing, fov, chest = _draw_scan(rng, geometry)
    vessels = _vessel_trees(chest, rng)
    ribs = _ribs(chest, rng)
    found, shapes = _place_nodules(chest, vessels, rng, nodule_counts)
    centres = [np.array(n.center_xyz) for n in found] + _vessel_points(vessels, found, rng, max(1, len(found) // 2))
    depth, rows, cols = tiles.slices, tiles.pixels, tiles.pixels
    hu = np.empty((depth, rows, cols * len(centres)), np.int16)
    shifts = []
    for k, centre in enumerate(centres):
        chest_origin = centre - spacing * (np.array([cols, rows, depth]) - 1) / 2 + rng.uniform(-0.5, 0.5, 3) * spacing
        canvas = _Canvas((depth, rows, cols), chest_origin, spacing)
        _paint_tile(canvas, chest, (ribs, vessels), list(zip(found, shapes)), rng)
        hu[:, :, k * cols:(k + 1) * cols] = _finish(canvas, rng, fov, circle=False)
        shifts.append(np.array([k * cols, 0, 0]) * spacing - chest_origin)  # chest mm -> this CT's mm
    tiled = [replace(n, center_xyz=tuple(float(c) for c in np.array(n.center_xyz) + shift))
             for n, shift in zip(found, shifts)]
    candidates = [(_near_centre(n, rng), 1) for n in tiled]
    candidates += [(tuple(float(c) for c in centre + shift), 0)
                   for centre, shift in zip(centres[len(found):], shifts[len(found):])]
    return SynthSeries(uid, hu, Geometry(np.zeros(3), spacing, np.eye(3)), tiled, candidates)


def _vessel_points(vessels: list[_Segment], nodules: list[SynthNodule], rng, n: int) -> list[np.ndarray]:
    """n points on vessels 1 mm or more in radius, each more than a diameter from every nodule."""
    thick = [s for s in vessels if s.r0 >= 1.0]
    points = []
    for _attempt in range(100 * n):
        if len(points) == n or not thick:
            break
        p = _point_on_one(thick, rng)
        if all(np.linalg.norm(p - np.array(m.center_xyz)) > m.diameter_mm for m in nodules):
            points.append(p)
    return points


def _paint_tile(canvas: _Canvas, chest: _Chest, tubes: tuple[list[_Segment], list[_Segment]], nodules: list,
                rng) -> None:
    """What make_series paints, in the order it paints it, within this canvas: anatomy, ribs and vessels
    (tubes: ribs, vessels) and the nodules; decoys and excluded blobs left out."""
    ribs, vessels = (_within(segments, canvas) for segments in tubes)
    _paint_anatomy(canvas, chest, rng)
    _paint_ribs(canvas, ribs)
    _paint_vessels_and_nodules(canvas, vessels, nodules, rng)


def _within(segments: list[_Segment], canvas: _Canvas) -> list[_Segment]:
    """The segments whose bounding box, grown by their radius, meets the canvas."""
    if not segments:
        return []
    ends = np.array([(s.p0, s.p1) for s in segments])
    reach = np.array([max(s.r0, s.r1) for s in segments])[:, None] + canvas.edge
    lo, hi = canvas.origin, canvas.origin + canvas.spacing * np.array(canvas.hu.shape[::-1])
    meets = np.all((ends.min(1) - reach < hi) & (ends.max(1) + reach > lo), axis=1)
    return [s for s, keep in zip(segments, meets) if keep]


def _sample_chest(rng, fov: float) -> _Chest:
    body_a = fov * rng.uniform(0.38, 0.45)
    chest = _Chest(cx=rng.uniform(-6, 6), cy=rng.uniform(-12, 4), body_a=body_a,
                   body_b=body_a * rng.uniform(0.62, 0.74), fat=rng.uniform(5, 20), wall=rng.uniform(10, 15),
                   z0=rng.uniform(-400, -120), length=rng.uniform(250, 320), lung_base=rng.uniform(0.06, 0.12),
                   lung_apex=rng.uniform(0.9, 0.96), dome=rng.uniform(35, 60))
    a, b = chest.cavity(chest.z0 + 0.3 * chest.length)
    chest.heart = np.array([chest.cx + 0.12 * a, chest.cy - 0.2 * b, chest.z0 + chest.length * rng.uniform(0.25, 0.32),
                            0.36 * a, 0.5 * b, rng.uniform(55, 70)])
    return chest


def _smooth_field(rng, shape, spacing, scale_mm: float) -> callable:
    """Low-frequency texture (unit variance), evaluated slice by slice from a coarse 3D grid."""
    coarse_shape = [max(2, int(np.ceil(n * s / scale_mm)) + 1) for n, s in zip(shape, spacing[::-1])]
    coarse = rng.normal(size=coarse_shape).astype(np.float32)
    zs = np.linspace(0, coarse_shape[0] - 1, shape[0])

    def plane(k: int) -> np.ndarray:
        lo = int(np.floor(zs[k]))
        hi, w = min(lo + 1, coarse_shape[0] - 1), zs[k] - lo
        mixed = (1 - w) * coarse[lo] + w * coarse[hi]
        zoom = (shape[1] / mixed.shape[0], shape[2] / mixed.shape[1])
        return ndimage.zoom(mixed, zoom, order=1, mode="nearest")[: shape[1], : shape[2]]

    return plane


def _paint_anatomy(canvas: _Canvas, chest: _Chest, rng) -> None:
    """Slice by slice: air, table, fat, muscle, lungs, heart, spine, aorta."""
    n_z, n_y, n_x = canvas.hu.shape
    ox, oy, oz = canvas.origin
    sx, sy, sz = canvas.spacing
    x = (ox + sx * np.arange(n_x))[None, :]
    y = (oy + sy * np.arange(n_y))[:, None]
    canvas.lung = np.zeros(canvas.hu.shape, bool)
    texture = _smooth_field(rng, canvas.hu.shape, canvas.spacing, 14.0)
    table_y = chest.cy + chest.body_b + rng.uniform(8, 25)
    aorta = (chest.cx + rng.uniform(0.08, 0.14) * chest.body_a, chest.cy + 0.45 * chest.body_b)
    vertebra = rng.uniform(24, 30)
    for k in range(n_z):
        z = oz + sz * k
        a, b = chest.cavity(z)
        tex = texture(k)
        sl = np.full((n_y, n_x), HU_AIR, np.float32)
        table = (y > table_y + 0.0015 * (x - chest.cx) ** 2) & (y < table_y + 12 + 0.0015 * (x - chest.cx) ** 2)
        sl[np.broadcast_to(table, sl.shape)] = 120.0
        body = chest.in_body(x, y, z)
        sl[body] = HU_FAT + 15 * tex[body]
        inner = chest.in_body(x, y, z, inset=chest.fat)
        sl[inner] = HU_SOFT + 8 * tex[inner]
        spine_y = chest.cy + 0.78 * b
        r2 = (x - chest.cx) ** 2 + (y - spine_y) ** 2
        in_disc = (z - chest.z0) % vertebra > vertebra - 5
        sl[r2 <= 15.0 ** 2] = 80.0 if in_disc else 700.0
        if not in_disc:
            sl[r2 <= 13.5 ** 2] = 250.0 + 20 * tex[r2 <= 13.5 ** 2]
        canal = (x - chest.cx) ** 2 + (y - spine_y - 24) ** 2
        sl[np.broadcast_to((canal > 7 ** 2) & (canal <= 12 ** 2), sl.shape)] = 600.0
        sl[np.broadcast_to((x - aorta[0]) ** 2 + (y - aorta[1]) ** 2 <= 11.0 ** 2, sl.shape)] = 45.0
        # the lungs are drawn only in their extent's rows and columns: a third of the slice, the same voxels
        x0, x1, y0, y1 = chest.lung_extent(z)
        found = canvas.box((x0, y0, z), (x1, y1, z))
        if found is not None:
            rows, cols = found[0][1:]
            lung = chest.in_lung(x[:, cols], y[rows], z)
            # lungs are denser towards the back (gravity) and mottled
            sl[rows, cols][lung] = (HU_LUNG + 30 * ((y[rows] - chest.cy) / b) + 22 * tex[rows, cols])[lung]
            canvas.lung[k][rows, cols] = lung
        canvas.hu[k] = sl


def _ribs(chest: _Chest, rng) -> list[_Segment]:
    """Rib pairs that wrap the chest wall and drop towards the front, as ribs do."""
    segs = []
    spacing = rng.uniform(24, 30)
    for z_back in np.arange(chest.z0 + 0.25 * chest.length, chest.z0 + chest.length, spacing):
        for side in (-1, 1):
            angles = np.linspace(0.15, 2.5, 14)  # from the spine (back) round towards the sternum
            pts = []
            for ang in angles:
                a, b = chest.cavity(z_back)
                r_a, r_b = a + 0.5 * chest.wall, b + 0.5 * chest.wall
                pts.append([chest.cx + side * r_a * np.sin(ang), chest.cy + r_b * np.cos(ang),
                            z_back - 38 * (ang / 2.5) ** 1.3])
            for p0, p1 in zip(pts[:-1], pts[1:]):
                segs.append(_Segment(np.array(p0), np.array(p1), 4.2, 4.2))
    return segs


def _airways(chest: _Chest) -> list[_Segment]:
    a, b = chest.cavity(chest.z0 + 0.7 * chest.length)
    top = np.array([chest.cx, chest.cy - 0.15 * b, chest.z0 + chest.length])
    carina = np.array([chest.cx, chest.cy - 0.05 * b, chest.z0 + 0.62 * chest.length])
    segs = [_Segment(top, carina, 8.0, 8.0)]
    for side in (-1, 1):
        end = carina + np.array([side * 0.32 * a, 0.05 * b, -30.0])
        segs.append(_Segment(carina, end, 6.0, 4.5))
    return segs


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _units(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rotate(v: np.ndarray, axis: np.ndarray, angle) -> np.ndarray:
    """Rodrigues rotation of rows v (N, 3) about unit rows axis by angles (N,)."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    dot = np.sum(axis * v, axis=-1, keepdims=True)
    return v * cos + np.cross(axis, v) * sin + axis * dot * (1 - cos)


def _vessel_trees(chest: _Chest, rng, max_per_lung: int = 3000) -> list[_Segment]:
    """Pulmonary vessel trees from each hilum: a trunk that goes on and thinner side branches,
    tapering over ~12 generations so the vessels reach the lung periphery, as real ones do.
    Grown a generation at a time (vectorised), so the cap trims the finest twigs, never a lobe."""
    segs: list[_Segment] = []
    for side in (-1, 1):
        z_hilum = chest.z0 + chest.length * rng.uniform(0.55, 0.62)
        a, b = chest.cavity(z_hilum)
        hilum = np.array([chest.cx + side * 0.3 * a, chest.cy + 0.05 * b, z_hilum])
        roots = np.array([(side * 0.4, 0.0, 0.9), (side * 0.9, -0.4, 0.1), (side * 0.5, 0.5, -0.7),
                          (side * 0.6, -0.3, -0.75), (side * 0.7, 0.6, 0.2), (side * 0.5, -0.6, 0.5),
                          (side * 0.4, 0.4, 0.8), (side * 0.8, 0.2, -0.4)])
        start = np.repeat(hilum[None], len(roots), 0)
        direction = _units(roots + rng.normal(0, 0.15, roots.shape))
        radius = rng.uniform(3.5, 5.5, len(roots))
        parent = np.full(len(roots), -1)
        first = len(segs)
        while len(radius) and len(segs) - first < max_per_lung:
            length = rng.uniform(0.8, 1.3, len(radius)) * (6 + 3 * radius)
            end = start + direction * length[:, None]
            inside = chest.in_lung(*end.T)
            half = start + direction * (length / 2)[:, None]
            end = np.where(inside[:, None], end, half)
            keep = inside | chest.in_lung(*half.T)
            start, end, direction, radius, parent = start[keep], end[keep], direction[keep], radius[keep], parent[keep]
            taper = radius * 0.93
            ids = np.arange(len(segs), len(segs) + len(radius))
            segs += [_Segment(p0, p1, r0, r1, int(up)) for p0, p1, r0, r1, up in zip(start, end, radius, taper, parent)]
            grow = taper >= 0.4
            end, direction, taper, ids = end[grow], direction[grow], taper[grow], ids[grow]
            away = _units(end - hilum)
            axis = _units(np.cross(direction, rng.normal(size=direction.shape)))
            n = len(taper)
            trunk = _units(_rotate(direction, axis, np.radians(rng.uniform(5, 20, n))) + 0.25 * away)
            branch = _units(_rotate(direction, axis, -np.radians(rng.uniform(30, 60, n))) + 0.25 * away)
            start = np.concatenate([end, end])
            direction = np.concatenate([trunk, branch])
            radius = np.concatenate([taper * rng.uniform(0.84, 0.93, n), taper * rng.uniform(0.55, 0.75, n)])
            parent = np.concatenate([ids, ids])
    return segs


def _nodule_shape(rng, radius: float, shape: str):
    """radius_of(units) for the nodule's surface, plus its spicules (segments relative to the centre)."""
    lobes = []
    if shape != "round":
        for _ in range(int(rng.integers(3, 6))):
            lobes.append((_unit(rng.normal(size=3)), rng.uniform(0.06, 0.16), int(rng.integers(2, 5))))

    def radius_of(units):
        r = np.ones(units.shape[:-1])
        for axis, amp, freq in lobes:
            r += amp * np.cos(freq * np.arccos(np.clip(units @ axis, -1, 1)))
        return radius * r

    spicules = []
    if shape == "spiculated":
        for _ in range(int(rng.integers(6, 14))):
            u = _unit(rng.normal(size=3))
            length = radius * rng.uniform(0.5, 1.3)
            spicules.append(_Segment(u * radius * 0.8, u * (radius + length), rng.uniform(0.5, 0.9), 0.25))
    return radius_of, spicules


def _inside_lung_ball(chest: _Chest, center, radius: float) -> bool:
    dirs = np.array([_unit(d) for d in np.indices((3, 3, 3)).reshape(3, -1).T - 1 if np.any(d)])
    pts = np.asarray(center) + (radius + 1.0) * dirs
    return bool(chest.in_lung(*np.asarray(center)) and chest.in_lung(pts[:, 0], pts[:, 1], pts[:, 2]).all())


def _random_lung_point(chest: _Chest, rng) -> np.ndarray:
    a, b = chest.cavity(chest.z0 + 0.5 * chest.length)
    while True:
        p = np.array([chest.cx + rng.uniform(-a, a), chest.cy + rng.uniform(-b, b),
                      chest.z0 + chest.length * rng.uniform(chest.lung_base, chest.lung_apex)])
        if chest.in_lung(*p):
            return p


def _wall_point(chest: _Chest, rng) -> tuple[np.ndarray, np.ndarray]:
    """A point on the lung surface and the inward direction there (found by marching outwards)."""
    while True:
        p = _random_lung_point(chest, rng)
        d = _unit(rng.normal(size=3) * [1, 1, 0.3])
        steps = p + np.arange(1, 200)[:, None] * 0.5 * d
        outside = ~chest.in_lung(steps[:, 0], steps[:, 1], steps[:, 2])
        if outside.any():
            return steps[int(np.argmax(outside))] - 0.5 * d, -d


def _place_nodules(chest: _Chest, vessels: list[_Segment], rng, counts: tuple[int, ...] = NODULE_COUNTS):
    nodules, shapes = [], []
    for _ in range(int(rng.choice(counts))):
        diameter, kind, shape = draw_morphology(rng)
        radius = diameter / 2
        attached = str(rng.choice(["isolated", "pleural", "vascular"], p=[0.5, 0.25, 0.25]))
        for _attempt in range(200):
            if attached == "pleural":
                wall, inward = _wall_point(chest, rng)
                center = wall + inward * radius * 0.85
                ok = chest.in_lung(*center) and chest.in_lung(*(center + inward * radius))
            elif attached == "vascular":
                seg = vessels[int(rng.integers(len(vessels)))]
                if not 0.8 <= seg.r0 <= 3.5:
                    continue
                along = seg.p0 + rng.uniform(0.2, 0.8) * (seg.p1 - seg.p0)
                side = _unit(np.cross(seg.p1 - seg.p0, rng.normal(size=3)))
                center = along + side * (radius + seg.r0) * 0.8
                ok = _inside_lung_ball(chest, center, radius)
            else:
                center = _random_lung_point(chest, rng)
                ok = _inside_lung_ball(chest, center, radius)
            if ok and all(np.linalg.norm(center - n.center_xyz) > radius + n.diameter_mm / 2 + 10 for n in nodules):
                break
        else:
            continue
        malignant = draw_malignant(rng, diameter, kind, shape)
        nodules.append(SynthNodule(tuple(float(c) for c in center), round(diameter, 3), kind, shape, attached,
                                   malignant))
        shapes.append(_nodule_shape(rng, radius, shape))
    return nodules, shapes


def draw_morphology(rng) -> tuple[float, str, str]:
    """A nodule's diameter (mm), kind and shape, drawn as luna-synth draws them."""
    diameter = float(min(NODULE_FLOOR_MM + rng.lognormal(*NODULE_LOG_EXCESS), 30.0))
    draw = rng.random()  # drawn always, so the size rule does not shift later draws
    kind = "ground-glass" if diameter >= GROUND_GLASS_MIN_MM and draw < GROUND_GLASS_SHARE else "solid"
    shape = str(rng.choice(SHAPES, p=_shape_odds(diameter)))
    return diameter, kind, shape


def _shape_odds(diameter: float) -> list[float]:
    return [0.5, 0.3, 0.2] if diameter < 10 else [0.25, 0.4, 0.35]


def malignant_share(diameter: float) -> float:
    """LUNA16's malignant share among nodules of this diameter (the fitted curve above)."""
    m = MALIGNANT_SHARE
    rise = 1 / (1 + np.exp(-(diameter - m["midpoint_mm"]) / m["width_mm"]))
    return float(m["floor"] + (m["ceiling"] - m["floor"]) * rise)


def malignancy_probability(diameter: float, kind: str, shape: str) -> float:
    """P(malignant) of one nodule: the baseline log-odds at its diameter plus its morphology's. The
    baseline is the root, by bisection, of mean over the morphology mix at that diameter = the share."""
    ggn = GROUND_GLASS_SHARE if diameter >= GROUND_GLASS_MIN_MM else 0.0
    mix = [(k_share * s_share, MORPHOLOGY_LOG_ODDS[k] + MORPHOLOGY_LOG_ODDS[s])
           for k, k_share in (("solid", 1 - ggn), ("ground-glass", ggn))
           for s, s_share in zip(SHAPES, _shape_odds(diameter))]
    weights, offsets = np.array(mix).T
    share, low, high = malignant_share(diameter), -20.0, 20.0
    for _ in range(60):
        base = (low + high) / 2
        low, high = (base, high) if weights @ (1 / (1 + np.exp(-(base + offsets)))) < share else (low, base)
    logit = (low + high) / 2 + MORPHOLOGY_LOG_ODDS[kind] + MORPHOLOGY_LOG_ODDS[shape]
    return float(1 / (1 + np.exp(-logit)))


def draw_malignant(rng, diameter: float, kind: str, shape: str) -> bool:
    """Whether this nodule is malignant. The normal draw no longer enters the label (it was label noise
    until 2026-12-06) but is still taken, so every dataset's images stay as they were, byte for byte."""
    rng.normal()
    return bool(rng.random() < malignancy_probability(diameter, kind, shape))


def _paint_nodule(canvas: _Canvas, nodule: SynthNodule, shape, rng) -> None:
    radius_of, spicules = shape
    center = np.array(nodule.center_xyz)
    if nodule.kind == "solid":
        core = rng.uniform(-20, 80)
        value = lambda s: core + rng.normal(0, 12, s).astype(np.float32)
        edge = None
    else:
        core = rng.uniform(-480, -300)
        value = lambda s: core + rng.normal(0, 30, s).astype(np.float32)
        edge = canvas.edge + 0.5  # ground glass fades into the lung
    reach = nodule.diameter_mm / 2 * 1.5 + 1
    canvas.blob(center, radius_of, reach, value, lung_only=True, edge=edge)
    for seg in spicules:
        canvas.capsule(_Segment(center + seg.p0, center + seg.p1, seg.r0, seg.r1), core, lung_only=True)


def _paint_decoys(canvas: _Canvas, chest: _Chest, rng, n: int) -> list[np.ndarray]:
    """Things a detector fires on that are not nodules: tiny blobs (<3 mm) and pleural bumps."""
    points = []
    for _ in range(n):
        r = rng.uniform(0.5, 1.4)
        p = _random_lung_point(chest, rng)
        canvas.blob(p, lambda u, r=r: np.full(u.shape[:-1], r), r + 1, rng.uniform(0, 60))
        points.append(p)
    for _ in range(n):
        wall, inward = _wall_point(chest, rng)
        r = rng.uniform(1.5, 3.0)
        canvas.blob(wall, lambda u, r=r: np.full(u.shape[:-1], r), r + 1, HU_SOFT)
        points.append(wall + inward * r * 0.5)
    return points


def _clear_of(center: np.ndarray, radius: float, nodules: list[SynthNodule], decoys: list[np.ndarray],
              placed: list[tuple[tuple[float, float, float], float]]) -> bool:
    """Whether a blob here keeps EXCLUDED_CLEARANCE_MM from every nodule's reach (spicules run out to 2.3
    radii), every look-alike (at most 3 mm in radius) and the blobs already placed."""
    reach = [(np.asarray(n.center_xyz), 2.3 * n.diameter_mm / 2) for n in nodules]
    reach += [(p, 3.0) for p in decoys] + [(np.asarray(c), d / 2) for c, d in placed]
    return all(np.linalg.norm(center - c) - r - radius > EXCLUDED_CLEARANCE_MM for c, r in reach)


def _paint_excluded(canvas: _Canvas, chest: _Chest, nodules: list[SynthNodule], decoys: list[np.ndarray],
                    rng) -> list[tuple[tuple[float, float, float], float]]:
    """One to three solid, nodule-like blobs under 3 mm in the lungs, clear of everything painted before:
    what LUNA16 lists in annotations_excluded.csv (a nodule under 3 mm counts neither as a nodule to find
    nor as a false positive). Returns (centre, diameter) of each."""
    placed = []
    for _ in range(int(rng.integers(1, 4))):
        diameter = round(float(rng.uniform(*EXCLUDED_DIAMETER_MM)), 3)
        radius = diameter / 2
        for _attempt in range(200):
            center = _random_lung_point(chest, rng)
            if _inside_lung_ball(chest, center, radius) and _clear_of(center, radius, nodules, decoys, placed):
                break
        else:
            continue
        core = rng.uniform(-20, 80)
        canvas.blob(center, lambda u, r=radius: np.full(u.shape[:-1], r), radius + 1,
                    lambda s, core=core: core + rng.normal(0, 12, s).astype(np.float32))
        placed.append((tuple(float(c) for c in center), diameter))
    return placed


def _finish(canvas: _Canvas, rng, fov: float, circle: bool = True) -> np.ndarray:
    """Add scanner noise (thinner voxels are noisier); with circle, blank the corners outside the
    reconstruction circle (a whole slice's; a tile has none)."""
    reference_voxel = 0.7 * 0.7 * 1.5
    sigma = rng.uniform(18, 38) * np.sqrt(reference_voxel / np.prod(canvas.spacing))
    sigma = max(sigma, 5.0)
    n_z, n_y, n_x = canvas.hu.shape
    yy, xx = np.indices((n_y, n_x))
    corner = (yy - (n_y - 1) / 2) ** 2 + (xx - (n_x - 1) / 2) ** 2 > (min(n_y, n_x) / 2) ** 2
    corner &= circle
    fill = rng.choice([HU_AIR, -2000.0, -3024.0])
    delta = np.zeros((9, 9), np.float32)
    delta[4, 4] = 1
    gain = np.sqrt((ndimage.gaussian_filter(delta, 0.6) ** 2).sum())  # what the blur leaves of unit noise
    out = np.empty(canvas.hu.shape, np.int16)
    for k in range(n_z):
        noise = ndimage.gaussian_filter(rng.normal(size=(n_y, n_x)).astype(np.float32), 0.6)
        noise *= sigma / gain
        sl = canvas.hu[k] + noise
        sl[corner] = fill
        out[k] = np.clip(np.rint(sl), -3024, 3071)
    return out


def _candidates(chest, vessels, nodules, decoys, rng, per_series: int):
    """candidates.csv rows: each nodule a few mm off (class 1), look-alikes and vessel points (class 0)."""
    rows = [(_near_centre(nodule, rng), 1) for nodule in nodules]
    others = [p for p in decoys]
    thick = [i for i, s in enumerate(vessels) if s.r0 >= 1.0]
    forks = [vessels[i].p0 for i in thick if vessels[i].parent >= 0]
    mids = np.array([(s.p0 + s.p1) / 2 for s in vessels])
    crossings = []
    for i, j in cKDTree(mids).query_pairs(4.0):
        a, b = vessels[i], vessels[j]
        related = a.parent == j or b.parent == i or (a.parent == b.parent and a.parent >= 0)
        if not related and min(a.r0, b.r0) >= 0.8:
            crossings.append((mids[i] + mids[j]) / 2)
    pool = [*forks, *crossings]
    want = max(per_series - len(others), 0)
    if pool:
        picks = rng.choice(len(pool), size=min(want // 2 + 1, len(pool)), replace=False)
        others += [pool[i] for i in picks]
    thick_segments = [vessels[i] for i in thick]
    while len(others) < per_series and thick_segments:
        others.append(_point_on_one(thick_segments, rng))
    keep = [p for p in others if all(np.linalg.norm(p - np.array(n.center_xyz)) > n.diameter_mm for n in nodules)]
    rows += [(tuple(float(c) for c in p), 0) for p in keep]
    return rows


def _point_on_one(segments: list[_Segment], rng) -> np.ndarray:
    """A point drawn along the axis of one of the segments, drawn at random."""
    s = segments[int(rng.integers(len(segments)))]
    return s.p0 + rng.uniform(0, 1) * (s.p1 - s.p0)


def _near_centre(nodule: SynthNodule, rng) -> tuple[float, float, float]:
    """A nodule's candidates.csv point: a few mm off its centre, as LUNA16's are."""
    offset = _unit(rng.normal(size=3)) * rng.uniform(0, min(3.0, 0.5 * nodule.diameter_mm / 2 + 0.5))
    return tuple(float(c) for c in np.array(nodule.center_xyz) + offset)


@dataclass(frozen=True)
class SynthRun:
    """How write_dataset runs; none of it changes the bytes written."""

    overwrite: bool = False  # replace a dataset already in root
    progress: bool = True
    workers: int = 1


def write_dataset(root: Path, series: int, subsets: int = 10, seed: int = 0,
                  geometry: SynthGeometry = PRESETS["demo"], nodule_counts: tuple[int, ...] = NODULE_COUNTS,
                  run: SynthRun = SynthRun(), tiles: Tiles | None = None) -> list[tuple[str, Path]]:
    """Write `series` synthetic CTs and the LUNA16 CSVs under root (candidates, annotations, malignancy,
    excluded findings); returns (uid, .mhd path) pairs. nodule_counts: see make_series. With tiles, each
    series is a chest's nodules in tiles (make_tiled_series), not the whole chest.

    Volumes are generated and written one at a time (by `workers` processes; the bytes do not depend
    on their number). The CSVs are written last, each through a temporary file, so an interrupted run
    never leaves a dataset that looks complete.
    """
    root = Path(root)
    existing = [name for name in ("candidates.csv", "annotations.csv") if (root / name).exists()]
    if existing and not run.overwrite:
        raise UserError(f"{root} already holds a dataset ({existing[0]}); pass --overwrite to replace it "
                        "or choose another --data-root")
    root.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(seed).spawn(series)
    jobs = [(root / f"subset{i % subsets}", seeds[i], geometry, nodule_counts, tiles) for i in range(series)]
    cand, ann, mal, excluded, written = [], [], [], [], []
    with contextlib.ExitStack() as stack:
        if run.workers > 1:
            pool = stack.enter_context(worker_pool(run.workers))
            done = pool.imap(_write_series, jobs)  # in order, so the CSVs do not depend on timing
        else:
            done = map(_write_series, jobs)
        for uid, path, rows in tqdm(done, total=series, desc="luna-synth", unit="CT", disable=not run.progress):
            written.append((uid, path))
            cand += rows["candidates"]
            ann += rows["annotations"]
            mal += rows["malignancy"]
            excluded += rows["excluded"]
    finding = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]  # annotations.csv's columns
    write_csv_atomic(root / CANDIDATES_CSV, ["seriesuid", "coordX", "coordY", "coordZ", "class"], cand)
    write_csv_atomic(root / ANNOTATIONS_CSV, finding, ann)
    write_csv_atomic(root / MALIGNANCY_CSV, [*finding, "mal_bool", "mal_details", "bboxLowX", "bboxLowY", "bboxLowZ",
                                             "bboxHighX", "bboxHighY", "bboxHighZ", "len_mal_details"], mal)
    write_csv_atomic(root / EXCLUDED_CSV, finding, excluded)
    return written


def _write_series(job) -> tuple[str, Path, dict[str, list]]:
    """Generate one series, write its .mhd/.raw into folder, return its CSV rows."""
    folder, seeds, geometry, nodule_counts, tiles = job
    seed = int(seeds.generate_state(1)[0])
    if tiles is None:
        s = make_series(seed, geometry, nodule_counts)
    else:
        s = make_tiled_series(seed, geometry, nodule_counts, tiles)
    path = folder / f"{s.uid}.mhd"
    folder.mkdir(exist_ok=True)
    image = s.geometry.apply_to(sitk.GetImageFromArray(s.hu))
    sitk.WriteImage(image, str(path), useCompression=False)
    rating_rng = np.random.default_rng(seeds.generate_state(2)[1])
    rows = {"candidates": [[s.uid, *_mm(xyz), label] for xyz, label in s.candidates], "annotations": [],
            "malignancy": [], "excluded": [[s.uid, *_mm(xyz), f"{d:.3f}"] for xyz, d in s.excluded]}
    for n in s.nodules:
        rows["annotations"].append([s.uid, *_mm(n.center_xyz), f"{n.diameter_mm:.3f}"])
        ratings = _ratings(rating_rng, n.malignant)
        r = n.diameter_mm / 2
        low, high = np.array(n.center_xyz) - r, np.array(n.center_xyz) + r
        rows["malignancy"].append([s.uid, *_mm(n.center_xyz), f"{n.diameter_mm:.3f}", str(n.malignant),
                                   str(ratings), *_mm(low), *_mm(high), len(ratings)])
    return s.uid, path, rows


def _mm(xyz) -> list[str]:
    return [f"{float(v):.4f}" for v in xyz]


def _ratings(rng, malignant: bool) -> list[int]:
    """1-4 simulated radiologist malignancy ratings (1-5) whose mean agrees with mal_bool (> 3)."""
    while True:
        ratings = [int(np.clip(round(rng.normal(4.1 if malignant else 2.2, 0.8)), 1, 5))
                   for _ in range(int(rng.integers(1, 5)))]
        if (np.mean(ratings) > 3) == malignant:
            return ratings
