"""Configuration: a YAML file with sections, `-o Section.key=value` overrides, validation.

The schema is the defaults below plus each model's own `Model`/`Train` defaults. A key that is not in
the schema is an error naming the key (with a suggestion), so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Any

import yaml

from .errors import UadkitError

MODES = ("check_dataset", "train", "evaluate", "predict", "export", "calibrate", "demo")


# One pixel budget for every entry point (CLI, API, pipeline, service), checked from the image header before
# decoding: about 5000 x 5000 px, a 25 MP camera. A prediction costs about 20 bytes of memory per pixel.
DEFAULT_MAX_PIXELS = 25_000_000
ON_ERROR = ("skip", "stop")
# Keys that hold a path or an input: `-o` takes their text verbatim (not YAML), so names such as
# "colon: space.png" or "hash #1.png" stay names. Quoted text loses its quotes; null / empty means None.
PATH_KEYS = {"Predict.input", "Global.dataset_dir", "Global.output", "Model.pretrained_path", "Train.resume_path"}
# Keys whose null is a value of its own although their default is not (epochs or a step budget, either)
NULLABLE_KEYS = {"Train.epochs_iters", "Train.step_budget"}

COMMON: dict[str, dict[str, Any]] = {
    "Global": {
        "model": "STFPM",
        "mode": "train",
        "dataset_dir": None,
        "output": "output",
        "device": "cpu",
        "seed": 42,
        "num_processes": 1,        # CPU: train with N gloo processes (GPUs: one per device in Global.device)
        "dist_timeout_s": 600,     # a collective waiting longer than this fails the job instead of hanging
    },
    "CheckDataset": {
        "convert": {"enable": False, "src_dataset_type": None},
        "split": {"enable": False, "train_percent": None, "val_percent": None},
    },
    "Model": {
        "backbone": "efficientnet_lite0",
        "layers": None,            # backbone stage names; null = the model's default for the backbone
        "input_size": [256, 256],  # height, width
        "pretrained_path": None,   # local ImageNet state_dict instead of the default weight source
        "smoothing_sigma": 4.0,    # Gaussian smoothing of the anomaly map, in input pixels; 0 = off
        # coarse maps past the image border: mean (they continue at their mean, so a border cell weighs as any
        # other) | clamp (border cells held flat to the edge scored up to 1.9x; models saved before 2026-11-27)
        "map_border": "mean",
        # high-resolution images (data/tiling.py): {tile_size: [h, w], stride: [h, w]} in original pixels; each
        # tile is resized to input_size, maps are stitched back at the original size
        "tiling": None,
        "roi": None,               # region inspected: [[x0, y0, x1, y1], ...] in image pixels or a mask image
        # image score inside the region: the model's own rule (Model.image_topk) | max (the rule of models
        # saved before 2026-11-26, whose thresholds were calibrated with it; a saved model without the key)
        "roi_score": "rule",
    },
    "Train": {
        "epochs_iters": 1,
        # optimiser steps to train for, whatever the data set's size: ceil(step_budget / batches per epoch)
        # whole epochs; with epochs_iters also set, the fewer epochs of the two (null = epochs_iters alone)
        "step_budget": None,
        "batch_size": 8,
        "num_workers": 0,
        "val_split": 0.1,          # fraction of good training images held out for calibration
        # The operating point: the share of good parts the stored threshold is meant to flag (see README).
        "calibration": {"false_alarm_rate": 0.05, "estimator": "auto", "out_of_fold": True,
                        "out_of_fold_images": 160, "synthetic_images": 32},
        "resume_path": None,
        "save_interval": 0,        # epochs between extra checkpoints; 0 = only last and best
        "export": True,            # write best_model/inference (ONNX) at the end of training
        "precision": "fp32",       # steps: fp32 | tf32 (GPU) | bf16 | auto (bf16 on CPUs with it); scoring is fp32
    },
    "Evaluate": {"model_dir": None, "batch_size": 8, "num_examples": 6,
                 "run_mode": "torch"},  # any runtime: its accuracy is measured by the same evaluate
    "Predict": {"model_dir": None, "input": None, "batch_size": 1, "threshold": None, "save_images": True,
                # onnxruntime measured faster than torch for every model at equal results (bench_runtime.py)
                "run_mode": "auto", "num_workers": 0,
                "max_pixels": DEFAULT_MAX_PIXELS,  # larger images are refused from their header, before decoding
                "on_error": "skip",                # skip: go on past bad inputs (listed, exit 1) | stop
                # record each decision (serving/records.py) in Predict.db, default Global.output/records/records.db
                "record": False, "db": None},
    "Export": {"model_dir": None, "opset": 17},
    # Re-fit only the thresholds of a trained model from Global.dataset_dir (good images, labelled defects).
    "Calibrate": {"model_dir": None, "false_alarm_rate": None, "batch_size": 8, "db": None},
}


def schema_for(model_name: str) -> dict[str, dict[str, Any]]:
    from .models import model_class

    cls = model_class(model_name)
    schema = copy.deepcopy(COMMON)
    schema["Global"]["model"] = cls.name
    _deep_update(schema["Model"], cls.model_defaults)
    _deep_update(schema["Train"], cls.train_defaults)
    return schema


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UadkitError(f"override '{text}': expected Section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise UadkitError(f"override '{text}': expected Section.key=value")
    if ".".join(parts) in PATH_KEYS or parts[-1] == "model_dir":
        return parts, _path_value(raw)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UadkitError(f"override '{text}': value is not valid YAML ({e})") from e
    return parts, value


def _path_value(raw: str) -> str | None:
    if raw.strip() in ("", "null", "~", "None"):
        return None
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = None
        if isinstance(value, str):
            return value
    return raw


def _lookup_error(schema: dict, parts: list[str]) -> UadkitError:
    node = schema
    for i, p in enumerate(parts):
        if not isinstance(node, dict) or p not in node:
            options = list(node) if isinstance(node, dict) else []
            near = [o for o in options if o.startswith(p)][:1] or difflib.get_close_matches(p, options, n=1, cutoff=0.5)
            hint = f" (did you mean '{'.'.join(parts[:i] + [near[0]])}'?)" if near else ""
            return UadkitError(f"unknown config key '{'.'.join(parts)}'{hint}; "
                               f"known keys here: {', '.join(options)}")
        node = node[p]
    return UadkitError(f"config key '{'.'.join(parts)}' is a section, not a value")


def set_key(cfg: dict, schema: dict, parts: list[str], value: Any) -> None:
    """Set cfg[parts...] = value; a key that is not in the schema is an error naming it."""
    node, snode = cfg, schema
    for p in parts[:-1]:
        if not isinstance(snode, dict) or p not in snode or not isinstance(snode[p], dict):
            raise _lookup_error(schema, parts)
        node, snode = node.setdefault(p, {}), snode[p]
    if parts[-1] not in snode or isinstance(snode[parts[-1]], dict):
        raise _lookup_error(schema, parts)
    node[parts[-1]] = value


def _merge_file(cfg: dict, schema: dict, data: dict, prefix: list[str]) -> None:
    for k, v in data.items():
        sub = schema
        for p in prefix + [k]:
            sub = sub.get(p) if isinstance(sub, dict) else None
        if isinstance(v, dict) and isinstance(sub, dict):
            _merge_file(cfg, schema, v, prefix + [k])
        else:
            set_key(cfg, schema, prefix + [k], v)


def load_config(path: str | None = None, overrides: list[str] | None = None,
                model_name: str | None = None) -> dict[str, Any]:
    """Defaults for the model, then the YAML file, then `Section.key=value` overrides; validated."""
    data: dict[str, Any] = {}
    if path:
        if not os.path.isfile(path):
            raise UadkitError(f"config file '{path}' does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UadkitError(f"config file '{path}' is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise UadkitError(f"config file '{path}': expected sections (Global, Model, Train, ...) at the top level")
    parsed = [parse_override(o) for o in overrides or []]
    # The model decides the schema, so find it first: override > file > argument > default.
    name = model_name or (data.get("Global") or {}).get("model") or "STFPM"
    for parts, value in parsed:
        if parts == ["Global", "model"]:
            name = value
    schema = schema_for(str(name))
    cfg = copy.deepcopy(schema)
    _merge_file(cfg, schema, data, [])
    for parts, value in parsed:
        set_key(cfg, schema, parts, value)
    cfg["Global"]["model"] = schema["Global"]["model"]
    validate(cfg, schema)
    return cfg


def _check_type(key: str, value: Any, default: Any) -> None:
    if value is None and default is not None and key not in NULLABLE_KEYS:  # null would crash a comparison
        raise UadkitError(f"config key '{key}': expected {type(default).__name__}, got null")
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UadkitError(f"config key '{key}': expected {type(default).__name__}, got {value!r}")


def validate(cfg: dict, schema: dict, prefix: str = "") -> None:
    for k, default in schema.items():
        key = f"{prefix}{k}"
        if isinstance(default, dict):
            validate(cfg[k], default, key + ".")
        else:
            _check_type(key, cfg[k], default)
    if prefix:
        return
    g, t, m = cfg["Global"], cfg["Train"], cfg["Model"]
    if g["mode"] not in MODES:
        raise UadkitError(f"config key 'Global.mode': expected one of {', '.join(MODES)}, got {g['mode']!r}")
    for key in ("epochs_iters", "step_budget"):  # null where a model's default is null: the type is checked here
        v = t[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise UadkitError(f"config key 'Train.{key}': expected a positive integer or null, got {v!r}")
    if t["epochs_iters"] is None and t["step_budget"] is None:
        raise UadkitError("config keys 'Train.epochs_iters' and 'Train.step_budget' are both null: set either "
                          "(epochs, or optimiser steps) to say how long to train")
    for key, v in (("Train.batch_size", t["batch_size"]),
                   ("Evaluate.batch_size", cfg["Evaluate"]["batch_size"]),
                   ("Predict.batch_size", cfg["Predict"]["batch_size"]), ("Global.num_processes", g["num_processes"]),
                   ("Calibrate.batch_size", cfg["Calibrate"]["batch_size"])):
        if v is not None and v < 1:
            raise UadkitError(f"config key '{key}': expected a positive integer, got {v}")
    if not 0 <= t["val_split"] < 1:
        raise UadkitError(f"config key 'Train.val_split': expected 0 <= value < 1, got {t['val_split']}")
    size = m["input_size"]
    if len(size) != 2 or not all(isinstance(s, int) and 32 <= s <= 4096 for s in size):
        raise UadkitError(f"config key 'Model.input_size': expected [height, width] integers in 32..4096, got {size}")
    for key, rate in (("Train.calibration.false_alarm_rate", t["calibration"]["false_alarm_rate"]),
                      ("Calibrate.false_alarm_rate", cfg["Calibrate"]["false_alarm_rate"])):
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate < 0.5):
            raise UadkitError(f"config key '{key}': expected a share of good parts in (0, 0.5), e.g. 0.02, got {rate}")
    from .engine.calibration import ESTIMATORS

    if t["calibration"]["estimator"] not in ESTIMATORS:
        raise UadkitError(f"config key 'Train.calibration.estimator': expected one of {', '.join(ESTIMATORS)}, "
                          f"got {t['calibration']['estimator']!r}")
    from .engine.device import PRECISIONS

    if t["precision"] not in PRECISIONS:
        raise UadkitError(f"config key 'Train.precision': expected one of {', '.join(PRECISIONS)}, "
                          f"got {t['precision']!r}")
    if t["calibration"]["out_of_fold_images"] < 5:
        raise UadkitError("config key 'Train.calibration.out_of_fold_images': expected >= 5")
    if t["calibration"]["synthetic_images"] < 0:
        raise UadkitError("config key 'Train.calibration.synthetic_images': expected >= 0 (0 = no check)")
    _check_predict(cfg["Predict"])
    thr = cfg["Predict"]["threshold"]
    if thr is not None and not 0 < thr < 1:
        raise UadkitError(f"config key 'Predict.threshold': expected a normalised score in (0, 1), got {thr}")
    from .backbones import backbone_info
    from .models import model_class

    backbone_info(m["backbone"])
    from .data.tiling import check_roi, check_tiling

    if check_tiling(m["tiling"]) and model_class(g["model"]).position_tied:
        raise UadkitError(f"config key 'Model.tiling': {g['model']} keeps statistics per position, which tiles "
                          "would mix; use PatchCore or STFPM for tiling")
    check_roi(m["roi"])
    model_class(g["model"]).check_config(m)
    model_class(g["model"]).check_train_config(t)
    from .runtimes import RUNTIMES

    for section in ("Predict", "Evaluate"):
        if cfg[section]["run_mode"] not in (*RUNTIMES, "auto"):
            raise UadkitError(f"config key '{section}.run_mode': expected auto or one of {', '.join(RUNTIMES)}, "
                              f"got {cfg[section]['run_mode']!r}")
    dev = str(g["device"])
    if not (dev == "cpu" or dev.startswith(("gpu", "cuda"))):
        raise UadkitError(f"config key 'Global.device': expected cpu, gpu, gpu:0 or gpu:0,1, got {dev!r}")


def _check_predict(p: dict) -> None:
    """Predict keys whose default is null get their types checked here (the generic check skips them)."""
    thr = p["threshold"]
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float))):
        raise UadkitError(f"config key 'Predict.threshold': expected a number in (0, 1) or null, got {thr!r}")
    inp = p["input"]
    if inp is not None and not isinstance(inp, str) and not (
            isinstance(inp, list) and all(isinstance(x, str) for x in inp)):
        raise UadkitError(f"config key 'Predict.input': expected an image, folder or URL (or a list of them), "
                          f"got {inp!r}")
    if p["db"] is not None and not isinstance(p["db"], str):
        raise UadkitError(f"config key 'Predict.db': expected an SQLAlchemy URL, got {p['db']!r}")
    if p["model_dir"] is not None and not isinstance(p["model_dir"], str):
        raise UadkitError(f"config key 'Predict.model_dir': expected a folder, got {p['model_dir']!r}")
    if p["on_error"] not in ON_ERROR:
        raise UadkitError(f"config key 'Predict.on_error': expected one of {', '.join(ON_ERROR)}, "
                          f"got {p['on_error']!r}")
    if p["max_pixels"] < 1:
        raise UadkitError(f"config key 'Predict.max_pixels': expected a positive integer, got {p['max_pixels']}")
    if p["num_workers"] < 0:
        raise UadkitError(f"config key 'Predict.num_workers': expected 0 or more, got {p['num_workers']}")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
