"""Command line, PaddleX style: `uadkit -c configs/STFPM.yaml -o Global.mode=train -o Section.key=value`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import __version__
from .config import load_config
from .errors import UadkitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uadkit", description="Unsupervised visual anomaly detection (train on good images only).",
        epilog="modes: check_dataset, train, evaluate, predict, export, calibrate, demo.  "
               "Example: uadkit -c configs/STFPM.yaml -o Global.mode=train -o Global.dataset_dir=DIR")
    p.add_argument("-c", "--config", help="YAML config file (e.g. configs/STFPM.yaml)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                   help="override a config value (repeatable); values are YAML-typed")
    p.add_argument("--version", action="version", version=f"uadkit {__version__}")
    g = p.add_argument_group("pipeline and service")
    g.add_argument("--pipeline", help="run a pipeline: 'anomaly_detection' or a pipeline YAML file")
    g.add_argument("--input", help="image, folder or URL for --pipeline")
    g.add_argument("--model_dir", help="trained model folder for --pipeline / --serve")
    g.add_argument("--save_path", default="output/pipeline", help="where --pipeline writes results")
    g.add_argument("--serve", action="store_true", help="serve the pipeline over HTTP (with a web page)")
    g.add_argument("--host", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default 8080)")
    g.add_argument("--allow-url-fetch", action="store_true",
                   help="let requests name http(s) image URLs (only hosts given with --url-allow-host)")
    g.add_argument("--url-allow-host", action="append", default=[], metavar="HOST[:PORT]")
    g.add_argument("--db", metavar="URL", help="record store, an SQLAlchemy URL: sqlite:///FILE (default: "
                   "records.db in --records-dir) or postgresql://USER@HOST/DB")
    g.add_argument("--records-dir", help="folder of the default database and the stored images (output/records)")
    g.add_argument("--token", help="token for the review page and write endpoints (or UADKIT_TOKEN); needed "
                   "when --host is not loopback")
    return p


def run_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import AnomalyDetectionPipeline, load_pipeline_config

    cfg = load_pipeline_config(args.pipeline or "anomaly_detection")
    if args.model_dir:
        cfg["SubModules"]["AnomalyDetection"]["model_dir"] = args.model_dir
    if args.allow_url_fetch:
        cfg["Serving"]["allow_url_fetch"] = True
    cfg["Serving"]["url_allow_hosts"] = list(cfg["Serving"]["url_allow_hosts"]) + args.url_allow_host
    for key, value in (("db", args.db), ("records_dir", args.records_dir), ("token", args.token)):
        if value:
            cfg["Serving"][key] = value
    if args.serve:
        _require_serve_extra()  # before the model loads: a missing extra is one line, not a traceback
    elif not args.input:
        raise UadkitError("--pipeline needs --input IMG_OR_DIR (or --serve)")
    pipe = AnomalyDetectionPipeline(cfg)
    if args.serve:
        from .serving.app import serve

        serve(pipe, args.host, args.port)
        return 0
    summary = []
    run = pipe.predict(args.input)
    for item in run.outcomes():
        summary.append(_report(item, args.save_path, True, single=run.n_inputs == 1))
    return _predict_status(summary, "above")


def _require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UadkitError(f"--serve needs the 'serve' extra ({e.name or 'fastapi'} is not installed): "
                          "pip install -e .[serve]  (scripts/setup.sh installs it)") from e


def _model_dir(cfg: dict, section: str) -> str:
    return cfg[section]["model_dir"] or os.path.join(cfg["Global"]["output"], "best_model")


def run_check_dataset(cfg: dict) -> int:
    from .data.check_report import check_dataset

    report = check_dataset(cfg)
    return 0 if report["check_pass"] else 1


def run_train(cfg: dict) -> dict[str, Any]:
    from .api import AnomalyDetector

    return AnomalyDetector(cfg).train()


def run_evaluate(cfg: dict) -> dict[str, Any]:
    from .engine.checkpoint import load_model_dir
    from .engine.evaluate import evaluate
    from .engine.export import refresh_stale_export
    from .runtimes import load_runtime

    model_dir = _model_dir(cfg, "Evaluate")
    model, _ = load_model_dir(model_dir)
    refresh_stale_export(model, model_dir, cfg["Export"]["opset"])
    return evaluate(model, cfg, load_runtime(cfg["Evaluate"]["run_mode"], model_dir, model, cfg["Global"]["device"]))


def _predict_shard(cfg: dict, ctx) -> list[dict[str, Any]] | None:
    """Predict this process's share of the inputs (every world-th); rank 0 returns all, in input order."""
    from .api import create_model
    from .data.image_io import resolve_sources
    from .engine.distributed import SINGLE

    ctx = ctx or SINGLE
    p = cfg["Predict"]
    device = str(ctx.device) if ctx.active and ctx.device.type == "cuda" else cfg["Global"]["device"]
    det = create_model(model_dir=_model_dir(cfg, "Predict"), device=device.replace("cuda", "gpu"),
                       run_mode=p["run_mode"])
    sources = resolve_sources(p["input"], p["max_pixels"])
    mine = [sources[i] for i in ctx.shard(list(range(len(sources))))]
    out = os.path.join(cfg["Global"]["output"], "predict")
    summary: list[dict[str, Any]] = []
    store, version = None, ""
    if p["record"]:  # one record store per process: PostgreSQL or SQLite (WAL) take the writers in turn
        from .serving import records

        store = records.open_store(p["db"], os.path.join(cfg["Global"]["output"], "records"))
        version = records.model_version(_model_dir(cfg, "Predict"))
    run = det.predict(mine, batch_size=p["batch_size"], threshold=p["threshold"], num_workers=p["num_workers"],
                      on_error=p["on_error"], max_pixels=p["max_pixels"]) if mine else None
    try:
        for item in run.outcomes() if run else []:
            summary.append(_report(item, out, p["save_images"], single=len(sources) == 1, quiet=ctx.active))
            if store and "error" not in summary[-1]:
                store.add(_pending(item, det.name, version))
    except UadkitError:
        if run and run.failures and not ctx.active:  # on_error=stop: keep what was done, then stop
            summary.append(_failure_entry(run.failures[-1]))
            _write_summary(cfg, summary)
        raise
    finally:
        if store:
            store.close()  # writes what is queued
            st = store.stats()
            if st["failed"] or st["dropped"]:
                print(f"uadkit: warning: {st['failed'] + st['dropped']} decisions not recorded ({st['last_error']})",
                      file=sys.stderr)
    if not ctx.active:
        return summary
    import torch.distributed as dist

    parts = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(summary, parts, dst=0)
    if not ctx.is_main:
        return None
    merged: list[Any] = [None] * len(sources)
    for r, part in enumerate(parts):
        merged[r::ctx.world] = part
    _write_summary(cfg, merged)
    return merged


