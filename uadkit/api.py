"""The Python API: `create_model(...)` returns an AnomalyDetector with train / save / predict / evaluate.

It runs the same code as the CLI: both build a config, then call the engine and the predictor.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

from .config import load_config, schema_for, validate
from .data.formats import load_index
from .engine.checkpoint import load_model_dir, save_model_dir
from .engine.device import main_device
from .errors import UadkitError
from .inference.predictor import Predictor
from .inference.result import AnomalyResult
from .models import AnomalyModel, build_model


def apply_kwargs(cfg: dict, kwargs: dict[str, Any], prefer: tuple[str, ...]) -> dict:
    """Set `Section.key` or plain `key` entries; a plain key goes to the first preferred section holding it."""
    cfg = copy.deepcopy(cfg)
    schema = schema_for(cfg["Global"]["model"])
    for key, value in kwargs.items():
        if "." in key:
            parts = key.split(".")
        else:
            owners = [s for s in prefer if key in schema[s]] or [s for s in schema if key in schema[s]]
            if not owners:
                raise UadkitError(f"unknown setting '{key}'; use Section.key names from the config "
                                  f"({', '.join(schema)})")
            parts = [owners[0], key]
        node = cfg
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise UadkitError(f"unknown setting '{key}'")
            node = node[p]
        if parts[-1] not in node:
            raise UadkitError(f"unknown setting '{key}'")
        node[parts[-1]] = value
    validate(cfg, schema)
    return cfg


class AnomalyDetector:
    """A model plus its config. Untrained until `train()` or loaded from a model_dir."""

    def __init__(self, cfg: dict[str, Any], model: AnomalyModel | None = None, meta: dict | None = None) -> None:
        self.cfg = cfg
        self._model = model
        self.meta = meta or {}

    @property
    def name(self) -> str:
        return self.cfg["Global"]["model"]

    @property
    def model(self) -> AnomalyModel:
        if self._model is None:
            self._model = build_model(self.name, self.cfg["Model"], pretrained=True)
        return self._model

    @property
    def is_trained(self) -> bool:
        return self._model is not None and bool(self._model.is_calibrated)

    def train(self, dataset_dir: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Train (or fit) on `dataset_dir`, calibrate, save `<output>/best_model`; returns train_result."""
        from .data.check import require_valid
        from .engine.trainer import train as run_training

        if dataset_dir is not None:
            overrides["Global.dataset_dir"] = str(dataset_dir)
        cfg = apply_kwargs(self.cfg, overrides, ("Train", "Global", "Model"))
        if not cfg["Global"]["dataset_dir"]:
            raise UadkitError("Global.dataset_dir: no dataset given "
                              "(train(dataset_dir=...) or -o Global.dataset_dir=DIR)")
        if cfg["Model"] != self.cfg["Model"] or self._model is None or self.is_trained:
            self._model = build_model(self.name, cfg["Model"], pretrained=True)
        self.cfg = cfg
        index = load_index(cfg["Global"]["dataset_dir"], cfg["Train"]["val_split"], cfg["Global"]["seed"])
        require_valid(index)
        return run_training(self.model, index, cfg)

    def save(self, path: str) -> str:
        if not self.is_trained:
            raise UadkitError("this model is not trained yet; nothing to save")
        return save_model_dir(self.model, path)

    def predict(self, inputs: Any, batch_size: int = 1, threshold: float | None = None) -> Iterator[AnomalyResult]:
        """Yield one AnomalyResult per image. Inputs: path, folder, URL, uint8 array, or a list of these."""
        if not self.is_trained:
            raise UadkitError(f"this {self.name} model is not trained: call train(dataset_dir=...) first, "
                              "or create_model(model_dir=...) to load a trained one")
        thr = threshold if threshold is not None else self.cfg["Predict"]["threshold"]
        device = main_device(self.cfg["Global"]["device"])
        return Predictor(self.model, device, thr)(inputs, batch_size=batch_size)

    def evaluate(self, dataset_dir: str | None = None, **overrides: Any) -> dict[str, Any]:
        from .engine.evaluate import evaluate

        if dataset_dir is not None:
            overrides["Global.dataset_dir"] = str(dataset_dir)
        cfg = apply_kwargs(self.cfg, overrides, ("Evaluate", "Global"))
        if not self.is_trained:
            raise UadkitError(f"this {self.name} model is not trained; nothing to evaluate")
        return evaluate(self.model, cfg)


def create_model(model_name: str | None = None, model_dir: str | None = None, config: str | None = None,
                 device: str | None = None, **overrides: Any) -> AnomalyDetector:
    """`create_model("STFPM")` for a new model; `create_model(model_dir="output/best_model")` for a trained one.

    `config` is a YAML file; `overrides` are `Section.key` (or plain key) settings, e.g. backbone="resnet18".
    """
    model, meta = None, None
    if model_dir is not None:
        model_dir = str(model_dir)
        if not os.path.isdir(model_dir) and model_name and os.path.isdir(model_name):
            model_name, model_dir = None, model_name
        model, meta = load_model_dir(model_dir)
        if model_name and model_name.lower() != model.name.lower():
            raise UadkitError(f"model_dir '{model_dir}' holds a {model.name} model, not {model_name}")
        model_name = model.name
    elif model_name and os.path.isdir(model_name):  # create_model("output/best_model")
        return create_model(model_dir=model_name, config=config, device=device, **overrides)
    cfg = load_config(config, [], model_name=model_name)
    if model is not None:
        cfg["Model"].update(model.cfg)
    if device is not None:
        overrides["Global.device"] = device
    cfg = apply_kwargs(cfg, overrides, ("Model", "Global", "Train", "Predict"))
    if model is not None and model.device.type == "cpu":
        model = model.to(main_device(cfg["Global"]["device"]))
    return AnomalyDetector(cfg, model, meta)
