"""Continuing a run from a checkpoint: which one, and whether this run's settings and data may continue it.

What each setting may do on resume is declared on its Config field (dtrain.config.Policy.resume):
MAY_CHANGE settings are read afresh from this run; MUST_MATCH ones need the checkpoint's value (the
optimiser's state and the step count depend on them); SAME_MID_EPOCH ones need it when the run stopped
mid-epoch (its place is in the sample order the seed shuffles); BY_RESULT ones are compared through what
they make (the model's arguments, the data's fingerprint), so another value that makes the same is fine.
Every difference is named, all in one line, before any training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtrain.checkpoint import TRAINING_KEYS, load_checkpoint
from dtrain.config import MUST_MATCH, SAME_MID_EPOCH, flag_name, policy, settings_where
from dtrain.errors import UserError


@dataclass
class Resume:
    """The checkpoint a run continues from."""
    path: Path
    checkpoint: dict

    @classmethod
    def find(cls, cfg, out: Path) -> "Resume | None":
        """--resume PATH, or with --resume auto the output folder's last.pt when there is one; None for a
        fresh start. A file that is no training checkpoint, or settings that must match the checkpoint's run
        and do not, are a UserError (`check_data` checks the data once it is loaded)."""
        if cfg.resume is None:
            return None
        path = Path(out) / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not path.exists():
            return None
        ckpt = load_checkpoint(path)
        missing = [k for k in TRAINING_KEYS if k not in ckpt]
        if missing:
            raise UserError(f"{path} holds weights but no training position ({', '.join(missing)} missing), so a "
                            f"run cannot continue from it; give a last.pt or best.pt written by dtrain/main.py")
        if ckpt["arch"] != cfg.arch:
            raise UserError(f"{path} holds a {ckpt['arch']!r} model but this run trains {cfg.arch!r}: pass the same "
                            f"--arch (or --recipe), or another --output-dir for a fresh run")
        resume = cls(path, ckpt)
        resume._refuse(setting_differences(ckpt, cfg))
        return resume

    @property
    def epoch(self) -> int:
        """The epochs the checkpoint's run completed."""
        return self.checkpoint["epoch"]

    @property
    def normalisation(self) -> tuple[tuple, tuple]:
        """(mean, std) the run started with: they stay, whatever the data now says."""
        return tuple(self.checkpoint["mean"]), tuple(self.checkpoint["std"])

    def check_data(self, meta: dict) -> None:
        """A UserError naming how this run's data (its checkpoint.model_meta) differs from the checkpoint's
        run's: classes, image size and channels, the data's fingerprint."""
        self._refuse(data_differences(self.checkpoint, meta))

    def describe(self) -> str:
        return f"resumed from {self.path} at epoch {self.epoch + 1}, step {self.checkpoint['step']}"

    def _refuse(self, diffs: list[str]) -> None:
        if diffs:
            raise UserError(f"cannot resume from {self.path}: {'; '.join(diffs)}. Resume with the settings it was "
                            f"trained with (they are in its config.json), or start a fresh run in another "
                            f"--output-dir")


def _short(values, n: int = 6) -> str:
    values = list(values)
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")


def setting_differences(ckpt: dict, cfg) -> list[str]:
    """The settings of this run that differ from the checkpoint's where resuming needs them unchanged."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = ckpt.get("data") if isinstance(ckpt.get("data"), dict) else {}
    diffs = []

    def compare(key, before, why=""):
        if before is not None and before != getattr(cfg, key):
            diffs.append(f"{flag_name(key)} is {getattr(cfg, key)!r} here but {before!r} in the checkpoint{why}")

    for key, before in (ckpt["arch_args"] if isinstance(ckpt["arch_args"], dict) else {}).items():
        if hasattr(cfg, key):
            compare(key, before)
    compare("dataset", data.get("dataset", saved.get("dataset")))
    for key in settings_where(lambda p: p.resume == MUST_MATCH):
        compare(key, saved.get(key), f" ({policy(key).why})")
    if ckpt["batch_in_epoch"]:
        where = f"epoch {ckpt['epoch'] + 1}, batch {ckpt['batch_in_epoch']}"
        for key in settings_where(lambda p: p.resume == SAME_MID_EPOCH):
            compare(key, saved.get(key), f", which stopped mid-epoch ({where}), a place that needs the same "
                                         f"{flag_name(key)}")
    return diffs


def data_differences(ckpt: dict, meta: dict) -> list[str]:
    """How this run's data differs from the checkpoint's run's."""
    before, now = (m.get("data") if isinstance(m.get("data"), dict) else {} for m in (ckpt, meta))
    classes_before, classes_now = list(ckpt["classes"]), list(meta["classes"])
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    labels_before, labels_now = saved.get("cifar100_labels"), meta.get("config", {}).get("cifar100_labels")
    diffs = []
    if saved.get("dataset") == "cifar100" and labels_before not in (None, labels_now):
        diffs.append(f"--cifar100-labels is {labels_now!r} here but {labels_before!r} in the checkpoint "
                     f"({len(classes_now)} classes here, {len(classes_before)} there)")
    elif len(classes_before) != len(classes_now):
        diffs.append(f"the data has {len(classes_now)} classes here but {len(classes_before)} in the checkpoint "
                     f"(--num-classes, or other data)")
    elif classes_before != classes_now:
        diffs.append(f"the class names differ: {_short(classes_now)} here, {_short(classes_before)} in the "
                     f"checkpoint (other data)")
    elif "train_size" in before and before["train_size"] != now.get("train_size"):
        diffs.append(f"the training data has {now.get('train_size')} images here but {before['train_size']} in the "
                     f"checkpoint's run (other data, --val-split or --fake-size)")
    elif "labels" in before and before["labels"] != now.get("labels"):
        diffs.append("the training data has as many images as in the checkpoint's run but other labels or another "
                     "order (other data, or another --seed where it draws the data or the --val-split)")
    for key, what in (("image_size", "--image-size"), ("in_channels", "the images' channels")):
        if int(ckpt[key]) != int(meta[key]):
            diffs.append(f"{what} is {meta[key]} here but {ckpt[key]} in the checkpoint")
    return diffs
