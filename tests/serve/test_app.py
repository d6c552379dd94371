import json
import logging

import numpy as np
import pytest
import torch

from p2ch_app.checkpoints import CLASSIFIER, load_model
from p2ch_app.data.ct import gather_crops, load_ct
from p2ch_app.inference.pipeline import class1_probability
from p2ch_app.serve.client import Client, multipart
from tests.conftest import BOOK_MODELS, requires_shared


def real_crop(tiny_cts) -> np.ndarray:
    """A crop around a nodule of the tiny CT, as a chapter-15 client sends it: 1 x 32 x 48 x 48 float32 HU."""
    ct = load_ct(tiny_cts["mhd"])
    return gather_crops(ct.hu, np.array([[18.0, 28.0, 28.0]]), (32, 48, 48))[0][None].astype(np.float32)


@requires_shared
def test_predict_answers_as_the_books_server_with_the_books_classifier(tmp_path, tiny_cts):
    """The book's flask_server: the classifier in eval mode under no_grad on the crop with a batch axis,
    the softmax's class 1. Our service with the same checkpoint gives the same number to 1e-6."""
    from p2ch_app.inference.pipeline import load_models
    from p2ch_app.serve.app import create_app
    from tests.serve.conftest import running, settings_for

    cls = next(BOOK_MODELS.glob("cls_*.state"))
    seg = next(BOOK_MODELS.glob("seg_*.state"))
    crop = real_crop(tiny_cts)
    book = load_model(cls, CLASSIFIER)
    with torch.no_grad():
        expected = book(torch.from_numpy(crop).unsqueeze(0))[1].squeeze(0).tolist()[1]
    models = load_models(seg, cls, None, torch.device("cpu"))
    with torch.inference_mode():
        ours = class1_probability(models.classifier, torch.from_numpy(crop)[None]).item()
    with running(create_app(settings_for(tmp_path), models, torch.device("cpu"))) as url:
        status, answer = Client(url).predict(crop)
    assert status == 200
    assert set(answer) == {"prob_malignant", "nodule_prob"}
    assert answer["prob_malignant"] == pytest.approx(expected, abs=1e-6)
    assert answer["prob_malignant"] == pytest.approx(ours, abs=1e-6) and answer["nodule_prob"] == answer[
        "prob_malignant"]


def test_predict_adds_the_malignancy_model_when_one_is_loaded(tmp_path, model_files, tiny_cts):
    from p2ch_app.inference.pipeline import load_models
    from p2ch_app.serve.app import create_app
    from tests.serve.conftest import running, settings_for

    models = load_models(model_files["seg"], model_files["cls"], model_files["cls"], torch.device("cpu"))
    with running(create_app(settings_for(tmp_path), models, torch.device("cpu"))) as url:
        status, answer = Client(url).predict(real_crop(tiny_cts))
    assert status == 200 and answer["malignancy_prob"] == pytest.approx(answer["nodule_prob"], abs=1e-6)


def test_health_readiness_and_the_metrics(server, tiny_cts):
    url, _ = server
    client = Client(url)
    assert client.json("GET", "/healthz") == (200, {"status": "ok"})
    status, ready = client.json("GET", "/readyz")
    assert status == 200 and ready["status"] == "ready" and ready["models"]["cls"]
    assert client.predict(real_crop(tiny_cts))[0] == 200
    assert client.predict(np.zeros((1, 8, 8, 8), np.float32))[0] == 400
    status, headers, text = client.request("GET", "/metrics")
    text = text.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'nodule_serve_requests_total{route="/predict",status="200"} 1.0' in text
    assert 'nodule_serve_requests_total{route="/predict",status="400"} 1.0' in text
    assert 'nodule_serve_request_seconds_count{route="/predict"} 2.0' in text
    assert "nodule_serve_batch_size_count 1.0" in text and "nodule_serve_predict_queue_depth 0.0" in text
    assert 'nodule_serve_jobs{state="queued"} 0.0' in text


@pytest.mark.parametrize("fields, files, message", [
    ({"meta": '{"shape": [1, 32, 48, 48]}'}, {}, "lacks the field"),
    ({"meta": "shape=1,32,48,48"}, {"blob": ("b", bytes(4 * 32 * 48 * 48))}, "meta is not JSON"),
    ({"meta": '{"shape": [1, 32, 48, 48]}'}, {"blob": ("b", bytes(12))}, "blob holds 12 bytes"),
])
def test_predict_refusals_are_one_line_json(server, fields, files, message):
    url, _ = server
    body, content_type = multipart(fields, files)
    status, answer = Client(url).json("POST", "/predict", body, {"Content-Type": content_type})
    assert status == 400 and list(answer) == ["error"] and message in answer["error"]
    assert "\n" not in answer["error"] and "; " in answer["error"]


def test_other_refusals_and_an_unexpected_failure(server, caplog, tiny_cts):
    url, app = server
    client = Client(url)
    status, answer = client.json("POST", "/predict", b"x=1", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "multipart/form-data" in answer["error"]
    status, answer = client.json("GET", "/nowhere")
    assert status == 404 and list(answer) == ["error"]
    status, answer = client.json("POST", "/predict", bytes(5 << 20), {"Content-Type": "multipart/form-data; "
                                                                                      "boundary=x"})
    assert status == 413 and "over the limit" in answer["error"]

    def broken(x):
        raise ValueError("a bug")

    app.state.service.batcher.forward = broken
    with caplog.at_level(logging.ERROR, logger="nodule_serve"):
        status, answer = client.predict(real_crop(tiny_cts))
    assert status == 500 and "a bug" not in json.dumps(answer) and "Traceback" not in json.dumps(answer)
    error_id = answer["error"].split("error id ")[1].split(")")[0]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_past_the_queue_the_answer_is_503_with_retry_after(tmp_path, models, tiny_cts):
    import threading
    import time

    from p2ch_app.serve.app import create_app
    from p2ch_app.serve.batching import BatchSettings
    from tests.serve.conftest import running, settings_for

    app = create_app(settings_for(tmp_path, batching=BatchSettings(max_batch=1, max_wait_ms=0, max_queue=1)), models,
                     torch.device("cpu"))
    app.state.service.batcher.forward = lambda x: (time.sleep(1.0), [{"nodule_prob": 0.5}] * len(x))[1]
    crop = real_crop(tiny_cts)
    with running(app) as url:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(Client(url).predict(crop))) for _ in range(2)]
        for thread in threads:  # one in the pass, one in the queue
            thread.start()
            time.sleep(0.3)
        body, content_type = multipart({"meta": '{"shape": [1, 32, 48, 48]}'}, {"blob": ("b", crop.tobytes())})
        status, headers, answer = Client(url).request("POST", "/predict", body, {"Content-Type": content_type})
        for thread in threads:
            thread.join()
    assert status == 503 and headers["retry-after"] == "1" and b"the /predict queue is full (1 waiting)" in answer
    assert sorted(s for s, _ in answers) == [200, 200]
