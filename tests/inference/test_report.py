"""The visual report on a hand-made CT: the PNGs are read back and measured, the HTML is read as text."""

import os

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from p2ch_app.data.ct import CtVolume, Geometry, irc_to_xyz
from p2ch_app.errors import UserError
from p2ch_app.inference.pipeline import Detection
from p2ch_app.inference.report import _window, write_report, write_report_index
from p2ch_app.inference.summary import summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPACING = (0.7, 0.7, 2.5)  # x (col), y (row), z (slice) mm
LUNG, PAD, NODULE = -800, -1000, 50
NODULES_IRC = [(10, 30, 25), (2, 5, 60)]  # the second sits in a corner: its views need padding


def _gray(hu: float) -> float:
    """Where an HU value lands in the lung window (level -600, width 1500), 0..1."""
    return float(np.clip((hu + 1350) / 1500, 0, 1))


@pytest.fixture(scope="module")
def ct() -> CtVolume:
    hu = np.full((20, 64, 64), LUNG, np.int16)
    i, r, c = np.indices(hu.shape)
    for ci, cr, cc in NODULES_IRC:  # spheres of radius 4 mm, in mm so thick slices count right
        hu[((i - ci) * SPACING[2]) ** 2 + ((r - cr) * SPACING[1]) ** 2 + ((c - cc) * SPACING[0]) ** 2 <= 16] = NODULE
    return CtVolume(hu, Geometry(np.zeros(3), np.array(SPACING), np.eye(3)), "1.2.840.99.7")


@pytest.fixture(scope="module")
def detections(ct) -> list[Detection]:
    return [Detection(tuple(irc_to_xyz(NODULES_IRC[0], ct.geometry)), tuple(map(float, NODULES_IRC[0])),
                      0.934, 0.412, 8.0, 120, True),
            Detection(tuple(irc_to_xyz(NODULES_IRC[1], ct.geometry)), tuple(map(float, NODULES_IRC[1])),
                      0.615, None, 7.5, 90, True)]


@pytest.fixture(scope="module")
def report(tmp_path_factory, ct, detections):
    out = tmp_path_factory.mktemp("report") / "new" / "series"  # parents are created
    return out, write_report(out, ct, detections, summarize(detections, True), title="Run <7> & co")


def _panels(image: np.ndarray) -> list[tuple[tuple[int, int, int, int], tuple[float, float]]]:
    """Per third of the figure: the bounding box of the dense grayscale (CT) area and the red centroid."""
    rgb = image[..., :3]
    gray = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2]) & (rgb[..., 0] > 0.1) & (rgb[..., 0] < 0.97)
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)
    third = image.shape[1] // 3
    found = []
    for k in range(3):
        g, rd = gray[:, k * third:(k + 1) * third], red[:, k * third:(k + 1) * third]
        (r0, r1), (c0, c1) = _longest_run(g.sum(axis=1)), _longest_run(g.sum(axis=0))
        ys, xs = np.nonzero(rd)
        assert len(ys) > 20, f"no red circle in panel {k}"
        found.append(((r0, r1, c0 + k * third, c1 + k * third), (ys.mean(), xs.mean() + k * third)))
    return found


def _longest_run(counts: np.ndarray) -> tuple[int, int]:
    """First and last position of the longest stretch of counts near the maximum (text is sparser)."""
    dense = np.concatenate([[0], counts > 0.8 * counts.max(), [0]]).astype(int)
    starts, ends = np.flatnonzero(np.diff(dense) == 1), np.flatnonzero(np.diff(dense) == -1)
    longest = np.argmax(ends - starts)
    return int(starts[longest]), int(ends[longest] - 1)


def test_window_pads_with_air_and_keeps_the_centre():
    plane = np.arange(20, dtype=np.int16).reshape(4, 5)
    out = _window(plane, np.array([0, 4]), np.array([1, 2]))
    assert out.shape == (3, 5)
    assert out[1, 2] == plane[0, 4]
    assert out.tolist() == [[-1000] * 5, [2, 3, 4, -1000, -1000], [7, 8, 9, -1000, -1000]]


def test_pngs_show_each_nodule_centred_circled_and_to_scale(report):
    out, _ = report
    sizes = set()
    for rank in (1, 2):
        path = out / f"{rank:03d}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(path)
        assert image.shape[:2] == (340, 900) and image[..., :3].std() > 0.05
        for (r0, r1, c0, c1), (cy, cx) in _panels(image):
            sizes.add((r1 - r0, c1 - c0))
            assert abs(r1 - r0 - (c1 - c0)) <= 3, "a 60 x 60 mm view must be square"
            assert abs(cy - (r0 + r1) / 2) <= 3 and abs(cx - (c0 + c1) / 2) <= 3, "detection not centred"
            row, col = round(cy), round(cx)
            assert image[row, col, 0] == pytest.approx(_gray(NODULE), abs=0.02), "no nodule inside the circle"
            assert image[r0 + 3, c0 + 3, 0] < 0.5
            # the 8 mm sphere is as tall as it is wide in every view, despite 2.5 mm slices
            across = np.flatnonzero(image[row, c0:c1, 0] > 0.8)
            down = np.flatnonzero(image[r0:r1, col, 0] > 0.8)
            assert 0.75 < len(down) / len(across) < 1.33
    assert max(h for h, _ in sizes) - min(h for h, _ in sizes) <= 3, "every view must have the same mm extent"


