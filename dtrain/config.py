"""The run configuration: one typed object built from defaults < recipe < command-line flags.

Every field of `Config` is a command-line flag (`foo_bar` -> `--foo-bar`; booleans get `--foo` and
`--no-foo`), and a key a recipe file may set. `--recipe NAME|FILE.toml|RUN/config.json` picks a recipe;
without one, the arch's default recipe applies (`ARCH_DEFAULT_RECIPE`). The resolved object is saved with
every run as config.json, and a run's config.json is itself a recipe: its settings re-run, less the keys in
`RUN_ONLY_KEYS` (where that run wrote and resumed, its recipe, its place in a sweep).

Flags also take the forms sweep agents and other tools use: `--foo-bar=value`, `--foo_bar value`, and for
booleans `--foo=true|false` (also True/False, 1/0, yes/no) besides `--foo` / `--no-foo`; list flags take
`--milestones 3 5`, `--milestones=3,5` or `--milestones=[3, 5]`.
Each field declares the rule its value obeys (`check=`, e.g. `at_least(1)`); `validate` checks them all, and
the few rules between fields (`CROSS_CHECKS`), when the Config is built: a bad value names its flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dtrain.cli import command_name
from dtrain.errors import UserError
from dtrain.helptable import argparse_markdown

RECIPE_DIR = Path(__file__).parent / "recipes"

# The best recipe the project has for each arch; an arch not named here uses the plain defaults.
ARCH_DEFAULT_RECIPE = {
    "resnet18": "seed-resnet18",
    "googlenet": "seed-googlenet",
    "airbench": "airbench",
    "mnist-cnn-deep": "seed-mnist-cnn-deep",
    "mnist-cnn": "mnist-cnn",
    "mnist-resnet": "mnist-resnet",
    "airbench96": "airbench96",
    "wrn28-10": "wrn28-10",
    "wrn16-8": "wrn16-8-sam",
    "pyramidnet272-200": "pyramidnet272-shakedrop",
}


@dataclass(frozen=True)
class Rule:
    """A check of one setting's value; `text` completes "--flag must be ..."."""
    test: Callable[[object], bool]
    text: str


def at_least(n) -> Rule:
    return Rule(lambda v: v >= n, f"at least {n}")


def in_range(lo, hi, low_open: bool = False, high_open: bool = False) -> Rule:
    def test(v):
        return (lo < v if low_open else lo <= v) and (v < hi if high_open else v <= hi)
    excluded = [str(x) for x, is_open in ((lo, low_open), (hi, high_open)) if is_open]
    return Rule(test, f"between {lo} and {hi}" + (f" ({' and '.join(excluded)} excluded)" if excluded else ""))


def each(rule: Rule) -> Rule:
    return Rule(lambda v: all(rule.test(x) for x in v), f"a list of values each {rule.text}")


positive = Rule(lambda v: v > 0, "positive")
FLOAT32_MAX = 3.4028234663852886e38
finite = Rule(lambda v: math.isfinite(v), "a finite number")


# What a resumed run may do with a setting (dtrain.resume applies it)
MAY_CHANGE = "may change"             # read afresh from the resumed run's flags
MUST_MATCH = "must match"             # the checkpoint's value is needed (Policy.why says why)
SAME_MID_EPOCH = "same mid-epoch"     # the checkpoint's value is needed where the run stopped mid-epoch
BY_RESULT = "checked by result"       # compared through what it makes: the model, the data's fingerprint
RESUME_RULES = (MUST_MATCH, SAME_MID_EPOCH, BY_RESULT, MAY_CHANGE)


@dataclass(frozen=True)
class Policy:
    """What dtrain does with a setting beyond using its value."""
    resume: str                # one of RESUME_RULES
    why: str = ""              # MUST_MATCH / SAME_MID_EPOCH: why the checkpoint's value is needed
    run_only: bool = False     # the run's own (where it wrote, its place in a sweep): left out when its
                               # config.json serves as a recipe
    sweepable: bool = True     # may be a --sweep axis
    groups: bool = True        # separates dtrain summarize's groups (False: ignored there)


