import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARED_DATA, write_cifar  # noqa: E402

pytest_plugins = ["cluster.fixtures"]  # the slurm_cluster fixture (tests/cluster/)


def pytest_collection_modifyitems(items):
    """Files that hold slow tests first: with the files shared out among workers in this order, the long
    ones start early and the short ones fill in, instead of one long file running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file's tests keep their order


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """A small generated CIFAR-10 folder in the real pickled-batch layout (200 train, 50 test)."""
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real images in ../shared/data; tests that need them skip where it is absent."""
    if not (SHARED_DATA / "cifar10_jpeg.npz").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def small_fs(tmp_path):
    """A 8 MiB tmpfs of its own (root only), unmounted afterwards: a real disk that can be filled."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
