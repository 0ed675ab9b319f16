"""NodeConfig: defaults, environment, flags, precedence, validation messages."""

from __future__ import annotations

import argparse
import os
import socket

import pytest

from macula_lab.deploy.config import (
    ConfigError,
    NodeConfig,
    add_node_arguments,
    config_from_args,
    config_from_env,
    parse_host_port,
)
from macula_lab.errors import MaculaError

NODE_ID = "0123456789abcdef" * 4


def parse(argv: list[str], environ: dict[str, str] | None = None) -> NodeConfig:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ if environ is not None else {})


# ------------------------------------------------------------------ defaults
def test_defaults() -> None:
    cfg = config_from_env({"HOSTNAME": "pod-7"})
    assert cfg == NodeConfig(name="pod-7")
    assert cfg.realm == "com.test.lab"  # one default realm for nodes, labs and the CLI (core/params.py)
    assert cfg.listen == "quic://0.0.0.0:9443"
    assert cfg.advertise is None and cfg.bootstrap == []
    assert (cfg.cert, cfg.key, cfg.ca, cfg.node_id, cfg.admin_token) == (None,) * 5
    assert cfg.insecure is False
    assert cfg.health_listen == "0.0.0.0:8080"
    assert cfg.log_level == "INFO"
    assert (cfg.k, cfg.alpha) == (20, 3)
    assert (cfg.request_timeout, cfg.connect_timeout) == (5.0, 5.0)
    assert cfg.max_frame_size == 1048576
    assert cfg.validate() is cfg


def test_name_defaults_to_hostname_env_then_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_env({}).name == socket.gethostname()
    monkeypatch.setenv("HOSTNAME", "from-env")
    assert NodeConfig().name == "from-env"
    assert config_from_env({"HOSTNAME": "h", "MACULA_NAME": "n"}).name == "n"


def test_config_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACULA_REALM", "io.macula.test")
    assert config_from_env().realm == "io.macula.test"


def test_admin_token_is_kept_out_of_repr_and_redacted() -> None:
    cfg = NodeConfig(name="n", admin_token="s3cret")
    assert "s3cret" not in repr(cfg)
    assert cfg.redacted()["admin_token"] == "***"
    assert NodeConfig(name="n").redacted()["admin_token"] is None


# ------------------------------------------------------------------ environment
def test_every_option_from_env() -> None:
    env = {
        "MACULA_NAME": "node-1",
        "MACULA_REALM": "io.macula.lab",
        "MACULA_LISTEN": "quic://0.0.0.0:7000",
        "MACULA_ADVERTISE": "quic://node-1.macula:7000",
        "MACULA_BOOTSTRAP": "quic://a:1, quic://b:2\n quic://c:3",
        "MACULA_CERT": "/tls/n.pem",
        "MACULA_KEY": "/tls/n.key",
        "MACULA_CA": "/tls/ca.pem",
        "MACULA_INSECURE": "yes",
        "MACULA_HEALTH_LISTEN": "127.0.0.1:9000",
        "MACULA_LOG_LEVEL": "debug",
        "MACULA_NODE_ID": NODE_ID,
        "MACULA_ADMIN_TOKEN": "tok",
        "MACULA_K": "8",
        "MACULA_ALPHA": "2",
        "MACULA_REQUEST_TIMEOUT": "1.5",
        "MACULA_CONNECT_TIMEOUT": "0.25",
        "MACULA_MAX_FRAME_SIZE": "65536",
    }
    cfg = config_from_env(env).validate()
    assert cfg == NodeConfig(
        name="node-1",
        realm="io.macula.lab",
        listen="quic://0.0.0.0:7000",
        advertise="quic://node-1.macula:7000",
        bootstrap=["quic://a:1", "quic://b:2", "quic://c:3"],
        cert="/tls/n.pem",
        key="/tls/n.key",
        ca="/tls/ca.pem",
        insecure=True,
        health_listen="127.0.0.1:9000",
        log_level="DEBUG",
        node_id=NODE_ID,
        admin_token="tok",
        k=8,
        alpha=2,
        request_timeout=1.5,
        connect_timeout=0.25,
        max_frame_size=65536,
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
    ],
)
def test_insecure_boolean_text(text: str, value: bool) -> None:
    assert config_from_env({"MACULA_NAME": "n", "MACULA_INSECURE": text}).insecure is value


