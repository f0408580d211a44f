"""Reporting: console, metrics file, W&B, TensorBoard, plots. Built on the main process only.

A reporter implements any of: start(cfg, info), step(step, metrics), epoch(row, evaluation), end(summary),
close(). `Reporters` forwards each call to those that have it.
"""
from __future__ import annotations


class Reporters:
    def __init__(self, members=()):
        self.members = [m for m in members if m is not None]

    def __getattr__(self, name):
        def call(*args, **kwargs):
            for m in self.members:
                fn = getattr(m, name, None)
                if fn is not None:
                    fn(*args, **kwargs)
        return call
