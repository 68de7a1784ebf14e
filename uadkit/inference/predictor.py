"""The one inference path: load -> prepare -> model -> finish -> AnomalyResult.

Training-time calibration, evaluation, the CLI, the pipeline and the service all call into here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..config import DEFAULT_MAX_PIXELS
from ..data.image_io import ImageSource, prepare_image, resolve_sources
from ..data.tiling import Stitcher, blank_outside, roi_mask, tile_boxes, touches
from ..engine.device import full_fp32
from ..errors import UadkitError
from ..models import AnomalyModel
from ..models.base import squash, topk_count
from .result import AnomalyResult

log = logging.getLogger("uadkit")


@dataclass
class Scored:
    """Model output for one image at its original size."""

    raw_map: np.ndarray     # float32 HxW, raw units
    raw_score: float
    norm_map: np.ndarray    # float32 HxW in [0, 1], pixel threshold at 0.5
    norm_score: float       # in [0, 1], image threshold at 0.5


TILE_CHUNK = 16  # tiles scored per runtime call: memory stays bounded however large the image


def _calibration(model) -> torch.Tensor:
    """Thresholds and scales of any runtime: the torch model's buffer, an exported one's from inference.yml."""
    return model.calibration.detach().float().cpu()


def _layout(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """A torch model scores channels-last: on 2 CPU cores (`model.scores` alone, 256 px, ms per image at
    batch 1 / 8) EfficientAD 15.7 / 35.8 -> 6.7 / 13.8, STFPM 27.8 / 54.6 -> 13.1 / 37.4, PaDiM 34 / 35 ->
    27 / 27, PatchCore 30 / 48 -> 31 / 41 (depthwise convolutions). Its weights are converted in place when
    they are not yet; saving and export write the usual layout. Exported runtimes take the batch as it is."""
    if not isinstance(model, torch.nn.Module):
        return batch
    cl = torch.channels_last
    if any(p.dim() == 4 and not p.is_contiguous(memory_format=cl) for p in model.parameters()):
        model.to(memory_format=cl)
    return batch.contiguous(memory_format=cl)


@torch.no_grad()
def score_images(model: AnomalyModel, images: Sequence[np.ndarray], device: torch.device,
                 with_raw: bool = True) -> list[Scored]:
    """Score a batch of RGB uint8 images of any sizes; maps come back at each image's own size.

    The model's (or exported runtime's) config decides tiling and region of interest (data/tiling.py), so
    every caller and every runtime applies them the same way."""
    if not images:
        return []
    with full_fp32(device):
        return _score_images(model, images, torch.device(device), with_raw)


def _score_images(model: AnomalyModel, images: Sequence[np.ndarray], device: torch.device,
                  with_raw: bool) -> list[Scored]:
    cfg = getattr(model, "cfg", None) or {}
    tiling, roi = cfg.get("tiling"), cfg.get("roi")
    masks = [roi_mask(roi, im.shape[:2]) for im in images]
    images = [blank_outside(im, m) for im, m in zip(images, masks)]
    if tiling:
        out = [_score_tiled(model, im, device, tiling, m) for im, m in zip(images, masks)]
    else:
        size = model.input_size
        batch = torch.from_numpy(np.stack([prepare_image(im, size) for im in images])).to(device)
        amap, score, nmap, nscore = model.scores(_layout(model, batch))
        out = []
        for i, im in enumerate(images):
            hw = im.shape[:2]
            keep_raw = with_raw or roi is not None
            up = F.interpolate(torch.stack([amap[i], nmap[i]]) if keep_raw else nmap[i:i + 1],
                               size=hw, mode="bilinear", align_corners=False)
            raw = up[0, 0].float().cpu().numpy() if keep_raw else np.empty(0, np.float32)
            out.append(Scored(raw, float(score[i]), up[-1, 0].float().cpu().numpy(), float(nscore[i])))
    if roi is not None:
        out = [_apply_roi(model, sc, m) for sc, m in zip(out, masks)]
    if not with_raw:
        for sc in out:
            sc.raw_map = np.empty(0, np.float32)
    return out


def _score_tiled(model: AnomalyModel, image: np.ndarray, device: torch.device, tiling: dict,
                 mask: np.ndarray | None) -> Scored:
    """Tiles at full resolution -> the model's input size -> scored in chunks -> stitched at the original size.

    The raw map is the average of overlapping tiles; the normalised map is the calibration applied to it (so
    the pixel threshold sits at 0.5 exactly as on the raw map); the image score is the highest tile score
    (the model's own rule within a tile)."""
    boxes = [b for b in tile_boxes(image.shape[:2], tiling) if touches(b, mask)]
    stitcher = Stitcher(image.shape[:2])
    best = -np.inf
    for start in range(0, len(boxes), TILE_CHUNK):
        chunk = boxes[start:start + TILE_CHUNK]
        batch = torch.from_numpy(np.stack([prepare_image(np.ascontiguousarray(image[y0:y1, x0:x1]), model.input_size)
                                           for y0, x0, y1, x1 in chunk])).to(device)
        amap, score, _, _ = model.scores(_layout(model, batch))
        best = max(best, float(score.max()))
        for j, (y0, x0, y1, x1) in enumerate(chunk):
            tile = F.interpolate(amap[j:j + 1].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
            stitcher.add((y0, x0, y1, x1), tile[0, 0].cpu().numpy())
    raw = stitcher.result()
    best = best if boxes else 0.0  # a region that misses the image: nothing to inspect
    c = _calibration(model)
    nmap = squash(torch.from_numpy(raw), c[3], c[4], c[5]).numpy()
    return Scored(raw, best, nmap, float(squash(torch.tensor(best), c[0], c[1], c[2])))


def _apply_roi(model: AnomalyModel, sc: Scored, mask: np.ndarray) -> Scored:
    """Zero the maps outside the region; the image score is the model's own rule (`Model.image_topk`: the
    maximum, or the mean of the highest fraction of the image's or tile's area) applied inside it, normalised
    with the calibration's image scales, so nothing outside can flag the image. Models saved before
    `Model.roi_score` existed were calibrated with the maximum inside the region, and keep it."""
    raw_map = np.where(mask, sc.raw_map, 0).astype(np.float32)
    inside = sc.raw_map[mask]
    cfg = getattr(model, "cfg", None) or {}
    frac = float(cfg.get("image_topk") or 0.0) if cfg.get("roi_score", "max") == "rule" else 0.0
    # k counts pixels of what the model scores at once, the whole image or one tile, as the model counts its
    # input's: a defect of a given size weighs the same with and without a region
    tile = (cfg.get("tiling") or {}).get("tile_size")
    area = min(tile[0], mask.shape[0]) * min(tile[1], mask.shape[1]) if tile else mask.size
    k = min(inside.size, topk_count(frac, area)) if frac > 0 else 1
    raw = float(np.partition(inside, inside.size - k)[inside.size - k:].mean()) if inside.size else 0.0
    c = _calibration(model)
    return Scored(raw_map, raw, np.where(mask, sc.norm_map, 0).astype(np.float32),
                  float(squash(torch.tensor(raw), c[0], c[1], c[2])))


@dataclass
class PredictFailure:
    """An input that could not be predicted: `error` is one line naming the input and the reason."""

    input_path: str
    error: str


class PredictRun:
    """The results of one predict call, in input order (an iterator of AnomalyResult).

    With on_error="skip" a bad input is left out, logged as one line and listed in `failures`; if no input
    at all could be predicted the first failure is raised (there is nothing to go on to). With "stop" the
    first bad input raises. `outcomes()` yields results and failures together, in input order.
    """

    def __init__(self, outcomes: Iterator[AnomalyResult | PredictFailure], on_error: str, n_inputs: int) -> None:
        self._outcomes = outcomes
        self.on_error = on_error
        self.n_inputs = n_inputs
        self.failures: list[PredictFailure] = []
        self.n_results = 0

    def outcomes(self) -> Iterator[AnomalyResult | PredictFailure]:
        for item in self._outcomes:
            if isinstance(item, PredictFailure):
                self.failures.append(item)
                if self.on_error == "stop":
                    raise UadkitError(item.error)
            else:
                self.n_results += 1
            yield item

    def __iter__(self) -> Iterator[AnomalyResult]:
        for item in self.outcomes():
            if isinstance(item, PredictFailure):
                if self.n_inputs > 1:  # a single input's failure is raised below instead
                    log.warning("skipped %s", item.error)
            else:
                yield item
        if self.failures and not self.n_results:
            more = f" (and {len(self.failures) - 1} more inputs failed)" if len(self.failures) > 1 else ""
            raise UadkitError(self.failures[0].error + more)


class Predictor:
    """Batched prediction over any mix of sources; yields one AnomalyResult per image, in order."""

    def __init__(self, model: AnomalyModel, device: torch.device, threshold: float | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not bool(model.is_calibrated):
            raise UadkitError(f"this {model.name} model is not trained: train it (model.train(dataset_dir=...)) "
                              "or load a trained one with create_model(model_dir=...)")
        self.model = model.to(device).eval()
        self.device = device
        self.threshold = 0.5 if threshold is None else float(threshold)
        self.max_pixels = int(max_pixels)

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
        if not images:
            return []
        scored = score_images(self.model, list(images), self.device, with_raw=False)
        return [self.result(src, im, sc) for src, im, sc in zip(sources, images, scored)]

    def __call__(self, inputs, batch_size: int = 1, num_workers: int = 0, on_error: str = "skip") -> PredictRun:
        """Results in input order. `num_workers` > 0 decodes images in that many loader processes."""
        if batch_size < 1:
            raise UadkitError(f"batch_size: expected a positive integer, got {batch_size}")
        if on_error not in ("skip", "stop"):
            raise UadkitError(f"on_error: expected skip or stop, got {on_error!r}")
        sources = resolve_sources(inputs, self.max_pixels) if not _is_source_list(inputs) else inputs
        return PredictRun(self._outcomes(sources, batch_size, num_workers), on_error, len(sources))

    def _outcomes(self, sources: list[ImageSource], batch_size: int,
                  num_workers: int) -> Iterator[AnomalyResult | PredictFailure]:
        for chunk in self._loaded_batches(sources, batch_size, num_workers):
            # A bad file only costs its own result: the good images of its batch are scored together.
            good = [(src, im) for src, im in chunk if not isinstance(im, str)]
            try:
                results = iter(self.run([s for s, _ in good], [im for _, im in good]))
            except MemoryError:
                px = sum(im.shape[0] * im.shape[1] for _, im in good)
                results = None
                why = f"out of memory predicting a batch of {len(good)} images ({px} pixels); lower Predict.batch_size"
            except UadkitError as e:  # e.g. an image smaller than Model.tiling's tile, or not the region's size
                results, why = None, str(e)
            for src, im in chunk:
                if isinstance(im, str):
                    yield PredictFailure(src.name, im)
                elif results is None:
                    yield PredictFailure(src.name, f"{src.name}: {why}")
                else:
                    yield next(results)

    def _loaded_batches(self, sources: list[ImageSource], batch_size: int,
                        num_workers: int) -> Iterator[list[tuple[ImageSource, np.ndarray | str]]]:
        """Batches of (source, image or one-line error), in input order."""
        if num_workers > 0:
            loader = DataLoader(_SourceDataset(sources, self.max_pixels), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=list)
            it = iter(loader)
            while True:
                try:
                    items = next(it)
                except StopIteration:
                    return
                except Exception as e:  # a worker killed (out of memory, signal): one line, not its traceback
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise UadkitError(f"an image-loading worker failed (Predict.num_workers): {first}") from e
                yield [(sources[i], im) for i, im in items]
            return
        for start in range(0, len(sources), batch_size):
            yield [(s, _load(s, self.max_pixels)) for s in sources[start:start + batch_size]]


def _load(source: ImageSource, max_pixels: int) -> np.ndarray | str:
    try:
        return source.load(max_pixels)
    except UadkitError as e:
        return str(e)
    except MemoryError:
        return f"{source.name}: out of memory while loading"


def _is_source_list(inputs) -> bool:
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(s, ImageSource) for s in inputs)


class _SourceDataset(Dataset):
    """Loads (decodes) images in DataLoader worker processes; the model stays in the main process.
    A bad file comes back as its one-line error, not as an exception with a worker traceback."""

    def __init__(self, sources: list[ImageSource], max_pixels: int) -> None:
        self.sources = sources
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | str]:
        return i, _load(self.sources[i], self.max_pixels)
