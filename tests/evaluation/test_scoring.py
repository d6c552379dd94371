import numpy as np
import pytest

from p2ch_app.evaluation.results import format_confusion, format_summary
from p2ch_app.evaluation.scoring import (
    MAX_MARKS_PER_SCAN,
    ScanResult,
    _interval,
    confusion,
    cpm,
    evaluate,
    froc,
    ignored_detections,
    sensitivities_at,
)


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
    # along the curve's points in threshold order: (0, 0), (0.5, 0) (the 0.95 false positive comes first),
    # (0.5, 1/3), (1, 1/3), (1, 2/3), (1, 1), (1.5, 1); at 1/8 and 1/4 no threshold has found anything yet
    expected = [0, 0, 1 / 3, 1, 1, 1, 1]
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
    # 0.2 malignant < 0.7 benign; with one pair every resample that holds both classes gives the same AUC
    assert result == {"nodules": 2, "malignant": 1, "auc": 0.0, "auc_ci95": [0.0, 0.0], "diameter_auc": 1.0,
                      "diameter_auc_ci95": [1.0, 1.0]}
    assert malignancy_aucs(scans, threshold=0.65)["nodules"] == 1  # the benign one is filtered out


def test_evaluate_and_its_files(tmp_path):
    import json

    from p2ch_app.evaluation.results import save_evaluation
    from p2ch_app.evaluation.scoring import evaluate

    scans = [scan_a(np.array([0.2, 0.9, 0.5, 0.7, 0.1])), scan_b()]
    metrics = evaluate(scans, threshold=0.5, bootstrap=50)
    assert metrics["scans"] == 2 and metrics["nodules"] == 3
    assert metrics["confusion"]["Malignant"]["Pred. benign"] == 1  # malignancy 0.2 at the best detection
    text = format_summary(metrics)
    assert "CPM 0.619" in text and "malignancy AUC 0.000 (95% CI 0.000-0.000) on 2 detected nodules" in text
    save_evaluation(tmp_path, metrics)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["cpm"] == pytest.approx(metrics["cpm"]) and saved["confusion"] == metrics["confusion"]
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert not list(tmp_path.glob("*.tmp*"))


# Exclusions and the other LUNA16 rules (noduleCADEvaluationLUNA16.py), on hand-made detections.

def scan_with_excluded(extra: list[tuple[tuple[float, float, float], float]]) -> ScanResult:
    """One 10 mm nodule at the origin hit at 0.9, a false positive at 0.7, an excluded 4 mm finding at
    x = 50 and one at x = -50 without a size (-1: 10 mm), plus the extra (centre, probability) detections."""
    xyz = [(1.0, 0.0, 0.0), (100.0, 0.0, 0.0)] + [c for c, _ in extra]
    probs = [0.9, 0.7] + [p for _, p in extra]
    return ScanResult(np.array(xyz, float), np.array(probs), np.array([[0, 0, 0]], float), np.array([10.0]),
                      np.array([0]), excluded_xyz=np.array([[50, 0, 0], [-50, 0, 0]], float),
                      excluded_diameters_mm=np.array([4.0, -1.0]))


def test_a_detection_on_an_excluded_finding_is_neither_hit_nor_false_positive():
    plain = scan_with_excluded([])
    on_excluded = scan_with_excluded([((51.5, 0.0, 0.0), 0.8)])  # 1.5 mm from a 4 mm finding: inside it
    off_excluded = scan_with_excluded([((52.5, 0.0, 0.0), 0.8)])  # 2.5 mm away: outside, a false positive
    fps, sens = froc([plain])
    assert fps.tolist() == [0, 0, 1] and sens.tolist() == [0, 1, 1]  # hit at 0.9, then the FP at 0.7
    for scans in ([on_excluded], [plain]):
        assert [a.tolist() for a in froc(scans)] == [fps.tolist(), sens.tolist()]
    assert ignored_detections([on_excluded]) == 1 and ignored_detections([plain]) == 0
    moved_fps, moved_sens = froc([off_excluded])
    assert moved_fps.tolist() == [0, 0, 1, 2] and moved_sens.tolist() == [0, 1, 1, 1]
    assert ignored_detections([off_excluded]) == 0
    assert cpm([on_excluded], bootstrap=0)["sensitivity_at"] == cpm([plain], bootstrap=0)["sensitivity_at"]
    metrics = evaluate([on_excluded], bootstrap=0)
    assert metrics["excluded_findings"] == 2 and metrics["ignored_detections"] == 1 and metrics["nodules"] == 1
    assert "2 excluded findings (annotations_excluded.csv): 1 detection(s) on them ignored" in format_summary(metrics)
    assert "excluded" not in format_summary(evaluate([scan_a()], bootstrap=0))


