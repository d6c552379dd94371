"""A bounded load on loopback: 16 clients, a few hundred /predict requests, a small queue so some are refused."""

import os
import threading

import numpy as np
import torch

from p2ch_app.serve.batching import BatchSettings
from p2ch_app.serve.client import Client
from tests.serve.conftest import running, settings_for

CLIENTS, PER_CLIENT = 16, 20


def open_descriptors() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_a_bounded_load_gets_200_or_503_and_leaves_nothing_behind(tmp_path, models, private_tmp):
    from p2ch_app.serve.app import create_app

    crop = np.random.default_rng(0).normal(-600, 300, (1, 32, 48, 48)).astype(np.float32)
    fds_before = len(os.listdir("/proc/self/fd"))
    app = create_app(settings_for(tmp_path / "results", batching=BatchSettings(max_batch=16, max_wait_ms=5,
                                                                              max_queue=8)),
                     models, torch.device("cpu"))
    statuses, probs, failures = [], [], []

    def client(url):
        connection = Client(url, timeout=120)
        try:
            for _ in range(PER_CLIENT):
                status, answer = connection.predict(crop)
                statuses.append(status)
                if status == 200:
                    probs.append(answer["prob_malignant"])
        except Exception as err:  # a hung or dropped request: the test fails below
            failures.append(repr(err))
        finally:
            connection.close()

    with running(app) as url:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads), "a request hung"
        metrics = Client(url).request("GET", "/metrics")[2].decode()
    assert failures == [] and len(statuses) == CLIENTS * PER_CLIENT
    assert set(statuses) <= {200, 503} and statuses.count(200) > 0
    assert np.ptp(probs) < 1e-6  # the same crop gets the same answer, whatever batch it rode in
    assert "nodule_serve_batch_size_bucket" in metrics
    assert list(private_tmp.iterdir()) == []  # the server's temporary folder
    assert len(os.listdir("/proc/self/fd")) <= fds_before, open_descriptors()
