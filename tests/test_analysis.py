"""Pipeline stages on hand-made volumes whose answers are known."""

import numpy as np
import pytest
import torch
from torch import nn

from p2ch_app.analysis import body_mask, group, in_row_bands, inside_body, segment
from p2ch_app.data.ct import slice_stack
from tests.conftest import BOOK_MODELS, requires_shared


def test_group_weights_centres_by_density_and_counts_voxels():
    mask = np.zeros((10, 10, 10), bool)
    hu = np.full(mask.shape, -1000, np.int16)
    mask[2, 2, 2:4] = True
    hu[2, 2, 2], hu[2, 2, 3] = -1000, 1000  # weights 1 and 2001: the centre sits near the dense voxel
    mask[7, 7, 7] = True
    mask[8, 8, 8] = True  # touches (7,7,7) only at a corner: a separate component
    centers, voxels = group(mask, hu)
    assert voxels.tolist() == [2, 1, 1]
    assert centers[0] == pytest.approx([2, 2, 2 + 2001 / 2002])
    assert centers[1:].tolist() == [[7, 7, 7], [8, 8, 8]]


def test_group_agrees_with_scipy_centre_of_mass_on_a_random_mask():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 1001, (12, 20, 20)).astype(np.int16)
    mask = rng.random(hu.shape) < 0.2
    labels, count = ndimage.label(mask)
    centers, voxels = group(mask, hu)
    expected = ndimage.center_of_mass(hu.astype(np.float64) + 1001, labels, np.arange(1, count + 1))
    assert np.allclose(centers, expected, rtol=0, atol=1e-9)
    assert voxels.tolist() == np.bincount(labels.ravel())[1:].tolist()


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


class CentreSliceThreshold(nn.Module):
    """Stands in for the U-Net: 'nodule' where the centre slice of the stack is dense."""

    def __init__(self, context: int):
        super().__init__()
        self.context = context
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return (x[:, self.context:self.context + 1] > 0).float()


def test_segment_feeds_each_slice_with_its_context_and_erodes():
    rng = np.random.default_rng(1)
    hu = np.full((9, 12, 12), -1000, np.int16)
    hu[3:7, 3:9, 3:9] = 50  # a 4x6x6 block: after one 3D erosion a 2x4x4 core remains
    hu += rng.integers(-5, 5, hu.shape).astype(np.int16)
    model = CentreSliceThreshold(context=2)
    mask = segment(hu, model, context=2, device=torch.device("cpu"), batch_pixels=4 * 12 * 12 + 5)
    expected = np.zeros(hu.shape, bool)
    expected[4:6, 4:8, 4:8] = True
    assert np.array_equal(mask, expected)
    assert [len(x) for x in model.seen] == [4, 4, 1]  # slices per batch from the pixel budget
    stacks = torch.cat(model.seen)
    assert stacks.shape == (9, 5, 12, 12)
    for k in (0, 4, 8):
        assert np.array_equal(stacks[k].numpy(), slice_stack(hu, k, 2).astype(np.float32))


@pytest.mark.parametrize("depth, height, rows", [(3, 200, 64), (3, 128, 50), (2, 96, 16)])
def test_row_bands_give_the_whole_slice_result(depth, height, rows):
    from p2ch_app.models import NoduleSegmenter, SegmenterConfig

    class Logits(NoduleSegmenter):  # before the sigmoid, which would hide differences
        def forward(self, x):
            return self.unet(self.input_batchnorm(x))

    torch.manual_seed(depth)
    model = Logits(SegmenterConfig(context=1, depth=depth, width_factor=2)).eval()
    for module in model.modules():  # batch norm with non-trivial statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, height, 40)
    with torch.inference_mode():
        whole, banded = model(x), in_row_bands(model, x, rows)
        wrong = in_row_bands(model, x, rows, halo=0)  # zero padding at every band edge: visibly wrong
    assert banded.shape == whole.shape
    assert torch.allclose(banded, whole, rtol=0, atol=1e-5)
    assert (wrong - whole).abs().max() > 1e-3


@pytest.mark.parametrize("batch, height, width, batch_pixels", [(5, 32, 40, 2 * 32 * 40), (3, 128, 40, 64 * 40)])
def test_in_pieces_gives_the_whole_batch_result(batch, height, width, batch_pixels, monkeypatch):
    import p2ch_app.analysis
    from p2ch_app.models import NoduleSegmenter, SegmenterConfig

    torch.manual_seed(0)
    model = NoduleSegmenter(SegmenterConfig(context=1, depth=2, width_factor=2)).eval()
    passes = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: passes.append(x.shape[0] * x.shape[2] * x.shape[3]) or real_forward(x))
    x = torch.randn(batch, 3, height, width)
    with torch.inference_mode():
        whole = real_forward(x)
        pieces = p2ch_app.analysis.in_pieces(model, x, batch_pixels)
    assert pieces.shape == whole.shape and torch.allclose(pieces, whole, rtol=0, atol=1e-5)
    assert len(passes) > 1 and max(passes) <= batch_pixels + 2 * 32 * width  # a band carries its halo