def _pending(res, model_name: str, version: str):
    """The record of one predicted file: its hash is of the file's bytes, as the service hashes uploads."""
    import hashlib

    from .serving.records import pending_from_result

    path = str(res["input_path"])
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:  # a URL
        import numpy as np

        digest = hashlib.sha256(np.ascontiguousarray(res._image).tobytes()).hexdigest()
    return pending_from_result(res, path, digest, model_name, version)


def _failure_entry(f) -> dict[str, Any]:
    return {"input_path": f.input_path, "pred_score": None, "pred_label": "error", "raw_score": None,
            "error": f.error}


def _report(item, out: str, save_images: bool, single: bool, quiet: bool = False) -> dict[str, Any]:
    """Print and save one outcome; returns its predict_result.json entry. A failure is one line on stderr."""
    from .inference.predictor import PredictFailure

    if isinstance(item, PredictFailure):
        print(f"uadkit: {'error' if single else 'skipped'}: {item.error}", file=sys.stderr, flush=True)
        return _failure_entry(item)
    if not quiet:
        item.print(json_format=False)
    try:
        if save_images:
            item.save_to_img(out)
        item.save_to_json(out)
    except OSError as e:
        raise UadkitError(f"{out}: cannot write the results of {item['input_path']} ({e.strerror or e})") from e
    return {k: item[k] for k in ("input_path", "pred_score", "pred_label", "raw_score")}


def _predict_status(summary: list[dict[str, Any]], listed: str) -> int:
    """0: all predicted; 1: some inputs failed (listed); 2: none could be predicted."""
    failed = sum(1 for s in summary if s.get("error"))
    if failed and failed == len(summary) > 1:
        print(f"uadkit: error: none of the {failed} inputs could be predicted (listed {listed})", file=sys.stderr)
    return 0 if not failed else 2 if failed == len(summary) else 1


