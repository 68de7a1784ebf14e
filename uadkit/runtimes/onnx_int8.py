"""run_mode onnxruntime-int8: the ONNX graph with int8 convolutions (static post-training quantisation).

Built at export from the fp32 graph with onnxruntime's quantisation tools: QDQ format, per-channel int8
weights, uint8 activations whose ranges come from good images of the training split (the folder recorded
as `trained_on` in model.yaml, up to CALIBRATION_IMAGES of them). Only convolutions are quantised: the
rest of the path (PatchCore's distances, maps, normalisation) stays fp32, where rounding would move the
calibrated thresholds. No training images on this machine: the artefact is skipped, with the reason logged.
Its accuracy bar is its own (evaluate -o Evaluate.run_mode=onnxruntime-int8), not equality with torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import UadkitError
from .base import RuntimeSpec
from .onnx import OnnxRuntimeModel

log = logging.getLogger("uadkit")
ARTEFACT = "model.int8.onnx"
CALIBRATION_IMAGES = 32


def build(onnx_path: str, folder: str, calibration: Callable[[], list[np.ndarray]] | None = None) -> str | None:
    images = calibration() if calibration else []
    if not images:
        log.info("skipped the int8 artefact: no training images to calibrate its activation ranges")
        return None
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": im[None].astype(np.float32)} for im in images])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = os.path.join(folder, ".int8-pre.onnx")
    try:
        quant_pre_process(onnx_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, os.path.join(folder, ARTEFACT), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"])
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
    return ARTEFACT


def _load(model_dir: str | None, model: Any, device: str) -> OnnxRuntimeModel:
    if not model_dir:
        raise UadkitError("run_mode onnxruntime-int8 needs a saved model: train it or load it from a model_dir")
    return OnnxRuntimeModel(model_dir, artefact=ARTEFACT)


ONNXRUNTIME_INT8 = RuntimeSpec("onnxruntime-int8", _load, artefact=ARTEFACT, build=build, package="onnxruntime",
                               exact=False)
