"""Checkpoint files and the models they hold: the one place that knows their layout.

Three layouts are read:
- ours: `model_state` plus `model_name` and `model_config` (the architecture), so the network
  is rebuilt exactly as it was trained;
- ours from before the architecture was saved: a segmenter's shape is in the training options,
  and those U-Nets pooled with max pooling;
- the book's `.state` files: `model_state` and `model_name` (UNetWrapper, LunaModel), whose
  architecture is our configs' defaults.
Every file is read with weights_only=True: tensors and plain values, never code.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from p2ch_app.errors import UserError, brief
from p2ch_app.files import write_atomic
from p2ch_app.models import Calibration, ClassifierConfig, NoduleClassifier, NoduleSegmenter, SegmenterConfig

SEGMENTER, CLASSIFIER = "segmenter", "classifier"
_KIND_OF_NAME = {"NoduleSegmenter": SEGMENTER, "UNetWrapper": SEGMENTER,
                 "NoduleClassifier": CLASSIFIER, "LunaModel": CLASSIFIER}
_KIND_OF_PREFIX = {"input_batchnorm.": SEGMENTER, "unet.": SEGMENTER,  # parameter names: the two networks share none
                   "tail_batchnorm.": CLASSIFIER, "block1.": CLASSIFIER, "head_linear.": CLASSIFIER}
_WHAT = {SEGMENTER: "a segmentation (luna-train-seg) checkpoint",
         CLASSIFIER: "a classifier (luna-train-cls or luna-finetune-mal) checkpoint"}


def save_checkpoint(path: Path, state: dict) -> None:
    """Through a temporary file and a rename: a crash never leaves half a checkpoint. The bytes are
    written by Python, not by torch's own file writer, so a full disk is an OSError that names its
    cause (torch reports it as "file write failed")."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def model_entries(model: nn.Module) -> dict:
    """What a checkpoint needs to rebuild `model`: its weights, class name and architecture."""
    return {"model_state": model.state_dict(), "model_name": type(model).__name__,
            "model_config": asdict(model.config)}


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain values only, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass an existing .pt or .state file")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); pass a complete checkpoint (a run's last.pt or "
                        "best.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if refused:
            raise UserError(f"refused to load {path}: it holds objects beyond tensors and plain values, and "
                            f"unpickling them could run code ({brief(refused[0], 100)}); use a checkpoint written "
                            "by p2ch_app or the book") from None
        raise UserError(f"{path} is not a readable checkpoint; it may be truncated or another kind of file") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{path} is not a readable checkpoint ({brief(err)}); "
                        "it may be truncated") from None
    if not isinstance(checkpoint, dict) or "model_state" not in checkpoint:
        raise UserError(f"{path} has no model_state; it is not a p2ch_app or book checkpoint")
    return checkpoint


def saved_options(checkpoint: dict) -> dict:
    """The command-line options a run of ours was trained with (empty for the book's files). A
    U-Net saved before its architecture was had max pooling, which its options do not say."""
    options = dict(checkpoint.get("config", {}).get("options", {}))
    if "model_config" not in checkpoint and checkpoint.get("model_name") == "NoduleSegmenter":
        options.setdefault("pooling", "max")
    return options


def model_config(checkpoint: dict, kind: str) -> SegmenterConfig | ClassifierConfig:
    """The architecture a checkpoint's weights belong to."""
    saved = checkpoint.get("model_config")
    if kind == CLASSIFIER:
        if not saved:
            return ClassifierConfig()
        calibration = saved.get("calibration")
        return ClassifierConfig(**{**saved, "crop_size": tuple(saved["crop_size"]),
                                   "calibration": Calibration(**calibration) if calibration else None})
    if saved:
        return SegmenterConfig(**saved)
    if "config" not in checkpoint:  # the book's file (or bare weights): the book's architecture
        return SegmenterConfig()
    options = saved_options(checkpoint)
    return SegmenterConfig(context=int(options.get("context", 3)), depth=int(options.get("unet_depth", 3)),
                           width_factor=int(options.get("width_factor", 4)),
                           up_mode=options.get("up_mode", "upconv"), pooling=options["pooling"])


