"""Export the full scoring path (backbone, anomaly map, smoothing, normalisation) to ONNX.

Writes `<model_dir>/inference/model.onnx` and `inference.yml` (input size, model name, thresholds,
uadkit version). Images go in as float32 (B, 3, H, W) in [0, 1]; the backbone's normalisation is inside
the graph. Out come raw_map, raw_score, norm_map, norm_score; resizing to the original image size
happens outside, in the shared predictor.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from typing import Any

import torch
import yaml
from torch import nn

from .. import __version__
from ..errors import UadkitError
from ..models import AnomalyModel
from .calibration import CALIBRATION_KEYS

log = logging.getLogger("uadkit")
OUTPUTS = ["raw_map", "raw_score", "norm_map", "norm_score"]


class _Scoring(nn.Module):
    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.scores(images)


def export_onnx(model: AnomalyModel, model_dir: str, opset: int = 17) -> str:
    """Write model_dir/inference/ atomically; returns its path."""
    if not bool(model.is_calibrated):
        raise UadkitError("export: the model is not trained/calibrated")
    model = model.cpu().eval()
    final = os.path.join(os.path.abspath(model_dir), "inference")
    tmp = tempfile.mkdtemp(prefix=".inference.tmp-", dir=os.path.abspath(model_dir))
    try:
        h, w = model.input_size
        dummy = torch.rand(2, 3, h, w)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # eval() on the wrapper too: the exporter traces in the top module's mode, and a training-mode
            # trace would use batch statistics in BatchNorm (and update the running ones).
            torch.onnx.export(_Scoring(model).eval(), (dummy,), os.path.join(tmp, "model.onnx"), input_names=["images"],
                              output_names=OUTPUTS, opset_version=opset, dynamo=False,
                              # no folding: it would store PatchCore's bank twice (as is and transposed);
                              # ONNX Runtime folds constants itself when it loads the graph
                              do_constant_folding=False,
                              dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}})
        info: dict[str, Any] = {
            "model": model.name, "uadkit_version": __version__, "input_size": list(model.input_size),
            "input": "float32 RGB (batch, 3, height, width) in [0, 1]; normalisation is inside the graph",
            "outputs": OUTPUTS, "opset": opset,
            "calibration": {k: float(v) for k, v in zip(CALIBRATION_KEYS, model.calibration)},
            "Model": model.cfg,
        }
        with open(os.path.join(tmp, "inference.yml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(info, f, sort_keys=False)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported ONNX model to %s", final)
    return final


class OnnxModel:
    """ONNX Runtime stand-in for an AnomalyModel in the shared predictor (same `scores` contract)."""

    def __init__(self, model_dir: str, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UadkitError("run_mode onnxruntime needs the onnxruntime package: pip install onnxruntime") from e
        folder = os.path.join(model_dir, "inference")
        path = os.path.join(folder, "model.onnx")
        if not os.path.isfile(path):
            raise UadkitError(f"{model_dir}: no exported model (inference/model.onnx); run -o Global.mode=export")
        with open(os.path.join(folder, "inference.yml"), encoding="utf-8") as f:
            self.info = yaml.safe_load(f)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.name = self.info["model"]
        self.input_size = tuple(self.info["input_size"])
        self.is_calibrated = True

    def to(self, device: torch.device) -> OnnxModel:
        if device.type != "cpu":
            raise UadkitError("run_mode onnxruntime runs on the CPU here; use Global.device=cpu")
        return self

    def eval(self) -> OnnxModel:
        return self

    def scores(self, images: torch.Tensor):
        outs = self.session.run(None, {"images": images.cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)
