import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula_lab.core.ids import int_to_id, random_id, service_key, xor_distance
from macula_lab.core.params import MAX_TTL
from macula_lab.core.records import ProviderEntry, RecordStore, keys_to_hand_over
from macula_lab.core.routing import Contact, RoutingTable
from macula_lab.errors import InvalidField

KEY = service_key("com.example", "svc.echo")
P1, P2, P3 = random_id(), random_id(), random_id()


def entry(node_id=P1, seq=1, ttl=300.0, endpoint="quic://h:1", **meta) -> ProviderEntry:
    return ProviderEntry(node_id, endpoint, dict(meta), ttl, seq)


# ------------------------------------------------------------------ wire
def test_wire_round_trip():
    e = entry(seq=7, ttl=60, weight=3)
    assert e.to_wire() == {
        "node_id": P1,
        "endpoint": "quic://h:1",
        "metadata": {"weight": 3},
        "ttl": 60,
        "seq": 7,
    }
    assert ProviderEntry.from_wire(e.to_wire()) == e


def test_from_wire_refuses_a_ttl_above_a_day_and_defaults_metadata():
    """Never clamped: a clamped record would lapse before its provider republished it."""
    e = ProviderEntry.from_wire({"node_id": P1, "endpoint": "quic://e:1", "ttl": MAX_TTL, "seq": 0})
    assert e.ttl == MAX_TTL and e.metadata == {}
    for ttl in (MAX_TTL + 1, 10**9, 0, -5, float("nan"), float("inf")):
        with pytest.raises(InvalidField) as err:
            ProviderEntry.from_wire({"node_id": P1, "endpoint": "quic://e:1", "ttl": ttl, "seq": 0})
        assert err.value.field == "ttl"
    # a handover carries what is left of the record's life: less than a second is fine
    assert ProviderEntry.from_wire({"node_id": P1, "endpoint": "quic://e:1", "ttl": 0.25, "seq": 0}).ttl == 0.25


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"node_id": b"short"}, "node_id"),
        ({"node_id": None}, "node_id"),
        ({"endpoint": 5}, "endpoint"),
        ({"endpoint": "x" * 1000}, "endpoint"),
        ({"metadata": []}, "metadata"),
        ({"metadata": {1: "a"}}, "metadata: keys"),
        ({"endpoint": "quic://" + "a" * 64 + ".lab:9443"}, "endpoint"),
        ({"metadata": {"blob": b"x" * 10_000}}, "bytes, more than"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"ttl": "300"}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"seq": -1}, "seq"),
        ({"seq": 2**64}, "seq"),
        ({"seq": 1.5}, "seq"),
        ({"seq": None}, "seq"),
    ],
)
def test_from_wire_rejects_bad_fields(patch, message):
    d = entry().to_wire() | patch
    with pytest.raises(InvalidField, match=message):
        ProviderEntry.from_wire(d)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["node_id", "endpoint", "metadata", "ttl", "seq", "x"]),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(),
                st.text(max_size=5),
                st.binary(max_size=40),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
                st.lists(st.integers(), max_size=3),
            ),
        ),
        st.integers(),
        st.text(),
        st.none(),
    )
)
def test_from_wire_never_crashes_on_arbitrary_input(d):
    try:
        ProviderEntry.from_wire(d)
    except InvalidField:
        pass


def test_to_wire_with_now_sends_remaining_ttl():
    store = RecordStore()
    store.store(KEY, entry(ttl=100), now=0.0)
    (stored,) = store.get(KEY, 40.0)
    assert stored.to_wire(40.0)["ttl"] == 60.0
    assert stored.to_wire()["ttl"] == 100


# ----------------------------------------------------------------- merge
def test_store_merges_per_provider_never_overwrites_others():
    store = RecordStore()
    assert store.store(KEY, entry(P1), 0.0)
    assert store.store(KEY, entry(P2), 0.0)
    assert {e.node_id for e in store.get(KEY, 1.0)} == {P1, P2}
    assert store.store(KEY, entry(P1, seq=2, endpoint="quic://new:1"), 1.0)
    got = {e.node_id: e for e in store.get(KEY, 2.0)}
    assert got[P1].endpoint == "quic://new:1" and got[P2].endpoint == "quic://h:1"


