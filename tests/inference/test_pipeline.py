"""Pipeline stages on hand-made volumes whose answers are known."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from p2ch_app.data.ct import slice_stack
from p2ch_app.inference.pipeline import AnalysisSettings, group, segment, slice_probabilities
from p2ch_app.models import ClassifierConfig, SegmenterConfig
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


def test_components_keep_each_ones_voxels():
    from scipy import ndimage

    from p2ch_app.inference.pipeline import components

    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 1001, (9, 14, 14)).astype(np.int16)
    mask = rng.random(hu.shape) < 0.25
    labels, count = ndimage.label(mask)
    found = components(mask, hu)
    assert len(found.voxels) == count and found.starts[-1] == mask.sum()
    for k in range(count):
        assert np.array_equal(found.voxels_of(k), np.flatnonzero(labels == k + 1))  # raster order
    both = found + components(mask[::-1].copy(), hu)
    assert len(both.voxels) == 2 * count and np.array_equal(both.voxels_of(count), components(
        mask[::-1].copy(), hu).voxels_of(0))
    empty = components(np.zeros((3, 3, 3), bool), hu[:3, :3, :3])
    assert len(empty.voxels) == 0 and empty.starts.tolist() == [0]


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


class CentreSliceThreshold(nn.Module):
    """Stands in for the U-Net: 'nodule' where the centre slice of the stack is dense."""

    def __init__(self, context: int):
        super().__init__()
        self.context, self.config = context, SegmenterConfig(context=context)
        self.multiple = 1  # no pooling grid: a pixel's output is its own
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
    mask = segment(hu, model, torch.device("cpu"), batch_pixels=4 * 12 * 12 + 5)
    expected = np.zeros(hu.shape, bool)
    expected[4:6, 4:8, 4:8] = True
    assert np.array_equal(mask, expected)
    assert [len(x) for x in model.seen] == [4, 4, 1]  # slices per batch from the pixel budget
    stacks = torch.cat(model.seen)
    assert stacks.shape == (9, 5, 12, 12)
    for k in (0, 4, 8):
        assert np.array_equal(stacks[k].numpy(), slice_stack(hu, k, 2).astype(np.float32))


def test_segment_within_a_box_gives_the_whole_cts_mask_there(monkeypatch):
    """A U-Net of the book's depth: inside the box the mask is the whole CT's, outside it empty; without
    the halo around the box the U-Net sees zero padding instead of the CT, and the mask changes."""
    import p2ch_app.inference.runtime
    from p2ch_app.models import NoduleSegmenter

    torch.manual_seed(0)
    model = NoduleSegmenter(SegmenterConfig(context=1, depth=3, width_factor=2)).eval()
    hu = np.random.default_rng(0).integers(-1000, 400, (8, 96, 104)).astype(np.int16)
    with torch.inference_mode():  # the mask four-fifths full, so that some of it outlasts the erosion
        logits = torch.logit(slice_probabilities(hu, model, torch.device("cpu"), 0, len(hu)))
        model.unet.last.bias -= logits.quantile(0.2)
    box = (slice(2, 7), slice(41, 70), slice(38, 77))
    whole = segment(hu, model, torch.device("cpu"))
    boxed = segment(hu, model, torch.device("cpu"), box=box)
    interior = tuple(slice(s.start + 1, s.stop - 1) for s in box)  # the erosion eats the box's rim
    assert 0.05 < whole[interior].mean() < 0.95
    assert np.array_equal(boxed[interior], whole[interior])
    outside = np.ones(hu.shape, bool)
    outside[box] = False
    assert not boxed[outside].any()
    monkeypatch.setattr(p2ch_app.inference.runtime, "receptive_halo", lambda model: 0)
    assert not np.array_equal(segment(hu, model, torch.device("cpu"), box=box)[interior], whole[interior])


class CentreVoxelClassifier(nn.Module):
    """Stands in for the CNN: nodule probability rises with the density at the crop centre."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config  # the crops' size and zoom, as a real classifier's

    def forward(self, x):
        centre = x[:, 0, 16, 24, 24]
        logits = torch.stack([torch.zeros_like(centre), centre / 100], dim=1)
        return logits, logits.softmax(dim=1)


class OffCentreVoxelClassifier(CentreVoxelClassifier):
    """Nodule probability from the density of one voxel off the crop's centre (row 20, col 30), which
    each mirror image moves elsewhere."""

    def forward(self, x):
        spot = x[:, 0, 16, 20, 30]
        logits = torch.stack([torch.zeros_like(spot), spot / 100], dim=1)
        return logits, logits.softmax(dim=1)


