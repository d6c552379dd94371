"""The end-to-end pipeline on one CT: segment, group voxels into candidates, classify, score malignancy.

Every stage works on whole batches: slice stacks come from a sliding-window view of the volume and
candidate crops from one gather, so no Python loop runs per slice or per candidate. The stages
follow the book's nodule_analysis: sigmoid > 0.5, one 3D erosion, connected components centred on
their HU + 1001-weighted centre of mass, a 32x48x48 crop around each centre's nearest voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from p2ch_app.checkpoints import CLASSIFIER, SEGMENTER, load_model
from p2ch_app.data.ct import HU_MIN, CtVolume, context_stacks, gather_crops, irc_to_xyz
from p2ch_app.inference.lungs import Lungs, find_lungs
from p2ch_app.inference.postprocess import (
    body_mask,
    inside_body,
    mask_step,
    recentred,
    sample_mask,
    suppress_duplicates,
)
from p2ch_app.inference.runtime import (
    BATCH_PIXELS,
    around,
    in_pieces,
    keep_freed_memory,
    precision,
    return_freed_memory,
    slices_per_pass,
)
from p2ch_app.inference.size import NoduleMeasure, measure_nodules, sphere_diameters
from p2ch_app.models import NoduleClassifier, NoduleSegmenter

# The crop as it is, mirrored left-right, front-back, and both (dims of a batch of N x 1 x D x H x W crops)
MIRRORS = ((), (4,), (3,), (3, 4))


@dataclass(frozen=True)
class AnalysisSettings:
    """How nodule-analyze runs; the defaults are the book's pipeline."""

    threshold: float = 0.5  # nodule probability from which a candidate is reported and scored for malignancy
    batch_size: int = 8  # candidate crops per classifier pass
    keep_outside: bool = False  # keep candidates outside the patient's body
    fast: bool = False  # reduced-precision autocast
    tta: bool = False  # average the classifiers over the crop's four in-plane mirror images
    tta_floor: float = 0.05  # with tta, nodule probability from which the mirror images are added
    split: bool = False  # also propose the pieces of a second erosion
    dedupe: bool = False  # drop candidates inside a more probable one's sphere
    lung_only: bool = False  # keep only candidates whose centre lies in the lung mask (lungs.py), if lungs are found;
    # the U-Net then runs over the lungs' bounding box alone
    recentre: bool = False  # analyze() moves each candidate's centre onto the dense tissue near it (recentred)


@dataclass
class Detection:
    center_xyz: tuple[float, float, float]
    center_irc: tuple[float, float, float]
    nodule_prob: float
    malignancy_prob: float | None
    diameter_mm: float  # reported ones: measured in the CT (inference/size.py); others: the component's sphere
    voxels: int
    inside_body: bool
    # the component's voxels as flat (C-order) indices into the CT, kept for candidates at or above the
    # threshold (the reported ones, for --report's label map); None for the others
    voxel_index: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Components:
    """Connected components of a mask: centres (index, row, col), voxel counts, and each one's voxels as
    flat indices, component k's at members[starts[k]:starts[k + 1]]. The members cost 8 bytes per mask
    voxel (a tiny share of the CT), not a whole-volume label array."""

    centers: np.ndarray  # (N, 3)
    voxels: np.ndarray  # (N,)
    members: np.ndarray  # (sum of voxels,) int64
    starts: np.ndarray  # (N + 1,)

    def voxels_of(self, k: int) -> np.ndarray:
        return self.members[self.starts[k]:self.starts[k + 1]]

    def __add__(self, other: Components) -> Components:
        return Components(np.concatenate([self.centers, other.centers]), np.concatenate([self.voxels, other.voxels]),
                          np.concatenate([self.members, other.members]),
                          np.concatenate([self.starts[:-1], other.starts + len(self.members)]))


@dataclass
class Models:
    segmenter: NoduleSegmenter
    classifier: NoduleClassifier
    malignancy: NoduleClassifier | None
    paths: dict[str, str | None]


def load_segmenter(path: Path, device: torch.device) -> NoduleSegmenter:
    """The U-Net of our checkpoint or the book's .state, built as it was trained, in channels-last
    (1.7x faster on CPU)."""
    return load_model(path, SEGMENTER).to(device, memory_format=torch.channels_last)


