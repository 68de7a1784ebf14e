"""The one inference path: load -> prepare -> model -> finish -> AnomalyResult.

Training-time calibration, evaluation, the CLI, the pipeline and the service all call into here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..config import DEFAULT_MAX_PIXELS
from ..data.image_io import ImageSource, prepare_image, resolve_sources
from ..errors import UadkitError
from ..models import AnomalyModel
from .result import AnomalyResult

log = logging.getLogger("uadkit")


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
    if not images:
        return []
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