def test_classify_with_tta_averages_the_four_in_plane_mirror_images():
    from p2ch_app.data.ct import gather_crops
    from p2ch_app.inference.pipeline import classify

    hu = np.full((40, 60, 60), -1000, np.int16)
    centre = np.array([[20.0, 30.0, 30.0]])
    hu[20, 26, 36] = 600
    assert gather_crops(hu, centre)[0, 16, 20, 30] == 600  # the spot sits where the model looks
    cpu, batch = torch.device("cpu"), AnalysisSettings(batch_size=4)
    plain = classify(hu, centre, OffCentreVoxelClassifier(), cpu, batch)
    mirrored = classify(hu, centre, OffCentreVoxelClassifier(), cpu, replace(batch, tta=True, tta_floor=0.0))
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    assert plain[0] == pytest.approx(sigmoid(6.0))
    # left-right, front-back and both move the spot away: three of the four views see air
    assert mirrored[0] == pytest.approx((sigmoid(6.0) + 3 * sigmoid(-10.0)) / 4)


def test_classify_crops_as_the_model_was_trained_zoomed_or_not():
    from p2ch_app.inference.pipeline import classify

    hu = np.full((40, 60, 60), -1000, np.int16)
    hu[20, 28, 33] = 600  # at zoom 2, crop pixel (20, 30) lies (20 - 24) / 2 rows and (30 - 24) / 2 cols off centre
    centre, cpu = np.array([[20.0, 30.0, 30.0]]), torch.device("cpu")
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    zoomed = classify(hu, centre, OffCentreVoxelClassifier(ClassifierConfig(crop_zoom=2)), cpu)
    assert zoomed[0] == pytest.approx(sigmoid(6.0))
    assert classify(hu, centre, OffCentreVoxelClassifier(), cpu)[0] == pytest.approx(sigmoid(-10.0))


def test_classify_mirrors_only_the_candidates_from_the_tta_floor():
    from p2ch_app.inference.pipeline import classify

    hu = np.full((40, 60, 80), -1000, np.int16)  # wide enough that no crop is shifted at the edge
    hu[20, 26, 36] = 600
    # the first candidate's plain view sees the spot; the second's sees air, its left-right mirror the spot
    centres = np.array([[20.0, 30.0, 30.0], [20.0, 30.0, 43.0]])
    model, cpu = OffCentreVoxelClassifier(), torch.device("cpu")
    batch = AnalysisSettings(batch_size=4)
    plain = classify(hu, centres, model, cpu, batch)
    every = classify(hu, centres, model, cpu, replace(batch, tta=True, tta_floor=0.0))
    floored = classify(hu, centres, model, cpu, replace(batch, tta=True, tta_floor=0.05))
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
    from p2ch_app.data.ct import irc_to_xyz
    from p2ch_app.inference.pipeline import Models, analyze
    from p2ch_app.inference.size import measure_nodule

    ct = hand_made_ct()
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), CentreVoxelClassifier(), {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 500).float()
    found = analyze(ct, models)
    assert len(found) == 1  # the tube is outside the body
    nodule = found[0]
    assert nodule.center_irc == pytest.approx((18, 40, 28), abs=0.01) and nodule.inside_body
    assert nodule.center_xyz == pytest.approx(tuple(irc_to_xyz((18, 40, 28), ct.geometry)), abs=0.01)
    assert nodule.nodule_prob > 0.99 and nodule.malignancy_prob > 0.99
    eroded = 2 * (3 * nodule.voxels * 2.0 / (4 * np.pi)) ** (1 / 3)  # a sphere of the component: smaller
    assert nodule.diameter_mm > eroded + 0.5  # measured in the CT (inference/size.py), not the eroded mask
    assert nodule.diameter_mm == measure_nodule(ct.hu, nodule.center_irc, ct.geometry.spacing).diameter_mm
    both = analyze(ct, models, AnalysisSettings(keep_outside=True))
    assert len(both) == 2 and sorted(d.inside_body for d in both) == [False, True]


def test_malignancy_looks_at_the_nodule_measured_not_at_the_candidate_on_its_rim():
    """The U-Net marks a dense spot at the rim of a 10 mm nodule: the candidate (and its nodule
    probability) stays there, while the malignancy crop is centred on the nodule the size measurement
    fitted, as the malignancy model learnt nodules at their annotated centres."""
    from p2ch_app.inference.pipeline import Models, analyze

    ct = hand_made_ct()
    z, y, x = np.indices(ct.hu.shape)
    ct.hu[ct.hu == 600] = -850  # the hand-made CT's own nodule out
    ct.hu[((z - 18) * 2) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 25] = 40  # 10 mm across (2 mm slices)
    ct.hu[(z - 18) ** 2 + (y - 40) ** 2 + (x - 31) ** 2 <= 4] = 600  # the spot the U-Net marks, 3 mm off
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), CentreVoxelClassifier(), {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 500).float()
    nodule = analyze(ct, models)[0]
    assert nodule.center_irc == pytest.approx((18, 40, 31), abs=0.01)
    assert nodule.nodule_prob > 0.99  # the classifier's crop: centred on the 600 HU spot
    assert nodule.malignancy_prob == pytest.approx(1 / (1 + np.exp(-0.4)), abs=0.01)  # 40 HU at the nodule's centre
    assert nodule.diameter_mm == pytest.approx(10, abs=0.5)


