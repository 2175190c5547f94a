"""Shared fixtures: the real Redis servers named by EVICTD_TEST_REDIS_URL and
EVICTD_TEST_REDIS_CLUSTER_URLS. A missing variable or server is a failure,
never a skip: a green run must mean these tests ran."""

from __future__ import annotations

import os
import pathlib
import sys
import uuid
from typing import Any, Iterator

# The client of this checkout first, whatever the venv's editable install
# points at (one venv under EVICTD_TOOLS serves every checkout).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

import pytest
import redis
import redis.asyncio
from redis.cluster import ClusterNode, RedisCluster

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: these tests need a real Redis (see clients/python/test.sh)", pytrace=False)
    return value


def _cluster_nodes() -> list[ClusterNode]:
    nodes = []
    for url in _env("EVICTD_TEST_REDIS_CLUSTER_URLS").split(","):
        parsed = redis.connection.parse_url(url.strip())
        nodes.append(ClusterNode(parsed.get("host", "127.0.0.1"), int(parsed.get("port", 6379))))
    return nodes


@pytest.fixture
def unique() -> str:
    """A name unique to this test: channels, keys and tags never collide
    with another test or another session."""
    return f"pytest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url() -> str:
    return _env("EVICTD_TEST_REDIS_URL")


@pytest.fixture
def standalone(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    client = RedisCluster(startup_nodes=_cluster_nodes())
    client.ping()
    yield client
    client.close()


@pytest.fixture(params=["standalone", "cluster"])
def sync_client(request: Any) -> Any:
    """The reader helpers run against a single server and a Cluster."""
    return request.getfixturevalue(request.param)


async def _async_client(kind: str) -> Any:
    if kind == "standalone":
        return redis.asyncio.Redis.from_url(_env("EVICTD_TEST_REDIS_URL"))
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster

    return AsyncCluster(startup_nodes=[AsyncNode(n.host, n.port) for n in _cluster_nodes()])


@pytest.fixture
async def astandalone() -> Any:
    client = await _async_client("standalone")
    await client.ping()
    yield client
    await client.aclose()


@pytest.fixture(params=["standalone", "cluster"])
async def async_client(request: Any) -> Any:
    """The asyncio reader helpers run against a single server and a Cluster."""
    client = await _async_client(request.param)
    await client.ping()
    yield client
    await client.aclose()
