"""The `dtrain` command: `dtrain <command> [options]`.

    dtrain train --arch resnet18
    python -m dtrain train --arch resnet18                       # the same
    accelerate launch -m dtrain train --arch resnet18            # 1..N processes, as accelerate is configured
    torchrun --nproc-per-node 2 -m dtrain train --arch resnet18
    dtrain predict --checkpoint runs/x/best.pt --data-dir cifar-10

A command is one entry of COMMANDS: name -> (module, one-line help). The module is imported only when its
command runs; its `main(argv)` gets the arguments after the command's name.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dtrain.main", "train a model (dtrain train --help for its options)"),
    "predict": ("dtrain.predict", "predict with a checkpoint: a CSV, accuracy on labelled data, or top-5 per image"),
    "summarize": ("dtrain.summarize", "one table over many runs: mean ± std over seeds per setting"),
    "export": ("dtrain.export", "write a checkpoint's weights as safetensors or ONNX for deployment"),
}


def command_name(file_name: str) -> str:
    """What a command's usage line calls it: `dtrain train` when started through this command, else its file."""
    return sys.argv[0] if sys.argv[0].startswith("dtrain ") else file_name


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(["usage: dtrain <command> [options]", "", "commands:", *lines, "",
                      "dtrain <command> --help shows a command's options."])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; valid: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"dtrain {name}"
    importlib.import_module(COMMANDS[name][0]).main(rest)
