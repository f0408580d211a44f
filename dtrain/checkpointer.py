"""When and how a run writes its checkpoints: last.pt at every save, best.pt a copy of it, timed saves.

The main process writes last.pt, then, when its evaluation is the best so far, copies it to best.pt (each
write atomic). A checkpoint's step names its position uniquely (two saves at one step hold the same
weights). A kill -9 at any point leaves one of: both old; last.pt new and best.pt old; both new. The middle
case is the one to repair, and last.pt says so: its best_step is its own step while best.pt's step differs
(or best.pt is missing). `resumed` checks this at every resume and writes the resumed state to best.pt; a
kill during that repair leaves the same case for the next resume. So best.pt always holds the state whose
accuracy the run records as best_acc. The other order (best.pt first) is not repairable: a kill between the
writes leaves best.pt ahead of last.pt, holding weights whose accuracy the resumed run does not know, which
a later, worse best would overwrite. Neither file is ever written with non-finite weights.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dtrain.checkpoint import all_finite, read_step, save_checkpoint, verify
from dtrain.distributed import note_saved, run_on_main
from dtrain.files import atomic_write


@dataclass(frozen=True)
class Saved:
    """A checkpoint of this run and the position it holds."""
    path: Path
    epoch: int              # completed epochs
    step: int
    batch_in_epoch: int     # batches done in the epoch under way (0: at an epoch's end)

    def where(self, batches_per_epoch: int) -> str:
        if not self.batch_in_epoch:
            return f"end of epoch {self.epoch}, step {self.step}"
        return f"epoch {self.epoch + 1}, batch {self.batch_in_epoch}/{batches_per_epoch}, step {self.step}"


class Checkpointer:
    """The save policy of one run in `out`: `meta` (checkpoint.model_meta) goes into every checkpoint;
    `every_minutes` asks for a timed save mid-epoch (the main process's clock, `due`)."""

    def __init__(self, out: Path, accelerator, meta: dict, every_minutes: float | None = None):
        self.out, self.acc, self.meta = Path(out), accelerator, meta
        self.interval = every_minutes * 60 if every_minutes else None
        self.last_save = time.monotonic()
        self.last_good: Saved | None = None   # the last checkpoint written or resumed

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def best(self) -> Path:
        return self.out / "best.pt"

    def restart_clock(self) -> None:
        self.last_save = time.monotonic()

    def due(self) -> bool:
        """Main process: whether a timed save is due (never elsewhere: its flag reaches every process)."""
        return (self.interval is not None and self.acc.is_main_process
                and time.monotonic() - self.last_save >= self.interval)

    def save(self, state: Callable[[], dict], position: tuple[int, int, int], best: bool = False) -> bool:
        """Every process together: the main process writes state() (the Trainer's state_dict) to last.pt,
        then copies it to best.pt when `best`. False, with nothing written, when the weights are not finite;
        a write error (a UserError) is raised on every process."""
        if not run_on_main(self.acc, lambda: self._write(state(), best)):
            return False
        self.last_good = Saved(self.last, *position)
        self.last_save = time.monotonic()
        note_saved(f"{self.last} holds the last save (step {position[1]}); resume with --resume auto")
        return True

    def _write(self, state: dict, best: bool) -> bool:
        """Main process: write and read back (the CRCs of every record: the last good checkpoint is only ever
        a verified file)."""
        if not all_finite(state["model"], state.get("train_model"), state["optimizer"]):
            return False
        save_checkpoint(self.last, {**self.meta, **state})
        verify(self.last)
        if best:
            with open(self.last, "rb") as source:
                atomic_write(self.best, lambda f: shutil.copyfileobj(source, f))
            verify(self.best)
        return True

    def resumed(self, path: Path, ckpt: dict) -> bool:
        """A run resumed from `ckpt` (read from `path`): it is the last good checkpoint, and best.pt is
        repaired when it is older than the best state the checkpoint records. Every process together;
        returns whether best.pt was rewritten."""
        self.last_good = Saved(Path(path), ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"])
        note_saved(f"{path} holds the last save (step {ckpt['step']}); resume with --resume auto")
        return run_on_main(self.acc, lambda: self._repair_best(ckpt))

    def _repair_best(self, ckpt: dict) -> bool:
        """Main process: when ckpt is the run's best state (best_step == step) and best.pt holds another
        step (or is missing or unreadable), write ckpt there."""
        if ckpt.get("best_step") is None or ckpt["best_step"] != ckpt["step"]:
            return False
        if read_step(self.best) == ckpt["step"]:
            return False
        save_checkpoint(self.best, ckpt)
        return True
