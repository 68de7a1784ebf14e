"""Tiling and regions of interest: the helpers the one inference path (inference/predictor.py) and the
training datasets share.

`Model.tiling: {tile_size: [h, w], stride: [h, w]}` splits each image at full resolution into tiles that
cover it to its edges (the last tile of a row/column is aligned to the edge, so it may overlap more); each
tile is resized to the model's input size and scored; maps are stitched back at the original size,
averaging overlaps. `Model.roi` is a list of rectangles `[x0, y0, x1, y1]` in original-image pixels, a mask
image path (white = inspect), or the run-length encoding a mask path is stored as (so model.yaml and
inference.yml carry it). Pixels outside it are blanked before the model sees them, in training and in
scoring alike, so nothing there can reach a feature inside it; the map is zero outside and the image score
comes from inside only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import UadkitError


def _pair(key: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise UadkitError(f"config key '{key}': expected [height, width] integers, got {value!r}")
    if min(value) < 1:
        raise UadkitError(f"config key '{key}': expected positive sizes, got {list(value)}")
    return int(value[0]), int(value[1])


def check_tiling(tiling: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(tile_size, stride) from `Model.tiling`, or None when off; a bad value is a one-line error naming the key."""
    if tiling is None:
        return None
    if not isinstance(tiling, dict) or set(tiling) - {"tile_size", "stride"} or "tile_size" not in tiling:
        raise UadkitError(f"config key 'Model.tiling': expected null or {{tile_size: [h, w], stride: [h, w]}}, "
                          f"got {tiling!r}")
    tile = _pair("Model.tiling.tile_size", tiling["tile_size"])
    stride = _pair("Model.tiling.stride", tiling.get("stride", list(tile)))
    if stride[0] > tile[0] or stride[1] > tile[1]:
        raise UadkitError(f"config key 'Model.tiling.stride': {list(stride)} is larger than the tile "
                          f"{list(tile)}, which would leave gaps between tiles")
    return tile, stride


def _starts(length: int, tile: int, stride: int) -> list[int]:
    last = length - tile
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:  # not a multiple of the stride: one more tile aligned to the edge
        starts.append(last)
    return starts


def tile_boxes(shape: tuple[int, int], tiling: Any) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of the tiles covering an image of `shape` (h, w) to its edges, row by row."""
    (th, tw), (sh, sw) = check_tiling(tiling)
    h, w = shape[:2]
    if th > h or tw > w:
        raise UadkitError(f"config key 'Model.tiling.tile_size': the tile {th}x{tw} (h x w) is larger than the "
                          f"image {h}x{w}; use a smaller tile or no tiling")
    return [(y, x, y + th, x + tw) for y in _starts(h, th, sh) for x in _starts(w, tw, sw)]


class Stitcher:
    """Accumulates tile maps into one map at the original size; overlaps are averaged."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.total = np.zeros(shape[:2], np.float32)
        self.count = np.zeros(shape[:2], np.float32)

    def add(self, box: tuple[int, int, int, int], tile_map: np.ndarray) -> None:
        y0, x0, y1, x1 = box
        self.total[y0:y1, x0:x1] += tile_map
        self.count[y0:y1, x0:x1] += 1

    def result(self) -> np.ndarray:
        return self.total / np.maximum(self.count, 1)


def stitch(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]], maps: list[np.ndarray]) -> np.ndarray:
    s = Stitcher(shape)
    for box, m in zip(boxes, maps):
        s.add(box, m)
    return s.result()


# -- regions of interest ---------------------------------------------------------------------------------
def _is_rle(roi: Any) -> bool:
    return isinstance(roi, dict) and set(roi) >= {"size", "counts"}


def _check_rects(roi: list) -> None:
    for r in roi:
        if (not isinstance(r, (list, tuple)) or len(r) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)):
            raise UadkitError(f"config key 'Model.roi': expected rectangles [x0, y0, x1, y1] in image pixels, "
                              f"got {r!r}")
        if not (0 <= r[0] < r[2] and 0 <= r[1] < r[3]):
            raise UadkitError(f"config key 'Model.roi': rectangle {list(r)} needs 0 <= x0 < x1 and 0 <= y0 < y1")


def check_roi(roi: Any) -> None:
    """A one-line error naming `Model.roi` unless it is null, rectangles, a mask image path or a stored RLE."""
    if roi is None or _is_rle(roi):
        return
    if isinstance(roi, str):
        if not os.path.isfile(roi):
            raise UadkitError(f"config key 'Model.roi': mask image '{roi}' does not exist")
        return
    if not isinstance(roi, list) or not roi:
        raise UadkitError(f"config key 'Model.roi': expected null, a mask image path or a list of rectangles "
                          f"[[x0, y0, x1, y1], ...], got {roi!r}")
    _check_rects(roi)


def stored_roi(roi: Any) -> Any:
    """What a model keeps in its config: rectangles as they are, a mask image as its run-length encoding, so
    model.yaml and inference.yml carry the region and nothing depends on the mask file later."""
    check_roi(roi)
    if not isinstance(roi, str):
        return roi
    from ..inference.result import encode_rle
    from .image_io import load_mask

    mask = load_mask(roi)
    if not mask.any():
        raise UadkitError(f"config key 'Model.roi': mask image '{roi}' has no white (inspected) pixels")
    return encode_rle(mask)


def roi_mask(roi: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The region as a bool (h, w) mask for an image of `shape`, or None for no region (inspect everything)."""
    if roi is None:
        return None
    h, w = shape[:2]
    if _is_rle(roi):
        from ..inference.result import decode_rle

        if tuple(roi["size"]) != (h, w):
            raise UadkitError(f"config key 'Model.roi': the region mask is {roi['size'][1]}x{roi['size'][0]} but the "
                              f"image is {w}x{h}; use a mask of the camera's image size or rectangles")
        return decode_rle(roi).astype(bool)
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in roi:  # rectangles past the image edge are clipped to it
        mask[max(0, int(y0)):min(h, int(round(y1))), max(0, int(x0)):min(w, int(round(x1)))] = True
    return mask


def blank_outside(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image with pixels outside the region set to black: the same for every image, so the model learns
    the blank as normal, and a defect outside cannot move any feature (a backbone sees far past its pixel)."""
    if mask is None:
        return image
    return np.where(mask[..., None], image, 0).astype(np.uint8)


def touches(box: tuple[int, int, int, int], mask: np.ndarray | None) -> bool:
    """Whether a tile holds any inspected pixel (tiles wholly outside the region are neither learnt nor scored)."""
    y0, x0, y1, x1 = box
    return mask is None or bool(mask[y0:y1, x0:x1].any())
