"""STFPM (Wang et al., 2021): a student learns to match a frozen ImageNet teacher on good images only.

Where the student fails to match the teacher, the image is unlike the training images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import FeatureExtractor, backbone_info
from ..errors import UadkitError
from .base import AnomalyModel, hard_mean


def stage_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per stage, half the squared distance of channel-L2-normalised features: (B, 1, h, w) each."""
    return [0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
            for t, s in zip(teacher, student)]


class STFPM(AnomalyModel):
    name = "STFPM"
    trainable = True
    # OpenVINO 115 vs ONNX Runtime 23 img/s at batch 1 on 2 busy cores (screw, 256 px), scores equal to 2e-6
    preferred_runtime = "openvino"
    # image score = mean of the top 0.1 % of the map: image AUROC +0.008 on mvtec_screw (0.816 -> 0.824), +0.018
    # on generated parts, +0.009 on generated cloth with 4-10 px defects; 1 % gained more on the first two
    # (+0.036, +0.05) but lost 0.079 on the small defects, so the small fraction is the default
    # score_layers null = every stage's map in the product: dropping one ranked images better on screw and
    # generated parts, but not the same one, and cost localisation on parts (README)
    # hard_quantile 0.9: the loss averages each image's worst-matched 10 % of positions per stage (image / pixel
    # AUROC / AUPRO, against PaddleX's mean over all): screw 0.862 / 0.987 / 0.934 -> 0.871 / 0.988 / 0.940,
    # generated parts 0.774 / 0.968 / 0.859 -> 0.838 / 0.972 / 0.873, small-defect cloth 0.898 / 0.998 / 0.984 ->
    # 0.958 / 0.997 / 0.966; 0.75 and 0.99 did worse on screw or parts (README)
    # input_size 320 (image / pixel AUROC / AUPRO against 256, 70 epochs, seed 42): screw 0.871 / 0.988 / 0.940 ->
    # 0.918 / 0.989 / 0.944, generated parts 0.838 / 0.972 / 0.873 -> 0.866 / 0.979 / 0.910, small-defect cloth
    # 0.958 / 0.997 / 0.966 -> 0.994 / 0.999 / 0.996; training 1.5x longer (45 epochs at 320 to stay in 256's
    # time: screw 0.876 / 0.988 / 0.937)
    # student_inner 0.67: the student's blocks at two-thirds of the teacher's inner width (MBConv expansion 6 ->
    # 4, same outputs): training 0.67x as long, screw 0.918 -> 0.931 (seed 42), 0.911 at seed 1 (full: 0.903),
    # generated parts 0.866 -> 0.855, AUPRO 0.910 -> 0.926; 0.5 ranked worse (screw 0.885); 1 = the teacher's
    # architecture, PaddleX's (README)
    # shared_blocks 2: the student starts from the teacher's stem and first two blocks (ImageNet, frozen) and
    # learns the rest, so no backward pass runs through the largest maps (step 300-329 against 407 ms). Screw 0.931 /
    # 0.988 / 0.944 -> 0.932 / 0.989 / 0.943 in 11.5 min, generated parts 0.855 / 0.986 / 0.926 -> 0.872 / 0.987 /
    # 0.928, small-defect cloth 0.990 / 0.9994 / 0.996 -> 0.988 / 0.9993 / 0.995; 1 ranked screw best (0.941) but
    # localised worse on parts (AUPRO 0.883) and trained 7 % longer; 0 = PaddleX's student (README)
    model_defaults = {"input_size": [320, 320], "anomaly_map_mode": "product", "image_topk": 0.001,
                      "score_layers": None, "hard_quantile": 0.9, "student_inner": 0.67,
                      "student_padding": "teacher", "shared_blocks": 2}
    # 70 epochs: with channels-last training they fit in 11.4 min on 2 cores at 256 px (1.5x that at 320;
    # mvtec_screw), and the student keeps learning (validation loss 0.203 at the end of a 30-epoch run, 0.13 at
    # 60, 0.12 at 70). Image / pixel AUROC / AUPRO at 30: 0.823 / 0.980 / 0.903, 60: 0.834 / 0.986 / 0.927, 70:
    # 0.842 / 0.987 / 0.933.
    # Lite2 at 30 epochs: 0.832 / 0.980 / 0.903 in 7.0 min.
    train_defaults = {"epochs_iters": 70, "batch_size": 8, "learning_rate": 0.4, "momentum": 0.9,
                      "weight_decay": 1e-4, "lr_scheduler": "cosine", "cache_teacher": True}

    @classmethod
    def check_train_config(cls, train_cfg: dict[str, Any]) -> None:
        if train_cfg["lr_scheduler"] not in ("cosine", "none"):
            raise UadkitError(f"config key 'Train.lr_scheduler': expected cosine or none, "
                              f"got {train_cfg['lr_scheduler']!r}")

    @classmethod
    def check_config(cls, model_cfg: dict[str, Any]) -> None:
        super().check_config(model_cfg)
        if model_cfg["anomaly_map_mode"] not in ("product", "sum"):
            raise UadkitError(f"config key 'Model.anomaly_map_mode': expected product or sum, "
                              f"got {model_cfg['anomaly_map_mode']!r}")
        if not 0 <= float(model_cfg.get("hard_quantile") or 0.0) < 1:
            raise UadkitError(f"config key 'Model.hard_quantile': expected a value in [0, 1) (0 = every "
                              f"position), got {model_cfg['hard_quantile']!r}")
        inner = model_cfg.get("student_inner")
        if inner is not None and not 0 < float(inner) <= 1:  # its type is the config schema's check
            raise UadkitError(f"config key 'Model.student_inner': expected a fraction in (0, 1] of the teacher's "
                              f"inner widths (1 = its architecture), got {inner!r}")
        if model_cfg.get("student_padding", "teacher") not in ("teacher", "symmetric"):
            raise UadkitError(f"config key 'Model.student_padding': expected teacher or symmetric, "
                              f"got {model_cfg['student_padding']!r}")
        shared = model_cfg.get("shared_blocks", 0)
        if shared < 0:  # its type is the config schema's check
            raise UadkitError(f"config key 'Model.shared_blocks': expected a whole number >= 0 of the teacher's "
                              f"blocks the student shares (0 = none, PaddleX), got {shared!r}")
        chosen = model_cfg.get("score_layers")
        layers = list(model_cfg.get("layers") or backbone_info(model_cfg["backbone"]).stfpm_stages)
        if chosen is not None and (not isinstance(chosen, list | tuple) or not chosen
                                   or any(c not in layers for c in chosen)):
            raise UadkitError(f"config key 'Model.score_layers': expected null or a list of stages from "
                              f"Model.layers ({', '.join(layers)}), got {chosen!r}")

    def __init__(self, model_cfg: dict[str, Any], pretrained: bool = True) -> None:
        super().__init__(model_cfg)
        self.check_config(model_cfg)
        self.teacher = self.frozen_backbone(backbone_info(model_cfg["backbone"]).stfpm_stages, pretrained)
        # student_padding symmetric (opt-in): the student pads evenly, without the padded copies of its stride-2
        # inputs that TensorFlow's padding (the teacher's) needs: training about 10 % faster, but its grid is then
        # shifted against the teacher's by 3 to 15 px per stage, and screw ranked and outlined worse (README)
        symmetric = model_cfg.get("student_padding", "teacher") == "symmetric"
        # shared_blocks N: the student starts from the output of the teacher's stem and first N blocks (ImageNet
        # weights, frozen), computed once per image for both (saved before the key: none, PaddleX's student)
        self.shared = int(model_cfg.get("shared_blocks", 0))
        self._check_shared(self.shared)
        # student_inner 1 (and folders saved before the key): the teacher's own architecture, as PaddleX's STFPM
        self.student = FeatureExtractor(model_cfg["backbone"], self.cfg["layers"], pretrained=False,
                                        inner=float(model_cfg.get("student_inner") or 1.0),
                                        symmetric=symmetric, starts_at=self.shared or None)
        # the stages whose maps make the anomaly map (the student learns every stage of `Model.layers`);
        # null, or a folder saved before the key: every stage
        chosen, layers = self.cfg.get("score_layers"), self.cfg["layers"]
        self._scored = [i for i, name in enumerate(layers) if chosen is None or name in chosen]
        self.cfg["score_layers"] = [layers[i] for i in self._scored]
        self.map_combine = self.cfg["anomaly_map_mode"]

    def _check_shared(self, n: int) -> None:
        limit = min(self.teacher.trunk.blocks_through(s) for s in self.cfg["layers"]) - 1
        if n > limit:  # a stage computed wholly by shared blocks would match its teacher everywhere
            raise UadkitError(f"config key 'Model.shared_blocks': expected 0 to {limit} for {self.cfg['backbone']} "
                              f"with layers {self.cfg['layers']} (the student learns part of every stage), got {n}")

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        """Folders saved before the student took the teacher's shared output hold the student's own frozen
        copies of those modules: equal to the teacher's, and unused now."""
        for name in self.teacher.trunk.leading_modules(self.shared) if self.shared else []:
            for key in [k for k in state if k.startswith(f"student.trunk.{name}.")]:
                del state[key]

    def teacher_student(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student features; the shared blocks run once, in the teacher."""
        return self._student_on(self.training_targets(images), images)

    def _student_on(self, targets: list[torch.Tensor], images: torch.Tensor
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The teacher's stages and the student's, from `training_targets`: with shared blocks their output,
        the last target, is the student's input."""
        if not self.shared:
            return targets, self.student(images)
        *teacher, prefix = targets
        return teacher, self.student(prefix)

    def coarse_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        teacher, student = self.teacher_student(images)
        return stage_distances([teacher[i] for i in self._scored], [student[i] for i in self._scored])

    @torch.no_grad()
    def training_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's stages, then (with shared blocks) the student's input: fixed per image, so the trainer
        keeps both, and a training step runs neither the teacher nor the shared blocks (screw, batch 8: the step
        380-411 -> 261-264 ms side by side against the student's own frozen copies, the fit 15.6 -> 12.4 min)."""
        if not self.shared:
            return self.teacher(images)
        teacher, prefix = self.teacher.forward_with_prefix(images, self.shared)
        return [*teacher, prefix]

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None,
                      extra: torch.Tensor | None = None) -> torch.Tensor:
        teacher, student = self._student_on(targets if targets is not None else self.training_targets(images),
                                            images)
        q = float(self.cfg.get("hard_quantile") or 0.0)
        distances = stage_distances(teacher, student)
        if not q:  # PaddleX's loss: every position of every stage
            return sum(d.mean() for d in distances)
        # each image's worst-matched positions per stage: the student keeps learning the rare views of good
        # parts (the false alarms that cost image AUROC) instead of polishing the common ones further
        return sum(hard_mean(d.flatten(1), q) for d in distances)
