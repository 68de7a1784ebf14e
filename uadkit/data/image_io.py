"""The one image loader: any source -> RGB uint8 HxWx3, plus atomic file writes."""

from __future__ import annotations

import io
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UadkitError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
URL_TIMEOUT_S = 20
URL_MAX_BYTES = 50 * 1024 * 1024
# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k).
Image.MAX_IMAGE_PIXELS = 256 * 1024 * 1024


@dataclass
class ImageSource:
    """One input to predict: where it came from (a name for results) and how to read it."""

    name: str
    array: np.ndarray | None = None
    stem: str = ""  # file-name stem for saved results; unique within one resolve_sources call

    def load(self) -> np.ndarray:
        return self.array if self.array is not None else load_image(self.name)


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Apply EXIF orientation and convert gray / palette / RGBA / 16-bit / float images to RGB uint8."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_image(source: str | os.PathLike) -> np.ndarray:
    """Read a file path or http(s) URL into RGB uint8; errors name the source and the reason."""
    name = str(source)
    if name.startswith(("http://", "https://")):
        data = fetch_url(name)
        return decode_image_bytes(data, name)
    if not os.path.exists(name):
        raise UadkitError(f"{name}: no such file")
    if os.path.isdir(name):
        raise UadkitError(f"{name}: is a folder, expected an image file")
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UadkitError(f"{name}: cannot be read ({e.strerror})") from e
    return decode_image_bytes(data, name)


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    if not data:
        raise UadkitError(f"{name}: empty file, expected an image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb_uint8(img)
    except UnidentifiedImageError as e:
        raise UadkitError(f"{name}: not an image (unrecognised format)") from e
    except Image.DecompressionBombError as e:
        raise UadkitError(f"{name}: image too large ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UadkitError(f"{name}: corrupt or truncated image ({e})") from e


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read(max_bytes + 1)
    except Exception as e:
        raise UadkitError(f"{url}: could not be downloaded ({type(e).__name__}: {e})") from e
    if len(data) > max_bytes:
        raise UadkitError(f"{url}: larger than {max_bytes} bytes")
    return data


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder`, recursive, sorted, image extensions only."""
    root = Path(folder)
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def resolve_sources(inputs: Any) -> list[ImageSource]:
    """Expand a path, folder, URL, numpy array or a list of these into image sources, in order."""
    items: Iterable[Any] = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    out: list[ImageSource] = []
    for k, item in enumerate(items):
        if isinstance(item, np.ndarray):
            out.append(ImageSource(f"array_{k}", _check_array(item, k)))
        elif isinstance(item, (str, os.PathLike)):
            name = str(item)
            if name.startswith(("http://", "https://")):
                out.append(ImageSource(name))
            elif os.path.isdir(name):
                files = list_images(name)
                if not files:
                    raise UadkitError(f"{name}: folder has no images (expected {sorted(IMAGE_EXTS)})")
                # good/000.png and scratch/000.png must not save over each other: name by relative path
                out.extend(ImageSource(f, stem=str(Path(f).relative_to(name).with_suffix("")).replace(os.sep, "_"))
                           for f in files)
            elif os.path.isfile(name):
                out.append(ImageSource(name))
            else:
                raise UadkitError(f"{name}: no such file or folder")
        else:
            raise UadkitError(f"input {k}: expected a path, folder, URL or numpy array, got {type(item).__name__}")
    if not out:
        raise UadkitError("no input images given")
    seen: dict[str, int] = {}
    for s in out:
        base = s.stem or Path(urllib.parse.urlsplit(s.name).path if "://" in s.name else s.name).stem or "image"
        n = seen.get(base, 0)
        seen[base] = n + 1
        s.stem = base if n == 0 else f"{base}_{n}"
    return out


def _check_array(a: np.ndarray, k: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise UadkitError(f"input array {k}: expected dtype uint8, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    if a.ndim == 3 and a.shape[2] == 4:
        return a[..., :3]
    raise UadkitError(f"input array {k}: expected shape HxW or HxWx3, got {a.shape}")


def load_mask(path: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as bool HxW, binarised at > 127."""
    try:
        with Image.open(path) as m:
            m = np.asarray(ImageOps.exif_transpose(m).convert("L"))
    except FileNotFoundError as e:
        raise UadkitError(f"{path}: mask file does not exist") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UadkitError(f"{path}: corrupt or unreadable mask ({e})") from e
    if shape is not None and m.shape != tuple(shape):
        raise UadkitError(f"{path}: mask size {m.shape[1]}x{m.shape[0]} differs from its image {shape[1]}x{shape[0]}")
    return m > 127


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_image_atomic(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(os.path.splitext(str(path))[1].lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)


def prepare_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 to the model's (height, width) and scale to float32 CHW in [0, 1].

    The one place an image is resized for a model; normalisation is the backbone's, inside the model.
    """
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0
