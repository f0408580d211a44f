"""Errors a user can fix, and how the entry points report them.

Exit codes: 0 done (also after a stop signal, with last.pt saved); 2 a UserError (a bad setting, input or
folder; nothing trained, or the last checkpoint kept); 3 TrainingDiverged (the loss or the weights became
NaN or infinite; the last good checkpoint kept); 4 a lost or frozen peer process (distributed.EXIT_PEER_LOST).
"""
import sys

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """A problem the user can fix; main/predict print the message without a traceback."""


class TrainingDiverged(Exception):
    """The training loss or the weights became non-finite: the run stopped without saving them."""


def run_cli(run, argv=None) -> None:
    """Run an entry point: a UserError (or Ctrl-C) ends it with one line on stderr and exit status 2, a
    TrainingDiverged with one line and exit status 3."""
    try:
        run(argv)
    except UserError as e:
        message, status = str(e), EXIT_USER_ERROR
    except TrainingDiverged as e:
        message, status = str(e), EXIT_DIVERGED
    except KeyboardInterrupt:
        message, status = "interrupted", EXIT_USER_ERROR
    else:
        return
    # one write: a job's processes share stderr, and a newline written apart lets their lines run together
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)
