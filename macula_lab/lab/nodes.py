"""The lab's handle on one node: the same small API whether the node runs here or elsewhere.

- :class:`LocalNode` wraps a :class:`~macula_lab.runtime.node.Node` running in this
  process (the kernel's loop).
- :class:`AttachedNode` wraps a :class:`~macula_lab.lab.client.Client` session to a
  node running in a container, a pod or on a host.  Services advertised
  through it run their handler here and are published by the remote node;
  calls run on the remote node (its cache, selection and failover); inspection
  goes over the INSPECT request with the lab's admin token.

Views, procedures and widgets use only this API, so they work on both.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.params import DEFAULT_CALL_TIMEOUT, DEFAULT_TTL
from ..errors import MaculaError
from ..runtime.handlers import make_handler
from .sync import AsyncFirst

if TYPE_CHECKING:
    from ..core.records import ProviderEntry
    from ..runtime.node import Node
    from ..runtime.services import CallResult
    from .client import Client


class NodeNotRunning(MaculaError):
    code = "node_not_running"


def resolve_handler(handler: str | Callable[[Any], Any], node_name: str) -> Callable[[Any], Any]:
    """A callable as given, or the built-in of that name (see :mod:`macula_lab.runtime.handlers`)."""
    return make_handler(handler, node_name) if isinstance(handler, str) else handler


class LabNode(AsyncFirst, ABC):
    """What every lab node offers (see the module docstring).

    Each async method has a sync twin for scripts: ``node.call_sync("svc", args)``.
    """

    kind = "?"
    #: the loop the node's coroutines run on (the lab's): where the sync twins run them
    _loop: asyncio.AbstractEventLoop | None = None
    #: True for a node running in this process (its :class:`~macula_lab.runtime.node.Node` is ``.node``)
    is_local = False
    name: str

    @property
    @abstractmethod
    def endpoint(self) -> str: ...

    @property
    @abstractmethod
    def running(self) -> bool: ...

    @abstractmethod
    async def advertise(
        self, service: str, handler: str | Callable[[Any], Any], *, ttl: float = DEFAULT_TTL, metadata=None
    ) -> int:
        """Advertise ``service`` from this node; ``handler`` is a callable or a built-in name.

        Returns the number of DHT replicas that stored the record.
        """

    @abstractmethod
    async def unadvertise(self, service: str) -> int: ...

    @abstractmethod
    async def discover(self, service: str, *, refresh: bool = False) -> list[ProviderEntry]: ...

    @abstractmethod
    async def call(
        self,
        service: str,
        args: Any = None,
        *,
        strategy: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        max_attempts: int | None = None,
    ) -> CallResult:
        """Call ``service`` from this node; the :class:`~macula_lab.runtime.services.CallResult` (value, provider, latency)."""

    @abstractmethod
    async def inspect(self, sections: Any = None, since: float = 0.0) -> dict[str, Any]: ...

    @abstractmethod
    def watch(self, service: str, *, since: int | None = None) -> Any:
        """Watch ``service``'s providers: ``async for event in lab.node("node-1").watch(name)``.

        The same events on both kinds of node (:class:`~macula_lab.core.watch.WatchEvent`):
        a ``reset`` with the whole set, then ``added``/``updated``/``removed``/``expired``
        with increasing ``index``; ``since=`` resumes after an index.
        """

    def _sync_loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def require_running(self) -> None:
        if not self.running:
            raise NodeNotRunning(f"node {self.name} is not running")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {state} {self.endpoint}>"


class LocalNode(LabNode):
    kind = "local"
    is_local = True

    def __init__(self, node: Node):
        self.node = node
        self.name = node.name

    @property
    def endpoint(self) -> str:
        return self.node.endpoint

    @property
    def running(self) -> bool:
        return self.node.running

    async def advertise(self, service, handler, *, ttl=DEFAULT_TTL, metadata=None) -> int:
        self.require_running()
        ad = await self.node.advertise(
            service, resolve_handler(handler, self.name), ttl=ttl, metadata=metadata
        )
        return ad.replicas

    async def unadvertise(self, service: str) -> int:
        self.require_running()
        return await self.node.unadvertise(service)

    async def discover(self, service: str, *, refresh: bool = False):
        self.require_running()
        return await self.node.discover(service, refresh=refresh)

    async def call(self, service, args=None, *, strategy=None, timeout=DEFAULT_CALL_TIMEOUT, max_attempts=None):
        self.require_running()
        return await self.node.call(
            service, args, strategy=strategy, timeout=timeout, max_attempts=max_attempts, details=True
        )

    async def inspect(self, sections: Any = None, since: float = 0.0) -> dict[str, Any]:
        self.require_running()
        return self.node.inspector.snapshot(sections, since)

    def watch(self, service: str, *, since: int | None = None):
        self.require_running()
        return self.node.watch(service, since=since)


class AttachedNode(LabNode):
    kind = "attached"

    def __init__(self, name: str, url: str, client: Client, token: str | None):
        self.name = name
        self.url = url
        self.client = client
        self.token = token
        self._closed = False

    @property
    def endpoint(self) -> str:
        return self.url

    @property
    def running(self) -> bool:
        return not self._closed and self.client.running

    async def advertise(self, service, handler, *, ttl=DEFAULT_TTL, metadata=None) -> int:
        self.require_running()
        return await self.client.advertise(
            service, resolve_handler(handler, self.name), ttl=ttl, metadata=metadata
        )

    async def unadvertise(self, service: str) -> int:
        self.require_running()
        return await self.client.unadvertise(service)

    async def discover(self, service: str, *, refresh: bool = False):
        self.require_running()
        return await self.client.discover(service, refresh=refresh)

    async def call(self, service, args=None, *, strategy=None, timeout=DEFAULT_CALL_TIMEOUT, max_attempts=None):
        self.require_running()
        return await self.client.call(
            service, args, strategy=strategy, timeout=timeout, max_attempts=max_attempts, details=True
        )

    async def inspect(self, sections: Any = None, since: float = 0.0) -> dict[str, Any]:
        self.require_running()
        return await self.client.inspect(self.token or "", sections, since)

    def watch(self, service: str, *, since: int | None = None):
        self.require_running()
        return self.client.watch(service, since=since)

    async def detach(self, timeout: float = 5.0) -> None:
        """Unadvertise what the lab advertised through this node, then close the session.

        The node would withdraw them anyway when the session ends, but in the
        background: unadvertising first means a caller right after sees them gone.
        """
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(timeout):
                for service in list(self.client.advertised):
                    await self.client.unadvertise(service)
        except (MaculaError, TimeoutError):
            pass  # the session end still withdraws them on the node
        finally:
            await self.client.close()
