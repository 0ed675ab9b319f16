import pytest

from macula_lab.core.endpoint import DEFAULT_PORT, Endpoint, normalize_endpoint, parse_endpoint
from macula_lab.errors import InvalidEndpoint


@pytest.mark.parametrize(
    "text, expected",
    [
        ("quic://127.0.0.1:9443", Endpoint("quic", "127.0.0.1", 9443)),
        ("https://node-1.lab:7000", Endpoint("quic", "node-1.lab", 7000)),
        ("quic://[::1]:4433", Endpoint("quic", "::1", 4433)),
        ("node-2:1234", Endpoint("quic", "node-2", 1234)),
        ("quic://host", Endpoint("quic", "host", DEFAULT_PORT)),
        ("https://host", Endpoint("quic", "host", DEFAULT_PORT)),  # 9443 everywhere, never 443
        ("mem://node-7", Endpoint("mem", "node-7", 0)),
    ],
)
def test_parse(text, expected):
    assert parse_endpoint(text) == expected


def test_format_round_trips():
    for text in ("quic://127.0.0.1:9443", "quic://[::1]:4433", "mem://a"):
        assert str(parse_endpoint(text)) == text
    assert normalize_endpoint("https://x:1") == "quic://x:1"


@pytest.mark.parametrize(
    "text", ["", "   ", "ftp://x:1", "quic://:9443", "quic://h:99999", "quic://h:1/path", "mem://", None, 5]
)
def test_bad_endpoints_are_named_errors(text):
    with pytest.raises(InvalidEndpoint):
        parse_endpoint(text)