def test_higher_seq_wins_lower_is_refused():
    store = RecordStore()
    store.store(KEY, entry(seq=5, v="five"), 0.0)
    assert store.store(KEY, entry(seq=4, v="four"), 1.0) is False
    assert store.get(KEY, 2.0)[0].metadata == {"v": "five"}
    assert store.store(KEY, entry(seq=6, v="six", ttl=10), 2.0) is True
    (e,) = store.get(KEY, 3.0)
    assert e.metadata == {"v": "six"} and e.expires_at == 12.0  # higher seq replaces expiry, even shorter
    assert store.stats()["refused_stale"] == 1


def test_equal_seq_keeps_content_and_extends_expiry_only():
    store = RecordStore()
    store.store(KEY, entry(seq=3, ttl=100, v="a"), 0.0)
    assert store.store(KEY, entry(seq=3, ttl=100, v="b"), 50.0) is True
    (e,) = store.get(KEY, 60.0)
    assert e.metadata == {"v": "a"} and e.expires_at == 150.0
    # a handover copy with less time left does not shorten it
    assert store.store(KEY, entry(seq=3, ttl=10), 60.0) is True
    assert store.get(KEY, 60.0)[0].expires_at == 150.0


def test_store_refuses_a_ttl_above_a_day_and_keeps_what_it_had():
    store = RecordStore()
    store.store(KEY, entry(seq=1, ttl=100), 0.0)
    with pytest.raises(InvalidField):
        store.store(KEY, entry(seq=2, ttl=MAX_TTL * 2), 1.0)
    (e,) = store.get(KEY, 1.0)
    assert e.seq == 1 and e.expires_at == 100.0


# ---------------------------------------------------------------- expiry
def test_expired_entries_are_invisible_then_purged():
    store = RecordStore()
    store.store(KEY, entry(P1, ttl=10), 0.0)
    store.store(KEY, entry(P2, ttl=20), 0.0)
    assert store.next_expiry() == 10.0
    assert [e.node_id for e in store.get(KEY, 10.0)] == [P2]  # invisible at its TTL, before expire()
    assert store.expire(9.9) == []
    assert store.expire(10.0) == [(KEY, P1)]
    assert store.next_expiry() == 20.0
    assert store.expire(25.0) == [(KEY, P2)]
    assert KEY not in store and len(store) == 0 and store.next_expiry() is None


def test_refresh_moves_expiry_and_stale_heap_items_are_skipped():
    store = RecordStore()
    store.store(KEY, entry(seq=1, ttl=10), 0.0)
    store.store(KEY, entry(seq=2, ttl=10), 8.0)
    assert store.next_expiry() == 18.0
    assert store.expire(12.0) == []
    assert store.get(KEY, 12.0)[0].seq == 2


def test_expired_entry_can_be_replaced_by_any_seq():
    store = RecordStore()
    store.store(KEY, entry(seq=9, ttl=10), 0.0)
    assert store.store(KEY, entry(seq=1, ttl=10), 11.0) is True  # provider restarted its counter


def test_snapshot_shows_remaining_ttl():
    store = RecordStore()
    store.store(KEY, entry(P1, ttl=30, seq=4), 0.0)
    store.store(KEY, entry(P2, ttl=5), 0.0)
    rows = store.snapshot(10.0)
    assert rows == [
        {
            "key": KEY.hex(),
            "provider": P1.hex(),
            "endpoint": "quic://h:1",
            "metadata": {},
            "seq": 4,
            "ttl": 30,
            "remaining": 20.0,
            "by_owner": True,
        }
    ]


# --------------------------------------------------------------- removal
def test_remove_one_provider():
    store = RecordStore()
    store.store(KEY, entry(P1), 0.0)
    store.store(KEY, entry(P2), 0.0)
    assert store.remove(KEY, P1) is True
    assert store.remove(KEY, P1) is False
    assert [e.node_id for e in store.get(KEY, 1.0)] == [P2]
    assert store.remove(KEY, P2) is True
    assert KEY not in store


