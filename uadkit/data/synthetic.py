"""Synthetic defects pasted onto good images: a check of the decision threshold when no real defect is
at hand (an estimate of recall, labelled as such wherever it is reported, never a measurement).

Two kinds, after DRAEM and CutPaste: Perlin-noise blobs filled with a foreign texture (another good
image, turned and recoloured, or a generated stripe pattern), and cut-and-paste scars (a thin strip of
the same image, recoloured and pasted elsewhere). Each covers roughly 0.3-3% of the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient noise in about [-1, 1] with `res` cells per axis (shape need not be a multiple)."""
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    y = np.linspace(0, ry, h, endpoint=False)
    x = np.linspace(0, rx, w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(xf), fade(yf)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return np.sqrt(2) * (top * (1 - v) + bottom * v)


def _foreign_texture(shape: tuple[int, int], others: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    if others and rng.random() < 0.6:
        src = others[int(rng.integers(len(others)))]
        # a crop of another image at twice the window's size, squeezed in: foreign detail, not a flat fill
        ch, cw = min(src.shape[0], 2 * h), min(src.shape[1], 2 * w)
        y, x = int(rng.integers(0, src.shape[0] - ch + 1)), int(rng.integers(0, src.shape[1] - cw + 1))
        src = np.rot90(src[y:y + ch, x:x + cw], int(rng.integers(1, 4)))
        tex = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((w, h), Image.BILINEAR), np.float32)
        tex = tex[..., rng.permutation(3)] * rng.uniform(0.5, 1.5) + rng.uniform(-60, 60)
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        tex = colour[None, None] * (0.6 + 0.4 * wave[..., None])
    return np.clip(tex, 0, 255)


def _perlin_blob(image: np.ndarray, others: list[np.ndarray], rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    # a window of 10-25% of the side holds the blob, so the defect is local as real ones are
    wh, ww = (max(8, int(s * rng.uniform(0.1, 0.25))) for s in (h, w))
    y0, x0 = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    noise = perlin((wh, ww), (int(rng.integers(1, 4)), int(rng.integers(1, 4))), rng)
    yy, xx = np.mgrid[0:wh, 0:ww]
    falloff = 1 - ((yy - wh / 2) / (wh / 2)) ** 2 - ((xx - ww / 2) / (ww / 2)) ** 2
    local = (noise + falloff) > rng.uniform(0.4, 0.8)
    if not local.any():
        local[wh // 2, ww // 2] = True
    mask = np.zeros((h, w), bool)
    mask[y0:y0 + wh, x0:x0 + ww] = local
    tex = _foreign_texture((wh, ww), others, rng)
    alpha = rng.uniform(0.6, 1.0)
    out = image.astype(np.float32)
    win = out[y0:y0 + wh, x0:x0 + ww]
    win[local] = (1 - alpha) * win[local] + alpha * tex[local]
    return out.astype(np.uint8), mask


def _scar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    length, width = int(min(h, w) * rng.uniform(0.1, 0.25)), max(2, int(min(h, w) * rng.uniform(0.015, 0.04)))
    sy, sx = int(rng.integers(0, h - width + 1)), int(rng.integers(0, w - length + 1))
    strip = image[sy:sy + width, sx:sx + length].astype(np.float32)
    strip = np.clip(strip[..., rng.permutation(3)] * rng.uniform(0.5, 1.5) + rng.uniform(-50, 50), 0, 255)
    patch = Image.fromarray(strip.astype(np.uint8)).convert("RGBA")
    patch = patch.rotate(float(rng.uniform(0, 180)), expand=True, resample=Image.BILINEAR)
    pa = np.asarray(patch)
    ph, pw = pa.shape[:2]
    if ph >= h or pw >= w:
        return _perlin_blob(image, [], rng)
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    sel = pa[..., 3] > 127
    out = image.copy()
    out[y0:y0 + ph, x0:x0 + pw][sel] = pa[..., :3][sel]
    mask = np.zeros((h, w), bool)
    mask[y0:y0 + ph, x0:x0 + pw] = sel
    return out, mask


def synthetic_defect(image: np.ndarray, others: list[np.ndarray], rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One good RGB uint8 image -> (image with a generated defect, its bool mask)."""
    if rng.random() < 0.5:
        return _perlin_blob(image, others, rng)
    return _scar(image, rng)


def synthetic_defects(images: list[np.ndarray], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """A generated defect on each image; the foreign textures come from the other images."""
    rng = np.random.default_rng(seed)
    return [synthetic_defect(im, images[:i] + images[i + 1:], rng) for i, im in enumerate(images)]
