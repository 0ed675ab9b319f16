"""The small interfaces the parts of a node see of each other.

The node (:mod:`.node`) wires the parts; each part is handed the
:class:`~.host.Host` and, where it needs another part, one of these protocols
rather than the other part's class, so a part can be tested or replaced alone:

- the services publish and look up provider records through a :class:`Directory`
  (the DHT implements it);
- the client gateway advertises, discovers and calls on a client's behalf
  through a :class:`ServiceApi` (the services implement it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..core.records import ProviderEntry


class StoreOutcome(Protocol):
    """How a publication went: how many replicas took it."""

    @property
    def count(self) -> int: ...


class LookupOutcome(Protocol):
    hops: int


class Directory(Protocol):
    """Where provider records live (the DHT)."""

    async def store(self, key: bytes, entry: ProviderEntry) -> StoreOutcome:
        """Publish ``entry`` under ``key`` on the replicas."""

    async def find(self, key: bytes, *, exhaustive: bool = False) -> tuple[list[ProviderEntry], LookupOutcome]:
        """The live entries under ``key`` (``exhaustive``: merged from every replica, not the first)."""

    async def remove(self, key: bytes, provider_id: bytes) -> int:
        """Withdraw one provider's entry; how many replicas removed it."""


class ServiceApi(Protocol):
    """What a node does with services (its :class:`~.services.Services`)."""

    ads: dict[str, Any]

    async def advertise(
        self, name: str, handler: Callable[[Any], Any], *, ttl: float, metadata: dict | None = None
    ) -> Any: ...

    async def unadvertise(self, name: str) -> int: ...

    async def discover(self, name: str, *, refresh: bool = False) -> list[ProviderEntry]: ...

    async def call(self, name: str, args: Any = None, **options: Any) -> Any: ...
