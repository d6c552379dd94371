"""A tiny nodule-classifier run that several training tests start from."""

import pytest

from p2ch_app.cli import train_cls
from tests.conftest import TINY, only_run_dir, run


@pytest.fixture(scope="module")
def cls_run(prepared_synth, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--runs-dir", runs, "--comment", "tiny"])
    assert result.exit_code == 0, result.output
    return only_run_dir(runs, "luna-train-cls"), result
