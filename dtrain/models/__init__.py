"""Model registry: `build_model(arch, num_classes, ...)` for every `--arch`.

Each family lives in its own module and exposes a builder
`builder(num_classes, in_channels, image_size, *, <its own options>)`; the keyword-only options are the
arch_args it supports (norm, aux_logits, dropout, pretrained, weights). `tv:<name>` builds any torchvision
classification model.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch.nn as nn

from dtrain.errors import UserError
from dtrain.models import airbench, cnn, googlenet, mnist, resnet, tv
from dtrain.models.state import strip_prefixes

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "googlenet": googlenet.googlenet,
    "cnn": cnn.cnn,
    "mnist-cnn": mnist.mnist_cnn,
    "mnist-cnn-deep": mnist.mnist_cnn_deep,
    "mnist-resnet": mnist.mnist_resnet,
    "airbench": airbench.airbench,
}

# Values of arch_args that mean "not asked for": an arch that lacks the option ignores them.
NEUTRAL: dict[str, Any] = {"norm": "batch", "aux_logits": False, "pretrained": False, "weights": None, "dropout": 0.0}


def list_archs() -> list[str]:
    """The built-in arch names (any torchvision classification model is also accepted as 'tv:<name>')."""
    return sorted(ARCHS)


def _options(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _is_neutral(key: str, value: Any) -> bool:
    return value is None or value is False or (key in NEUTRAL and value == NEUTRAL[key])


def _resolve(arch: str) -> Callable[..., nn.Module]:
    if arch.startswith(tv.PREFIX):
        return partial(tv.build_tv, arch[len(tv.PREFIX):])
    if arch not in ARCHS:
        raise UserError(
            f"unknown arch {arch!r}; valid: {', '.join(list_archs())},"
            " or tv:<name> for any torchvision classification model (e.g. tv:resnet50)"
        )
    return ARCHS[arch]


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **arch_args) -> nn.Module:
    """Build `arch` for `num_classes` classes and `in_channels`-channel images of about `image_size` pixels.

    arch_args an arch does not support are ignored when they are None/False/the neutral default
    (so every Config field can be passed to every arch); any other value is an error.
    """
    builder = _resolve(arch)
    if int(num_classes) < 1:
        raise UserError(f"the number of classes must be at least 1, got {num_classes}")
    if int(in_channels) < 1:
        raise UserError(f"the number of input channels must be at least 1, got {in_channels}")
    supported = _options(builder)
    kwargs = {}
    for key, value in arch_args.items():
        if key in supported:
            if value is not None:
                kwargs[key] = value
        elif not _is_neutral(key, value):
            opts = ", ".join(sorted(supported)) or "none"
            raise UserError(f"arch {arch!r} does not support {key}={value!r} (its options: {opts})")
    return builder(int(num_classes), int(in_channels), int(image_size), **kwargs)


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the model stored in a dtrain checkpoint and load its weights (returned in eval mode)."""
    try:
        arch, num_classes, state = ckpt["arch"], ckpt["num_classes"], ckpt["model"]
    except KeyError as e:
        raise UserError(f"checkpoint lacks {e.args[0]!r}: not a dtrain checkpoint") from e
    arch_args = dict(ckpt.get("arch_args") or {})
    # The stored state dict replaces any initial weights: don't look for them again.
    arch_args.pop("pretrained", None)
    arch_args.pop("weights", None)
    model = build_model(
        arch, num_classes, in_channels=ckpt.get("in_channels", 3), image_size=ckpt.get("image_size", 32),
        **arch_args,
    )
    try:
        model.load_state_dict(strip_prefixes(state))
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit arch {arch!r}: {e}") from e
    return model.eval()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ARCHS", "build_model", "count_parameters", "list_archs", "model_from_checkpoint"]
