import json
import time
import zipfile

import pytest
import torch

from p2ch_app.data.ct import load_ct
from p2ch_app.errors import UserError
from p2ch_app.inference.outputs import write_detections
from p2ch_app.inference.pipeline import AnalysisSettings, analyze
from p2ch_app.inference.summary import summarize
from p2ch_app.serve.client import Client
from p2ch_app.serve.jobs import analysis_settings
from tests.serve.conftest import running, settings_for


def leftover_uploads(tmp) -> list:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("nodule-serve-"))


def expected_json(tmp_path, ct_path, models, settings: AnalysisSettings, series_uid=None) -> dict:
    """What nodule-analyze --ct CT --output x.json writes for the same CT, models and options."""
    ct = load_ct(ct_path, series_uid)
    rows = [d for d in analyze(ct, models, settings) if d.nodule_prob >= settings.threshold]
    summary = summarize(rows, models.malignancy is not None)
    write_detections(tmp_path / "x.json", [(ct.series_uid, d) for d in rows], models.paths, {ct.series_uid: summary})
    return json.loads((tmp_path / "x.json").read_text())


@pytest.mark.parametrize("kind", ["nii.gz", "zip"])
def test_a_ct_as_a_job_gives_nodule_analyzes_json_and_the_report_files(server, tmp_path, models, tiny_cts,
                                                                         private_tmp, kind):
    url, _ = server
    client = Client(url)
    status, job = client.submit(tiny_cts[kind], {"threshold": 0.1, "keep_outside": True})
    assert status == 202 and job["state"] == "queued" and job["status_url"] == f"/jobs/{job['id']}"
    done = client.wait(job["id"])
    assert done["state"] == "done", done
    settings = AnalysisSettings(threshold=0.1, keep_outside=True)
    source = tiny_cts["mhd"] if kind == "zip" else tiny_cts[kind]  # NIfTI stores the spacing as float32
    assert done["result"] == expected_json(tmp_path, source, models, settings, "tiny")
    names = set(done["links"])
    assert {"detections.json", "submission.csv", "index.html", "detections.mrk.json", "candidates.nii.gz"} <= names
    assert len([n for n in names if n.endswith(".png")]) == len(done["result"]["detections"])
    status, headers, page = client.request("GET", done["links"]["index.html"])
    assert status == 200 and b"nodule-serve tiny" in page
    for name in ("job.json", "..%2Fjob.json", "..%2F..%2Fetc%2Fpasswd"):  # only the listed files are served
        status, answer = client.json("GET", f"/jobs/{job['id']}/files/{name}")
        assert status == 404 and list(answer) == ["error"]
    assert client.json("GET", "/jobs/0123456789abcdef")[0] == 404
    assert leftover_uploads(private_tmp) == []


def test_a_bad_ct_fails_the_job_with_the_clis_message(server, tmp_path, private_tmp):
    url, _ = server
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    client = Client(url)
    status, job = client.submit(bad)
    assert status == 202
    failed = client.wait(job["id"])
    assert failed["state"] == "failed" and "cannot read CT upload" in failed["error"]
    assert str(private_tmp) not in failed["error"] and leftover_uploads(private_tmp) == []


def test_a_restart_keeps_finished_jobs_and_fails_interrupted_ones(tmp_path, models, tiny_cts):
    from p2ch_app.serve.jobs import RESUBMIT, JobRunner, JobSettings

    results = tmp_path / "results"
    with running(__import__("p2ch_app.serve.app", fromlist=["create_app"]).create_app(
            settings_for(results), models, torch.device("cpu"))) as url:
        client = Client(url)
        done = client.wait(client.submit(tiny_cts["mha"])[1]["id"])
    assert done["state"] == "done"
    for n, state in enumerate(("queued", "running")):  # what a killed server leaves behind
        job_id = f"{n:016x}"
        (results / job_id).mkdir()
        (results / job_id / "job.json").write_text(json.dumps({"id": job_id, "state": state, "submitted": n}))
    runner = JobRunner(JobSettings(results, keep_results=3), models, torch.device("cpu"))
    runner.start()
    assert runner.status(done["id"])["result"] == done["result"]
    assert runner.status(f"{0:016x}") == {"id": f"{0:016x}", "state": "failed", "submitted": 0, "error": RESUBMIT}
    assert runner.status(f"{1:016x}")["error"] == RESUBMIT
    runner.stop(1)
    pruned = JobRunner(JobSettings(results, keep_results=1), models, torch.device("cpu"))
    pruned.start()  # the oldest two go
    assert sorted(p.name for p in results.iterdir()) == [done["id"]]
    pruned.stop(1)


