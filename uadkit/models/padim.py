"""PaDiM (Defard et al., 2021): a Gaussian per feature-map position, scored by Mahalanobis distance.

Fitting streams the images and accumulates sums and outer products in float64, so memory is fixed by
positions x dims^2 whatever the number of images.

`Model.covariance` says how each position's covariance is regularised before it is inverted:
- "fixed" (default): the sample covariance + covariance_eps * I, as in the paper;
- "oas": shrunk toward a multiple of the identity by OAS (Chen et al., 2010), then + covariance_eps * I.
With fewer images than dims the sample covariance is singular, and a floor of 0.01 is ~1000x below the
Lite0 feature variances (~10), so the distance is mostly the residual the training images do not span, which
is largest where the features vary most. On dark parts on a noisy background that is the background: the
maps peak there and small defects drown (tests/test_padim_misaligned.py, 40 images at 128 px: pixel AUROC
0.91 fixed vs 0.96 oas; on aligned parts the good maps share the background pattern, map_check
shared_variance 0.52 fixed vs 0.02 oas). On mvtec_screw the
same bias points at the screw, where the defects are, and fixed is better at every size measured (320
images at 256 px: image 0.832 / pixel 0.983 / AUPRO 0.929 fixed vs 0.815 / 0.978 / 0.913 oas; 40 images
at 128 px: pixel 0.939 vs 0.903), so fixed stays the default and engine/map_check.py says when it misfits.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import backbone_info
from ..errors import UadkitError
from .base import AnomalyModel

COVARIANCES = ("fixed", "oas")


def oas_shrink(cov: torch.Tensor, n: int) -> torch.Tensor:
    """Oracle Approximating Shrinkage of (P, d, d) maximum-likelihood covariances from n samples, in place:
    (1 - rho) S + rho tr(S)/d I with rho from S alone (scikit-learn's OAS formula), so it streams."""
    d = cov.shape[-1]
    mu = cov.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    alpha = torch.einsum("pij,pij->p", cov, cov) / d**2  # mean of the squared entries
    num, den = alpha + mu**2, (n + 1) * (alpha - mu**2 / d)
    rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den)).clamp(0, 1)
    cov.mul_((1 - rho)[:, None, None])
    cov.diagonal(dim1=-2, dim2=-1).add_((rho * mu)[:, None])
    return cov


class PaDiM(AnomalyModel):
    name = "PaDiM"
    trainable = False
    position_tied = True  # a Gaussian per feature-map position: tiles at different places would share one
    # bench_runtime on screw, end to end b1 / b8: OpenVINO 58.8 / 93.8 img/s, ONNX Runtime 43.0 / 69.8, torch 26.4
    # / 25.8, equal scores (since the distance is a batched matrix product in the graph: see raw_map)
    preferred_runtime = "openvino"
    graph_version = 2  # 1: the einsum distance (OpenVINO: 13.5 GB, 3x slower)
    # Model.covariance: see the module docstring (measured on generated dark parts and on mvtec_screw).
    model_defaults = {"feature_dim": 100, "covariance": "fixed", "covariance_eps": 0.01}
    train_defaults = {"batch_size": 8}

    @classmethod
    def check_config(cls, model_cfg: dict[str, Any]) -> None:
        super().check_config(model_cfg)
        if model_cfg["feature_dim"] < 1:
            raise UadkitError(f"config key 'Model.feature_dim': expected a positive integer, "
                              f"got {model_cfg['feature_dim']}")
        if model_cfg["covariance_eps"] <= 0:
            raise UadkitError("config key 'Model.covariance_eps': expected a positive number")
        if model_cfg.get("covariance", "fixed") not in COVARIANCES:
            raise UadkitError(f"config key 'Model.covariance': expected one of {', '.join(COVARIANCES)}, "
                              f"got {model_cfg['covariance']!r}")

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

    def coarse_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        e = self.embed(images)
        b, d, h, w = e.shape
        x = e.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean[:, None]  # (P, B, d)
        # a batched matrix product per position, not a three-operand einsum: the same numbers, and OpenVINO
        # compiled the einsum's graph into 13.5 GB
        m = (torch.bmm(x, self.inv_cov) * x).sum(-1).clamp_min(0).sqrt()  # (P, B)
        return [m.t().reshape(b, 1, h, w)]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    def _sums(self, features: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per position, the float64 sum and sum of outer products of the features, and the image count."""
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
        return s1, s2, n

    def fit(self, features: Iterable[torch.Tensor]) -> dict[str, Any]:
        return self._fit_from_sums(*self._sums(features))

    def out_of_fold_scores(self, batches: list[torch.Tensor], *args: Any, **kwargs: Any):
        # the Gaussians are sums over images: each fold's model is the totals minus that fold's own sums
        # (fold_model), one pass over the data for all folds instead of k-1 for each
        self._fold_totals = self._sums(batches)
        try:
            return super().out_of_fold_scores(batches, *args, **kwargs)
        finally:
            self._fold_totals = None  # ~330 MB at 256 px

    def fold_model(self, per_image: list[torch.Tensor], held, batch: int) -> AnomalyModel:
        s1, s2, n = self._fold_totals
        ids = held.tolist()
        f1, f2, m = self._sums(torch.cat([per_image[i] for i in ids[j:j + batch]]) for j in range(0, len(ids), batch))
        clone = copy.copy(self)  # a shallow copy with its own Gaussians: backbone and channels are shared
        clone._buffers = dict(self._buffers)
        clone._fit_from_sums(s1 - f1, torch.sub(s2, f2, out=f2), n - m)  # f2 becomes the rest's sums
        return clone

    def _fit_from_sums(self, s1: torch.Tensor | None, s2: torch.Tensor | None, n: int) -> dict[str, Any]:
        if n < 2:
            raise UadkitError("PaDiM.fit: needs at least 2 training images")
        mean = s1 / n
        cov = s2.sub_(n * torch.einsum("pi,pj->pij", mean, mean))
        # A model saved before Model.covariance existed was fitted with the fixed floor: refits keep that.
        if self.cfg.get("covariance", "fixed") == "oas":
            oas_shrink(cov.div_(n), n)
        else:
            cov.div_(n - 1)
        cov.diagonal(dim1=-2, dim2=-1).add_(self.cfg["covariance_eps"])
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        return {"images": n, "positions": int(mean.shape[0]), "feature_dim": int(mean.shape[1]),
                "bytes_per_position": int(self.inv_cov[0].numel() * 4 + self.mean[0].numel() * 4)}

    def summary(self) -> dict[str, Any]:
        p, d = self.mean.shape
        return {**super().summary(), "positions": p, "feature_dim": d,
                "gaussian_mb": round((self.mean.numel() + self.inv_cov.numel()) * 4 / 1e6, 2)}
