"""The stop signals dtrain answers (dtrain.preempt), and how helper processes leave them to it."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(*_) -> None:
    """For helper processes (DataLoader workers): leave stop signals sent to the whole process group to the
    training process, which shuts its helpers down itself."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
