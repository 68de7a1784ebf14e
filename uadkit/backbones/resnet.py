"""ResNet-18 and Wide-ResNet-50-2 with torchvision's state_dict key names (conv1, layer1.0.conv1, ...)."""

from __future__ import annotations

import torch
from torch import nn

from .trunk import Trunk


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int = 64, inner: float = 1.0) -> None:
        super().__init__()
        mid = max(1, round(planes * inner))  # `inner` < 1: a slimmer block with the same output (a student)
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, width: int = 64, inner: float = 1.0) -> None:
        super().__init__()
        mid = max(1, round(int(planes * width / 64) * inner))
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNet(Trunk):
    stem_modules = ("conv1", "bn1")

    def __init__(self, block: type[nn.Module], layers: list[int], width: int = 64, with_head: bool = False,
                 inner: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        self.stage_channels: dict[str, int] = {}
        self.stage_strides: dict[str, int] = {}
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, width, inner))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_channels[f"layer{i + 1}"] = cin
            self.stage_strides[f"layer{i + 1}"] = 4 * 2**i
        self.with_head = with_head
        if with_head:
            self.fc = nn.Linear(cin, 1000)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def block_names(self) -> list[str]:
        return [f"layer{i}.{j}" for i in range(1, 5) if hasattr(self, f"layer{i}")
                for j in range(len(getattr(self, f"layer{i}")))]

    def block_stages(self) -> list[str]:
        return [name.split(".")[0] for name in self.block_names()]

    def truncate(self, stages: list[str]) -> None:
        """Drop layers after the last wanted stage (and the head)."""
        last = max(int(s[-1]) for s in stages)
        for i in range(last + 1, 5):
            delattr(self, f"layer{i}")
        if hasattr(self, "fc"):
            del self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stages(x, ["layer4"])["layer4"]
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# `symmetric` is accepted for the builders' common signature: ResNets pad evenly already
def resnet18(with_head: bool = False, inner: float = 1.0, symmetric: bool = True) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], with_head=with_head, inner=inner)


def wide_resnet50_2(with_head: bool = False, inner: float = 1.0, symmetric: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width=128, with_head=with_head, inner=inner)
