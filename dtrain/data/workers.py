"""Before DataLoader worker processes start: a folder for their sockets that the system accepts.

A worker hands each batch back as shared memory, whose file descriptor travels over a Unix socket that
multiprocessing makes in its own temp folder, TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX. Linux refuses a
socket path over 107 bytes; the refusal happens in a background thread of the worker, which prints it and
drops the batch, and the training or prediction process then waits for that batch forever. A TMPDIR of
about 75 characters or more (a scheduler's per-job scratch folder, a test's temp folder) is enough.
Python 3.13 falls back to /tmp itself; here `short_socket_folder` does the same on older versions.
"""
from __future__ import annotations

import multiprocessing.util
import os
import tempfile

from dtrain.errors import UserError

SOCKET_PATH_MAX = 107                         # bytes of an AF_UNIX path on Linux (sun_path, less its NUL)
LISTENER = len("/listener-") + 8              # the name multiprocessing gives a socket in its folder
FALLBACK = "/tmp"


def fits(folder: str) -> bool:
    return len(os.fsencode(folder)) + LISTENER <= SOCKET_PATH_MAX


def short_socket_folder() -> str:
    """multiprocessing's temp folder for this process and the workers it starts: under TMPDIR where a socket
    path there fits, else under /tmp. A UserError where neither can be used."""
    candidate = os.path.join(tempfile.gettempdir(), "pymp-" + "x" * 8)
    if fits(candidate):
        return multiprocessing.util.get_temp_dir()
    saved = tempfile.tempdir
    tempfile.tempdir = FALLBACK                # get_temp_dir makes its folder once, under tempfile's
    try:
        folder = multiprocessing.util.get_temp_dir()
    finally:
        tempfile.tempdir = saved
    if not fits(folder):
        raise UserError(f"TMPDIR {tempfile.gettempdir()} is too long for the sockets that decode workers hand "
                        f"their images back through ({SOCKET_PATH_MAX} bytes at most with the socket's name): "
                        f"set TMPDIR to a shorter folder, or pass --workers 0")
    return folder
