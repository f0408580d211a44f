"""A markdown table of a command's flags, generated from its argparse parser, so a page listing them
cannot drift from the code (a test compares the page with this function's output).

    python -m dtrain.helptable dtrain.predict:build_parser      # print the table of that parser
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action, defaults: dict | None) -> str:
    if action.required:
        return "(required)"
    default = defaults.get(action.dest) if defaults is not None else action.default
    if default is None or default is argparse.SUPPRESS:
        return ""
    return f"`{default}`"


def argparse_markdown(parser: argparse.ArgumentParser, defaults: dict | None = None) -> str:
    """One row per argument (help and sub-command entries left out): flag, default, what it does.
    `defaults` (dest -> value) replaces the parser's own, for a parser whose defaults are SUPPRESS."""
    rows = ["| flag | default | what |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = " / ".join(action.option_strings) if action.option_strings else (action.metavar or action.dest).upper()
        what = (action.help or "") % {**vars(action), "prog": parser.prog} if action.help else ""
        if action.choices and not isinstance(action, argparse.BooleanOptionalAction):
            what += " (" + " | ".join(str(c) for c in action.choices) + ")"
        rows.append(f"| `{name}` | {_default(action, defaults)} | {_cell(what)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or ":" not in argv[0]:
        sys.exit("usage: python -m dtrain.helptable MODULE:FUNCTION   (a function that returns an ArgumentParser)")
    module, function = argv[0].split(":")
    print(argparse_markdown(getattr(importlib.import_module(module), function)()))


if __name__ == "__main__":
    main()
