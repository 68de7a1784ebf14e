"""run_mode openvino: the ONNX graph converted to OpenVINO IR (fp32 weights), on the CPU device."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..errors import UadkitError
from .base import ExportedRuntime, RuntimeSpec

log = logging.getLogger("uadkit")
ARTEFACT = "openvino/model.xml"


def _openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise UadkitError("run_mode openvino needs the openvino package: pip install openvino") from e
    return ov


class OpenVinoModel(ExportedRuntime):
    def __init__(self, model_dir: str) -> None:
        ov = _openvino()
        super().__init__(model_dir, ARTEFACT)
        # f32 inference: on CPUs with bf16 units OpenVINO otherwise picks bf16 and the maps move by ~1e-2
        self.compiled = ov.Core().compile_model(self.path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = self.request.infer({0: images.cpu().numpy()})
        return tuple(torch.from_numpy(res[out].copy()) for out in self.compiled.outputs)


def build(onnx_path: str, folder: str) -> str | None:
    try:
        ov = _openvino()
    except UadkitError as e:
        log.info("skipped the OpenVINO artefact: %s", e)
        return None
    os.makedirs(os.path.join(folder, "openvino"), exist_ok=True)
    # fp32 weights: fp16 compression would move PatchCore's distances and the calibrated thresholds
    ov.save_model(ov.convert_model(onnx_path), os.path.join(folder, ARTEFACT), compress_to_fp16=False)
    return ARTEFACT


def _load(model_dir: str | None, model: Any, device: str) -> OpenVinoModel:
    if not model_dir:
        raise UadkitError("run_mode openvino needs a saved model: train it or load it from a model_dir")
    return OpenVinoModel(model_dir)


OPENVINO = RuntimeSpec("openvino", _load, artefact=ARTEFACT, build=build, package="openvino")
