"""The watch core: a provider set fed observations from several sources yields each change once."""

from __future__ import annotations

import pytest

from macula_lab.core.codec import decode, encode
from macula_lab.core.messages import MessageType, new_id
from macula_lab.core.records import ProviderEntry, RecordStore
from macula_lab.core.watch import Provider, ProviderSet, SubscriberTable, WatchEvent
from macula_lab.errors import CodecError, QuotaExceeded

KEY = bytes(32)


def entry(n: int, seq: int = 1, *, expires_at: float = 100.0, name: str | None = None) -> ProviderEntry:
    meta = {"name": name or f"node-{n}"}
    return ProviderEntry(bytes([n]) * 32, f"quic://127.0.0.1:{9000 + n}", meta, 30.0, seq, expires_at)


def kinds(events) -> list[tuple[str, str]]:
    return [(e.kind, e.provider.name) for e in events if e is not None]


def test_each_change_is_yielded_once_whatever_reports_it():
    s = ProviderSet("svc", base=1000)
    # three replicas push the same store, then a read shows it again
    evs = [s.observe(entry(1), 0.0) for _ in range(3)] + s.reconcile([entry(1)], 0.0, 1.0)
    assert kinds(evs) == [("added", "node-1")]
    evs = [s.left(entry(1).node_id, 1, "removed") for _ in range(3)]
    assert kinds(evs) == [("removed", "node-1")]
    assert [e.index for e in s.history] == [1001, 1002]


def test_a_late_copy_of_a_removed_advertisement_does_not_come_back():
    s = ProviderSet("svc", base=0)
    s.observe(entry(1, seq=5), 0.0)
    s.left(entry(1).node_id, 5, "removed")
    assert s.observe(entry(1, seq=5), 1.0) is None  # a replica that missed the REMOVE
    assert s.reconcile([entry(1, seq=4)], 1.0, 2.0) == []
    assert kinds([s.observe(entry(1, seq=6), 3.0)]) == [("added", "node-1")]  # advertised again


def test_readvertisement_is_no_change_but_new_content_is_an_update():
    s = ProviderSet("svc", base=0)
    s.observe(entry(1, seq=1), 0.0)
    assert s.observe(entry(1, seq=2), 1.0) is None
    assert s.left(entry(1).node_id, 1, "expired") is None  # the old advertisement's expiry
    assert kinds([s.observe(entry(1, seq=3, name="renamed"), 2.0)]) == [("updated", "renamed")]


def test_reconcile_tells_expired_from_removed_and_spares_what_a_push_showed_since():
    s = ProviderSet("svc", base=0)
    s.observe(entry(1, expires_at=10.0), 0.0)
    s.observe(entry(2, expires_at=100.0), 0.0)
    s.observe(entry(3, expires_at=100.0), 5.0)  # pushed while the read below was running
    evs = s.reconcile([], started=4.0, now=10.5)
    assert sorted(kinds(evs)) == [("expired", "node-1"), ("removed", "node-2")]
    assert [p.name for p in s.providers()] == ["node-3"]


def test_since_replays_held_events_and_asks_for_a_reset_otherwise():
    s = ProviderSet("svc", base=100, history=3)
    for n in range(1, 6):
        s.observe(entry(n), 0.0)
    assert s.index == 105
    assert [e.index for e in s.since(103)] == [104, 105]
    assert s.since(105) == []
    assert s.since(101) is None  # 102 fell out of the history
    assert s.since(106) is None  # not an index of this set
    assert s.since(5) is None  # another instance's
    reset = s.reset()
    assert reset.kind == "reset" and reset.index == 105 and len(reset.providers) == 5
    assert WatchEvent.from_wire(reset.to_wire()) == reset


def test_a_later_set_starts_above_every_index_of_an_earlier_one():
    a = ProviderSet("svc")
    for n in range(1, 50):
        a.observe(entry(n), 0.0)
    b = ProviderSet("svc")
    assert b.base > a.index
    assert b.since(a.index) is None


def test_record_store_tells_its_listener_of_changes_not_of_extensions():
    store = RecordStore()
    seen = []
    store.listener = lambda kind, key, e: seen.append((kind, e.seq))
    e = ProviderEntry(bytes([1]) * 32, "quic://127.0.0.1:9001", {}, 10.0, 1)
    store.store(KEY, e, 0.0)
    store.store(KEY, e, 1.0)  # the same advertisement again: only its expiry moves
    store.store(KEY, ProviderEntry(e.node_id, e.endpoint, {}, 10.0, 2), 2.0)
    store.remove(KEY, e.node_id, 3.0)
    store.store(KEY, ProviderEntry(e.node_id, e.endpoint, {}, 1.0, 3), 4.0)
    store.expire(6.0)
    assert seen == [("stored", 1), ("stored", 2), ("removed", 2), ("stored", 3), ("expired", 3)]


