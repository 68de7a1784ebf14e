"""Train (or fit) a model on an MVTec-layout category and print accuracy and speed.

    python benchmarks/bench_model.py ../shared/data/mvtec_screw --model STFPM -o Train.epochs_iters=50

Prints image AUROC / AUPR, pixel AUROC / AUPRO, fit time, inference images/s at batch 1 and 8 (torch, on
`Global.device`: `-o Global.device=gpu` times training and inference on a GPU), model size on disk and peak
memory (max RSS, and the GPU's peak allocation there). The model is written under --output, never into the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit.api import AnomalyDetector  # noqa: E402
from uadkit.config import load_config  # noqa: E402
from uadkit.data.image_io import list_images, load_image  # noqa: E402
from uadkit.engine.device import machine_info, main_device  # noqa: E402
from uadkit.inference.predictor import score_images  # noqa: E402


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def throughput(model, images: list[np.ndarray], batch: int, device: torch.device, repeats: int = 3) -> float:
    if not images:
        raise SystemExit("bench_model: no test images to time")
    images = images * -(-batch // len(images))  # a data set with fewer images than a batch still fills one
    score_images(model, images[:batch], device, with_raw=False)  # warm-up
    n, t0 = 0, time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(images) - batch + 1, batch):
            score_images(model, images[i:i + batch], device, with_raw=False)
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--model", default="STFPM")
    ap.add_argument("--config", default=None)
    ap.add_argument("--output", default=None)
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--curve", action="store_true",
                    help="also evaluate every checkpoints/epoch_* (set -o Train.save_interval=N) for a learning curve")
    args = ap.parse_args()
    out = args.output or tempfile.mkdtemp(prefix=f"bench_{args.model}_")
    config = args.config or os.path.join(os.path.dirname(__file__), "..", "configs", f"{args.model}.yaml")
    cfg = load_config(config, [f"Global.dataset_dir={args.dataset}", f"Global.output={out}", *args.override])
    det = AnomalyDetector(cfg)
    t0 = time.time()
    tr = det.train()
    wall = time.time() - t0
    ev = det.evaluate()
    curve = []
    if args.curve:
        from uadkit.engine.checkpoint import load_model_dir
        from uadkit.engine.evaluate import evaluate

        ck = os.path.join(out, "checkpoints")
        for name in sorted((d for d in os.listdir(ck) if d.startswith("epoch_")), key=lambda d: int(d[6:])):
            model, _ = load_model_dir(os.path.join(ck, name))
            e = evaluate(model, {**cfg, "Global": {**cfg["Global"], "output": os.path.join(out, "curve", name)}})
            curve.append({"epoch": int(name[6:]), "image_auroc": e["image"]["auroc"],
                          "pixel_auroc": e["pixel"]["auroc"], "pixel_aupro": e["pixel"]["aupro"]})
    imgs = [load_image(p) for p in list_images(os.path.join(args.dataset, "test"))[:16]]
    device = main_device(cfg["Global"]["device"])
    ips1 = throughput(det.model, imgs, 1, device)  # each call waits for its maps (copied to the CPU)
    ips8 = throughput(det.model, imgs, 8, device)
    summary = {
        "model": args.model, "dataset": args.dataset, "overrides": args.override,
        "device": str(device),  # a GPU's name is in machine
        "machine": machine_info(device),
        "image_auroc": ev["image"]["auroc"], "image_aupr": ev["image"]["aupr"],
        "pixel_auroc": ev.get("pixel", {}).get("auroc"), "pixel_aupro": ev.get("pixel", {}).get("aupro"),
        "image_f1_at_threshold": ev["image"]["at_threshold"]["f1"],
        "fit_seconds": tr["fit_seconds"], "train_wall_seconds": round(wall, 1),
        "images_per_s_batch1": round(ips1, 2), "images_per_s_batch8": round(ips8, 2),
        "model_size_mb": round(dir_size(os.path.join(out, "best_model")) / 1e6, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "output": out,
    }
    if device.type == "cuda":
        summary["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if curve:
        summary["curve"] = curve
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
