"""run_mode onnxruntime: the exported fp32 ONNX graph under ONNX Runtime (CPU)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UadkitError
from .base import ExportedRuntime, RuntimeSpec

ARTEFACT = "model.onnx"


def providers_for(device: torch.device, available: list[str]) -> list:
    """ONNX Runtime execution providers for a torch device: CUDA (with the CPU for unsupported nodes) or CPU."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise UadkitError(f"run_mode onnxruntime on {device}: this onnxruntime has no CUDA provider (has "
                          f"{', '.join(available)}); pip install onnxruntime-gpu, or use run_mode torch")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OnnxRuntimeModel(ExportedRuntime):
    def __init__(self, model_dir: str, threads: int | None = None, artefact: str = ARTEFACT,
                 device: torch.device | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UadkitError("run_mode onnxruntime needs the onnxruntime package: pip install onnxruntime") from e
        super().__init__(model_dir, artefact)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.device = device or torch.device("cpu")
        self.session = ort.InferenceSession(self.path, opts,
                                            providers=providers_for(self.device, ort.get_available_providers()))

    def to(self, device: torch.device) -> OnnxRuntimeModel:
        if torch.device(device).type != self.device.type:
            raise UadkitError(f"run_mode onnxruntime was loaded for {self.device}, not {device}")
        return self

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {"images": images.cpu().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def _load(model_dir: str | None, model: Any, device: str) -> OnnxRuntimeModel:
    if not model_dir:
        raise UadkitError("run_mode onnxruntime needs a saved model: train it or load it from a model_dir")
    from ..engine.device import main_device

    return OnnxRuntimeModel(model_dir, device=main_device(device))


ONNXRUNTIME = RuntimeSpec("onnxruntime", _load, artefact=ARTEFACT, package="onnxruntime")
