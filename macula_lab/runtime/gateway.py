"""Node side of attached clients: advertise, discover and call on a client's behalf.

A client process (a notebook attached to a k3s pod, a script) opens a session to
a node with :func:`macula_lab.connect` and uses the same API as a node.  The
node does the mesh work:

- ADVERTISE: the node advertises the service *as itself* (the provider entry
  names this node's id and endpoint) with a relay handler that forwards each
  call to the client over the client's own session, so the handler runs in the
  client's process.  The client needs no reachable endpoint of its own.
- UNADVERTISE, DISCOVER: the node's own unadvertise / discover.
- SERVICE_CALL: the node's own call (discovery, selection, failover).
- SERVICE_WATCH: the node's own watch of the service; its events are relayed
  to the client over the client's session (SERVICE_EVENT), one batch at a
  time, until the client says it no longer wants them, a relay fails, or the
  session ends.  The client resumes with the last index it received.

When the client's session ends (close, crash, idle timeout) the node withdraws
every advertisement the client made.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..core.messages import Frame, MessageType
from ..core.params import MAX_WATCH_BATCH
from ..core.session import PeerInfo
from ..errors import HandlerError, MaculaError, PeerError, QuotaExceeded, ServiceUnavailable, TransportError

if TYPE_CHECKING:
    from .host import Host
    from .interfaces import ServiceApi
    from .watch import Watch, Watches

log = logging.getLogger(__name__)


#: services one attached client may advertise through a node
MAX_ADS_PER_CLIENT = 32
#: watches one attached client may run through a node
MAX_WATCHES_PER_CLIENT = 16
#: events per SERVICE_EVENT (a reset carries the whole set in one)
WATCH_BATCH = min(64, MAX_WATCH_BATCH)


class ServiceOwnedElsewhere(MaculaError):
    """The name is served here by the node itself or for another client: not yours to replace."""

    code = "service_owned_elsewhere"


class ClientGateway:
    """Serves ADVERTISE, UNADVERTISE, DISCOVER and SERVICE_CALL for attached clients (see the module docstring)."""

    def __init__(self, host: Host, services: ServiceApi, watches: Watches | None = None):
        self.host = host
        self.services = services
        self.watches = watches
        self.client_watches: dict[bytes, dict[int, Watch]] = {}  # client node id -> its watches here
        self.clients: dict[bytes, set[str]] = {}  # client node id -> services it advertised here
        self._owner: dict[str, bytes] = {}  # service -> client that advertised it here
        host.route(MessageType.ADVERTISE, self._on_advertise)
        host.route(MessageType.UNADVERTISE, self._on_unadvertise)
        host.route(MessageType.DISCOVER, self._on_discover)
        host.route(MessageType.SERVICE_CALL, self._on_service_call)
        if watches is not None:
            host.route(MessageType.SERVICE_WATCH, self._on_service_watch)
        host.on_session_closed(self._on_session_closed)

    # ----------------------------------------------------------- handlers
    async def _on_advertise(self, frame: Frame, peer: PeerInfo):
        body = frame.body
        name = body["service"]
        owner = self._owner.get(name)
        if owner is not None and owner != peer.node_id:
            raise ServiceOwnedElsewhere(f"{name} is already relayed here for another client")
        if owner is None and name in self.services.ads:
            raise ServiceOwnedElsewhere(f"{name} is served by node {self.host.name} itself")
        if owner is None and len(self.clients.get(peer.node_id, ())) >= MAX_ADS_PER_CLIENT:
            raise QuotaExceeded(f"a client may advertise at most {MAX_ADS_PER_CLIENT} services through a node")
        metadata = {"client": peer.name or peer.short_id, **body["metadata"]}
        ad = await self.services.advertise(
            name, self._relay(name, peer.node_id), ttl=body["ttl"], metadata=metadata
        )
        self._owner[name] = peer.node_id
        self.clients.setdefault(peer.node_id, set()).add(name)
        log.info("%s: relaying %s for attached client %s", self.host.name, name, peer.name or peer.short_id)
        return MessageType.ADVERTISE_REPLY, {"replicas": ad.replicas}

    async def _on_unadvertise(self, frame: Frame, peer: PeerInfo):
        name = frame.body["service"]
        if self._owner.get(name) != peer.node_id:
            return MessageType.UNADVERTISE_REPLY, {"removed": 0}
        removed = await self._withdraw(peer.node_id, name)
        return MessageType.UNADVERTISE_REPLY, {"removed": removed}

    async def _on_discover(self, frame: Frame, peer: PeerInfo):
        providers = await self.services.discover(frame.body["service"], refresh=frame.body["refresh"])
        now = asyncio.get_running_loop().time()
        return MessageType.DISCOVER_REPLY, {"providers": [p.to_wire(now) for p in providers]}

    async def _on_service_call(self, frame: Frame, peer: PeerInfo):
        b = frame.body
        result = await self.services.call(
            b["service"],
            b["args"],
            timeout=b["timeout"],
            strategy=b.get("strategy"),
            max_attempts=b.get("max_attempts"),
            details=True,
        )
        return MessageType.SERVICE_REPLY, {
            "result": result.value,
            "provider": result.provider,
            "node_id": result.node_id,
            "latency": result.latency,
        }

    def _on_service_watch(self, frame: Frame, peer: PeerInfo):
        assert self.watches is not None
        body = frame.body
        mine = self.client_watches.setdefault(peer.node_id, {})
        wid = body["watch"]
        if wid in mine:
            raise QuotaExceeded(f"watch {wid} is already running for this client")
        if len(mine) >= MAX_WATCHES_PER_CLIENT:
            raise QuotaExceeded(f"a client may run at most {MAX_WATCHES_PER_CLIENT} watches through a node")
        watch = self.watches.watch(body["service"], since=body.get("after"))
        mine[wid] = watch
        if self.host.spawn(self._relay_watch(peer.node_id, wid, watch), name=f"{self.host.name}:watch-relay") is None:
            self._end_watch(peer.node_id, wid)
        return MessageType.SERVICE_WATCH_REPLY, {"watch": wid}

    async def _relay_watch(self, client_id: bytes, wid: int, watch: Watch) -> None:
        """Relay ``watch``'s events to the client, a batch per round trip, until either side stops."""
        try:
            while True:
                event = await watch.next()
                if event is None:
                    return
                batch = [event.to_wire()]
                while len(batch) < WATCH_BATCH and (more := watch.take()) is not None:
                    batch.append(more.to_wire())
                reply = await self.host.request_session(
                    client_id,
                    MessageType.SERVICE_EVENT,
                    {"watch": wid, "events": batch},
                    timeout=self.host.request_timeout,
                )
                if not reply.body.get("ok"):
                    return  # the client closed this watch
        except MaculaError as exc:  # the client is gone or unreachable: it resumes from its last index
            log.debug("%s: watch relay to client ended: %s", self.host.name, exc)
        finally:
            self._end_watch(client_id, wid)

    def _end_watch(self, client_id: bytes, wid: int) -> None:
        mine = self.client_watches.get(client_id, {})
        watch = mine.pop(wid, None)
        if not mine:
            self.client_watches.pop(client_id, None)
        if watch is not None:
            watch.close()

    # ------------------------------------------------------------ relaying
    def _relay(self, name: str, client_id: bytes):
        host = self.host

        async def relay(args: Any) -> Any:
            try:
                reply = await host.request_session(
                    client_id,
                    MessageType.CALL,
                    {"procedure": name, "args": args},
                    timeout=host.request_timeout,
                )
            except PeerError as exc:
                if exc.remote_code == HandlerError.code:  # the client's handler raised: pass it on as is
                    raise HandlerError(exc.remote_message, exc.details) from None
                raise ServiceUnavailable(f"attached client cannot serve {name}: {exc}") from None
            except TransportError as exc:  # the client is gone or slow: the caller fails over
                raise ServiceUnavailable(f"attached client for {name} unreachable: {exc}") from None
            return reply.body["result"]

        return relay

    def _on_session_closed(self, peer: PeerInfo) -> None:
        for wid in list(self.client_watches.get(peer.node_id, {})):
            self._end_watch(peer.node_id, wid)
        names = self.clients.get(peer.node_id)
        if names:
            log.info(
                "%s: client %s left; withdrawing %s",
                self.host.name,
                peer.name or peer.short_id,
                sorted(names),
            )
            for name in list(names):
                self.host.spawn(self._withdraw(peer.node_id, name), name=f"{self.host.name}:withdraw:{name}")

    async def _withdraw(self, client_id: bytes, name: str) -> int:
        names = self.clients.get(client_id, set())
        names.discard(name)
        if not names:
            self.clients.pop(client_id, None)
        if self._owner.get(name) == client_id:
            del self._owner[name]
            return await self.services.unadvertise(name)
        return 0
