import json

import numpy as np
import pytest

from p2ch_app.errors import UserError
from p2ch_app.serve.protocol import decode_crop, prediction

SIZE = (32, 48, 48)


def test_decode_crop_reads_the_books_encoding():
    crop = np.random.default_rng(0).normal(-500, 300, (1, *SIZE)).astype(np.float32)
    decoded = decode_crop(json.dumps({"shape": [1, *SIZE]}).encode(), crop.tobytes(), SIZE)
    assert decoded.shape == (1, *SIZE) and np.array_equal(decoded.numpy(), crop)


@pytest.mark.parametrize("meta, blob, message", [
    (b"{not json", 4 * 32 * 48 * 48, "meta is not JSON"),
    (b'{"size": [1, 32, 48, 48]}', 4 * 32 * 48 * 48, "meta is not JSON"),
    (b'{"shape": [1, 32, 64, 64]}', 4 * 32 * 64 * 64, "not the classifier's crop shape"),
    (b'{"shape": [1, 32, 48, 48]}', 100, "blob holds 100 bytes"),
    (None, 4, "lacks the field"),
])
def test_decode_crop_refuses_bad_requests_naming_the_fix(meta, blob, message):
    with pytest.raises(UserError, match=message):
        decode_crop(meta, bytes(blob), SIZE)


def test_decode_crop_refuses_nan_and_infinity():
    for bad in (np.nan, np.inf):
        crop = np.zeros((1, *SIZE), np.float32)
        crop[0, 3, 4, 5] = bad
        with pytest.raises(UserError, match="NaN or infinite"):
            decode_crop(b'{"shape": [1, 32, 48, 48]}', crop.tobytes(), SIZE)


def test_prediction_keeps_the_books_key_and_adds_honest_names():
    assert prediction({"nodule_prob": 0.25}) == {"prob_malignant": 0.25, "nodule_prob": 0.25}
    both = prediction({"nodule_prob": 0.25, "malignancy_prob": 0.75})
    assert both == {"prob_malignant": 0.25, "nodule_prob": 0.25, "malignancy_prob": 0.75}
