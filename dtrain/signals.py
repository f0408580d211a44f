"""The stop signals dtrain answers, and what they do before training has begun.

During training a stop signal is recorded and honoured at the next optimiser step (dtrain.preempt). Before
that (the output folder claimed, the data downloaded or decoded, the model built and compiled) there is
nothing to save: a stop signal ends the start-up at once, by raising StartupStopped wherever the main thread
is (dtrain.preempt.StopSignal), so that the run's lock is released on the way out and the command ends with
one line and exit 0 (dtrain.errors.run_command).
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StartupStopped(BaseException):
    """A stop signal before training began. A BaseException, like KeyboardInterrupt: code that handles
    errors (`except Exception`) lets it through."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum} during start-up, before the first step: nothing was trained "
                         f"or saved; run the same command again to start")


def ignore_stop_signals(*_) -> None:
    """For helper processes (DataLoader workers): leave stop signals sent to the whole process group to the
    training process, which shuts its helpers down itself."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
