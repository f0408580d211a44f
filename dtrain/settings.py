"""A run's Config from its command line: defaults < recipe (named, or the arch's default) < flags, with the
--sweep combination filled in; or the listing the command line asked for instead of a run.

    python -m dtrain.settings ARGS...      # check a training command line: nothing, or one error line (exit 2)

slurm/_launch.sh runs the check once per job before it starts any process, so a mistake (a bad flag, an
array task past the end of the --sweep grid) ends the job with its one line instead of being retried by
torchrun's restarts.
"""
from __future__ import annotations

import argparse
import sys

from dtrain.config import Config, build_parser, list_recipes, resolve
from dtrain.errors import run_command
from dtrain.sweep import apply_sweep, listing

LISTINGS = ("list_archs", "list_recipes", "sweep_list")


def build_config(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """The Config of a training command line (the listing flags are ignored)."""
    args = vars((parser or build_parser()).parse_args(argv))
    for flag in LISTINGS:
        args.pop(flag, None)
    return resolve(apply_sweep(args))


def from_command_line(argv: list[str] | None = None) -> Config | None:
    """The run's Config, or None when the arguments only asked for a listing (printed here)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "list_archs", False):
        from dtrain.models import list_archs  # torch: only for this listing, not for every check
        print("\n".join(list_archs()))
        return None
    if getattr(ns, "list_recipes", False):
        print("\n".join(list_recipes()))
        return None
    if getattr(ns, "sweep_list", False):
        print(listing(getattr(ns, "sweep", [])))
        return None
    return build_config(argv, parser)


if __name__ == "__main__":
    run_command(build_config, sys.argv[1:])
