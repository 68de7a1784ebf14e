"""The one image loader: any source -> RGB uint8 HxWx3, plus atomic file writes."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import stat
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import DEFAULT_MAX_PIXELS
from ..errors import UadkitError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# Raster formats we decode, whatever the file is called. Not the rest of Pillow's readers: EPS would run
# Ghostscript on the input, and the rarely used ones (FITS, SPIDER, PCD...) are attack surface for nothing.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "PCX", "ICO",
                                  "TGA", "JPEG2000", "SGI", "QOI", "AVIF")
                      if f in Image.OPEN)  # only those this Pillow was built with (Image.open wants no others)
URL_TIMEOUT_S = 20
URL_MAX_BYTES = 50 * 1024 * 1024
URL_MAX_REDIRECTS = 3
# Pillow's own bomb check is a last resort (raises at 2x this) for code that opens images directly; our
# pixel budget (max_pixels) is checked from the header before decoding and reported as one clear line,
# so Pillow's two-line warning below that is noise.
Image.MAX_IMAGE_PIXELS = 256 * 1024 * 1024
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _quiet_libtiff() -> None:
    """libtiff prints its decoding errors straight to stderr ("ZIPDecode: ..."), lines that name no file;
    Pillow still gets the failure and we report it as one line naming the file, so mute the handlers."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {ln.split()[-1] for ln in f if "/libtiff" in ln}
        for path in paths:
            lib = ctypes.CDLL(path)
            lib.TIFFSetErrorHandler(None)
            lib.TIFFSetWarningHandler(None)
    except (OSError, AttributeError):  # not Linux, or a Pillow without libtiff: nothing to mute
        pass


_quiet_libtiff()


def quiet_pil_warnings() -> None:
    """For the CLI and the service: Pillow's two-line warnings about damaged metadata ("Corrupt EXIF data")
    of an image that is then decoded, or refused with one line naming it, only clutter the output."""
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")


@dataclass
class ImageSource:
    """One input to predict: where it came from (a name for results) and how to read it."""

    name: str
    array: np.ndarray | None = None
    stem: str = ""  # file-name stem for saved results; unique within one resolve_sources call
    error: str | None = None  # a bad numpy input: reported when loaded, so the other inputs still run

    def load(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        if self.error:
            raise UadkitError(self.error)
        return self.array if self.array is not None else load_image(self.name, max_pixels)


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Apply EXIF orientation and convert gray / palette / RGBA / 16-bit / float images to RGB uint8."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def check_pixels(w: int, h: int, name: str, max_pixels: int, setting: str = "Predict.max_pixels") -> None:
    """The one pixel budget, checked from the image header before anything is decoded."""
    if w < 1 or h < 1:
        raise UadkitError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise UadkitError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} ({setting})")


