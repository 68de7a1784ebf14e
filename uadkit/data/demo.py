"""A small procedural dataset in the MVTec AD layout: a woven textile with scratches and stains.

No third-party images: every pixel comes from a seeded random generator, so tests and the demo can make
data anywhere, offline.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECTS = ("scratch", "stain")


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """A woven texture: two crossing gratings with jittered phase, fibre noise and a warm tint."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(7.5, 8.5)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    warp = np.sin(2 * np.pi * x / period + phase[0] + 0.3 * np.sin(y / 23.0))
    weft = np.sin(2 * np.pi * y / period + phase[1] + 0.3 * np.sin(x / 29.0))
    checker = np.sign(np.sin(np.pi * x / period) * np.sin(np.pi * y / period))
    base = 0.5 + 0.18 * np.where(checker > 0, warp, weft)
    noise = np.asarray(Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.8)), dtype=np.float32) / 255.0
    base = base + 0.12 * (noise - 0.5) + rng.uniform(-0.03, 0.03)
    tint = np.array([0.92, 0.78, 0.62]) * rng.uniform(0.95, 1.05, size=3)
    return np.clip(base[..., None] * tint * 255, 0, 255).astype(np.uint8)


def _defect(rng: np.random.Generator, img: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "scratch":
        x0, y0 = rng.uniform(0.2, 0.8, size=2) * size
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * size
        x1, y1 = x0 + np.cos(ang) * length, y0 + np.sin(ang) * length
        draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(3, 6)))
        colour = np.array([40, 30, 25]) if rng.random() < 0.5 else np.array([250, 245, 235])
    else:
        cx, cy = rng.uniform(0.25, 0.75, size=2) * size
        rx, ry = rng.uniform(0.06, 0.12, size=2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        colour = np.array([120, 60, 40]) * rng.uniform(0.8, 1.2)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)[..., None] / 255.0
    out = img * (1 - 0.85 * soft) + colour * 0.85 * soft
    return np.clip(out, 0, 255).astype(np.uint8), (np.asarray(mask) > 127).astype(np.uint8) * 255


def make_demo_dataset(root: str | os.PathLike, n_train: int = 40, n_test_good: int = 8,
                      n_test_defect: int = 6, size: int = 256, seed: int = 0, n_val: int = 0) -> str:
    """Write train/good, test/good, test/<defect> and ground_truth/<defect>/*_mask.png under `root`,
    and validation/good when `n_val` > 0 (calibration wants a few dozen good images it was not fitted on)."""
    root = str(root)
    rng = np.random.default_rng(seed)
    for sub in ["train/good", "test/good"] + [f"test/{d}" for d in DEFECTS] + [f"ground_truth/{d}" for d in DEFECTS]:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_fabric(rng, size)).save(os.path.join(root, "train/good", f"{i:03d}.png"))
    for i in range(n_test_good):
        Image.fromarray(_fabric(rng, size)).save(os.path.join(root, "test/good", f"{i:03d}.png"))
    if n_val:
        os.makedirs(os.path.join(root, "validation/good"), exist_ok=True)
        for i in range(n_val):
            Image.fromarray(_fabric(rng, size)).save(os.path.join(root, "validation/good", f"{i:03d}.png"))
    for d in DEFECTS:
        for i in range(n_test_defect):
            img, mask = _defect(rng, _fabric(rng, size), d)
            Image.fromarray(img).save(os.path.join(root, "test", d, f"{i:03d}.png"))
            Image.fromarray(mask).save(os.path.join(root, "ground_truth", d, f"{i:03d}_mask.png"))
    return root