def _write_summary(cfg: dict, summary: list[dict[str, Any]]) -> None:
    from .data.image_io import write_text_atomic

    out = os.path.join(cfg["Global"]["output"], "predict")
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "predict_result.json"), json.dumps(summary, indent=2))
    n_bad = sum(s["pred_label"] == "anomalous" for s in summary)
    n_failed = sum(1 for s in summary if s.get("error"))
    failed = f", {n_failed} failed (listed in predict_result.json)" if n_failed else ""
    print(f"{len(summary)} images, {n_bad} anomalous{failed}; results in {out}")


def run_predict(cfg: dict, inputs: Any = None) -> list[dict[str, Any]]:
    """Predict Predict.input; returns the predict_result.json entries (failures carry an "error")."""
    from .engine.distributed import in_torchrun, init_from_env, requested_world, spawn

    p = cfg["Predict"]
    if inputs is not None:
        p["input"] = inputs
    if not p["input"]:
        raise UadkitError("Predict.input: no input given (an image, folder or URL)")
    if in_torchrun():
        ctx = init_from_env(cfg)
        summary = _predict_shard(cfg, ctx)
    elif requested_world(cfg) > 1:  # shard the inputs over N processes / devices
        _refresh_once(cfg)
        spawn(_predict_shard, cfg, requested_world(cfg))
        with open(os.path.join(cfg["Global"]["output"], "predict", "predict_result.json"), encoding="utf-8") as f:
            summary = json.load(f)
    else:
        summary = _predict_shard(cfg, None)
        _write_summary(cfg, summary)
    return summary or []


def _refresh_once(cfg: dict) -> None:
    """An outdated export is rewritten here, once, not by every worker at the same time."""
    from .engine.checkpoint import read_metadata
    from .engine.export import stale_export
    from .models import MODELS

    model_dir = _model_dir(cfg, "Predict")
    name = read_metadata(model_dir)["model"]  # a bad folder: its one-line error, before any worker starts
    if name in MODELS and stale_export(model_dir, MODELS[name]) is not None:
        from .api import create_model

        create_model(model_dir=model_dir)  # loading a folder exports it again


def run_calibrate(cfg: dict) -> dict[str, Any]:
    """Re-fit only the thresholds of a trained model from Global.dataset_dir; writes calibrate_result.json."""
    from .data.image_io import write_text_atomic
    from .engine.calibrate import recalibrate
    from .engine.trainer import setup_logging

    setup_logging(None)
    result = recalibrate(cfg)
    os.makedirs(cfg["Global"]["output"], exist_ok=True)
    write_text_atomic(os.path.join(cfg["Global"]["output"], "calibrate_result.json"), json.dumps(result, indent=2))
    return result


def run_export(cfg: dict) -> str:
    from .api import create_model

    det = create_model(model_dir=_model_dir(cfg, "Export"))
    path = det.export(cfg["Export"]["opset"])
    print(f"exported {det.name} to {path}")
    return path


def run_demo(cfg: dict) -> None:
    """The main job on the embedded default: make demo data, train, evaluate, predict."""
    from .data.demo import make_demo_dataset

    g = cfg["Global"]
    if not g["dataset_dir"]:
        g["dataset_dir"] = os.path.join(g["output"], "demo_data")
        if not os.path.isdir(os.path.join(g["dataset_dir"], "train", "good")):
            print(f"making a demo dataset in {g['dataset_dir']}")
            make_demo_dataset(g["dataset_dir"], n_val=24)
    run_train(cfg)
    run_evaluate(cfg)
    run_predict(cfg, os.path.join(g["dataset_dir"], "test"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not valid UTF-8 print escaped, not crash
        sys.stdout.reconfigure(errors="backslashreplace")
    from .data.image_io import quiet_pil_warnings

    quiet_pil_warnings()
    try:
        if args.pipeline or args.serve:
            return run_pipeline(args)
        cfg = load_config(args.config, args.override)
        if args.db:
            cfg["Predict"]["db"] = args.db
        mode = cfg["Global"]["mode"]
        if mode == "check_dataset":
            return run_check_dataset(cfg)
        if mode == "predict":
            out = os.path.join(cfg["Global"]["output"], "predict", "predict_result.json")
            return _predict_status(run_predict(cfg), f"in {out}")
        {"train": run_train, "evaluate": run_evaluate, "predict": run_predict, "export": run_export,
         "calibrate": run_calibrate, "demo": run_demo}[mode](cfg)
        return 0
    except UadkitError as e:
        print(f"uadkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uadkit: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
