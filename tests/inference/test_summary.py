import json

import numpy as np
import pytest

from p2ch_app.inference.outputs import detection_table, write_detections
from p2ch_app.inference.pipeline import Detection
from p2ch_app.inference.summary import MALIGNANCY_LEAK, noisy_or, size_category, summarize


def detection(nodule_prob, diameter_mm, malignancy_prob=None):
    return Detection((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), nodule_prob, malignancy_prob, diameter_mm, 10, True)


@pytest.mark.parametrize("diameter, category", [(None, "1"), (3.0, "2"), (5.99, "2"), (6.0, "3"), (7.99, "3"),
                                                (8.0, "4A"), (14.99, "4A"), (15.0, "4B"), (40.0, "4B")])
def test_size_category_at_the_band_edges(diameter, category):
    assert size_category(diameter) == category


def test_noisy_or_by_hand():
    assert noisy_or([]) == pytest.approx(MALIGNANCY_LEAK)  # no nodule: only what the detector may have missed
    assert noisy_or([0.5], leak=0.02) == pytest.approx(1 - 0.98 * 0.5)  # 0.51
    assert noisy_or([0.5, 0.2], leak=0.0) == pytest.approx(1 - 0.5 * 0.8)  # 0.6


def test_summary_takes_the_five_most_probable_nodules():
    # seven nodules; the two least probable ones (by nodule probability) carry the highest malignancy
    found = [detection(p, 5.0, 0.1) for p in (0.99, 0.95, 0.9, 0.85, 0.8)] + \
            [detection(0.7, 20.0, 0.9), detection(0.6, 4.0, 0.9)]
    summary = summarize(found, has_malignancy=True)
    assert summary.malignancy_score == pytest.approx(1 - (1 - MALIGNANCY_LEAK) * 0.9 ** 5)  # 0.421, not 0.99
    assert summary.detections == 7 and summary.largest_diameter_mm == 20.0 and summary.category == "4B"
    shuffled = summarize(found[::-1], has_malignancy=True)
    assert shuffled.malignancy_score == pytest.approx(summary.malignancy_score)


def test_summary_without_nodules_or_without_a_malignancy_model():
    empty = summarize([], has_malignancy=True)
    assert (empty.detections, empty.largest_diameter_mm, empty.category) == (0, None, "1")
    assert empty.malignancy_score == pytest.approx(MALIGNANCY_LEAK)
    assert summarize([detection(0.9, 7.0)], has_malignancy=False).malignancy_score is None
    assert "no detections; size category 1" in empty.headline() and "not a diagnosis" in empty.headline()


def test_summary_heads_the_console_table_and_is_in_the_json(tmp_path):
    found = [detection(0.9, 9.5, 0.7), detection(0.6, 4.2, 0.1)]
    summary = summarize(found, has_malignancy=True)
    table = detection_table(found, summary).splitlines()
    assert table[0].startswith("2 detection(s), largest 9.5 mm; size category 4A") and "score 0.735" in table[0]
    assert table[1].split()[0] == "rank" and len(table) == 4
    path = tmp_path / "found.json"
    write_detections(path, [("1.2.3", d) for d in found], {"seg": "s", "cls": "c", "mal": "m"}, {"1.2.3": summary})
    document = json.loads(path.read_text())
    assert document["series_uid"] == "1.2.3"
    patient = document["patients"]["1.2.3"]
    assert patient["detections"] == 2 and patient["category"] == "4A" and patient["largest_diameter_mm"] == 9.5
    assert patient["malignancy_score"] == pytest.approx(1 - 0.98 * 0.3 * 0.9)
    assert "screening aid" in patient["category_note"]
    assert np.isclose(document["detections"][0]["diameter_mm"], 9.5)
