"""The rules of every parameter (core/params.py): what passes, what is refused, and that the field is named."""

from __future__ import annotations

import math

import pytest

from macula_lab.core import params
from macula_lab.core.endpoint import check_endpoint
from macula_lab.errors import InvalidEndpoint, InvalidField

NAN, INF = math.nan, math.inf

CASES = [
    # check, good values, bad values
    (params.check_ttl, [1, 1.0, 300, 86400], [0, -5, 0.999, 86400.5, 172800, NAN, INF, -INF, "300", True, None]),
    (params.check_timeout, [0.001, 5, 3600], [0, -1, 3600.1, NAN, INF, "5", False, None]),
    (params.check_cache_ttl, [0, 60, 86400], [-1, 86401, NAN, INF, "60"]),
    (params.check_readvertise_fraction, [0.05, 0.5, 0.8, 0.99], [0, 1, 1.5, -0.2, NAN, INF, "0.8", True, None]),
    (params.check_attempts, [1, 3, 100], [0, -7, 101, 1.5, "3", True, None]),
    (params.check_k, [1, 20, 256], [0, 257, 2.0, True]),
    (
        params.check_realm,
        ["com.test.lab", "io.macula", "local", "A.B-c_1"],
        ["", "a..b", ".a", "a.", "has space", "x" * 256, 5, None],
    ),
    (
        params.check_service_name,
        ["test.calculator", "math.add", "a", "a_b-c.d"],
        ["", "a..b", ".lead", "trail.", "slash/x", "has space", "x" * 256, None, 3],
    ),
    (params.check_node_name, ["node-1", "pod.7", "N_1"], ["", "-lead", "a b", "a/b", "x" * 65, None]),
    (params.check_watch_lease, [0.5, 10, 120], [0, -1, 120.5, NAN, INF, "10", None]),
    (params.check_watch_index, [0, 1, 2**63 - 1], [-1, 2**63, 1.5, "3", True, None]),
    (params.check_watch_change, ["stored", "removed", "expired"], ["added", "", None, 1]),
    (params.check_metadata, [None, {}, {"zone": "a", "n": 3}], [[], {1: "a"}, {"blob": b"x" * 5000}, {"f": object()}]),
]


@pytest.mark.parametrize(("check", "good", "bad"), CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_rules_accept_and_refuse_naming_the_field(check, good, bad):
    for value in good:
        check(value)
    for value in bad:
        with pytest.raises(InvalidField) as err:
            check(value, "the_field")
        assert err.value.field == "the_field" and err.value.code == "invalid_field"
        assert str(err.value).startswith("the_field: ")
        assert isinstance(err.value, ValueError)


def test_numbers_are_returned_as_floats_never_clamped():
    assert params.check_ttl(300) == 300.0 and isinstance(params.check_ttl(300), float)
    with pytest.raises(InvalidField):  # refused, not turned into 86400
        params.check_ttl(params.MAX_TTL * 2)


@pytest.mark.parametrize(
    "endpoint",
    [
        "quic://" + "a" * 64 + ".lab:9443",  # a 64-character DNS label: every dial would raise UnicodeError
        "quic://" + ".".join(["abcdefghi"] * 30) + ":1",  # a host over 253 characters
        "quic://bad host:1",
        "quic://x_y.lab:1" + "0" * 300,
        "mem://a b",
        "ftp://node-1:1",
        "",
        5,
    ],
)
def test_endpoints_that_cannot_be_dialled_are_refused(endpoint):
    with pytest.raises(InvalidEndpoint) as err:
        check_endpoint(endpoint, "advertise")
    assert err.value.field == "advertise" and isinstance(err.value, InvalidField)


def test_endpoints_are_returned_in_canonical_form():
    assert check_endpoint("node-1.lab:9443") == "quic://node-1.lab:9443"
    assert check_endpoint("quic://[::1]:5") == "quic://[::1]:5"
    assert check_endpoint("mem://node-2") == "mem://node-2"
    assert check_endpoint("quic://macula_node1:9443") == "quic://macula_node1:9443"  # compose container names