def test_removed_entry_is_not_resurrected_by_stale_handover():
    store = RecordStore()
    store.store(KEY, entry(seq=3, ttl=100), 0.0)
    store.remove(KEY, P1)
    assert store.store(KEY, entry(seq=3, ttl=50), 10.0) is False  # a replica that missed the REMOVE
    assert store.store(KEY, entry(seq=4, ttl=50), 11.0) is True  # a new advertisement
    store.remove(KEY, P1)
    store.expire(200.0)
    assert store.stats()["tombstones"] == 0
    assert store.store(KEY, entry(seq=3, ttl=50), 200.0) is True


# ---------------------------------------------------------------- realms
def test_realms_never_see_each_others_records():
    store = RecordStore()
    a, b = service_key("realm.a", "svc"), service_key("realm.b", "svc")
    store.store(a, entry(P1), 0.0)
    assert store.get(b, 0.0) == []
    assert len(store.get(a, 0.0)) == 1


def test_store_rejects_bad_key():
    with pytest.raises(InvalidField):
        RecordStore().store(b"short", entry(), 0.0)


# ---------------------------------------------------------------- limits
def test_max_providers_per_key_refuses_newcomers_until_expiry():
    store = RecordStore(max_providers=2)
    assert store.store(KEY, entry(P1, ttl=10), 0.0)
    assert store.store(KEY, entry(P2, ttl=100), 0.0)
    assert store.store(KEY, entry(P3), 1.0) is False
    assert store.store(KEY, entry(P1, seq=2, ttl=10), 2.0) is True  # existing providers may refresh
    assert store.stats()["refused_full"] == 1
    assert store.store(KEY, entry(P3), 13.0) is True  # P1 expired, room again
    assert {e.node_id for e in store.get(KEY, 13.0)} == {P2, P3}


def test_max_keys():
    store = RecordStore(max_keys=2)
    k1, k2, k3 = (service_key("r", n) for n in "abc")
    assert store.store(k1, entry(ttl=5), 0.0)
    assert store.store(k2, entry(), 0.0)
    assert store.store(k3, entry(), 1.0) is False
    assert store.store(k3, entry(), 6.0) is True
    assert set(store.keys()) == {k2, k3}
    assert store.stats() == {
        "keys": 2,
        "providers": 2,
        "tombstones": 0,
        "refused_stale": 0,
        "refused_full": 1,
        "refused_not_owner": 0,
        "refused_quota": 0,
        "evicted_copies": 0,
        "sources": 0,
    }


# -------------------------------------------------------------- authority
P3 = bytes([0x33]) * 32  # another node, copying records it holds (handover)


def test_a_copy_fills_a_gap_but_never_changes_an_entry():
    store = RecordStore()
    assert store.store(KEY, entry(P1, seq=5), 0.0)  # the provider's own STORE
    # another node sending P1's entry with a higher seq: a lockout attempt, refused
    assert store.store(KEY, entry(P1, seq=2**64 - 1, endpoint="quic://dead:1"), 1.0, source=P3) is False
    # or repointing it with the same seq: refused too
    assert store.store(KEY, entry(P1, seq=5, endpoint="quic://dead:1"), 1.0, source=P3) is False
    # the very same advertisement copied again only extends it
    assert store.store(KEY, entry(P1, seq=5, ttl=400), 1.0, source=P3) is True
    (e,) = store.get(KEY, 1.0)
    assert (e.seq, e.endpoint, e.by_owner, e.expires_at) == (5, "quic://h:1", True, 401.0)
    assert store.stats()["refused_not_owner"] == 2


def test_the_provider_overrides_a_copy_whatever_its_seq():
    store = RecordStore()
    forged = entry(P1, seq=2**64 - 1, endpoint="quic://dead:1")
    assert store.store(KEY, forged, 0.0, source=P3) is True  # a gap: the copy is taken...
    (e,) = store.get(KEY, 0.0)
    assert not e.by_owner and e.source == P3
    assert store.store(KEY, entry(P1, seq=7), 1.0, source=P1) is True  # ...until the provider speaks
    (e,) = store.get(KEY, 1.0)
    assert (e.seq, e.endpoint, e.by_owner) == (7, "quic://h:1", True)
    assert store.stats()["sources"] == 0  # the copy's quota was given back


