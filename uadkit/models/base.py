"""The model contract: a plain nn.Module whose forward maps [0, 1] images to a raw anomaly map + score.

Everything else (loading images, resizing, training loop, calibration, normalisation, results) is
shared and lives outside the model, so a new model only says how it scores and how it learns.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FeatureExtractor
from ..errors import UadkitError

SCORE_OUTPUTS = ("raw_map", "raw_score", "norm_map", "norm_score")  # what `scores` returns, in order
LN19 = math.log(19.0)  # sigmoid(-ln 19) = 0.05: the median good image lands at a normalised 0.05


def _kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(4 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


@functools.lru_cache(maxsize=256)
def _axis_matrix(n_out: int, n_in: int, margin: int, border: str) -> torch.Tensor:
    """(n_out + 2 margin, n_in) float64: bilinear upsampling along one axis with F.interpolate's weights
    (align_corners=False), extended `margin` pixels past each end.

    `mean`: past the outermost cell centres the map falls towards zero, and `to_input_size` adds back the map's
    mean there, so a border cell rises and falls like any other. F.interpolate instead holds the border cell
    flat over half a cell, and smoothing with the image edge reflected doubles that plateau back in: a one-cell
    bump at stride 8 (256 px, sigma 4, top-0.1 % mean) scored 1.4x its value inside the image on an edge and
    1.9x in a corner, so good images' highest scores gathered on the border (README). `clamp` is that map, the
    exact pre-2026-11-27 result, kept for folders saved before `Model.map_border`."""
    u = torch.arange(-margin, n_out + margin, dtype=torch.float64)
    if border == "clamp":
        u = u.abs()  # the smoothing reflected the upsampled map about its edge pixels
        u = torch.where(u > n_out - 1, 2 * (n_out - 1) - u, u)
    x = (u + 0.5) * (n_in / n_out) - 0.5  # the source coordinate of each output pixel's centre
    if border == "clamp":
        x = x.clamp(0, n_in - 1)
    i0 = x.floor().long()
    f = x - i0
    rows = torch.arange(len(u))
    m = torch.zeros(len(u), n_in, dtype=torch.float64)
    for idx, w in ((i0, 1 - f), (i0 + 1, f)):  # weights on cells outside the map are dropped (zero there)
        ok = (idx >= 0) & (idx < n_in)
        m.index_put_((rows[ok], idx[ok]), w[ok], accumulate=True)
    return m


@functools.lru_cache(maxsize=256)
def _smooth_matrix(n_out: int, n_in: int, sigma: float, border: str) -> torch.Tensor:
    """(n_out, n_in) float64: upsampling, then Gaussian smoothing, along one axis (one map: both are linear)."""
    if sigma <= 0:
        return _axis_matrix(n_out, n_in, 0, border)
    k = _kernel(sigma)
    r = (len(k) - 1) // 2
    up = _axis_matrix(n_out, n_in, r, border)
    return up.unfold(0, 2 * r + 1, 1) @ k  # row i: the kernel over canvas rows i .. i + 2r


def to_input_size(maps: list[torch.Tensor], size: tuple[int, int], sigma: float, combine: str = "product",
                  border: str = "mean") -> torch.Tensor:
    """Coarse (B, 1, h, w) maps -> one (B, 1, H, W) map: each upsampled bilinearly, multiplied (or summed),
    then smoothed with a Gaussian of `sigma` px (0: not smoothed). `border` (`_axis_matrix`): `mean`, each
    map continues past the image at its own mean, so no position is favoured; `clamp`, the old maps.
    Matrix products per axis: one map's upsampling and smoothing fold into one small matrix, cheaper than both
    done on the full-size map, and the graph exports as MatMuls."""
    h_out, w_out = int(size[0]), int(size[1])  # plain ints: an exported graph holds the matrices as constants
    dev, dt = maps[0].device, maps[0].dtype
    # with `mean`, the matrices extend the map by zeros: subtract its mean first and add it back after
    means = [m.mean((-2, -1), keepdim=True) if border == "mean" else None for m in maps]
    if len(maps) == 1:
        m, c = maps[0], means[0]
        ry = _smooth_matrix(h_out, int(m.shape[-2]), float(sigma), border).to(dev, dt)
        rx = _smooth_matrix(w_out, int(m.shape[-1]), float(sigma), border).to(dev, dt)
        return ry @ m @ rx.T if c is None else ry @ (m - c) @ rx.T + c  # smoothing keeps a constant as it is
    k = _kernel(sigma) if sigma > 0 else None
    r = 0 if k is None else (len(k) - 1) // 2
    out = None
    for m, c in zip(maps, means):  # each on a canvas r px wider than the image: the smoothing needs no padding
        uy = _axis_matrix(h_out, int(m.shape[-2]), r, border).to(dev, dt)
        ux = _axis_matrix(w_out, int(m.shape[-1]), r, border).to(dev, dt)
        u = uy @ m @ ux.T if c is None else uy @ (m - c) @ ux.T + c
        out = u if out is None else (out * u if combine == "product" else out + u)
    if k is None:
        return out
    k = k.to(dev, dt)
    return F.conv2d(F.conv2d(out, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def topk_count(frac: float, area: int) -> int:
    """How many of the highest map pixels `Model.image_topk` averages over `area` pixels (at least one)."""
    return max(1, round(frac * area))


def hard_mean(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the values above their `quantile` along the last axis (at least one per row): a loss that
    teaches only what is still predicted worst (EfficientAD's hard-feature loss, STFPM's `hard_quantile`)."""
    k = max(1, int(values.shape[-1] * (1 - quantile)))
    return values.topk(k, dim=-1).values.mean()


