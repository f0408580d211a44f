"""Stop requests: SIGUSR1 (Slurm's warning before a time limit or preemption), SIGTERM and Ctrl-C (SIGINT).

The handler only records the signal; the training loop calls `exchange()` at each optimiser-step
boundary, where the processes agree on the signal and on two more flags the loop raises: the loss
diverged on some process, and a timed save is due (the main process's clock); then it saves and exits,
stops with an error, or saves and goes on.

The agreement costs no rendezvous per step: on several processes each step posts its flags in an
all-reduce over a CPU (gloo) group without waiting for it, and the next step boundary collects that
result, which the peers posted one step earlier and which has almost always arrived. So every process
acts on the flags of step s at step s + 1, the same step on all of them: a signal's save lands at the same
position on every rank, and a resumed run continues exactly there. `settle()` collects the last one when
the loop ends (an epoch's end, --max-steps). A frozen peer shows when a collect waits past the collective
timeout. On one process the flags act at once.
Once an agreement has reported a stop, every further stop signal is ignored: the save and the exit are
not cut short. Before that, a second Ctrl-C aborts at once (writes are atomic: a checkpoint being written
is left as it was). Under a
torchrun/accelerate agent, which forwards the SIGINT it gets from the terminal to its workers, a worker
sees each Ctrl-C twice, so there the third SIGINT aborts.
"""
from __future__ import annotations

import os
import signal
from typing import NamedTuple

import torch
import torch.distributed as dist

from dtrain.distributed import cpu_group
from dtrain.signals import SIGNALS, StartupStopped, ignore_stop_signals


class Agreement(NamedTuple):
    """What every process learns at a step boundary."""
    signum: int        # the stop signal any process received (0: none)
    diverged: bool     # some process saw a non-finite loss
    save_due: bool     # a process (the main one) asks for a save now


class StopSignal:
    """`StopSignal().install()` at the start of a run: until `training()`, a stop signal ends the start-up at
    once (dtrain.signals.StartupStopped: nothing is trained yet, so nothing is lost); from then on it is
    recorded and the loop honours it at a step boundary."""

    def __init__(self):
        self.signum = 0
        self.interrupts = 0
        self.started = False      # training began: signals are recorded, not raised
        self.group = None
        self._pending = None      # (flags, work) of the all-reduce posted at the last step, not yet collected
        self._previous = {}
        # each Ctrl-C reaches a worker of an elastic agent twice: from the terminal and forwarded by the agent
        self._interrupts_to_abort = 3 if os.environ.get("TORCHELASTIC_RUN_ID") else 2

    def install(self) -> "StopSignal":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def training(self) -> "StopSignal":
        """Training begins: from now on signals are recorded. On several processes every process must call
        this together (it makes the gloo group the flags travel in, off the GPU stream)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = cpu_group()
        self.started = True
        return self

    def _handle(self, signum, frame) -> None:
        if not self.started:
            raise StartupStopped(signum)
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= self._interrupts_to_abort:
                raise KeyboardInterrupt
            if self.interrupts == 1 and os.environ.get("RANK", "0") == "0":
                os.write(2, b"\nCtrl-C: saving last.pt at the next step, then stopping (Ctrl-C again aborts "
                            b"without saving)\n")
        if not self.signum:
            self.signum = signum

    def exchange(self, diverged: bool = False, save_due: bool = False) -> Agreement:
        """Post this step's flags and return the agreement to act on now: on several processes the one
        posted at the previous step (nothing is posted after an agreement that stops the run), on one
        process these flags. Every process must call this at the same steps; once it returns a signal the
        caller saves and stops, and stop signals are ignored from then on."""
        values = [self.signum, int(diverged), int(save_due)]
        if self.group is None:
            return self._agreed(values)
        previous = self.settle()
        if not (previous.signum or previous.diverged):
            flags = torch.tensor(values, dtype=torch.int64)
            self._pending = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return previous

    def settle(self) -> Agreement:
        """The agreement still in flight (waiting for it), or a neutral one when there is none."""
        if self._pending is None:
            return Agreement(0, False, False)
        flags, work = self._pending
        self._pending = None
        work.wait()
        return self._agreed(flags.tolist())

    def _agreed(self, values: list[int]) -> Agreement:
        signum = values[0]
        if signum:
            self.signum = self.signum or signum
            ignore_stop_signals()
        return Agreement(signum, bool(values[1]), bool(values[2]))

    def uninstall(self) -> None:
        """Restore the previous handlers, unless a stop is under way (its signals stay ignored to the end)."""
        if not self.signum:
            for s, h in self._previous.items():
                signal.signal(s, h)
        self._previous.clear()