def test_an_excluded_finding_without_a_size_reaches_5_mm():
    near = scan_with_excluded([((-54.9, 0.0, 0.0), 0.8)])  # diameter -1: the challenge's 10 mm, radius 5
    far = scan_with_excluded([((-55.1, 0.0, 0.0), 0.8)])
    assert ignored_detections([near]) == 1 and froc([near])[0].max() == 1
    assert ignored_detections([far]) == 0 and froc([far])[0].max() == 2


def test_a_detection_on_a_nodule_and_an_excluded_finding_is_the_nodules_hit():
    scan = scan_with_excluded([])
    scan.excluded_xyz, scan.excluded_diameters_mm = np.array([[2.0, 0, 0]]), np.array([6.0])  # overlaps the nodule
    assert froc([scan])[1].max() == 1 and ignored_detections([scan]) == 0


def test_hits_lie_strictly_within_the_radius_and_count_once_at_their_best():
    edge = ScanResult(np.array([[5, 0, 0], [0, 4.999, 0]], float), np.array([0.9, 0.3]),
                      np.array([[0, 0, 0]], float), np.array([10.0]))
    fps, sens = froc([edge])  # at exactly 5 mm the 0.9 detection misses (the challenge: dist < radius)
    assert fps.tolist() == [0, 1, 1] and sens.tolist() == [0, 0, 1]
    twice = ScanResult(np.array([[1, 0, 0], [0, 2, 0]], float), np.array([0.4, 0.8]),
                       np.array([[0, 0, 0]], float), np.array([10.0]))
    fps, sens = froc([twice])  # one nodule, two hits: it counts at 0.8, the 0.4 hit is no false positive
    assert fps.tolist() == [0, 0] and sens.tolist() == [0, 1]


def test_false_positives_are_counted_per_scan_over_every_scan():
    empty = ScanResult(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0))
    fps, _ = froc([scan_with_excluded([]), empty, empty, empty])
    assert fps.tolist() == [0, 0, 0.25]  # one false positive over four scans


def test_only_each_scans_100_most_probable_detections_are_scored():
    probs = np.linspace(0.99, 0.5, MAX_MARKS_PER_SCAN + 1)  # the nodule's hit is the 101st
    xyz = np.array([[200.0 + 20 * k, 0, 0] for k in range(MAX_MARKS_PER_SCAN)] + [[0, 0, 0]])
    scan = ScanResult(xyz, probs, np.array([[0, 0, 0]], float), np.array([10.0]))
    fps, sens = froc([scan])
    assert sens.max() == 0 and fps.max() == MAX_MARKS_PER_SCAN  # the hit was cut: a missed nodule
    scan.nodule_prob = np.concatenate([probs[:-1], [0.995]])  # now the hit is the most probable
    fps, sens = froc([scan])
    assert sens.max() == 1 and fps.max() == MAX_MARKS_PER_SCAN - 1  # the least probable FP was cut
    scan.nodule_prob[MAX_MARKS_PER_SCAN - 2] = scan.nodule_prob[MAX_MARKS_PER_SCAN - 1]  # a tie at the cut
    assert froc([scan])[0].max() == MAX_MARKS_PER_SCAN - 2  # both tied drop out, as with the challenge's strict ">"
    few = ScanResult(xyz[-5:], probs[-5:], np.array([[0, 0, 0]], float), np.array([10.0]))
    assert froc([few])[1].max() == 1  # under 100 detections: all are scored