def squash(x: torch.Tensor, threshold: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two-sided logistic: sigmoid((x - t) / s), s = `low` below the threshold and `high` above it."""
    return torch.sigmoid((x - threshold) / torch.where(x < threshold, low, high))


class AnomalyModel(nn.Module):
    """Base class. Subclasses set the class attributes and implement `raw_map` plus how they learn."""

    name: ClassVar[str]
    model_defaults: ClassVar[dict[str, Any]] = {}
    train_defaults: ClassVar[dict[str, Any]] = {}
    trainable: ClassVar[bool] = False  # True: gradient training loop; False: one `fit` pass over features
    # the runtime `Predict.run_mode: auto` picks: the fastest one measured at equal results (bench_runtime.py)
    preferred_runtime: ClassVar[str] = "onnxruntime"
    # raised when the exported graph's formulation changes (its results do not): folders exported with an
    # older one are exported again when they are loaded (inference.yml's graph_version, engine/export.py)
    graph_version: ClassVar[int] = 1
    position_tied: ClassVar[bool] = False  # statistics per map position: cannot share one model over tiles

    def __init__(self, model_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = dict(model_cfg)
        if self.cfg.get("roi") is not None:  # a mask image becomes its RLE: the saved config carries the region
            from ..data.tiling import stored_roi

            self.cfg["roi"] = stored_roi(self.cfg["roi"])
        self.input_size = tuple(model_cfg["input_size"])
        self.smoothing_sigma = float(model_cfg.get("smoothing_sigma") or 0.0)
        # how coarse maps meet the image border (`to_input_size`); new configs say `mean` (config.COMMON), and a
        # config without the key was saved before it: `clamp`, the maps its thresholds were calibrated on
        self.map_border = str(model_cfg.get("map_border", "clamp"))
        self.map_combine = "product"  # how several coarse maps make one (STFPM: Model.anomaly_map_mode)
        # Raw-unit image threshold with its scales below / above it, then the same for pixels; see
        # engine/calibration.py. Buffers, so they travel in the weights file and an exported graph.
        self.register_buffer("calibration", torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0]))
        self.register_buffer("is_calibrated", torch.tensor(False))

    @classmethod
    def check_config(cls, model_cfg: dict[str, Any]) -> None:
        """Raise UadkitError naming the `Model.*` key whose value this model cannot use (subclasses call this)."""
        if not 0 <= float(model_cfg.get("image_topk") or 0) < 1:
            raise UadkitError(f"config key 'Model.image_topk': expected a fraction in [0, 1), got "
                              f"{model_cfg['image_topk']!r}")
        if model_cfg.get("map_border", "clamp") not in ("mean", "clamp"):
            raise UadkitError(f"config key 'Model.map_border': expected mean or clamp, "
                              f"got {model_cfg['map_border']!r}")
        if model_cfg.get("roi_score", "max") not in ("rule", "max"):
            raise UadkitError(f"config key 'Model.roi_score': expected rule or max, got {model_cfg['roi_score']!r}")

    @classmethod
    def check_train_config(cls, train_cfg: dict[str, Any]) -> None:
        """Raise UadkitError naming the `Train.*` key whose value this model cannot use."""

    def frozen_backbone(self, default_stages: tuple[str, ...], pretrained: bool) -> FeatureExtractor:
        """The configured backbone with ImageNet weights, frozen; `Model.layers` falls back to the defaults."""
        layers = list(self.cfg.get("layers") or default_stages)
        self.cfg["layers"] = layers
        fe = FeatureExtractor(self.cfg["backbone"], layers, pretrained=pretrained,
                              pretrained_path=self.cfg.get("pretrained_path"))
        fe.requires_grad_(False)
        fe.frozen = True
        return fe.eval()

    def train(self, mode: bool = True) -> AnomalyModel:
        super().train(mode)
        for m in self.modules():  # frozen parts keep their BatchNorm running statistics, always
            if getattr(m, "frozen", False):
                m.eval()
        return self

    # -- scoring -------------------------------------------------------------------------------------
    def coarse_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The model's anomaly maps at their own strides, (B, 1, h, w) each, combined by `map_combine`: the
        one thing most models implement. The base brings them to the input size (`to_input_size`)."""
        return [self.raw_map(images)]  # a model that implements raw_map instead: its map is already full size

    def assemble(self, maps: list[torch.Tensor], size: tuple[int, int], sigma: float) -> torch.Tensor:
        """Coarse maps -> one map at `size`, smoothed by `sigma`, with this model's combination and border."""
        return to_input_size(maps, size, sigma, self.map_combine, self.map_border)

    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) raw anomaly map at input size, before smoothing."""
        return self.assemble(self.coarse_maps(images), images.shape[-2:], 0.0)

    def smoothed_map(self, images: torch.Tensor) -> torch.Tensor:
        """`raw_map` smoothed by `Model.smoothing_sigma`; past the image border the smoothing sees what the
        upsampling puts there (`Model.map_border`), not `raw_map`'s pixels reflected at the edge."""
        return self.assemble(self.coarse_maps(images), images.shape[-2:], self.smoothing_sigma)

    def image_score(self, amap: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """From the smoothed map: its maximum, or with `Model.image_topk` > 0 the mean of that fraction of its
        highest pixels (steadier than one pixel; too large a fraction dilutes defects smaller than it)."""
        flat = amap.flatten(1)
        frac = float(self.cfg.get("image_topk") or 0.0)
        if frac <= 0:
            return flat.amax(1)
        h, w = self.input_size  # the map's size as plain ints (an exported graph traces shapes as tensors)
        return flat.topk(topk_count(frac, h * w), dim=1).values.mean(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.smoothed_map(images)
        return amap, self.image_score(amap, images)

    def normalise(self, amap: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw -> [0, 1] with the calibrated thresholds at exactly 0.5 (monotone, so rankings are kept)."""
        c = self.calibration
        return squash(amap, c[3], c[4], c[5]), squash(score, c[0], c[1], c[2])

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The full scoring path: raw map, raw score, normalised map, normalised score (what is exported)."""
        amap, score = self(images)
        nmap, nscore = self.normalise(amap, score)
        return amap, score, nmap, nscore

    # -- export: `scores(x) == finish(graph(x))`; an exported graph holds `graph`, every runtime runs `finish` --
    def graph_outputs(self) -> list[str]:
        """Names of what `graph` returns (the exported graph's outputs)."""
        return list(SCORE_OUTPUTS)

    def graph(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The part of the scoring path an exported graph holds: all of it, unless a step cannot be traced."""
        return self.scores(images)

    def finish(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`graph`'s outputs -> `scores`' four; runs after the graph in every runtime (default: nothing to do)."""
        return outputs

    def head_state(self) -> dict[str, torch.Tensor]:
        """Tensors `finish` needs, saved beside an exported graph ({}: `finish` does nothing)."""
        return {}

    # -- learning ------------------------------------------------------------------------------------
    def training_targets(self, images: torch.Tensor) -> list[torch.Tensor] | None:
        """Fixed targets for a batch (e.g. frozen-teacher features), cacheable across epochs."""
        return None

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one batch; `extra` is a batch from `extra_batch_source` (None in validation)."""
        raise NotImplementedError

    def configure_optimizers(self, train_cfg: dict[str, Any]
                             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimiser over the trainable parameters, and a schedule the engine steps once per epoch.

        Default (STFPM's): SGD with Train.learning_rate / momentum / weight_decay; Train.lr_scheduler=cosine
        decays to zero over the run (at a constant rate the student keeps jumping between epochs). The engine
        passes Train with `epochs_iters` set to the epochs this run trains (engine/trainer.py `train_epochs`:
        a Train.step_budget becomes whole epochs)."""
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=train_cfg["learning_rate"], momentum=train_cfg["momentum"],
                              weight_decay=train_cfg["weight_decay"])
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train_cfg["epochs_iters"])
                 if train_cfg.get("lr_scheduler", "none") == "cosine" else None)
        return opt, sched

    def on_train_start(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        """Before the first step (also on resume): `batches()` iterates the training images on the device,
        once per call (e.g. statistics of a frozen teacher's channels)."""

    def on_train_end(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        """After the best weights are restored, before calibration: `batches()` iterates the validation
        images (training images when there are none), e.g. for quantiles of the model's maps."""

    def extra_batch_source(self, train_cfg: dict[str, Any]
                           ) -> Callable[[int, torch.Generator], torch.Tensor] | None:
        """A second image stream for `training_loss(extra=...)`: f(batch_size, generator) -> a (B, 3, H, W)
        batch in [0, 1]. The engine seeds the generator per epoch and rank, so a resumed run draws the same."""
        return None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What `fit` learns from, per image batch (the engine computes it, possibly over several processes)."""
        raise NotImplementedError

    def fit(self, features: Iterable[torch.Tensor]) -> dict[str, Any]:
        """One pass over `features(images)` of good-image batches (memory-bank and statistical models)."""
        raise NotImplementedError

    @torch.no_grad()
    def out_of_fold_scores(self, batches: list[torch.Tensor], images: Callable[[list[int]], torch.Tensor],
                           folds: int = 5, scored: np.ndarray | None = None, grid: int = 64
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw image scores, map maxima and maps of fitted images, each from a model that did not see it.

        `batches` are the feature batches `fit` consumed, in order; `images(ids)` gives prepared images;
        `scored` picks which images to score (default all; the results follow its order). The maps (the
        smoothed raw maps, as `forward` gives them) come back averaged down to (len(scored), grid, grid), so
        they stay small: the held-out good maps engine/map_check.py inspects. This default refits a copy on
        k-1 contiguous folds (`fold_model`) and scores the held-out fold; a model whose fit decomposes
        overrides `fold_model` (PaDiM's sums) or this method (PatchCore's per-group coresets) with an equal,
        cheaper rule."""
        per_image = [f for b in batches for f in b.split(1)]
        n, bs = len(per_image), max(len(batches[0]), 1)
        scored = np.arange(n) if scored is None else np.asarray(scored)
        scores, maxima = np.full(n, np.nan), np.full(n, np.nan)
        maps: dict[int, np.ndarray] = {}  # only the scored images' maps are kept
        for fold in np.array_split(np.arange(n), min(folds, n)):
            todo = np.intersect1d(fold, scored)
            if not len(todo):
                continue
            clone = self.fold_model(per_image, fold, bs).eval()
            for j in range(0, len(todo), bs):
                ids = todo[j:j + bs].tolist()
                amap, score = clone(images(ids).to(self.device))
                scores[ids], maxima[ids] = score.cpu().numpy(), amap.flatten(1).amax(1).cpu().numpy()
                maps.update(zip(ids, F.adaptive_avg_pool2d(amap.float(), grid)[:, 0].cpu().numpy()))
        return scores[scored], maxima[scored], np.stack([maps[i] for i in scored.tolist()])

    def fold_model(self, per_image: list[torch.Tensor], held: np.ndarray, batch: int) -> AnomalyModel:
        """A copy of this model fitted on the fitted images' features (`per_image`, one each) except `held`:
        a refit of a copy by default; a model whose fit decomposes overrides it with an equal, cheaper rule."""
        skip = set(held.tolist())
        others = [f for i, f in enumerate(per_image) if i not in skip]
        clone = copy.deepcopy(self)
        clone.fit(torch.cat(others[j:j + batch]) for j in range(0, len(others), batch))
        return clone

    @property
    def device(self) -> torch.device:
        return self.calibration.device

    def summary(self) -> dict[str, Any]:
        """Facts worth reporting after training (sizes of memory banks, parameter counts, ...)."""
        return {"parameters": sum(p.numel() for p in self.parameters()),
                "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad)}
