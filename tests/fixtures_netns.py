"""Pytest fixtures for multi-host runs in network namespaces (see :mod:`macula_lab.deploy.netns`).

Registered in ``tests/conftest.py`` (``pytest_plugins``).  Without root or
iproute2 every test using them is skipped with the reason (fails under
``MACULA_STRICT=1``, as in CI).

    async def test_x(netns_mesh):                 # 3 nodes from docker/compose.yaml
        client = await macula_lab.connect(netns_mesh.endpoint("node-2"), realm=netns_mesh.realm,
                                          certs=netns_mesh.certs)

    @pytest.mark.parametrize("netns_mesh", ["k3s"], indirect=True)
    async def test_y(netns_mesh): ...             # macula-0..2 from the StatefulSet

    async def test_z(netns_mesh_factory):
        mesh = await netns_mesh_factory(n=5, source="k3s")   # closed at teardown

    @pytest.fixture                               # in a module: its meshes' env overrides
    def netns_overrides(): return {"MACULA_SERVICE_TTL": "3"}
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from macula_lab.deploy.netns import NetnsMesh, unavailable_reason

from .strict import skip_or_fail


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Skip (with the reason) where network namespaces cannot be made; fail under MACULA_STRICT=1."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(f"network namespaces unavailable: {reason}")


@pytest.fixture
async def netns_mesh_factory(netns_available) -> AsyncIterator[Callable[..., Awaitable[NetnsMesh]]]:
    """Start meshes with any :class:`NetnsMesh` options; every one is removed at teardown."""
    meshes: list[NetnsMesh] = []

    async def make(n: int | None = None, **options) -> NetnsMesh:
        mesh = NetnsMesh(n, **options)
        meshes.append(mesh)
        return await mesh.start()

    yield make
    failures = []
    for mesh in meshes:
        try:
            await mesh.close()
        except Exception as exc:  # close them all, then report
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def netns_overrides() -> dict[str, str]:
    """Variables replaced in ``netns_mesh``'s nodes (none); override in a module to scale TTLs."""
    return {}


@pytest.fixture
async def netns_mesh(netns_mesh_factory, netns_overrides, request) -> NetnsMesh:
    """Three nodes from docker/compose.yaml (``indirect`` parameter ``"k3s"``: the StatefulSet)."""
    return await netns_mesh_factory(source=getattr(request, "param", "compose"), overrides=netns_overrides)
