"""The local test's expected output, from real events, in a lab with node ids ordered by name."""

from __future__ import annotations

from macula_lab.procedures.local import expected_output, ordered_id, start_local_lab


def test_ordered_ids():
    ids = [ordered_id(i, f"node-{i}") for i in (1, 2, 3)]
    assert ids == sorted(ids) and all(len(i) == 32 for i in ids)


async def test_expected_output(capsys):
    lab = await start_local_lab(3, realm="com.test.expected", sample_interval=None)
    try:
        report = await expected_output(lab, ttl=5.0)
        ads = [a for n in lab.nodes for a in (await n.inspect(["advertisements"]))["advertisements"]]
    finally:
        await lab.stop()
    out = capsys.readouterr().out
    assert report.passed, report.text()
    for line in (
        "Published service test.calculator to DHT",
        "Scheduled re-advertisement for test.calculator in 4 seconds",
        "Found 2 providers for service test.calculator in DHT",
        "[Node 1 Handler] Received call with args: {'operation': 'add', 'a': 10, 'b': 5}",
        'Node 2 SUCCESS! Received: {"result": 15, "node": "node-1"}',
    ):
        assert line in out
    assert ads == []  # it leaves the mesh clean for the checklist