def load_models(seg: Path, cls: Path, mal: Path | None, device: torch.device) -> Models:
    """Our checkpoints or the book's .state files."""
    classifier = load_model(cls, CLASSIFIER).to(device, memory_format=torch.channels_last_3d)
    malignancy = None
    if mal is not None:
        malignancy = load_model(mal, CLASSIFIER).to(device, memory_format=torch.channels_last_3d)
    return Models(load_segmenter(seg, device), classifier, malignancy,
                  {"seg": str(seg), "cls": str(cls), "mal": str(mal) if mal else None})


def slice_probabilities(hu: np.ndarray, model: NoduleSegmenter, device: torch.device, start: int, stop: int,
                        batch_pixels: int = BATCH_PIXELS) -> torch.Tensor:
    """The U-Net's nodule probability (stop-start, H, W) for slices start..stop-1, each seen with its
    context slices (the edge slice repeated beyond the volume), as the book feeds its U-Net."""
    stacks = context_stacks(hu, start, stop, model.config.context)  # (B, H, W, 2C+1)
    # astype keeps the window view's stride order (slice-major), so after the permute (a view) the
    # batch is contiguous N x C x H x W, not channels-last
    x = torch.from_numpy(stacks.astype(np.float32)).to(device).permute(0, 3, 1, 2)
    return in_pieces(model, x, batch_pixels)[:, 0]


Box = tuple[slice, slice, slice]  # index, row and column spans of a CT


def segment(hu: np.ndarray, model: NoduleSegmenter, device: torch.device, fast: bool = False,
            progress: bool = False, batch_pixels: int = BATCH_PIXELS, box: Box | None = None) -> np.ndarray:
    """Nodule mask of the whole CT: every slice with its context stack, sigmoid > 0.5, one 3D erosion.

    With box, only the box is segmented and the mask is empty around it. Its slices still see their
    context slices and its pixels their receptive field (runtime.around), so inside the box the
    U-Net's mask is the whole CT's to the bit. A batch holds at most batch_pixels: small slices are
    batched, larger ones run in row bands (half a 512x512 slice by default). On CPU, small batches
    run as fast (their activations stay in cache) and bound memory."""
    index, rows, cols = box or (slice(0, hu.shape[0]), slice(0, hu.shape[1]), slice(0, hu.shape[2]))
    seen_rows, seen_cols = around(rows, hu.shape[1], model), around(cols, hu.shape[2], model)
    seen = hu[:, seen_rows, seen_cols]  # a view; each pass copies its stacks
    inner = (slice(None), slice(rows.start - seen_rows.start, rows.stop - seen_rows.start),
             slice(cols.start - seen_cols.start, cols.stop - seen_cols.start))
    slices = slices_per_pass(seen.shape[1], seen.shape[2], batch_pixels)  # stacks are built for one pass at a time
    mask = np.zeros(hu.shape, bool)
    with torch.inference_mode(), precision(device, fast):
        for start in tqdm(range(index.start, index.stop, slices), desc="segment", unit="batch", disable=not progress):
            stop = min(start + slices, index.stop)
            probs = slice_probabilities(seen, model, device, start, stop, batch_pixels)[inner]
            mask[start:stop, rows, cols] = (probs > 0.5).cpu().numpy()
    return_freed_memory()  # the U-Net's activations, before the erosion's copy of the mask
    return ndimage.binary_erosion(mask, iterations=1)


def components(mask: np.ndarray, hu: np.ndarray) -> Components:
    """Connected components (face connectivity): centres weighted by clipped HU + 1001, voxel counts and
    voxels.

    Sums run over the mask's voxels only (a tiny share of the CT), so no whole-volume float copy
    is made: on a 512x512x99 CT that saves about 0.5 GB over a whole-volume centre of mass."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return Components(np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64))
    flat = np.flatnonzero(labels)
    component = labels.ravel()[flat]
    del labels
    weight = hu.ravel()[flat].astype(np.float64) - HU_MIN + 1
    total = np.bincount(component, weight, count + 1)[1:]
    coords = np.unravel_index(flat, mask.shape)
    centers = np.stack([np.bincount(component, weight * c, count + 1)[1:] for c in coords], axis=1) / total[:, None]
    voxels = np.bincount(component, minlength=count + 1)[1:]
    members = flat[np.argsort(component, kind="stable")]
    return Components(centers, voxels, members, np.concatenate([[0], np.cumsum(voxels)]))


def group(mask: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """components() without the voxels: (centres, voxel counts)."""
    found = components(mask, hu)
    return found.centers, found.voxels


def class1_probability(model: NoduleClassifier, crops: torch.Tensor) -> torch.Tensor:
    """The softmax of class 1 (nodule, or malignant) for a batch of N x 1 x D x H x W HU crops, in the
    channels-last layout the classifiers run fastest in; nodule-serve's /predict answers with it too."""
    return model(crops.contiguous(memory_format=torch.channels_last_3d))[1][:, 1].float()


