"""`tv:<name>`: any torchvision classification model, with its classifier replaced for the dataset.

The model is built with torchvision's 1000 ImageNet classes (so ImageNet weights fit), optionally loaded
with pretrained weights, then its head - the last Linear (or 1x1 Conv2d, as in SqueezeNet) that outputs
1000 classes - is replaced by a fresh layer for `num_classes`. 1-channel input is repeated to 3 channels.

Weights:
  pretrained=True   torchvision's default ImageNet weights, read from the torch hub cache
                    (torch.hub.get_dir()/checkpoints/<file>). Nothing is downloaded: a missing file is an
                    error that names the exact path to put it at.
  weights=FILE      a state dict (or a dtrain checkpoint) loaded into the model with
                    torch.load(weights_only=True); head entries whose shapes differ are skipped. With
                    pretrained=True too, the file stands in for the hub cache (offline clusters).
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import torch
import torch.nn as nn

from dtrain.errors import UserError
from dtrain.models.state import strip_prefixes

PREFIX = "tv:"
IMAGENET_CLASSES = 1000
# Builders with auxiliary heads; their pretrained weights expect `transform_input=True` (a fixed
# per-channel affine map), which is set whether or not pretrained, so a checkpoint rebuilds the same model.
_AUX_MODELS = {"googlenet", "inception_v3"}
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # their auxiliary heads' weights, unused here


def tv_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


class RepeatChannels(nn.Module):
    """Feeds 1-channel images to a 3-channel model by repeating the channel."""

    def __init__(self, model: nn.Module, channels: int = 3):
        super().__init__()
        self.model = model
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, self.channels, -1, -1)
        return self.model(x)


def cached_weights_path(name: str) -> tuple[object, str]:
    """torchvision's default weights enum for `name` and the hub-cache file it loads from."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError) as e:
        raise UserError(f"torchvision has no pretrained weights for {name!r} ({e}); use --weights FILE") from e
    filename = os.path.basename(urlparse(weights.url).path)
    return weights, os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def min_size(name: str) -> int | None:
    """The smallest image side torchvision's default weights for `name` state (meta["min_size"]), or None."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["min_size"][0])
    except (ValueError, KeyError, AttributeError, TypeError, IndexError):
        return None


def find_head(model: nn.Module, out_features: int = IMAGENET_CLASSES) -> str:
    """Dotted name of the classifier layer: the last Linear/Conv2d producing `out_features` outputs."""
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == out_features:
            head = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == out_features:
            head = name
    if head is None:
        raise UserError(f"could not find the classifier layer of this torchvision model ({type(model).__name__})")
    return head


def replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    setattr(parent, attr, new)


def read_weights_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or unsafe pickle
        raise UserError(f"--weights {path}: cannot read it as a PyTorch state dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a dtrain checkpoint
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--weights {path}: expected a state dict (name -> tensor)")
    state = strip_prefixes(state)
    if state and all(k.startswith("model.") for k in state):  # saved from a RepeatChannels wrapper
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def load_body(model: nn.Module, state: dict, head: str, path: str) -> None:
    """Load `state` into `model`, skipping head entries whose shapes differ (a new class count)."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and not k.startswith(_AUX_PREFIXES)]
    if unexpected:
        raise UserError(
            f"--weights {path} has {len(unexpected)} entries this model lacks (e.g. {', '.join(unexpected[:3])});"
            " the file is for a different architecture"
        )
    keep = {}
    for key, value in state.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            if key.startswith(head + "."):  # a classifier for another class count: keep the new one
                continue
            raise UserError(
                f"--weights {path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)};"
                " the file is for a different architecture"
            )
        keep[key] = value
    missing = [k for k in own if k not in keep and not k.startswith(head + ".")]
    if missing:
        raise UserError(
            f"--weights {path} does not fit this model: {len(missing)} entries missing"
            f" (e.g. {', '.join(missing[:3])}); the file is for a different architecture"
        )
    model.load_state_dict(keep, strict=False)


def build_tv(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, *,
    pretrained: bool = False, weights: str | None = None,
) -> nn.Module:
    import torchvision

    names = tv_names()
    if name not in names:
        raise UserError(
            f"unknown torchvision model {PREFIX}{name}; torchvision {torchvision.__version__} has: "
            + ", ".join(PREFIX + n for n in names)
        )
    if in_channels not in (1, 3):
        raise UserError(
            f"{PREFIX}{name} takes 3-channel images (1-channel images are repeated); got {in_channels} channels"
        )
    extra = {"transform_input": True} if name in _AUX_MODELS else {}
    if pretrained and not weights:
        enum, path = cached_weights_path(name)
        if not os.path.isfile(path):
            raise UserError(
                f"pretrained weights for {PREFIX}{name} are not in the torch hub cache (dtrain does not download"
                f" them): download {enum.url} and put it at {path} (or point TORCH_HOME at a directory whose"
                f" hub/checkpoints/ holds {os.path.basename(path)}), or pass --weights FILE"
            )
        try:
            model = torchvision.models.get_model(name, weights=enum, **extra)
        except Exception as e:  # truncated or foreign file in the cache
            raise UserError(
                f"the cached pretrained weights {path} cannot be loaded into {PREFIX}{name} ({e});"
                f" replace the file with {enum.url} or pass --weights FILE"
            ) from e
    else:
        if name in _AUX_MODELS:
            extra.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(name, weights=None, num_classes=IMAGENET_CLASSES, **extra)
    if name in _AUX_MODELS:  # the engine trains plain logits: drop the auxiliary heads
        model.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
    head = find_head(model)
    if not (pretrained and num_classes == IMAGENET_CLASSES):
        replace_head(model, head, num_classes)
    if weights:
        load_body(model, read_weights_file(weights), head, weights)
    if in_channels == 1:
        model = RepeatChannels(model)
    return model
