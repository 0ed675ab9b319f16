import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula_lab.core.ids import ID_BYTES, bucket_index, int_to_id, random_id, xor_distance
from macula_lab.core.routing import Contact, PingNeeded, RoutingTable
from macula_lab.errors import InvalidField

SELF = bytes(ID_BYTES)
TOP = 1 << 255  # every id with this bit set is in bucket 255 of SELF


def far(i: int, endpoint: str = "") -> Contact:
    """The i-th contact of bucket 255."""
    return Contact(int_to_id(TOP | i), endpoint or f"mem://n{i}", f"n{i}")


def full_table(k: int = 3, **kw) -> RoutingTable:
    kw.setdefault("fresh_for", 0.0)  # these tests are about the pings themselves
    table = RoutingTable(SELF, k, **kw)
    for i in range(k):
        assert table.observe(far(i), now=float(i)) is None
    return table


def test_observe_adds_and_ignores_self():
    table = RoutingTable(SELF, 4)
    assert table.observe(Contact(SELF, "mem://me"), 0.0) is None
    assert len(table) == 0
    table.observe(far(1), 0.0)
    assert len(table) == 1 and far(1).node_id in table
    assert table.get(far(1).node_id) == far(1)


def test_observe_rejects_bad_ids():
    with pytest.raises(InvalidField):
        RoutingTable(SELF).observe(Contact(b"short", "mem://x"), 0.0)


def test_known_contact_moves_to_tail_with_new_endpoint():
    table = full_table(3)
    table.observe(far(0, "mem://moved"), 10.0)
    assert [c.node_id for c in table.bucket_contacts(255)] == [far(1).node_id, far(2).node_id, far(0).node_id]
    assert table.get(far(0).node_id).endpoint == "mem://moved"
    assert len(table) == 3


def test_full_bucket_asks_to_ping_oldest_instead_of_dropping():
    table = full_table(3)
    decision = table.observe(far(10), 5.0)
    assert decision == PingNeeded(oldest=far(0), candidate=far(10))
    assert far(10).node_id not in table
    assert table.replacements(255) == [far(10)]
    # one outstanding ping per bucket: another newcomer just waits
    assert table.observe(far(11), 6.0) is None
    assert table.replacements(255) == [far(10), far(11)]


def test_oldest_heard_from_lately_is_not_pinged():
    table = full_table(3, fresh_for=30.0)  # contacts last seen at 0, 1 and 2
    assert table.observe(far(10), 29.0) is None  # far(0) was heard from 29 s ago: alive
    assert table.replacements(255) == [far(10)]
    assert far(10).node_id not in table
    assert table.observe(far(11), 30.0) == PingNeeded(far(0), far(11))  # 30 s: ask it
    table.ping_result(far(0).node_id, alive=True, now=31.0)
    assert table.observe(far(12), 31.5) == PingNeeded(far(1), far(12))  # seen at 1.0
    table.ping_result(far(1).node_id, alive=True, now=31.9)
    assert table.observe(far(13), 31.9) is None  # the oldest now is far(2), seen 29.9 s ago

    table = full_table(3)
    table.observe(far(10), 5.0)
    table.ping_result(far(0).node_id, alive=True, now=6.0)
    assert [c.node_id for c in table.bucket_contacts(255)][-1] == far(0).node_id
    assert far(10).node_id not in table
    assert table.replacements(255) == [far(10)]
    # the next newcomer pings the new least-recently-seen contact
    assert table.observe(far(11), 7.0) == PingNeeded(far(1), far(11))


def test_ping_dead_evicts_and_promotes_most_recent_replacement():
    table = full_table(3)
    table.observe(far(10), 5.0)
    table.observe(far(11), 6.0)
    table.ping_result(far(0).node_id, alive=False, now=7.0)
    assert far(0).node_id not in table
    assert far(11).node_id in table  # the most recently seen replacement
    assert table.replacements(255) == [far(10)]
    assert len(table) == 3


def test_unanswered_ping_is_reissued_after_timeout():
    table = full_table(3, ping_timeout=10.0)
    assert table.observe(far(10), 5.0) is not None
    assert table.observe(far(11), 9.0) is None
    assert table.observe(far(12), 16.0) == PingNeeded(far(0), far(12))


def test_oldest_seen_alive_cancels_pending_ping():
    table = full_table(3)
    table.observe(far(10), 5.0)
    table.observe(far(0), 6.0)  # its request arrives before the ping result
    assert table.observe(far(11), 7.0) == PingNeeded(far(1), far(11))


def test_failed_removes_after_max_failures_and_promotes():
    table = full_table(3, max_failures=2)
    table.observe(far(10), 5.0)
    assert table.failed(far(1).node_id, 6.0) is False
    assert far(1).node_id in table
    assert table.failed(far(1).node_id, 7.0) is True
    assert far(1).node_id not in table
    assert far(10).node_id in table


def test_sign_of_life_resets_failures():
    table = full_table(3, max_failures=2)
    table.failed(far(1).node_id, 6.0)
    table.observe(far(1), 7.0)
    assert table.failed(far(1).node_id, 8.0) is False
    assert far(1).node_id in table


def test_failed_replacement_is_dropped_from_cache():
    table = full_table(3)
    table.observe(far(10), 5.0)
    assert table.failed(far(10).node_id, 6.0) is False
    assert table.replacements(255) == []
    table.ping_result(far(0).node_id, alive=False, now=7.0)
    assert len(table) == 2  # nothing to promote


def test_replacement_cache_is_bounded_and_drops_stalest():
    table = full_table(2, replacement_size=2)
    for i in range(10, 14):
        table.observe(far(i), float(i))
    assert table.replacements(255) == [far(12), far(13)]