def _mean_over_views(hu: np.ndarray, centers_irc: np.ndarray, model: NoduleClassifier, device: torch.device,
                     batch_size: int, views, bar) -> np.ndarray:
    probs = np.zeros(len(centers_irc))
    for start in range(0, len(centers_irc), batch_size):
        crops = gather_crops(hu, centers_irc[start:start + batch_size], model.config.crop_size,
                             zoom=model.config.crop_zoom)
        x = torch.from_numpy(crops).to(device).float()[:, None]
        votes = []
        for dims in views:
            view = torch.flip(x, dims) if dims else x  # the plain pass copies nothing extra
            votes.append(class1_probability(model, view))
        probs[start:start + len(crops)] = (sum(votes) / len(views)).cpu().numpy()
        bar.update(len(crops))
    return probs


def classify(hu: np.ndarray, centers_irc: np.ndarray, model: NoduleClassifier, device: torch.device,
             settings: AnalysisSettings = AnalysisSettings(), progress: bool = False,
             desc: str = "classify") -> np.ndarray:
    """Class-1 softmax probability for each candidate crop. With settings.tta, the mean over the
    crop's four in-plane mirror images: a nodule is one in every mirror, and averaging evens out the
    model's view-to-view noise on small, ambiguous ones. Candidates whose plain probability is under
    settings.tta_floor keep it: most lie far below any threshold that matters, so mirroring only the
    others saves most of the 4x."""
    with torch.inference_mode(), precision(device, settings.fast):
        with tqdm(total=len(centers_irc), desc=desc, unit="crop", disable=not progress) as bar:
            probs = _mean_over_views(hu, centers_irc, model, device, settings.batch_size, MIRRORS[:1], bar)
        if settings.tta:
            chosen = np.flatnonzero(probs >= settings.tta_floor)
            with tqdm(total=len(chosen), desc=f"{desc} mirrored", unit="crop", disable=not progress) as bar:
                mirrored = _mean_over_views(hu, centers_irc[chosen], model, device, settings.batch_size,
                                            MIRRORS[1:], bar)
            probs[chosen] = (probs[chosen] + (len(MIRRORS) - 1) * mirrored) / len(MIRRORS)
    return probs


def _proposals(hu: np.ndarray, segmenter: NoduleSegmenter, device: torch.device, settings: AnalysisSettings,
               progress: bool, box: Box | None = None) -> Components:
    """The candidates as components (propose() describes them), found within box when given."""
    mask = segment(hu, segmenter, device, settings.fast, progress, box=box)
    found = components(mask, hu)
    if settings.split:
        found = found + components(ndimage.binary_erosion(mask), hu)
    del mask
    return_freed_memory()
    return found


@dataclass
class _Places:
    """Where candidates may lie: the patient's body mask (at mask_step) and, with lung_only, the lungs
    (None without lung_only or when no lungs were found)."""

    body: np.ndarray
    step: int
    lungs: Lungs | None


def _places(ct: CtVolume, settings: AnalysisSettings, note: Callable[[str], None] | None) -> _Places:
    """The body mask, and with settings.lung_only the lungs. A CT in which no lungs are found (a head,
    an abdomen, a phantom) keeps what the body mask keeps, and note() is told: dropping every candidate
    there would hide them all without a word."""
    step = mask_step(ct.hu.shape)
    places = _Places(body_mask(ct.hu, step), step, None)
    if settings.lung_only:
        lungs = find_lungs(ct.hu, ct.geometry.spacing, places.body, step)
        if lungs.found:
            places.lungs = lungs
        elif note is not None:
            note(f"no lungs found in {ct.series_uid}; keeping its candidates inside the body")
    return places


def _where(places: _Places, centers_irc: np.ndarray, settings: AnalysisSettings) -> tuple[np.ndarray, np.ndarray]:
    """(inside the body, kept) for each candidate centre. Kept: inside the body unless
    settings.keep_outside, and inside the lungs where they were looked for and found."""
    inside = sample_mask(places.body, centers_irc, places.step)
    kept = np.ones(len(centers_irc), bool) if settings.keep_outside else inside
    if places.lungs is not None:
        kept = kept & places.lungs.contains(centers_irc)
    return inside, kept


