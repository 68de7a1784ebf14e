"""PaDiM (Defard et al., 2021): a Gaussian per feature-map position, scored by Mahalanobis distance.

Fitting streams the images and accumulates sums and outer products in float64, so memory is fixed by
positions x dims^2 whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import backbone_info
from ..errors import UadkitError
from .base import AnomalyModel


class PaDiM(AnomalyModel):
    name = "PaDiM"
    trainable = False
    position_tied = True  # a Gaussian per feature-map position: tiles at different places would share one
    model_defaults = {"feature_dim": 100, "covariance_eps": 0.01}
    train_defaults = {"batch_size": 8}

    @classmethod
    def check_config(cls, model_cfg: dict[str, Any]) -> None:
        if model_cfg["feature_dim"] < 1:
            raise UadkitError(f"config key 'Model.feature_dim': expected a positive integer, "
                              f"got {model_cfg['feature_dim']}")
        if model_cfg["covariance_eps"] <= 0:
            raise UadkitError("config key 'Model.covariance_eps': expected a positive number")

    def __init__(self, model_cfg: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__(model_cfg)
        self.check_config(model_cfg)
        self.backbone = self.frozen_backbone(backbone_info(model_cfg["backbone"]).stfpm_stages, pretrained)
        total = sum(self.backbone.channels)
        d = min(int(model_cfg["feature_dim"]), total)
        # A fixed random channel subset (seeded): PaDiM's cheap alternative to PCA.
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:d].sort().values
        self.register_buffer("channels", keep)
        h, w = (s // self.backbone.strides[0] for s in self.input_size)
        self.register_buffer("mean", torch.zeros(h * w, d))
        self.register_buffer("inv_cov", torch.zeros(h * w, d, d))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)
        size = feats[0].shape[-2:]
        e = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="nearest") for f in feats[1:]], 1)
        return e[:, self.channels]  # (B, d, h, w)

    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        e = self.embed(images)
        b, d, h, w = e.shape
        x = e.permute(0, 2, 3, 1).reshape(b, h * w, d) - self.mean
        m = torch.einsum("bpi,pij,bpj->bp", x, self.inv_cov, x).clamp_min(0).sqrt()
        return F.interpolate(m.reshape(b, 1, h, w), size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    def fit(self, features: Iterable[torch.Tensor]) -> dict[str, Any]:
        s1 = s2 = None
        n = 0
        for e in features:
            e = e.to(self.mean.device).double()
            b, d, h, w = e.shape
            x = e.permute(2, 3, 0, 1).reshape(h * w, b, d)  # (P, B, d)
            s1 = x.sum(1) if s1 is None else s1 + x.sum(1)
            xx = torch.einsum("pbi,pbj->pij", x, x)
            s2 = xx if s2 is None else s2 + xx
            n += b
        if n < 2:
            raise UadkitError("PaDiM.fit: needs at least 2 training images")
        mean = s1 / n
        cov = (s2 - n * torch.einsum("pi,pj->pij", mean, mean)) / (n - 1)
        cov += self.cfg["covariance_eps"] * torch.eye(cov.shape[-1], dtype=cov.dtype)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        return {"images": n, "positions": int(mean.shape[0]), "feature_dim": int(mean.shape[1]),
                "bytes_per_position": int(self.inv_cov[0].numel() * 4 + self.mean[0].numel() * 4)}

    def summary(self) -> dict[str, Any]:
        p, d = self.mean.shape
        return {**super().summary(), "positions": p, "feature_dim": d,
                "gaussian_mb": round((self.mean.numel() + self.inv_cov.numel()) * 4 / 1e6, 2)}
