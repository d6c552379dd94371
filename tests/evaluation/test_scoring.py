import numpy as np
import pytest

from p2ch_app.evaluation.results import format_confusion
from p2ch_app.evaluation.scoring import ScanResult, confusion, cpm, froc, sensitivities_at


def scan_a(mal_probs=None):
    """Two nodules; the big one is hit twice (counts once); two false positives."""
    return ScanResult(np.array([[1, 0, 0], [2, 0, 0], [100, 0, 0], [50, 2, 0], [200, 0, 0]], float),
                      np.array([0.9, 0.8, 0.7, 0.6, 0.3]), np.array([[0, 0, 0], [50, 0, 0]], float),
                      np.array([10.0, 6.0]), np.array([1, 0]), mal_probs)


def scan_b():
    """One small nodule; a confident detection 5 mm away lies outside its 2 mm radius: a false positive."""
    return ScanResult(np.array([[5, 0, 0], [0, 0, 1]], float), np.array([0.95, 0.5]),
                      np.array([[0, 0, 0]], float), np.array([4.0]), np.array([0]))


def test_froc_curve_by_hand():
    fps, sens = froc([scan_a(), scan_b()])
    # nodule scores 0.9, 0.6, 0.5; false positives 0.95, 0.7, 0.3 over 2 scans
    assert fps.tolist() == [0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.5]
    assert np.allclose(sens, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1])


def test_cpm_by_hand():
    result = cpm([scan_a(), scan_b()], bootstrap=200)
    expected = [1 / 12, 1 / 6, 1 / 3, 1, 1, 1, 1]  # linear between (0, 0), (0.5, 1/3), (1, 1)
    assert list(result["sensitivity_at"].values()) == pytest.approx(expected)
    assert result["cpm"] == pytest.approx(np.mean(expected))
    low, high = result["cpm_ci95"]
    assert 0 <= low <= result["cpm"] <= high <= 1


def test_perfect_and_empty_detectors():
    perfect = ScanResult(np.array([[0, 0, 0]], float), np.array([0.9]), np.array([[0, 0, 0]], float), np.array([5.0]))
    assert cpm([perfect], bootstrap=0)["cpm"] == 1.0
    blind = ScanResult(np.zeros((0, 3)), np.zeros(0), np.array([[0, 0, 0]], float), np.array([5.0]))
    assert cpm([blind], bootstrap=0)["cpm"] == 0.0
    assert sensitivities_at(np.array([0.0, 2.0]), np.array([0.0, 1.0]), rates=[1.0, 4.0]).tolist() == [0.5, 1.0]


def test_confusion_table():
    missed = ScanResult(np.zeros((0, 3)), np.zeros(0), np.array([[0, 0, 0]], float), np.array([8.0]), np.array([1]),
                        np.zeros(0))
    table = confusion([scan_a(np.array([0.8, 0.1, 0.2, 0.3, 0.9])), missed])
    assert table["Malignant"] == {"Complete miss": 1, "Filtered out": 0, "Pred. benign": 0, "Pred. malignant": 1}
    assert table["Benign"] == {"Complete miss": 0, "Filtered out": 0, "Pred. benign": 1, "Pred. malignant": 0}
    assert table["Non-nodule"] == {"Complete miss": 0, "Filtered out": 1, "Pred. benign": 1, "Pred. malignant": 0}
    text = format_confusion(table)
    assert "Malignant" in text.splitlines()[3] and text.splitlines()[1].split()[1] == "-"


def test_confusion_without_malignancy_model_and_the_0_7_rule():
    # a detection 4 mm from a 6 mm nodule: outside its radius (FROC miss) but within 0.7 x diameter
    scan = ScanResult(np.array([[4, 0, 0]], float), np.array([0.2]), np.array([[0, 0, 0]], float), np.array([6.0]),
                      np.array([0]))
    table = confusion([scan])
    assert table["Benign"] == {"Complete miss": 0, "Filtered out": 1, "Pred. nodule": 0}
    assert froc([scan])[1].max() == 0


def test_malignancy_aucs_score_only_the_nodules_predicted_as_nodules():
    from p2ch_app.evaluation.scoring import malignancy_aucs

    # scan_a: the 10 mm malignant nodule is found by detections 0.9 and 0.8 (the 0.9 one counts);
    # the 6 mm benign one by the 0.6 detection. scan_b's nodule is missed (5 mm away > 0.7 * 4 mm).
    scans = [scan_a(np.array([0.2, 0.9, 0.5, 0.7, 0.1])), scan_b()]
    result = malignancy_aucs(scans, threshold=0.5)
    assert result == {"nodules": 2, "malignant": 1, "auc": 0.0, "diameter_auc": 1.0}  # 0.2 malignant < 0.7 benign
    assert malignancy_aucs(scans, threshold=0.65)["nodules"] == 1  # the benign one is filtered out


def test_evaluate_and_its_files(tmp_path):
    import json

    from p2ch_app.evaluation.results import format_summary, save_evaluation
    from p2ch_app.evaluation.scoring import evaluate

    scans = [scan_a(np.array([0.2, 0.9, 0.5, 0.7, 0.1])), scan_b()]
    metrics = evaluate(scans, threshold=0.5, bootstrap=50)
    assert metrics["scans"] == 2 and metrics["nodules"] == 3
    assert metrics["confusion"]["Malignant"]["Pred. benign"] == 1  # malignancy 0.2 at the best detection
    text = format_summary(metrics)
    assert "CPM 0.655" in text and "malignancy AUC 0.000 on 2 detected nodules" in text
    save_evaluation(tmp_path, metrics)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["cpm"] == pytest.approx(metrics["cpm"]) and saved["confusion"] == metrics["confusion"]
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("*.tmp*"))
