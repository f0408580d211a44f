"""Reporting: console, metrics file, W&B, TensorBoard, plots. Built on the main process only.

A reporter implements any of the HOOKS: start(cfg, info), begin_epoch(epoch, epochs, batches, done),
step(step, metrics), end_epoch(), epoch(row, evaluation), message(text), end(summary, evaluation), close().
`Reporters` forwards each call to those that have it; a name that is not a hook is an AttributeError.
"""
from __future__ import annotations

HOOKS = ("start", "begin_epoch", "step", "end_epoch", "epoch", "message", "end", "close")


class Reporters:
    def __init__(self, members=()):
        self.members = [m for m in members if m is not None]

    def __getattr__(self, name):
        if name not in HOOKS:
            raise AttributeError(f"{name!r} is not a reporter hook (hooks: {', '.join(HOOKS)})")

        def call(*args, **kwargs):
            for m in self.members:
                fn = getattr(m, name, None)
                if fn is not None:
                    fn(*args, **kwargs)
        return call
