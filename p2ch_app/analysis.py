"""The end-to-end pipeline on one CT: segment, group voxels into candidates, classify, score malignancy.

Every stage works on whole batches: slice stacks come from a sliding-window view of the volume and
candidate crops from one fancy-indexing gather, so no Python loop runs per slice or per candidate.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

from p2ch_app.checkpoints import CLASSIFIER, SEGMENTER, load_model
from p2ch_app.data.cache import LunaCache
from p2ch_app.data.ct import HU_MIN, CtVolume, context_slices, gather_crops, irc_to_xyz, load_series
from p2ch_app.data.index import LunaIndex
from p2ch_app.evaluation import ScanResult
from p2ch_app.models import NoduleClassifier, NoduleSegmenter

BODY_HU = -500  # denser than this is patient (or table); the lungs are filled in as holes
MINED_CLEARANCE_MM = 6.0  # a mined look-alike lies at least this far from any nodule's centre
BATCH_PIXELS = 256 * 512  # per U-Net pass: half a 512x512 slice (its activations alone reach ~190 MiB)


@dataclass
class Detection:
    center_xyz: tuple[float, float, float]
    center_irc: tuple[float, float, float]
    nodule_prob: float
    malignancy_prob: float | None
    diameter_mm: float  # of a sphere with the component's volume
    voxels: int
    inside_body: bool


@dataclass
class Models:
    segmenter: NoduleSegmenter
    context: int
    classifier: NoduleClassifier
    malignancy: NoduleClassifier | None
    paths: dict[str, str]


def newest_best(runs_dir: Path, command: str) -> Path | None:
    """The most recent best.pt of a trainer under runs_dir, if any."""
    found = sorted(Path(runs_dir).glob(f"{command}/*/best.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load_segmenter(path: Path, device: torch.device) -> tuple[NoduleSegmenter, int]:
    """(U-Net, context) from our checkpoint or the book's .state, built as it was trained."""
    segmenter = load_model(path, SEGMENTER)
    segmenter.to(device, memory_format=torch.channels_last)  # channels-last: 1.7x (2D), 2x (3D) on CPU
    return segmenter, segmenter.config.context


