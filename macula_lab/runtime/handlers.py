"""Built-in service handlers: what the testing guide's procedures advertise, ready to use.

Widgets offer them by name, ``macula-lab node --serve math.add=calculator``
advertises them from a node process, and procedures use them so every
deployment option runs the same handlers.  Each factory takes the name of the
node serving it, because the guide's expected reply names the provider:
``{"result": 15, "node": "node-1"}``.

    handler = make_handler("calculator", "node-1")
    handler({"operation": "add", "a": 10, "b": 5})  ->  {"result": 15, "node": "node-1"}
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from typing import Any

from ..errors import MaculaError


class UnknownHandler(MaculaError, ValueError):
    code = "unknown_handler"


class BadArguments(MaculaError, ValueError):
    """The caller's args do not fit the handler (reported to the caller as a RemoteError)."""

    code = "bad_arguments"


_OPERATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
}


def calculator(node: str) -> Callable[[Any], dict[str, Any]]:
    """``{"operation": "add"|"sub"|"mul"|"div", "a": x, "b": y}`` (operation defaults to add)."""

    def handle(args: Any) -> dict[str, Any]:
        if not isinstance(args, dict) or "a" not in args or "b" not in args:
            raise BadArguments('calculator expects {"a": number, "b": number, "operation": "add"}')
        op = args.get("operation", "add")
        if op not in _OPERATIONS:
            raise BadArguments(f"unknown operation {op!r}; one of {sorted(_OPERATIONS)}")
        a, b = args["a"], args["b"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b)):
            raise BadArguments("a and b must be numbers")
        return {"result": _OPERATIONS[op](a, b), "node": node}

    return handle


def echo(node: str) -> Callable[[Any], dict[str, Any]]:
    """Returns the args unchanged, with the provider's name."""
    return lambda args: {"echo": args, "node": node}


def whoami(node: str) -> Callable[[Any], dict[str, Any]]:
    """Ignores the args; answers which node served the call (selection experiments)."""
    return lambda args: {"node": node}


def sleep(node: str) -> Callable[[Any], Any]:
    """``{"seconds": s}``: answers after ``s`` seconds (timeouts, least-loaded experiments)."""

    async def handle(args: Any) -> dict[str, Any]:
        seconds = args.get("seconds", 0.1) if isinstance(args, dict) else 0.1
        if not isinstance(seconds, int | float) or not 0 <= seconds <= 60:
            raise BadArguments("seconds must be a number in [0, 60]")
        await asyncio.sleep(seconds)
        return {"slept": seconds, "node": node}

    return handle


def fail(node: str) -> Callable[[Any], Any]:
    """Always raises: shows how a handler's error reaches the caller (RemoteError)."""

    def handle(args: Any) -> Any:
        raise RuntimeError(f"{node}: this handler always fails")

    return handle


BUILTINS: dict[str, Callable[[str], Callable[[Any], Any]]] = {
    "calculator": calculator,
    "echo": echo,
    "whoami": whoami,
    "sleep": sleep,
    "fail": fail,
}


def make_handler(kind: str, node: str) -> Callable[[Any], Any]:
    """The built-in handler ``kind`` for the node named ``node``."""
    try:
        factory = BUILTINS[kind]
    except KeyError:
        raise UnknownHandler(f"no built-in handler {kind!r}; one of {sorted(BUILTINS)}") from None
    return factory(node)
