import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARED_DATA, write_cifar  # noqa: E402

pytest_plugins = ["cluster.fixtures"]  # the slurm_cluster fixture (tests/cluster/)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (CI does; without it the suite stays within ~8 minutes)")


def _slow_test_runs(config, item) -> bool:
    """A slow test runs under --slow, under a -m expression that names `slow` (`-m slow` runs just them), or
    when the command line names it (tests/test_foo.py::test_bar)."""
    if config.getoption("slow") or "slow" in (config.option.markexpr or ""):
        return True
    for arg in config.args:
        path, named, name = arg.partition("::")
        if named and Path(config.invocation_params.dir, path).resolve() == item.path \
                and item.nodeid.partition("::")[2].startswith(name):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Slow tests are left out unless asked for (above). The longest files run first: with the files shared
    out among workers in this order, the long ones start early and the short ones fill in, instead of one
    long file running alone at the end. Longest: those with slow tests, then the Slurm ones, then by their
    count of real-process tests."""
    runs = [not item.get_closest_marker("slow") or _slow_test_runs(config, item) for item in items]
    if not all(runs):
        config.hook.pytest_deselected(items=[item for item, run in zip(items, runs) if not run])
        items[:] = [item for item, run in zip(items, runs) if run]
    cost = {}
    for item in items:
        marks = [mark for mark in ("slow", "slurm", "process") if item.get_closest_marker(mark)]
        slow, slurm, process = cost.get(item.path, (0, 0, 0))
        cost[item.path] = (slow or "slow" in marks, slurm or "slurm" in marks, process + bool(marks))
    items.sort(key=lambda item: cost[item.path], reverse=True)  # stable: each file's tests keep their order


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


# ---- the tiers ------------------------------------------------------------------------------------------
# The fast tier runs dtrain's commands in this process (tests/helpers.py: train_here, run_here). A test that
# starts a Python interpreter or a shell (dtrain's own commands, accelerate or torchrun, a launcher or bench
# script, a helper script) belongs to the real-process tier and says so with @pytest.mark.process (a Slurm
# test with @pytest.mark.slurm): `-m "not process and not slurm"` is the fast tier. The check
# below keeps the marks true.

_started: list[str] = []
_execute_child = subprocess.Popen._execute_child


def _starts_an_interpreter(args) -> bool:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    first = os.path.basename(str(argv[0]).split()[0]) if argv else ""
    if any("compile_worker" in str(a) for a in argv):  # inductor's compile workers, started by torch.compile
        return False
    return str(argv[0]) == sys.executable or first.startswith("python") or \
        first in ("bash", "sh", "sbatch", "srun", "torchrun", "accelerate", "stdbuf", "timeout")


def _recording_execute_child(self, args, *rest, **kwargs):
    if _starts_an_interpreter(args):
        _started.append(" ".join(map(str, [args] if isinstance(args, (str, bytes)) else args))[:300])
    return _execute_child(self, args, *rest, **kwargs)


subprocess.Popen._execute_child = _recording_execute_child


@pytest.fixture(autouse=True)
def _real_processes_are_marked(request):
    """A test (with its function-scoped fixtures) that starts an interpreter or a shell must be marked
    `process` or `slurm`: the fast tier (-m "not process and not slurm") runs in this process."""
    _started.clear()
    yield
    marked = request.node.get_closest_marker("process") or request.node.get_closest_marker("slurm")
    if _started and not marked:
        pytest.fail(f"{request.node.nodeid} starts processes of its own ({_started[0]}): mark it "
                    f"@pytest.mark.process, or run the command in this process (tests/helpers.py: run_here)",
                    pytrace=False)
