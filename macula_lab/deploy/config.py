"""Configuration of a headless node (``macula-lab node``).

Containers and k3s pods configure nodes through the environment, people through
flags, so every option has both: the flag ``--<field-with-dashes>`` and the
environment variable ``MACULA_<FIELD>``.  Precedence is

    command-line flag  >  environment variable  >  built-in default

The parser built by :func:`add_node_arguments` leaves every option at ``None``
unless the flag is given; :func:`config_from_args` then falls back to the
environment, so both sources go through the same parsing and the same error
messages (naming the flag *and* the variable).

Rules worth knowing:

* An empty environment variable counts as unset, except ``MACULA_HEALTH_LISTEN``
  where ``""`` (like ``off``) disables the health server.
* ``MACULA_BOOTSTRAP`` is a comma- or whitespace-separated list; ``--bootstrap``
  may be repeated and each value may itself be a comma list.  Flags replace the
  environment's list, they do not extend it.
* ``MACULA_SERVE`` / ``--serve`` lists built-in services the node advertises
  once it is ready, as ``name=kind`` pairs (comma or whitespace separated,
  ``--serve`` repeatable): ``math.add=calculator,test.calculator=calculator``.
  Kinds are those of :mod:`macula_lab.runtime.handlers` (calculator, echo, whoami,
  sleep, fail); an unknown kind or a bad service name is a config error at
  startup.  ``MACULA_SERVICE_TTL`` (seconds, default 300) is their TTL.
* ``MACULA_CERTS_DIR`` / ``--certs-dir`` fills in, one by one, whichever of
  cert, key and ca is not set: ``<dir>/<name>.pem``, ``<dir>/<name>.key`` and
  ``<dir>/ca.pem``.
* ``advertise`` (what other nodes dial) defaults to ``listen`` with a wildcard
  host (``0.0.0.0``, ``::``) replaced by this host's name (``socket.gethostname()``),
  not by 127.0.0.1: a loopback address in the DHT would make every other node
  dial itself, while the host name is what Compose and k8s peers can usually
  resolve.  Set it explicitly whenever that is not so (for a k3s StatefulSet:
  ``quic://$(POD_NAME).<headless-service>:9443``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core import params
from ..core.codec import DEFAULT_MAX_FRAME_SIZE
from ..core.endpoint import Endpoint, parse_endpoint, parse_host_port
from ..errors import InvalidEndpoint, InvalidField
from ..runtime.handlers import BUILTINS

__all__ = [
    "ConfigError",
    "NodeConfig",
    "add_node_arguments",
    "config_from_args",
    "config_from_env",
    "env_var",
    "flag",
    "parse_host_port",
]

ENV_PREFIX = "MACULA_"
CERTS_DIR_ENV = "MACULA_CERTS_DIR"
DEFAULT_REALM = params.DEFAULT_REALM
DEFAULT_LISTEN = "quic://0.0.0.0:9443"
DEFAULT_HEALTH_LISTEN = "0.0.0.0:8080"
HEALTH_OFF = ("", "off")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MAX_FRAME_LIMIT = 0xFFFFFFFF  # the frame header's length field is 32 bits

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NODE_ID_RE = re.compile(r"[0-9a-fA-F]{64}")
_LIST_SPLIT_RE = re.compile(r"[\s,]+")


class ConfigError(InvalidField):
    """A node option has a bad value; the message names its flag and environment variable.

    An :class:`~macula_lab.errors.InvalidField` whose ``field`` is the option: the
    same rules (:mod:`macula_lab.core.params`) and the same error as everywhere else.
    """

    code = "config_error"

    def __init__(self, message: str, *, option: str | None = None, env: str | None = None):
        super().__init__(message, field=option)
        self.option = option
        self.env = env


def flag(option: str) -> str:
    """The command-line flag of an option: ``request_timeout`` -> ``--request-timeout``."""
    return "--" + option.replace("_", "-")


def env_var(option: str) -> str:
    """The environment variable of an option: ``request_timeout`` -> ``MACULA_REQUEST_TIMEOUT``."""
    return ENV_PREFIX + option.upper()


def _error(option: str, message: str) -> ConfigError:
    return ConfigError(
        f"{option}: {message} (set with {flag(option)} or {env_var(option)})",
        option=option,
        env=env_var(option),
    )


def _default_name(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get("HOSTNAME") or socket.gethostname()


# ---------------------------------------------------------------- the config
@dataclass
class NodeConfig:
    """Everything a headless node needs to start; see the module docstring for sources."""

    name: str = field(default_factory=_default_name)
    realm: str = DEFAULT_REALM
    listen: str = DEFAULT_LISTEN
    advertise: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    insecure: bool = False
    health_listen: str = DEFAULT_HEALTH_LISTEN
    log_level: str = "INFO"
    node_id: str | None = None
    admin_token: str | None = field(default=None, repr=False)  # a secret: keep it out of logs
    admin_token_file: str | None = None
    k: int = params.DEFAULT_K
    alpha: int = params.DEFAULT_ALPHA
    request_timeout: float = params.DEFAULT_REQUEST_TIMEOUT
    connect_timeout: float = params.DEFAULT_CONNECT_TIMEOUT
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    serve: dict[str, str] = field(default_factory=dict)  # service name -> built-in handler kind
    service_ttl: float = params.DEFAULT_TTL

    def validate(self) -> NodeConfig:
        """Check every option; raise :class:`ConfigError` on the first bad one, else return self."""
        for check in _CHECKS:
            check(self)
        return self

    @property
    def advertise_endpoint(self) -> str:
        """The endpoint other nodes should dial (``advertise``, or derived from ``listen``).

        With ``listen`` on port 0 the derived port is 0 too: the runtime, which
        knows the bound port, has to substitute it.
        """
        if self.advertise:
            return str(parse_endpoint(self.advertise))
        listen = parse_endpoint(self.listen)
        if listen.scheme == "quic" and listen.host in WILDCARD_HOSTS:
            listen = listen._replace(host=socket.gethostname())
        return str(listen)

    @property
    def health_address(self) -> tuple[str, int] | None:
        """``(host, port)`` for the health server, or None when it is disabled."""
        if self.health_listen.strip().lower() in HEALTH_OFF:
            return None
        return parse_host_port(self.health_listen)

    def redacted(self) -> dict[str, Any]:
        """The options as a dict for logs and status pages, with the admin token masked."""
        values = asdict(self)
        if values["admin_token"]:
            values["admin_token"] = "***"
        return values


# ---------------------------------------------------------------- validation
def _rule(option: str, check, value):
    """Apply a :mod:`~macula_lab.core.params` rule; its error names the flag and the variable."""
    try:
        return check(value, option)
    except InvalidField as exc:
        message = str(exc).removeprefix(f"{option}: ")
        raise _error(option, message) from None


def _check_name(cfg: NodeConfig) -> None:
    # the name also names certificate files, so keep it to one path component
    _rule("name", params.check_node_name, cfg.name)


def _check_realm(cfg: NodeConfig) -> None:
    _rule("realm", params.check_realm, cfg.realm)


def _endpoint(option: str, text: object) -> Endpoint:
    try:
        return parse_endpoint(text)  # type: ignore[arg-type]  # non-strings are refused there
    except InvalidEndpoint as exc:
        raise _error(option, str(exc)) from None


def _check_endpoints(cfg: NodeConfig) -> None:
    _endpoint("listen", cfg.listen)
    if cfg.advertise is not None:
        ep = _endpoint("advertise", cfg.advertise)
        if ep.scheme == "quic" and ep.host in WILDCARD_HOSTS:
            raise _error("advertise", f"must be an address other nodes can dial, not {cfg.advertise!r}")
    if isinstance(cfg.bootstrap, str) or not isinstance(cfg.bootstrap, list):
        raise _error("bootstrap", f"expected a list of endpoints, got {cfg.bootstrap!r}")
    for peer in cfg.bootstrap:
        _endpoint("bootstrap", peer)


def _check_node_id(cfg: NodeConfig) -> None:
    if cfg.node_id is not None and not (isinstance(cfg.node_id, str) and _NODE_ID_RE.fullmatch(cfg.node_id)):
        raise _error("node_id", f"expected 64 hex characters (256 bits), got {cfg.node_id!r}")


def _check_tls(cfg: NodeConfig) -> None:
    if cfg.cert and not cfg.key:
        raise _error("key", "a certificate (--cert) needs its private key")
    if cfg.key and not cfg.cert:
        raise _error("cert", "a private key (--key) needs its certificate")
    if not isinstance(cfg.insecure, bool):
        raise _error("insecure", f"expected true or false, got {cfg.insecure!r}")


def _check_health_listen(cfg: NodeConfig) -> None:
    try:
        if not isinstance(cfg.health_listen, str):
            raise ValueError(f"expected text, got {cfg.health_listen!r}")
        if cfg.health_listen.strip().lower() not in HEALTH_OFF:
            parse_host_port(cfg.health_listen)
    except ValueError as exc:
        raise _error("health_listen", f"{exc}; use host:port, or 'off' to disable") from None


def _check_log_level(cfg: NodeConfig) -> None:
    levels = logging.getLevelNamesMapping()
    if not isinstance(cfg.log_level, str) or cfg.log_level.upper() not in levels:
        raise _error("log_level", f"expected one of {', '.join(levels)}, got {cfg.log_level!r}")


def _check_numbers(cfg: NodeConfig) -> None:
    _rule("k", params.check_k, cfg.k)
    _rule("alpha", params.check_alpha, cfg.alpha)
    for option in ("request_timeout", "connect_timeout"):
        _rule(option, params.check_timeout, getattr(cfg, option))
    size = cfg.max_frame_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_FRAME_LIMIT:
        raise _error("max_frame_size", f"must be an integer of bytes in 1..{MAX_FRAME_LIMIT}, got {size!r}")


def _check_serve(cfg: NodeConfig) -> None:
    if not isinstance(cfg.serve, dict):
        raise _error("serve", f"expected name=kind pairs, got {cfg.serve!r}")
    for name, kind in cfg.serve.items():
        _rule("serve", params.check_service_name, name)
        if kind not in BUILTINS:
            raise _error("serve", f"unknown handler kind {kind!r} for {name}; one of {', '.join(BUILTINS)}")
    _rule("service_ttl", params.check_ttl, cfg.service_ttl)


_CHECKS: tuple[Callable[[NodeConfig], None], ...] = (
    _check_name,
    _check_realm,
    _check_endpoints,
    _check_node_id,
    _check_tls,
    _check_health_listen,
    _check_log_level,
    _check_numbers,
    _check_serve,
)


# ---------------------------------------------------------------- text -> values
# Parsers take the text of a flag or variable (or an already-typed value, for
# namespaces built by hand) and raise ValueError with the reason.
def _text(value: Any) -> str:
    return str(value).strip()


def _optional_text(value: Any) -> str | None:
    return _text(value) or None


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected one of {'/'.join(_TRUE + _FALSE)}")


def _integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(_text(value))


def _number(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return float(_text(value))


def _endpoint_list(value: Any) -> list[str]:
    parts: Iterable[Any] = [value] if isinstance(value, str) else value
    return [p for part in parts for p in _LIST_SPLIT_RE.split(str(part)) if p]


def _services(value: Any) -> dict[str, str]:
    """``name=kind`` pairs (a string or a list of strings, each a comma list) -> {name: kind}."""
    if isinstance(value, dict):
        return dict(value)
    served: dict[str, str] = {}
    for pair in _endpoint_list(value):
        name, sep, kind = pair.partition("=")
        if not sep or not name or not kind:
            raise ValueError(f"expected name=kind (like math.add=calculator), got {pair!r}")
        if name in served and served[name] != kind:
            raise ValueError(f"{name} given twice ({served[name]} and {kind})")
        served[name] = kind
    return served


def _log_level(value: Any) -> str:
    return _text(value).upper()


@dataclass(frozen=True)
class _Option:
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None


_OPTIONS: dict[str, _Option] = {
    "name": _Option(_text, "node name, unique in the mesh; also names its certificate files", "NAME"),
    "realm": _Option(_text, "realm (reverse-DNS) shared by the nodes of one mesh", "REALM"),
    "listen": _Option(_text, "QUIC endpoint to listen on", "URL"),
    "advertise": _Option(_optional_text, "endpoint other nodes dial to reach this node", "URL"),
    "bootstrap": _Option(
        _endpoint_list, "peer endpoint to join through; repeat or give a comma list", "URL[,URL...]"
    ),
    "cert": _Option(_optional_text, "PEM certificate of this node", "FILE"),
    "key": _Option(_optional_text, "PEM private key of this node", "FILE"),
    "ca": _Option(_optional_text, "PEM CA bundle that peer certificates must chain to", "FILE"),
    "insecure": _Option(_boolean, "turn OFF peer certificate verification (lab use only)"),
    "health_listen": _Option(_text, "host:port of the HTTP health server, or 'off'", "HOST:PORT"),
    "log_level": _Option(_log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL", "LEVEL"),
    "node_id": _Option(_optional_text, "fixed node id, 64 hex characters (default: random)", "HEX"),
    "admin_token": _Option(
        _optional_text,
        "token required by admin requests; prefer the variable or --admin-token-file "
        "(a flag's value is visible in the process list)",
        "TOKEN",
    ),
    "admin_token_file": _Option(_optional_text, "file holding the admin token (a mounted secret)", "FILE"),
    "k": _Option(_integer, "Kademlia bucket size and replication factor", "N"),
    "alpha": _Option(_integer, "Kademlia lookup parallelism", "N"),
    "request_timeout": _Option(_number, "seconds to wait for a reply", "SECONDS"),
    "connect_timeout": _Option(_number, "seconds to wait for a QUIC/TLS handshake", "SECONDS"),
    "max_frame_size": _Option(_integer, "largest frame payload accepted, in bytes", "BYTES"),
    "serve": _Option(
        _services,
        "built-in service to advertise once ready, NAME=KIND (kinds: calculator, echo, whoami, "
        "sleep, fail); repeat or give a comma list",
        "NAME=KIND[,...]",
    ),
    "service_ttl": _Option(_number, "TTL of the --serve advertisements", "SECONDS"),
}


def _from_env(environ: Mapping[str, str], option: str) -> str | None:
    value = environ.get(env_var(option))
    if value is None or (not value.strip() and option != "health_listen"):
        return None  # empty means unset: manifests often carry "KEY: ''" placeholders
    return value


# ---------------------------------------------------------------- sources
def _resolve(cli: Mapping[str, Any], environ: Mapping[str, str]) -> NodeConfig:
    """Build a config from flag values (None = not given) over the environment."""
    values: dict[str, Any] = {}
    for option, spec in _OPTIONS.items():
        raw, source = cli.get(option), flag(option)
        if raw is None:
            raw, source = _from_env(environ, option), env_var(option)
        if raw is None:
            continue
        try:
            values[option] = spec.parse(raw)
        except ValueError as exc:
            raise _error(option, f"bad value {raw!r} from {source}: {exc}") from None
    values.setdefault("name", _default_name(environ))
    if values.get("admin_token_file"):
        if values.get("admin_token"):
            raise _error("admin_token_file", "give the admin token or a file holding it, not both")
        values["admin_token"] = _read_secret("admin_token_file", values["admin_token_file"])
    config = NodeConfig(**values)
    certs_dir = cli.get("certs_dir") or environ.get(CERTS_DIR_ENV, "").strip()
    if certs_dir:
        _fill_from_certs_dir(config, certs_dir)
    return config


def _read_secret(option: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except OSError as exc:
        raise _error(option, f"cannot read {path}: {exc.strerror or exc}") from None
    if not secret:
        raise _error(option, f"{path} is empty")
    return secret


def _fill_from_certs_dir(config: NodeConfig, certs_dir: str) -> None:
    # an explicit file (flag or variable) always beats the directory convention
    config.cert = config.cert or os.path.join(certs_dir, f"{config.name}.pem")
    config.key = config.key or os.path.join(certs_dir, f"{config.name}.key")
    config.ca = config.ca or os.path.join(certs_dir, "ca.pem")


def config_from_env(environ: Mapping[str, str] | None = None) -> NodeConfig:
    """The configuration given by ``MACULA_*`` variables (and built-in defaults).

    Raises :class:`ConfigError` for text that does not parse (``MACULA_K=ten``);
    call :meth:`NodeConfig.validate` for the value checks.
    """
    return _resolve({}, os.environ if environ is None else environ)


def config_from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """The configuration given by parsed flags, falling back to the environment, then defaults."""
    cli = {option: getattr(ns, option, None) for option in (*_OPTIONS, "certs_dir")}
    return _resolve(cli, os.environ if environ is None else environ)


def _default_text(option: str) -> str:
    if option == "name":
        return "$HOSTNAME or the host name"
    if option == "advertise":
        return "derived from --listen"
    if option == "serve":
        return "none"
    default = NodeConfig.__dataclass_fields__[option].default
    return "none" if default is None or default is dataclasses.MISSING else str(default)


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the node options to ``parser``; every default is None, resolved by :func:`config_from_args`."""
    group = parser.add_argument_group("node options", "each flag overrides its MACULA_* variable")
    for option, spec in _OPTIONS.items():
        help_text = f"{spec.help} [env {env_var(option)}; default: {_default_text(option)}]"
        if option == "insecure":
            group.add_argument(
                flag(option), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif option in ("bootstrap", "serve"):
            group.add_argument(
                flag(option), action="append", default=None, metavar=spec.metavar, help=help_text
            )
        else:
            group.add_argument(flag(option), default=None, metavar=spec.metavar, help=help_text)
    group.add_argument(
        "--certs-dir",
        default=None,
        metavar="DIR",
        help=f"directory holding <name>.pem, <name>.key and ca.pem, used for whichever of "
        f"--cert/--key/--ca is not set [env {CERTS_DIR_ENV}]",
    )
