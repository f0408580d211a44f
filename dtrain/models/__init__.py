"""Model registry: `build_model(arch, num_classes, ...)` for every `--arch`.

Each family lives in its own module and exposes a builder
`builder(num_classes, in_channels, image_size, *, <its own options>)`; the keyword-only options are the
arch_args it supports (norm, aux_logits, pretrained, weights; options no Config field sets, such as
pyramidnet's shakedrop, are reached through build_model's keywords). `wrnD-K` builds any Wide ResNet (the
listed ones are three of them) and `tv:<name>` any torchvision classification model.

A model states its quirks with two optional methods; training reaches them only through `training_loss`
and `init_from_data` below, so a model without them is a plain nn.Module returning logits:

    loss(output, target, criterion) -> (loss, logits)
        The training loss of what its training forward returned, and the logits that are scored. For a
        model whose training forward returns more than logits (googlenet's auxiliary heads).
    init_from_data(images)
        Set weights from normalised training images (N, C, H, W; up to DATA_INIT_IMAGES of them), once,
        before a fresh run's first step (never on resume: the checkpoint holds them). airbench's whitening.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn

from dtrain.errors import UserError
from dtrain.models import airbench, cifar_resnet, cnn, googlenet, mnist, preact, pyramidnet, resnet, tv, wrn
from dtrain.models.state import strip_prefixes

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "googlenet": googlenet.googlenet,
    "cnn": cnn.cnn,
    "mnist-cnn": mnist.mnist_cnn,
    "mnist-cnn-deep": mnist.mnist_cnn_deep,
    "mnist-resnet": mnist.mnist_resnet,
    "airbench": airbench.airbench,
    "airbench96": airbench.airbench96,
    "preact-resnet18": preact.preact_resnet18,
    **{f"resnet{depth}": partial(cifar_resnet.cifar_resnet, depth) for depth in cifar_resnet.DEPTHS},
    **{name: wrn.builder_for(name) for name in wrn.LISTED},
    "pyramidnet272-200": partial(pyramidnet.pyramidnet, 272, 200, True),
    "pyramidnet110-48": partial(pyramidnet.pyramidnet, 110, 48, False),
}

# Values of arch_args that mean "not asked for": an arch that lacks the option ignores them.
NEUTRAL: dict[str, Any] = {"norm": "batch", "aux_logits": False, "pretrained": False, "weights": None,
                           "shakedrop": 0.0, "dropout": 0.0}
DATA_INIT_IMAGES = 5000  # training images handed to a model's init_from_data hook


def list_archs() -> list[str]:
    """The built-in arch names (also accepted: 'wrnD-K' for any Wide ResNet, 'tv:<name>' for any torchvision
    classification model)."""
    return sorted(ARCHS)


def _options(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _is_neutral(key: str, value: Any) -> bool:
    return value is None or value is False or (key in NEUTRAL and value == NEUTRAL[key])


def _resolve(arch: str) -> Callable[..., nn.Module]:
    if arch.startswith(tv.PREFIX):
        return partial(tv.build_tv, arch[len(tv.PREFIX):])
    if arch in ARCHS:
        return ARCHS[arch]
    wide = wrn.builder_for(arch)
    if wide is None:
        raise UserError(
            f"unknown arch {arch!r}; valid: {', '.join(list_archs())}, {wrn.NAME_HINT},"
            " or tv:<name> for any torchvision classification model (e.g. tv:resnet50)"
        )
    return wide


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **arch_args) -> nn.Module:
    """Build `arch` for `num_classes` classes and `in_channels`-channel images of about `image_size` pixels.

    arch_args an arch does not support are ignored when they are None/False/the neutral default
    (so every Config field can be passed to every arch); any other value is an error.
    """
    builder = _resolve(arch)
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


def training_loss(model: nn.Module, output, target: torch.Tensor, criterion) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of a training forward's output: the model's `loss` hook, or criterion on the logits.
    `model` is the unwrapped module (the hooks are not reachable through DDP or torch.compile)."""
    hook = getattr(model, "loss", None)
    if hook is not None:
        return hook(output, target, criterion)
    return criterion(output.float(), target), output


def init_from_data(model: nn.Module, sample_images: Callable[[], torch.Tensor]) -> None:
    """Call the model's `init_from_data` hook with `sample_images()`; load nothing for a model without it."""
    hook = getattr(model, "init_from_data", None)
    if hook is not None:
        hook(sample_images())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["ARCHS", "DATA_INIT_IMAGES", "build_model", "count_parameters", "init_from_data", "list_archs",
           "model_from_checkpoint", "training_loss"]
