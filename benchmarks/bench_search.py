"""PatchCore's bank search: exact vs approximate indexes on a trained model's real bank and test patches.

    python benchmarks/bench_search.py out_pc/best_model --images ../shared/data/mvtec_screw/test/scratch_head

For each search it prints the time per image (all of an image's patches as one query block), the share of
patches whose true nearest bank row was found, and the mean relative error of the patch distances. The
candidates are what uadkit could use (exact torch, faiss flat, HNSW, IVF); uadkit ships exact and HNSW
(uadkit/models/search.py) because HNSW was the fastest at >= 99.8 % recall here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uadkit.data.image_io import list_images, load_image, prepare_image  # noqa: E402
from uadkit.engine.checkpoint import load_model_dir  # noqa: E402
from uadkit.models.search import nearest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=4, help="images whose patches are the queries")
    ap.add_argument("--dataset", default=None,
                    help="an MVTec-layout folder: also evaluate the model with each shipped search on the same bank")
    args = ap.parse_args()
    import faiss

    model, _ = load_model_dir(args.model_dir)
    bank = model.memory_bank
    x = torch.from_numpy(np.stack([prepare_image(load_image(p), model.input_size)
                                   for p in list_images(args.images)[:args.n]]))
    with torch.no_grad():
        q = model.features(x).reshape(-1, bank.shape[1]).contiguous()
    n_img = len(x)
    print(f"bank {tuple(bank.shape)}, {len(q)} query patches from {n_img} images, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    d0, i0 = nearest(q, bank)
    print(f"{'exact (torch)':28s} {1e3 * (time.perf_counter() - t) / n_img:7.1f} ms/image  recall 1.000")
    d0, i0 = d0[:, 0].numpy(), i0[:, 0].numpy()
    data, qn = bank.numpy().astype(np.float32), q.numpy().astype(np.float32)

    def report(name: str, index, build_s: float) -> None:
        index.search(qn[:100], 1)
        t = time.perf_counter()
        d, i = index.search(qn, 1)
        ms = 1e3 * (time.perf_counter() - t) / n_img
        d = np.sqrt(np.maximum(d[:, 0], 0))
        err = float(np.mean(d / np.maximum(d0, 1e-6) - 1))
        print(f"{name:28s} {ms:7.1f} ms/image  recall {(i[:, 0] == i0).mean():.4f}  mean rel. distance error "
              f"{err:.5f}  (build {build_s:.1f} s)")

    t = time.perf_counter()
    flat = faiss.IndexFlatL2(data.shape[1])
    flat.add(data)
    report("faiss flat", flat, time.perf_counter() - t)
    for m in (16, 32):
        t = time.perf_counter()
        h = faiss.IndexHNSWFlat(data.shape[1], m)
        h.hnsw.efConstruction = 40
        h.add(data)
        build = time.perf_counter() - t
        for ef in (16, 32, 64):
            h.hnsw.efSearch = ef
            report(f"HNSW M={m} ef={ef}", h, build)
    for nlist in (256, 1024):
        t = time.perf_counter()
        iv = faiss.IndexIVFFlat(faiss.IndexFlatL2(data.shape[1]), data.shape[1], nlist)
        iv.train(data)
        iv.add(data)
        build = time.perf_counter() - t
        for probe in (4, 8, 16):
            iv.nprobe = probe
            report(f"IVF lists={nlist} probe={probe}", iv, build)
    if args.dataset:
        accuracy(model, args.dataset)


def accuracy(model, dataset: str) -> None:
    """Image/pixel AUROC and AUPRO of the same bank under each shipped search (thresholds play no part)."""
    import tempfile

    from uadkit.config import load_config
    from uadkit.engine.evaluate import evaluate
    from uadkit.models.search import BankSearch

    print("\nsearch          image AUROC  pixel AUROC  AUPRO   evaluate s")
    for kind, ef in (("exact", 32), ("hnsw", 16), ("hnsw", 32), ("hnsw", 64)):
        model.search = BankSearch(kind, ef)
        cfg = load_config(None, [f"Global.dataset_dir={dataset}", f"Global.output={tempfile.mkdtemp()}",
                                 "Evaluate.num_examples=0"], model_name=model.name)
        cfg["Model"].update(model.cfg)
        t = time.perf_counter()
        ev = evaluate(model, cfg)
        name = kind if kind == "exact" else f"hnsw ef={ef}"
        print(f"{name:15s} {ev['image']['auroc']:.4f}       {ev['pixel']['auroc']:.4f}       "
              f"{ev['pixel']['aupro']:.4f}  {time.perf_counter() - t:.0f}", flush=True)


if __name__ == "__main__":
    main()
