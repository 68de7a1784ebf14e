"""Pipelines: a YAML that names the models to run; `create_pipeline("anomaly_detection", model_dir=...)`."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import yaml

from .config import DEFAULT_MAX_PIXELS
from .errors import UadkitError

if TYPE_CHECKING:
    from .inference.predictor import PredictRun

PIPELINES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pipelines")
DEFAULTS: dict[str, Any] = {
    "pipeline_name": "anomaly_detection",
    "SubModules": {"AnomalyDetection": {"model_dir": None, "batch_size": 1, "run_mode": "auto",
                                        "threshold": None, "device": "cpu"}},
    "Serving": {"host": "127.0.0.1", "port": 8080, "max_body_mb": 20, "max_pixels": DEFAULT_MAX_PIXELS,
                "decode_timeout_s": 10, "max_batch": 8, "batch_wait_ms": 5, "allow_url_fetch": False,
                "url_allow_hosts": [], "url_timeout_s": 10, "url_max_mb": 20,
                "header_timeout_s": 10, "body_timeout_s": 30, "max_connections": 64,
                "max_pending_pixels": 2 * DEFAULT_MAX_PIXELS, "max_answer_pixels": 2048 * 2048,
                # the record of every decision (serving/records.py): db "" = records.db in records_dir;
                # keep_records / keep_days: retention (0 = no limit); token: for the history off loopback;
                # record_images: keep each image as received too (disk!), for "export reviewed" as a dataset
                "record": True, "db": "", "records_dir": "output/records", "keep_records": 100000,
                "keep_days": 0, "token": "", "require_token": False, "record_images": False},
}


def load_pipeline_config(name_or_path: str) -> dict[str, Any]:
    path = name_or_path if name_or_path.endswith((".yaml", ".yml")) else os.path.join(
        PIPELINES_DIR, f"{name_or_path}.yaml")
    cfg = copy.deepcopy(DEFAULTS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for section, values in data.items():
            if section not in cfg:
                raise UadkitError(f"{path}: unknown pipeline section '{section}'; expected {', '.join(cfg)}")
            if isinstance(values, dict):
                for k, v in values.items():
                    target = cfg[section]
                    if k not in target:
                        raise UadkitError(f"{path}: unknown key '{section}.{k}'")
                    if isinstance(v, dict):
                        unknown = set(v) - set(target[k])
                        if unknown:
                            raise UadkitError(f"{path}: unknown keys {sorted(unknown)} in '{section}.{k}'")
                        target[k].update(v)
                    else:
                        target[k] = v
            else:
                cfg[section] = values
    elif name_or_path != "anomaly_detection":
        raise UadkitError(f"unknown pipeline '{name_or_path}': expected 'anomaly_detection' or a pipeline YAML file")
    if cfg["pipeline_name"] != "anomaly_detection":
        raise UadkitError(f"pipeline_name: only 'anomaly_detection' exists, got {cfg['pipeline_name']!r}")
    for section in ("SubModules", "Serving"):
        if not isinstance(cfg[section], dict):
            raise UadkitError(f"{path}: '{section}' must be a mapping")
    for k, default in DEFAULTS["Serving"].items():  # a limit of the wrong type fails here, not mid-request
        v = cfg["Serving"][k]
        if isinstance(default, (bool, str, list)):
            ok, want = isinstance(v, type(default)), type(default).__name__
        else:  # sizes, limits, timeouts
            low = 1 if k.startswith("max_") or k == "port" else 0
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= low, f"a number >= {low}"
        if not ok:
            raise UadkitError(f"{path}: 'Serving.{k}' expected {want}, got {v!r}")
    return cfg


class AnomalyDetectionPipeline:
    """Runs the anomaly detection model on any inputs and yields the same AnomalyResult objects."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from .api import create_model

        sub = cfg["SubModules"]["AnomalyDetection"]
        if not sub["model_dir"]:
            raise UadkitError("pipeline: SubModules.AnomalyDetection.model_dir is not set (--model_dir DIR)")
        self.cfg = cfg
        self.detector = create_model(model_dir=sub["model_dir"], device=sub["device"], run_mode=sub["run_mode"])
        self.batch_size = int(sub["batch_size"])
        self.threshold = sub["threshold"]

    def predict(self, inputs: Any, batch_size: int | None = None) -> PredictRun:
        """Results in input order (bad inputs skipped and listed in `.failures`, as the model's predict)."""
        return self.detector.predict(inputs, batch_size=batch_size or self.batch_size, threshold=self.threshold,
                                     max_pixels=int(self.cfg["Serving"]["max_pixels"]))

    __call__ = predict


def create_pipeline(pipeline: str = "anomaly_detection", model_dir: str | None = None, **sub_overrides: Any):
    """`create_pipeline("anomaly_detection", model_dir="output/best_model")` or a pipeline YAML path."""
    cfg = load_pipeline_config(pipeline)
    sub = cfg["SubModules"]["AnomalyDetection"]
    if model_dir is not None:
        sub["model_dir"] = str(model_dir)
    for k, v in sub_overrides.items():
        if k not in sub:
            raise UadkitError(f"create_pipeline: unknown setting '{k}'; expected one of {', '.join(sub)}")
        sub[k] = v
    return AnomalyDetectionPipeline(cfg)
