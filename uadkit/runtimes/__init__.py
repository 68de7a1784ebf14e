"""Runtimes: what runs a trained model's scoring path. One module per run mode, one registry line each.

A runtime loads a model folder and scores a batch of prepared images (float32 (B, 3, H, W) in [0, 1]):
raw map, raw score, normalised map, normalised score, exactly what `AnomalyModel.scores` returns, so the
shared predictor (and evaluate, calibrate, the service) runs any of them the same way. Exported runtimes
also say how to make their artefact from the fp32 ONNX graph; export writes them side by side in
`<model_dir>/inference/` and lists them in inference.yml.
"""

from __future__ import annotations

from ..errors import UadkitError
from .base import Runtime, RuntimeSpec
from .onnx import ONNXRUNTIME
from .openvino import OPENVINO
from .torch import TORCH

RUNTIMES: dict[str, RuntimeSpec] = {spec.name: spec for spec in (TORCH, ONNXRUNTIME, OPENVINO)}


def runtime_spec(run_mode: str) -> RuntimeSpec:
    if run_mode not in RUNTIMES:
        raise UadkitError(f"run_mode {run_mode!r}: expected one of {', '.join(RUNTIMES)}")
    return RUNTIMES[run_mode]


def resolve_run_mode(run_mode: str, model, device: str = "cpu") -> RuntimeSpec:
    """`auto` is the model's preferred runtime on the CPU (the fastest measured there at equal results) and
    torch on a GPU: OpenVINO runs on the CPU here and ONNX Runtime needs onnxruntime-gpu. Others by name."""
    if run_mode == "auto":
        return runtime_spec("torch" if str(device).lower().startswith(("gpu", "cuda")) else model.preferred_runtime)
    return runtime_spec(run_mode)


def load_runtime(run_mode: str, model_dir: str | None, model, device: str = "cpu") -> Runtime:
    """The scorer for `run_mode`: the torch model itself, or an exported artefact of `model_dir`."""
    return resolve_run_mode(run_mode, model, device).load(model_dir, model, device)


__all__ = ["RUNTIMES", "Runtime", "RuntimeSpec", "load_runtime", "resolve_run_mode", "runtime_spec"]
