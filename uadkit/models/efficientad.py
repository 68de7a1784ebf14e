"""EfficientAD (Batzner et al., 2024): a small student network and an autoencoder, both against a frozen teacher.

- Teacher: the paper distils a patch description network (PDN) from WideResNet-101 on ImageNet. ImageNet
  cannot be downloaded here, so the teacher is our frozen ImageNet backbone cut at its stride-8 stage, with
  the stride-4 stage averaged onto it (Lite0 stage2 + stage3: 64 channels, a 67 px receptive field; the
  paper's PDN sees 33 px), normalised per channel by its mean and std over the training images (`on_train_start`).
  A deeper teacher (stride 16, hundreds of px) was measured first: a small student cannot predict it even on
  good images, and its student map ranked mvtec_screw images at chance.
- Student: a PDN-like stack of plain convolutions (strided, not pooled, to keep CPU cost low) whose 66 px
  receptive field matches the teacher's, with twice the teacher's channels when the autoencoder is on: the
  first half predicts the teacher (hard-feature loss: only the distances above their `hard_quantile` count),
  the second half the autoencoder. `Model.students` trains several, each from its own initial weights, and
  averages their maps: a student's errors on good images depend on its initialisation (screw image AUROC
  0.876 to 0.932 over five students), a defect's do not, so the average ranks images more steadily.
  `Model.shared_stem` lets them share their first convolutions, computed once (opt-in: more students for the
  time, but on generated parts students that share layers erred alike, README).
- Autoencoder: strided convolutions down to a 64-number code and back, predicting the teacher's features
  from the image through that bottleneck, so it misses what is locally plausible but globally wrong (the
  logical anomalies). Its map is mixed in with `Model.ae_weight` (off by default, see the README's figures).
- Penalty images: the paper pushes the student's output towards zero on ImageNet images so it does not
  generalise past the training data. Without ImageNet, a generated stream of out-of-distribution images can
  stand in (`Model.penalty`, `extra_batch_source`): multi-scale colour noise and oriented stripes. It made no
  measurable difference (README) and costs 30 % of the training time, so it is off by default.
- Maps: student-teacher and student-autoencoder distances, each mapped by its 0.9 and 0.995 quantiles on
  validation images to 0 and 0.1 (the `on_train_end` hook), weighted, upsampled to the input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import backbone_info
from ..errors import UadkitError
from .base import AnomalyModel, hard_mean


def _conv(cin: int, cout: int, k: int, stride: int = 1, act: bool = True) -> list[nn.Module]:
    # padding 1 for the 4x4 stride-2 kernels halves the size exactly (k // 2 would add a row and a column)
    pad = 1 if (k, stride) == (4, 2) else k // 2
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=pad)]
    return layers + [nn.ReLU(inplace=True)] if act else layers


def student_pdn(out_channels: int, width: int) -> nn.Sequential:
    """A patch description network at stride 8: 3 strided convolutions, then three 3x3 convolutions.

    Its receptive field, 66 px, matches the stride-8 teacher stage's (67 px for Lite0 stage3): a student that
    sees less than its teacher cannot predict it even on good images, and its errors there hide defects."""
    return nn.Sequential(*_conv(3, width // 2, 4, 2), *_conv(width // 2, width, 4, 2), *_conv(width, width, 3, 2),
                         *_conv(width, width, 3), *_conv(width, width, 3), *_conv(width, out_channels, 3, act=False))


class AutoEncoder(nn.Module):
    """Image -> latent code -> teacher-shaped features at stride 8 (the bottleneck makes it global).

    The code comes from a convolution spanning the whole last encoder grid (the paper's 8x8 kernel at 256 px),
    not from an average over it: an average forgets where things are, and the decoder then can only draw the
    mean part, so its error is high on every good image and hides the logical defects it is there to find."""

    def __init__(self, out_channels: int, input_size: tuple[int, int], latent: int = 64) -> None:
        super().__init__()
        # half-size input, then four halvings (each rounds down): the last grid is input // 32
        grid = (max(1, input_size[0] // 32), max(1, input_size[1] // 32))
        self.encoder = nn.Sequential(*_conv(3, 32, 4, 2), *_conv(32, 64, 4, 2), *_conv(64, 64, 4, 2),
                                     *_conv(64, 64, 4, 2), nn.Conv2d(64, latent, grid))
        self.decoder = nn.Sequential(*_conv(latent, 64, 3), *_conv(64, 64, 3), *_conv(64, 64, 3),
                                     *_conv(64, 64, 3), nn.Dropout2d(0.2), *_conv(64, out_channels, 3, act=False))
        self.latent = latent

    def forward(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # a 64-number code needs no full-resolution input: half the size, a quarter of the encoder's cost
        x = self.encoder(F.avg_pool2d(images, 2))
        h, w = size
        # upsample the code in steps (as the paper's decoder does), each followed by a convolution
        steps = [(max(1, h // 8), max(1, w // 8)), (max(1, h // 4), max(1, w // 4)),
                 (max(1, h // 2), max(1, w // 2)), (h, w)]
        for (sh, sw), i in zip(steps, range(0, 8, 2)):
            x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
            x = self.decoder[i + 1](self.decoder[i](x))
        return self.decoder[-1](self.decoder[-2](x))


def _ae_weight(model_cfg: dict[str, Any]) -> float:
    return float(model_cfg.get("ae_weight", 0.5))  # models saved before the key combined the maps equally


def _students(model_cfg: dict[str, Any]) -> int:
    return int(model_cfg.get("students", 1))  # models saved before the key had one student


def _shared(model_cfg: dict[str, Any]) -> int:
    return int(model_cfg.get("shared_stem", 0))  # models saved before the key: each student its own layers


class EfficientAD(AnomalyModel):
    name = "EfficientAD"
    trainable = True
    preferred_runtime = "openvino"  # bench_runtime on screw: 87.0 vs 56.2 (onnxruntime) vs 66.2 (torch) img/s e2e b1
    # measured on mvtec_screw and generated parts/cloth (README): the 0.99 hard quantile taught the student
    # more than the paper's 0.999 in a CPU budget of steps, and the autoencoder's map ranked images below
    # chance on all three, so it is off by default (Model.ae_weight > 0 trains and mixes it in); the generated
    # penalty stream moved image AUROC within noise (screw -0.004, parts -0.018, cloth +0.014 without it) and
    # made training 43 % longer; a wider student (96) or 200 epochs did not help either (README). Two students,
    # maps averaged: screw 0.9147 / 0.9141 at seeds 42 / 1 where single students ranged 0.876-0.932 (mean 0.909);
    # averaging pairs of single models added +0.014 (screw), +0.006 (generated parts), +0.009 (cloth)
    model_defaults = {"student_width": 64, "hard_quantile": 0.99, "penalty": False, "ae_weight": 0.0,
                      "image_topk": 0.001, "students": 2, "shared_stem": 0}
    # Adam as in the paper, with far fewer steps than its 70,000 (CPU budget), cosine decay. Steps, not epochs,
    # as the paper counts them: at 150 epochs (screw's 5,400 steps) a set of 54 images got 1,050 and a rate of
    # 0.001 lost there for want of steps; 5,400 steps at 0.001 measured screw 0.934 (mean of 3 seeds, 0.002:
    # 0.906), small-defect cloth +0.029, generated parts -0.008 (README)
    train_defaults = {"epochs_iters": None, "step_budget": 5400, "batch_size": 8, "learning_rate": 0.001,
                      "weight_decay": 1e-5, "lr_scheduler": "cosine", "cache_teacher": True}

    @classmethod
    def check_config(cls, model_cfg: dict[str, Any]) -> None:
        super().check_config(model_cfg)
        if not 0.5 <= model_cfg["hard_quantile"] < 1:
            raise UadkitError(f"config key 'Model.hard_quantile': expected a value in [0.5, 1), "
                              f"got {model_cfg['hard_quantile']}")
        if not 0 <= _ae_weight(model_cfg) <= 1:
            raise UadkitError(f"config key 'Model.ae_weight': expected a weight in [0, 1], "
                              f"got {model_cfg['ae_weight']!r}")
        if model_cfg["student_width"] < 8:
            raise UadkitError(f"config key 'Model.student_width': expected >= 8, got {model_cfg['student_width']}")
        if not 1 <= _students(model_cfg) <= 8:
            raise UadkitError(f"config key 'Model.students': expected 1 to 8 students, got {model_cfg['students']!r}")
        if not 0 <= _shared(model_cfg) <= 5:  # the student has six convolutions: its last one stays its own
            raise UadkitError(f"config key 'Model.shared_stem': expected 0 to 5 shared convolutions, "
                              f"got {model_cfg['shared_stem']!r}")

    @classmethod
    def check_train_config(cls, train_cfg: dict[str, Any]) -> None:
        if train_cfg["lr_scheduler"] not in ("cosine", "none"):
            raise UadkitError(f"config key 'Train.lr_scheduler': expected cosine or none, "
                              f"got {train_cfg['lr_scheduler']!r}")

    def __init__(self, model_cfg: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__(model_cfg)
        self.check_config(model_cfg)
        # the backbone's stride-4 and stride-8 stages (Lite0: stage2 + stage3, 64 channels, 67 px receptive field)
        self.teacher = self.frozen_backbone(backbone_info(model_cfg["backbone"]).stfpm_stages[:2], pretrained)
        c = sum(self.teacher.channels)
        self.channels = c
        # `Model.students` students, each from its own initial weights, their maps averaged; each one's output half
        # that predicts the autoencoder is built only with that branch (ae_weight > 0), a tenth of its work
        pdns = [student_pdn((2 if self.ae_weight else 1) * c, int(model_cfg["student_width"]))
                for _ in range(_students(model_cfg))]
        # `Model.shared_stem` first convolutions shared by the students, computed once (each convolution but the
        # last is two modules, with its ReLU); the strided ones are most of a student's work (README). With none
        # shared the stem is empty (passes images through) and each student keeps all its modules and indices.
        cut = 2 * _shared(model_cfg)
        self.stem = nn.Sequential(*pdns[0][:cut])
        self.students = nn.ModuleList(nn.Sequential(*p[cut:]) for p in pdns)
        self.autoencoder = AutoEncoder(c, self.input_size)
        # teacher channel statistics (on_train_start) and map quantiles (on_train_end): buffers, so they are
        # saved with the weights and part of the exported graph
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        self.register_buffer("quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # st q_a, q_b, ae q_a, q_b

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        """Folders saved with one student call it `student`: it is the first of `students` now. Folders saved
        before the student dropped its unused autoencoder half hold twice its output channels; the first half
        is the one that predicts the teacher."""
        for key in [k for k in state if k.startswith("student.")]:
            state["students.0." + key[len("student."):]] = state.pop(key)
        out, last = self.students[0][-1].out_channels, len(self.students[0]) - 1
        for key in (f"students.0.{last}.weight", f"students.0.{last}.bias"):
            t = state.get(key)
            if t is not None and t.shape[0] == 2 * out and not self.ae_weight:
                state[key] = t[:out]

    def feature_size(self, images: torch.Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        return math.ceil(h / 8), math.ceil(w / 8)

    def _teacher_raw(self, images: torch.Tensor) -> torch.Tensor:
        # every stage on the coarsest one's grid: finer stages averaged over their stride ratio (no detail is
        # invented by upsampling, and the student works at one stride)
        feats = self.teacher(images)
        strides = self.teacher.strides
        size = feats[-1].shape[-2:]
        out = []
        for f, s in zip(feats, strides):
            if s < strides[-1]:
                f = F.avg_pool2d(f, strides[-1] // s, ceil_mode=True)
            out.append(f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear",
                                                                    align_corners=False))
        return torch.cat(out, 1)

    @torch.no_grad()
    def training_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [(self._teacher_raw(images) - self.teacher_mean) / self.teacher_std]

    def _student(self, images: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        """Each student's output on the teacher's grid."""
        out = []
        x = self.stem(images)
        for student in self.students:
            s = student(x)
            out.append(s if tuple(s.shape[-2:]) == size else
                       F.interpolate(s, size=size, mode="bilinear", align_corners=False))
        return out

    @property
    def ae_weight(self) -> float:
        return _ae_weight(self.cfg)

    def _maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Student-teacher and student-autoencoder distance maps (the second None when the weight is 0)."""
        t = self.training_targets(images)[0]
        size = tuple(t.shape[-2:])
        students = self._student(images, size)
        c = self.channels
        # the students' squared errors averaged: their errors on good images come partly from their initial
        # weights and differ between them, a defect's does not
        st = sum((t - s[:, :c]).pow(2).mean(1, keepdim=True) for s in students) / len(students)
        if not self.ae_weight:
            return st, None
        a = self.autoencoder(images, size)
        return st, sum((a - s[:, c:]).pow(2).mean(1, keepdim=True) for s in students) / len(students)

    def coarse_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        st, ae = self._maps(images)
        q, w = self.quantiles, self.ae_weight
        # each map's 0.9 quantile on good images -> 0, its 0.995 quantile -> 0.1 (the paper's normalisation)
        amap = 0.1 * (st - q[0]) / (q[1] - q[0])
        if ae is not None:
            amap = (1 - w) * amap + w * 0.1 * (ae - q[2]) / (q[3] - q[2])
        return [amap]

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
        t = (targets if targets is not None else self.training_targets(images))[0]
        size = tuple(t.shape[-2:])
        c = self.channels
        students = self._student(images, size)
        penalised = self._student(extra, size) if extra is not None and self.cfg["penalty"] else None
        # each student its own loss, so each learns as it would alone (the sum's gradients do not mix)
        loss = torch.zeros((), device=t.device)
        for j, s in enumerate(students):
            # hard-feature loss: only the worst-predicted feature elements teach the student
            # over the whole batch: each image's own top 1 % instead measured 0.9141 against 0.9186 (screw)
            loss = loss + hard_mean((t - s[:, :c]).pow(2).flatten(), self.cfg["hard_quantile"])
            if penalised is not None:
                loss = loss + penalised[j][:, :c].pow(2).mean()
        if not self.ae_weight:  # the autoencoder branch is off: nothing to learn for it
            return loss
        a = self.autoencoder(images, size)
        loss_stae = sum((a.detach() - s[:, c:]).pow(2).mean() for s in students)
        return loss + (t - a).pow(2).mean() + loss_stae

    def configure_optimizers(self, train_cfg: dict[str, Any]
                             ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=train_cfg["learning_rate"], weight_decay=train_cfg["weight_decay"])
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=train_cfg["epochs_iters"])
                 if train_cfg["lr_scheduler"] == "cosine" else None)
        return opt, sched

    @torch.no_grad()
    def on_train_start(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        # refused when training, not when loading: folders saved by early versions used stage5 and still predict
        deep = [(n, s) for n, s in zip(self.cfg["layers"], self.teacher.strides) if s > 8]
        if deep:
            # measured: a stride-16 teacher stage (hundreds of px seen) left the student's map at chance on screw
            default = backbone_info(self.cfg["backbone"]).stfpm_stages[:2]
            raise UadkitError(f"config key 'Model.layers': {deep[0][0]} has stride {deep[0][1]}; EfficientAD's "
                              f"student works at stride 8 and cannot predict deeper stages: use stages of stride "
                              f"8 or less (default {', '.join(default)})")
        # float64 sums over every position of every training image: the teacher's channel mean and std
        n, s1, s2 = 0, 0.0, 0.0
        for images in batches():
            f = self._teacher_raw(images).double()
            n += f.shape[0] * f.shape[2] * f.shape[3]
            s1 = s1 + f.sum((0, 2, 3))
            s2 = s2 + f.pow(2).sum((0, 2, 3))
        mean = s1 / n
        std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
        self.teacher_mean.copy_(mean.view(1, -1, 1, 1).float())
        self.teacher_std.copy_(std.view(1, -1, 1, 1).float().clamp_min(1e-6))

    @torch.no_grad()
    def on_train_end(self, batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        maps: list[list[torch.Tensor]] = [[], []]
        for images in batches():
            for kept, m in zip(maps, self._maps(images)):
                if m is not None:
                    kept.append(m.flatten())
        qs = self.quantiles.tolist()  # the autoencoder's pair stays as it is when its branch is off
        for j, kept in enumerate(maps):
            if kept:
                m = torch.cat(kept)
                qa, qb = torch.quantile(m[torch.randperm(len(m))[:1 << 24]] if len(m) > 1 << 24 else m,
                                        torch.tensor([0.9, 0.995], device=m.device)).tolist()
                qs[2 * j:2 * j + 2] = [qa, max(qb, qa + 1e-6)]  # a flat map must not divide by zero
        self.quantiles.copy_(torch.tensor(qs))

    def extra_batch_source(self, train_cfg: dict[str, Any]) -> Callable[[int, torch.Generator], torch.Tensor] | None:
        # a quarter of the batch: the penalty is a mean, so fewer images only make it noisier, at less cost
        return (lambda n, gen: penalty_images(max(1, n // 4), self.input_size, gen)) if self.cfg["penalty"] else None


def penalty_images(n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Out-of-distribution images standing in for ImageNet: colour noise summed over random scales, plus
    oriented stripes, with random contrast; drawn at a quarter of the size and upsampled once (cheap)."""
    h, w = max(8, size[0] // 4), max(8, size[1] // 4)
    out = torch.zeros(n, 3, h, w)
    for cells in (2, 4, 8, 16):
        noise = torch.rand(n, 3, cells, cells, generator=gen) - 0.5
        out += torch.rand(n, 1, 1, 1, generator=gen) * F.interpolate(noise, size=(h, w), mode="bilinear",
                                                                     align_corners=False)
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    angle = torch.rand(n, 1, 1, 1, generator=gen) * math.pi
    freq = 2 + 12 * torch.rand(n, 1, 1, 1, generator=gen)
    phase = torch.rand(n, 1, 1, 1, generator=gen) * 2 * math.pi
    stripes = torch.sin(2 * math.pi * freq * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
    out += torch.rand(n, 1, 1, 1, generator=gen) * stripes * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)
    out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
    contrast = 0.5 + 1.5 * torch.rand(n, 1, 1, 1, generator=gen)
    return (0.5 + contrast * out).clamp(0, 1)