@pytest.mark.parametrize(
    ("var", "text"),
    [
        ("MACULA_INSECURE", "maybe"),
        ("MACULA_K", "ten"),
        ("MACULA_ALPHA", "2.5"),
        ("MACULA_REQUEST_TIMEOUT", "soon"),
        ("MACULA_MAX_FRAME_SIZE", "1MB"),
    ],
)
def test_unparsable_env_text_names_flag_and_variable(var: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env({"MACULA_NAME": "n", var: text})
    option = var.removeprefix("MACULA_").lower()
    message = str(info.value)
    assert var in message and "--" + option.replace("_", "-") in message and repr(text) in message
    assert (info.value.option, info.value.env, info.value.code) == (option, var, "config_error")


def test_empty_env_values_count_as_unset() -> None:
    cfg = config_from_env({"MACULA_NAME": "n", "MACULA_ADVERTISE": "", "MACULA_K": " ", "MACULA_CERT": ""})
    assert (cfg.advertise, cfg.k, cfg.cert) == (None, 20, None)


@pytest.mark.parametrize("text", ["", "off", "OFF"])
def test_health_listen_can_be_disabled(text: str) -> None:
    cfg = config_from_env({"MACULA_NAME": "n", "MACULA_HEALTH_LISTEN": text}).validate()
    assert cfg.health_address is None


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":9000", ("0.0.0.0", 9000)),
        ("9000", ("0.0.0.0", 9000)),
        ("[::]:8080", ("::", 8080)),
        ("health.local:80", ("health.local", 80)),
    ],
)
def test_health_address(text: str, address: tuple[str, int]) -> None:
    assert parse_host_port(text) == address
    assert NodeConfig(name="n", health_listen=text).validate().health_address == address


# ------------------------------------------------------------------ bootstrap lists
@pytest.mark.parametrize(
    ("text", "peers"),
    [
        ("quic://a:1", ["quic://a:1"]),
        ("quic://a:1,quic://b:2", ["quic://a:1", "quic://b:2"]),
        ("quic://a:1 quic://b:2", ["quic://a:1", "quic://b:2"]),
        (" quic://a:1 ,, quic://b:2,\tquic://c:3 ", ["quic://a:1", "quic://b:2", "quic://c:3"]),
        (",", []),
    ],
)
def test_bootstrap_env_list(text: str, peers: list[str]) -> None:
    assert config_from_env({"MACULA_NAME": "n", "MACULA_BOOTSTRAP": text}).bootstrap == peers


def test_bootstrap_flag_repeats_and_accepts_comma_lists() -> None:
    cfg = parse(["--bootstrap", "quic://a:1,quic://b:2", "--bootstrap", "quic://c:3"])
    assert cfg.bootstrap == ["quic://a:1", "quic://b:2", "quic://c:3"]


def test_bootstrap_flag_replaces_env_list() -> None:
    cfg = parse(["--bootstrap", "quic://cli:1"], {"MACULA_BOOTSTRAP": "quic://env:1,quic://env:2"})
    assert cfg.bootstrap == ["quic://cli:1"]


# ------------------------------------------------------------------ precedence
@pytest.mark.parametrize(
    ("option", "cli", "env", "default", "expected_cli", "expected_env"),
    [
        ("realm", "cli.realm", "env.realm", "com.test.lab", "cli.realm", "env.realm"),
        ("listen", "quic://0.0.0.0:1", "quic://0.0.0.0:2", "quic://0.0.0.0:9443", None, None),
        ("k", "7", "9", 20, 7, 9),
        ("request_timeout", "0.5", "2", 5.0, 0.5, 2.0),
        ("log_level", "warning", "error", "INFO", "WARNING", "ERROR"),
        ("health_listen", "off", "1.2.3.4:5", "0.0.0.0:8080", None, None),
        ("node_id", NODE_ID, "f" * 64, None, None, None),
    ],
)
def test_precedence_flag_over_env_over_default(
    option: str, cli: str, env: str, default: object, expected_cli: object, expected_env: object
) -> None:
    flag = "--" + option.replace("_", "-")
    var = "MACULA_" + option.upper()
    expected_cli = cli if expected_cli is None else expected_cli
    expected_env = env if expected_env is None else expected_env
    base = {"MACULA_NAME": "n"}
    assert getattr(parse([flag, cli], {**base, var: env}), option) == expected_cli
    assert getattr(parse([], {**base, var: env}), option) == expected_env
    assert getattr(parse([], base), option) == default


def test_insecure_flag_precedence() -> None:
    env = {"MACULA_NAME": "n", "MACULA_INSECURE": "true"}
    assert parse([], env).insecure is True
    assert parse(["--no-insecure"], env).insecure is False
    assert parse(["--insecure"], {"MACULA_NAME": "n"}).insecure is True
    assert parse([], {"MACULA_NAME": "n"}).insecure is False


def test_config_from_args_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACULA_ALPHA", "5")
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    assert config_from_args(parser.parse_args([])).alpha == 5
    assert config_from_args(parser.parse_args(["--alpha", "4"])).alpha == 4