CHANGES = Policy(MAY_CHANGE)                            # what is trained and how; read afresh on resume
INCIDENTAL = Policy(MAY_CHANGE, groups=False)           # changes nothing trained: I/O, logging, saving
BUILT = Policy(BY_RESULT)                               # shapes the model or picks the data
SEED = Policy(SAME_MID_EPOCH, "a mid-epoch position is a place in the sample order it shuffles", groups=False)
RUN_SETTING = Policy(MAY_CHANGE, run_only=True, groups=False)
SWEEP = Policy(MAY_CHANGE, run_only=True, sweepable=False, groups=False)


STEP_COUNT = "the run's step count, its schedule and its place in an epoch count batches of that size"
OPTIMISER_STATE = "the optimiser's state depends on it"


def matching(why: str) -> Policy:
    return Policy(MUST_MATCH, why)


def _f(default, help, choices=None, short=None, check: Rule | None = None, *, policy: Policy, also=()):
    """A Config field: its default, help text, allowed choices, short flag, the rule its value obeys (None,
    the "not set" value of an optional field, is not checked; floats must also be finite) and its policy.
    `also`: for a true/false setting, the named values it takes besides (e.g. --hflip alternate)."""
    meta = {"help": help, "choices": choices, "short": short, "check": check, "policy": policy, "also": also}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # what to train
    recipe: str | None = _f(None, "recipe name (dtrain/recipes/NAME.toml), or the path of a .toml file or "
                             "of a run's config.json", policy=RUN_SETTING)
    arch: str = _f("resnet18", "model architecture (see --list-archs); tv:<name> for torchvision models", policy=BUILT)
    norm: str = _f("batch", "normalisation layers of archs that offer a choice", ["batch", "group", "none"],
                   policy=BUILT)
    aux_logits: bool = _f(False, "googlenet: train with the two 0.3-weighted auxiliary classifiers", policy=BUILT)
    shakedrop: float = _f(0.0, "pyramidnet archs: ShakeDrop's drop probability P of the last block (the blocks' "
                          "rise linearly to it; 0: off)", check=in_range(0, 1), policy=BUILT)
    dropout: float = _f(0.0, "wrnD-K archs: dropout between the two convolutions of each block (0: off)",
                        check=in_range(0, 1, high_open=True), policy=BUILT)
    pretrained: bool = _f(False, "tv:<name> archs: start from torchvision's ImageNet weights (from its cache)",
                          policy=CHANGES)
    weights: str | None = _f(None, "tv:<name> archs: start from the weights in this file", policy=CHANGES)
    # data
    dataset: str = _f("cifar10", "dataset format", ["cifar10", "cifar100", "fake", "kaggle", "imagefolder", "mnist"],
                      policy=BUILT)
    data_dir: str = _f("data", "dataset root folder", policy=CHANGES)
    download: bool = _f(True, "download the dataset if it is absent (cifar10, cifar100, mnist)", policy=INCIDENTAL)
    cifar100_labels: str = _f("fine", "cifar100: train on the 100 fine classes or the 20 coarse superclasses",
                              ["fine", "coarse"], policy=BUILT)
    val_split: int = _f(0, "hold out N labelled training images for validation (kaggle, imagefolder)",
                        check=at_least(0), policy=BUILT)
    image_size: int | None = _f(None, "resize images to this size (default: the dataset's own)", check=at_least(1),
                                policy=BUILT)
    normalize: str = _f("dataset", "input normalisation: the dataset's known mean/std, 'auto' (computed "
                        "over the training images), 'imagenet', or 'none'",
                        ["dataset", "auto", "imagenet", "none"], policy=CHANGES)
    fake_size: int = _f(1024, "fake dataset: number of training images (test: a quarter)", check=at_least(1),
                        policy=BUILT)
    num_classes: int | None = _f(None, "fake dataset: number of classes (default 10)", check=at_least(1), policy=BUILT)
    loader: str = _f("auto", "input pipeline: 'memory' keeps the uint8 images on the device and augments "
                     "there, 'files' decodes in DataLoader workers; auto picks memory when the data fits",
                     ["auto", "memory", "files"], policy=CHANGES)
    workers: int = _f(4, "DataLoader worker processes per training process (files loader)", check=at_least(0),
                      policy=INCIDENTAL)
    cache_dir: str | None = _f(None, "kaggle: folder for the packed cache of decoded images (default: "
                               "DIR/.dtrain-cache beside the data)", policy=INCIDENTAL)
    # augmentation (batched, on the device, on uint8 images)
    augment: bool = _f(True, "apply the augmentations below to training images", policy=CHANGES)
    crop_padding: int = _f(4, "random crop after padding by this many pixels (0: off)", check=at_least(0),
                           policy=CHANGES)
    pad_mode: str = _f("constant", "padding for the random crop", ["constant", "reflect"], policy=CHANGES)
    hflip: bool | str = _f(True, "random horizontal flip; alternate: airbench's deterministic flip (a random "
                           "half of the images in the first epoch, the other half in the next, and so on)",
                           policy=CHANGES, also=("alternate",))
    vflip: bool = _f(False, "random vertical flip", policy=CHANGES)
    cutout_holes: int = _f(0, "Cutout: number of square holes (0: off)", check=at_least(0), policy=CHANGES)
    cutout_length: int = _f(16, "Cutout: hole side in pixels", check=at_least(0), policy=CHANGES)
    translate: float = _f(0.0, "random translation, fraction of the image size (0: off)", check=in_range(0, 1),
                          policy=CHANGES)
    rotate: float = _f(0.0, "random rotation up to this many degrees (0: off)", check=in_range(0, 180), policy=CHANGES)
    augment_policy: str = _f("none", "per-image policy, each image drawing its own operation(s) and magnitude, "
                             "before the crop and flip: AutoAugment's CIFAR-10 policy, RandAugment, or "
                             "TrivialAugment (TrivialAugmentWide's ranges)",
                             ["none", "autoaugment", "randaugment", "trivialaugment"], policy=CHANGES)
    randaugment_ops: int = _f(2, "randaugment: operations per image (N)", check=at_least(1), policy=CHANGES)
    randaugment_magnitude: int = _f(9, "randaugment: magnitude M of 31 bins (0-30)", check=in_range(0, 30),
                                    policy=CHANGES)
    random_erasing: float = _f(0.0, "random erasing: the chance each image gets a rectangle of 2-40%% of its area "
                               "and aspect 0.3-3.3 set to the mean, after Cutout (0: off)", check=in_range(0, 1),
                               policy=CHANGES)
    mixup: float = _f(0.0, "MixUp alpha: mix each image with a partner by a Beta(alpha, alpha) weight (0: off)",
                      check=in_range(0, 1000), policy=CHANGES)
    cutmix: float = _f(0.0, "CutMix alpha: paste a box from a partner, its area by Beta(alpha, alpha) (0: off)",
                       check=in_range(0, 1000), policy=CHANGES)
    mix_prob: float = _f(1.0, "the chance a batch is mixed (with both --mixup and --cutmix, each mixed batch "
                         "picks one, even odds)", check=in_range(0, 1), policy=CHANGES)
    # optimisation
    epochs: int = _f(30, "training epochs", check=at_least(1), policy=CHANGES)
    max_steps: int | None = _f(None, "stop after this many optimiser steps (smoke tests)", check=at_least(1),
                               policy=CHANGES)
    batch_size: int = _f(128, "GLOBAL batch size, split evenly over the processes", short="-b", check=at_least(1),
                         policy=matching(STEP_COUNT))
    eval_batch_size: int = _f(1024, "GLOBAL evaluation batch size", check=at_least(1), policy=CHANGES)
    grad_accum: int = _f(1, "gradient accumulation steps per optimiser step", check=at_least(1),
                         policy=matching(STEP_COUNT))
    optimizer: str = _f("sgd", "optimiser; muon: Muon for the weights of two or more dimensions but the head, "
                        "--muon-aux for the rest", ["sgd", "adam", "adamw", "rmsprop", "muon"],
                        policy=matching(OPTIMISER_STATE))
    muon_lr: float = _f(0.02, "muon: the Muon group's learning rate (--lr is the other group's)", check=at_least(0),
                        policy=CHANGES)
    muon_momentum: float = _f(0.95, "muon: the Muon group's (Nesterov) momentum", check=in_range(0, 1, high_open=True),
                              policy=CHANGES)
    muon_weight_decay: float = _f(0.0, "muon: the Muon group's decoupled weight decay", check=at_least(0),
                                  policy=CHANGES)
    muon_aux: str = _f("sgd", "muon: the optimiser of the head, biases and normalisation weights (with --lr, "
                       "--momentum, --nesterov, --weight-decay)", ["sgd", "adamw"], policy=matching(OPTIMISER_STATE))
    lr: float = _f(0.1, "peak learning rate (the same at any number of processes)", check=at_least(0), policy=CHANGES)
    momentum: float = _f(0.9, "momentum (sgd, rmsprop)", check=in_range(0, 1, high_open=True), policy=CHANGES)
    nesterov: bool = _f(False, "Nesterov momentum (sgd)", policy=CHANGES)
    weight_decay: float = _f(5e-4, "weight decay", check=at_least(0), policy=CHANGES)
    decay_norm_bias: bool = _f(True, "apply weight decay to biases and normalisation weights too",
                               policy=matching("the optimiser's parameter groups depend on it"))
    bias_lr_scale: float = _f(1.0, "multiply the LR of 1-D parameters (biases, normalisation weights) by "
                              "this and divide their weight decay by it (airbench: 64)", check=positive,
                              policy=matching("the optimiser's parameter groups depend on it"))
    scheduler: str = _f("cosine", "learning-rate schedule",
                        ["cosine", "plateau", "multistep", "onecycle", "linear", "none"], policy=CHANGES)
    onecycle_start: float = _f(0.04, "onecycle: LR factor at the first step", check=at_least(0), policy=CHANGES)
    onecycle_peak: float = _f(0.25, "onecycle: fraction of training at which the LR peaks",
                              check=in_range(0, 1, True, True), policy=CHANGES)
    onecycle_end: float = _f(0.0, "onecycle: LR factor at the last step", check=at_least(0), policy=CHANGES)
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 over this many epochs", check=at_least(0), policy=CHANGES)
    milestones: list[int] = _f([150, 225], "multistep: epochs at which the LR is multiplied by --gamma",
                               check=each(at_least(0)), policy=CHANGES)
    gamma: float = _f(0.1, "multistep: LR factor at each milestone", check=positive, policy=CHANGES)
    plateau_monitor: str = _f("val_loss", "plateau: metric watched", ["val_loss", "val_acc"], policy=CHANGES)
    plateau_patience: int = _f(10, "plateau: epochs without improvement before the LR drops", check=at_least(0),
                               policy=CHANGES)
    plateau_factor: float = _f(0.5, "plateau: LR factor", check=in_range(0, 1, low_open=True), policy=CHANGES)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss", check=in_range(0, 1), policy=CHANGES)
    grad_clip: float | None = _f(None, "clip the gradient norm to this value", check=positive, policy=CHANGES)
    ema: float | None = _f(None, "keep an exponential moving average of the weights with this decay and "
                           "evaluate it", check=in_range(0, 1, True, True), policy=CHANGES)
    tta: bool = _f(False, "evaluate on the image and its mirror, averaging the logits", policy=CHANGES)
    tta_shift: int = _f(0, "with --tta: also average the mirrored pairs of the image shifted diagonally by "
                        "-N and +N pixels (reflect padding), weight 1/2 in all (airbench: 1)", check=at_least(0),
                        policy=CHANGES)
    lookahead: int = _f(0, "with --ema DECAY: every N optimiser steps the trained weights jump to the "
                        "average, whose decay is then DECAY**N ramped up as progress**3 (airbench: 5)",
                        check=at_least(0), policy=CHANGES)
    sam: float | None = _f(None, "SAM: take each step's gradient at the weights moved this far (rho) towards the "
                           "highest loss nearby; two passes per step", check=positive, policy=CHANGES)
    sam_adaptive: bool = _f(False, "with --sam: adaptive SAM (ASAM), the move scaled by |w| + 0.01 for weights "
                            "(not biases)", policy=CHANGES)
    swa_start: int | None = _f(None, "SWA: after this many epochs (where a cosine or linear schedule reaches "
                               "--swa-lr) hold the learning rate at --swa-lr and average the weights at the end of "
                               "each later epoch (BatchNorm recomputed); evaluate and save the average",
                               check=at_least(0), policy=CHANGES)
    swa_lr: float | None = _f(None, "SWA: the learning rate after --swa-start", check=positive, policy=CHANGES)
    # system
    seed: int = _f(0, "random seed (sampling order, augmentation, initialisation)", check=at_least(0), policy=SEED)
    precision: str | None = _f(None, "mixed precision (default: the accelerate config/launcher's)",
                               ["no", "fp16", "bf16"], policy=CHANGES)
    channels_last: bool = _f(False, "channels-last memory format", policy=CHANGES)
    compile: bool = _f(False, "torch.compile the model (static shapes; the first steps take longer)", policy=CHANGES)
    sync_bn: bool = _f(False, "convert BatchNorm to SyncBatchNorm (GPUs only). It synchronises the host with "
                       "the GPU once per BatchNorm layer per step (torch's SyncBatchNorm reads the batch sizes): "
                       "worth it only with a few images per GPU, e.g. under 32, where per-GPU statistics are noisy",
                       policy=CHANGES)
    cpu: bool = _f(False, "run on the CPU even where GPUs are (as accelerate launch --cpu)", policy=CHANGES)
    dist_timeout: float = _f(600.0, "seconds a process waits for the others in a collective; then a frozen or "
                             "lost peer stops the job with an error naming it (resume with --resume auto)",
                             check=positive, policy=INCIDENTAL)
    # output
    output_dir: str | None = _f(None, "output folder (default runs/<arch>-<time>, or runs/<job>-<id> under Slurm)",
                                policy=RUN_SETTING)
    resume: str | None = _f(None, "'auto': continue from last.pt in the output dir if there is one; or a path",
                            policy=RUN_SETTING)
    save_every: int = _f(1, "write last.pt every N epochs (always at the end, when val_acc improves, and on a "
                         "stop signal); fast recipes save less often, a checkpoint costs time", check=at_least(1),
                         policy=INCIDENTAL)
    log_every: int = _f(20, "console/W&B/TensorBoard step logging interval", check=at_least(1), policy=INCIDENTAL)
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)", check=at_least(1), policy=CHANGES)
    plots: bool = _f(True, "draw curves and the confusion matrix to <output-dir>/run.png", policy=INCIDENTAL)
    tensorboard: bool = _f(False, "write TensorBoard scalars to <output-dir>/tb", policy=INCIDENTAL)
    wandb: bool = _f(True, "log to Weights & Biases from the main process (offline when no API key)", policy=INCIDENTAL)
    wandb_project: str = _f("dtrain", "W&B project", policy=INCIDENTAL)
    wandb_entity: str | None = _f(None, "W&B entity (team or user)", policy=INCIDENTAL)
    wandb_name: str | None = _f(None, "W&B run name (default: the output folder's name)", policy=INCIDENTAL)
    wandb_mode: str | None = _f(None, "W&B mode (default: online with an API key, else offline)",
                                ["online", "offline", "disabled"], policy=INCIDENTAL)
    wandb_group: str | None = _f(None, "W&B group (default: one per sweep, see --sweep)", policy=INCIDENTAL)
    wandb_tags: list[str] = _f([], "W&B tags, e.g. --wandb-tags baseline,r18", policy=INCIDENTAL)
    wandb_notes: str | None = _f(None, "W&B notes: a longer description of the run", policy=INCIDENTAL)
    sweep: list[str] = _f([], "a grid of runs: KEY=V1,V2,... for any setting, repeatable; this run is "
                          "combination --sweep-index (default $SLURM_ARRAY_TASK_ID); --sweep-list shows them",
                          policy=SWEEP)
    sweep_index: int | None = _f(None, "which combination of the --sweep grid this run is (from 0)", policy=SWEEP)
    sweep_offset: int | None = _f(None, "a grid larger than one Slurm array, submitted in chunks: this array task is "
                                  "combination --sweep-offset + $SLURM_ARRAY_TASK_ID (--sweep-list prints the chunks)",
                                  check=at_least(0), policy=SWEEP)
    save_every_minutes: float | None = _f(None, "also write last.pt mid-epoch, at the first step after this "
                                          "many minutes since the last save (default: off), so a crash loses "
                                          "at most that much work", check=positive, policy=INCIDENTAL)

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


