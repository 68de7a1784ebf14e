"""Export the full scoring path (backbone, anomaly map, smoothing, normalisation) to ONNX.

Writes `<model_dir>/inference/model.onnx`, every other runtime's artefact built from it (uadkit/runtimes:
OpenVINO IR, ...) and `inference.yml` (input size, model name, thresholds, uadkit version, the artefacts).
Images go in as float32 (B, 3, H, W) in [0, 1]; the backbone's normalisation is inside
the graph. Out come raw_map, raw_score, norm_map, norm_score; resizing to the original image size
happens outside, in the shared predictor. A model whose scoring has a step a graph cannot hold (PatchCore's
HNSW search) exports the graph up to that step (`model.graph`) and the tensors of the rest
(`model.head_state()`, `head.safetensors`); every runtime then runs `model.finish` on the graph's outputs.
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
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..errors import UadkitError
from ..models import AnomalyModel
from ..models.base import SCORE_OUTPUTS
from .calibration import CALIBRATION_KEYS

log = logging.getLogger("uadkit")
OUTPUTS = list(SCORE_OUTPUTS)
HEAD = "head.safetensors"


class _Scoring(nn.Module):
    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.graph(images)


def export_onnx(model: AnomalyModel, model_dir: str, opset: int = 17) -> str:
    """Write model_dir/inference/ atomically; returns its path."""
    if not bool(model.is_calibrated):
        raise UadkitError("export: the model is not trained/calibrated")
    model = model.cpu().eval()
    final = os.path.join(os.path.abspath(model_dir), "inference")
    tmp = tempfile.mkdtemp(prefix=".inference.tmp-", dir=os.path.abspath(model_dir))
    try:
        h, w = model.input_size
        outputs = model.graph_outputs()
        dummy = torch.rand(2, 3, h, w)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # eval() on the wrapper too: the exporter traces in the top module's mode, and a training-mode
            # trace would use batch statistics in BatchNorm (and update the running ones).
            torch.onnx.export(_Scoring(model).eval(), (dummy,), os.path.join(tmp, "model.onnx"), input_names=["images"],
                              output_names=outputs, opset_version=opset, dynamo=False,
                              # no folding: it would store PatchCore's bank twice (as is and transposed);
                              # ONNX Runtime folds constants itself when it loads the graph
                              do_constant_folding=False,
                              dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}})
        info: dict[str, Any] = {
            "model": model.name, "uadkit_version": __version__, "input_size": list(model.input_size),
            "input": "float32 RGB (batch, 3, height, width) in [0, 1]; normalisation is inside the graph",
            "outputs": outputs, "opset": opset, "graph_version": type(model).graph_version,
            "calibration": {k: float(v) for k, v in zip(CALIBRATION_KEYS, model.calibration)},
            "Model": model.cfg,
        }
        head = model.head_state()
        if head:  # a step after the graph (e.g. an approximate search): its tensors, run by the model's `finish`
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, os.path.join(tmp, HEAD))
            info["head"] = HEAD
        # every exported runtime's artefact, built from this graph, side by side
        from ..runtimes import RUNTIMES

        artefacts = {}
        for spec in RUNTIMES.values():
            if spec.artefact == "model.onnx":
                artefacts[spec.name] = spec.artefact
            elif spec.build is not None:
                built = spec.build(os.path.join(tmp, "model.onnx"), tmp)
                if built:
                    artefacts[spec.name] = built
        info["artefacts"] = artefacts
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


def stale_export(model_dir: str, model_cls: type[AnomalyModel]) -> int | None:
    """The graph version of an export older than the model class's formulation, else None (none exported yet,
    current, or unreadable: a runtime that loads it reports that)."""
    try:
        with open(os.path.join(model_dir, "inference", "inference.yml"), encoding="utf-8") as f:
            info = yaml.safe_load(f)
        old = int(info.get("graph_version", 1))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None
    return old if old < model_cls.graph_version else None


def refresh_stale_export(model: AnomalyModel, model_dir: str, opset: int = 17) -> None:
    """Export again a folder whose graph predates the model's formulation: the same results, but e.g. PaDiM's
    einsum graph took 13.5 GB and 3x the time under OpenVINO. Done when a folder is loaded, before anything
    hashes it (the record store's model version). A folder that cannot be written keeps its graph."""
    old = stale_export(model_dir, type(model))
    if old is None:
        return
    device = model.device
    log.info("%s: exported graph version %d is older than %s's %d: exporting it again", model_dir, old, model.name,
             type(model).graph_version)
    try:
        export_onnx(model, model_dir, opset)
    except OSError as e:
        log.warning("%s: could not export the current graph (%s); its older one still gives the same results, "
                    "more slowly: run -o Global.mode=export where the folder is writable", model_dir, e)
    finally:
        model.to(device)


from ..runtimes.onnx import OnnxRuntimeModel as OnnxModel  # noqa: E402  (the name older code imports)

__all__ = ["OUTPUTS", "OnnxModel", "export_onnx", "refresh_stale_export", "stale_export"]
