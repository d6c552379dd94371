"""Pipeline stages on hand-made volumes whose answers are known."""

import numpy as np
import pytest
import torch
from torch import nn

from p2ch_app.analysis import body_mask, gather_crops, group, segment
from p2ch_app.data.ct import extract_crop, slice_stack


def test_gather_crops_equals_extract_crop_everywhere():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (40, 60, 70)).astype(np.int16)
    centers = np.array([[20, 30, 35], [0.4, 0, 0], [39, 59, 69], [10.6, 50.2, 3.9]])
    crops = gather_crops(hu, centers)
    assert crops.shape == (4, 32, 48, 48)
    for crop, center in zip(crops, centers):
        assert np.array_equal(crop, extract_crop(hu, center)[0])


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
    mask = segment(hu, model, context=2, batch_size=4, device=torch.device("cpu"))
    expected = np.zeros(hu.shape, bool)
    expected[4:6, 4:8, 4:8] = True
    assert np.array_equal(mask, expected)
    stacks = torch.cat(model.seen)
    assert stacks.shape == (9, 5, 12, 12)
    for k in (0, 4, 8):
        assert np.array_equal(stacks[k].numpy(), slice_stack(hu, k, 2).astype(np.float32))
