"""One-pass fitting for memory-bank and statistical models, with the feature cache out-of-fold scoring uses."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm import tqdm

from ..data.dataset import model_dataset
from ..data.formats import Sample
from ..models import AnomalyModel
from .distributed import SINGLE, DistContext

log = logging.getLogger("uadkit")
FEATURE_CACHE_LIMIT = 3 * 1024**3  # bytes of fitted features kept for out-of-fold scoring


def fit_distributed(model: AnomalyModel, samples: list[Sample], batch_size: int, device: torch.device,
                    ctx: DistContext = SINGLE, keep_features: bool = False
                    ) -> tuple[dict[str, Any] | None, list[torch.Tensor] | None]:
    """Fit `model` in one pass over `samples`; returns (fit info, the feature batches if kept).

    With several processes each rank extracts features for its slice of every batch and rank 0 gathers
    them back in sample order, so it fits exactly the rows a single process would. Features are kept
    (on the CPU, rank 0) only while they fit FEATURE_CACHE_LIMIT; otherwise None comes back."""
    model.to(device).eval()  # a fit pass is feature extraction: BatchNorm must use its running statistics
    ds = model_dataset(samples, model)
    groups = [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    cache: list[torch.Tensor] | None = [] if keep_features else None
    cached_bytes = 0

    def features():
        nonlocal cache, cached_bytes
        for ids in tqdm(groups, desc="fitting", unit="batch", dynamic_ncols=True,
                        disable=None if ctx.is_main else True):
            mine = ctx.shard(ids)
            with torch.no_grad():
                # a rank whose share of a short last batch is empty still joins the gather, with no rows
                part = model.features(torch.stack([ds[i][0] for i in mine]).to(device)) if mine else None
            full = ctx.gather_in_order(part, len(ids)) if ctx.active else part
            if not ctx.is_main:
                continue
            if cache is not None:
                cached_bytes += full.numel() * full.element_size()
                if cached_bytes > FEATURE_CACHE_LIMIT:
                    log.warning("features of %d images pass %.1f GB: out-of-fold scoring is skipped (the "
                                "validation split is used)", len(ds), FEATURE_CACHE_LIMIT / 1024**3)
                    cache = None
                else:
                    cache.append(full.cpu())
            yield full.to(device)

    if ctx.is_main:
        info = model.fit(features())
        return info, cache
    for _ in features():  # the other ranks only extract and send
        pass
    return None, None


def image_loader(samples: list[Sample], model: AnomalyModel):
    """ids -> a prepared image batch (the same loader and resize as fitting)."""
    ds = model_dataset(samples, model)
    return lambda ids: torch.stack([ds[i][0] for i in ids])
