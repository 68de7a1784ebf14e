"""PatchCore (Roth et al., 2022): a memory bank of locally aware patch features from good images.

A test patch's anomaly score is its distance to the nearest bank entry. Fitting streams the training
images in groups: each group's patches are reduced by greedy k-center selection before the next group
is read, and the kept rows are reduced again to `max_bank_size` whenever they pass twice that. So fitting
holds at most (coreset_group x patches per image + 2 x max_bank_size) x feature dims x 4 bytes, however
many images there are (defaults, Lite0 at 320 px: (16 x 1600 + 400000) x 152 x 4 B = 259 MB).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import backbone_info
from ..errors import UadkitError
from .base import AnomalyModel
from .search import BankSearch, exact_maximum, nearest


def patch_embed(features: list[torch.Tensor]) -> torch.Tensor:
    """3x3 neighbourhood average of each stage, deeper stages upsampled to the first, concatenated."""
    size = features[0].shape[-2:]
    pooled = [F.avg_pool2d(f, 3, 1, 1) for f in features]
    return torch.cat([pooled[0]] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                                    for p in pooled[1:]], 1)


def greedy_coreset(x: torch.Tensor, n: int, proj_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Indices of `n` rows of `x` chosen by greedy k-center (farthest-point) selection.

    Distances are computed in a random projection to `proj_dim` dimensions (Johnson-Lindenstrauss),
    which keeps each step one matrix-vector product over the candidates. 64 dimensions keep a group's
    patches (e.g. 16 images x 1600 patches x 64 floats = 6.5 MB) in cache: 5x faster than 128 dimensions
    on the reference 2-core machine.
    """
    n = min(n, len(x))
    g = torch.Generator().manual_seed(seed)
    if proj_dim and x.shape[1] > proj_dim:
        proj = torch.randn(x.shape[1], proj_dim, generator=g) / math.sqrt(proj_dim)
        z = x.float() @ proj.to(x.device)
    else:
        z = x.float()
    sq = (z * z).sum(1)
    chosen = torch.empty(n, dtype=torch.long)
    i = int(torch.randint(len(z), (1,), generator=g))
    mind = torch.full((len(z),), float("inf"), device=z.device)
    for k in range(n):
        chosen[k] = i
        d = sq - 2 * (z @ z[i]) + sq[i]
        mind = torch.minimum(mind, d)
        i = int(torch.argmax(mind))
    return chosen


