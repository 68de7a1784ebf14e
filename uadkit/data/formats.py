"""Dataset layouts, auto-detected: MVTec AD, PaddleX list files, plain folders.

Every layout becomes the same `DatasetIndex`: train (good only), val (for calibration) and test samples.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UadkitError
from .image_io import IMAGE_EXTS, list_images, load_mask

GOOD_DIRS = ("good", "normal")
DEFECT_DIRS = ("defect", "abnormal", "anomaly", "bad")


@dataclass
class Sample:
    path: str
    label: int = 0            # 0 good, 1 anomalous
    defect: str = "good"
    mask: str | None = None   # ground-truth mask file, None when not given


@dataclass
class DatasetIndex:
    root: str
    type: str
    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def detect_format(root: str) -> str:
    r = Path(root)
    if not r.is_dir():
        raise UadkitError(f"Global.dataset_dir: '{root}' is not a folder")
    if (r / "train" / "good").is_dir():
        return "MVTec_AD"
    if (r / "train.txt").is_file():
        return "ListFile"
    if any((r / d).is_dir() for d in GOOD_DIRS) or any(
            p.is_file() and p.suffix.lower() in IMAGE_EXTS for p in r.iterdir()):
        return "Folder"
    raise UadkitError(
        f"Global.dataset_dir: '{root}' is not a known dataset layout; expected train/good/ (MVTec AD), "
        "train.txt (list files), good/ (plain folders) or a folder of good images")


def load_index(root: str, val_split: float = 0.1, seed: int = 0) -> DatasetIndex:
    kind = detect_format(root)
    idx = {"MVTec_AD": _mvtec, "ListFile": _lists, "Folder": _folders}[kind](root)
    if not idx.val and val_split > 0 and len(idx.train) >= 4:
        # Hold out good training images for calibration: scores on images a model was fitted on are biased low.
        idx.train, idx.val = holdout(idx.train, val_split, seed)
        idx.notes.append(f"validation: held out {len(idx.val)} of the good training images ({val_split:.0%})")
    return idx


def holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(samples) * fraction))
    held = set(order[:n])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def _mask_for(gt_dir: Path, stem: str) -> str | None:
    for cand in (f"{stem}_mask.png", f"{stem}.png"):
        if (gt_dir / cand).is_file():
            return str(gt_dir / cand)
    return None


def _mvtec(root: str) -> DatasetIndex:
    r = Path(root)
    idx = DatasetIndex(root, "MVTec_AD")
    idx.train = [Sample(p) for p in list_images(r / "train" / "good")]
    if (r / "validation" / "good").is_dir():
        idx.val = [Sample(p) for p in list_images(r / "validation" / "good")]
    test = r / "test"
    if test.is_dir():
        for d in sorted(p for p in test.iterdir() if p.is_dir()):
            for p in list_images(d):
                if d.name == "good":
                    idx.test.append(Sample(p))
                else:
                    mask = _mask_for(r / "ground_truth" / d.name, Path(p).stem)
                    idx.test.append(Sample(p, 1, d.name, mask))
    return idx


def _read_list(root: Path, name: str) -> list[Sample]:
    out = []
    path = root / name
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) > 2:
            raise UadkitError(f"{path}:{n}: expected 'image_path [mask_path]', got {len(parts)} fields")
        img = str(root / parts[0])
        mask = str(root / parts[1]) if len(parts) == 2 else None
        label = 0
        if mask is not None and os.path.isfile(mask):
            label = int(load_mask(mask).any())  # an all-zero mask marks a good image
        if not label:
            mask = mask if mask and os.path.isfile(mask) else None
        defect = Path(parts[0]).parent.name if label else "good"
        out.append(Sample(img, label, defect if defect not in ("", ".") else "defect", mask))
    return out


def _lists(root: str) -> DatasetIndex:
    r = Path(root)
    idx = DatasetIndex(root, "ListFile")
    idx.train = _read_list(r, "train.txt")
    bad = [s.path for s in idx.train if s.label]
    if bad:
        raise UadkitError(f"{r / 'train.txt'}: training must list good images only; {bad[0]} has a non-empty mask")
    val = _read_list(r, "val.txt") if (r / "val.txt").is_file() else []
    if (r / "test.txt").is_file():
        idx.val, idx.test = val, _read_list(r, "test.txt")
    else:
        # PaddleX's layout has no test list: val.txt is the evaluation set, and calibration holds out train.
        idx.test = val
    return idx


def _folders(root: str) -> DatasetIndex:
    r = Path(root)
    idx = DatasetIndex(root, "Folder")
    good_dir = next((r / d for d in GOOD_DIRS if (r / d).is_dir()), None)
    if good_dir is None:  # a folder of good images only
        idx.train = [Sample(str(p)) for p in sorted(r.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        return idx
    good = [Sample(p) for p in list_images(good_dir)]
    defects: list[Sample] = []
    mask_dir = r / "masks"
    for d in DEFECT_DIRS:
        ddir = r / d
        if not ddir.is_dir():
            continue
        for p in list_images(ddir):
            rel = Path(p).relative_to(ddir)
            kind = rel.parts[0] if len(rel.parts) > 1 else d
            defects.append(Sample(p, 1, kind, _mask_for(mask_dir, Path(p).stem) if mask_dir.is_dir() else None))
    if defects and len(good) >= 5:
        # Good images are needed on the test side too; keep a fixed 20% of them for it.
        good, test_good = holdout(good, 0.2, seed=1)
        idx.test = test_good + defects
        idx.notes.append(f"test: {len(test_good)} good images held out for evaluation (20%)")
    else:
        idx.test = defects
    idx.train = good
    return idx
