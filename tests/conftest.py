"""Suite-wide fixtures: one real one-node SLURM cluster, started once for every test that
uses it (tests/slurm_cluster.py), and skipped with the reason where the machine cannot run it."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def slurm_cluster():
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster().start()
    yield cluster
    cluster.remove()
