"""The Python API: `create_model(...)` returns an AnomalyDetector with train / save / predict / evaluate.

It runs the same code as the CLI: both build a config, then call the engine and the predictor.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

from .config import load_config, schema_for, set_key, validate
from .data.formats import load_index
from .engine.checkpoint import load_model_dir, save_model_dir
from .engine.device import main_device
from .engine.distributed import in_torchrun, init_from_env, requested_world, spawn
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
        set_key(cfg, schema, parts, value)  # the config's own setter: same checks and messages as -o
    validate(cfg, schema)
    return cfg


class AnomalyDetector:
    """A model plus its config. Untrained until `train()` or loaded from a model_dir."""

    def __init__(self, cfg: dict[str, Any], model: AnomalyModel | None = None, meta: dict | None = None,
                 model_dir: str | None = None) -> None:
        self.cfg = cfg
        self._model = model
        self.meta = meta or {}
        self.model_dir = model_dir  # where the trained model lives on disk (its exported graph beside it)
        self._runtime = None  # the loaded exported runtime, if Predict.run_mode names one
        self._runtime_mode: str | None = None

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
        from .engine.trainer import seed_everything
        from .engine.trainer import train as run_training

        if dataset_dir is not None:
            overrides["Global.dataset_dir"] = str(dataset_dir)
        cfg = apply_kwargs(self.cfg, overrides, ("Train", "Global", "Model"))
        if not cfg["Global"]["dataset_dir"]:
            raise UadkitError("Global.dataset_dir: no dataset given "
                              "(train(dataset_dir=...) or -o Global.dataset_dir=DIR)")
        self.cfg = cfg
        index = load_index(cfg["Global"]["dataset_dir"], cfg["Train"]["val_split"], cfg["Global"]["seed"])
        require_valid(index)
        world = requested_world(cfg)
        if world == 1 or in_torchrun():
            # Seed, then build: the student's random initial weights are part of what the seed fixes.
            seed_everything(cfg["Global"]["seed"])
            self._model = build_model(self.name, cfg["Model"], pretrained=True)
        if in_torchrun():  # launched by torchrun: this process is one rank of the job
            ctx = init_from_env(cfg)
            result = run_training(self.model, index, cfg, ctx)
            ctx.barrier()
            if not ctx.is_main:
                return {"done_flag": True, "rank": ctx.rank}
        elif world > 1:
            spawn(_train_worker, cfg, world)
            with open(os.path.join(cfg["Global"]["output"], "train_result.json"), encoding="utf-8") as f:
                result = json.load(f)
            self._model, self.meta = load_model_dir(result["models"]["best_model"])
        else:
            result = run_training(self.model, index, cfg)
        self.model_dir, self._runtime = result["models"]["best_model"], None
        return result

    def save(self, path: str) -> str:
        if not self.is_trained:
            raise UadkitError("this model is not trained yet; nothing to save")
        self.model_dir, self._runtime = save_model_dir(self.model, path), None
        return self.model_dir

    def predict(self, inputs: Any, batch_size: int = 1, threshold: float | None = None,
                num_workers: int = 0, on_error: str | None = None,
                max_pixels: int | None = None) -> Iterator[AnomalyResult]:
        """Yield one AnomalyResult per image. Inputs: path, folder, URL, uint8 array, or a list of these.
        `num_workers` > 0 decodes images in loader worker processes (large folders). `on_error` (default
        Predict.on_error, "skip") goes on past bad inputs: the returned PredictRun lists them in `.failures`;
        "stop" raises at the first. Images over `max_pixels` (Predict.max_pixels) are refused unread."""
        p = self.cfg["Predict"]
        return self.predictor(threshold, max_pixels)(inputs, batch_size=batch_size, num_workers=num_workers,
                                                     on_error=on_error or p["on_error"])

    def predictor(self, threshold: float | None = None, max_pixels: int | None = None) -> Predictor:
        if not self.is_trained:
            raise UadkitError(f"this {self.name} model is not trained: call train(dataset_dir=...) first, "
                              "or create_model(model_dir=...) to load a trained one")
        thr = threshold if threshold is not None else self.cfg["Predict"]["threshold"]
        return Predictor(self.scorer(), main_device(self.cfg["Global"]["device"]), thr,
                         max_pixels or self.cfg["Predict"]["max_pixels"])

    def scorer(self):
        """What runs the scoring path for `Predict.run_mode`: the torch model, or an exported artefact
        (exported on first use if the model folder has none)."""
        from .runtimes import resolve_run_mode

        spec = resolve_run_mode(self.cfg["Predict"]["run_mode"], self.model, self.cfg["Global"]["device"])
        if spec.artefact is None:
            return self.model
        if self._runtime is None or self._runtime_mode != spec.name:
            if not self.model_dir:
                raise UadkitError(f"run_mode {spec.name} needs a saved model: train it or load it from a model_dir")
            if not os.path.isfile(os.path.join(self.model_dir, "inference", spec.artefact)):
                from .engine.export import export_onnx

                export_onnx(self.model, self.model_dir, self.cfg["Export"]["opset"])
                self.model.to(main_device(self.cfg["Global"]["device"]))
            self._runtime = spec.load(self.model_dir, self.model, self.cfg["Global"]["device"])
            self._runtime_mode = spec.name
        return self._runtime

    def export(self, opset: int | None = None) -> str:
        """Write <model_dir>/inference/ (ONNX graph + inference.yml); returns the folder."""
        from .engine.export import export_onnx

        if not self.is_trained or not self.model_dir:
            raise UadkitError("export: train or load a model first")
        self._runtime = None
        return export_onnx(self.model, self.model_dir, opset or self.cfg["Export"]["opset"])

    def calibrate(self, dataset_dir: str, false_alarm_rate: float | None = None, **overrides: Any) -> dict[str, Any]:
        """Re-fit only the thresholds and scales from a folder of good images (labelled defects, when present,
        report recall) and rewrite the model folder atomically; returns the before/after report."""
        from .engine.calibrate import recalibrate
        from .engine.checkpoint import load_model_dir

        if not self.is_trained or not self.model_dir:
            raise UadkitError(f"this {self.name} model is not trained and saved: nothing to calibrate")
        overrides["Global.dataset_dir"] = str(dataset_dir)
        overrides["Calibrate.model_dir"] = self.model_dir
        if false_alarm_rate is not None:
            overrides["Calibrate.false_alarm_rate"] = false_alarm_rate
        result = recalibrate(apply_kwargs(self.cfg, overrides, ("Calibrate", "Global")))
        self._model, self.meta = load_model_dir(self.model_dir)
        self._model.to(main_device(self.cfg["Global"]["device"]))
        self._runtime = None
        return result

    def evaluate(self, dataset_dir: str | None = None, **overrides: Any) -> dict[str, Any]:
        from .engine.evaluate import evaluate

        if dataset_dir is not None:
            overrides["Global.dataset_dir"] = str(dataset_dir)
        cfg = apply_kwargs(self.cfg, overrides, ("Evaluate", "Global"))
        if not self.is_trained:
            raise UadkitError(f"this {self.name} model is not trained; nothing to evaluate")
        from .runtimes import load_runtime

        return evaluate(self.model, cfg, load_runtime(cfg["Evaluate"]["run_mode"], self.model_dir, self.model,
                                                      cfg["Global"]["device"]))


def _train_worker(cfg: dict[str, Any], ctx) -> None:
    """One spawned rank: build its own model copy and data index, then join the shared trainer."""
    from .data.formats import load_index
    from .engine.trainer import seed_everything, train

    seed_everything(cfg["Global"]["seed"])
    model = build_model(cfg["Global"]["model"], cfg["Model"], pretrained=True)
    index = load_index(cfg["Global"]["dataset_dir"], cfg["Train"]["val_split"], cfg["Global"]["seed"])
    train(model, index, cfg, ctx)
    ctx.barrier()


def create_model(model_name: str | None = None, model_dir: str | None = None, config: str | None = None,
                 device: str | None = None, run_mode: str | None = None, **overrides: Any) -> AnomalyDetector:
    """`create_model("STFPM")` for a new model; `create_model(model_dir="output/best_model")` for a trained one.

    `config` is a YAML file; `overrides` are `Section.key` (or plain key) settings, e.g. backbone="resnet18".
    `run_mode="onnxruntime"` predicts with the exported ONNX graph (exported on first use if missing).
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
        return create_model(model_dir=model_name, config=config, device=device, run_mode=run_mode, **overrides)
    cfg = load_config(config, [], model_name=model_name)
    if model is not None:
        cfg["Model"].update(model.cfg)
    if device is not None:
        overrides["Global.device"] = device
    if run_mode is not None:
        overrides["Predict.run_mode"] = run_mode
    cfg = apply_kwargs(cfg, overrides, ("Model", "Global", "Train", "Predict"))
    if model is not None:
        from .engine.export import refresh_stale_export

        refresh_stale_export(model, model_dir, cfg["Export"]["opset"])
        if model.device.type == "cpu":
            model = model.to(main_device(cfg["Global"]["device"]))
    return AnomalyDetector(cfg, model, meta, model_dir)
