"""File permissions of what dtrain writes for the user."""
from __future__ import annotations

import os
from pathlib import Path


def share(path: Path) -> None:
    """The usual permissions of a new file (atomic_write's temp files are private to their owner)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
