"""Pictures a person would rather see than read: heatmap overlays with defect contours, histograms."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered blue -> cyan -> yellow -> red ramp (jet-like, without jet's dark ends).
_STOPS = np.array([[0.0, 30, 60, 200], [0.35, 0, 200, 230], [0.6, 250, 230, 40], [1.0, 220, 20, 20]])


_LUT = np.stack([np.interp(np.linspace(0, 1, 1024), _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)],
                 -1).astype(np.uint8)


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 through a 1024-step table: 3 bytes per pixel, not float64 per channel."""
    idx = np.nan_to_num(np.clip(values, 0, 1), nan=0.0) * (len(_LUT) - 1) + 0.5
    return _LUT[idx.astype(np.intp)]


def mask_edges(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary pixels of a binary mask (mask minus its erosion)."""
    m = mask.astype(bool)
    inner = m.copy()
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None, text: str | None = None,
            alpha: float = 0.45, edge_colour: tuple[int, int, int] = (0, 255, 0)) -> Image.Image:
    """Blend the [0, 1] anomaly map over the image, outline the mask, write the score on top."""
    out = np.empty_like(image)
    step = max(1, (1 << 20) // max(1, image.shape[1]))  # blocks of ~1M pixels: float temporaries stay small
    for r in range(0, image.shape[0], step):
        heat = colormap(amap[r:r + step]).astype(np.float32)
        out[r:r + step] = (image[r:r + step].astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)
    if mask is not None and mask.any():
        out[mask_edges(mask, max(1, image.shape[0] // 256))] = edge_colour
    img = Image.fromarray(out)
    if text:
        d = ImageDraw.Draw(img)
        f = font(max(12, image.shape[0] // 24))
        box = d.textbbox((4, 4), text, font=f)
        d.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=(0, 0, 0))
        d.text((4, 4), text, fill=(255, 255, 255), font=f)
    return img


def histogram(groups: dict[str, np.ndarray], title: str, threshold: float | None = None,
              bins: int = 30, size: tuple[int, int] = (720, 420), value_range: tuple[float, float] | None = None,
              xlabel: str = "score") -> Image.Image:
    """Overlaid histograms of several groups (e.g. good vs defect scores) with an optional threshold line."""
    colours = [(60, 120, 220), (220, 60, 50), (60, 170, 80), (200, 140, 20), (140, 70, 190), (90, 90, 90)]
    w, h = size
    left, right, top, bottom = 60, 20, 40, 50
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    allv = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in groups.values()] or [np.zeros(1)])
    lo, hi = value_range or (float(allv.min()), float(allv.max()))
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(np.asarray(v, dtype=np.float64), bins=edges)[0] for k, v in groups.items()}
    top_count = max([c.max() for c in counts.values()] + [1])
    pw, ph = w - left - right, h - top - bottom
    f = font(14)
    d.text((left, 10), title, fill=(0, 0, 0), font=font(16))
    for gi, (k, c) in enumerate(counts.items()):
        col = colours[gi % len(colours)]
        for b, n in enumerate(c):
            if n == 0:
                continue
            x0 = left + pw * b / bins
            x1 = left + pw * (b + 1) / bins
            y0 = top + ph * (1 - n / top_count)
            d.rectangle([x0 + 1, y0, x1 - 1, top + ph], outline=col, width=2)
        d.rectangle([w - right - 170, top + 8 + 20 * gi, w - right - 158, top + 20 + 20 * gi], fill=col)
        d.text((w - right - 150, top + 6 + 20 * gi), f"{k} (n={len(np.ravel(groups[k]))})", fill=(0, 0, 0), font=f)
    d.line([left, top + ph, left + pw, top + ph], fill=(0, 0, 0))
    d.line([left, top, left, top + ph], fill=(0, 0, 0))
    for t in np.linspace(lo, hi, 6):
        x = left + pw * (t - lo) / (hi - lo)
        d.line([x, top + ph, x, top + ph + 5], fill=(0, 0, 0))
        d.text((x - 14, top + ph + 8), f"{t:.3g}", fill=(0, 0, 0), font=f)
    d.text((left, top - 4), f"max {top_count}", fill=(90, 90, 90), font=f)
    d.text((left + pw // 2 - 20, h - 20), xlabel, fill=(0, 0, 0), font=f)
    if threshold is not None and lo <= threshold <= hi:
        x = left + pw * (threshold - lo) / (hi - lo)
        for y in range(top, top + ph, 8):
            d.line([x, y, x, y + 4], fill=(0, 0, 0), width=2)
        d.text((x + 4, top + 2), f"threshold {threshold:.3g}", fill=(0, 0, 0), font=f)
    return img


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, title: str, point: tuple[float, float] | None = None,
             point_label: str = "", size: tuple[int, int] = (520, 520)) -> Image.Image:
    """ROC curve (false-positive rate vs recall) with the operating point of the stored threshold marked."""
    w, h = size
    left, right, top, bottom = 60, 20, 62, 55
    pw, ph = w - left - right, h - top - bottom
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    f = font(14)
    d.text((left, 10), title, fill=(0, 0, 0), font=font(16))

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + pw * x, top + ph * (1 - y)

    for t in np.linspace(0, 1, 6):
        d.line([xy(t, 0), xy(t, 1)], fill=(232, 232, 232))
        d.line([xy(0, t), xy(1, t)], fill=(232, 232, 232))
        d.text((xy(t, 0)[0] - 10, top + ph + 6), f"{t:.1f}", fill=(0, 0, 0), font=f)
        d.text((left - 32, xy(0, t)[1] - 8), f"{t:.1f}", fill=(0, 0, 0), font=f)
    d.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170))
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    d.line([xy(float(x), float(y)) for x, y in zip(fpr, tpr)], fill=(60, 120, 220), width=3)
    if point is not None:
        px, py = xy(*point)
        d.ellipse([px - 7, py - 7, px + 7, py + 7], outline=(220, 60, 50), width=3)
        tx = px + 10 if px < left + pw * 0.55 else px - 10 - d.textlength(point_label, font=f)
        d.text((tx, py + 8), point_label, fill=(220, 60, 50), font=f)
    d.text((left + pw // 2 - 90, h - 22), "good parts flagged (false-positive rate)", fill=(0, 0, 0), font=f)
    d.text((left - 32, top - 24), "defects caught (recall)", fill=(0, 0, 0), font=f)
    return img


def bar_chart(counts: dict[str, int], title: str, size: tuple[int, int] = (720, 420)) -> Image.Image:
    """Labelled vertical bars, e.g. images per split and per defect type."""
    w, h = size
    left, right, top, bottom = 50, 20, 40, 90
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 10), title, fill=(0, 0, 0), font=font(16))
    f = font(13)
    n = max(len(counts), 1)
    top_count = max(list(counts.values()) + [1])
    pw, ph = w - left - right, h - top - bottom
    slot = pw / n
    for i, (k, v) in enumerate(counts.items()):
        x0 = left + slot * i + slot * 0.15
        x1 = left + slot * (i + 1) - slot * 0.15
        y0 = top + ph * (1 - v / top_count)
        colour = (60, 120, 220) if k.startswith(("train", "val", "good", "test/good")) else (220, 60, 50)
        d.rectangle([x0, y0, x1, top + ph], fill=colour)
        d.text((x0, y0 - 16), str(v), fill=(0, 0, 0), font=f)
        label = k if len(k) <= 14 else k[:13] + "…"
        d.text((x0, top + ph + 6 + 14 * (i % 2)), label, fill=(0, 0, 0), font=f)
    d.line([left, top + ph, left + pw, top + ph], fill=(0, 0, 0))
    return img
