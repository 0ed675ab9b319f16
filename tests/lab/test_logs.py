"""lab.events and lab.errors: slice like lists, show as tables (issue 15, item 3)."""

from __future__ import annotations

import copy
import pickle
import re

from macula_lab import Lab
from macula_lab.lab.logs import SHOWN, RowLog


async def test_lab_events_slice_and_show_as_a_table():
    lab = await Lab.start(2, realm="com.test.lab", transport="memory", sample_interval=None)
    try:
        await lab.node("node-1").advertise("svc.logs", "whoami", ttl=30)
        await lab.node("node-2").call("svc.logs")
        await lab.sample()
        assert len(lab.events) >= 3
        tail = lab.events[-3:]
        assert isinstance(tail, RowLog) and list(tail) == list(lab.events)[-3:]
        assert lab.events[-1] == list(lab.events)[-1]  # an index still gives the row
        page = tail._repr_html_()
        assert page.count("<tr>") == 1 + 3 and "<th>kind</th>" in page
        # times read as a clock, not epoch floats
        assert re.search(r"<td>\d\d:\d\d:\d\d\.\d{3}</td>", page)
        assert "called" in repr(lab.events) and re.search(r"\n\d\d:\d\d:\d\d\.\d{3}  node-", repr(lab.events))
        assert lab.errors._repr_html_().startswith("<p><em>background errors: none")
    finally:
        await lab.stop()


def test_rowlog_keeps_its_bound_and_shows_only_the_newest():
    log = RowLog(maxlen=SHOWN + 10, columns=("at", "n"), title="events")
    for i in range(SHOWN + 20):
        log.append({"at": 0.0, "n": i})
    assert len(log) == SHOWN + 10 and log[0]["n"] == 10
    assert log[::-1][0]["n"] == SHOWN + 19
    assert f"newest {SHOWN} shown" in log._repr_html_() and log._repr_html_().count("<tr>") == SHOWN + 1
    assert copy.copy(log).maxlen == log.maxlen and pickle.loads(pickle.dumps(log)).columns == ("at", "n")
