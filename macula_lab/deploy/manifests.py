"""The nodes the deployment files describe: ``docker/compose.yaml`` and ``k3s/nodes/statefulset.yaml``.

The compose file and the StatefulSet are the single source of each node's
configuration.  Anything else that starts "the same nodes" (the network-namespace
harness in :mod:`macula_lab.deploy.netns`, the tests that check a real ``macula-lab
node`` accepts what the files pass) reads them through this module, so the
environment cannot drift from the files.

    specs = compose_nodes()                     # [NodeSpec(name="node-1", env={...}), ...]
    specs = statefulset_nodes(secrets={("macula-lab", "admin-token"): "t0ken"})

Each :class:`NodeSpec` carries the node's environment as the orchestrator would
hand it to the container, the extra arguments after ``macula-lab node``, the
host names peers use for it, the container paths it mounts, and which nodes
must be up before it starts.  What is modelled, and nothing more:

* compose: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?msg}``,
  ``${VAR:+alt}`` and ``$$`` interpolation (from ``environ``, *not* the caller's
  environment unless passed), YAML merge keys, ``environment`` as a mapping or a
  list, ``labels``, ``hostname``, network ``aliases`` and ``ipv4_address``,
  ``volumes`` targets, ``command``, and ``depends_on`` with
  ``service_healthy``/``service_started``.  Node services are those labelled
  ``io.macula.lab.role: node``.
* Kubernetes: the StatefulSet's pod names (``<name>-<ordinal>``), stable DNS
  names through its headless service, ``env`` with ``$(VAR)`` expansion (and
  ``$$(VAR)`` escapes) in the order Kubernetes applies it, ``fieldRef``
  (``metadata.name``, ``metadata.namespace``, ``status.podIP``, ...),
  ``secretKeyRef``/``configMapKeyRef`` from values you pass, ``args``,
  ``volumeMounts`` and ``podManagementPolicy``.  The namespace comes from the
  ``kustomization.yaml`` next to the file (as ``kubectl apply -k`` would set it).

YAML is read with PyYAML (``pip install macula-lab[deploy]``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import MaculaError

__all__ = [
    "COMPOSE_FILE",
    "NODE_LABEL",
    "STATEFULSET_FILE",
    "ManifestError",
    "NodeSpec",
    "compose_nodes",
    "expand_k8s",
    "interpolate_compose",
    "statefulset_nodes",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"
STATEFULSET_FILE = REPO_ROOT / "k3s" / "nodes" / "statefulset.yaml"
NODE_LABEL = ("io.macula.lab.role", "node")
NODE_COMMAND = ("macula-lab", "node")
CLUSTER_DOMAIN = "cluster.local"


class ManifestError(MaculaError, ValueError):
    """A deployment file is missing, unreadable, or uses something this module does not model."""

    code = "manifest_error"


@dataclass(frozen=True)
class NodeSpec:
    """One node as a deployment file describes it."""

    name: str  # compose service / pod name
    env: dict[str, str]  # the container's environment (MACULA_* and the rest the file sets)
    args: tuple[str, ...] = ()  # after `macula-lab node`
    hostnames: tuple[str, ...] = ()  # names peers resolve to this node's address
    address: str | None = None  # a fixed IPv4 address, when the file gives one
    mounts: dict[str, str] = field(default_factory=dict)  # container path -> volume name
    after: tuple[str, ...] = ()  # nodes that must be ready before this one starts

    @property
    def node_name(self) -> str:
        """The name the node runs under (``MACULA_NAME``, else the host name, as in a container)."""
        return self.env.get("MACULA_NAME") or (self.hostnames[0] if self.hostnames else self.name)

    def with_mounts(self, host_dirs: Mapping[str, str]) -> NodeSpec:
        """Environment and args with container paths of mounted volumes replaced by host directories.

        ``host_dirs`` maps volume names to directories; ``/certs`` with volume
        ``certs`` mounted there makes ``MACULA_CERTS_DIR=/certs`` point at
        ``host_dirs["certs"]``.  Unmapped volumes are an error: the node would
        read files that do not exist.
        """
        mapping: dict[str, str] = {}
        for target, volume in self.mounts.items():
            if volume not in host_dirs:
                raise ManifestError(f"{self.name}: no host directory for volume {volume!r} at {target}")
            mapping[target.rstrip("/")] = str(host_dirs[volume]).rstrip("/")

        def remap(value: str) -> str:
            for target, host in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
                if value == target or value.startswith(target + "/"):
                    return host + value[len(target) :]
            return value

        return replace(
            self,
            env={k: remap(v) for k, v in self.env.items()},
            args=tuple(remap(a) for a in self.args),
        )


# ------------------------------------------------------------------ YAML
def _load_yaml(path: Path, *, all_documents: bool = False) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - depends on the environment
        raise ManifestError(
            "reading deployment files needs PyYAML: pip install 'macula-lab[deploy]'"
        ) from None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return list(yaml.safe_load_all(text)) if all_documents else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path} is not valid YAML: {exc}") from None


# ------------------------------------------------------------------ compose
_COMPOSE_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate_compose(text: str, environ: Mapping[str, str]) -> str:
    """Compose's variable interpolation of one string value."""

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        value, op, arg = environ.get(name), m.group("op"), m.group("arg") or ""
        unset_or_empty = not value
        missing = unset_or_empty if op and op.startswith(":") else value is None
        if op in (":-", "-"):
            return arg if missing else value  # type: ignore[return-value]
        if op in (":?", "?"):
            if missing:
                raise ManifestError(f"compose variable {name} is required: {arg or 'not set'}")
            return value  # type: ignore[return-value]
        if op in (":+", "+"):
            return "" if missing else arg
        return value or ""

    return _COMPOSE_VAR.sub(sub, text)


