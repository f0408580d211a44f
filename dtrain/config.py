"""The run configuration: one typed object built from defaults < recipe < command-line flags.

Every field of `Config` is a command-line flag (`foo_bar` -> `--foo-bar`; booleans get `--foo` and
`--no-foo`), and a key a recipe file may set. `--recipe NAME|FILE.toml` picks a recipe; without one, the
arch's default recipe applies (`ARCH_DEFAULT_RECIPE`). The resolved object is saved with every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dtrain.errors import UserError

RECIPE_DIR = Path(__file__).parent / "recipes"

# The best recipe the project has for each arch; an arch not named here uses the plain defaults.
ARCH_DEFAULT_RECIPE = {
    "resnet18": "seed-resnet18",
    "googlenet": "seed-googlenet",
    "airbench": "airbench",
    "mnist-cnn-deep": "seed-mnist-cnn-deep",
    "mnist-cnn": "mnist-cnn",
    "mnist-resnet": "mnist-resnet",
}


def _f(default, help, choices=None, short=None):
    meta = {"help": help, "choices": choices, "short": short}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # what to train
    recipe: str | None = _f(None, "recipe name (dtrain/recipes/NAME.toml) or path to a .toml file")
    arch: str = _f("resnet18", "model architecture (see --list-archs); tv:<name> for torchvision models")
    norm: str = _f("batch", "normalisation layers of archs that offer a choice", ["batch", "group", "none"])
    aux_logits: bool = _f(False, "googlenet: train with the two 0.3-weighted auxiliary classifiers")
    pretrained: bool = _f(False, "tv:<name> archs: start from torchvision's ImageNet weights (from its cache)")
    weights: str | None = _f(None, "tv:<name> archs: start from the weights in this file")
    # data
    dataset: str = _f("cifar10", "dataset format", ["cifar10", "fake", "kaggle", "imagefolder", "mnist"])
    data_dir: str = _f("data", "dataset root folder")
    download: bool = _f(True, "download the dataset if it is absent (cifar10, mnist)")
    val_split: int = _f(0, "hold out N labelled training images for validation (kaggle, imagefolder)")
    image_size: int | None = _f(None, "resize images to this size (default: the dataset's own)")
    normalize: str = _f("dataset", "input normalisation: the dataset's known mean/std, 'auto' (computed "
                        "over the training images), 'imagenet', or 'none'",
                        ["dataset", "auto", "imagenet", "none"])
    fake_size: int = _f(1024, "fake dataset: number of training images (test: a quarter)")
    num_classes: int | None = _f(None, "fake dataset: number of classes (default 10)")
    loader: str = _f("auto", "input pipeline: 'memory' keeps the uint8 images on the device and augments "
                     "there, 'files' decodes in DataLoader workers; auto picks memory when the data fits",
                     ["auto", "memory", "files"])
    workers: int = _f(4, "DataLoader worker processes per training process (files loader)")
    cache_dir: str | None = _f(None, "kaggle: folder for the packed cache of decoded images (default: "
                               "DIR/.dtrain-cache beside the data)")
    # augmentation (batched, on the device, on uint8 images)
    augment: bool = _f(True, "apply the augmentations below to training images")
    crop_padding: int = _f(4, "random crop after padding by this many pixels (0: off)")
    pad_mode: str = _f("constant", "padding for the random crop", ["constant", "reflect"])
    hflip: bool = _f(True, "random horizontal flip")
    vflip: bool = _f(False, "random vertical flip")
    cutout_holes: int = _f(0, "Cutout: number of square holes (0: off)")
    cutout_length: int = _f(16, "Cutout: hole side in pixels")
    translate: float = _f(0.0, "random translation, fraction of the image size (0: off)")
    rotate: float = _f(0.0, "random rotation up to this many degrees (0: off)")
    # optimisation
    epochs: int = _f(30, "training epochs")
    max_steps: int | None = _f(None, "stop after this many optimiser steps (smoke tests)")
    batch_size: int = _f(128, "GLOBAL batch size, split evenly over the processes", short="-b")
    eval_batch_size: int = _f(1024, "GLOBAL evaluation batch size")
    grad_accum: int = _f(1, "gradient accumulation steps per optimiser step")
    optimizer: str = _f("sgd", "optimiser", ["sgd", "adam", "adamw", "rmsprop"])
    lr: float = _f(0.1, "peak learning rate (the same at any number of processes)")
    momentum: float = _f(0.9, "momentum (sgd, rmsprop)")
    nesterov: bool = _f(False, "Nesterov momentum (sgd)")
    weight_decay: float = _f(5e-4, "weight decay")
    decay_norm_bias: bool = _f(True, "apply weight decay to biases and normalisation weights too")
    bias_lr_scale: float = _f(1.0, "multiply the LR of 1-D parameters (biases, normalisation weights) by "
                              "this and divide their weight decay by it (airbench: 64)")
    scheduler: str = _f("cosine", "learning-rate schedule",
                        ["cosine", "plateau", "multistep", "onecycle", "linear", "none"])
    onecycle_start: float = _f(0.04, "onecycle: LR factor at the first step")
    onecycle_peak: float = _f(0.25, "onecycle: fraction of training at which the LR peaks")
    onecycle_end: float = _f(0.0, "onecycle: LR factor at the last step")
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 over this many epochs")
    milestones: list[int] = _f([150, 225], "multistep: epochs at which the LR is multiplied by --gamma")
    gamma: float = _f(0.1, "multistep: LR factor at each milestone")
    plateau_monitor: str = _f("val_loss", "plateau: metric watched", ["val_loss", "val_acc"])
    plateau_patience: int = _f(10, "plateau: epochs without improvement before the LR drops")
    plateau_factor: float = _f(0.5, "plateau: LR factor")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float | None = _f(None, "clip the gradient norm to this value")
    ema: float | None = _f(None, "keep an exponential moving average of the weights with this decay and "
                           "evaluate it")
    tta: bool = _f(False, "evaluate on the image and its mirror, averaging the logits")
    tta_shift: int = _f(0, "with --tta: also average the mirrored pairs of the image shifted diagonally by "
                        "-N and +N pixels (reflect padding), weight 1/2 in all (airbench: 1)")
    lookahead: int = _f(0, "with --ema DECAY: every N optimiser steps the trained weights jump to the "
                        "average, whose decay is then DECAY**N ramped up as progress**3 (airbench: 5)")
    # system
    seed: int = _f(0, "random seed (sampling order, augmentation, initialisation)")
    precision: str | None = _f(None, "mixed precision (default: the accelerate config/launcher's)",
                               ["no", "fp16", "bf16"])
    channels_last: bool = _f(False, "channels-last memory format")
    compile: bool = _f(False, "torch.compile the model")
    sync_bn: bool = _f(False, "convert BatchNorm to SyncBatchNorm (GPUs only)")
    # output
    output_dir: str | None = _f(None, "output folder (default runs/<arch>-<time>, or runs/<job>-<id> under Slurm)")
    resume: str | None = _f(None, "'auto': continue from last.pt in the output dir if there is one; or a path")
    save_every: int = _f(1, "write last.pt every N epochs (always at the end, when val_acc improves, and on a "
                         "stop signal); fast recipes save less often, a checkpoint costs time")
    log_every: int = _f(20, "console/W&B/TensorBoard step logging interval")
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)")
    plots: bool = _f(True, "draw curves and the confusion matrix to <output-dir>/run.png")
    tensorboard: bool = _f(False, "write TensorBoard scalars to <output-dir>/tb")
    wandb: bool = _f(True, "log to Weights & Biases from the main process (offline when no API key)")
    wandb_project: str = _f("dtrain", "W&B project")
    wandb_entity: str | None = _f(None, "W&B entity (team or user)")
    wandb_name: str | None = _f(None, "W&B run name (default: the output folder's name)")
    wandb_mode: str | None = _f(None, "W&B mode (default: online with an API key, else offline)",
                                ["online", "offline", "disabled"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _base_type(tp):
    """(scalar type, is_list) of a field annotation such as `int | None` or `list[int]`."""
    tp = eval(tp, vars(typing), {}) if isinstance(tp, str) else tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = args[0]
        args = list(typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return args[0], True
    return tp, False


def _parse_bool(name, value):
    if isinstance(value, bool):
        return value
    raise UserError(f"{name} must be true or false, not {value!r}")


def _coerce(name: str, value):
    """Check and convert a recipe value to the field's type."""
    tp, is_list = _base_type(FIELDS[name].type)
    if value is None:
        return None
    if is_list:
        if not isinstance(value, list):
            raise UserError(f"{name} must be a list, not {value!r}")
        return [tp(v) for v in value]
    if tp is bool:
        return _parse_bool(name, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or isinstance(value, bool) and tp is not bool:
        raise UserError(f"{name} must be of type {tp.__name__}, not {value!r}")
    choices = FIELDS[name].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name: str) -> dict:
    """A recipe's settings, from a shipped name or a .toml path; unknown keys are errors."""
    path = Path(name) if name.endswith(".toml") else RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"recipe {name!r} not found: give one of {', '.join(list_recipes())} "
                        f"or the path of a .toml file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    data.pop("description", None)
    unknown = sorted(set(data) - set(FIELDS) - {"recipe"})
    if unknown:
        raise UserError(f"recipe {path}: unknown settings {', '.join(unknown)}")
    return {k: _coerce(k, v) for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain/main.py",
        description="Train an image classifier on 1..N processes (run it with accelerate launch, torchrun, "
                    "or plain python). Flags override the recipe; see README.md.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--list-archs", action="store_true", help="print the available architectures and exit")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        tp, is_list = _base_type(f.type)
        meta = dict(help=f.metadata["help"])
        names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        if tp is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, **meta)
        elif is_list:
            p.add_argument(*names, dest=f.name, type=tp, nargs="*", **meta)
        else:
            p.add_argument(*names, dest=f.name, type=tp, choices=f.metadata.get("choices"), **meta)
    return p