def test_unparsable_flag_names_flag_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"--k.*MACULA_K|MACULA_K.*--k"):
        parse(["--k", "many"])


def test_every_flag_help_names_its_env_var() -> None:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == {*NodeConfig.__dataclass_fields__, "certs_dir"}
    for dest, action in actions.items():
        assert f"MACULA_{dest.upper()}" in action.help, dest
        assert action.default is None  # resolved later, so the environment can fill it


# ------------------------------------------------------------------ certificates directory
def test_certs_dir_from_env_derives_files_from_name() -> None:
    cfg = config_from_env({"MACULA_NAME": "node-2", "MACULA_CERTS_DIR": "/certs"})
    assert (cfg.cert, cfg.key, cfg.ca) == ("/certs/node-2.pem", "/certs/node-2.key", "/certs/ca.pem")
    cfg.validate()


def test_certs_dir_flag_and_explicit_files_win() -> None:
    env = {"MACULA_NAME": "node-2", "MACULA_CERTS_DIR": "/env-certs", "MACULA_CA": "/other/ca.pem"}
    cfg = parse(["--certs-dir", "/cli-certs"], env)
    assert cfg.cert == os.path.join("/cli-certs", "node-2.pem")
    assert cfg.key == os.path.join("/cli-certs", "node-2.key")
    assert cfg.ca == "/other/ca.pem"
    cfg = parse(["--cert", "/x/c.pem", "--key", "/x/c.key"], env)
    assert (cfg.cert, cfg.key, cfg.ca) == ("/x/c.pem", "/x/c.key", "/other/ca.pem")


def test_no_certs_dir_leaves_files_unset() -> None:
    cfg = config_from_env({"MACULA_NAME": "n", "MACULA_CERTS_DIR": ""})
    assert (cfg.cert, cfg.key, cfg.ca) == (None, None, None)


# ------------------------------------------------------------------ advertise
def test_advertise_derived_from_listen_replaces_wildcards() -> None:
    host = socket.gethostname()
    assert NodeConfig(name="n").advertise_endpoint == f"quic://{host}:9443"
    assert NodeConfig(name="n", listen="quic://[::]:7000").advertise_endpoint == f"quic://{host}:7000"
    assert NodeConfig(name="n", listen="quic://10.0.0.5:7000").advertise_endpoint == "quic://10.0.0.5:7000"
    assert NodeConfig(name="n", listen="mem://n1").advertise_endpoint == "mem://n1"


def test_explicit_advertise_is_used_and_normalised() -> None:
    cfg = NodeConfig(name="n", advertise="node-1.macula:9443")
    assert cfg.advertise_endpoint == "quic://node-1.macula:9443"


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("option", "overrides"),
    [
        ("name", {"name": ""}),
        ("name", {"name": "a/b"}),
        ("realm", {"realm": ""}),
        ("realm", {"realm": "com..example"}),
        ("realm", {"realm": ".com.example"}),
        ("realm", {"realm": "com.example."}),
        ("realm", {"realm": "com.exa mple"}),
        ("realm", {"realm": "com/example"}),
        ("listen", {"listen": "http://0.0.0.0:1"}),
        ("listen", {"listen": "quic://host:99999"}),
        ("listen", {"listen": ""}),
        ("advertise", {"advertise": "quic://:1"}),
        ("advertise", {"advertise": "quic://0.0.0.0:9443"}),
        ("bootstrap", {"bootstrap": ["quic://ok:1", "ftp://bad:2"]}),
        ("bootstrap", {"bootstrap": "quic://a:1"}),
        ("node_id", {"node_id": "abc"}),
        ("node_id", {"node_id": "g" * 64}),
        ("node_id", {"node_id": "a" * 65}),
        ("key", {"cert": "/c.pem"}),
        ("cert", {"key": "/c.key"}),
        ("insecure", {"insecure": "yes"}),
        ("health_listen", {"health_listen": "nowhere"}),
        ("health_listen", {"health_listen": "0.0.0.0:70000"}),
        ("health_listen", {"health_listen": ":::8080"}),
        ("log_level", {"log_level": "LOUD"}),
        ("k", {"k": 0}),
        ("k", {"k": -3}),
        ("alpha", {"alpha": 0}),
        ("request_timeout", {"request_timeout": 0}),
        ("request_timeout", {"request_timeout": -1.0}),
        ("request_timeout", {"request_timeout": float("nan")}),
        ("connect_timeout", {"connect_timeout": 0.0}),
        ("connect_timeout", {"connect_timeout": float("inf")}),
        ("max_frame_size", {"max_frame_size": 0}),
        ("max_frame_size", {"max_frame_size": 1 << 32}),
    ],
)
def test_validation_errors_name_option_and_env_var(option: str, overrides: dict) -> None:
    cfg = NodeConfig(name="n")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    err = info.value
    message = str(err)
    assert "--" + option.replace("_", "-") in message
    assert "MACULA_" + option.upper() in message
    assert (err.option, err.env) == (option, "MACULA_" + option.upper())
    assert isinstance(err, MaculaError) and err.code == "config_error"


