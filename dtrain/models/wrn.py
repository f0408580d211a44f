"""Wide ResNets, Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016): `wrnD-K` for any depth D with
D - 4 divisible by 6 and any widen factor K (`wrn28-10`, `wrn16-8` and `wrn40-2` are listed).

The layout of the authors' code (github.com/szagoruyko/wide-residual-networks):

    stem: conv3x3 -> 16 (no norm, no activation)
    3 stages of n = (D - 4) / 6 pre-activation basic blocks (preact.PreActBlock), 16K / 32K / 64K channels,
    strides 1 / 2 / 2:
        o = ReLU(BN(x)); out = conv3x3(o, stride); out = conv3x3(ReLU(BN(out))) [dropout before it]
        shortcut: conv1x1(o, stride) where the width or the stride changes, else x
    BN, ReLU, global average pool, linear

Convs have no bias and start He-normal. `dropout` (default 0) is the paper's dropout between the two convs
of a block (0.3 in its dropout runs). Parameters for 10 classes and 3 input channels (the paper's figure in
brackets): wrn28-10 36,479,194 (36.5M), wrn16-8 10,961,370 (11.0M), wrn40-2 2,243,546 (2.2M).
Adaptive pooling makes them work for any image size.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

from dtrain.errors import UserError
from dtrain.models.layers import check_norm, init_he_normal, norm2d
from dtrain.models.preact import make_stage

NAME = re.compile(r"wrn([1-9][0-9]*)-([1-9][0-9]*)")
LISTED = ("wrn16-8", "wrn28-10", "wrn40-2")
NAME_HINT = "wrnD-K for any Wide ResNet (depth D = 6n + 4, widen factor K >= 1, e.g. wrn28-10)"


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, norm: str = "batch",
                 dropout: float = 0.0):
        super().__init__()
        blocks = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        stages, cin = [], 16
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            stages.append(make_stage(cin, width, blocks, 1 if i == 0 else 2, norm, dropout))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.bn = norm2d(norm, cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_he_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int = 3, image_size: int = 32, *,
                norm: str = "batch", dropout: float = 0.0) -> WideResNet:
    """WRN-depth-widen; `norm` 'batch' (the paper's) or 'group', `dropout` in [0, 1)."""
    check_norm(norm, ("batch", "group"), f"wrn{depth}-{widen}")
    if not 0 <= dropout < 1:
        raise UserError(f"arch 'wrn{depth}-{widen}': dropout must be in [0, 1), got {dropout}")
    return WideResNet(depth, widen, num_classes, in_channels, norm, dropout)


def builder_for(arch: str) -> Callable[..., WideResNet] | None:
    """The builder of a `wrnD-K` name (a UserError for an invalid depth D), or None for any other name."""
    match = NAME.fullmatch(arch)
    if match is None:
        return None
    depth, widen = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6:
        raise UserError(f"arch {arch!r}: a Wide ResNet's depth must be 6n + 4 (10, 16, 22, 28, 34, 40, ...), "
                        f"got {depth}")
    return partial(wide_resnet, depth, widen)