def test_the_job_queue_is_bounded(tmp_path, models, tiny_cts, private_tmp):
    from p2ch_app.serve.app import create_app
    from p2ch_app.serve.jobs import JobSettings

    app = create_app(settings_for(tmp_path, jobs=JobSettings(tmp_path / "results", max_jobs=1)), models,
                     torch.device("cpu"))
    runner = app.state.service.runner
    analysis = runner._run
    runner._run = lambda *args: (time.sleep(0.5), analysis(*args))  # a slow analysis, so the queue fills
    with running(app) as url:
        client = Client(url)
        answers = [client.submit(tiny_cts["mha"]) for _ in range(4)]
        assert [status for status, _ in answers[:2]] == [202, 202]
        assert answers[3][0] == 503 and "jobs are already waiting" in answers[3][1]["error"]
        for status, job in answers:
            if status == 202:
                assert client.wait(job["id"])["state"] == "done"
    assert leftover_uploads(private_tmp) == []


@pytest.mark.parametrize("grace_s, state", [(5.0, "done"), (0.05, "failed")])
def test_at_shutdown_the_running_job_gets_its_grace_then_fails(tmp_path, models, tiny_cts, grace_s, state):
    from p2ch_app.serve.jobs import RESUBMIT, JobRunner, JobSettings, Upload
    from p2ch_app.serve.uploads import private_folder

    runner = JobRunner(JobSettings(tmp_path / "results"), models, torch.device("cpu"))
    analysis = runner._run
    runner._run = lambda *args: (time.sleep(0.5), analysis(*args))
    runner.start()
    upload = Upload(private_folder(), tiny_cts["mha"], "tiny")
    running_job = runner.submit(upload, AnalysisSettings())["id"]
    queued_job = runner.submit(Upload(private_folder(), tiny_cts["mha"], "tiny"), AnalysisSettings())["id"]
    while runner.status(running_job)["state"] == "queued":
        time.sleep(0.01)
    runner.stop(grace_s)
    assert runner.status(running_job)["state"] == state
    assert runner.status(queued_job) | {"finished": 0} == runner.status(queued_job) | {
        "state": "failed", "error": RESUBMIT, "finished": 0}
    assert not upload.folder.exists() or state == "failed"  # a job cut off may still hold it until the process ends


def test_a_zipped_dicom_series_and_the_voxel_limit(server, tmp_path, monkeypatch):
    from tests.data.test_ct import write_dicom_series

    url, _ = server
    write_dicom_series(tmp_path / "dcm", "1.2.3.4", range(0, 20, 2), [f"s{k}.dcm" for k in range(10)])
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((tmp_path / "dcm").iterdir()):
            zipped.write(path, f"export/{path.name}")
    client = Client(url)
    done = client.wait(client.submit(archive)[1]["id"])
    assert done["state"] == "done" and done["result"]["series_uid"] == "1.2.3.4", done
    monkeypatch.setenv("P2CH_MAX_CT_VOXELS", "500")  # 8 x 8 x 10 = 640 voxels: refused from the headers
    failed = client.wait(client.submit(archive)[1]["id"])
    assert failed["state"] == "failed" and "640 voxels" in failed["error"] and "P2CH_MAX_CT_VOXELS" in failed["error"]


def test_form_fields_set_each_of_nodule_analyzes_flags_and_refuse_other_words():
    settings = analysis_settings({"recentre": b"true", "lung_only": b"on", "tta": b"0", "threshold": b"0.3",
                                  "file": b"..."}, 8)
    assert (settings.recentre, settings.lung_only, settings.tta, settings.threshold, settings.batch_size) == (
        True, True, False, 0.3, 8)
    assert analysis_settings({}, 8) == AnalysisSettings(batch_size=8)
    with pytest.raises(UserError, match="lung_only 'maybe' is not true or false"):
        analysis_settings({"lung_only": b"maybe"}, 8)
