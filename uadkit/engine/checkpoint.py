"""Saved models: `model.safetensors` (tensors only) + `model.yaml` (readable metadata).

Loading never unpickles: safetensors for weights, `torch.load(weights_only=True)` for optimiser state.
A model directory is written beside its final place and swapped in, so an interrupted save never
leaves a half-written `best_model/`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UadkitError
from ..models import AnomalyModel, build_model

WEIGHTS = "model.safetensors"
META = "model.yaml"
TRAIN_STATE = "train_state.pt"


def model_metadata(model: AnomalyModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from .calibration import CALIBRATION_KEYS

    cal = {k: float(v) for k, v in zip(CALIBRATION_KEYS, model.calibration)}
    meta = {
        "uadkit_version": __version__,
        "model": model.name,
        "Model": model.cfg,
        "calibration": {"calibrated": bool(model.is_calibrated), **cal,
                        "note": "normalised = sigmoid((raw - threshold) / scale), scale_low below the threshold "
                                "and scale_high above it; thresholds sit at 0.5"},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta.update(extra or {})
    return meta


def save_model_dir(model: AnomalyModel, path: str, extra: dict[str, Any] | None = None,
                   train_state: dict[str, Any] | None = None, export_opset: int | None = None) -> str:
    """Write weights + model.yaml (+ the ONNX graph with `export_opset`) beside `path`, then swap it in:
    a reader sees the old folder or the new one, never weights of one and a graph of the other."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            yaml.safe_dump(model_metadata(model, extra), f, sort_keys=False)
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, TRAIN_STATE))
        if export_opset is not None:
            from .export import export_onnx

            export_onnx(model, tmp, export_opset)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_metadata(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise UadkitError(f"model_dir '{path}' does not exist or is not a folder")
    if not os.path.isfile(meta_path) or not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise UadkitError(f"model_dir '{path}' is not a uadkit model: expected {META} and {WEIGHTS} in it")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UadkitError(f"{meta_path}: not valid YAML ({e})") from e
    if not isinstance(meta, dict) or "model" not in meta or "Model" not in meta:
        raise UadkitError(f"{meta_path}: missing the 'model' and 'Model' entries")
    return meta


def load_state(model: AnomalyModel, state: dict[str, torch.Tensor]):
    """`load_state_dict(state, strict=False)`, after models with data-sized buffers (memory banks) size them
    from `state`; returns (missing, unexpected) keys."""
    prepare = getattr(model, "prepare_state", None)
    if prepare:
        prepare(state)
    return model.load_state_dict(state, strict=False)


def load_model_dir(path: str) -> tuple[AnomalyModel, dict[str, Any]]:
    meta = read_metadata(path)
    # No ImageNet download: every tensor, the teacher's included, comes from the saved file.
    model = build_model(meta["model"], meta["Model"], pretrained=False)
    try:
        state = load_file(os.path.join(path, WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UadkitError(f"{os.path.join(path, WEIGHTS)}: corrupt weights file ({e})") from e
    try:
        missing, unexpected = load_state(model, state)
    except RuntimeError as e:  # shape mismatches: a different config or uadkit version wrote it
        reason = str(e).splitlines()[-1].strip()
        raise UadkitError(f"{os.path.join(path, WEIGHTS)}: weights do not fit a {meta['model']} with the config in "
                          f"{META} (saved by uadkit {meta.get('uadkit_version', '?')}): {reason}") from e
    if missing or unexpected:
        raise UadkitError(f"{os.path.join(path, WEIGHTS)}: weights do not fit a {meta['model']} with this config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, meta


def load_train_state(path: str) -> dict[str, Any]:
    f = os.path.join(path, TRAIN_STATE)
    if not os.path.isfile(f):
        raise UadkitError(f"Train.resume_path '{path}': no {TRAIN_STATE} in it (expected a checkpoint folder "
                          "written by training, e.g. output/checkpoints/last)")
    return torch.load(f, map_location="cpu", weights_only=True)


def model_version(model_dir: str) -> str:
    """A hash of the model folder's files (names and contents): a new calibration is a new version."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, model_dir).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
