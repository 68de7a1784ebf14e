"""Images/s of the torch model vs its exported ONNX graph under ONNX Runtime, at batch 1 and 8 (CPU).

    python benchmarks/bench_runtime.py output/best_model --images ../shared/data/mvtec_screw/test/good

Times the scoring path on prepared batches (decode excluded, identical for both), and reports the
largest difference between the two runtimes' normalised scores.
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
from uadkit.engine.export import OnnxModel, export_onnx  # noqa: E402


def rate(scorer, batches: list[torch.Tensor], seconds: float = 8.0) -> float:
    scorer.scores(batches[0])  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            scorer.scores(b)
            n += len(b)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    model, _ = load_model_dir(args.model_dir)
    if not os.path.isfile(os.path.join(args.model_dir, "inference", "model.onnx")):
        export_onnx(model, args.model_dir)
    onnx = OnnxModel(args.model_dir)
    imgs = [load_image(p) for p in list_images(args.images)[:16]]
    x = torch.from_numpy(np.stack([prepare_image(im, model.input_size) for im in imgs]))
    out: dict = {"model": model.name, "model_dir": args.model_dir, "torch_threads": torch.get_num_threads()}
    with torch.no_grad():
        ref = model.scores(x[:8])[3]
        out["max_norm_score_diff"] = float((ref - onnx.scores(x[:8])[3]).abs().max())
        for bs in (1, 8):
            batches = list(x.split(bs))
            out[f"torch_batch{bs}_img_s"] = round(rate(model, batches, args.seconds), 2)
            out[f"onnxruntime_batch{bs}_img_s"] = round(rate(onnx, batches, args.seconds), 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
