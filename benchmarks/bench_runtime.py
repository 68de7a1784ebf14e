"""Images/s of every registered runtime (uadkit/runtimes) on a trained model, at batch 1 and 8 (CPU).

    python benchmarks/bench_runtime.py output/best_model --images ../shared/data/mvtec_screw/test/good

Times the scoring path on prepared batches (decode excluded, identical for all) with p50/p99 latency per
batch, and reports each runtime's largest difference from torch's normalised scores. Accuracy of each
runtime on a data set: `-o Global.mode=evaluate -o Evaluate.run_mode=<runtime>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit.data.image_io import list_images, load_image, prepare_image  # noqa: E402
from uadkit.engine.checkpoint import load_model_dir  # noqa: E402
from uadkit.engine.export import export_onnx  # noqa: E402
from uadkit.errors import UadkitError  # noqa: E402
from uadkit.runtimes import RUNTIMES, load_runtime  # noqa: E402


def timed(scorer, batches: list[torch.Tensor], seconds: float) -> dict[str, float]:
    scorer.scores(batches[0])  # warm-up
    lat, n, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            t = time.perf_counter()
            scorer.scores(b)
            lat.append(time.perf_counter() - t)
            n += len(b)
    return {"img_s": round(n / (time.perf_counter() - t0), 2), "p50_ms": round(1e3 * float(np.median(lat)), 1),
            "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    model, _ = load_model_dir(args.model_dir)
    info = os.path.join(args.model_dir, "inference", "inference.yml")
    if not os.path.isfile(info) or "artefacts" not in open(info).read():
        export_onnx(model, args.model_dir)
    imgs = [load_image(p) for p in list_images(args.images)[:16]]
    x = torch.from_numpy(np.stack([prepare_image(im, model.input_size) for im in imgs]))
    out: dict = {"model": model.name, "model_dir": args.model_dir, "torch_threads": torch.get_num_threads()}
    with torch.no_grad():
        ref = model.scores(x[:8])[3]
        for name in RUNTIMES:
            try:
                rt = load_runtime(name, args.model_dir, model)
            except UadkitError as e:
                out[name] = {"skipped": str(e)}
                continue
            row = {"max_norm_score_diff": float((ref - rt.scores(x[:8])[3]).abs().max())}
            for bs in (1, 8):
                row[f"batch{bs}"] = timed(rt, list(x.split(bs)), args.seconds)
            out[name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
