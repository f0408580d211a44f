"""Small building blocks shared by the model families."""

from __future__ import annotations

import torch.nn as nn

from dtrain.errors import UserError

NORMS = ("batch", "group", "none")


def check_norm(norm: str, allowed: tuple[str, ...], arch: str) -> str:
    if norm not in allowed:
        raise UserError(
            f"--norm {norm!r} is not supported by arch {arch!r}; choose one of: {', '.join(allowed)}"
        )
    return norm


def group_count(channels: int) -> int:
    """Groups for GroupNorm: up to 32, with at least 4 channels per group where possible."""
    groups = 1
    while groups < 32 and channels % (groups * 2) == 0 and channels // (groups * 2) >= 4:
        groups *= 2
    return groups


def norm2d(norm: str, channels: int) -> nn.Module:
    """'batch' -> BatchNorm2d, 'group' -> GroupNorm (no batch statistics), 'none' -> Identity."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "none":
        return nn.Identity()
    raise UserError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")


def conv_norm_relu(
    cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int | None = None,
    norm: str = "batch", bias: bool = False,
) -> nn.Sequential:
    """conv (padding 'same' for odd kernels by default) -> norm -> ReLU."""
    if padding is None:
        padding = kernel // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias),
        norm2d(norm, cout),
        nn.ReLU(inplace=True),
    )


def check_image_size(image_size: int, minimum: int, arch: str) -> None:
    if image_size < minimum:
        raise UserError(
            f"arch {arch!r} needs images of at least {minimum}x{minimum} pixels, got --image-size {image_size}"
        )


def init_he_normal(model: nn.Module) -> nn.Module:
    """He et al. 2015's normal initialisation, std sqrt(2 / (k * k * out_channels)), for every conv (as the
    reference code of the CIFAR ResNets, Wide ResNets and PyramidNets sets it); norms and linears keep torch's
    defaults (scale 1, shift 0). Returns `model`."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model