def test_operating_points_interpolate_along_the_curve_as_numpy_interp():
    # false positive 0.95, hit 0.9, false positive 0.5, hit 0.4: a step made by a false positive alone
    # stays flat, so at 1.5 FPs the sensitivity is still 1/2 (not half way to the next point's 1)
    scan = ScanResult(np.array([[200, 0, 0], [0, 0, 0], [300, 0, 0], [50, 0, 0]], float),
                      np.array([0.95, 0.9, 0.5, 0.4]), np.array([[0, 0, 0], [50, 0, 0]], float), np.array([10.0, 10.0]))
    fps, sens = froc([scan])
    assert fps.tolist() == [0, 1, 1, 2, 2] and sens.tolist() == [0, 0, 0.5, 0.5, 1]
    rates = [0.125, 0.5, 1, 1.5, 2, 3, 8]
    expected = [0, 0, 0.5, 0.5, 1, 1, 1]
    assert sensitivities_at(fps, sens, rates).tolist() == expected
    assert np.interp(rates, fps, sens).tolist() == expected  # what the challenge's script computes
    assert cpm([scan], bootstrap=0)["cpm"] == pytest.approx((0 + 0 + 0 + 0.5 + 1 + 1 + 1) / 7)


def test_bootstrap_resamples_scans_and_takes_the_challenges_order_statistics():
    low, high = _interval(np.arange(1000.0))
    assert (low, high) == (25.0, 975.0)  # floor(0.025 * 1000) and floor(0.975 * 1000) of the sorted samples
    # identical scans: every resample has the same curve, so every interval closes on the estimate
    result = cpm([scan_a(), scan_a(), scan_a()], bootstrap=50)
    assert result["cpm_ci95"] == [pytest.approx(result["cpm"])] * 2
    for rate, sens in result["sensitivity_at"].items():
        assert result["sensitivity_ci95"][rate] == [pytest.approx(sens)] * 2
    varied = cpm([scan_a(), scan_b()], bootstrap=200)
    assert all(lo <= hi for lo, hi in varied["sensitivity_ci95"].values())
    # at 1/2 FP per scan: 0 when scan_b is drawn twice (its only FP outranks its nodule), 1/2 with scan_a twice
    assert varied["sensitivity_ci95"]["0.5"] == [0.0, 0.5] and varied["sensitivity_ci95"]["8.0"] == [1.0, 1.0]


def challenge_sensitivities(scans: list[ScanResult]) -> np.ndarray:
    """The challenge script's procedure, loop by loop: per scan its 100 most probable marks; each included
    nodule takes every mark strictly within its radius (its best probability is its score, a miss is
    left out of the curve); marks on any finding are no false positives; ROC points at every distinct
    probability from the top, FPs per scan, sensitivity over all nodules; numpy.interp at the rates."""
    truth, probs_out = [], []
    for scan in scans:
        probs, xyz = list(scan.nodule_prob), np.asarray(scan.detections_xyz, float)
        keep = range(len(probs))
        if len(probs) > 100:
            cut = sorted(probs, reverse=True)[100]
            keep = [i for i in keep if probs[i] > cut]
        false_positives = set(keep)
        findings = [(c, d, True) for c, d in zip(scan.nodules_xyz, scan.diameters_mm)]
        findings += [(c, d, False) for c, d in zip(scan.excluded_xyz, scan.excluded_diameters_mm)]
        for centre, diameter, included in findings:
            radius = (10.0 if diameter < 0 else diameter) / 2
            matches = [i for i in keep if ((xyz[i] - centre) ** 2).sum() < radius ** 2]
            false_positives -= set(matches)
            if included:
                truth.append(1)
                probs_out.append(max(probs[i] for i in matches) if matches else None)
        truth += [0] * len(false_positives)
        probs_out += [probs[i] for i in sorted(false_positives)]
    lesions = sum(truth)
    scored = [(p, t) for p, t in zip(probs_out, truth) if p is not None]
    fps, sens = [0.0], [0.0]
    for threshold in sorted({p for p, _ in scored}, reverse=True):
        fps.append(sum(1 for p, t in scored if p >= threshold and t == 0) / len(scans))
        sens.append(sum(1 for p, t in scored if p >= threshold and t == 1) / lesions)
    return np.interp(FROC_FP_RATES_LIST, fps, sens)


FROC_FP_RATES_LIST = [0.125, 0.25, 0.5, 1, 2, 4, 8]


