"""The runtime protocol and the shared parts of exported runtimes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import yaml

from ..errors import UadkitError


class Runtime(Protocol):
    """What the predictor needs: a name, an input size, calibration, and `scores` of a batch."""

    name: str
    input_size: tuple[int, int]
    is_calibrated: Any

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def to(self, device: torch.device) -> Runtime: ...

    def eval(self) -> Runtime: ...


@dataclass(frozen=True)
class RuntimeSpec:
    """A run mode: how to load it, and (exported runtimes) which artefact it needs and how to build it.

    `build(onnx_path, folder)` writes the artefact from the fp32 ONNX graph into the inference folder being
    written; it returns the artefact's path relative to that folder, or None with a logged reason."""

    name: str
    load: Callable[[str | None, Any, str], Runtime]
    artefact: str | None = None
    build: Callable[[str, str], str | None] | None = None
    package: str | None = None  # the pip package it needs, named in the error when missing


def inference_info(model_dir: str) -> dict[str, Any]:
    folder = os.path.join(model_dir, "inference")
    path = os.path.join(folder, "inference.yml")
    if not os.path.isfile(path):
        raise UadkitError(f"{model_dir}: no exported model (inference/inference.yml); run -o Global.mode=export")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


class ExportedRuntime:
    """Common parts of runtimes that run an exported graph: metadata from inference.yml, CPU only here."""

    def __init__(self, model_dir: str, artefact: str) -> None:
        self.info = inference_info(model_dir)
        self.path = os.path.join(model_dir, "inference", artefact)
        if not os.path.isfile(self.path):
            raise UadkitError(f"{model_dir}: no {artefact} in inference/ (exported with an older uadkit, or its "
                              "build failed); run -o Global.mode=export")
        self.name = self.info["model"]
        self.input_size = tuple(self.info["input_size"])
        self.is_calibrated = True
        # tiling and region of interest travel in the exported Model config; the shared predictor applies them
        # around the graph (which scores one tile at the input size) with these thresholds and scales
        self.cfg = dict(self.info.get("Model") or {})
        from ..engine.calibration import CALIBRATION_KEYS

        self.calibration = torch.tensor([float(self.info["calibration"][k]) for k in CALIBRATION_KEYS])
        self.finish = self._head(model_dir) if self.info.get("head") else (lambda outputs: outputs)

    def _head(self, model_dir: str) -> Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
        """The model's own `finish` step, on a model built without weights and given the saved head tensors."""
        from safetensors.torch import load_file

        from ..engine.checkpoint import load_state
        from ..models import build_model

        path = os.path.join(model_dir, "inference", self.info["head"])
        try:
            state = load_file(path)
        except Exception as e:  # missing or corrupt file: safetensors raises its own types
            raise UadkitError(f"{path}: cannot read the exported head ({e}); run -o Global.mode=export") from e
        model = build_model(self.name, self.cfg, pretrained=False)
        load_state(model, state)  # the head's tensors only: the backbone runs in the graph
        return model.eval().finish

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs for a batch."""
        raise NotImplementedError

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return self.finish(self.run(images))

    def to(self, device: torch.device) -> ExportedRuntime:
        if device.type != "cpu":
            raise UadkitError(f"run_mode {type(self).__name__}: runs on the CPU here; use Global.device=cpu or "
                              "run_mode torch")
        return self

    def eval(self) -> ExportedRuntime:
        return self