@pytest.mark.parametrize("realm", ["com.example.realm", "io.macula", "local", "com.my-org.lab_1", "A.B.C"])
def test_valid_realms(realm: str) -> None:
    NodeConfig(name="n", realm=realm).validate()


def test_valid_tls_and_ids() -> None:
    NodeConfig(
        name="n",
        cert="/c.pem",
        key="/c.key",
        ca="/ca.pem",
        node_id=NODE_ID.upper(),
        advertise="quic://[fd00::1]:9443",
        bootstrap=["quic://a:1", "b.example:9443", "mem://peer"],
        log_level="warning",
        request_timeout=1,
    ).validate()
    NodeConfig(name="n", ca="/ca.pem").validate()  # verify peers without a client certificate


# ------------------------------------------------------------------ built-in services (--serve)
def test_serve_from_env_is_a_name_kind_list() -> None:
    env = {"MACULA_SERVE": "math.add=calculator, test.calculator=calculator\n who=whoami"}
    cfg = config_from_env(env).validate()
    assert cfg.serve == {"math.add": "calculator", "test.calculator": "calculator", "who": "whoami"}
    assert cfg.service_ttl == 300.0
    assert config_from_env({}).serve == {}


def test_serve_flag_repeats_takes_comma_lists_and_replaces_env() -> None:
    env = {"MACULA_SERVE": "from.env=echo"}
    cfg = parse(["--serve", "a=echo,b=fail", "--serve", "c=sleep"], env).validate()
    assert cfg.serve == {"a": "echo", "b": "fail", "c": "sleep"}
    assert parse([], env).serve == {"from.env": "echo"}


def test_service_ttl_from_env_and_flag() -> None:
    assert config_from_env({"MACULA_SERVICE_TTL": "2.5"}).validate().service_ttl == 2.5
    assert parse(["--service-ttl", "7"], {"MACULA_SERVICE_TTL": "2.5"}).service_ttl == 7.0


@pytest.mark.parametrize(
    ("env", "option", "reason"),
    [
        ({"MACULA_SERVE": "math.add=calc"}, "serve", "unknown handler kind 'calc'"),
        ({"MACULA_SERVE": "math.add"}, "serve", "expected name=kind"),
        ({"MACULA_SERVE": "=calculator"}, "serve", "expected name=kind"),
        ({"MACULA_SERVE": "bad..name=echo"}, "serve", "service names are dot-separated"),
        ({"MACULA_SERVE": "a=echo,a=fail"}, "serve", "given twice"),
        ({"MACULA_SERVICE_TTL": "0"}, "service_ttl", ">= 1 and <= 86400"),
        ({"MACULA_SERVICE_TTL": "-3"}, "service_ttl", ">= 1 and <= 86400"),
        ({"MACULA_SERVICE_TTL": "172800"}, "service_ttl", ">= 1 and <= 86400"),
        ({"MACULA_SERVICE_TTL": "inf"}, "service_ttl", "finite"),
        ({"MACULA_SERVICE_TTL": "soon"}, "service_ttl", "bad value"),
    ],
)
def test_bad_serve_options_are_config_errors(env: dict, option: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env(env).validate()
    message = str(info.value)
    assert reason in message
    assert flag_of(option) in message and "MACULA_" + option.upper() in message


def test_serve_duplicate_with_same_kind_is_fine() -> None:
    assert config_from_env({"MACULA_SERVE": "a=echo a=echo"}).validate().serve == {"a": "echo"}


def flag_of(option: str) -> str:
    return "--" + option.replace("_", "-")


# ------------------------------------------------------------------ admin token from a file
def test_admin_token_from_a_file_or_the_environment_never_needs_the_command_line(tmp_path) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text("s3cret\n")
    assert config_from_env({"MACULA_ADMIN_TOKEN_FILE": str(secret)}).admin_token == "s3cret"
    assert config_from_env({"MACULA_ADMIN_TOKEN": "from-env"}).admin_token == "from-env"
    with pytest.raises(ConfigError) as err:
        config_from_env({"MACULA_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})
    assert err.value.option == "admin_token_file" and "cannot read" in str(err.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config_from_env({"MACULA_ADMIN_TOKEN_FILE": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="not both"):
        config_from_env({"MACULA_ADMIN_TOKEN_FILE": str(secret), "MACULA_ADMIN_TOKEN": "x"})
    assert "s3cret" not in repr(config_from_env({"MACULA_ADMIN_TOKEN_FILE": str(secret)}))
