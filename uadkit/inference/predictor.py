"""The one inference path: load -> prepare -> model -> finish -> AnomalyResult.

Training-time calibration, evaluation, the CLI, the pipeline and the service all call into here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.image_io import ImageSource, prepare_image, resolve_sources
from ..errors import UadkitError
from ..models import AnomalyModel
from .result import AnomalyResult


@dataclass
class Scored:
    """Model output for one image at its original size."""

    raw_map: np.ndarray     # float32 HxW, raw units
    raw_score: float
    norm_map: np.ndarray    # float32 HxW in [0, 1], pixel threshold at 0.5
    norm_score: float       # in [0, 1], image threshold at 0.5


@torch.no_grad()
def score_images(model: AnomalyModel, images: Sequence[np.ndarray], device: torch.device,
                 with_raw: bool = True) -> list[Scored]:
    """Score a batch of RGB uint8 images of any sizes; maps come back at each image's own size."""
    size = model.input_size
    batch = torch.from_numpy(np.stack([prepare_image(im, size) for im in images])).to(device)
    amap, score, nmap, nscore = model.scores(batch)
    out = []
    for i, im in enumerate(images):
        hw = im.shape[:2]
        up = F.interpolate(torch.stack([amap[i], nmap[i]]) if with_raw else nmap[i:i + 1],
                           size=hw, mode="bilinear", align_corners=False)
        raw = up[0, 0].float().cpu().numpy() if with_raw else np.empty(0, np.float32)
        out.append(Scored(raw, float(score[i]), up[-1, 0].float().cpu().numpy(), float(nscore[i])))
    return out


class Predictor:
    """Batched prediction over any mix of sources; yields one AnomalyResult per image, in order."""

    def __init__(self, model: AnomalyModel, device: torch.device, threshold: float | None = None) -> None:
        if not bool(model.is_calibrated):
            raise UadkitError(f"this {model.name} model is not trained: train it (model.train(dataset_dir=...)) "
                              "or load a trained one with create_model(model_dir=...)")
        self.model = model.to(device).eval()
        self.device = device
        self.threshold = 0.5 if threshold is None else float(threshold)

    def result(self, source: ImageSource, image: np.ndarray, s: Scored) -> AnomalyResult:
        anomalous = s.norm_score >= self.threshold
        return AnomalyResult(
            image=image,
            stem=source.stem or None,
            input_path=source.name,
            pred_score=round(s.norm_score, 6),
            pred_label="anomalous" if anomalous else "normal",
            threshold=self.threshold,
            raw_score=round(s.raw_score, 8),
            image_size=[int(image.shape[1]), int(image.shape[0])],
            anomaly_map=s.norm_map,
            pred_mask=(s.norm_map >= self.threshold).astype(np.uint8),
        )

    def run(self, sources: Sequence[ImageSource], images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """Score already-loaded images as one batch."""
        scored = score_images(self.model, list(images), self.device, with_raw=False)
        return [self.result(src, im, sc) for src, im, sc in zip(sources, images, scored)]

    def __call__(self, inputs, batch_size: int = 1, num_workers: int = 0) -> Iterator[AnomalyResult]:
        """Results in input order. `num_workers` > 0 decodes images in that many loader processes."""
        if batch_size < 1:
            raise UadkitError(f"batch_size: expected a positive integer, got {batch_size}")
        sources = resolve_sources(inputs) if not _is_source_list(inputs) else inputs
        if num_workers > 0:
            loader = DataLoader(_SourceDataset(sources), batch_size=batch_size, num_workers=num_workers,
                                collate_fn=list)
            for items in loader:
                yield from self.run([s for s, _ in items], [im for _, im in items])
            return
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            yield from self.run(chunk, [s.load() for s in chunk])


def _is_source_list(inputs) -> bool:
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(s, ImageSource) for s in inputs)


class _SourceDataset(Dataset):
    """Loads (decodes) images in DataLoader worker processes; the model stays in the main process."""

    def __init__(self, sources: list[ImageSource]) -> None:
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[ImageSource, np.ndarray]:
        return self.sources[i], self.sources[i].load()
