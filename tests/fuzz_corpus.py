"""A corpus of broken and odd image inputs, generated at test time (nothing large is committed).

`make_corpus(folder)` writes about 250 files, links and FIFOs into one flat folder and returns a Case for
each: truncated files at many points, bit flips, wrong extensions, 16-bit / float / CMYK / palette / 1-bit /
LA / LAB images, multi-frame files, 1x1 and 1x10000 images, decompression bombs (tiny files whose headers
claim hundreds of megapixels), EXIF rotations, odd file names (':', '#', spaces, unicode, bytes that are
not UTF-8, 200-character names), symbolic links (good, broken, looping, to /dev/zero), a FIFO and non-image
content. `odd_arrays()` gives the numpy inputs of the same spirit. Seeded: the same corpus every run.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

MUST_WORK, MUST_FAIL, EITHER = True, False, None


@dataclass
class Case:
    path: str
    kind: str
    ok: bool | None       # True: must give a result; False: must give a one-line error; None: either
    regular: bool = True  # a plain file whose bytes can be sent to the service


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(w: int, h: int, bit_depth: int = 1, colour: int = 0, rows: int | None = None) -> bytes:
    """A PNG of w x h zero pixels, compressed row by row (never held in memory); `rows` cuts it short."""
    bpp = {0: 1, 2: 3}[colour] * bit_depth / 8
    row = b"\0" * (1 + int(np.ceil(w * bpp)))
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def make_corpus(root: str) -> list[Case]:
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1234)
    cases: list[Case] = []

    def add(name: str | bytes, data: bytes, kind: str, ok: bool | None) -> None:
        path = os.path.join(os.fsencode(root), name) if isinstance(name, bytes) else os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(data)
        cases.append(Case(os.fsdecode(path), kind, ok))

    noise = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    smooth = (np.linspace(0, 255, 64)[None, :, None] * np.ones((48, 1, 3))).astype(np.uint8)
    rgb = Image.fromarray(np.where(rng.random((48, 64, 1)) < 0.5, noise, smooth))
    bases = {
        "png": _encode(rgb, "PNG"), "jpg": _encode(rgb, "JPEG", quality=90),
        "progressive.jpg": _encode(rgb, "JPEG", progressive=True), "gif": _encode(rgb.convert("P"), "GIF"),
        "bmp": _encode(rgb, "BMP"), "tif": _encode(rgb, "TIFF", compression="tiff_deflate"),
        "webp": _encode(rgb, "WEBP", quality=80),
    }
    for ext, data in bases.items():
        add(f"valid.{ext}", data, "valid", MUST_WORK)
    # Truncated at many points, header to tail.
    for ext, data in bases.items():
        n = len(data)
        cuts = sorted({1, 2, 4, 8, 12, 16, 24, 33, 50, 64, 100, 150} | {int(n * f) for f in (0.25, 0.5, 0.75, 0.9)}
                      | {n - 16, n - 1})
        for cut in (c for c in cuts if 0 < c < n):
            add(f"trunc_{cut:05d}.{ext.replace('progressive.', 'prog_')}", data[:cut], "truncated", EITHER)
    # Random bit flips.
    for ext in ("png", "jpg", "gif", "tif"):
        for k in range(8):
            buf = bytearray(bases[ext])
            for pos in rng.integers(0, len(buf), int(rng.integers(1, 9))):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
            add(f"flip_{k}.{ext}", bytes(buf), "bit flips", EITHER)
    # Wrong extensions: the content decides.
    for src, ext in (("png", "jpg"), ("jpg", "png"), ("bmp", "tif"), ("webp", "bmp"), ("gif", "jpeg"),
                     ("tif", "webp"), ("png", "tiff"), ("jpg", "PNG")):
        add(f"is_{src}_named.{ext}", bases[src], "wrong extension", MUST_WORK)
    add("ppm_named.png", _encode(rgb, "PPM"), "wrong extension", MUST_WORK)
    add("ico_named.jpg", _encode(rgb, "ICO"), "wrong extension", MUST_WORK)
    add("pcx_named.bmp", _encode(rgb, "PCX"), "wrong extension", MUST_WORK)
    add("tga_named.png", _encode(rgb, "TGA"), "wrong extension", EITHER)  # TGA has no signature
    # Modes.
    g16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    add("gray16.png", _encode(Image.fromarray(g16), "PNG"), "16-bit", MUST_WORK)
    add("gray16.tif", _encode(Image.fromarray(g16), "TIFF"), "16-bit", MUST_WORK)
    add("gray16be.tif", _encode(Image.fromarray(g16).convert("I;16B"), "TIFF"), "16-bit", MUST_WORK)
    add("int32.tif", _encode(Image.fromarray(g16.astype(np.int32) * 9), "TIFF"), "32-bit", MUST_WORK)
    flt = np.linspace(-1, 2, 48 * 64, dtype=np.float32).reshape(48, 64)
    flt[0, :4] = [np.nan, np.inf, -np.inf, 0]
    add("float_nan.tif", _encode(Image.fromarray(flt), "TIFF"), "float", MUST_WORK)
    add("cmyk.jpg", _encode(rgb.convert("CMYK"), "JPEG"), "CMYK", MUST_WORK)
    add("cmyk.tif", _encode(rgb.convert("CMYK"), "TIFF"), "CMYK", MUST_WORK)
    add("palette.png", _encode(rgb.convert("P"), "PNG"), "palette", MUST_WORK)
    pt = rgb.convert("P")
    pt.info["transparency"] = 0
    add("palette_transparent.png", _encode(pt, "PNG", transparency=0), "palette", MUST_WORK)
    add("palette_transparent.gif", _encode(pt, "GIF", transparency=0), "palette", MUST_WORK)
    add("onebit.png", _encode(rgb.convert("1"), "PNG"), "1-bit", MUST_WORK)
    add("onebit.bmp", _encode(rgb.convert("1"), "BMP"), "1-bit", MUST_WORK)
    add("onebit.tif", _encode(rgb.convert("1"), "TIFF"), "1-bit", MUST_WORK)
    add("gray.jpg", _encode(rgb.convert("L"), "JPEG"), "gray", MUST_WORK)
    add("la.png", _encode(rgb.convert("LA"), "PNG"), "gray+alpha", MUST_WORK)
    add("rgba.png", _encode(rgb.convert("RGBA"), "PNG"), "alpha", MUST_WORK)
    add("rgba.webp", _encode(rgb.convert("RGBA"), "WEBP", lossless=True), "alpha", MUST_WORK)
    add("ycbcr.tif", _encode(rgb.convert("YCbCr"), "TIFF"), "YCbCr", EITHER)
    add("lab.tif", _encode(rgb.convert("LAB"), "TIFF"), "LAB", EITHER)
    # Multi-frame files: the first frame is the image.
    frames = [Image.fromarray(np.roll(np.asarray(rgb), 8 * k, axis=1)) for k in range(3)]
    add("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "multi-frame", MUST_WORK)
    add("multipage.tif", _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "multi-frame",
        MUST_WORK)
    add("animated.png", _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), "multi-frame",
        MUST_WORK)
    add("animated.webp", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]), "multi-frame",
        MUST_WORK)
    tiny = [Image.new("P", (4, 4), k % 7) for k in range(300)]
    add("many_frames.gif", _encode(tiny[0], "GIF", save_all=True, append_images=tiny[1:]), "multi-frame",
        MUST_WORK)
    # Extreme shapes.
    for w, h in ((1, 1), (1, 10000), (10000, 1), (2, 2), (3, 7000)):
        add(f"shape_{w}x{h}.png", _encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "PNG"),
            "extreme shape", MUST_WORK)
    add("shape_1x1.jpg", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"), "extreme shape", MUST_WORK)
    add("shape_1x1.gif", _encode(Image.new("P", (1, 1)), "GIF"), "extreme shape", MUST_WORK)
    # Decompression bombs and headers that claim huge sizes.
    add("bomb_20000x20000_1bit.png", png_bomb(20000, 20000), "decompression bomb", MUST_FAIL)
    add("bomb_6300x6300_rgb.png", png_bomb(6300, 6300, 8, 2), "decompression bomb", MUST_FAIL)
    add("bomb_100000x100000_header.png", png_bomb(100000, 100000, rows=2), "decompression bomb", MUST_FAIL)
    add("bomb_60000x60000.gif", _patch(_patch(bases["gif"], 6, struct.pack("<HH", 60000, 60000)),
                                       bases["gif"].index(b",") + 5, struct.pack("<HH", 60000, 60000)),
        "decompression bomb", MUST_FAIL)
    sof = bases["jpg"].index(b"\xff\xc0")
    add("bomb_65000x65000.jpg", _patch(bases["jpg"], sof + 5, struct.pack(">HH", 65000, 65000)),
        "decompression bomb", MUST_FAIL)
    add("bomb_30000x30000.bmp", _patch(bases["bmp"], 18, struct.pack("<ii", 30000, 30000)), "decompression bomb",
        MUST_FAIL)
    lossless = _encode(rgb, "WEBP", lossless=True)
    vp8l = lossless.index(b"VP8L") + 9  # 14-bit width-1, 14-bit height-1 after the 0x2f signature
    add("bomb_16384x16384.webp", _patch(lossless, vp8l, struct.pack("<I", 16383 | 16383 << 14)),
        "decompression bomb", MUST_FAIL)
    # EXIF orientations 1..8.
    wide = Image.fromarray(np.asarray(rgb)[:, :64])
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        add(f"exif_orientation_{o}.jpg", _encode(wide, "JPEG", exif=exif.tobytes()), "EXIF-rotated", MUST_WORK)
    # Not images at all.
    for name, data in (("empty.png", b""), ("text.png", b"hello, not an image\n"), ("html.jpg", b"<html></html>"),
                       ("json.png", b'{"image": 1}'), ("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
                       ("pdf.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"), ("zip.png", b"PK\x03\x04" + bytes(40)),
                       ("elf.bmp", b"\x7fELF" + bytes(60)), ("zeros.png", bytes(1024)),
                       ("signature_only.png", b"\x89PNG\r\n\x1a\n"), ("soi_only.jpg", b"\xff\xd8"),
                       ("gif_header_only.gif", b"GIF89a"), ("bm_only.bmp", b"BM"),
                       ("riff_only.webp", b"RIFF\x00\x00\x00\x00WEBP"), ("tiff_header_only.tif", b"II*\x00"),
                       ("mm_tiff_header.tif", b"MM\x00*\x00\x00\x00\x08\x00\x00"),
                       ("postscript.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"),
                       ("fits.jpg", b"SIMPLE  =                    T" + b" " * 50 + b"END" + b" " * 77)):
        add(name, data, "not an image", MUST_FAIL)
    for k in range(6):
        add(f"random_{k}.png", rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes(),
            "random bytes", MUST_FAIL)
    # Odd file names with valid content.
    for name in ("colon: space.png", "hash #1.png", "two  spaces .png", "ünïcödé 画像.png", "-leading-dash.png",
                 "quote's \"dq\".png", "%41 percent.png", "[brackets] {braces}.png", "star*?.png",
                 "back\\slash.png", "semi;colon&amp.png", "tab\tname.png", ".hidden.png", "UPPER.PNG",
                 "dots...png", "emoji 😀.png", "x" * 200 + ".png", "=equals=.png"):
        add(name, bases["png"], "odd name", MUST_WORK)
    add(b"not-utf8-\xff\xfe.png", bases["png"], "odd name", MUST_WORK)
    # Links, a FIFO, a folder named like an image.
    good = os.path.join(root, "valid.png")
    for name, target, ok in (("link_to_good.png", good, MUST_WORK), ("link_to_dev_zero.png", "/dev/zero", MUST_FAIL),
                             ("link_to_dev_null.png", "/dev/null", MUST_FAIL),
                             ("broken_link.png", os.path.join(root, "missing.png"), MUST_FAIL),
                             ("link_loop.png", os.path.join(root, "link_loop.png"), MUST_FAIL)):
        path = os.path.join(root, name)
        os.symlink(target, path)
        cases.append(Case(path, "link", ok, regular=ok is MUST_WORK))
    fifo = os.path.join(root, "fifo.png")
    os.mkfifo(fifo)
    cases.append(Case(fifo, "FIFO", MUST_FAIL, regular=False))
    os.mkdir(os.path.join(root, "folder.png"))  # a folder with an image name: not an input, never listed
    return cases


def odd_arrays() -> list[tuple[str, np.ndarray, bool | None]]:
    """(name, array, ok) for the API: zero-size, wrong dtype / rank / channels, views, huge."""
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out: list[tuple[str, np.ndarray, bool | None]] = []
    for shape in ((0, 0, 3), (0, 10, 3), (10, 0, 3), (0, 0), (0, 5), (0,), (), (0, 0, 0)):
        out.append((f"empty {shape}", np.zeros(shape, np.uint8), MUST_FAIL))
    for dtype in (np.float32, np.float64, np.int16, np.uint16, np.int64, bool, np.int8, object):
        out.append((f"dtype {np.dtype(dtype).name}", img.astype(dtype), MUST_FAIL))
    nan = img.astype(np.float32)
    nan[0, 0] = np.nan
    out.append(("float with NaN", nan, MUST_FAIL))
    for shape in ((40,), (40, 50, 2), (40, 50, 5), (2, 40, 50, 3), (1, 1, 1, 1, 1), (3, 40, 50)):
        out.append((f"shape {shape}", np.zeros(shape, np.uint8), MUST_FAIL))
    out += [
        ("gray HxW", img[..., 0].copy(), MUST_WORK), ("HxWx1", img[..., :1].copy(), MUST_WORK),
        ("RGBA", np.concatenate([img, img[..., :1]], axis=2), MUST_WORK), ("1x1", img[:1, :1].copy(), MUST_WORK),
        ("1x10000", rng.integers(0, 256, (1, 10000, 3), dtype=np.uint8), MUST_WORK),
        ("10000x1", rng.integers(0, 256, (10000, 1, 3), dtype=np.uint8), MUST_WORK),
        ("strided view", img[::2, ::3], MUST_WORK), ("negative strides", img[::-1, ::-1], MUST_WORK),
        ("Fortran order", np.asfortranarray(img), MUST_WORK), ("channel view BGR", img[..., ::-1], MUST_WORK),
        ("read-only", _read_only(img.copy()), MUST_WORK),
        ("broadcast huge", np.broadcast_to(img[:1, :1], (30000, 30000, 3)), MUST_FAIL),
        ("broadcast small", np.broadcast_to(img[:1, :1], (20, 30, 3)), MUST_WORK),
        ("masked array", np.ma.masked_array(img), MUST_WORK),
    ]
    return out


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a