def test_remove_promotes_and_forgets_replacements():
    table = full_table(2)
    table.observe(far(10), 5.0)
    assert table.remove(far(0).node_id) is True
    assert far(10).node_id in table
    assert table.remove(far(0).node_id) is False
    table.observe(far(11), 6.0)
    assert table.remove(far(11).node_id) is False  # only in the cache, still forgotten
    assert table.replacements(255) == []


def test_buckets_fill_independently():
    table = RoutingTable(SELF, 2)
    near = Contact(int_to_id(1), "mem://near")
    table.observe(near, 0.0)
    for i in range(5):
        table.observe(far(i), 0.0)
    assert table.bucket_sizes() == {0: 1, 255: 2}
    assert len(table) == 3
    assert set(table.contacts()) == {near, far(0), far(1)}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=0, max_size=60, unique=True),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=0, max_value=70),
    st.integers(min_value=0, max_value=5),
)
def test_closest_equals_brute_force(node_ids, self_id, target, n, n_excluded):
    table = RoutingTable(self_id, k=60)  # big buckets: every id is kept
    for nid in node_ids:
        table.observe(Contact(nid, "mem://x"), 0.0)
    known = [nid for nid in node_ids if nid != self_id]
    exclude = known[:n_excluded]
    expected = sorted((nid for nid in known if nid not in exclude), key=lambda x: xor_distance(x, target))[:n]
    got = [c.node_id for c in table.closest(target, n, exclude=exclude)]
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40, unique=True),
    st.binary(min_size=32, max_size=32),
    st.data(),
)
def test_closest_stays_exact_after_removals(node_ids, target, data):
    """closest() visits only non-empty buckets: that index must follow removals too."""
    table = RoutingTable(bytes(32), k=40)
    for nid in node_ids:
        table.observe(Contact(nid, "mem://x"), 0.0)
    gone = data.draw(st.lists(st.sampled_from(node_ids), unique=True))
    for nid in gone:
        table.remove(nid)
    left = [nid for nid in node_ids if nid not in gone and nid != bytes(32)]
    assert [c.node_id for c in table.closest(target, 40)] == sorted(
        left, key=lambda x: xor_distance(x, target)
    )
    assert table._occupied == sorted(table.bucket_sizes())


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_closest_to_self_and_to_member(self_id):
    table = RoutingTable(self_id, k=20)
    contacts = [Contact(random_id(), "mem://x") for _ in range(100)]
    for c in contacts:
        table.observe(c, 0.0)
    kept = table.contacts()
    for target in (self_id, kept[0].node_id):
        expected = sorted(kept, key=lambda c: xor_distance(c.node_id, target))[:20]
        assert table.closest(target) == expected


def test_refresh_covers_buckets_from_nearest_neighbour_up():
    table = RoutingTable(SELF, 4)
    assert table.buckets_needing_refresh(0.0) == []
    table.observe(Contact(int_to_id(1 << 250), "mem://a"), 0.0)  # bucket 250
    assert table.buckets_needing_refresh(0.0) == list(range(250, 256))
    for i in range(250, 256):
        table.touch_bucket(i, 100.0)
    table.touch_bucket(bucket_index(SELF, far(0).node_id), 500.0)
    assert table.buckets_needing_refresh(3700.0, interval=3600) == list(range(250, 255))
    assert table.buckets_needing_refresh(200.0, interval=3600) == []


def test_snapshot_rows():
    table = full_table(2)
    table.observe(far(10), 5.0)
    rows = table.snapshot(now=10.0)
    assert [r["bucket"] for r in rows] == [255, 255]
    assert rows[0] == {
        "bucket": 255,
        "node_id": far(0).node_id.hex(),
        "name": "n0",
        "endpoint": "mem://n0",
        "last_seen": 0.0,
        "age": 10.0,
        "failures": 0,
        "replacement": False,
    }
    assert len(table.snapshot(replacements=True)) == 3
    assert table.snapshot()[0]["age"] is None


def test_contact_wire_round_trip_and_validation():
    c = Contact(random_id(), "quic://10.0.0.1:9443", "node-1")
    assert Contact.from_wire(c.to_wire()) == c
    assert Contact.from_wire({"node_id": c.node_id, "endpoint": "mem://a"}).name == ""
    for bad in [
        None,
        [],
        {"node_id": b"x", "endpoint": "e"},
        {"node_id": c.node_id},
        {"node_id": c.node_id, "endpoint": 5},
    ]:
        with pytest.raises(InvalidField):
            Contact.from_wire(bad)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), max_size=80, unique=True),
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=1, max_value=30),
)
def test_closest_equals_brute_force_over_a_small_k_table(node_ids, target, n):
    table = RoutingTable(bytes(32), k=2)  # full buckets: many ids end up in replacement caches
    for i, nid in enumerate(node_ids):
        table.observe(Contact(nid, "mem://x"), float(i))
    assert len(table) == len(table.contacts()) <= 2 * 256
    expected = sorted(table.contacts(), key=lambda c: xor_distance(c.node_id, target))[:n]
    assert table.closest(target, n) == expected


def test_from_wire_memoises_checked_contacts_and_still_refuses_bad_ones():
    from macula_lab.errors import InvalidField

    wire = {"node_id": b"\x07" * 32, "endpoint": "mem://memo-a", "name": "memo-a"}
    first = Contact.from_wire(wire)
    assert Contact.from_wire(dict(wire)) is first  # checked once, then shared
    with pytest.raises(InvalidField):
        Contact.from_wire({**wire, "endpoint": "not an endpoint"})
    with pytest.raises(InvalidField):
        Contact.from_wire({**wire, "node_id": [1, 2]})  # unhashable: checked, refused
    other = Contact.from_wire({**wire, "name": "memo-b"})
    assert other is not first and other.name == "memo-b"