class CentreVoxelClassifier(nn.Module):
    """Stands in for the CNN: nodule probability rises with the density at the crop centre."""

    def forward(self, x):
        centre = x[:, 0, 16, 24, 24]
        logits = torch.stack([torch.zeros_like(centre), centre / 100], dim=1)
        return logits, logits.softmax(dim=1)


class OffCentreVoxelClassifier(nn.Module):
    """Nodule probability from the density of one voxel off the crop's centre (row 20, col 30), which
    each mirror image moves elsewhere."""

    def forward(self, x):
        spot = x[:, 0, 16, 20, 30]
        logits = torch.stack([torch.zeros_like(spot), spot / 100], dim=1)
        return logits, logits.softmax(dim=1)


def test_classify_with_tta_averages_the_four_in_plane_mirror_images():
    from p2ch_app.analysis import classify
    from p2ch_app.data.ct import gather_crops

    hu = np.full((40, 60, 60), -1000, np.int16)
    centre = np.array([[20.0, 30.0, 30.0]])
    hu[20, 26, 36] = 600
    assert gather_crops(hu, centre)[0, 16, 20, 30] == 600  # the spot sits where the model looks
    plain = classify(hu, centre, OffCentreVoxelClassifier(), 4, torch.device("cpu"))
    mirrored = classify(hu, centre, OffCentreVoxelClassifier(), 4, torch.device("cpu"), tta=True)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    assert plain[0] == pytest.approx(sigmoid(6.0))
    # left-right, front-back and both move the spot away: three of the four views see air
    assert mirrored[0] == pytest.approx((sigmoid(6.0) + 3 * sigmoid(-10.0)) / 4)


def test_classify_mirrors_only_the_candidates_from_the_tta_floor():
    from p2ch_app.analysis import classify

    hu = np.full((40, 60, 80), -1000, np.int16)  # wide enough that no crop is shifted at the edge
    hu[20, 26, 36] = 600
    # the first candidate's plain view sees the spot; the second's sees air, its left-right mirror the spot
    centres = np.array([[20.0, 30.0, 30.0], [20.0, 30.0, 43.0]])
    model, cpu = OffCentreVoxelClassifier(), torch.device("cpu")
    plain = classify(hu, centres, model, 4, cpu)
    every = classify(hu, centres, model, 4, cpu, tta=True)
    floored = classify(hu, centres, model, 4, cpu, tta=True, tta_floor=0.05)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    assert plain == pytest.approx([sigmoid(6.0), sigmoid(-10.0)])
    assert every == pytest.approx([(sigmoid(6.0) + 3 * sigmoid(-10.0)) / 4] * 2)
    assert floored == pytest.approx([every[0], plain[1]])


def hand_made_ct():
    from p2ch_app.data.ct import CtVolume, Geometry

    z, y, x = np.indices((36, 80, 80))
    hu = np.full((36, 80, 80), -1000, np.int16)
    hu[((y - 40) / 30) ** 2 + ((x - 40) / 35) ** 2 <= 1] = 40
    hu[((y - 40) / 15) ** 2 + ((x - 28) / 10) ** 2 <= 1] = -850
    hu[(z - 18) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 4] = 600  # a nodule in the lung
    hu[10:25, 2:5, 5:9] = 600  # a tube outside the patient
    geometry = Geometry(np.array([-40.0, -40.0, -100.0]), np.array([1.0, 1.0, 2.0]), np.eye(3))
    return CtVolume(hu, geometry, "1.2.3")


