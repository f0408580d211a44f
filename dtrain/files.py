"""Every file dtrain writes goes through here: whole or not at all, and a failure is one line saying what to do.

* `atomic_write(path, write)`: write(file) on a temp file beside `path`, fsync, rename over `path`. A kill
  at any moment leaves the old file or the new one, never half of one; the file gets the mode an ordinary
  new file would (0666 less the umask).
* `write_bytes` / `write_text`: the same for data already in memory.
* `append_line(path, line)`: one line added to a log file (metrics.jsonl) in one write call: a kill
  leaves at most a torn last line, which its reader skips.
* `make_folder(folder)`: the folder and its parents.
* `remove_stale_temp_files(folder)`: the temp files that interrupted writes left behind
  (`temp_file_beside(path)` makes one).

A full disk, a read-only folder, a file in the way of a folder or a missing one is a UserError naming the
path and ending with `remedy`, what the caller's user can do (another --output-dir, --output, --cache-dir).
Standard library only: everything above may write files without importing torch.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from dtrain.errors import UserError

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's temp files
DEFAULT_REMEDY = "use another --output-dir"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE = 1 << 20


def atomic_write(path: str | os.PathLike, write: Callable, remedy: str = DEFAULT_REMEDY) -> None:
    """Call write(binary file) on a temp file beside `path`, fsync it, then rename it over `path` (see the
    module). Errors: a UserError ending with `remedy`; the old file is kept."""
    path = Path(path)
    make_folder(path.parent, remedy)
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as e:
        raise write_error(path, e, remedy) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, remedy) from None
        if isinstance(e, OSError):
            raise write_error(path, e, remedy) from None
        raise


def temp_file_beside(path: Path, mode: int = 0o666) -> tuple[int, str]:
    """A new temp file in `path`'s folder: its open fd and its name, one TEMP_NAME matches (so that
    remove_stale_temp_files clears one an interrupted writer left), with the mode a new file of `mode` gets
    (less the umask). An OSError is raised as it comes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode & ~_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def write_bytes(path: str | os.PathLike, data: bytes, remedy: str = DEFAULT_REMEDY) -> None:
    atomic_write(path, lambda f: f.write(data), remedy)


def write_text(path: str | os.PathLike, text: str, remedy: str = DEFAULT_REMEDY) -> None:
    write_bytes(path, text.encode(), remedy)


def append_line(path: str | os.PathLike, line: str, remedy: str = DEFAULT_REMEDY) -> None:
    """Add `line` (ending with a newline) to the end of `path`, in one write."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, e, remedy) from None
    try:
        data = line.encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
        raise write_error(path, e, remedy) from None
    finally:
        os.close(fd)


def make_folder(folder: str | os.PathLike, remedy: str = DEFAULT_REMEDY) -> Path:
    """Create `folder` (and its parents) and return it; a file in the way or a read-only place is a
    UserError ending with `remedy`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e, remedy) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {folder}: the folder is read-only (for this user); make it writable "
                        f"or {remedy}")
    return folder


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that interrupted atomic_write calls left in `folder`; returns their paths.
    Call it while no other process writes into `folder` (at the start of a run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in sorted(folder.iterdir()) if TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space (torch.save reports it as a RuntimeError, not ENOSPC)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    if isinstance(e, (OSError, RuntimeError)):
        try:
            st = os.statvfs(folder)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < _LOW_SPACE
    return False


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full_error(path: Path, remedy: str = DEFAULT_REMEDY) -> UserError:
    return UserError(f"disk full writing {path}: free space on {_mount_point(path.parent)} or {remedy}")


def write_error(path: Path, e: OSError, remedy: str = DEFAULT_REMEDY) -> UserError:
    """The one line for an OSError met writing `path`."""
    if e.errno in _DISK_FULL:
        return disk_full_error(path, remedy)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {e.strerror.lower()} (the folder is read-only for this user); "
                         f"make it writable or {remedy}")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        return UserError(f"cannot write {path}: {blocker} is a file, not a folder; move it or {remedy}")
    if e.errno == errno.ENOENT:
        return UserError(f"cannot write {path}: its folder {path.parent} is gone; {remedy}")
    return UserError(f"cannot write {path}: {e.strerror or e}; check the folder or {remedy}")