def is_list_setting(name: str) -> bool:
    return _base_type(FIELDS[name].type)[1]


def _parse_bool(name, value, also=()):
    if isinstance(value, bool):
        return value
    others = "".join(f" or {word}" for word in also)
    raise UserError(f"{name} must be true or false{others}, not {value!r}")


def _is_a(value, tp) -> bool:
    """Whether a recipe value fits a field type (an int fits a float field; a bool is not a number)."""
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, tp) or tp is float and isinstance(value, int)


def _coerce(name: str, value):
    """Check and convert a recipe value to the field's type."""
    tp, is_list = _base_type(FIELDS[name].type)
    if value is None:
        return None
    if is_list:
        if not isinstance(value, list) or not all(_is_a(v, tp) for v in value):
            raise UserError(f"{name} must be a list of {tp.__name__} values, not {value!r}")
        return [tp(v) for v in value]
    if tp is bool:
        also = FIELDS[name].metadata["also"]
        if isinstance(value, str) and value.strip().lower() in also:
            return value.strip().lower()
        return _parse_bool(name, value, also)
    if not _is_a(value, tp):
        raise UserError(f"{name} must be of type {tp.__name__}, not {value!r}")
    value = tp(value)
    choices = FIELDS[name].metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def flag_name(name: str, negative: bool = False) -> str:
    """The command-line flag of a setting: foo_bar -> --foo-bar (--no-foo-bar)."""
    return ("--no-" if negative else "--") + name.replace("_", "-")


