"""A torch Dataset over samples: the same loader and resize as prediction."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .formats import Sample
from .image_io import load_image, prepare_image


class ImageDataset(Dataset):
    def __init__(self, samples: list[Sample], size: tuple[int, int]) -> None:
        self.samples = samples
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(prepare_image(load_image(self.samples[i].path), self.size)), i