def test_analyze_end_to_end_with_stand_in_models():
    from p2ch_app.analysis import Models, analyze
    from p2ch_app.data.ct import irc_to_xyz

    ct = hand_made_ct()
    models = Models(CentreSliceThreshold(context=1), 1, CentreVoxelClassifier(), CentreVoxelClassifier(), {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 500).float()
    found = analyze(ct, models)
    assert len(found) == 1  # the tube is outside the body
    nodule = found[0]
    assert nodule.center_irc == pytest.approx((18, 40, 28), abs=0.01) and nodule.inside_body
    assert nodule.center_xyz == pytest.approx(tuple(irc_to_xyz((18, 40, 28), ct.geometry)), abs=0.01)
    assert nodule.nodule_prob > 0.99 and nodule.malignancy_prob > 0.99
    assert nodule.diameter_mm == pytest.approx(2 * (3 * nodule.voxels * 2.0 / (4 * np.pi)) ** (1 / 3))
    both = analyze(ct, models, keep_outside=True)
    assert len(both) == 2 and sorted(d.inside_body for d in both) == [False, True]


def test_glibc_takes_the_allocator_settings():
    import ctypes.util

    from p2ch_app.analysis import keep_freed_memory, return_freed_memory

    if "libc.so.6" not in str(ctypes.util.find_library("c")):
        pytest.skip("glibc's allocator settings: this C library is not glibc")
    assert keep_freed_memory()  # False when glibc refuses a setting (older ones cap the mmap threshold)
    return_freed_memory()


def test_malignancy_is_scored_only_above_the_nodule_threshold():
    from p2ch_app.analysis import Models, analyze

    ct = hand_made_ct()
    models = Models(CentreSliceThreshold(context=1), 1, CentreVoxelClassifier(), CentreVoxelClassifier(), {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 500).float()
    (nodule,) = analyze(ct, models, threshold=1.1)
    assert nodule.malignancy_prob is None


def test_suppress_duplicates_drops_what_lies_within_a_more_probable_candidates_diameter():
    from p2ch_app.analysis import suppress_duplicates

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


def test_analyze_dedupe_keeps_the_stronger_of_two_pieces_of_one_nodule():
    from p2ch_app.analysis import Models, analyze

    ct = hand_made_ct()
    z, y, x = np.indices(ct.hu.shape)
    ct.hu[(z - 18) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 16] = 600  # a ~8 mm nodule once eroded
    ct.hu[17:20, 39:42, 34:37] = 200  # a fainter piece beside it: one voxel after the erosion, 7 mm away
    models = Models(CentreSliceThreshold(context=1), 1, CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 150).float()
    plain = analyze(ct, models)
    assert [d.center_irc[2] for d in plain] == pytest.approx([28, 35], abs=0.01)
    assert plain[0].diameter_mm > 7 and plain[0].nodule_prob > plain[1].nodule_prob > 0.5
    assert analyze(ct, models, dedupe=True) == plain[:1]


def test_analyze_split_adds_the_nodule_piece_of_a_component_merged_with_a_vessel():
    from p2ch_app.analysis import Models, analyze

    ct = hand_made_ct()
    z, y, x = np.indices(ct.hu.shape)
    ct.hu[(z - 18) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 9] = 600
    ct.hu[16:20, 38:42, 31:39] = 600  # a vessel 4 voxels thick touching it: 2 voxels thick after the erosion
    models = Models(CentreSliceThreshold(context=1), 1, CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 150).float()
    (merged,) = analyze(ct, models)
    assert merged.center_irc[2] > 30  # pulled towards the vessel
    found = analyze(ct, models, split=True)
    assert len(found) == 2 and merged in found
    (piece,) = [d for d in found if d != merged]
    assert piece.center_irc == pytest.approx((18, 40, 28), abs=0.3) and piece.voxels < merged.voxels


def test_mined_lookalikes_are_in_body_candidates_away_from_every_nodule(prepared_synth, monkeypatch):
    import p2ch_app.analysis as analysis
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.data.ct import xyz_to_irc
    from p2ch_app.data.index import build_index

    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache")
    row = int(np.flatnonzero(index.has_annotation)[0])
    code, nodule = int(index.series_code[row]), index.center_xyz[row]
    clearance = max(index.diameter_mm[row], analysis.MINED_CLEARANCE_MM)
    others = index.center_xyz[(index.series_code == code) & index.is_nodule]
    near, far = nodule + [0.9 * clearance, 0, 0], nodule + [0, 0, clearance + 1]
    assert np.all(np.linalg.norm(others - far, axis=1) > clearance)  # far from the other nodules too
    geometry = cache.record(index.series_uids[code]).geometry
    proposed = xyz_to_irc(np.array([nodule, near, far, far]), geometry)
    inside = np.array([True, True, True, False])
    monkeypatch.setattr(analysis, "propose", lambda hu, *args, **kwargs: (proposed, np.ones(4, int), inside))
    codes, found = analysis.mine_lookalikes(cache, index, [code], None, 3, torch.device("cpu"))
    assert codes.tolist() == [code] and found == pytest.approx(far[None], abs=1e-6)


def test_newest_best(tmp_path):
    import os

    from p2ch_app.analysis import newest_best

    assert newest_best(tmp_path, "luna-train-cls") is None
    for i, name in enumerate(["2026-01-01_10.00.00", "2026-01-02_10.00.00"]):
        path = tmp_path / "luna-train-cls" / name / "best.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    assert newest_best(tmp_path, "luna-train-cls").parent.name == "2026-01-02_10.00.00"


@requires_shared
def test_load_the_book_models_and_refuse_swapped_ones():
    from p2ch_app.analysis import load_models
    from p2ch_app.errors import UserError

    seg, cls = next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state"))
    models = load_models(seg, cls, None, torch.device("cpu"))
    assert models.context == 3 and not models.segmenter.training and models.malignancy is None
    with pytest.raises(UserError, match="holds a classifier .*not a segmenter"):
        load_models(cls, cls, None, torch.device("cpu"))
    with pytest.raises(UserError, match="holds a segmenter .*not a classifier"):
        load_models(seg, seg, None, torch.device("cpu"))
