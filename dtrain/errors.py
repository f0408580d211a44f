"""Errors a user can fix, and how the entry points report them."""
import sys


class UserError(Exception):
    """A problem the user can fix; main/predict print the message without a traceback."""


def run_cli(run, argv=None) -> None:
    """Run an entry point: a UserError (or Ctrl-C) ends it with one line on stderr and exit status 2."""
    try:
        run(argv)
    except UserError as e:
        message = str(e)
    except KeyboardInterrupt:
        message = "interrupted"
    else:
        return
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