def random_scan(rng) -> ScanResult:
    """Nodules, excluded findings (some without a size) and detections on, near and off them, with tied
    probabilities; sometimes more than 100 detections."""
    nodules = rng.uniform(-150, 150, (int(rng.integers(0, 4)), 3))
    diameters = rng.uniform(3, 20, len(nodules))
    excluded = rng.uniform(-150, 150, (int(rng.integers(0, 3)), 3))
    excluded_d = np.where(rng.random(len(excluded)) < 0.5, -1.0, rng.uniform(1, 8, len(excluded)))
    targets = [c + rng.normal(0, d / 3, (int(rng.integers(0, 4)), 3)) for c, d in zip(nodules, diameters)]
    targets += [c + rng.normal(0, 3, (int(rng.integers(0, 3)), 3)) for c in excluded]
    targets.append(rng.uniform(-150, 150, (int(rng.choice([0, 2, 6, 130])), 3)))
    xyz = np.concatenate(targets)
    return ScanResult(xyz, np.round(rng.random(len(xyz)), 2), nodules, diameters, excluded_xyz=excluded,
                      excluded_diameters_mm=excluded_d)


@pytest.mark.parametrize("seed", range(8))
def test_operating_points_match_a_loop_by_loop_reading_of_the_challenge_script(seed):
    rng = np.random.default_rng(seed)
    scans = [random_scan(rng) for _ in range(5)]  # 5: most rates fall between FP counts
    if not sum(len(s.diameters_mm) for s in scans):
        scans.append(scan_a())
    assert sensitivities_at(*froc(scans)) == pytest.approx(challenge_sensitivities(scans), abs=1e-12)


def test_diameter_agreement_and_the_patient_level_figures(tmp_path):
    import json
    from dataclasses import replace

    from p2ch_app.evaluation.results import save_evaluation
    from p2ch_app.inference.summary import PatientSummary

    # scan_a's found nodules: the 10 mm one at its 0.9 detection, the 6 mm one at its 0.6 detection
    estimates = np.array([9.0, 20.0, 3.0, 7.5, 5.0])
    a = replace(scan_a(np.array([0.2, 0.9, 0.5, 0.7, 0.1])), detection_diameters_mm=estimates,
                summary=PatientSummary(4, 20.0, "4B", 0.8))  # has a malignant nodule (10 mm)
    b = replace(scan_b(), malignancy_prob=np.array([0.3, 0.1]), detection_diameters_mm=np.array([4.0, 4.5]),
                summary=PatientSummary(2, 4.0, "2", 0.3))  # benign 4 mm nodule only
    c = ScanResult(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0), malignancy_prob=np.zeros(0),
                   detection_diameters_mm=np.zeros(0), summary=PatientSummary(0, None, "1", 0.02))
    metrics = evaluate([a, b, c], threshold=0.5, bootstrap=50)
    # errors -1.0 (10 mm read 9.0), +1.5 (6 mm read 7.5) and +0.5 (b's 4 mm read 4.5 by its detection 1 mm
    # away); bands 4A/4A, 3/3, 2/2
    assert metrics["diameter"] == {"nodules": 3, "median_abs_error_mm": 1.0, "bias_mm": 0.5,
                                   "band_agreement": 1.0}
    patient = metrics["patient"]
    # categories: a 4B against the largest annotated 10 mm (4A); b 2 against 4 mm (2); c 1 against none (1)
    assert patient["patients"] == 3 and patient["category_agreement"] == pytest.approx(2 / 3)
    assert patient["malignant_patients"] == 1 and patient["auc"] == 1.0  # 0.8 above 0.3 and 0.02
    text = format_summary(metrics)
    assert "median absolute error 1.00 mm, bias +0.50 mm, same size band 100%" in text
    assert "per patient (3): size category as annotated 67%; malignancy score AUC 1.000" in text
    # every patient malignant: no AUC to give, and the line says why instead of printing nan
    all_malignant = evaluate([a, a], threshold=0.5, bootstrap=10)
    assert "per patient (2): size category as annotated 0%; no malignancy score AUC: 2 of them malignant" in (
        format_summary(all_malignant))
    save_evaluation(tmp_path, metrics)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["patient"]["category_agreement"] == pytest.approx(2 / 3) and saved["diameter"]["nodules"] == 3