def load_models(seg: Path, cls: Path, mal: Path | None, device: torch.device) -> Models:
    """Our checkpoints or the book's .state files."""
    segmenter, context = load_segmenter(seg, device)
    classifier = load_model(cls, CLASSIFIER)
    malignancy = load_model(mal, CLASSIFIER) if mal is not None else None
    for model in (classifier, malignancy):
        if model is not None:
            model.to(device, memory_format=torch.channels_last_3d)
    return Models(segmenter, context, classifier, malignancy,
                  {"seg": str(seg), "cls": str(cls), "mal": str(mal) if mal else None})


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS between stages (glibc only; elsewhere a no-op):
    keep_freed_memory() stops glibc from doing it on its own, so what segmentation freed would
    otherwise stay resident under the next stages."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def keep_freed_memory() -> bool:
    """Let glibc serve blocks of up to 32 MB (every activation of a default-sized pass) from its heap
    and keep freed ones mapped until return_freed_memory(). By default it maps large blocks afresh
    and trims the heap after each pass, so every U-Net pass faulted its activations' pages in again:
    the real CT's segmentation took 14-15 s instead of 11-12 s, at the same peak memory. Returns
    whether glibc took both settings."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def reduced_precision_pays(device: torch.device) -> bool:
    """Whether --fast can speed this device up: a GPU, or a CPU with bfloat16 instructions. Without
    them oneDNN emulates bfloat16: 12x (U-Net) to 120x (classifier) slower on this machine's CPU."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision(device: torch.device, fast: bool):
    """Full float32, or with fast the device's reduced-precision autocast (float16 on CUDA, bfloat16
    on CPU, which only pays off on CPUs with bf16 instructions)."""
    if not fast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def in_row_bands(model: NoduleSegmenter, x: torch.Tensor, rows: int, halo: int | None = None) -> torch.Tensor:
    """model(x) computed band by band, `rows` rows at a time, each band with a halo of rows either
    side: the same result as the whole slice in a fraction of the memory (a 512x512 slice's U-Net
    activations alone reach ~190 MiB). Exact because the halo is wider than the U-Net's receptive
    field (23 rows for depth 3, halo 32) and bands start on its pooling grid (multiples of 4)."""
    height = x.shape[-2]
    if rows >= height:
        return model(x)
    halo = 8 * model.multiple if halo is None else halo
    rows = max(model.multiple, rows // model.multiple * model.multiple)
    bands = []
    for top in range(0, height, rows):
        lo, hi = max(top - halo, 0), min(top + rows + halo, height)
        bands.append(model(x[..., lo:hi, :])[..., top - lo:top - lo + min(rows, height - top), :])
    return torch.cat(bands, dim=-2)


def in_pieces(model: NoduleSegmenter, x: torch.Tensor, batch_pixels: int = BATCH_PIXELS) -> torch.Tensor:
    """model(x) for a batch of slice stacks, at most batch_pixels per pass: small slices a few at a
    time, large ones in row bands (in_row_bands). On this CPU two 256x256 slices per pass run 2.2x
    faster per slice than sixteen: the activations of a small pass stay in cache."""
    band_rows = max(1, batch_pixels // x.shape[-1])
    return torch.cat([in_row_bands(model, part, band_rows)
                      for part in x.split(slices_per_pass(x.shape[-2], x.shape[-1], batch_pixels))])


def slices_per_pass(height: int, width: int, batch_pixels: int = BATCH_PIXELS) -> int:
    """How many whole slices fit in batch_pixels (at least one: a larger slice goes in row bands)."""
    return max(1, batch_pixels // (height * width))


def slice_probabilities(hu: np.ndarray, model: NoduleSegmenter, context: int, device: torch.device, start: int,
                        stop: int, batch_pixels: int = BATCH_PIXELS) -> torch.Tensor:
    """The U-Net's nodule probability (stop-start, H, W) for slices start..stop-1, each seen with its
    context slices (the edge slice repeated beyond the volume), as the book feeds its U-Net."""
    chunk = hu[context_slices(start, stop, context, hu.shape[0])]
    stacks = np.lib.stride_tricks.sliding_window_view(chunk, 2 * context + 1, axis=0)  # (B, H, W, 2C+1)
    x = torch.from_numpy(stacks.astype(np.float32)).to(device)
    x = x.permute(0, 3, 1, 2)  # a channels-last view: no copy, the layout oneDNN runs fastest
    return in_pieces(model, x, batch_pixels)[:, 0]


def segment(hu: np.ndarray, model: NoduleSegmenter, context: int, device: torch.device, progress: bool = False,
            fast: bool = False, batch_pixels: int = BATCH_PIXELS) -> np.ndarray:
    """Nodule mask of the whole CT: every slice with its context stack, sigmoid > 0.5, one 3D erosion.

    A batch holds at most batch_pixels: small slices are batched, larger ones run in row bands
    (half a 512x512 slice by default). On CPU, small batches run as fast (their activations stay
    in cache) and bound memory."""
    slices = slices_per_pass(hu.shape[1], hu.shape[2], batch_pixels)  # stacks are built for one pass at a time
    mask = np.empty(hu.shape, bool)
    with torch.inference_mode(), precision(device, fast):
        for start in tqdm(range(0, hu.shape[0], slices), desc="segment", unit="batch", disable=not progress):
            stop = min(start + slices, hu.shape[0])
            probs = slice_probabilities(hu, model, context, device, start, stop, batch_pixels)
            mask[start:stop] = (probs > 0.5).cpu().numpy()
    return_freed_memory()  # the U-Net's activations, before the erosion's copy of the mask
    return ndimage.binary_erosion(mask, iterations=1)


def group(mask: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (face connectivity): centres weighted by clipped HU + 1001, voxel counts.

    Sums run over the mask's voxels only (a tiny share of the CT), so no whole-volume float copy
    is made: on a 512x512x99 CT that saves about 0.5 GB over a whole-volume centre of mass."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    flat = np.flatnonzero(labels)
    component = labels.ravel()[flat]
    del labels
    weight = hu.ravel()[flat].astype(np.float64) - HU_MIN + 1
    total = np.bincount(component, weight, count + 1)[1:]
    coords = np.unravel_index(flat, mask.shape)
    centers = np.stack([np.bincount(component, weight * c, count + 1)[1:] for c in coords], axis=1) / total[:, None]
    return centers, np.bincount(component, minlength=count + 1)[1:]


# The crop as it is, mirrored left-right, front-back, and both (dims of a batch of N x 1 x D x H x W crops)
MIRRORS = ((), (4,), (3,), (3, 4))
TTA_FLOOR = 0.05  # nodule-analyze --tta: plain nodule probability from which the mirror images are added


def _mean_over_views(hu: np.ndarray, centers_irc: np.ndarray, model: NoduleClassifier, batch_size: int,
                     device: torch.device, views, bar) -> np.ndarray:
    probs = np.zeros(len(centers_irc))
    for start in range(0, len(centers_irc), batch_size):
        crops = gather_crops(hu, centers_irc[start:start + batch_size])
        x = torch.from_numpy(crops).to(device).float()[:, None]
        votes = []
        for dims in views:
            view = torch.flip(x, dims) if dims else x  # the plain pass copies nothing extra
            votes.append(model(view.contiguous(memory_format=torch.channels_last_3d))[1][:, 1].float())
        probs[start:start + len(crops)] = (sum(votes) / len(views)).cpu().numpy()
        bar.update(len(crops))
    return probs


def classify(hu: np.ndarray, centers_irc: np.ndarray, model: NoduleClassifier, batch_size: int,
             device: torch.device, progress: bool = False, fast: bool = False, desc: str = "classify",
             tta: bool = False, tta_floor: float = 0.0) -> np.ndarray:
    """Class-1 softmax probability for each candidate crop. With tta, the mean over the crop's four
    in-plane mirror images: a nodule is one in every mirror, and averaging evens out the model's
    view-to-view noise on small, ambiguous ones (demo data: CPM +0.03 to +0.07, for 4x the time).
    Candidates whose plain probability is under tta_floor keep it: most candidates lie far below
    any threshold that matters, so mirroring only the others saves most of the 4x."""
    with torch.inference_mode(), precision(device, fast):
        with tqdm(total=len(centers_irc), desc=desc, unit="crop", disable=not progress) as bar:
            probs = _mean_over_views(hu, centers_irc, model, batch_size, device, MIRRORS[:1], bar)
        if tta:
            chosen = np.flatnonzero(probs >= tta_floor)
            with tqdm(total=len(chosen), desc=f"{desc} mirrored", unit="crop", disable=not progress) as bar:
                mirrored = _mean_over_views(hu, centers_irc[chosen], model, batch_size, device, MIRRORS[1:], bar)
            probs[chosen] = (probs[chosen] + (len(MIRRORS) - 1) * mirrored) / len(MIRRORS)
    return probs


def body_mask(hu: np.ndarray, step: int = 1) -> np.ndarray:
    """The patient: the largest 3D component denser than BODY_HU, with the holes of each axial slice
    (lungs, airways) filled. Tubes, cables and the table fall outside it. With step, the mask is
    found on every step-th row and column (a quarter of the memory and time for step 2)."""
    dense = hu[:, ::step, ::step] > BODY_HU
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(dense, structure=in_plane)
    del dense
    labels, count = ndimage.label(filled)
    if count == 0:
        return filled
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def inside_body(hu: np.ndarray, centers_irc: np.ndarray) -> np.ndarray:
    """Whether each centre lies in the patient. Slices of 512 pixels are masked at every second
    pixel (about 1 mm): ample for telling the body from tubes and table, at a quarter of the cost."""
    if len(centers_irc) == 0:
        return np.zeros(0, bool)
    step = max(1, hu.shape[1] // 256)
    idx = np.rint(centers_irc).astype(int) // np.array([1, step, step])
    return body_mask(hu, step)[tuple(idx.T)]


def propose(hu: np.ndarray, segmenter: NoduleSegmenter, context: int, device: torch.device, progress: bool = False,
            fast: bool = False, split: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pipeline's candidates before classification: (centres irc, voxel counts, inside the body).

    With split, the pieces left by eroding the mask once more are candidates too. A nodule that
    touches a vessel forms one component with it, whose centre can lie outside the nodule; the
    second erosion cuts the thin connection and the nodule's own piece gets its own centre."""
    mask = segment(hu, segmenter, context, device, progress, fast)
    centers, voxels = group(mask, hu)
    if split:
        cores, core_voxels = group(ndimage.binary_erosion(mask), hu)
        centers, voxels = np.concatenate([centers, cores]), np.concatenate([voxels, core_voxels])
    del mask
    return_freed_memory()
    return centers, voxels, inside_body(hu, centers)


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


def mine_lookalikes(cache: LunaCache, index: LunaIndex, series_codes, segmenter: NoduleSegmenter, context: int,
                    device: torch.device, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(series code, centre xyz) of each in-body candidate the U-Net proposes away from every nodule
    of the given series: the look-alikes nodule-analyze will show the classifier, which candidates.csv
    may lack (a U-Net marks diaphragm domes and heart borders that no CSV candidate sits on).
    "Away" means farther than the nodule's diameter (at least MINED_CLEARANCE_MM) from its centre."""
    keep_freed_memory()
    codes, found = [], []
    for code in tqdm(series_codes, desc="mine look-alikes", unit="CT", disable=not progress):
        uid = index.series_uids[code]
        centers, _, inside = propose(cache.volume(uid), segmenter, context, device)
        xyz = irc_to_xyz(centers[inside], cache.record(uid).geometry).reshape(-1, 3)
        mine = (index.series_code == code) & index.is_nodule
        clearance = np.maximum(index.diameter_mm[mine], MINED_CLEARANCE_MM)
        distance = np.linalg.norm(xyz[:, None] - index.center_xyz[mine][None], axis=-1)
        xyz = xyz[np.all(distance > clearance, axis=1)]
        codes.append(np.full(len(xyz), code, np.int32))
        found.append(xyz)
    return np.concatenate(codes or [np.zeros(0, np.int32)]), np.concatenate(found or [np.zeros((0, 3))])


def analyze(ct: CtVolume, models: Models, threshold: float = 0.5, batch_size: int = 8, keep_outside: bool = False,
            device: torch.device = torch.device("cpu"), progress: bool = False, fast: bool = False,
            tta: bool = False, dedupe: bool = False, split: bool = False) -> list[Detection]:
    """Every candidate of the CT, most probable nodule first; outside-body candidates dropped unless
    keep_outside. tta: classify() averages mirror images. dedupe: suppress_duplicates(). split: see
    propose()."""
    keep_freed_memory()
    return_freed_memory()  # what reading the CT left behind
    centers, voxels, inside = propose(ct.hu, models.segmenter, models.context, device, progress, fast, split)
    if not keep_outside:
        centers, voxels, inside = centers[inside], voxels[inside], inside[inside]
    nodule = classify(ct.hu, centers, models.classifier, batch_size, device, progress, fast, tta=tta,
                      tta_floor=TTA_FLOOR)
    xyz = irc_to_xyz(centers, ct.geometry).reshape(-1, 3)
    diameters = 2 * np.cbrt(3 * voxels * float(np.prod(ct.geometry.spacing)) / (4 * np.pi))
    if dedupe:
        keep = suppress_duplicates(xyz, diameters, nodule)
        centers, voxels, inside, nodule, xyz, diameters = (a[keep] for a in (centers, voxels, inside, nodule, xyz,
                                                                            diameters))
    malignancy = np.full(len(centers), np.nan)
    if models.malignancy is not None:
        chosen = np.flatnonzero(nodule >= threshold)
        malignancy[chosen] = classify(ct.hu, centers[chosen], models.malignancy, batch_size, device, progress, fast,
                                      desc="malignancy", tta=tta)
    order = np.argsort(-nodule, kind="stable")
    return [Detection(tuple(xyz[i].round(4).tolist()), tuple(centers[i].round(4).tolist()), float(nodule[i]),
                      None if np.isnan(malignancy[i]) else float(malignancy[i]), float(diameters[i]),
                      int(voxels[i]), bool(inside[i])) for i in order]


def scan_result(detections: list[Detection], truth: LunaIndex, with_mal: bool) -> ScanResult:
    """A scan's detections beside its annotated nodules (those with a diameter), for scoring."""
    nodules = truth.has_annotation
    return ScanResult(
        detections_xyz=np.array([d.center_xyz for d in detections], float).reshape(-1, 3),
        nodule_prob=np.array([d.nodule_prob for d in detections], float),
        nodules_xyz=truth.center_xyz[nodules], diameters_mm=truth.diameter_mm[nodules],
        malignant=truth.malignancy[nodules],
        malignancy_prob=np.array([np.nan if d.malignancy_prob is None else d.malignancy_prob for d in detections])
        if with_mal else None)


def analyze_series(data_root: Path, index: LunaIndex, uids, models: Models, threshold: float = 0.5,
                   batch_size: int = 8, keep_outside: bool = False, device: torch.device = torch.device("cpu"),
                   progress: bool = False, fast: bool = False, tta: bool = False, dedupe: bool = False,
                   split: bool = False, on_ct=None) -> list[tuple[str, list[Detection], ScanResult]]:
    """analyze() over many LUNA series, each paired with its scoring against the annotations.
    on_ct(ct, detections), when given, sees each CT while it is loaded (for reports)."""
    results = []
    for uid in tqdm(uids, desc="nodule-analyze", unit="CT", disable=not progress):
        ct = load_series(data_root, uid)
        detections = analyze(ct, models, threshold, batch_size, keep_outside, device, fast=fast, tta=tta,
                             dedupe=dedupe, split=split)
        if on_ct is not None:
            on_ct(ct, detections)
        results.append((uid, detections, scan_result(detections, index.for_series(uid), models.malignancy is not None)))
    return results