def load_weights(model: nn.Module, path: Path, what: str, checkpoint: dict | None = None) -> nn.Module:
    """Copy a checkpoint's weights (ours or the book's) into model, strictly: a checkpoint of another
    architecture is a user error naming `what` it should be and the first mismatch, not a traceback.
    Pass `checkpoint` when path is already loaded, so it is read once."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    try:
        model.load_state_dict(checkpoint["model_state"], strict=True)
    except RuntimeError as err:
        raise UserError(f"{path} is not {what} ({brief(err, 100)})") from None
    return model


def model_kind(path: Path, checkpoint: dict | None = None) -> str:
    """Which network a checkpoint holds, SEGMENTER or CLASSIFIER: from its model_name (ours and the
    book's files), else from its parameter names (bare weights), which the two networks never share."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    found = _KIND_OF_NAME.get(checkpoint.get("model_name"))
    if found is not None:
        return found
    state = checkpoint["model_state"]
    names = state.keys() if isinstance(state, dict) else ()
    kinds = {kind for name in names for prefix, kind in _KIND_OF_PREFIX.items() if name.startswith(prefix)}
    if len(kinds) != 1:
        raise UserError(f"{path} holds neither a U-Net nor a nodule classifier of p2ch_app or the book; pass "
                        f"{_WHAT[SEGMENTER]} or {_WHAT[CLASSIFIER]}")
    return kinds.pop()


def load_model(path: Path, kind: str, checkpoint: dict | None = None) -> nn.Module:
    """The network a checkpoint holds, rebuilt from its saved architecture, weights loaded, in eval mode."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
    found = _KIND_OF_NAME.get(checkpoint.get("model_name"))
    if found is not None and found != kind:
        raise UserError(f"{path} holds a {found} ({checkpoint['model_name']}), not a {kind}; "
                        f"pass {_WHAT[kind]}")
    try:
        config = model_config(checkpoint, kind)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path} has an architecture this version cannot build ({err}); "
                        f"pass {_WHAT[kind]}") from None
    model = NoduleSegmenter(config) if kind == SEGMENTER else NoduleClassifier(config)
    return load_weights(model, path, _WHAT[kind], checkpoint).eval()


def _architecture(checkpoint: dict) -> dict | None:
    """The saved model_config without a malignancy model's calibration, which is fitted to its own weights."""
    saved = checkpoint.get("model_config")
    return None if saved is None else {key: value for key, value in saved.items() if key != "calibration"}


def _same_network(first: dict, other: dict) -> bool:
    a, b = first["model_state"], other["model_state"]
    same_kind = first.get("model_name") == other.get("model_name") and _architecture(first) == _architecture(other)
    return same_kind and a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def average_checkpoints(paths: list[Path]) -> dict:
    """One checkpoint whose weights are the mean of runs fine-tuned from the same starting weights (a
    "model soup"): as fast as any one run, and steadier, because which small nodules one short run learns
    hangs on its seed. Runs from different starts (or from random weights) lie in different basins, where
    a mean of weights is no network at all, so they are refused, as are different architectures."""
    if len(paths) < 2:
        raise UserError("give two or more checkpoints to average")
    loaded = [load_checkpoint(path) for path in paths]
    first = loaded[0]
    for path, other in zip(paths[1:], loaded[1:]):
        if not _same_network(first, other):
            raise UserError(f"{path} holds another network than {paths[0]}; average runs of one architecture")
    starts = {_start_of(checkpoint) for checkpoint in loaded}
    if len(starts) != 1 or starts == {"None"}:
        raise UserError(f"these runs started from {' and '.join(sorted(starts))}: average only runs fine-tuned "
                        "from the same weights (--init, or luna-finetune-mal's --from; runs from random weights "
                        "do not average)")
    state = {}
    for name, value in first["model_state"].items():
        if value.is_floating_point():
            state[name] = (sum(c["model_state"][name].double() for c in loaded) / len(loaded)).to(value.dtype)
        else:  # batch norms' step counters
            state[name] = max(c["model_state"][name] for c in loaded)
    # a malignancy model's calibration belongs to its own weights: the mean's is the network's own softmax
    return {"model_state": state, "model_name": first.get("model_name"), "model_config": _architecture(first),
            "config": first["config"], "averaged_from": [str(path) for path in paths]}


def _start_of(checkpoint: dict) -> str:
    """The weights a run was fine-tuned from: its --init, or the classifier luna-finetune-mal started from."""
    config = checkpoint.get("config", {})
    return str(config.get("init") or config.get("options", {}).get("from_checkpoint"))


def newest_best(runs_dir: Path, command: str) -> Path | None:
    """The most recent best.pt of a trainer under runs_dir, if any."""
    found = sorted(Path(runs_dir).glob(f"{command}/*/best.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def model_paths(runs_dir: Path, seg: Path | None, cls: Path | None, mal: Path | None) -> dict[str, Path | None]:
    """The checkpoints nodule-analyze runs: those given, else the newest best.pt of each trainer
    (a malignancy model only when one was trained)."""
    trainers = {"seg": ("luna-train-seg", seg), "cls": ("luna-train-cls", cls)}
    paths = {}
    for key, (command, given) in trainers.items():
        paths[key] = given or newest_best(runs_dir, command)
        if paths[key] is None:
            raise UserError(f"no trained model under {runs_dir}/{command}/; train one with {command} "
                            f"or pass --{key}-model (the book's .state files work)")
    paths["mal"] = mal or newest_best(runs_dir, "luna-finetune-mal")
    return paths
