import math

import numpy as np
import pytest
import torch

from p2ch_app.checkpoints import load_checkpoint
from p2ch_app.data.ct import extract_crop, load_ct
from p2ch_app.models import Calibration, ClassifierConfig, NoduleClassifier, NoduleSegmenter, SegmenterConfig
from tests.conftest import BOOK_MODELS, REAL_DICOM, requires_shared

# A spiculated nodule of about 15 mm in the right lung of the real CT (found by eye, slices 30-34),
# and three points in aerated lung far from any vessel or wall.
REAL_NODULE_IRC = (32, 165, 110)
EMPTY_LUNG_IRC = [(45, 250, 100), (60, 200, 380), (45, 280, 420)]


def test_classifier_shapes_and_init():
    model = NoduleClassifier()
    logits, probs = model(torch.randn(3, 1, 32, 48, 48))
    assert logits.shape == probs.shape == (3, 2)
    assert torch.allclose(probs.sum(1), torch.ones(3))
    fan_in = 8 * 27
    assert model.block1.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    assert model.head_linear.in_features == 64 * 2 * 3 * 3


def test_a_calibrated_classifier_gives_the_fitted_log_odds():
    """bias + scale * the network's logit margin, + ground_glass where the centre slice's middle 3x3 voxels
    average under -200 HU: a faint centre is ground glass however bright the rest of the crop."""
    torch.manual_seed(0)
    plain = NoduleClassifier().eval()
    calibrated = NoduleClassifier(ClassifierConfig(calibration=Calibration(0.5, 2.0, -3.0))).eval()
    calibrated.load_state_dict(plain.state_dict())
    crops = torch.full((3, 1, 32, 48, 48), 40.0)
    crops[1, 0, 16, 23:26, 23:26] = -450.0  # a ground-glass centre
    crops[2, 0, 15, 23:26, 23:26] = -450.0  # the slice above the middle: still solid
    with torch.no_grad():
        margin = (lambda logits: logits[:, 1] - logits[:, 0])(plain(crops)[0])
        logits, probs = calibrated(crops)
    expected = 0.5 + 2.0 * margin + torch.tensor([0.0, -3.0, 0.0])
    assert torch.allclose(logits[:, 1] - logits[:, 0], expected, atol=1e-5)
    assert torch.allclose(probs[:, 1], torch.sigmoid(expected), atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (67, 93), (33, 50), (128, 128)])
@pytest.mark.parametrize("up_mode, pooling", [("upconv", "avg"), ("upsample", "max")])
def test_segmenter_keeps_any_slice_size(shape, up_mode, pooling):
    model = NoduleSegmenter(SegmenterConfig(up_mode=up_mode, pooling=pooling)).eval()
    out = model(torch.randn(2, 7, *shape))
    assert out.shape == (2, 1, *shape) and out.min() >= 0 and out.max() <= 1


def test_segmenter_pools_between_levels_as_configured():
    """Average pooling (the book's) by default, max pooling when configured: what the second level sees
    is the first level's output pooled that way. A strict load cannot tell the two apart."""
    assert SegmenterConfig().pooling == "avg"
    x = torch.randn(1, 7, 32, 32)
    for pooling, pool in (("avg", torch.nn.functional.avg_pool2d), ("max", torch.nn.functional.max_pool2d)):
        model = NoduleSegmenter(SegmenterConfig(pooling=pooling)).eval()
        seen = {}
        model.unet.down_path[0].register_forward_hook(lambda m, args, out: seen.update(first=out))
        model.unet.down_path[1].register_forward_pre_hook(lambda m, args: seen.update(second=args[0]))
        with torch.no_grad():
            model(x)
        assert torch.equal(seen["second"], pool(seen["first"], 2)), pooling
    with pytest.raises(ValueError, match="pooling"):
        SegmenterConfig(pooling="min")


def book_checkpoint(prefix: str) -> dict:
    return load_checkpoint(next(BOOK_MODELS.glob(f"{prefix}_*.state")))


@requires_shared
def test_book_segmentation_checkpoint_loads_strictly():
    model = NoduleSegmenter()
    model.load_state_dict(book_checkpoint("seg")["model_state"], strict=True)


@requires_shared
def test_book_classifier_loads_strictly_and_prefers_a_real_nodule_to_empty_lung():
    model = NoduleClassifier()
    model.load_state_dict(book_checkpoint("cls")["model_state"], strict=True)
    model.eval()
    ct = load_ct(REAL_DICOM)
    assert ct.hu[REAL_NODULE_IRC] > -300 and all(ct.hu[c] < -700 for c in EMPTY_LUNG_IRC)
    crops = np.stack([extract_crop(ct.hu, c)[0] for c in [REAL_NODULE_IRC, *EMPTY_LUNG_IRC]])
    with torch.inference_mode():
        _, probs = model(torch.from_numpy(crops).float()[:, None])
    nodule, empty = probs[0, 1].item(), probs[1:, 1]
    assert nodule > 0.9 and (empty < 0.1).all() and (nodule > empty).all()
