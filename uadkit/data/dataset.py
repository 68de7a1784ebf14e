"""A torch Dataset over samples: the same loader and resize as prediction, and with `Model.tiling` the same
tiles (each good image gives all its tiles, each resized to the model's input size)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .formats import Sample
from .image_io import load_image, prepare_image
from .tiling import blank_outside, roi_mask, tile_boxes, touches


class ImageDataset(Dataset):
    def __init__(self, samples: list[Sample], size: tuple[int, int], tiling: dict[str, Any] | None = None,
                 roi: Any = None) -> None:
        self.samples = samples
        self.size = tuple(size)
        self.tiling = tiling
        self.roi = roi
        # (sample index, tile box or None): sizes come from the headers, so nothing is decoded here
        self.items: list[tuple[int, tuple[int, int, int, int] | None]] = [(i, None) for i in range(len(samples))]
        if tiling:
            self.items = []
            for i, s in enumerate(samples):
                with Image.open(s.path) as im:
                    w, h = im.size
                    if im.getexif().get(0x0112) in (5, 6, 7, 8):  # load_image turns these by 90 degrees
                        w, h = h, w
                mask = roi_mask(roi, (h, w))
                self.items += [(i, box) for box in tile_boxes((h, w), tiling) if touches(box, mask)]
        self._last: tuple[int, np.ndarray] | None = None  # tiles of one image come in a row: decode it once

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, i: int) -> np.ndarray:
        if self._last is None or self._last[0] != i:
            image = load_image(self.samples[i].path)
            self._last = (i, blank_outside(image, roi_mask(self.roi, image.shape[:2])))
        return self._last[1]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i, box = self.items[k]
        image = self._image(i)
        if box is not None:
            y0, x0, y1, x1 = box
            image = np.ascontiguousarray(image[y0:y1, x0:x1])
        return torch.from_numpy(prepare_image(image, self.size)), k


def model_dataset(samples: list[Sample], model: Any) -> ImageDataset:
    """What a model trains on: its input size, its tiles when `Model.tiling` is set, its region of interest."""
    return ImageDataset(samples, model.input_size, model.cfg.get("tiling"), model.cfg.get("roi"))