def propose(hu: np.ndarray, segmenter: NoduleSegmenter, device: torch.device,
            settings: AnalysisSettings = AnalysisSettings(),
            progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pipeline's candidates before classification: (centres irc, voxel counts, inside the body).

    With settings.split, the pieces left by eroding the mask once more are candidates too. A nodule
    that touches a vessel forms one component with it, whose centre can lie outside the nodule; the
    second erosion cuts the thin connection and the nodule's own piece gets its own centre."""
    found = _proposals(hu, segmenter, device, settings, progress)
    return found.centers, found.voxels, inside_body(hu, found.centers)


def _malignancy(hu: np.ndarray, centers: np.ndarray, reported: np.ndarray, measured: dict[int, NoduleMeasure],
                models: Models, device: torch.device, settings: AnalysisSettings, progress: bool) -> np.ndarray:
    """The reported candidates' malignancy probabilities (NaN elsewhere, and everywhere without a model),
    each crop centred on the nodule as measured where it was: the model learnt nodules at their annotated
    centres, which the fitted centre is ~0.25 mm from and the candidate's ~0.75 mm (docs/experiments.md)."""
    malignancy = np.full(len(centers), np.nan)
    if models.malignancy is not None:
        crop_centres = np.array([measured[i].centre_irc if i in measured else centers[i] for i in reported])
        malignancy[reported] = classify(hu, crop_centres.reshape(-1, 3), models.malignancy, device,
                                        replace(settings, tta_floor=0.0), progress, desc="malignancy")
    return malignancy


def analyze(ct: CtVolume, models: Models, settings: AnalysisSettings = AnalysisSettings(),
            device: torch.device = torch.device("cpu"), progress: bool = False,
            note: Callable[[str], None] | None = None) -> list[Detection]:
    """Every candidate of the CT, most probable nodule first, centred on the dense tissue near it with
    settings.recentre; outside-body candidates dropped unless settings.keep_outside, outside-lung ones
    too with settings.lung_only, which also keeps the U-Net within the lungs' box (note(message) hears
    when no lungs are found). Those at or above settings.threshold (the reported ones) keep their
    voxels (Detection.voxel_index), for the label map of a report."""
    keep_freed_memory()
    return_freed_memory()  # what reading the CT left behind
    places = _places(ct, settings, note)
    box = places.lungs.box(ct.hu.shape) if places.lungs is not None else None  # candidates elsewhere are dropped
    found = _proposals(ct.hu, models.segmenter, device, settings, progress, box)
    centers = recentred(ct.hu, found.centers, ct.geometry.spacing) if settings.recentre else found.centers
    inside, kept = _where(places, centers, settings)
    centers, voxels, inside, ids = centers[kept], found.voxels[kept], inside[kept], np.flatnonzero(kept)
    nodule = classify(ct.hu, centers, models.classifier, device, settings, progress)
    xyz = irc_to_xyz(centers, ct.geometry).reshape(-1, 3)
    diameters = sphere_diameters(voxels, ct.geometry.spacing)
    if settings.dedupe:
        keep = suppress_duplicates(xyz, diameters, nodule)
        centers, voxels, inside, nodule, xyz, diameters, ids = (a[keep] for a in (centers, voxels, inside, nodule, xyz,
                                                                                 diameters, ids))
    reported = np.flatnonzero(nodule >= settings.threshold)
    measured = measure_nodules(ct.hu, ct.geometry.spacing, centers, reported)
    for i, measure in measured.items():
        diameters[i] = measure.diameter_mm
    malignancy = _malignancy(ct.hu, centers, reported, measured, models, device, settings, progress)
    order = np.argsort(-nodule, kind="stable")
    # a copy per reported candidate: a view would keep every candidate's voxels alive with it
    kept = {int(i): found.voxels_of(ids[i]).copy() for i in reported}
    return [Detection(tuple(xyz[i].round(4).tolist()), tuple(centers[i].round(4).tolist()), float(nodule[i]),
                      None if np.isnan(malignancy[i]) else float(malignancy[i]), float(diameters[i]),
                      int(voxels[i]), bool(inside[i]), kept.get(int(i))) for i in order]