def _not_regular(name: str, mode: int) -> str | None:
    for test, what in ((stat.S_ISDIR, "is a folder"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
                       (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
                       (stat.S_ISSOCK, "is a socket")):
        if test(mode):
            return f"{name}: {what}, expected an image file"
    return None if stat.S_ISREG(mode) else f"{name}: not a regular file, expected an image file"


def path_problem(name: str) -> str | None:
    """Why `name` cannot be read as an image file (missing, broken link, FIFO, device...), or None."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return f"{name}: broken symbolic link" if os.path.islink(name) else f"{name}: no such file"
    except OSError as e:
        return f"{name}: cannot be read ({e.strerror})"
    return _not_regular(name, st.st_mode)


def load_image(source: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a file path or http(s) URL into RGB uint8; errors name the source and the reason."""
    name = str(source)
    if name.startswith(("http://", "https://")):
        data = fetch_url(name)
        return decode_image_bytes(data, name, max_pixels)
    problem = path_problem(name)
    if problem:
        raise UadkitError(problem)
    try:
        # Non-blocking open + fstat: a file swapped for a FIFO after the check above cannot hang us.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UadkitError(f"{name}: cannot be read ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        problem = _not_regular(name, os.fstat(fd).st_mode)
        if problem:
            raise UadkitError(problem)
        if os.fstat(fd).st_size == 0:
            raise UadkitError(f"{name}: empty file, expected an image")
        return _decode(f, name, max_pixels)


def decode_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                       setting: str = "Predict.max_pixels") -> np.ndarray:
    if not data:
        raise UadkitError(f"{name}: empty file, expected an image")
    return _decode(io.BytesIO(data), name, max_pixels, setting)


def _decode(f, name: str, max_pixels: int, setting: str = "Predict.max_pixels") -> np.ndarray:
    """Header first (format and size, checked against the budget), then the pixels of the first frame."""
    try:
        img = Image.open(f, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:
        raise UadkitError(f"{name}: not an image (unrecognised format)") from e
    except Image.DecompressionBombError as e:
        raise UadkitError(f"{name}: image too large ({e})") from e
    except Exception as e:  # a damaged header can make any image plugin raise anything
        raise UadkitError(f"{name}: corrupt or truncated image ({_reason(e)})") from e
    with img:
        check_pixels(*img.size, name, max_pixels, setting)
        try:
            img.load()
        except MemoryError as e:
            raise UadkitError(f"{name}: out of memory decoding a {img.size[0]}x{img.size[1]} image") from e
        except Exception as e:
            raise UadkitError(f"{name}: corrupt or truncated image ({_reason(e)})") from e
        try:
            return to_rgb_uint8(img)
        except MemoryError as e:
            raise UadkitError(f"{name}: out of memory converting a {img.size[0]}x{img.size[1]} image") from e
        except Exception as e:
            raise UadkitError(f"{name}: cannot convert a {img.mode} image to RGB ({_reason(e)})") from e


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())  # one line, whatever the plugin put in its message
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


class _AllowListRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to http(s) on an allowed host, and only a few times."""

    max_redirections = URL_MAX_REDIRECTS

    def __init__(self, allowed_hosts: Collection[str] | None, deadline: float) -> None:
        self.allowed_hosts, self.deadline = allowed_hosts, deadline

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        parts = urllib.parse.urlsplit(newurl)
        if parts.scheme not in ("http", "https"):
            raise UadkitError(f"{req.full_url}: redirected to a non-http(s) URL, refused")
        if self.allowed_hosts is not None and not host_allowed(newurl, self.allowed_hosts):
            raise UadkitError(f"{req.full_url}: redirected to '{parts.netloc}', which is not in the URL allow-list")
        if time.monotonic() > self.deadline:
            raise UadkitError(f"{req.full_url}: not downloaded within the time limit")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def host_allowed(url: str, allowed_hosts: Collection[str]) -> bool:
    """An allow-list entry is a host name ("images.example.com") or a host and port ("127.0.0.1:8000")."""
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    return host in allowed_hosts or f"{host}:{port}" in allowed_hosts


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES,
              allowed_hosts: Collection[str] | None = None) -> bytes:
    """GET `url` within `timeout` seconds in total (not per read) and `max_bytes`; with `allowed_hosts`,
    every redirect hop must stay on those hosts."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_AllowListRedirects(allowed_hosts, deadline))
    chunks, size = [], 0
    try:
        with opener.open(url, timeout=timeout) as r:
            sock = getattr(getattr(r.fp, "raw", None), "_sock", None)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UadkitError(f"{url}: not downloaded within {timeout:g} s")
                if sock is not None:  # each read waits at most until the overall deadline
                    sock.settimeout(left)
                chunk = r.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise UadkitError(f"{url}: larger than {max_bytes} bytes")
    except UadkitError:
        raise
    except TimeoutError as e:
        raise UadkitError(f"{url}: not downloaded within {timeout:g} s") from e
    except Exception as e:
        raise UadkitError(f"{url}: could not be downloaded ({_reason(e)})") from e
    return b"".join(chunks)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder`, recursive, sorted, image extensions only.

    Anything named like an image but not a folder is listed (a FIFO, a broken link), so that reading it
    reports what it is instead of it being skipped without a word.
    """
    root = Path(folder)
    return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.is_dir())


def resolve_sources(inputs: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageSource]:
    """Expand a path, folder, URL, numpy array or a list of these into image sources, in order."""
    items: Iterable[Any] = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    out: list[ImageSource] = []
    for k, item in enumerate(items):
        if isinstance(item, np.ndarray):
            try:
                out.append(ImageSource(f"array_{k}", _check_array(item, k, max_pixels)))
            except UadkitError as e:
                out.append(ImageSource(f"array_{k}", error=str(e)))
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
            elif os.path.lexists(name):  # a file, or something that reading will name (FIFO, broken link)
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
        if len(os.fsencode(base)) > 150:  # result files add suffixes: stay under the 255-byte name limit
            base = base[:25] + "_" + hashlib.sha1(os.fsencode(base)).hexdigest()[:10]
        n = seen.get(base, 0)
        seen[base] = n + 1
        s.stem = base if n == 0 else f"{base}_{n}"
    return out


def _check_array(a: np.ndarray, k: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    name = f"input array {k}"
    if a.dtype != np.uint8:
        raise UadkitError(f"{name}: expected dtype uint8, got {a.dtype}")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise UadkitError(f"{name}: expected shape HxW, HxWx3 (or x1, x4), got {a.shape}")
    check_pixels(a.shape[1], a.shape[0], name, max_pixels)
    if a.ndim == 2 or a.shape[2] == 1:
        return np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


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
