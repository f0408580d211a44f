"""pytest plugin: the ``slurm_cluster`` session fixture (loaded from tests/conftest.py).

Skips, with the reason, where the cluster cannot run (not root, no unshare, Slurm not installed:
``bash tests/cluster/install.sh``); on CI (``CI=true``) it fails instead, so the Slurm tests can
never be skipped silently there. Set DTRAIN_KEEP_CLUSTER=1 to keep its temp dir (config, daemon
logs) after the session.
"""
from __future__ import annotations

import os
import shutil

import pytest

from cluster.slurm_cluster import ClusterUnavailable, SlurmCluster, unavailable_reason


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    if on_ci():
        pytest.fail(f"CI=true but the Slurm test cluster cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node cluster (nodes n1, n2); ``.env`` is the environment for sbatch/srun."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as e:
        shutil.rmtree(cluster.root, ignore_errors=True)
        skip_or_fail(f"the Slurm test cluster did not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        if not os.environ.get("DTRAIN_KEEP_CLUSTER"):
            shutil.rmtree(cluster.root, ignore_errors=True)
