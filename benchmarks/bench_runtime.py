"""Every registered runtime (uadkit/runtimes) on trained models: speed end to end, accuracy, memory (CPU).

    python benchmarks/bench_runtime.py out_pc/best_model out_stfpm/best_model --dataset ../shared/data/mvtec_screw

For each model folder and runtime, in a fresh process (so peak memory is that runtime's own):
- `model b1/b8`: images/s of the scoring path on prepared batches, with p50/p99 latency per batch;
- `e2e b1/b8`: images/s of `create_model(model_dir, run_mode).predict(paths)`: decode, resize, model, maps
  upsampled to the original size, result objects (no files written);
- with --dataset: image AUROC, pixel AUROC and AUPRO from the same evaluate code for every runtime;
- the largest difference of the normalised score from torch's, and peak RSS.
Prints one JSON line per row and a Markdown table at the end (the README's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _timed(fn, batches: list, seconds: float) -> tuple[float, float, float]:
    fn(batches[0])  # warm-up
    lat, n, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or not lat:
        for b in batches:
            t = time.perf_counter()
            fn(b)
            lat.append(time.perf_counter() - t)
            n += len(b)
    return n / (time.perf_counter() - t0), 1e3 * float(np.median(lat)), 1e3 * float(np.percentile(lat, 99))


def one(model_dir: str, run_mode: str, images_dir: str, dataset: str | None, seconds: float) -> dict:
    """One model x runtime, in this process."""
    from uadkit.api import create_model
    from uadkit.config import load_config
    from uadkit.data.image_io import list_images, load_image, prepare_image
    from uadkit.engine.checkpoint import load_model_dir
    from uadkit.engine.evaluate import evaluate
    from uadkit.engine.export import refresh_stale_export
    from uadkit.runtimes import load_runtime

    model, _ = load_model_dir(model_dir)
    refresh_stale_export(model, model_dir)  # every row on the graph create_model below would use
    rt = load_runtime(run_mode, model_dir, model)
    paths = list_images(images_dir)[:16]
    x = torch.from_numpy(np.stack([prepare_image(load_image(p), model.input_size) for p in paths]))
    row: dict = {"model": model.name, "run_mode": run_mode, "model_dir": model_dir}
    with torch.no_grad():
        row["max_norm_score_diff"] = float((model.scores(x[:8])[3] - rt.scores(x[:8])[3]).abs().max())
        for bs in (1, 8):
            ips, p50, p99 = _timed(rt.scores, list(x.split(bs)), seconds)
            row[f"model_b{bs}"] = {"img_s": round(ips, 1), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    det = create_model(model_dir=model_dir, run_mode=run_mode)
    for bs in (1, 8):
        groups = [paths[i:i + bs] for i in range(0, len(paths), bs)]
        ips, p50, p99 = _timed(lambda g, bs=bs: list(det.predict(g, batch_size=bs)),
                               groups, seconds)
        row[f"e2e_b{bs}"] = {"img_s": round(ips, 1), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
    if dataset:
        out = tempfile.mkdtemp(prefix="bench_rt_")
        cfg = load_config(None, [f"Global.dataset_dir={dataset}", f"Global.output={out}",
                                 f"Evaluate.run_mode={run_mode}", "Evaluate.num_examples=0"], model_name=model.name)
        cfg["Model"].update(model.cfg)
        ev = evaluate(model, cfg, scorer=rt)
        row.update(image_auroc=ev["image"]["auroc"], pixel_auroc=ev.get("pixel", {}).get("auroc"),
                   pixel_aupro=ev.get("pixel", {}).get("aupro"))
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | runtime | e2e b1 img/s | e2e b8 img/s | model b1 img/s (p50/p99 ms) | model b8 img/s | "
            "image AUROC | pixel AUROC | AUPRO | peak MB | max diff vs torch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['run_mode']} | skipped: {r['skipped']} |")
            continue
        m1 = r["model_b1"]
        lines.append(f"| {r['model']} | {r['run_mode']} | {r['e2e_b1']['img_s']} | {r['e2e_b8']['img_s']} | "
                     f"{m1['img_s']} ({m1['p50_ms']}/{m1['p99_ms']}) | {r['model_b8']['img_s']} | "
                     f"{r.get('image_auroc')} | {r.get('pixel_auroc')} | {r.get('pixel_aupro')} | "
                     f"{r['peak_rss_mb']} | {r['max_norm_score_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--images", default=None, help="images to time (default: <dataset>/test/good)")
    ap.add_argument("--dataset", default=None, help="an MVTec-layout folder: also evaluate every runtime on it")
    ap.add_argument("--runtimes", default=None, help="comma-separated (default: every registered runtime)")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "RUN_MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    images = args.images or (args.dataset and os.path.join(args.dataset, "test", "good"))
    if not images:
        ap.error("give --images or --dataset")
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], images, args.dataset, args.seconds)))
        return
    from uadkit.engine.checkpoint import load_model_dir
    from uadkit.engine.export import export_onnx
    from uadkit.runtimes import RUNTIMES

    rows = []
    for model_dir in args.model_dirs:
        model, _ = load_model_dir(model_dir)
        info = os.path.join(model_dir, "inference", "inference.yml")
        if not os.path.isfile(info) or "artefacts" not in open(info).read():
            export_onnx(model, model_dir)
        for name in (args.runtimes.split(",") if args.runtimes else RUNTIMES):
            cmd = [sys.executable, __file__, model_dir, "--images", images, "--seconds", str(args.seconds),
                   "--one", model_dir, name] + (["--dataset", args.dataset] if args.dataset else [])
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                row = {"model": model.name, "run_mode": name,
                       "skipped": (res.stderr.strip().splitlines() or ["failed"])[-1][:120]}
            else:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    from uadkit.engine.device import machine_info

    print(f"\n{json.dumps(machine_info(torch.device('cpu')))}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