def test_subscriber_table_is_bounded_per_peer_and_in_total():
    t = SubscriberTable(max_per_peer=2, max_total=3)
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    t.subscribe(bytes([10]) * 32, a, "e", 5.0, 0.0)
    t.subscribe(bytes([11]) * 32, a, "e", 5.0, 0.0)
    t.subscribe(bytes([11]) * 32, a, "e", 5.0, 1.0)  # a renewal takes no room
    with pytest.raises(QuotaExceeded):
        t.subscribe(bytes([12]) * 32, a, "e", 5.0, 1.0)
    t.subscribe(bytes([12]) * 32, b, "e", 5.0, 1.0)
    with pytest.raises(QuotaExceeded):
        t.subscribe(bytes([13]) * 32, c, "e", 5.0, 1.0)
    assert len(t) == 3 and t.refused == 2
    # leases end: the room comes back without anyone unsubscribing
    assert t.subscribe(bytes([13]) * 32, c, "e", 500.0, 10.0) == 120.0  # capped
    assert len(t) == 1 and [s.node_id for s in t.subscribers(bytes([13]) * 32, 11.0)] == [c]
    assert t.subscribers(bytes([10]) * 32, 11.0) == []


def test_watch_messages_are_checked_at_the_edge():
    ok = {"id": new_id(), "key": KEY, "lease": 10.0}
    assert decode(encode(MessageType.WATCH, ok)).body["lease"] == 10.0
    for bad in ({**ok, "lease": 0}, {**ok, "lease": 1e9}, {**ok, "key": b"short"}):
        with pytest.raises(CodecError):
            encode(MessageType.WATCH, bad)
    ev = {"id": new_id(), "key": KEY, "kind": "stored", "value": {}}
    with pytest.raises(CodecError):
        encode(MessageType.WATCH_EVENT, {**ev, "kind": "exploded"})
    with pytest.raises(CodecError):
        encode(MessageType.SERVICE_WATCH, {"id": new_id(), "service": "svc", "watch": 1, "after": -1})
    with pytest.raises(CodecError):
        encode(MessageType.SERVICE_EVENT, {"id": new_id(), "watch": 1, "events": [{}] * 1000})


def test_provider_from_wire_refuses_garbage():
    p = Provider.from_entry(entry(1))
    assert Provider.from_wire(p.to_wire()) == p
    with pytest.raises(CodecError):
        Provider.from_wire({"node_id": "x"})


def test_watch_log_keeps_the_newest_rows_and_the_set_they_describe():
    from macula_lab.core.watch import WatchLog

    s = ProviderSet("svc", base=0)
    log = WatchLog(max_rows=3)
    log.apply(s.reset())
    for ev in (s.observe(entry(1), 0.0), s.observe(entry(2), 0.0), s.left(entry(1).node_id, 1, "expired")):
        log.apply(ev)
    assert [r["kind"] for r in log.rows] == ["expired", "added", "added"]  # newest first, bounded
    assert [p.name for p in log.current()] == ["node-2"] and log.index == 3
    log.apply(s.reset())
    assert log.rows[0]["provider"] == "1 providers: node-2" and log.counts["reset"] == 2


def test_a_replica_that_missed_a_remove_is_outvoted_by_the_others_tombstones():
    s = ProviderSet("svc", base=0)
    s.observe(entry(1, seq=3), 0.0)
    s.observe(entry(2, seq=1), 0.0)
    # the union still holds provider 1 (one replica missed the REMOVE); another saw it removed
    evs = s.reconcile([entry(1, seq=3), entry(2, seq=1)], 1.0, 2.0, removed={entry(1).node_id: 3})
    assert kinds(evs) == [("removed", "node-1")]
    assert s.reconcile([entry(1, seq=3), entry(2, seq=1)], 3.0, 4.0, removed={entry(1).node_id: 3}) == []
    # a tombstone of an older advertisement removes nothing newer
    s.observe(entry(2, seq=5), 5.0)
    assert s.reconcile([entry(2, seq=5)], 6.0, 7.0, removed={entry(2).node_id: 1}) == []


def test_an_incomplete_read_adds_but_never_removes():
    s = ProviderSet("svc", base=0)
    s.observe(entry(1), 0.0)
    assert kinds(s.reconcile([entry(2)], 1.0, 2.0, complete=False)) == [("added", "node-2")]
    assert [p.name for p in s.providers()] == ["node-1", "node-2"]


def test_record_store_names_the_removed_advertisements_under_a_key():
    store = RecordStore()
    e = ProviderEntry(bytes([1]) * 32, "quic://127.0.0.1:9001", {}, 10.0, 4)
    store.store(KEY, e, 0.0)
    store.remove(KEY, e.node_id, 1.0)
    assert store.removed(KEY, 2.0) == [(e.node_id, 4)]
    assert store.removed(bytes([9]) * 32, 2.0) == [] and store.removed(KEY, 11.0) == []