class PatchCore(AnomalyModel):
    name = "PatchCore"
    trainable = False
    # with the HNSW search its graph is the backbone alone, which OpenVINO runs fastest (bench_runtime.py)
    preferred_runtime = "openvino"
    # 320 px and groups of 16 images: measured on mvtec_screw (2 cores) at image AUROC 0.968, pixel 0.9945,
    # fit 46 s; 256 px gave 0.934 / 0.993; groups of 32 at 320 px took 68 s.
    model_defaults = {"input_size": [320, 320], "coreset_ratio": 0.1, "coreset_group": 16, "projection_dim": 64,
                      "num_neighbors": 9, "max_bank_size": 200000, "search": "hnsw", "search_ef": 16}
    train_defaults = {"batch_size": 8}

    @classmethod
    def check_config(cls, model_cfg: dict[str, Any]) -> None:
        super().check_config(model_cfg)
        BankSearch(model_cfg.get("search", "exact"), int(model_cfg.get("search_ef", 16)))  # raises on bad keys
        ratio = model_cfg["coreset_ratio"]
        if not 0 < ratio <= 1:
            raise UadkitError(f"config key 'Model.coreset_ratio': expected 0 < ratio <= 1, got {ratio}")
        for key in ("coreset_group", "num_neighbors", "max_bank_size"):
            if model_cfg[key] < 1:
                raise UadkitError(f"config key 'Model.{key}': expected a positive integer, got {model_cfg[key]}")
        if model_cfg["projection_dim"] < 0:
            raise UadkitError("config key 'Model.projection_dim': expected >= 0 (0 = no projection)")

    def __init__(self, model_cfg: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__(model_cfg)
        self.check_config(model_cfg)
        self.backbone = self.frozen_backbone(backbone_info(model_cfg["backbone"]).patch_stages, pretrained)
        self.register_buffer("memory_bank", torch.zeros(0, sum(self.backbone.channels)))
        # models saved before the search key searched exactly, and were calibrated so
        self.search = BankSearch(model_cfg.get("search", "exact"), int(model_cfg.get("search_ef", 16)))
        self.cfg["search"] = self.search.kind
        # which fit group each bank row / fitted image belongs to (set by fit, not saved)
        self.fit_row_group: torch.Tensor | None = None
        self.fit_image_group: torch.Tensor | None = None

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        self.memory_bank = torch.zeros_like(state["memory_bank"])

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        e = patch_embed(self.backbone(images))
        b, c, h, w = e.shape
        return e.permute(0, 2, 3, 1).reshape(b, h * w, c), (h, w)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)[0]

    def score_embedding(self, emb: torch.Tensor, bank: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, patches, C) embeddings -> coarse (B, 1, h, w) patch-distance map and image score, against `bank`."""
        bank = self.memory_bank if bank is None else bank
        if len(bank) == 0:
            raise UadkitError("PatchCore has an empty memory bank: fit it on good images first")
        b = emb.shape[0]
        stride = self.backbone.strides[0]
        h, w = (math.ceil(s / stride) for s in self.input_size)  # "same" padding rounds up
        d, idx = self.search(emb.reshape(b * h * w, -1), bank, 1)
        patch, nn_all = d[:, 0].reshape(b, h * w), idx[:, 0].reshape(b, h * w)
        bank_sq = self.search.norms(bank)
        if self.search.approximate:  # the image score rests on the largest distance: make it the exact one
            patch, nn_all = exact_maximum(emb, patch, nn_all, bank, bank_sq=bank_sq)
        # Image score with PatchCore's reweighting: the most anomalous patch counts for more when its
        # nearest bank entry is itself far from the rest of the bank (a rare, not a dense, region).
        top = patch.argmax(1)
        feat = emb[torch.arange(b), top]
        nn_idx = nn_all[torch.arange(b), top]
        k = min(self.cfg["num_neighbors"], len(bank))
        _, support = nearest(bank[nn_idx], bank, k, bank_sq=bank_sq)
        dist_support = torch.cdist(feat[:, None], bank[support])[:, 0]
        weight = 1 - torch.softmax(dist_support, 1)[:, 0]
        score = weight * patch.max(1).values
        return patch.reshape(b, 1, h, w), score

    def coarse_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.score_embedding(self.features(images))[0]]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coarse, score = self.score_embedding(self.features(images))
        return self.assemble([coarse], self.input_size, self.smoothing_sigma), score

    # An approximate search cannot be traced into a graph: exported graphs then stop at the patch embedding
    # and every runtime runs `finish` (search, map, score, normalisation) on it, the same code as torch.
    def graph_outputs(self) -> list[str]:
        return ["embedding"] if self.search.approximate else super().graph_outputs()

    def graph(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.features(images),) if self.search.approximate else super().graph(images)

    def finish(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not self.search.approximate:
            return outputs
        coarse, score = self.score_embedding(outputs[0])
        amap = self.assemble([coarse], self.input_size, self.smoothing_sigma)
        return (amap, score, *self.normalise(amap, score))

    def head_state(self) -> dict[str, torch.Tensor]:
        if not self.search.approximate:
            return {}
        return {"memory_bank": self.memory_bank, "calibration": self.calibration, "is_calibrated": self.is_calibrated}

    @torch.no_grad()
    def out_of_fold_scores(self, batches: list[torch.Tensor], images, folds: int = 5,
                           scored: np.ndarray | None = None, grid: int = 64
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Leave-one-group-out (with at least `folds` groups): each coreset group is reduced on its own (same
        seed), so the bank minus the rows a group contributed is the bank a fit without that group's images
        builds (exactly, while the bank stays under max_bank_size; after a cap reduction, the surviving rows
        of the other groups)."""
        emb = torch.cat(batches)
        groups, rows = self.fit_image_group, self.fit_row_group
        # with fewer groups than folds, leaving one out would drop too much of the bank: refit k-fold instead
        if groups is None or len(groups) != len(emb) or len(torch.unique(groups)) < folds:
            return super().out_of_fold_scores(batches, images, folds, scored, grid)
        scored = np.arange(len(emb)) if scored is None else np.asarray(scored)
        scores, maxima = np.full(len(emb), np.nan), np.full(len(emb), np.nan)
        maps: dict[int, np.ndarray] = {}  # only the scored images' maps, pooled (see the base method)
        chunk = max(len(batches[0]), 1)
        picked = torch.zeros(len(emb), dtype=torch.bool)
        picked[torch.from_numpy(scored)] = True
        for g in torch.unique(groups).tolist():
            ids = torch.nonzero((groups == g) & picked)[:, 0]
            if not len(ids):
                continue
            bank = self.memory_bank[rows != g]
            for part in ids.split(chunk):
                coarse, score = self.score_embedding(emb[part].to(self.device), bank)
                amap = self.assemble([coarse], self.input_size, self.smoothing_sigma)
                scores[part.numpy()] = score.cpu().numpy()
                maxima[part.numpy()] = amap.flatten(1).amax(1).cpu().numpy()
                maps.update(zip(part.tolist(), F.adaptive_avg_pool2d(amap.float(), grid)[:, 0].cpu().numpy()))
        return scores[scored], maxima[scored], np.stack([maps[i] for i in scored.tolist()])

    @torch.no_grad()
    def fit(self, features: Iterable[torch.Tensor]) -> dict[str, Any]:
        ratio, group = self.cfg["coreset_ratio"], self.cfg["coreset_group"]
        proj, cap = self.cfg["projection_dim"], self.cfg["max_bank_size"]
        # Every group is reduced with the same seed, so a group's coreset does not depend on its position:
        # the bank without one group equals a fit without it (what out_of_fold_scores relies on).
        kept: list[torch.Tensor] = []
        kept_gid: list[torch.Tensor] = []   # the group each kept row came from
        image_gid: list[int] = []
        pending: list[torch.Tensor] = []
        n_images = n_patches = peak = n_groups = 0

        def close_group() -> None:
            nonlocal pending, kept, kept_gid, peak, n_groups
            rows = torch.cat(pending)
            peak = max(peak, rows.numel() + sum(k.numel() for k in kept))
            gid, n_groups = n_groups, n_groups + 1
            sel = greedy_coreset(rows, max(1, round(len(rows) * ratio)), proj, 0) if ratio < 1 else None
            kept.append(rows if sel is None else rows[sel])
            kept_gid.append(torch.full((len(kept[-1]),), gid, dtype=torch.long))
            image_gid.extend([gid] * (len(rows) // patches))
            pending = []
            if sum(len(k) for k in kept) > 2 * cap:
                union, ug = torch.cat(kept), torch.cat(kept_gid)
                keep = greedy_coreset(union, cap, proj, 1)
                kept, kept_gid = [union[keep]], [ug[keep]]

        patches = 1
        for emb in features:
            patches = emb.shape[1]
            pending.append(emb.reshape(-1, emb.shape[-1]).cpu())
            n_images += len(emb)
            n_patches += emb.shape[0] * emb.shape[1]
            if sum(len(p) for p in pending) >= group * patches:
                close_group()
        if pending:
            close_group()
        if not kept:
            raise UadkitError("PatchCore.fit: no training images")
        bank, gids = torch.cat(kept), torch.cat(kept_gid)
        if len(bank) > cap:  # too many images for the cap: one more k-center pass over the union
            keep = greedy_coreset(bank, cap, proj, 1)
            bank, gids = bank[keep], gids[keep]
        self.memory_bank = bank.to(self.memory_bank.device).contiguous()
        self.fit_row_group, self.fit_image_group = gids, torch.tensor(image_gid, dtype=torch.long)
        return {"images": n_images, "patches": n_patches, "memory_bank": list(self.memory_bank.shape),
                "memory_bank_mb": round(self.memory_bank.numel() * 4 / 1e6, 2),
                "peak_feature_mb": round(peak * 4 / 1e6, 2)}

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "memory_bank": list(self.memory_bank.shape),
                "memory_bank_mb": round(self.memory_bank.numel() * 4 / 1e6, 2)}
