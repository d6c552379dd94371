"""Candidate lists beside a reference list: what the golden tests and make gpu-check read."""

import numpy as np
import pytest

from p2ch_app.evaluation.reference import compare, match, read_candidates

HEADER = "rank,series_uid,x_mm,y_mm,z_mm,index,row,col,voxels,nodule_prob\n"


def candidates(xyz, voxels, prob) -> dict[str, np.ndarray]:
    xyz = np.array(xyz, float).reshape(-1, 3)
    return {"xyz": xyz, "irc": xyz[:, ::-1].copy(), "voxels": np.array(voxels, int), "prob": np.array(prob, float)}


REFERENCE = candidates([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]], [5, 6, 7, 8], [0.9, 0.8, 0.3, 0.1])


def test_read_candidates_takes_the_columns_it_needs(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(HEADER + "1,1.2.3,1.5,-2.0,3.25,4.0,5.0,6.0,12,0.75\n2,1.2.3,0,0,0,1,1,1,1,0.5\n")
    found = read_candidates(path)
    assert found["xyz"].tolist() == [[1.5, -2.0, 3.25], [0, 0, 0]] and found["irc"].tolist()[0] == [4, 5, 6]
    assert found["voxels"].tolist() == [12, 1] and found["prob"].tolist() == [0.75, 0.5]
    path.write_text(HEADER)
    assert read_candidates(path)["xyz"].shape == (0, 3)


def test_the_same_list_in_another_order_is_exact():
    order = [3, 1, 0, 2]
    ours = {k: v[order] for k, v in REFERENCE.items()}
    assert match(ours["xyz"], REFERENCE["xyz"]).tolist() == [2, 1, 3, 0]
    found = compare(ours, REFERENCE)
    assert found.exact() and found.unmatched == 0 and found.max_centre_mm == 0 and found.max_prob_diff == 0
    assert (found.reference_detections, found.our_detections, found.lost_detections, found.extra_detections) == (
        2, 2, 0, 0)


def test_each_kind_of_difference_is_counted():
    ours = {k: v.copy() for k, v in REFERENCE.items()}
    ours["xyz"][1, 0] += 0.005  # within 0.01 mm
    ours["prob"][1] = 0.4  # a detection no longer
    ours["prob"][2] = 0.3 + 5e-5
    found = compare(ours, REFERENCE)
    assert found.unmatched == 0 and found.max_centre_mm == pytest.approx(0.005) and found.voxels_equal
    assert found.max_prob_diff == pytest.approx(0.4) and not found.exact()
    assert found.lost_detections == 1 and found.extra_detections == 0 and found.our_detections == 1
    ours["voxels"][3] = 9
    assert not compare(ours, REFERENCE).voxels_equal
    moved = {k: v.copy() for k, v in REFERENCE.items()}
    moved["xyz"][0, 2] += 0.5  # the first detection's centre moved: unmatched at 0.01 mm, matched at 1 mm
    strict, loose = compare(moved, REFERENCE), compare(moved, REFERENCE, tolerance_mm=1.0)
    assert strict.unmatched == 1 and strict.lost_detections == 1 and strict.extra_detections == 1
    assert loose.unmatched == 0 and loose.lost_detections == loose.extra_detections == 0
    assert loose.max_centre_mm == pytest.approx(0.5) and not strict.exact() and loose.exact()


def test_one_candidate_of_ours_for_two_of_theirs_is_not_one_to_one():
    reference = candidates([[0, 0, 0], [0, 0, 0.004]], [1, 1], [0.6, 0.6])
    ours = candidates([[0, 0, 0.002], [5, 5, 5]], [1, 1], [0.6, 0.6])
    found = compare(ours, reference)
    assert found.unmatched == 0 and not found.one_to_one and not found.exact()
    assert found.extra_detections == 1  # the far one


def test_nothing_of_ours_loses_every_reference_candidate():
    found = compare(candidates([], [], []), REFERENCE)
    assert found.ours == 0 and found.unmatched == 4 and found.lost_detections == 2 and found.max_prob_diff == 0
    assert not found.exact()