def policy(name: str) -> Policy:
    return FIELDS[name].metadata["policy"]


def settings_where(test: Callable[[Policy], bool]) -> tuple[str, ...]:
    """The settings whose policy passes `test`, in the order of the flags."""
    return tuple(name for name in FIELDS if test(policy(name)))


# Keys of a run's config.json that belong to that run alone: re-running it (`--recipe RUN/config.json`)
# writes a new folder, starts fresh and is not part of the sweep the saved run came from.
RUN_ONLY_KEYS = settings_where(lambda p: p.run_only)
SWEEP_KEYS = settings_where(lambda p: p == SWEEP)      # the grid and the run's place in it: command line only


def load_recipe(name: str) -> dict:
    """A recipe's settings, from a shipped name, a .toml path or a run's config.json; unknown keys are errors."""
    is_file = name.endswith((".toml", ".json"))
    path = Path(name) if is_file else RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"recipe {name!r} not found: give one of {', '.join(list_recipes())}, "
                        f"or the path of a .toml file or of a run's config.json")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"recipe {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"recipe {path} is not a run's config.json (a JSON object of settings)")
        for key in RUN_ONLY_KEYS:
            data.pop(key, None)
    else:
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"recipe {path} is not valid TOML: {e}") from None
        data.pop("description", None)
        sweep_keys = [key for key in SWEEP_KEYS if key in data]
        if sweep_keys:
            raise UserError(f"recipe {path}: {' and '.join(sweep_keys)} belong on the command line (--sweep KEY=V1,V2)")
    unknown = sorted(set(data) - set(FIELDS) - {"recipe"})
    if unknown:
        raise UserError(f"recipe {path}: unknown settings {', '.join(unknown)}")
    try:
        return {k: _coerce(k, v) for k, v in data.items()}
    except UserError as e:
        raise UserError(f"recipe {path}: {e}") from None


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool_text(name: str, text: str, also=()) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    others = "".join(f", {w}" for w in also)
    raise UserError(f"{name} must be true or false (or 1/0, yes/no{others}), not {text!r}")