def test_one_peer_can_make_a_node_hold_only_its_quota():
    store = RecordStore(max_per_source=10)
    keys = [service_key("r", f"s{i}") for i in range(50)]
    accepted = sum(store.store(k, entry(bytes([i]) * 32), 0.0, source=P3) for i, k in enumerate(keys))
    assert accepted == 10 and store.stats()["refused_quota"] == 40
    assert store.store(keys[0], entry(P1), 0.0, source=P1)  # others are not affected


def test_one_peer_adds_a_bounded_number_of_copies_under_one_key():
    store = RecordStore(max_copies_per_key=3)
    made_up = [bytes([0x70 + i]) * 32 for i in range(5)]
    accepted = [store.store(KEY, entry(p), 0.0, source=P3) for p in made_up]
    assert accepted == [True, True, True, False, False] and store.stats()["refused_quota"] == 2
    assert store.store(KEY, entry(made_up[3]), 0.0, source=P2)  # another peer's copies count apart


def test_a_genuine_provider_gets_in_even_when_copies_fill_the_key():
    store = RecordStore(max_providers=5, max_copies_per_key=100)
    for i in range(5):  # forged providers under one key
        assert store.store(KEY, entry(bytes([0x40 + i]) * 32), 0.0, source=P3)
    assert store.store(KEY, entry(bytes([0x50]) * 32), 0.0, source=P3) is False  # full for copies
    assert store.store(KEY, entry(P1, seq=1), 0.0, source=P1) is True  # a copy makes room
    assert P1 in {e.node_id for e in store.get(KEY, 0.0)} and store.stats()["evicted_copies"] == 1
    # owners never make room for each other: the key is now full of what it holds
    for i in range(5):
        store.store(KEY, entry(bytes([0x60 + i]) * 32), 0.0, source=bytes([0x60 + i]) * 32)
    assert len(store.get(KEY, 0.0)) == 5 and all(e.by_owner for e in store.get(KEY, 0.0))


# -------------------------------------------------------------- handover
def test_keys_to_hand_over():
    self_id = int_to_id(0)
    table = RoutingTable(self_id, k=2)
    far_a = Contact(int_to_id((1 << 255) | 1), "mem://a")
    far_b = Contact(int_to_id((1 << 255) | 2), "mem://b")
    table.observe(far_a, 0.0)
    table.observe(far_b, 0.0)
    near_key = int_to_id(5)  # we are closest; the far contacts are far
    far_key = int_to_id((1 << 255) | 3)  # far_a/far_b are closest
    newcomer = Contact(int_to_id(4), "mem://new")  # distance 1 from near_key
    assert keys_to_hand_over([near_key, far_key], newcomer, table, senders=1) == [near_key]
    # a newcomer farther than the k closest we know is not responsible for anything
    stranger = Contact(int_to_id((1 << 255) | (1 << 250)), "mem://s")
    assert keys_to_hand_over([near_key, far_key], stranger, table) == []


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_handover_matches_brute_force_responsibility(data):
    k = data.draw(st.integers(min_value=1, max_value=5))
    self_id = data.draw(st.binary(min_size=32, max_size=32))
    ids = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=0, max_size=12, unique=True))
    ids = [i for i in ids if i != self_id]
    if not ids:
        return
    new, known = ids[0], ids[1:]
    table = RoutingTable(self_id, k=40)
    for nid in known:
        table.observe(Contact(nid, "mem://x"), 0.0)
    key = data.draw(st.binary(min_size=32, max_size=32))
    pool = sorted([self_id, new, *known], key=lambda x: xor_distance(x, key))
    responsible = new in pool[:k]
    # closer to the key than all but at most senders-1 of the other nodes we know
    senders = data.draw(st.integers(min_value=1, max_value=4))
    closer = sum(xor_distance(n, key) < xor_distance(self_id, key) for n in known)
    got = keys_to_hand_over([key], Contact(new, "mem://n"), table, k, senders=senders)
    assert (got == [key]) == (responsible and closer < senders)
    got_all = keys_to_hand_over([key], Contact(new, "mem://n"), table, k, senders=None)
    assert (got_all == [key]) == responsible
