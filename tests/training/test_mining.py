"""Mining: the U-Net's in-body candidates away from every nodule as extra non-nodules, those within a
nodule's radius as extra nodules."""

from pathlib import Path

import numpy as np
import pytest
import torch

import p2ch_app.training.mining as mining
from p2ch_app.checkpoints import load_checkpoint
from p2ch_app.cli import train_cls
from p2ch_app.data.index import UNKNOWN_MALIGNANCY, build_index
from p2ch_app.training.classification import NoduleSettings, nodule_task
from p2ch_app.training.loop import Sampling
from tests.conftest import TINY, only_run_dir, run


def test_mined_are_in_body_candidates_away_from_every_nodule_or_within_ones_radius(prepared_synth, monkeypatch):
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.data.ct import xyz_to_irc
    from p2ch_app.data.index import build_index

    index = build_index(prepared_synth)
    cache = LunaCache(prepared_synth / "cache", prepared_synth)
    row = int(np.flatnonzero(index.has_annotation)[0])
    code, nodule = int(index.series_code[row]), index.center_xyz[row]
    clearance = max(index.diameter_mm[row], mining.MINED_CLEARANCE_MM)
    others = index.center_xyz[(index.series_code == code) & index.is_nodule]
    on_edge, near, far = nodule + [0.51 * index.diameter_mm[row], 0, 0], nodule + [0.9 * clearance, 0, 0], \
        nodule + [0, 0, clearance + 1]
    assert np.all(np.linalg.norm(others - far, axis=1) > clearance)  # far from the other nodules too
    geometry = cache.record(index.series_uids[code]).geometry
    proposed = xyz_to_irc(np.array([nodule + 0.3, on_edge, near, far, far, nodule]), geometry)
    inside = np.array([True, True, True, True, False, False])
    monkeypatch.setattr(mining, "propose", lambda hu, *args, **kwargs: (proposed, np.ones(6, int), inside))
    codes, found, hits = mining.mine_candidates(cache, index, [code], None, torch.device("cpu"))
    assert codes.tolist() == [code] * 2 and hits.tolist() == [True, False]
    assert found == pytest.approx(np.array([nodule + 0.3, far]), abs=1e-6)


def test_mined_lookalikes_are_half_the_negatives_however_many(prepared_synth, tmp_path):
    index = build_index(prepared_synth)
    train = np.flatnonzero(~index.is_validation(3) & ~index.is_nodule)
    for copies in (1, 10):  # few or many mined rows: the same share
        rows = np.tile(train, copies)
        grown = index.with_mined(index.series_code[rows], index.center_xyz[rows] + 0.5)
        task = nodule_task(grown, NoduleSettings(Sampling(tmp_path, prepared_synth, val_stride=3, epoch_samples=800)))
        drawn = task.train_dataset(1).rows
        mined = drawn >= len(index)
        assert task.labels[drawn].mean() == pytest.approx(0.5, abs=0.01)
        assert mined.mean() == pytest.approx(0.25, abs=0.01) and not task.labels[drawn[mined]].any()
        assert np.all(task.val_dataset().rows < len(index))  # validation is candidates.csv's alone


def test_mined_hits_are_half_the_positives_and_lookalikes_half_the_negatives(prepared_synth, tmp_path):
    index = build_index(prepared_synth)
    is_val = index.is_validation(3)
    nodules, others = np.flatnonzero(~is_val & index.is_nodule), np.flatnonzero(~is_val & ~index.is_nodule)
    rows = np.concatenate([np.tile(nodules, 7), others])  # many more hits than CSV nodules
    is_hit = np.arange(len(rows)) < 7 * len(nodules)
    grown = index.with_mined(index.series_code[rows], index.center_xyz[rows] + 0.5, is_hit)
    assert np.all(grown.malignancy[len(index):][is_hit] == UNKNOWN_MALIGNANCY)
    task = nodule_task(grown, NoduleSettings(Sampling(tmp_path, prepared_synth, val_stride=3, epoch_samples=800)))
    drawn = task.train_dataset(1).rows
    mined, labels = drawn >= len(index), task.labels[drawn]
    assert labels.mean() == pytest.approx(0.5, abs=0.01)
    assert mined[labels == 1].mean() == pytest.approx(0.5, abs=0.02)
    assert mined[labels == 0].mean() == pytest.approx(0.5, abs=0.02)


