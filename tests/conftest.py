"""Shared fixtures: real node processes on loopback, cleaned up whatever happens."""

from __future__ import annotations

import pytest

from support import Cluster, NodeProcess

pytest_plugins = ["conftest_core"]


@pytest.fixture
def node_factory(tmp_path):
    """Start single nodes with extra flags; every one is killed at teardown."""
    started: list[NodeProcess] = []

    def start(*args: str, seeds: tuple[str, ...] = (), metrics: bool = False,
              wait: bool = True) -> NodeProcess:
        node = NodeProcess(f"n{len(started)}", tmp_path, seeds=seeds, args=args,
                           metrics=metrics)
        started.append(node)
        if wait:
            node.wait_serving()
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    """Three converged nodes shared by a test module."""
    c = Cluster(3, tmp_path_factory.mktemp("cluster3"), metrics=True)
    yield c
    c.close()