def test_reported_detections_carry_their_voxels_and_the_others_do_not():
    from scipy import ndimage

    from p2ch_app.inference.pipeline import Models, analyze

    ct = hand_made_ct()
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 500).float()
    eroded = ndimage.binary_erosion(ct.hu > 500)
    for settings in (AnalysisSettings(keep_outside=True), AnalysisSettings(keep_outside=True, split=True)):
        found = analyze(ct, models, settings)
        reported = [d for d in found if d.nodule_prob >= settings.threshold]
        assert reported and all(d.voxel_index is None for d in found if d.nodule_prob < settings.threshold)
        for d in reported:
            assert len(d.voxel_index) == d.voxels and eroded.ravel()[d.voxel_index].all()
            centre = np.array(np.unravel_index(d.voxel_index, ct.hu.shape)).mean(axis=1)
            assert np.abs(centre - d.center_irc).max() < 1.0  # its own voxels, around its centre
    nothing = analyze(ct, models, AnalysisSettings(keep_outside=True, threshold=1.0))
    assert all(d.voxel_index is None for d in nothing)


def test_malignancy_is_scored_only_above_the_nodule_threshold():
    from p2ch_app.inference.pipeline import Models, analyze

    ct = hand_made_ct()
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), CentreVoxelClassifier(), {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 500).float()
    (nodule,) = analyze(ct, models, AnalysisSettings(threshold=1.1))
    assert nodule.malignancy_prob is None


def test_analyze_dedupe_keeps_the_stronger_of_two_pieces_of_one_nodule():
    from p2ch_app.inference.pipeline import Models, analyze

    ct = hand_made_ct()
    z, y, x = np.indices(ct.hu.shape)
    ct.hu[(z - 18) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 16] = 600  # a ~8 mm nodule once eroded
    ct.hu[17:20, 39:42, 34:37] = 200  # a fainter piece beside it: one voxel after the erosion, 7 mm away
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 150).float()
    plain = analyze(ct, models)
    assert [d.center_irc[2] for d in plain] == pytest.approx([28, 35], abs=0.01)
    assert plain[0].diameter_mm > 7 and plain[0].nodule_prob > plain[1].nodule_prob > 0.5
    assert analyze(ct, models, AnalysisSettings(dedupe=True)) == plain[:1]


def test_analyze_recentre_moves_a_mark_a_slice_off_onto_the_nodule():
    from p2ch_app.inference.pipeline import Models, analyze

    ct = hand_made_ct()
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 0:1] > 500).float()  # marks the slice after each nodule slice
    (plain,) = analyze(ct, models)
    (moved,) = analyze(ct, models, AnalysisSettings(recentre=True))
    assert plain.center_irc == pytest.approx((19, 40, 28), abs=0.01)  # the nodule's centre is slice 18
    assert moved.center_irc == pytest.approx((18, 40, 28), abs=0.2) and moved.voxels == plain.voxels


def test_analyze_split_adds_the_nodule_piece_of_a_component_merged_with_a_vessel():
    from p2ch_app.inference.pipeline import Models, analyze

    ct = hand_made_ct()
    z, y, x = np.indices(ct.hu.shape)
    ct.hu[(z - 18) ** 2 + (y - 40) ** 2 + (x - 28) ** 2 <= 9] = 600
    ct.hu[16:20, 38:42, 31:39] = 600  # a vessel 4 voxels thick touching it: 2 voxels thick after the erosion
    models = Models(CentreSliceThreshold(context=1), CentreVoxelClassifier(), None, {})
    models.segmenter.forward = lambda x: (x[:, 1:2] > 150).float()
    (merged,) = analyze(ct, models)
    assert merged.center_irc[2] > 30  # pulled towards the vessel
    found = analyze(ct, models, AnalysisSettings(split=True))
    assert len(found) == 2 and merged in found
    (piece,) = [d for d in found if d != merged]
    assert piece.center_irc == pytest.approx((18, 40, 28), abs=0.3) and piece.voxels < merged.voxels


@requires_shared
def test_load_the_book_models_and_refuse_swapped_ones():
    from p2ch_app.errors import UserError
    from p2ch_app.inference.pipeline import load_models

    seg, cls = next(BOOK_MODELS.glob("seg_*.state")), next(BOOK_MODELS.glob("cls_*.state"))
    models = load_models(seg, cls, None, torch.device("cpu"))
    assert models.segmenter.config.context == 3 and not models.segmenter.training and models.malignancy is None
    with pytest.raises(UserError, match="holds a classifier .*not a segmenter"):
        load_models(cls, cls, None, torch.device("cpu"))
    with pytest.raises(UserError, match="holds a segmenter .*not a classifier"):
        load_models(seg, seg, None, torch.device("cpu"))