def _split_list(text: str) -> list[str]:
    """`3,5`, `[3, 5]` or `3 5` -> ['3', '5'] (the forms a list flag's single value comes in)."""
    return [v for v in text.strip().strip("[]").replace(",", " ").split() if v]


def parse_value(name: str, text: str):
    """A setting written as text (a --sweep value) -> the field's type, checked like a recipe value."""
    if name not in FIELDS:
        raise UserError(f"unknown setting {name!r} (see --help for the settings)")
    tp, is_list = _base_type(FIELDS[name].type)
    optional = FIELDS[name].default is None
    if optional and text.strip().lower() in ("none", "null"):
        return None
    items = _split_list(text) if is_list else [text]
    also = FIELDS[name].metadata["also"]
    try:
        values = [v.strip() if v.strip() in also else parse_bool_text(name, v) if tp is bool else tp(v)
                  for v in items]
    except ValueError:
        raise UserError(f"{name} must be of type {tp.__name__}, not {text!r}") from None
    return _coerce(name, values if is_list else values[0])


def _number_or_none(tp):
    """The flag type of a setting that is off unless set (--sam, --ema, --swa-start...): a number, or `none`
    to turn off what a recipe set."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else tp(text)
    parse.__name__ = tp.__name__     # argparse's "invalid float value"
    return parse


class _BoolFlag(argparse.Action):
    """--foo, --foo=VALUE (true/false, 1/0, yes/no, or one of the field's `also` values) and --no-foo."""

    def __init__(self, option_strings, dest, help=None, also=(), **kw):
        self.also = tuple(also)
        super().__init__(option_strings, dest, nargs="?", metavar="|".join(("true", "false", *self.also)), help=help,
                         **kw)

    def __call__(self, parser, namespace, value, option_string=None):
        negative = option_string.startswith(("--no-", "--no_"))
        if negative and value is not None:
            parser.error(f"{option_string} takes no value (use --{option_string[5:]}=false)")
        if value is not None and value.strip().lower() in self.also:
            setattr(namespace, self.dest, value.strip().lower())
            return
        try:
            flag = True if value is None else parse_bool_text(option_string, value, self.also)
        except UserError as e:
            parser.error(str(e))
        setattr(namespace, self.dest, flag != negative)


class _HelpFormatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action):
        if isinstance(action, _BoolFlag):
            return f"{action.option_strings[0]}[={action.metavar}], " + ", ".join(action.option_strings[1:])
        return super()._format_action_invocation(action)


