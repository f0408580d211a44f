"""Errors a user can fix, and how every command ends.

Exit codes: 0 done (also after a stop signal, with last.pt saved); 2 a UserError (a bad setting, input or
folder; nothing trained, or the last checkpoint kept), also a second Ctrl-C; 3 TrainingDiverged (the loss
or the weights became NaN or infinite; the last good checkpoint kept); 4 a lost or frozen peer process.
"""
import contextlib
import os
import sys

from dtrain.signals import StartupStopped

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PEER_LOST = 4


class UserError(Exception):
    """A problem the user can fix; the command prints the message without a traceback."""


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is an allocation that failed: CUDA's torch.OutOfMemoryError, the CPU allocator's."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "Cannot allocate memory" in text
                                                or "out of memory" in text)


class TrainingDiverged(Exception):
    """The training loss or the weights became non-finite: the run stopped without saving them."""


def run_command(run, argv=None) -> None:
    """Run a command's `run(argv)` (train, predict, summarize, export) and end it the dtrain way: a UserError
    (or Ctrl-C) with one line on stderr and exit status 2, a TrainingDiverged with one line and 3, a
    collective that failed on a lost or frozen peer with one line naming it and 4. Whichever way it ends,
    the process groups it made are left first (dtrain.distributed, when the command used it); a process of
    a multi-process job then ends without the interpreter's teardown (leave_process_groups says why)."""
    several = False
    try:
        run(argv)
        message, status = None, None
    except UserError as e:
        message, status = str(e), EXIT_USER_ERROR
    except TrainingDiverged as e:
        message, status = str(e), EXIT_DIVERGED
    except KeyboardInterrupt:
        message, status = "interrupted", EXIT_USER_ERROR
    except StartupStopped as e:
        print(e, flush=True)  # the run's own line, like a stop during training: on stdout, exit 0
        message, status = None, 0
    except BrokenPipeError:  # a listing piped into a reader that stopped early (| head): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        message, status = None, 0
    except RuntimeError as e:
        message, status = _lost_peer(e), EXIT_PEER_LOST
        if message is None:
            raise
    finally:
        distributed = sys.modules.get("dtrain.distributed")  # loaded only by commands that run processes
        if distributed is not None:
            several = distributed.leave_process_groups()
    if message is not None:
        # one write: a job's processes share stderr, and a newline written apart lets their lines run together
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    if several:
        end_process(status or 0)
    if status is not None:
        sys.exit(status)


def end_process(status: int) -> None:
    """End the process now with `status`, after the exit hooks (atexit: run locks, W&B, logging) and with
    stdout and stderr flushed, but without the interpreter's teardown."""
    import atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _lost_peer(error: RuntimeError) -> str | None:
    distributed = sys.modules.get("dtrain.distributed")
    return None if distributed is None else distributed.lost_peer_line(error)
