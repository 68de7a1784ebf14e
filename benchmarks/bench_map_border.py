"""One trained folder scored with each `Model.map_border` (the README's table "Maps at the image border").

    python benchmarks/bench_map_border.py output/best_model ../shared/data/mvtec_screw

The same weights, evaluated by the shared `evaluate` with coarse maps clamped at the image border (the maps
before 2026-11-27) and continued at their mean (the default since): image AUROC, pixel AUROC, AUPRO, and how
many good test images have their highest pixel within 1/16 of the image size of the border (16 px at 256;
where the clamped maps put it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit.config import load_config  # noqa: E402
from uadkit.data.formats import load_index  # noqa: E402
from uadkit.engine.calibrate import collect_scores  # noqa: E402
from uadkit.engine.checkpoint import load_model_dir  # noqa: E402
from uadkit.engine.evaluate import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("dataset")
    args = ap.parse_args()
    model, meta = load_model_dir(args.model_dir)
    cfg = load_config(None, [f"Global.model={meta['model']}", f"Global.dataset_dir={args.dataset}",
                             f"Global.output={tempfile.mkdtemp()}"])
    goods = [s for s in load_index(args.dataset, cfg["Train"]["val_split"], cfg["Global"]["seed"]).test
             if not s.label]
    lines = [f"{meta['model']} {args.model_dir} on {args.dataset} ({len(goods)} good test images)"]
    for border in ("clamp", "mean"):
        model.map_border = border
        res = evaluate(model, cfg)
        *_, maps, _ = collect_scores(model, goods, torch.device("cpu"), 8, "good maps", keep_maps=True)
        near = 0
        for m in maps:
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            near += min(y, x, m.shape[0] - 1 - y, m.shape[1] - 1 - x) < max(m.shape) / 16
        px = res.get("pixel", {})
        lines.append(f"  {border:5}  image AUROC {res['image']['auroc']}  pixel AUROC {px.get('auroc')}  "
                     f"AUPRO {px.get('aupro')}  good maxima near the border {near}/{len(goods)}")
    print("\n".join(lines))  # after evaluate's own reports


if __name__ == "__main__":
    main()
