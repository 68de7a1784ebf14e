"""Small procedural datasets in the MVTec AD layout: a woven textile with scratches and stains
(`make_demo_dataset`), and a dark part photographed off-centre on a dark, noisy background (`make_part_dataset`).

No third-party images: every pixel comes from a seeded random generator, so tests and the demo can make
data anywhere, offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import gaussian_filter

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


def _write_mvtec(root: str | os.PathLike, defects: Sequence[str], good: Callable[[], np.ndarray],
                 defect: Callable[[str], tuple[np.ndarray, np.ndarray]], n_train: int, n_test_good: int, n_val: int,
                 n_test_defect: int, png: dict | None = None) -> str:
    """Write a generated set in the MVTec AD layout: train/good, test/good, validation/good (when `n_val`),
    test/<defect> with ground_truth/<defect>/*_mask.png. Images are drawn in that order (the generators share
    one random stream, so the order fixes the data)."""
    root = str(root)
    subs = ["train/good", "test/good"] + [f"{top}/{d}" for top in ("test", "ground_truth") for d in defects]
    for sub in subs + (["validation/good"] if n_val else []):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for sub, n in (("train/good", n_train), ("test/good", n_test_good), ("validation/good", n_val)):
        for i in range(n):
            Image.fromarray(good()).save(os.path.join(root, sub, f"{i:03d}.png"), **(png or {}))
    for d in defects:
        for i in range(n_test_defect):
            img, mask = defect(d)
            Image.fromarray(img).save(os.path.join(root, "test", d, f"{i:03d}.png"), **(png or {}))
            Image.fromarray(mask).save(os.path.join(root, "ground_truth", d, f"{i:03d}_mask.png"))
    return root


def make_demo_dataset(root: str | os.PathLike, n_train: int = 40, n_test_good: int = 8,
                      n_test_defect: int = 6, size: int = 256, seed: int = 0, n_val: int = 0) -> str:
    """Write train/good, test/good, test/<defect> and ground_truth/<defect>/*_mask.png under `root`,
    and validation/good when `n_val` > 0 (calibration wants a few dozen good images it was not fitted on)."""
    rng = np.random.default_rng(seed)
    return _write_mvtec(root, DEFECTS, lambda: _fabric(rng, size), lambda d: _defect(rng, _fabric(rng, size), d),
                        n_train, n_test_good, n_val, n_test_defect)



PART_DEFECTS = ("cut", "scratch", "spot")


def _part_shape(h: int, w: int) -> Image.Image:
    """The part's silhouette (L mode) centred in an h x w canvas: a plate perforated by a grid of holes,
    so a shift of a few percent moves edges across most of its area."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    s = min(h, w)
    cx, cy, pw, ph = w / 2, h / 2, 0.32 * w, 0.32 * h
    d.rounded_rectangle([cx - pw, cy - ph, cx + pw, cy + ph], radius=int(0.06 * s), fill=255)
    pitch, r = 0.075 * s, 0.022 * s
    nx, ny = int(2 * pw / pitch) - 1, int(2 * ph / pitch) - 1
    for i in range(nx):
        for j in range(ny):
            x, y = cx + (i - (nx - 1) / 2) * pitch, cy + (j - (ny - 1) / 2) * pitch
            d.ellipse([x - r, y - r, x + r, y + r], fill=0)
    return m


def _part(rng: np.random.Generator, h: int, w: int, shift: float, rotate: float) -> tuple[np.ndarray, np.ndarray]:
    """A dark part on a dark, noisy background, moved by up to `shift` x the image size and turned by up to
    `rotate` degrees; returns the uint8 RGB image and where on the part a defect may go."""
    dx, dy = rng.uniform(-shift, shift) * w, rng.uniform(-shift, shift) * h
    sil = _part_shape(h, w).rotate(rng.uniform(-rotate, rotate), resample=Image.BILINEAR, translate=(dx, dy))
    obj = np.asarray(sil, dtype=np.float32) / 255.0
    gy, gx = np.gradient(np.asarray(sil.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float32) / 255.0)
    rim = np.clip(np.hypot(gx, gy) * 4.0, 0, 1)  # a brighter bevel along every edge
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 + 0.25 * ((x - w / 2) / w + (y - h / 2) / h) * rng.uniform(0.8, 1.2)
    grain = gaussian_filter(rng.random((h, w)).astype(np.float32), 1.2)
    # Sensor noise a little coarser than a pixel (demosaicing), strong next to the dark background level.
    noise = gaussian_filter(rng.normal(0, 1, (h, w)).astype(np.float32), 0.7)
    value = (0.09 + rng.uniform(-0.01, 0.01) + 0.13 * obj * light + 0.05 * obj * (grain - 0.5) + 0.10 * rim
             + 0.05 * noise / noise.std())
    img = np.clip(value[..., None] * np.array([1.0, 0.97, 0.93]) * 255, 0, 255).astype(np.uint8)
    return img, np.asarray(sil.filter(ImageFilter.MinFilter(5)), dtype=np.uint8) > 200


def _part_defect(rng: np.random.Generator, img: np.ndarray, where: np.ndarray,
                 kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A small defect on the part: a dark cut, a bright scratch or a rust spot, 2-14 % of the image side."""
    h, w = where.shape
    s = min(h, w)
    ys, xs = np.nonzero(where)
    k = int(rng.integers(len(ys)))
    cx, cy, ang = float(xs[k]), float(ys[k]), rng.uniform(0, np.pi)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "spot":
        r = rng.uniform(0.025, 0.04) * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        colour = np.array([100.0, 70.0, 45.0])
    else:
        length = rng.uniform(*((0.06, 0.10) if kind == "cut" else (0.08, 0.14))) * s
        ex, ey = np.cos(ang) * length / 2, np.sin(ang) * length / 2
        width = max(2, int(s * (0.025 if kind == "cut" else 0.02)))
        draw.line([(cx - ex, cy - ey), (cx + ex, cy + ey)], fill=255, width=width)
        colour = np.full(3, 8.0 if kind == "cut" else 120.0)
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)[..., None] / 255.0
    out = img * (1 - 0.7 * soft) + colour * 0.7 * soft
    return np.clip(out, 0, 255).astype(np.uint8), (np.asarray(mask) > 127).astype(np.uint8) * 255


def make_part_dataset(root: str | os.PathLike, n_train: int = 40, n_test_good: int = 8, n_test_defect: int = 6,
                      size: tuple[int, int] = (192, 256), shift: float = 0.04, rotate: float = 3.0,
                      seed: int = 0, n_val: int = 0) -> str:
    """Like `make_demo_dataset`, but an object photo: a dark perforated part on a dark, noisy background,
    up to `shift` x the image size off centre and turned by up to `rotate` degrees, with small cuts,
    scratches and rust spots (`shift=0, rotate=0`: aligned parts). `size` is (height, width)."""
    h, w = size
    rng = np.random.default_rng(seed)
    return _write_mvtec(root, PART_DEFECTS, lambda: _part(rng, h, w, shift, rotate)[0],
                        lambda d: _part_defect(rng, *_part(rng, h, w, shift, rotate), d),
                        n_train, n_test_good, n_val, n_test_defect)


HIGHRES_DEFECTS = ("fiber", "knot", "speck")
_FAST_PNG = {"compress_level": 1}  # megapixel PNGs: zlib's default level takes ~8x longer for ~15% less disk


def _highres_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """`_fabric`'s weave as one production run of it: the same 8 px period and tint in every image (a new
    period or dye per image would be a new product), shifted by a random offset, with fibre noise and a soft,
    large-scale mottling, so the image resized to a model's input is not a flat field either."""
    from .synthetic import perlin

    period = 8.0
    oy, ox = rng.uniform(0, 2 * period, size=2)
    # open grids in float32: full float64 grids of a 2048 px image would cost ~10x the time and memory
    y = (np.arange(size, dtype=np.float32) + np.float32(oy))[:, None]
    x = (np.arange(size, dtype=np.float32) + np.float32(ox))[None, :]
    bend = rng.uniform(0, 2 * np.pi, size=2).astype(np.float32)
    k = np.float32(2 * np.pi / period)
    warp = np.sin(k * x + np.float32(0.3) * np.sin(y / np.float32(23.0) + bend[0]))
    weft = np.sin(k * y + np.float32(0.3) * np.sin(x / np.float32(29.0) + bend[1]))
    checker = np.sin(k / 2 * x) * np.sin(k / 2 * y) > 0
    fibres = gaussian_filter(rng.random((size, size), dtype=np.float32), 0.8)
    low = max(8, size // 8)  # the mottling is smooth: made at 1/8 of the size and enlarged (perlin is slow)
    mottle = perlin((low, low), (4, 4), rng) + 0.5 * perlin((low, low), (9, 9), rng)
    mottle = np.asarray(Image.fromarray(mottle.astype(np.float32), "F").resize((size, size), Image.BILINEAR))
    base = (0.5 + 0.18 * np.where(checker, warp, weft)) * (1 + 0.05 * mottle) + 0.12 * (fibres - 0.5)
    tint = np.array([0.92, 0.78, 0.62], np.float32) * 255
    return np.clip(base[..., None] * tint, 0, 255).astype(np.uint8)


def _highres_defect(rng: np.random.Generator, img: np.ndarray, kind: str,
                    defect_px: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A defect `defect_px` pixels across at full resolution: a stray fibre (a short thin line), a knot
    (a disc of finer, turned weave with the cloth's own mean colour: nothing left of it once resized) or a
    speck (a faint spot). Drawn in a small window around it: the image may be megapixels."""
    size = img.shape[0]
    d = float(rng.uniform(*defect_px))
    r = int(defect_px[1] / 2) + 4  # the window's half side holds the largest defect and its soft edge
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    win = img[cy - r:cy + r, cx - r:cx + r].astype(np.float32)
    c = float(r)
    mask = Image.new("L", (2 * r, 2 * r), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "fiber":
        ang = rng.uniform(0, np.pi)
        ex, ey = np.cos(ang) * d / 2, np.sin(ang) * d / 2
        draw.line([(c - ex, c - ey), (c + ex, c + ey)], fill=255, width=int(rng.integers(2, 4)))
        colour, alpha = (np.array([25.0, 20, 15]) if rng.random() < 0.5 else np.array([245.0, 240, 230])), 0.9
    elif kind == "speck":
        draw.ellipse([c - d / 2, c - d / 2, c + d / 2, c + d / 2], fill=255)
        colour, alpha = np.array([95.0, 45, 25]) * rng.uniform(0.8, 1.0), 0.75
    else:
        draw.ellipse([c - d / 2, c - d / 2, c + d / 2, c + d / 2], fill=255)
        y, x = np.mgrid[0:2 * r, 0:2 * r].astype(np.float32)
        theta, period = rng.uniform(0, np.pi), rng.uniform(3.0, 4.0)
        wave = np.sin(2 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period)
        colour, alpha = win.reshape(-1, 3).mean(0) * (1 + 0.35 * wave[..., None]), 1.0  # same mean, other weave
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)[..., None] / 255.0
    out, full = img.copy(), np.zeros(img.shape[:2], np.uint8)
    out[cy - r:cy + r, cx - r:cx + r] = np.clip(win * (1 - alpha * soft) + colour * alpha * soft, 0, 255)
    full[cy - r:cy + r, cx - r:cx + r] = (np.asarray(mask) > 127) * 255
    return out, full


def make_highres_dataset(root: str | os.PathLike, size: int = 2048, n_train: int = 20, n_test_good: int = 8,
                         n_test_defect: int = 4, defect_px: tuple[int, int] = (8, 20), seed: int = 0,
                         n_val: int = 0) -> str:
    """A high-resolution inspection set in the MVTec AD layout: `size` x `size` woven cloth (one fine weave,
    fibre noise, soft mottling) with small fibres, knots and specks `defect_px` pixels across at full size,
    with their masks, and validation/good when `n_val` > 0. Resized from 2048 px to a model's 256-320 px input
    such a defect is 1-3 px (a knot, finer weave of the cloth's own colour, is gone): what `Model.tiling` is for."""
    lo, hi = defect_px
    if not 1 <= lo <= hi or hi + 8 >= size:
        raise ValueError(f"defect_px: expected 1 <= min <= max and max + 8 < size {size}, got {defect_px}")
    rng = np.random.default_rng(seed)
    return _write_mvtec(root, HIGHRES_DEFECTS, lambda: _highres_fabric(rng, size),
                        lambda d: _highres_defect(rng, _highres_fabric(rng, size), d, (lo, hi)),
                        n_train, n_test_good, n_val, n_test_defect, _FAST_PNG)
