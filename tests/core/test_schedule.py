import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula_lab.core.params import MAX_TTL, MIN_TTL, READVERTISE_FRACTION
from macula_lab.core.schedule import LATENESS_WINDOW, ReadvertiseTimer, readvertise_interval
from macula_lab.errors import InvalidField


# -------------------------------------------------------------- interval
@pytest.mark.parametrize("ttl,interval", [(300, 240.0), (300.0, 240.0), (6, 4.8), (60, 48.0), (1, 0.8)])
def test_interval(ttl, interval):
    assert readvertise_interval(ttl) == pytest.approx(interval)


@pytest.mark.parametrize(
    "ttl", [0, -1, -0.5, 0.5, MAX_TTL + 1, 2 * MAX_TTL, math.inf, -math.inf, math.nan, True, "300", None]
)
def test_interval_refuses_bad_ttl(ttl):
    """Below the 1 s floor or above a day: refused, never clamped (a clamped record lapsed
    before its provider republished it: 172,800 s was republished every 138,240 s but stored
    for 86,400 s)."""
    with pytest.raises(InvalidField) as err:
        readvertise_interval(ttl)
    assert err.value.field == "ttl"


@given(st.floats(min_value=MIN_TTL, max_value=MAX_TTL))
def test_interval_always_before_expiry(ttl):
    interval = readvertise_interval(ttl)
    assert 0 < interval < ttl
    assert interval == pytest.approx(ttl * READVERTISE_FRACTION)


def test_interval_with_another_fraction_and_reschedule_keeps_it():
    """A tuned node (readvertise_fraction) republishes earlier; a new TTL keeps its fraction."""
    assert readvertise_interval(60, 0.5) == pytest.approx(30.0)
    t = ReadvertiseTimer.start("svc", 60, now=0.0, fraction=0.5)
    assert t.interval == pytest.approx(30.0) and t.next_fire == pytest.approx(30.0)
    t.reschedule(100, now=10.0)
    assert t.interval == pytest.approx(50.0) and t.next_fire == pytest.approx(60.0)
    for bad in (0, 1, 1.2, math.nan):
        with pytest.raises(InvalidField) as err:
            readvertise_interval(60, bad)
        assert err.value.field == "readvertise_fraction"


# ----------------------------------------------------------------- timer
def test_start():
    t = ReadvertiseTimer.start("svc.echo", 300, now=1000.0)
    assert (t.service, t.ttl, t.interval) == ("svc.echo", 300.0, 240.0)
    assert t.created_at == 1000.0 and t.next_fire == 1240.0
    assert t.last_fire is None and t.count == 0
    assert t.delay(1000.0) == 240.0
    assert t.delay(1300.0) == 0.0  # overdue: never negative
    assert not t.due(1239.9) and t.due(1240.0)


def test_start_refuses_bad_ttl():
    with pytest.raises(ValueError):
        ReadvertiseTimer.start("svc", 0, now=0.0)


def test_fired_on_time_late_and_early():
    t = ReadvertiseTimer.start("svc", 6, now=0.0)
    assert t.fired(4.8) == pytest.approx(0.0)
    assert t.next_fire == pytest.approx(9.6)
    late = t.fired(10.6)  # one second late
    assert late == pytest.approx(1.0)
    # scheduled from the actual fire: the next gap is the full interval
    assert t.next_fire == pytest.approx(10.6 + 4.8)
    early = t.fired(15.0)
    assert early == pytest.approx(-0.4)
    assert t.count == 3 and t.last_fire == 15.0
    assert list(t.lateness) == pytest.approx([0.0, 1.0, -0.4])
    assert t.lateness_total == pytest.approx(0.6)
    assert t.lateness_max == pytest.approx(1.0)


def test_several_cycles_never_lapse():
    ttl = 2.0
    t = ReadvertiseTimer.start("svc", ttl, now=0.0)
    published = 0.0
    for _ in range(10):
        now = t.next_fire + 0.1  # each fire a bit late
        assert now < published + ttl  # the record is still live when refreshed
        t.fired(now)
        published = now
    assert t.count == 10


def test_lateness_window_is_bounded():
    t = ReadvertiseTimer.start("svc", 10, now=0.0)
    for i in range(LATENESS_WINDOW + 50):
        t.fired(t.next_fire + (i % 3) * 0.01)
    assert len(t.lateness) == LATENESS_WINDOW
    assert t.count == LATENESS_WINDOW + 50


def test_reschedule_keeps_count():
    t = ReadvertiseTimer.start("svc", 300, now=0.0)
    t.fired(240.0)
    t.reschedule(10, now=250.0)
    assert t.ttl == 10.0 and t.interval == 8.0
    assert t.next_fire == 258.0
    assert t.count == 1 and t.last_fire == 240.0
    assert t.expires_in(250.0) == 10.0  # the entry published by the new advertise
    with pytest.raises(ValueError):
        t.reschedule(-1, now=251.0)
    assert t.ttl == 10.0  # unchanged by the refused reschedule


def test_snapshot():
    t = ReadvertiseTimer.start("svc", 300, now=100.0)
    s = t.snapshot(150.0)
    assert s == {
        "service": "svc",
        "ttl": 300.0,
        "interval": 240.0,
        "next_fire_in": 190.0,
        "last_fire_ago": None,
        "count": 0,
        "lateness_last": None,
        "lateness_mean": None,
        "lateness_max": None,
        "expires_in": 250.0,
    }
    t.fired(342.0)  # 2 s late
    t.fired(t.next_fire + 4.0)  # 4 s late, at 586
    s = t.snapshot(600.0)
    assert s["count"] == 2
    assert s["last_fire_ago"] == pytest.approx(14.0)
    assert s["next_fire_in"] == pytest.approx(586.0 + 240.0 - 600.0)
    assert s["lateness_last"] == pytest.approx(4.0)
    assert s["lateness_mean"] == pytest.approx(3.0)
    assert s["lateness_max"] == pytest.approx(4.0)
    assert s["expires_in"] == pytest.approx(586.0 + 300.0 - 600.0)
    assert t.snapshot(2000.0)["expires_in"] == 0.0  # lapsed: clamped


def test_expires_in_without_published_at_falls_back():
    t = ReadvertiseTimer("svc", 10.0, 8.0, created_at=0.0, next_fire=8.0)
    assert t.expires_in(3.0) == 7.0
    t.last_fire = 5.0
    assert t.expires_in(6.0) == 9.0