def _interpolate_tree(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_compose(node, environ)
    if isinstance(node, list):
        return [_interpolate_tree(v, environ) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, environ) for k, v in node.items()}
    return node


def _pairs(value: Any, environ: Mapping[str, str], what: str) -> dict[str, str]:
    """Compose's mapping-or-list syntax (``environment``, ``labels``) as a dict of strings."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "" if v is None else _scalar(v) for k, v in value.items()}
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            key, sep, val = str(item).partition("=")
            if sep:
                out[key] = val
            elif key in environ:  # a bare name takes the value from the shell
                out[key] = environ[key]
        return out
    raise ManifestError(f"{what}: expected a mapping or a list, got {value!r}")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _command(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)


def compose_nodes(
    path: str | Path | None = None, *, environ: Mapping[str, str] | None = None
) -> list[NodeSpec]:
    """The node services of a compose file, in file order.

    ``environ`` stands for the shell environment ``docker compose`` would see
    (default: empty, so the file's own defaults apply).
    """
    path = Path(path or COMPOSE_FILE)
    environ = {} if environ is None else environ
    doc = _load_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ManifestError(f"{path}: no services")
    services = _interpolate_tree(doc["services"], environ)
    specs: list[NodeSpec] = []
    for name, svc in services.items():
        labels = _pairs(svc.get("labels"), environ, f"{path}: {name}.labels")
        if labels.get(NODE_LABEL[0]) != NODE_LABEL[1]:
            continue
        entrypoint = _command(svc.get("entrypoint"))
        if entrypoint and entrypoint != NODE_COMMAND:
            raise ManifestError(f"{path}: node service {name} overrides the entrypoint: {entrypoint}")
        hostnames = [
            svc.get("hostname") or name,
            name,
            *([svc["container_name"]] if svc.get("container_name") else []),
        ]
        address = None
        networks = svc.get("networks") or {}
        for net in networks.values() if isinstance(networks, dict) else ():
            net = net or {}
            hostnames += net.get("aliases") or []
            address = address or net.get("ipv4_address")
        mounts = {}
        for volume in svc.get("volumes") or []:
            source, target = _volume(volume)
            if target:
                mounts[target] = source
        depends = svc.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        after = tuple(
            dep
            for dep, cond in depends.items()
            if dep in services
            and _is_node(services[dep], environ)
            and (cond or {}).get("condition", "service_started") in ("service_healthy", "service_started")
        )
        specs.append(
            NodeSpec(
                name=name,
                env=_pairs(svc.get("environment"), environ, f"{path}: {name}.environment"),
                args=_command(svc.get("command")),
                hostnames=tuple(dict.fromkeys(hostnames)),
                address=address,
                mounts=mounts,
                after=after,
            )
        )
    if not specs:
        raise ManifestError(f"{path}: no service labelled {NODE_LABEL[0]}: {NODE_LABEL[1]}")
    return specs


def _is_node(svc: Any, environ: Mapping[str, str]) -> bool:
    labels = _pairs(svc.get("labels"), environ, "labels") if isinstance(svc, dict) else {}
    return labels.get(NODE_LABEL[0]) == NODE_LABEL[1]


def _volume(volume: Any) -> tuple[str, str]:
    if isinstance(volume, dict):
        return str(volume.get("source", "")), str(volume.get("target", ""))
    parts = str(volume).split(":")
    if len(parts) == 1:
        return "", parts[0]  # an anonymous volume
    return parts[0], parts[1]


# ------------------------------------------------------------------ Kubernetes
_K8S_REF = re.compile(r"\$\((?P<name>[A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$\((?P<escaped>[^)]*)\)")


def expand_k8s(text: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names replaced, unknown kept verbatim, ``$$(X)`` -> ``$(X)``."""

    def sub(m: re.Match) -> str:
        if m.group("escaped") is not None:
            return f"$({m.group('escaped')})"
        return defined.get(m.group("name"), m.group(0))

    return _K8S_REF.sub(sub, text)


def _field_ref(path: str, pod: Mapping[str, str]) -> str:
    fields = {
        "metadata.name": pod["name"],
        "metadata.namespace": pod["namespace"],
        "status.podIP": pod.get("ip", ""),
        "status.hostIP": pod.get("host_ip", ""),
        "spec.nodeName": pod.get("node", "netns"),
        "spec.serviceAccountName": "default",
    }
    if path not in fields:
        raise ManifestError(f"fieldRef {path} is not modelled (known: {', '.join(fields)})")
    return fields[path]


def _pod_env(
    env_list: list[dict[str, Any]],
    pod: Mapping[str, str],
    secrets: Mapping[tuple[str, str], str],
    config_maps: Mapping[tuple[str, str], str],
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in env_list or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand_k8s(_scalar(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            env[name] = _field_ref(source["fieldRef"]["fieldPath"], pod)
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind, table = (
                ("secretKeyRef", secrets) if "secretKeyRef" in source else ("configMapKeyRef", config_maps)
            )
            ref = source[kind]
            key = (ref["name"], ref["key"])
            if key in table:
                env[name] = table[key]
            elif not ref.get("optional"):
                raise ManifestError(f"{name}: no value given for {kind} {key[0]}/{key[1]}")
        else:
            raise ManifestError(f"{name}: valueFrom {sorted(source)} is not modelled")
    return env


def _kustomize_namespace(path: Path) -> str | None:
    kustomization = path.parent / "kustomization.yaml"
    if kustomization.exists():
        doc = _load_yaml(kustomization) or {}
        return doc.get("namespace")
    return None


def statefulset_nodes(
    path: str | Path | None = None,
    *,
    replicas: int | None = None,
    namespace: str | None = None,
    secrets: Mapping[tuple[str, str], str] | None = None,
    config_maps: Mapping[tuple[str, str], str] | None = None,
    pod_ips: Mapping[str, str] | None = None,
    cluster_domain: str = CLUSTER_DOMAIN,
) -> list[NodeSpec]:
    """The pods of the (first) StatefulSet in ``path``, ordinal order.

    ``secrets`` / ``config_maps`` give ``(name, key) -> value`` for the env's
    ``secretKeyRef`` / ``configMapKeyRef``; ``pod_ips`` the ``status.podIP`` of
    each pod.  ``replicas`` overrides the file's count.
    """
    path = Path(path or STATEFULSET_FILE)
    docs = [d for d in _load_yaml(path, all_documents=True) if isinstance(d, dict)]
    sts = next((d for d in docs if d.get("kind") == "StatefulSet"), None)
    if sts is None:
        raise ManifestError(f"{path}: no StatefulSet")
    meta, spec = sts.get("metadata") or {}, sts.get("spec") or {}
    name = meta.get("name")
    namespace = namespace or _kustomize_namespace(path) or meta.get("namespace") or "default"
    count = spec.get("replicas", 1) if replicas is None else replicas
    service = spec.get("serviceName")
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    containers = pod_spec.get("containers") or []
    container = next(
        (c for c in containers if c.get("name") == "node"), containers[0] if containers else None
    )
    if not name or container is None:
        raise ManifestError(f"{path}: the StatefulSet needs a name and a container")
    command = _command(container.get("command"))
    if command and command != NODE_COMMAND:
        raise ManifestError(f"{path}: the node container overrides the entrypoint: {command}")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
    ordered = spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
    specs: list[NodeSpec] = []
    for ordinal in range(count):
        pod_name = f"{name}-{ordinal}"
        pod = {"name": pod_name, "namespace": namespace, "ip": (pod_ips or {}).get(pod_name, "")}
        env = _pod_env(container.get("env") or [], pod, secrets or {}, config_maps or {})
        hostnames = [pod_name]
        if service:
            base = f"{pod_name}.{service}"
            hostnames += [base, f"{base}.{namespace}", f"{base}.{namespace}.svc"]
            hostnames.append(f"{base}.{namespace}.svc.{cluster_domain}")
        specs.append(
            NodeSpec(
                name=pod_name,
                env=env,
                args=tuple(expand_k8s(str(a), env) for a in container.get("args") or []),
                hostnames=tuple(hostnames),
                mounts=mounts,
                after=(f"{name}-{ordinal - 1}",) if ordered and ordinal else (),
            )
        )
    return specs
