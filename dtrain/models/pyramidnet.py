"""PyramidNets, Han, Kim & Kim, "Deep Pyramidal Residual Networks" (CVPR 2017), with ShakeDrop, Yamada et al.,
"ShakeDrop Regularization for Deep Residual Learning" (IEEE Access 2019): `pyramidnet272-200` (bottleneck
blocks, depth 272, alpha 200) and `pyramidnet110-48` (basic blocks, depth 110, alpha 48).

The additive PyramidNet of the authors' code (github.com/dyhan0920/PyramidNet-PyTorch):

    stem: conv3x3 -> 16, BN (no activation)
    3 stages of n blocks (n = (depth - 2) / 6 basic, (depth - 2) / 9 bottleneck), strides 1 / 2 / 2; block
    l = 1 .. 3n is round(16 + alpha * l / 3n) wide (the additive width rule; a bottleneck block's output is
    4 times that):
        basic:      BN, conv3x3(stride), BN, ReLU, conv3x3, BN
        bottleneck: BN, conv1x1, BN, ReLU, conv3x3(stride), BN, ReLU, conv1x1 (x4), BN
        shortcut: the identity (2x2 average pool first where the block downsamples), zero channels appended
        up to the block's width: no parameters
    BN, ReLU, global average pool, linear

Convs have no bias and start He-normal. Parameters for 10 classes and 3 input channels (the paper's figures
in brackets): pyramidnet272-200 26,210,842 (26.0M), pyramidnet110-48 1,772,706 (1.7M): the counts of the
official layout (osmr/imgclsmob's ports list the same), whose final widths, 864 and 64, are the "output
feature dimensions" the authors list. Their parameter figures run below their own layout's counts throughout
(28.3M for PyramidNet-110 alpha 270 in jhkim89/PyramidNet's README, a layout of 28,485,477); without the BN
parameters the two counts here would be 25,999,978 and 1,759,538.

`shakedrop` (P, default 0 = none) multiplies block l's residual branch, l = 1 .. L, as ShakeDrop does with
the linear decay rule p_l = P * l / L (the paper's P = 0.5): in training by b + alpha - b * alpha forward and
b + beta - b * beta backward (b ~ Bernoulli(1 - p_l), alpha ~ U[-1, 1], beta ~ U[0, 1], drawn per image from
torch's global RNG on the input's device), at evaluation by the expectation 1 - p_l.
Adaptive pooling makes them work for any image size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.errors import UserError
from dtrain.models.layers import check_norm, init_he_normal, norm2d

STEM_WIDTH = 16
EXPANSION = {False: 1, True: 4}  # a block's output width over its width, by bottleneck


class ShakeDropFunction(torch.autograd.Function):
    """x * forward_scale forward, grad * backward_scale backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_scale: torch.Tensor, backward_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(backward_scale)
        return x * forward_scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (backward_scale,) = ctx.saved_tensors
        return grad * backward_scale, None, None


class ShakeDrop(nn.Module):
    """ShakeDrop of a residual branch with drop probability `p_drop` (the identity when it is 0)."""

    def __init__(self, p_drop: float):
        super().__init__()
        self.p_drop = p_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p_drop == 0:
            return x
        if not self.training:
            return x * (1 - self.p_drop)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        b = (torch.rand(shape, device=x.device) >= self.p_drop).to(x.dtype)
        alpha = torch.rand(shape, device=x.device, dtype=x.dtype) * 2 - 1
        beta = torch.rand(shape, device=x.device, dtype=x.dtype)
        return ShakeDropFunction.apply(x, b + alpha - b * alpha, b + beta - b * beta)


def shakedrop_probabilities(final: float, blocks: int) -> list[float]:
    """The linear decay rule: p_l = final * l / blocks for l = 1 .. blocks."""
    return [final * k / blocks for k in range(1, blocks + 1)]


def block_widths(alpha: float, blocks: int) -> list[int]:
    """The additive width rule: block l = 1 .. blocks is round(16 + alpha * l / blocks) wide."""
    return [round(STEM_WIDTH + alpha * k / blocks) for k in range(1, blocks + 1)]


def basic_branch(cin: int, width: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        norm2d(norm, cin), nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False),
        norm2d(norm, width), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, bias=False),
        norm2d(norm, width),
    )


def bottleneck_branch(cin: int, width: int, stride: int, norm: str) -> nn.Sequential:
    cout = width * EXPANSION[True]
    return nn.Sequential(
        norm2d(norm, cin), nn.Conv2d(cin, width, 1, bias=False),
        norm2d(norm, width), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
        norm2d(norm, width), nn.ReLU(inplace=True), nn.Conv2d(width, cout, 1, bias=False),
        norm2d(norm, cout),
    )


class PyramidBlock(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, bottleneck: bool, norm: str, p_drop: float):
        super().__init__()
        make_branch = bottleneck_branch if bottleneck else basic_branch
        self.branch = make_branch(cin, width, stride, norm)
        self.shakedrop = ShakeDrop(p_drop)
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shakedrop(self.branch(x))
        shortcut = self.pool(x)
        out[:, :shortcut.shape[1]] += shortcut  # the zero-padded identity, without building the zeros
        return out


class PyramidNet(nn.Module):
    def __init__(self, depth: int, alpha: float, bottleneck: bool, num_classes: int, in_channels: int = 3,
                 norm: str = "batch", shakedrop: float = 0.0):
        super().__init__()
        n = (depth - 2) // (9 if bottleneck else 6)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_WIDTH, 3, padding=1, bias=False), norm2d(norm, STEM_WIDTH),
        )
        widths, p_drops = block_widths(alpha, 3 * n), shakedrop_probabilities(shakedrop, 3 * n)
        blocks, cin = [], STEM_WIDTH
        for i, (width, p_drop) in enumerate(zip(widths, p_drops)):
            stride = 2 if i in (n, 2 * n) else 1
            blocks.append(PyramidBlock(cin, width, stride, bottleneck, norm, p_drop))
            cin = width * EXPANSION[bottleneck]
        self.blocks = nn.Sequential(*blocks)
        self.head_norm = nn.Sequential(norm2d(norm, cin), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_he_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_norm(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def pyramidnet(depth: int, alpha: float, bottleneck: bool, num_classes: int, in_channels: int = 3,
               image_size: int = 32, *, norm: str = "batch", shakedrop: float = 0.0) -> PyramidNet:
    """PyramidNet-depth (alpha); `norm` 'batch' (the paper's) or 'group', `shakedrop` the final P in [0, 1]."""
    arch = f"pyramidnet{depth}-{alpha}"
    check_norm(norm, ("batch", "group"), arch)
    if not 0 <= shakedrop <= 1:
        raise UserError(f"arch {arch!r}: shakedrop (the last block's drop probability) must be in [0, 1], "
                        f"got {shakedrop}")
    return PyramidNet(depth, alpha, bottleneck, num_classes, in_channels, norm, float(shakedrop))
