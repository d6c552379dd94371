"""The book's chapter-15 /predict protocol: a multipart form with `meta`, a JSON {"shape": [...]}, and
`blob`, the crop's float32 bytes. A client written for the book works unmodified, so nothing about
the encoding changes; only the refusals are new (a wrong shape or length, NaN, a `meta` not JSON)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from p2ch_app.errors import UserError


def decode_crop(meta: bytes | None, blob: bytes | None, crop_size: tuple[int, int, int]) -> torch.Tensor:
    """The crop a /predict form carries, 1 x D x H x W float32, checked against the classifier's size."""
    expected = [1, *crop_size]
    if meta is None or blob is None:
        raise UserError("the form lacks the field 'meta' or 'blob'; send meta (JSON with the shape) and blob "
                        "(the crop's float32 bytes)")
    try:
        shape = json.loads(meta)["shape"]
    except (ValueError, TypeError, KeyError):
        raise UserError('meta is not JSON of the form {"shape": [...]}; send e.g. {"shape": '
                        f"{expected}}}") from None
    if shape != expected:
        raise UserError(f"shape {shape} is not the classifier's crop shape; send a crop of shape {expected}")
    if len(blob) != 4 * math.prod(expected):
        raise UserError(f"blob holds {len(blob)} bytes, not the {4 * math.prod(expected)} of {expected} float32 "
                        "values; send the crop as raw little-endian float32")
    values = np.frombuffer(blob, dtype="<f4")
    if not np.isfinite(values).all():
        raise UserError("the crop holds NaN or infinite values; send finite HU values")
    return torch.from_numpy(values.astype(np.float32)).view(*expected)


def prediction(probs: dict[str, float]) -> dict[str, float]:
    """The book's answer, {"prob_malignant": the classifier's class-1 softmax}, plus the same number under
    an honest name (the book's classifier tells nodules from non-nodules) and, when a malignancy model is
    loaded, its probability."""
    return {"prob_malignant": probs["nodule_prob"], **probs}
