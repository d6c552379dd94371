import math

import numpy as np
import pytest

from p2ch_app.metrics import binary_metrics, roc_auc, scores_from_counts


def test_hand_computed_example():
    labels = [1, 0, 1, 0, 1]
    probs = [0.9, 0.8, 0.4, 0.4, 0.2]
    m = binary_metrics(labels, probs, loss=0.25)
    # predicted positive: the first two -> tp 1, fp 1, fn 2, tn 1
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == m["accuracy_pos"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)
    assert m["accuracy_neg"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.4)
    # positive/negative pairs: 0.9 beats both (2), 0.4 ties 0.4 (0.5), the rest lose: 2.5 of 6
    assert m["auc"] == pytest.approx(2.5 / 6)
    assert m["loss"] == 0.25


def test_auc_extremes_and_undefined():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_auc_matches_pair_counting_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300), 1)  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(labels, scores) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_counts_with_nothing_predicted_score_zero_not_nan():
    assert scores_from_counts(0, 0, 5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "f2": 0.0}
    pixel = scores_from_counts(tp=30, fp=10, fn=20)
    assert pixel["precision"] == 0.75 and pixel["recall"] == 0.6 and pixel["f1"] == pytest.approx(2 / 3)
    # F2 = 5 P R / (4 P + R) = 5 * 0.75 * 0.6 / (3 + 0.6)
    assert pixel["f2"] == pytest.approx(2.25 / 3.6)
