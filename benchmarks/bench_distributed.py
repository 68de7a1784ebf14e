"""Wall time of STFPM training epochs with 1 vs 2 gloo processes on CPU (same data, same global batch).

    python benchmarks/bench_distributed.py ../shared/data/mvtec_screw --epochs 1

On a 2-core machine little gain is expected: the point of several processes here is correctness; the
speed-up comes with several GPUs or machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit import create_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    out = {}
    for n in (1, 2):
        folder = tempfile.mkdtemp(prefix=f"bench_ddp{n}_")
        t0 = time.time()
        res = create_model("STFPM").train(dataset_dir=args.dataset, output=folder, epochs_iters=args.epochs,
                                          batch_size=args.batch_size, num_processes=n, export=False)
        out[f"{n}_process"] = {"wall_s": round(time.time() - t0, 1), "fit_s": res["fit_seconds"],
                               "train_loss": [h["train_loss"] for h in res["train"]["history"]]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