def build_config(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """Defaults < recipe (named, or the arch's default) < flags given on the command line."""
    args = vars((parser or build_parser()).parse_args(argv))
    for flag in ("list_archs", "list_recipes"):
        args.pop(flag, None)
    return resolve(args)


def resolve(overrides: dict) -> Config:
    recipe = overrides.get("recipe")
    if recipe is None and "arch" in overrides:
        recipe = ARCH_DEFAULT_RECIPE.get(overrides["arch"])
    if recipe is None and "arch" not in overrides:
        recipe = ARCH_DEFAULT_RECIPE.get(Config.arch)
    settings = load_recipe(recipe) if recipe else {}
    settings.update(overrides)
    settings["recipe"] = recipe
    cfg = Config(**settings)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise UserError("--batch-size and --eval-batch-size must be positive")
    if cfg.grad_accum < 1:
        raise UserError("--grad-accum must be at least 1")
    if cfg.epochs < 1 and cfg.max_steps is None:
        raise UserError("--epochs must be at least 1")
    if cfg.cutout_holes and cfg.cutout_length < 1:
        raise UserError("--cutout-length must be positive when --cutout-holes is set")
    if cfg.ema is not None and not 0.0 < cfg.ema < 1.0:
        raise UserError("--ema must be a decay between 0 and 1, e.g. 0.999")
    if cfg.lookahead < 0 or cfg.lookahead and cfg.ema is None:
        raise UserError("--lookahead N needs --ema DECAY (e.g. --ema 0.95 --lookahead 5) and N >= 0")
    if cfg.tta_shift < 0 or cfg.tta_shift and not cfg.tta:
        raise UserError("--tta-shift N needs --tta and N >= 0")
    if not 0.0 < cfg.onecycle_peak < 1.0:
        raise UserError("--onecycle-peak must be between 0 and 1 (exclusive), e.g. 0.25")
    if cfg.save_every < 1:
        raise UserError("--save-every must be at least 1")
    if cfg.bias_lr_scale <= 0:
        raise UserError("--bias-lr-scale must be positive")


def config_from_dict(d: dict) -> Config:
    """The Config saved with a run (config.json or a checkpoint); unknown keys from newer versions dropped."""
    return Config(**{k: v for k, v in d.items() if k in FIELDS})


def flags_markdown() -> str:
    """The table of flags in README.md (`python -m dtrain.config` prints it; a test keeps them equal)."""
    rows = ["| flag | default | what |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        tp, _ = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            flag = f"{flag} / --no-{f.name.replace('_', '-')}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        what = f.metadata["help"] + (" (" + " \\| ".join(choices) + ")" if choices else "")
        rows.append(f"| `{flag}` | `{default}` | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flags_markdown())
