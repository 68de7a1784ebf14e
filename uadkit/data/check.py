"""check_dataset: every file decodes, masks match their images, no train/test duplicates, enough images.

A failing check lists every problem (file and reason); training refuses a dataset that fails it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UadkitError
from .formats import DatasetIndex, Sample

MIN_TRAIN = 2


def _probe(path: str) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """(width, height), sha1 of the bytes, and an error message if the file does not decode."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, None, f"cannot be read ({e.strerror})"
    if not data:
        return None, None, "empty file"
    try:
        import io

        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
    except Exception as e:
        return None, None, f"does not decode as an image ({type(e).__name__}: {e})"
    return size, hashlib.sha1(data).hexdigest(), None


def check_index(index: DatasetIndex, progress: bool = True) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    sizes: list[tuple[int, int]] = []
    hashes: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}
    splits = {"train": index.train, "val": index.val, "test": index.test}
    todo = [(name, s) for name, samples in splits.items() for s in samples]
    bar = tqdm(todo, desc="checking", unit="img", disable=None if progress else True, leave=False, dynamic_ncols=True)
    for split, s in bar:
        size, digest, err = _probe(s.path)
        if err:
            problems.append({"file": s.path, "problem": err})
            continue
        sizes.append(size)
        hashes[split][digest] = s.path
        if s.mask:
            msize, _, merr = _probe(s.mask)
            if merr:
                problems.append({"file": s.mask, "problem": f"mask {merr}"})
            elif msize != size:
                problems.append({"file": s.mask, "problem": f"mask is {msize[0]}x{msize[1]} but its image "
                                 f"{s.path} is {size[0]}x{size[1]}"})
    for other in ("val", "test"):
        for digest, path in hashes[other].items():
            if digest in hashes["train"]:
                problems.append({"file": path, "problem": f"identical to training image {hashes['train'][digest]}"})
    if len(index.train) < MIN_TRAIN:
        problems.append({"file": index.root, "problem": f"only {len(index.train)} good training images; "
                         f"need at least {MIN_TRAIN}"})
    per_defect = Counter(s.defect for s in index.test)
    wh = np.array(sizes) if sizes else np.zeros((0, 2))
    def _samples(samples: list[Sample], k: int = 4) -> list[str]:
        return [s.path for s in samples[:k]]
    return {
        "check_pass": not problems,
        "dataset_type": index.type,
        "dataset_path": os.path.abspath(index.root),
        "attributes": {
            "train_samples": len(index.train),
            "val_samples": len(index.val),
            "test_samples": len(index.test),
            "test_good": sum(1 for s in index.test if s.label == 0),
            "test_anomalous": sum(1 for s in index.test if s.label == 1),
            "test_per_defect": dict(sorted(per_defect.items())),
            "masks": sum(1 for s in index.test + index.val if s.mask),
            "train_sample_paths": _samples(index.train),
            "test_sample_paths": _samples([s for s in index.test if s.label]) or _samples(index.test),
        },
        "image_size": {
            "min": wh.min(0).astype(int).tolist() if len(wh) else None,
            "max": wh.max(0).astype(int).tolist() if len(wh) else None,
            "distinct": sorted({f"{w}x{h}" for w, h in sizes})[:20],
        },
        "notes": index.notes,
        "problems": problems,
    }


def require_valid(index: DatasetIndex) -> None:
    report = check_index(index, progress=False)
    if not report["check_pass"]:
        lines = "\n".join(f"  {p['file']}: {p['problem']}" for p in report["problems"][:20])
        more = len(report["problems"]) - 20
        raise UadkitError(f"dataset '{index.root}' fails its check ({len(report['problems'])} problems); "
                          f"fix these or run -o Global.mode=check_dataset:\n{lines}"
                          + (f"\n  ... and {more} more" if more > 0 else ""))


MIN_DEFECT_PX = 4       # a defect narrower than this at the model's input size barely moves a feature map
MAX_MASKS_MEASURED = 200


def defect_sizes(index: DatasetIndex, model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """How large the labelled defects (connected regions of the masks) are once an image is resized to the
    model's input (or each tile is, with Model.tiling): the side of a square of the same area, in input
    pixels. Defects smaller than MIN_DEFECT_PX there are the hint that tiling is needed."""
    from scipy import ndimage

    from .image_io import load_mask
    from .tiling import check_tiling

    masked = [s for s in index.test + index.val if s.mask][:MAX_MASKS_MEASURED]
    if not masked:
        return None
    ih, iw = model_cfg["input_size"]
    tiling = check_tiling(model_cfg.get("tiling"))
    sides = []
    for s in masked:
        try:
            mask = load_mask(s.mask)
        except UadkitError:
            continue  # already listed as a problem
        th, tw = tiling[0] if tiling else mask.shape
        scale = min(ih / th, iw / tw)
        labels, n = ndimage.label(mask)
        if n:
            areas = np.bincount(labels.ravel())[1:]
            sides += (np.sqrt(areas) * scale).tolist()
    if not sides:
        return None
    a = np.array(sides)
    small = int((a < MIN_DEFECT_PX).sum())
    out = {"defects": len(a), "masks": len(masked), "unit": "input pixels (side of a square of equal area)",
           "smallest": round(float(a.min()), 2), "median": round(float(np.median(a)), 2),
           f"below_{MIN_DEFECT_PX}px": small}
    if small:
        out["warning"] = (f"{small} of {len(a)} labelled defects are under {MIN_DEFECT_PX} px at the model's input "
                          f"size ({'tiles' if tiling else 'whole image'} resized to {iw}x{ih}): they may vanish; "
                          + ("use smaller Model.tiling tiles or a larger Model.input_size" if tiling else
                             "use Model.tiling (tiles at full resolution) or a larger Model.input_size"))
    return out
