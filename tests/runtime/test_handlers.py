"""Built-in service handlers."""

from __future__ import annotations

import pytest

from macula_lab.runtime.handlers import BUILTINS, BadArguments, UnknownHandler, make_handler


def test_calculator_answers_as_the_seed_expects():
    calc = make_handler("calculator", "node-1")
    assert calc({"operation": "add", "a": 10, "b": 5}) == {"result": 15, "node": "node-1"}
    assert calc({"a": 2, "b": 3}) == {"result": 5, "node": "node-1"}  # add by default
    assert calc({"operation": "div", "a": 1, "b": 4})["result"] == 0.25


@pytest.mark.parametrize(
    "args", [None, {"a": 1}, {"a": "1", "b": 2}, {"a": True, "b": 2}, {"operation": "pow", "a": 1, "b": 2}]
)
def test_calculator_rejects_bad_args_by_name(args):
    with pytest.raises(BadArguments):
        make_handler("calculator", "n")(args)


async def test_other_builtins():
    assert make_handler("echo", "n")({"x": 1}) == {"echo": {"x": 1}, "node": "n"}
    assert make_handler("whoami", "n")(None) == {"node": "n"}
    assert await make_handler("sleep", "n")({"seconds": 0.01}) == {"slept": 0.01, "node": "n"}
    with pytest.raises(BadArguments):
        await make_handler("sleep", "n")({"seconds": 600})
    with pytest.raises(RuntimeError, match="always fails"):
        make_handler("fail", "n")(None)
    assert set(BUILTINS) == {"calculator", "echo", "whoami", "sleep", "fail"}


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(UnknownHandler, match="calculator"):
        make_handler("nope", "n")