def test_train_cls_mines_lookalikes_with_a_unet(prepared_synth, tmp_path):
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.inference.pipeline import load_segmenter
    from p2ch_app.models import NoduleSegmenter
    from p2ch_app.training.mining import mine_candidates

    unet = NoduleSegmenter()
    with torch.no_grad():
        unet.unet.last.weight.fill_(0.0)
        unet.unet.last.bias.fill_(50.0)  # marks everything: one candidate per CT, near its middle
    torch.save({"model_state": unet.state_dict()}, tmp_path / "seg.pt")
    index = build_index(prepared_synth)
    segmenter = load_segmenter(tmp_path / "seg.pt", torch.device("cpu"))
    train_codes = np.flatnonzero(~index.validation_series(3))
    codes, _, hits = mine_candidates(LunaCache(prepared_synth / "cache", prepared_synth), index, train_codes, segmenter,
                                     torch.device("cpu"))
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--mine-with", tmp_path / "seg.pt"])
    assert result.exit_code == 0, result.output
    assert 0 < len(codes) <= len(train_codes)
    mined = f"mined {len(codes) - hits.sum()} look-alikes and {hits.sum()} nodule hits in the training series"
    assert mined in result.output
    options = load_checkpoint(only_run_dir(tmp_path, "luna-train-cls") / "last.pt")["config"]["options"]
    assert Path(options["mine_with"]) == tmp_path / "seg.pt"
    assert "found in the cache" not in result.output
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path / "again",
                             "--mine-with", tmp_path / "seg.pt"])
    assert result.exit_code == 0, result.output
    assert f"{mined} with {tmp_path / 'seg.pt'} (found in the cache" in result.output
    with torch.no_grad():
        unet.unet.last.bias.fill_(-50.0)  # other weights mark nothing: mined afresh, none found
    torch.save({"model_state": unet.state_dict()}, tmp_path / "seg.pt")
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path / "other",
                             "--mine-with", tmp_path / "seg.pt"])
    assert result.exit_code == 0, result.output
    assert "mined 0 look-alikes and 0 nodule hits" in result.output and "found in the cache" not in result.output
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--runs-dir", tmp_path / "x",
                             "--mine-with", tmp_path / "missing.pt"])
    assert result.exit_code != 0 and "missing.pt" in result.output and "Traceback" not in result.output


def _random_unet_and_training_series(prepared_synth, tmp_path):
    """(index, cache, training series codes at val_stride 3), with a random U-Net in tmp_path/seg.pt:
    it marks many candidates."""
    from p2ch_app.data.cache import LunaCache
    from p2ch_app.models import NoduleSegmenter

    torch.manual_seed(0)
    torch.save({"model_state": NoduleSegmenter().state_dict()}, tmp_path / "seg.pt")
    index = build_index(prepared_synth)
    return index, LunaCache(prepared_synth / "cache", prepared_synth), np.flatnonzero(~index.validation_series(3))


def test_mining_processes_find_what_one_process_finds_and_runs_share_it(prepared_synth, tmp_path):
    from p2ch_app.inference.pipeline import load_segmenter
    from p2ch_app.training.mining import mine_candidates, mine_in_processes, with_mined

    index, cache, codes = _random_unet_and_training_series(prepared_synth, tmp_path)
    alone = mine_candidates(cache, index, codes, load_segmenter(tmp_path / "seg.pt", torch.device("cpu")),
                            torch.device("cpu"))
    together = mine_in_processes(cache, index, codes, tmp_path / "seg.pt", 2)
    assert len(alone[0]) > len(codes)
    for mine, theirs in zip(alone, together):
        assert np.array_equal(mine, theirs)
    grown, reused = with_mined(cache, index, 3, tmp_path / "seg.pt", torch.device("cpu"), processes=2)
    assert not reused and len(grown) == len(index) + len(alone[0])
    assert list((prepared_synth / "cache" / "mined").glob("*.lock"))  # the lock that makes runs mine once
    assert with_mined(cache, index, 3, tmp_path / "seg.pt", torch.device("cpu"))[1]


def test_mine_every_mines_that_share_of_the_training_series_and_keeps_it_apart(prepared_synth, tmp_path):
    from p2ch_app.training.mining import with_mined

    index, cache, train_codes = _random_unet_and_training_series(prepared_synth, tmp_path)
    every, all_of_them = (with_mined(cache, index, 3, tmp_path / "seg.pt", torch.device("cpu"), every=n)
                          for n in (2, 1))
    assert not every[1]  # each share is mined and kept under its own key
    mined_in = set(every[0].series_code[len(index):])
    assert mined_in and mined_in <= set(train_codes[::2])
    assert set(all_of_them[0].series_code[len(index):]) > mined_in
    result = run(train_cls, ["--data-root", prepared_synth, *TINY, "--epochs", 1, "--runs-dir", tmp_path,
                             "--mine-with", tmp_path / "seg.pt", "--mine-every", 2])
    assert result.exit_code == 0 and "(found in the cache" in result.output, result.output