class _ListFlag(argparse.Action):
    """--foo A B, --foo=A,B or --foo=[A, B]: the values of one occurrence, each converted."""

    def __init__(self, option_strings, dest, type=None, **kw):
        super().__init__(option_strings, dest, nargs="*", **kw)
        self.item_type = type

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v for text in values for v in _split_list(text)]
        try:
            setattr(namespace, self.dest, [self.item_type(v) for v in items])
        except ValueError:
            parser.error(f"{option_string}: invalid {self.item_type.__name__} value in {' '.join(values)!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("dtrain/main.py"),
        description="Train an image classifier on 1..N processes (run it with accelerate launch, torchrun, "
                    "or plain python). Flags override the recipe; see README.md.",
        argument_default=argparse.SUPPRESS, formatter_class=_HelpFormatter)
    p.add_argument("--list-archs", action="store_true", help="print the available architectures and exit")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    p.add_argument("--sweep-list", action="store_true",
                   help="print the combinations of the --sweep grid and the --array to submit, and exit")
    p.add_argument("--sweep_list", action="store_true", dest="sweep_list", help=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        tp, is_list = _base_type(f.type)
        kw = dict(dest=f.name)
        if tp is bool:
            kw.update(action=_BoolFlag, also=f.metadata["also"])
        elif f.name == "sweep":
            kw.update(action="append", metavar="KEY=V1,V2,...")
        elif is_list:
            kw.update(action=_ListFlag, type=tp)
        elif f.default is None and tp in (int, float):
            kw.update(type=_number_or_none(tp))
        else:
            kw.update(type=tp, choices=f.metadata.get("choices"))
        names = [flag_name(f.name)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        if tp is bool:
            names.append(flag_name(f.name, negative=True))
        p.add_argument(*names, help=f.metadata["help"], **kw)
        if "_" in f.name:  # the spelling of the field itself, as sweep agents write it; not in --help
            aliases = ["--" + f.name] + (["--no_" + f.name] if tp is bool else [])
            p.add_argument(*aliases, help=argparse.SUPPRESS, **kw)
    return p


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
    asked = [flag_name(k) for k in AUGMENTATIONS_OFF_BY_DEFAULT if overrides.get(k) not in (None, "none", 0)]
    if asked and not cfg.augment:  # --no-augment turns off a recipe's augmentations, but not the ones asked for
        verb = "acts" if len(asked) == 1 else "act"
        raise UserError(f"{' and '.join(asked)} {verb} only with --augment (the recipe or your flags turn it off): "
                        f"add --augment")
    return cfg


AUGMENTATIONS_OFF_BY_DEFAULT = ("augment_policy", "random_erasing", "cutout_holes", "translate", "rotate", "vflip",
                                "hflip", "crop_padding")
MUON_SETTINGS = ("muon_lr", "muon_momentum", "muon_weight_decay", "muon_aux")


def _at_defaults(cfg: "Config", names) -> bool:
    """Whether the settings `names` are all left at their defaults (those of a part that is off)."""
    return all(getattr(cfg, k) == FIELDS[k].default for k in names)


# Rules between settings: (holds, message or a function of the Config that gives it); each field's own rule
# is declared next to it.
CROSS_CHECKS = (
    (lambda c: not c.cutout_holes or c.cutout_length >= 1,
     "--cutout-length must be at least 1 when --cutout-holes is set"),
    (lambda c: not c.lookahead or c.ema is not None,
     "--lookahead N needs --ema DECAY (e.g. --ema 0.95 --lookahead 5)"),
    (lambda c: not c.tta_shift or c.tta, "--tta-shift N needs --tta"),
    (lambda c: c.cifar100_labels == "fine" or c.dataset == "cifar100",
     "--cifar100-labels coarse needs --dataset cifar100"),
    (lambda c: (c.swa_start is None) == (c.swa_lr is None), "--swa-start EPOCH and --swa-lr LR go together"),
    (lambda c: c.swa_start is None or c.ema is None,
     "--swa-start and --ema are two weight averages: choose one (turn the other off with none, e.g. --ema none)"),
    (lambda c: c.swa_start is None or c.swa_start < c.epochs,
     lambda c: f"--swa-start {c.swa_start} is not below --epochs {c.epochs}: no weights would be averaged; "
               f"start it earlier or train longer"),
    (lambda c: not c.sam_adaptive or c.sam, "--sam-adaptive needs --sam RHO (e.g. --sam 0.5 --sam-adaptive)"),
    (lambda c: not (c.nesterov and c.momentum == 0 and (c.muon_aux if c.optimizer == "muon" else c.optimizer) == "sgd"),
     "--nesterov needs --momentum above 0 (e.g. --momentum 0.9), or --no-nesterov"),
    (lambda c: c.mix_prob == 1.0 or c.mixup or c.cutmix, "--mix-prob P needs --mixup ALPHA or --cutmix ALPHA"),
    (lambda c: c.mix_prob > 0 or not (c.mixup or c.cutmix),
     "--mix-prob 0 mixes no batch: raise it, or leave out --mixup and --cutmix"),
    (lambda c: c.optimizer == "muon" or _at_defaults(c, MUON_SETTINGS),
     "--muon-lr, --muon-momentum, --muon-weight-decay and --muon-aux need --optimizer muon"),
    (lambda c: c.augment_policy == "randaugment" or _at_defaults(c, ("randaugment_ops", "randaugment_magnitude")),
     "--randaugment-ops and --randaugment-magnitude need --augment-policy randaugment"),
)


def validate(cfg: Config) -> None:
    """Check every setting against its field's rule (floats must be finite), then the cross-field rules."""
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not finite.test(v) for v in values):
            raise UserError(f"{flag_name(f.name)} must be {finite.text}, not {value!r}")
        if any(isinstance(v, float) and abs(v) > FLOAT32_MAX for v in values):  # training runs in float32 at most
            raise UserError(f"{flag_name(f.name)} must be within float32's range (3.4e38), not {value!r}")
        rule = f.metadata.get("check")
        if rule is not None and not rule.test(value):
            raise UserError(f"{flag_name(f.name)} must be {rule.text}, not {value!r}")
    for holds, message in CROSS_CHECKS:
        if not holds(cfg):
            raise UserError(message(cfg) if callable(message) else message)


def config_from_dict(d: dict) -> Config:
    """The Config saved with a run (config.json or a checkpoint); unknown keys from newer versions dropped."""
    return Config(**{k: v for k, v in d.items() if k in FIELDS})


def flags_markdown() -> str:
    """The table of flags in docs/training.md (`python -m dtrain.config` prints it; a test keeps them equal)."""
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(Config)}
    return argparse_markdown(build_parser(), defaults)


def resume_rules_markdown() -> str:
    """What a resumed run may change, from the fields' policies: the list in docs/training.md (`python -m
    dtrain.config resume-rules` prints it; a test keeps them equal)."""
    def flags(names):
        return ", ".join(f"`{flag_name(n)}`" for n in names)

    must = {}
    for name in settings_where(lambda p: p.resume == MUST_MATCH):
        must.setdefault(policy(name).why, []).append(name)
    mid = settings_where(lambda p: p.resume == SAME_MID_EPOCH)
    return "\n".join([
        "- must match the checkpoint's run: " + "; ".join(f"{flags(names)} ({why})" for why, names in must.items()),
        "- must match where the run stopped mid-epoch: " + "; ".join(f"{flags([n])} ({policy(n).why})" for n in mid),
        "- compared through what they make (the model's arguments; the data's class names, image size, channels "
        "and fingerprint): " + flags(settings_where(lambda p: p.resume == BY_RESULT)),
        "- may change (read afresh from the resumed run): " + flags(settings_where(lambda p: p.resume == MAY_CHANGE)),
    ])


if __name__ == "__main__":
    print(resume_rules_markdown() if sys.argv[1:] == ["resume-rules"] else flags_markdown())
