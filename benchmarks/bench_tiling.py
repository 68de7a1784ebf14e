"""PatchCore on high-resolution images: the default resize to Model.input_size vs Model.tiling at full size.

    python benchmarks/bench_tiling.py                          # a generated 1024 px set (make_highres_dataset)
    python benchmarks/bench_tiling.py ../shared/data/mvtec_screw --tile 256 --input 256

Fits PatchCore twice on the same data — once resizing each image to the config's input size, once splitting
it into tiles of --tile px (stride --stride, each tile resized to --input px) — evaluates both with the one
evaluation path (engine/evaluate.py) and prints image AUROC, pixel AUROC, AUPRO, fit time and images/s
(batch 1, CPU, the predictor's own scoring: bench_model.throughput). Without a dataset it generates
make_highres_dataset (fine weave, 8-20 px fibres, knots and specks) under --data, reused when already there;
the defaults (1024 px, 20 training images, tiles of 256 px scored at 256 px: 16 per image) keep the run to a
few minutes on two CPU cores, and `--size 2048` (64 tiles per image) costs about four times as much for the
tiled model. Models are written under --output, never into the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_model import dir_size, throughput  # noqa: E402

from uadkit.api import AnomalyDetector  # noqa: E402
from uadkit.config import load_config  # noqa: E402
from uadkit.data.demo import make_highres_dataset  # noqa: E402
from uadkit.data.image_io import list_images, load_image  # noqa: E402


def highres_data(path: str | None, size: int, n_train: int, n_test_good: int, n_test_defect: int,
                 defect_px: tuple[int, int], seed: int) -> str:
    """The generated set, made once: a later run with the same settings reuses it (default folder: one per
    settings in /tmp), and a folder made with other settings is refused rather than mixed."""
    settings = {"size": size, "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect,
                "defect_px": list(defect_px), "seed": seed}
    path = path or os.path.join(tempfile.gettempdir(), "uadkit_highres_" + "_".join(
        str(v) for v in (size, n_train, n_test_good, n_test_defect, *defect_px, seed)))
    stamp = os.path.join(path, "settings.json")
    if os.path.isfile(stamp):
        if json.load(open(stamp)) == settings:
            return path
        raise SystemExit(f"--data '{path}' holds a set made with other settings ({open(stamp).read()}); "
                         "name another folder")
    if os.path.isdir(path) and os.listdir(path):
        raise SystemExit(f"--data '{path}' exists and was not made by this script; name an empty folder")
    t0 = time.time()
    make_highres_dataset(path, size=size, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect,
                         defect_px=defect_px, seed=seed)
    json.dump(settings, open(stamp, "w"))
    print(f"generated {path} ({size} px, {n_train} train images) in {time.time() - t0:.0f} s", file=sys.stderr)
    return path


# The threshold is not what is compared: skip the synthetic-defect recall estimate and calibrate both variants
# the same way, on the validation split (a tiled model cannot score out of fold), and export nothing.
FIXED = ["Train.calibration.synthetic_images=0", "Train.calibration.out_of_fold=false", "Train.export=false",
         "Evaluate.num_examples=0"]


def run_variant(name: str, dataset: str, config: str, overrides: list[str], out: str,
                images: list) -> dict:
    cfg = load_config(config, [f"Global.dataset_dir={dataset}", f"Global.output={out}", *overrides])
    det = AnomalyDetector(cfg)
    t0 = time.time()
    tr = det.train()
    wall = time.time() - t0
    ev = det.evaluate()
    return {"variant": name, "overrides": overrides,
            "image_auroc": ev["image"]["auroc"], "pixel_auroc": ev.get("pixel", {}).get("auroc"),
            "pixel_aupro": ev.get("pixel", {}).get("aupro"), "image_f1_at_threshold": ev["image"]["at_threshold"]["f1"],
            "fit_seconds": tr["fit_seconds"], "train_wall_seconds": round(wall, 1),
            "images_per_s": round(throughput(det.model, images, 1, repeats=1), 3),
            "model_size_mb": round(dir_size(os.path.join(out, "best_model")) / 1e6, 2), "output": out}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dataset", nargs="?", help="an MVTec-layout category; default: the generated high-res set")
    ap.add_argument("--data", default=None, help="where the generated set goes (default: a folder in /tmp)")
    ap.add_argument("--size", type=int, default=1024, help="generated image side, px")
    ap.add_argument("--n-train", type=int, default=20, help="generated good training images (10%% validation)")
    ap.add_argument("--n-test-good", type=int, default=8)
    ap.add_argument("--n-test-defect", type=int, default=4, help="per defect kind (3 kinds)")
    ap.add_argument("--defect-px", type=int, nargs=2, default=(8, 20))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=256, help="tile side at full resolution, px")
    ap.add_argument("--stride", type=int, default=None, help="tile stride, px (default: the tile: no overlap)")
    ap.add_argument("--input", type=int, default=None, help="Model.input_size each tile is resized to "
                    "(default: the tile: full resolution)")
    ap.add_argument("--config", default=None, help="default: configs/PatchCore.yaml")
    ap.add_argument("--output", default=None)
    ap.add_argument("--throughput-images", type=int, default=4, help="test images timed for images/s")
    ap.add_argument("-o", "--override", action="append", default=[], help="applied to both variants")
    ap.add_argument("--only", choices=("resize", "tiling"), default=None, help="run one variant")
    args = ap.parse_args()

    dataset = args.dataset or highres_data(args.data, args.size, args.n_train, args.n_test_good,
                                           args.n_test_defect, tuple(args.defect_px), args.seed)
    config = args.config or os.path.join(os.path.dirname(__file__), "..", "configs", "PatchCore.yaml")
    out = args.output or tempfile.mkdtemp(prefix="bench_tiling_")
    tile, stride = args.tile, args.stride or args.tile
    inp = args.input or tile
    tiling = f"Model.tiling={{tile_size: [{tile}, {tile}], stride: [{stride}, {stride}]}}"
    variants = {"resize": [*FIXED, *args.override],
                "tiling": [*FIXED, *args.override, tiling, f"Model.input_size=[{inp},{inp}]"]}
    images = [load_image(p) for p in list_images(os.path.join(dataset, "test"))[:args.throughput_images]]
    rows = [run_variant(name, dataset, config, ov, os.path.join(out, name), images)
            for name, ov in variants.items() if args.only in (None, name)]

    first = load_image(list_images(os.path.join(dataset, "test"))[0])
    print(json.dumps({"dataset": dataset, "image_size": list(first.shape[:2]),
                      "torch_threads": torch.get_num_threads(), "results": rows}, indent=2))
    cols = ("variant", "image_auroc", "pixel_auroc", "pixel_aupro", "fit_seconds", "images_per_s")
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