def test_corner_detection_is_padded_with_air_and_shown_superior_up(report):
    image = imread(report[0] / "002.png")
    (axial, _), (coronal, _), _ = _panels(image)
    image = image[..., 0]
    r0, r1, c0, c1 = axial  # row 5 of 64: above it lies nothing; col 60 of 64: right of it nothing
    assert image[r0 + 3, c1 - 3] == pytest.approx(_gray(PAD), abs=0.02)
    assert image[r1 - 3, c0 + 3] == pytest.approx(_gray(LUNG), abs=0.02)
    r0, r1, c0, c1 = coronal  # slice 2 of 20: the volume goes on upwards (z grows with the index)
    assert image[r0 + 3, c0 + 3] == pytest.approx(_gray(LUNG), abs=0.02)
    assert image[r1 - 3, c0 + 3] == pytest.approx(_gray(PAD), abs=0.02)
    assert image[r0 + 3, c1 - 3] == pytest.approx(_gray(PAD), abs=0.02)


def test_index_lists_every_detection_with_its_image(report, ct, detections):
    out, index = report
    assert index == out / "index.html"
    # no temporary files left; the viewer files (test_viewer.py reads them back) beside the pages
    assert sorted(os.listdir(out)) == ["001.png", "002.png", "candidates.nii.gz", "detections.mrk.json", "index.html",
                                       "lungs.nii.gz"]
    page = index.read_text(encoding="utf-8")
    assert '<a href="detections.mrk.json">' in page and '<a href="candidates.nii.gz">' in page
    assert '<a href="lungs.nii.gz">' in page
    assert "Run &lt;7&gt; &amp; co" in page and "<7>" not in page
    assert ct.series_uid in page and "2 detection" in page
    # the per-patient summary: largest 8.0 mm is Lung-RADS 4A; noisy-OR of 0.412 and no score (None) with the leak
    assert "2 detection(s), largest 8.0 mm; size category 4A" in page and "not a diagnosis" in page
    assert f"patient malignancy score {1 - 0.98 * (1 - 0.412):.3f}" in page
    assert '<img src="001.png"' in page and '<img src="002.png"' in page
    for text in ("<td>1</td>", "<td>2</td>", "0.934", "0.412", "0.615", "<td>-</td>", "8.0", "7.5",
                 "10.0, 30.0, 25.0", "2.0, 5.0, 60.0", ", ".join(f"{v:.1f}" for v in detections[1].center_xyz)):
        assert text in page, text
    assert page.index("0.934") < page.index("0.615")  # the given order is the rank order


def test_no_detections_says_so(tmp_path, ct):
    page = write_report(tmp_path, ct, [], summarize([], False)).read_text(encoding="utf-8")
    assert "no detections" in page and "<img" not in page and "<table" not in page
    assert sorted(os.listdir(tmp_path)) == ["candidates.nii.gz", "detections.mrk.json", "index.html", "lungs.nii.gz"]


def test_failed_write_leaves_neither_half_a_file_nor_a_temporary(tmp_path, ct, detections, monkeypatch):
    (tmp_path / "001.png").write_bytes(b"old")

    def broken_savefig(self, path, **kwargs):
        open(path, "wb").write(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(UserError, match="cannot write .*001.png: disk full"):
        write_report(tmp_path, ct, detections, summarize(detections, False))
    assert os.listdir(tmp_path) == ["001.png"] and (tmp_path / "001.png").read_bytes() == b"old"


def test_detection_outside_the_ct_is_refused_before_writing(tmp_path, ct, detections):
    stray = Detection((0.0, 0.0, 0.0), (25.0, 30.0, 30.0), 0.9, None, 6.0, 10, True)
    with pytest.raises(UserError, match="outside"):
        write_report(tmp_path / "out", ct, [detections[0], stray], summarize([detections[0], stray], False))
    assert not (tmp_path / "out").exists()


def test_report_index_links_every_series(tmp_path):
    entries = [("1.2.3", "1.2.3/index.html", 2), ("4.5.6", "4.5.6/index.html", 0)]
    index = write_report_index(tmp_path / "val", entries, title="Validation <run>")
    page = index.read_text(encoding="utf-8")
    assert index == tmp_path / "val" / "index.html" and os.listdir(tmp_path / "val") == ["index.html"]
    assert '<a href="1.2.3/index.html">1.2.3</a></td><td>2</td>' in page
    assert '<a href="4.5.6/index.html">4.5.6</a></td><td>0</td>' in page
    assert "2 series, 2 detection" in page and "Validation &lt;run&gt;" in page
    empty = write_report_index(tmp_path / "none", [], title="t").read_text(encoding="utf-8")
    assert "0 series" in empty and "<table" not in empty
