"""run_mode onnxruntime: the exported fp32 ONNX graph under ONNX Runtime (CPU)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UadkitError
from .base import ExportedRuntime, RuntimeSpec

ARTEFACT = "model.onnx"


class OnnxRuntimeModel(ExportedRuntime):
    def __init__(self, model_dir: str, threads: int | None = None, artefact: str = ARTEFACT) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UadkitError("run_mode onnxruntime needs the onnxruntime package: pip install onnxruntime") from e
        super().__init__(model_dir, artefact)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {"images": images.cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def _load(model_dir: str | None, model: Any, device: str) -> OnnxRuntimeModel:
    if not model_dir:
        raise UadkitError("run_mode onnxruntime needs a saved model: train it or load it from a model_dir")
    return OnnxRuntimeModel(model_dir)


ONNXRUNTIME = RuntimeSpec("onnxruntime", _load, artefact=ARTEFACT, package="onnxruntime")
