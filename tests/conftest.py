"""Suite-wide fixtures: one real one-node SLURM cluster, started once for every test that
uses it (tests/slurm_cluster.py), and skipped with the reason where the machine cannot run it."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests run first. `make test` spreads whole files over two workers
    (xdist --dist loadfile); started early, the longest files overlap each other and the many
    short ones, instead of one of them running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept


@pytest.fixture(scope="session")
def slurm_cluster():
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster().start()
    yield cluster
    cluster.remove()
