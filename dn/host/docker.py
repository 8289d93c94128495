"""A tenant's Docker network and sGTM containers on its EU host, driven over dn's SSH layer.

This is the ``dn-ssh`` docker backend: what ``stacks/providers/docker.py`` runs when the
pulumi-docker provider plugin is not installed (see :func:`docker_backend`). It talks to the host's
daemon through the ``docker`` CLI found on the host (``DOCKER_HOST`` as the SSH session sets it).

Pure part (no SSH): input validation into :class:`NetworkSpec` / :class:`ContainerSpec`, argv
builders, the Engine API request that creates a container, parsers of ``docker inspect`` JSON into
a *normalized* form, the expected normalized form of a spec, and plans (``dn.host.plan``) listing
what differs. Drift detection compares ``expected_*(spec)`` with ``normalize_*(inspect)``:
declared env entries and labels must be present with their values (entries the image brings are
ignored); every other field must be equal.

Thin apply part (a ``dn.ssh.Session``): ``ensure_network`` / ``remove_network``,
``deploy_container`` / ``remove_container``, ``read_network`` / ``read_container``.

Networks: bridge driver, fixed bridge name, inter-container traffic off
(``com.docker.network.bridge.enable_icc=false``), the tenant's subnet and gateway, labels
``dn.tenant=<slug>`` and ``dn.managed=true``. Docker networks cannot be changed: any difference
means replacing the network. Removing a network that still has containers (running or stopped)
is refused, naming them.

Containers: the image, the public env (``--env`` style, visible) and the secret env
(``CONTAINER_CONFIG``), attached only to the tenant network with a fixed IPv4 address, no
published port, ``restart unless-stopped``, memory (swap = memory, so no swap) / CPU / pids limits,
every capability dropped, ``no-new-privileges``, read-only root with a tmpfs on ``/tmp``, json-file
logs with rotation, a health check, labels ``dn.tenant``, ``dn.managed``, ``dn.role`` and
``dn.secret-env`` (the *names* of the secret variables, so an inspect can be normalized without
them).

The container is created through the Engine API (``POST /containers/create`` sent through
``docker system dial-stdio``), not with ``docker create``: the request body travels on the SSH
channel's stdin, so the secret env never appears in any argv on the host, and the body can carry
an exec-form health check (``["CMD", ...]``), which ``docker create --health-cmd`` cannot express
(it always wraps the command in ``/bin/sh -c``, and the official sGTM image has no shell).
``docker create --env-file /dev/stdin`` does keep the secret out of argv too, but leaves that
health-check problem.

A deploy (create or update) never leaves the tenant without its previous container when the new
one fails:

1. leftovers of an interrupted deploy are cleared (``<name>-dn-next`` removed; a lone
   ``<name>-dn-prev`` is renamed back and started);
2. the image must be on the host (``pull="missing"`` pulls it first); else nothing is touched;
3. the new container is created as ``<name>-dn-next``;
4. the running one is stopped (it frees the fixed address) and renamed ``<name>-dn-prev``;
5. the new one takes the name and starts; dn waits for it to be healthy: Docker's health status
   when it has a health check, else an HTTP GET of ``/healthz`` from the host;
6. healthy: the previous container is removed. Not healthy in time, exited, or restarting: the new
   one is removed, the previous one gets its name back and is started again, and the error says so.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dn.errors import ConfigError, InvalidInput, OperationFailed
from dn.host.plan import Change, Plan, Progress, no_progress
from dn.models import TENANT_PORT, TenantSpec, check_slug

if TYPE_CHECKING:
    from dn.config import Settings
    from dn.ssh import Session

DOCKER = "docker"
LABEL_TENANT = "dn.tenant"
LABEL_MANAGED = "dn.managed"
LABEL_ROLE = "dn.role"
LABEL_SECRET_ENV = "dn.secret-env"
LABEL_ENV = "dn.env"  # the plain env keys dn set: one it no longer sets shows as a change of this label
OPT_BRIDGE = "com.docker.network.bridge.name"
OPT_ICC = "com.docker.network.bridge.enable_icc"
OPT_MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
NEXT = "-dn-next"
PREV = "-dn-prev"
ROLES = ("tagging", "preview")
RESTART = "unless-stopped"
CAP_DROP = ("ALL",)
NO_NEW_PRIVILEGES = "no-new-privileges:true"
LOG_DRIVER = "json-file"
HEALTH_PATH = "/healthz"
PULL_POLICIES = ("never", "missing")
DEFAULT_TMPFS = {"/tmp": "rw,noexec,nosuid,nodev,size=64m"}
DEFAULT_PIDS_LIMIT = 512
STOP_TIMEOUT_S = 10
PULL_TIMEOUT_S = 900.0
POLL_S = 0.5
SECRET_ENV_DEFAULT = ("CONTAINER_CONFIG",)
DIAL_ARGV = (DOCKER, "system", "dial-stdio")
MiB = 1024 * 1024
NS = 1_000_000_000

BACKEND_ENV = "DN_DOCKER_BACKEND"
BACKENDS = ("auto", "pulumi-docker", "dn-ssh")

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
_BRIDGE_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]{0,14}")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_LABEL_KEY_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?")
_SIZE_RE = re.compile(r"[1-9][0-9]{0,5}[kmg]")
_TMPFS_OPT_RE = re.compile(r"(rw|ro|noexec|exec|nosuid|suid|nodev|dev|size=[1-9][0-9]{0,9}[kmg]?|mode=[0-7]{3,4}|uid=[0-9]{1,10}|gid=[0-9]{1,10})")
_PATH_RE = re.compile(r"/[A-Za-z0-9_./-]{1,200}")
_HTTP_PATH_RE = re.compile(r"/[A-Za-z0-9_./?=&%-]{0,200}")


# --------------------------------------------------------------------------- specs (pure)


@dataclass(frozen=True)
class NetworkSpec:
    """One tenant's Docker network."""

    name: str
    tenant: str
    bridge: str
    subnet: str
    gateway: str
    labels: dict[str, str] = field(default_factory=dict)  # extra labels; dn's own are always set

    @property
    def all_labels(self) -> dict[str, str]:
        return {**self.labels, LABEL_TENANT: self.tenant, LABEL_MANAGED: "true"}


@dataclass(frozen=True)
class Health:
    """A Docker health check. ``test`` as in the Engine API: ``["CMD", exe, args...]``,
    ``["CMD-SHELL", "command"]`` or ``["NONE"]`` (no check: deploys then probe
    ``GET /healthz`` from the host instead)."""

    test: tuple[str, ...]
    interval_s: float = 10.0
    timeout_s: float = 5.0
    retries: int = 3
    start_period_s: float = 20.0

    @property
    def enabled(self) -> bool:
        return self.test[0] != "NONE"


@dataclass(frozen=True)
class ContainerSpec:
    """One sGTM container (tagging or preview server) of a tenant. Holds no secret: the secret
    env's *names* only (``secret_env_keys``); the values are passed to ``deploy_container``."""

    name: str
    tenant: str
    role: str
    image: str
    network: str
    ipv4: str
    memory_mb: int
    cpus: float
    health: Health
    port: int = TENANT_PORT
    env: dict[str, str] = field(default_factory=dict)
    secret_env_keys: tuple[str, ...] = SECRET_ENV_DEFAULT
    pids_limit: int = DEFAULT_PIDS_LIMIT
    read_only: bool = True
    tmpfs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TMPFS))
    log_max_size: str = "10m"
    log_max_file: int = 3
    labels: dict[str, str] = field(default_factory=dict)  # extra labels
    pull: str = "never"
    wait_s: float = 120.0  # how long a deploy waits for the new container to be healthy

    @property
    def all_labels(self) -> dict[str, str]:
        return {**self.labels, LABEL_TENANT: self.tenant, LABEL_MANAGED: "true", LABEL_ROLE: self.role,
                LABEL_SECRET_ENV: ",".join(self.secret_env_keys), LABEL_ENV: ",".join(sorted(self.env))}


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in data or data[key] is None:
        raise InvalidInput(key, "is required")
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, kind):  # no input of dn's is a boolean here
        raise InvalidInput(key, f"must be {what}")
    return v


def _opt(data: Mapping[str, Any], key: str, default: Any) -> Any:
    v = data.get(key)
    return default if v is None else v


def _int(data: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int, field_name: str | None = None) -> int:
    """An integer input within lo..hi. Pulumi delivers every number as a float: 64.0 is 64."""
    name = field_name or key
    v = data.get(key)
    if v is None:
        if default is None:
            raise InvalidInput(name, "is required")
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise InvalidInput(name, f"must be an integer within {lo}..{hi}")
    if not lo <= v <= hi:
        raise InvalidInput(name, f"must be an integer within {lo}..{hi}")
    return int(v)


def _check_name(field_name: str, value: Any, *, room: int = 0) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or len(value) + room > 64:
        raise InvalidInput(field_name, f"must be 1-{64 - room} characters of a-z A-Z 0-9 _ . -, starting "
                                       "with a letter or digit (a Docker object name)")
    return value


def _check_text(field_name: str, value: Any, limit: int = 4096) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field_name, "must be a string")
    if any(c in value for c in "\n\r\0"):
        raise InvalidInput(field_name, "must not contain a newline, carriage return or NUL")
    if len(value) > limit:
        raise InvalidInput(field_name, f"must be at most {limit} characters")
    return value


def _check_labels(field_name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(field_name, "must be a mapping of label -> value")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY_RE.fullmatch(k):
            raise InvalidInput(f"{field_name}.{k}", "label keys are lower-case a-z 0-9 . _ - (start and end "
                                                   "with a letter or digit)")
        if k.startswith("dn."):
            raise InvalidInput(f"{field_name}.{k}", "the dn.* labels are set by dn itself")
        out[k] = _check_text(f"{field_name}.{k}", v, 512)
    return out


def _check_env(field_name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(field_name, "must be a mapping of NAME -> value")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_KEY_RE.fullmatch(k):
            raise InvalidInput(f"{field_name}.{k}", "variable names are A-Z a-z 0-9 _ and do not start with a digit")
        if not isinstance(v, str):
            raise InvalidInput(f"{field_name}.{k}", "must be a string")
        if any(c in v for c in "\n\r\0"):
            raise InvalidInput(f"{field_name}.{k}", "must not contain a newline, carriage return or NUL")
        out[k] = v
    return out


def network_spec(data: Mapping[str, Any]) -> NetworkSpec:
    """Validate network inputs (name, tenant, bridge, subnet, gateway, labels). Raises InvalidInput."""
    name = _check_name("name", _need(data, "name", str, "a string"))
    tenant = _need(data, "tenant", str, "a tenant slug")
    try:
        check_slug(tenant)
    except ValueError as e:
        raise InvalidInput("tenant", str(e)) from None
    bridge = _need(data, "bridge", str, "a string")
    if not _BRIDGE_RE.fullmatch(bridge):
        raise InvalidInput("bridge", "must be 1-15 characters of a-z A-Z 0-9 _ -, starting with a letter "
                                     "(a Linux interface name)")
    subnet = _need(data, "subnet", str, "an IPv4 subnet")
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as e:
        raise InvalidInput("subnet", f"{subnet!r} is not an IPv4 network with host bits zero ({e})") from None
    if net.prefixlen > 29:
        raise InvalidInput("subnet", "must be /29 or larger (a gateway and two containers)")
    gateway = _need(data, "gateway", str, "an IPv4 address")
    try:
        gw = ipaddress.IPv4Address(gateway)
    except ValueError:
        raise InvalidInput("gateway", f"{gateway!r} is not an IPv4 address") from None
    if gw not in net or gw in (net.network_address, net.broadcast_address):
        raise InvalidInput("gateway", f"must be a host address inside {net}")
    return NetworkSpec(name, tenant, bridge, str(net), str(gw), _check_labels("labels", data.get("labels")))


def health_spec(data: Any, field_name: str = "health") -> Health:
    """Validate a health check mapping (test, interval_s, timeout_s, retries, start_period_s)."""
    if not isinstance(data, Mapping):
        raise InvalidInput(field_name, "must be a mapping with test, interval_s, timeout_s, retries, start_period_s")
    test = data.get("test")
    if isinstance(test, str) or not isinstance(test, Sequence) or not test or not all(isinstance(t, str) for t in test):
        raise InvalidInput(f"{field_name}.test", 'must be a list of strings: ["CMD", exe, args...], '
                                                 '["CMD-SHELL", "command"] or ["NONE"]')
    test = tuple(test)
    kind = test[0]
    if kind == "CMD" and len(test) >= 2:
        pass
    elif kind == "CMD-SHELL" and len(test) == 2 and test[1].strip():
        pass
    elif kind == "NONE" and len(test) == 1:
        pass
    else:
        raise InvalidInput(f"{field_name}.test", 'must start with "CMD" (then the program and its arguments), '
                                                 '"CMD-SHELL" (then one command) or be ["NONE"]')
    for t in test:
        if "\0" in t:
            raise InvalidInput(f"{field_name}.test", "must not contain NUL")

    def seconds(key: str, default: float, lo: float, hi: float) -> float:
        v = _opt(data, key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise InvalidInput(f"{field_name}.{key}", f"must be a number of seconds within {lo:g}..{hi:g}")
        if round(v * 1000) != v * 1000:
            raise InvalidInput(f"{field_name}.{key}", "must be a whole number of milliseconds")
        return float(v)

    retries = _int(data, "retries", 3, 1, 100, f"{field_name}.retries")
    unknown = set(data) - {"test", "interval_s", "timeout_s", "retries", "start_period_s"}
    if unknown:
        raise InvalidInput(f"{field_name}.{sorted(unknown)[0]}", "unknown field")
    return Health(test, seconds("interval_s", 10.0, 1.0, 3600.0), seconds("timeout_s", 5.0, 1.0, 600.0),
                  retries, seconds("start_period_s", 20.0, 0.0, 3600.0))


CONTAINER_FIELDS = frozenset({
    "name", "tenant", "role", "image", "network", "ipv4", "memory_mb", "cpus", "health", "port", "env",
    "secret_env_keys", "pids_limit", "read_only", "tmpfs", "log_max_size", "log_max_file", "labels", "pull",
    "wait_s",
})


def container_spec(data: Mapping[str, Any]) -> ContainerSpec:
    """Validate container inputs into a ContainerSpec. Raises InvalidInput naming field and rule.
    Keys outside ``CONTAINER_FIELDS`` are ignored (the provider carries more: host, outputs)."""
    from dn.models import parse_image

    name = _check_name("name", _need(data, "name", str, "a string"), room=max(len(NEXT), len(PREV)))
    tenant = _need(data, "tenant", str, "a tenant slug")
    try:
        check_slug(tenant)
    except ValueError as e:
        raise InvalidInput("tenant", str(e)) from None
    role = _need(data, "role", str, "a string")
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
    image = _need(data, "image", str, "an image reference")
    try:
        parse_image(image)
    except ValueError as e:
        raise InvalidInput("image", str(e)) from None
    network = _check_name("network", _need(data, "network", str, "a network name"))
    ipv4 = _need(data, "ipv4", str, "an IPv4 address")
    try:
        ipaddress.IPv4Address(ipv4)
    except ValueError:
        raise InvalidInput("ipv4", f"{ipv4!r} is not an IPv4 address") from None
    memory_mb = _int(data, "memory_mb", None, 16, 262144)
    cpus = _need(data, "cpus", (int, float), "a number")
    if not 0.01 <= cpus <= 64 or round(cpus * 1000) != cpus * 1000:
        raise InvalidInput("cpus", "must be within 0.01..64 with at most 3 decimals")
    health = health_spec(_need(data, "health", Mapping, "a mapping"))
    port = _int(data, "port", TENANT_PORT, 1, 65535)
    env = _check_env("env", data.get("env"))
    keys = _opt(data, "secret_env_keys", list(SECRET_ENV_DEFAULT))
    if isinstance(keys, str) or not isinstance(keys, Sequence) or not all(isinstance(k, str) and _ENV_KEY_RE.fullmatch(k) for k in keys):
        raise InvalidInput("secret_env_keys", "must be a list of variable names")
    keys = tuple(sorted(set(keys)))
    both = sorted(set(keys) & set(env))
    if both:
        raise InvalidInput(f"env.{both[0]}", "is a secret variable: pass it in secret_env, never as plain env")
    pids = _int(data, "pids_limit", DEFAULT_PIDS_LIMIT, 16, 1_000_000)
    read_only = _opt(data, "read_only", True)
    if not isinstance(read_only, bool):
        raise InvalidInput("read_only", "must be true or false")
    tmpfs = _opt(data, "tmpfs", dict(DEFAULT_TMPFS))
    if not isinstance(tmpfs, Mapping):
        raise InvalidInput("tmpfs", "must be a mapping of path -> mount options")
    for path, opts in tmpfs.items():
        if not isinstance(path, str) or not _PATH_RE.fullmatch(path) or ".." in path.split("/"):
            raise InvalidInput(f"tmpfs.{path}", "must be an absolute path of A-Z a-z 0-9 _ . / - without '..'")
        if not isinstance(opts, str) or not all(_TMPFS_OPT_RE.fullmatch(o) for o in opts.split(",")):
            raise InvalidInput(f"tmpfs.{path}", "options are a comma list of rw, ro, (no)exec, (no)suid, (no)dev, "
                                                "size=N[kmg], mode=OCTAL, uid=N, gid=N")
    log_max_size = _opt(data, "log_max_size", "10m")
    if not isinstance(log_max_size, str) or not _SIZE_RE.fullmatch(log_max_size):
        raise InvalidInput("log_max_size", "must be a size like 10m (a number and k, m or g)")
    log_max_file = _int(data, "log_max_file", 3, 1, 100)
    pull = _opt(data, "pull", "never")
    if pull not in PULL_POLICIES:
        raise InvalidInput("pull", f"must be one of {', '.join(PULL_POLICIES)}")
    wait_s = _opt(data, "wait_s", 120.0)
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not 1 <= wait_s <= 3600:
        raise InvalidInput("wait_s", "must be a number of seconds within 1..3600")
    return ContainerSpec(
        name=name, tenant=tenant, role=role, image=image, network=network, ipv4=ipv4, memory_mb=memory_mb,
        cpus=float(cpus), health=health, port=port, env=env, secret_env_keys=keys, pids_limit=pids,
        read_only=read_only, tmpfs={str(k): str(v) for k, v in tmpfs.items()}, log_max_size=log_max_size,
        log_max_file=log_max_file, labels=_check_labels("labels", data.get("labels")), pull=pull,
        wait_s=float(wait_s),
    )


def check_secret_env(spec: ContainerSpec, secret_env: Mapping[str, Any]) -> dict[str, str]:
    """The secret env for ``spec``: exactly its ``secret_env_keys``, each a one-line string.
    Messages name the variable, never its value."""
    if not isinstance(secret_env, Mapping):
        raise InvalidInput("secret_env", "must be a mapping of NAME -> value")
    missing = sorted(set(spec.secret_env_keys) - set(secret_env))
    extra = sorted(set(secret_env) - set(spec.secret_env_keys))
    if missing:
        raise InvalidInput(f"secret_env.{missing[0]}", "is required (listed in secret_env_keys)")
    if extra:
        raise InvalidInput(f"secret_env.{extra[0]}", "is not listed in secret_env_keys")
    out = {}
    for k in spec.secret_env_keys:
        v = secret_env[k]
        if not isinstance(v, str) or not v:
            raise InvalidInput(f"secret_env.{k}", "must be a non-empty string")
        if any(c in v for c in "\n\r\0"):
            raise InvalidInput(f"secret_env.{k}", "must not contain a newline, carriage return or NUL")
        out[k] = v
    return out


def secret_digest(value: str) -> str:
    """How a secret env value appears in dn's normalized inspect and outputs: its SHA-256."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def secret_digests(secret_env: Mapping[str, str]) -> dict[str, str]:
    return {k: secret_digest(v) for k, v in sorted(secret_env.items())}


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret value (of 4+ characters) replaced by ``[secret]``."""
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) >= 4:
            text = text.replace(s, "[secret]")
    return text


# --------------------------------------------------------------------------- tenant inputs (pure)


def default_health_test(port: int = TENANT_PORT) -> list[str]:
    """A health check for images that have busybox wget (the sandbox's stand-in image)."""
    return ["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{port}{HEALTH_PATH}"]


def tenant_network_inputs(tenant: TenantSpec) -> dict[str, Any]:
    """Inputs of a tenant's DockerNetwork (without ``host``)."""
    return {"name": tenant.network, "tenant": tenant.slug, "bridge": tenant.bridge, "subnet": tenant.subnet,
            "gateway": tenant.gateway}


def preview_server_url(tenant: TenantSpec) -> str:
    """The public URL of the tenant's preview server (nginx routes it, see dn.render.nginx)."""
    from dn.render.nginx import PREVIEW_PATH

    plain = [d for d in tenant.domains if not d.startswith("*.")]
    if not plain:
        raise InvalidInput("domains", "the preview server needs at least one non-wildcard domain for "
                                      "PREVIEW_SERVER_URL", where=tenant.slug)
    return f"https://{plain[0]}{PREVIEW_PATH}"


def tenant_container_inputs(tenant: TenantSpec, role: str, *, health_test: Sequence[str] | None = None,
                            health: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Inputs of a tenant's tagging or preview DockerContainer, without ``ssh`` and ``secret_env``
    (CONTAINER_CONFIG comes from the stack config as a Pulumi secret). ``health_test`` is the
    Engine API form (default: wget ``/healthz``); ``extra`` overrides any other input (pull,
    wait_s, pids_limit ...)."""
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
    env = {"PORT": str(TENANT_PORT)}
    if role == "preview":
        env["RUN_AS_PREVIEW_SERVER"] = "true"
    elif tenant.preview:
        env["PREVIEW_SERVER_URL"] = preview_server_url(tenant)
    h = {"test": list(health_test or default_health_test()), "interval_s": 10.0, "timeout_s": 5.0, "retries": 3,
         "start_period_s": 20.0}
    h.update(health or {})
    out: dict[str, Any] = {
        "name": tenant.tagging_container if role == "tagging" else tenant.preview_container,
        "tenant": tenant.slug,
        "role": role,
        "image": tenant.image,
        "network": tenant.network,
        "ipv4": tenant.tagging_address if role == "tagging" else tenant.preview_address,
        "memory_mb": tenant.limits.memory_mb,
        "cpus": float(tenant.limits.cpus),
        "port": TENANT_PORT,
        "env": env,
        "secret_env_keys": list(SECRET_ENV_DEFAULT),
        "health": h,
    }
    out.update(extra)
    return out


# --------------------------------------------------------------------------- argv (pure)


def network_create_argv(spec: NetworkSpec) -> list[str]:
    argv = [DOCKER, "network", "create", "--driver", "bridge", "--subnet", spec.subnet, "--gateway", spec.gateway,
            "--opt", f"{OPT_BRIDGE}={spec.bridge}", "--opt", f"{OPT_ICC}=false"]
    for k, v in sorted(spec.all_labels.items()):
        argv += ["--label", f"{k}={v}"]
    return [*argv, "--", spec.name]


def network_inspect_argv(name: str) -> list[str]:
    return [DOCKER, "network", "inspect", "--", name]


def network_rm_argv(name: str) -> list[str]:
    return [DOCKER, "network", "rm", "--", name]


def network_containers_argv(network_id: str) -> list[str]:
    """Every container (running or not) attached to the network."""
    return [DOCKER, "ps", "--all", "--no-trunc", "--filter", f"network={network_id}", "--format", "{{.Names}}"]


def container_inspect_argv(ref: str) -> list[str]:
    return [DOCKER, "container", "inspect", "--", ref]


def container_start_argv(ref: str) -> list[str]:
    return [DOCKER, "container", "start", "--", ref]


def container_stop_argv(ref: str, timeout_s: int = STOP_TIMEOUT_S) -> list[str]:
    return [DOCKER, "container", "stop", "--time", str(timeout_s), "--", ref]


def container_rename_argv(ref: str, new_name: str) -> list[str]:
    return [DOCKER, "container", "rename", "--", ref, new_name]


def container_rm_argv(ref: str) -> list[str]:
    return [DOCKER, "container", "rm", "--force", "--", ref]


def image_inspect_argv(image: str) -> list[str]:
    return [DOCKER, "image", "inspect", "--format", "{{.Id}}", "--", image]


def image_pull_argv(image: str) -> list[str]:
    return [DOCKER, "image", "pull", "--quiet", "--", image]


# bash's /dev/tcp: every Debian host has bash and coreutils' timeout; the image may have nothing.
PROBE_SCRIPT = (
    'exec 3<>"/dev/tcp/$1/$2" || exit 1\n'
    "printf 'GET %s HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n' \"$3\" \"$1\" >&3\n"
    'IFS= read -r line <&3 || exit 1\n'
    'case "$line" in "HTTP/1."?" 200"*) exit 0 ;; esac\n'
    "exit 1\n"
)


def probe_argv(ip: str, port: int, path: str = HEALTH_PATH, timeout_s: int = 5) -> list[str]:
    """An HTTP GET of ``http://ip:port/path`` from the host; exit 0 on a 200."""
    ipaddress.IPv4Address(ip)
    if not _HTTP_PATH_RE.fullmatch(path):
        raise InvalidInput("path", "must be an absolute URL path")
    return ["timeout", str(timeout_s), "bash", "-c", PROBE_SCRIPT, "dn-probe", ip, str(port), path]


# --------------------------------------------------------------------------- Engine API (pure)


def _seconds_ns(s: float) -> int:
    return int(round(s * NS))


def create_body(spec: ContainerSpec, secret_env: Mapping[str, str]) -> dict[str, Any]:
    """The ``POST /containers/create`` body for ``spec``. Holds the secret env: send it only on
    stdin, never log it."""
    secret = check_secret_env(spec, secret_env)
    env = [f"{k}={v}" for k, v in sorted(spec.env.items())] + [f"{k}={v}" for k, v in sorted(secret.items())]
    h = spec.health
    health: dict[str, Any] = {"Test": list(h.test)}
    if h.enabled:
        health.update(Interval=_seconds_ns(h.interval_s), Timeout=_seconds_ns(h.timeout_s), Retries=h.retries,
                      StartPeriod=_seconds_ns(h.start_period_s))
    memory = spec.memory_mb * MiB
    return {
        "Image": spec.image,
        "Env": env,
        "Labels": dict(sorted(spec.all_labels.items())),
        "Healthcheck": health,
        "ExposedPorts": {},
        "HostConfig": {
            "NetworkMode": spec.network,
            "PortBindings": {},
            "PublishAllPorts": False,
            "RestartPolicy": {"Name": RESTART, "MaximumRetryCount": 0},
            "Memory": memory,
            "MemorySwap": memory,
            "NanoCpus": int(round(spec.cpus * NS)),
            "PidsLimit": spec.pids_limit,
            "CapDrop": list(CAP_DROP),
            "CapAdd": [],
            "SecurityOpt": [NO_NEW_PRIVILEGES],
            "Privileged": False,
            "ReadonlyRootfs": spec.read_only,
            "Tmpfs": dict(spec.tmpfs),
            "LogConfig": {"Type": LOG_DRIVER, "Config": {"max-size": spec.log_max_size,
                                                         "max-file": str(spec.log_max_file)}},
        },
        "NetworkingConfig": {"EndpointsConfig": {spec.network: {"IPAMConfig": {"IPv4Address": spec.ipv4}}}},
    }


def http_request(method: str, path: str, body: Any = None) -> bytes:
    """An HTTP/1.0 request to the Engine API (one request per connection)."""
    head = f"{method} {path} HTTP/1.0\r\nHost: docker\r\n"
    if body is None:
        return (head + "\r\n").encode()
    data = json.dumps(body, sort_keys=True).encode()
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def create_request(spec: ContainerSpec, secret_env: Mapping[str, str], name: str) -> bytes:
    return http_request("POST", "/containers/create?" + urllib.parse.urlencode({"name": name}),
                        create_body(spec, secret_env))


class _Wire:
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def makefile(self, *_a: Any, **_k: Any) -> io.BytesIO:
        return self._f


def parse_http_response(data: bytes) -> tuple[int, Any]:
    """(status, decoded JSON body or text) of a raw HTTP response from the Engine API."""
    resp = http.client.HTTPResponse(_Wire(data))  # type: ignore[arg-type]
    try:
        resp.begin()
        body = resp.read()
    except (http.client.HTTPException, ValueError) as e:
        raise OperationFailed(f"the docker daemon's answer is not HTTP ({type(e).__name__})") from None
    try:
        return resp.status, json.loads(body) if body.strip() else None
    except ValueError:
        return resp.status, body.decode("utf-8", "replace")


# --------------------------------------------------------------------------- inspect → normalized (pure)


def parse_inspect(text: str | bytes) -> list[dict]:
    """The objects of ``docker ... inspect`` output (a JSON array)."""
    try:
        data = json.loads(text)
    except ValueError:
        raise OperationFailed("docker inspect printed something that is not JSON") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise OperationFailed("docker inspect printed JSON that is not a list of objects")
    return data


def parse_bool(value: str | None, default: bool) -> bool:
    """Docker's reading of a boolean driver option (Go's strconv.ParseBool)."""
    if value is None:
        return default
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return default


def normalize_network(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a ``docker network inspect`` object that dn manages or checks."""
    opts = obj.get("Options") or {}
    ipam = (obj.get("IPAM") or {}).get("Config") or []
    return {
        "name": obj.get("Name"),
        "id": obj.get("Id"),
        "driver": obj.get("Driver"),
        "ipam": [{"subnet": c.get("Subnet", ""), "gateway": c.get("Gateway", "")} for c in ipam],
        "bridge": opts.get(OPT_BRIDGE),
        "icc": parse_bool(opts.get(OPT_ICC), True),
        "ip_masquerade": parse_bool(opts.get(OPT_MASQUERADE), True),
        "internal": bool(obj.get("Internal")),
        "ipv6": bool(obj.get("EnableIPv6")),
        "attachable": bool(obj.get("Attachable")),
        "labels": dict(obj.get("Labels") or {}),
    }


def expected_network(spec: NetworkSpec) -> dict[str, Any]:
    """What ``normalize_network`` must show for ``spec`` (without ``id``)."""
    return {
        "name": spec.name,
        "driver": "bridge",
        "ipam": [{"subnet": spec.subnet, "gateway": spec.gateway}],
        "bridge": spec.bridge,
        "icc": False,
        "ip_masquerade": True,
        "internal": False,
        "ipv6": False,
        "attachable": False,
        "labels": spec.all_labels,
    }


def _security_opt(opt: str) -> str:
    # The CLI stores "no-new-privileges", the API whatever the client sent: same effect.
    if opt in ("no-new-privileges", "no-new-privileges=true", "no-new-privileges:true"):
        return NO_NEW_PRIVILEGES
    return opt


def _published(port_bindings: Mapping[str, Any] | None) -> list[str]:
    out = []
    for port, binds in sorted((port_bindings or {}).items()):
        for b in binds or []:
            out.append(f"{b.get('HostIp') or '0.0.0.0'}:{b.get('HostPort') or '?'}->{port}")
    return out


def normalize_container(obj: Mapping[str, Any], secret_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The fields of a ``docker container inspect`` object that dn manages or checks.

    Env values of secret variables (``secret_keys``, the names in the ``dn.secret-env`` label, and
    CONTAINER_CONFIG) are replaced by :func:`secret_digest`.
    """
    cfg = obj.get("Config") or {}
    hc = obj.get("HostConfig") or {}
    state = obj.get("State") or {}
    labels = dict(cfg.get("Labels") or {})
    secret = set(secret_keys) | set(SECRET_ENV_DEFAULT)
    secret |= {k for k in labels.get(LABEL_SECRET_ENV, "").split(",") if k}
    env: dict[str, str] = {}
    for entry in cfg.get("Env") or []:
        k, _, v = entry.partition("=")
        env[k] = secret_digest(v) if k in secret else v
    nets = (obj.get("NetworkSettings") or {}).get("Networks") or {}
    health = cfg.get("Healthcheck")
    if health and health.get("Test") and health["Test"][0] != "NONE":
        norm_health: dict[str, Any] | None = {
            "test": list(health["Test"]),
            "interval_s": (health.get("Interval") or 0) / NS,
            "timeout_s": (health.get("Timeout") or 0) / NS,
            "retries": health.get("Retries") or 0,
            "start_period_s": (health.get("StartPeriod") or 0) / NS,
        }
    else:
        norm_health = None
    log = hc.get("LogConfig") or {}
    swap = hc.get("MemorySwap") or 0
    return {
        "name": (obj.get("Name") or "").lstrip("/"),
        "id": obj.get("Id"),
        "image": cfg.get("Image"),
        "running": bool(state.get("Running")),
        "env": env,
        "labels": labels,
        "network_mode": hc.get("NetworkMode"),
        "networks": sorted(nets),
        "ipv4": {n: ((v or {}).get("IPAMConfig") or {}).get("IPv4Address", "") for n, v in sorted(nets.items())},
        "published": _published(hc.get("PortBindings")),
        "publish_all": bool(hc.get("PublishAllPorts")),
        "restart": (hc.get("RestartPolicy") or {}).get("Name") or "no",
        "memory_mb": (hc.get("Memory") or 0) // MiB,
        "memory_swap_mb": swap // MiB if swap > 0 else swap,
        "cpus": round((hc.get("NanoCpus") or 0) / NS, 3),
        "pids_limit": hc.get("PidsLimit") or 0,
        "cap_drop": sorted(hc.get("CapDrop") or []),
        "cap_add": sorted(hc.get("CapAdd") or []),
        "security_opt": sorted(_security_opt(o) for o in hc.get("SecurityOpt") or []),
        "privileged": bool(hc.get("Privileged")),
        "read_only": bool(hc.get("ReadonlyRootfs")),
        "tmpfs": dict(hc.get("Tmpfs") or {}),
        "log": {"driver": log.get("Type"), "opts": dict(log.get("Config") or {})},
        "health": norm_health,
    }


def expected_container(spec: ContainerSpec, digests: Mapping[str, str]) -> dict[str, Any]:
    """What ``normalize_container`` must show for ``spec`` (without ``id``); ``digests`` are the
    :func:`secret_digest` of the secret env values."""
    h = spec.health
    return {
        "name": spec.name,
        "image": spec.image,
        "running": True,
        "env": {**spec.env, **{k: digests.get(k, "") for k in spec.secret_env_keys}},
        "labels": spec.all_labels,
        "network_mode": spec.network,
        "networks": [spec.network],
        "ipv4": {spec.network: spec.ipv4},
        "published": [],
        "publish_all": False,
        "restart": RESTART,
        "memory_mb": spec.memory_mb,
        "memory_swap_mb": spec.memory_mb,
        "cpus": round(spec.cpus, 3),
        "pids_limit": spec.pids_limit,
        "cap_drop": list(CAP_DROP),
        "cap_add": [],
        "security_opt": [NO_NEW_PRIVILEGES],
        "privileged": False,
        "read_only": spec.read_only,
        "tmpfs": dict(spec.tmpfs),
        "log": {"driver": LOG_DRIVER, "opts": {"max-size": spec.log_max_size, "max-file": str(spec.log_max_file)}},
        "health": ({"test": list(h.test), "interval_s": h.interval_s, "timeout_s": h.timeout_s,
                    "retries": h.retries, "start_period_s": h.start_period_s} if h.enabled else None),
    }


SUBSET_FIELDS = frozenset({"env", "labels"})  # the image adds its own entries to these
IGNORED_FIELDS = frozenset({"id"})


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def differences(expected: Mapping[str, Any], observed: Mapping[str, Any], *,
                secret_keys: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(field, what differs) between an expected and an observed normalized form. ``env`` and
    ``labels`` entries of ``expected`` must be present with their values; other fields equal.
    Secret env values are never shown, only that they differ."""
    out: list[tuple[str, str]] = []
    for key, want in expected.items():
        if key in IGNORED_FIELDS:
            continue
        have = observed.get(key)
        if key in SUBSET_FIELDS:
            have = have or {}
            for k, v in want.items():
                if have.get(k) != v:
                    where = f"{key}.{k}"
                    if k in secret_keys:
                        out.append((where, "the secret value differs" if k in have else "missing"))
                    elif k not in have:
                        out.append((where, f"missing (want {_show(v)})"))
                    else:
                        out.append((where, f"want {_show(v)}, have {_show(have[k])}"))
        elif have != want:
            out.append((key, f"want {_show(want)}, have {_show(have)}"))
    return out


def plan_network(spec: NetworkSpec, observed: Mapping[str, Any] | None, *, where: str = "host") -> Plan:
    """What bringing the network to ``spec`` takes: create, replace (networks are immutable), or
    nothing."""
    resource = f"docker network {spec.name} on {where}"
    if observed is None:
        return Plan(resource, (Change("create", spec.name, "missing on the host"),))
    diffs = differences(expected_network(spec), observed)
    return Plan(resource, tuple(Change("replace", f, why) for f, why in diffs))


def plan_container(spec: ContainerSpec, digests: Mapping[str, str], observed: Mapping[str, Any] | None,
                   *, where: str = "host") -> Plan:
    """What bringing the container to ``spec`` takes: create, recreate, or nothing."""
    resource = f"docker container {spec.name} on {where}"
    if observed is None:
        return Plan(resource, (Change("create", spec.name, "missing on the host"),))
    diffs = differences(expected_container(spec, digests), observed, secret_keys=spec.secret_env_keys)
    return Plan(resource, tuple(Change("recreate", f, why) for f, why in diffs))


# --------------------------------------------------------------------------- choosing the backend


def docker_backend(settings: "Settings", environ: Mapping[str, str] | None = None) -> str:
    """Which docker backend tenant stacks use: ``"pulumi-docker"`` (the provider plugin) when its
    plugin is installed (``dn.tooling.status``), else ``"dn-ssh"`` (this module).

    Override with ``DN_DOCKER_BACKEND``: ``auto`` (the default), ``pulumi-docker`` (an error if the
    plugin is missing) or ``dn-ssh`` (always, even with the plugin installed).
    """
    from dn import tooling

    env = os.environ if environ is None else environ
    choice = (env.get(BACKEND_ENV) or "auto").strip()
    if choice not in BACKENDS:
        raise InvalidInput(BACKEND_ENV, f"must be one of {', '.join(BACKENDS)}, not {choice[:40]!r}")
    if choice == "dn-ssh":
        return "dn-ssh"
    prov = tooling.status(environ=env, pulumi_home=tooling.pulumi_home(settings.data_dir))
    plugin = next(t for t in prov.tools if t.name == "pulumi-resource-docker")
    if plugin.present:
        return "pulumi-docker"
    if choice == "pulumi-docker":
        raise ConfigError(f"{BACKEND_ENV}=pulumi-docker, but the pulumi-docker provider plugin "
                          f"(pulumi-resource-docker v{tooling.DOCKER_PLUGIN_VERSION}) is not installed",
                          hint=f"{plugin.how}; or unset {BACKEND_ENV} to use dn's own docker provider over SSH")
    return "dn-ssh"


# --------------------------------------------------------------------------- apply (over a Session)


class ImageMissing(OperationFailed):
    """The image is not on the host and the pull policy does not allow fetching it."""


class RolloutFailed(OperationFailed):
    """A new container did not become healthy; the previous one (if any) was put back."""


def _inspect(s: "Session", argv: list[str]) -> dict | None:
    r = s.run(argv, check=False)
    if r.rc != 0:
        if r.stdout.strip() == b"[]":  # docker prints an empty list for an object that does not exist
            return None
        err = r.stderr.decode("utf-8", "replace").strip()[-800:]
        raise OperationFailed(f"{s.where}: `{' '.join(argv[:3])}` failed (exit {r.rc}): {err}")
    objs = parse_inspect(r.stdout)
    return objs[0] if objs else None


def inspect_network(s: "Session", name: str) -> dict | None:
    """The raw ``docker network inspect`` object, or None."""
    return _inspect(s, network_inspect_argv(name))


def inspect_container(s: "Session", ref: str) -> dict | None:
    """The raw ``docker container inspect`` object, or None."""
    return _inspect(s, container_inspect_argv(ref))


def read_network(s: "Session", name: str) -> dict | None:
    """The normalized network, or None if it does not exist."""
    obj = inspect_network(s, name)
    return normalize_network(obj) if obj is not None else None


def read_container(s: "Session", name: str, secret_keys: Sequence[str] = ()) -> dict | None:
    """The normalized container (secret env digested), or None if it does not exist."""
    obj = inspect_container(s, name)
    return normalize_container(obj, secret_keys) if obj is not None else None


def network_containers(s: "Session", network_id: str) -> list[str]:
    return sorted(n for n in s.run(network_containers_argv(network_id)).text.split() if n)


def ensure_network(s: "Session", spec: NetworkSpec, progress: Progress = no_progress) -> tuple[Plan, dict]:
    """Create the network, or adopt an existing one that is exactly ``spec``. An existing network
    that differs is refused (replacing it is the caller's decision: ``remove_network`` first)."""
    live = read_network(s, spec.name)
    plan = plan_network(spec, live, where=s.where)
    if live is not None:
        if plan.changes:
            raise OperationFailed(
                f"{s.where}: docker network {spec.name} exists but differs: "
                + "; ".join(f"{c.target}: {c.reason}" for c in plan.changes),
                hint="a network of dn's that drifted is replaced by the tenant stack's next update (refresh first); "
                     "anything else: remove or rename it by hand",
                where=spec.tenant)
        return plan, live
    progress("create")
    s.run(network_create_argv(spec))
    live = read_network(s, spec.name)
    if live is None:
        raise OperationFailed(f"{s.where}: docker network {spec.name} is missing right after its creation")
    return plan, live


def remove_network(s: "Session", name: str, progress: Progress = no_progress) -> bool:
    """Remove the network; False if it did not exist. Refused while containers are attached."""
    live = inspect_network(s, name)
    if live is None:
        return False
    attached = network_containers(s, live["Id"])
    if attached:
        raise OperationFailed(
            f"{s.where}: docker network {name} still has containers attached: {', '.join(attached)}",
            hint="remove those containers first (delete the tenant's containers before its network)")
    progress("remove")
    s.run(network_rm_argv(name))
    return True


def ensure_image(s: "Session", spec: ContainerSpec, progress: Progress = no_progress) -> None:
    """Make sure the image is on the host, pulling it if ``spec.pull == "missing"``."""
    if s.run(image_inspect_argv(spec.image), check=False).rc == 0:
        return
    if spec.pull == "never":
        raise ImageMissing(f"{s.where}: image {spec.image} is not on the host (pull policy: never); "
                           f"{spec.name} was left as it was",
                           hint="load or pull the image on the host first, or set pull to \"missing\"",
                           where=spec.tenant)
    progress("pull")
    r = s.run(image_pull_argv(spec.image), check=False, timeout=PULL_TIMEOUT_S)
    if r.rc != 0:
        err = r.stderr.decode("utf-8", "replace").strip()[-800:]
        raise ImageMissing(f"{s.where}: cannot pull {spec.image}: {err}; {spec.name} was left as it was",
                           where=spec.tenant)


def api_create(s: "Session", spec: ContainerSpec, secret_env: Mapping[str, str], name: str) -> tuple[str, list[str]]:
    """Create (not start) a container named ``name`` through the Engine API; (id, warnings)."""
    secret = check_secret_env(spec, secret_env)
    r = s.run(list(DIAL_ARGV), stdin=create_request(spec, secret, name), check=False)
    if not r.stdout:
        err = scrub(r.stderr.decode("utf-8", "replace").strip()[-800:], list(secret.values()))
        raise OperationFailed(f"{s.where}: `docker system dial-stdio` gave no answer (exit {r.rc}): {err}",
                              where=spec.tenant)
    status, body = parse_http_response(r.stdout)
    if status != 201 or not isinstance(body, dict) or not body.get("Id"):
        msg = body.get("message") if isinstance(body, dict) else body
        msg = scrub(str(msg or "")[-800:], list(secret.values()))
        raise OperationFailed(f"{s.where}: the docker daemon refused to create {name} (HTTP {status}): {msg}",
                              where=spec.tenant)
    return body["Id"], [scrub(str(w), list(secret.values())) for w in body.get("Warnings") or []]


def _owned(obj: Mapping[str, Any], spec: ContainerSpec) -> bool:
    labels = (obj.get("Config") or {}).get("Labels") or {}
    return labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_TENANT) == spec.tenant


def recover(s: "Session", name: str) -> list[str]:
    """Clear what an interrupted deploy of ``name`` left behind; returns what was done."""
    done = []
    nxt = inspect_container(s, name + NEXT)
    if nxt is not None:
        s.run(container_rm_argv(nxt["Id"]))
        done.append(f"removed {name + NEXT} (left by an interrupted deploy)")
    prev = inspect_container(s, name + PREV)
    if prev is not None:
        if inspect_container(s, name) is None:
            s.run(container_rename_argv(prev["Id"], name))
            s.run(container_start_argv(prev["Id"]))
            done.append(f"restored {name} from {name + PREV} (left by an interrupted deploy)")
        else:
            s.run(container_rm_argv(prev["Id"]))
            done.append(f"removed {name + PREV} (left by an interrupted deploy)")
    return done


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


def health_of(obj: Mapping[str, Any], probe_ok: Callable[[], bool] | None = None) -> Verdict | None:
    """Whether a started container is healthy (ok), has failed (not ok), or None (not yet).

    With a Docker health check its status decides; without one, ``probe_ok`` (an HTTP probe from
    the host) does. A container that stopped, is restarting or has restarted has failed."""
    st = obj.get("State") or {}
    if st.get("Restarting") or (obj.get("RestartCount") or 0) > 0:
        return Verdict(False, f"it keeps restarting (exit code {st.get('ExitCode')})")
    if not st.get("Running"):
        detail = f"it exited with code {st.get('ExitCode')}"
        if st.get("Error"):
            detail += f" ({st['Error']})"
        return Verdict(False, detail)
    health = st.get("Health")
    if health:
        status = health.get("Status")
        if status == "healthy":
            return Verdict(True, "healthy")
        if status == "unhealthy":
            logs = health.get("Log") or []
            last = logs[-1] if logs else {}
            out = str(last.get("Output") or "").strip()[-300:]
            return Verdict(False, f"its health check failed {health.get('FailingStreak')} times in a row "
                                  f"(last exit code {last.get('ExitCode')}{': ' + out if out else ''})")
        return None
    if probe_ok is not None and probe_ok():
        return Verdict(True, f"GET {HEALTH_PATH} answered 200")
    return None


def _address(obj: Mapping[str, Any], network: str) -> str | None:
    net = ((obj.get("NetworkSettings") or {}).get("Networks") or {}).get(network) or {}
    return (net.get("IPAMConfig") or {}).get("IPv4Address") or net.get("IPAddress") or None


def wait_healthy(s: "Session", ref: str, spec: ContainerSpec, *, timeout_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> str:
    """Wait until container ``ref`` (deployed from ``spec``) is healthy; return how that was seen,
    or raise RolloutFailed with the reason. A container without a Docker health check is probed
    with ``GET /healthz`` from the host on its address in ``spec.network``."""
    limit = spec.wait_s if timeout_s is None else timeout_s
    deadline = clock() + limit
    last = "it has not reported a health status yet"
    while True:
        obj = inspect_container(s, ref)
        if obj is None:
            raise RolloutFailed(f"{s.where}: container {spec.name} disappeared while dn waited for it")
        ip = _address(obj, spec.network)
        has_check = bool((obj.get("State") or {}).get("Health"))

        def probe() -> bool:
            return ip is not None and s.run(probe_argv(ip, spec.port), check=False).rc == 0

        verdict = health_of(obj, None if has_check else probe)
        if verdict is not None:
            if verdict.ok:
                return verdict.detail
            raise RolloutFailed(f"{s.where}: container {spec.name} is not healthy: {verdict.detail}")
        if has_check:
            last = f"health status {obj['State']['Health'].get('Status')}"
        if clock() >= deadline:
            raise RolloutFailed(f"{s.where}: container {spec.name} did not become healthy within {limit:g}s ({last})")
        sleep(POLL_S)


@dataclass
class Deployed:
    """The outcome of a deploy: the plan carried out, the container as inspected afterwards
    (normalized), and notes (recovered leftovers, daemon warnings)."""

    plan: Plan
    observed: dict
    notes: list[str] = field(default_factory=list)


def deploy_container(s: "Session", spec: ContainerSpec, secret_env: Mapping[str, str], *,
                     progress: Progress = no_progress, sleep: Callable[[float], None] = time.sleep,
                     clock: Callable[[], float] = time.monotonic) -> Deployed:
    """Create or recreate the container (see the module docstring for the steps and the rollback).

    An existing container of that name must be dn's for the same tenant (labels); otherwise the
    deploy is refused before anything changes. Raises ImageMissing, RolloutFailed (the previous
    container is back, or the message says why not), OperationFailed, InvalidInput.
    """
    secret = check_secret_env(spec, secret_env)
    secrets = list(secret.values())
    digests = secret_digests(secret)
    notes = recover(s, spec.name)
    old = inspect_container(s, spec.name)
    plan = plan_container(spec, digests, normalize_container(old, spec.secret_env_keys) if old else None,
                          where=s.where)
    if old is not None and not _owned(old, spec):
        raise OperationFailed(f"{s.where}: a container named {spec.name} exists and is not dn's for tenant "
                              f"{spec.tenant} (labels {LABEL_MANAGED}/{LABEL_TENANT}); nothing was changed",
                              hint="rename or remove it by hand", where=spec.tenant)
    if old is not None and plan.empty:
        return Deployed(plan, normalize_container(old, spec.secret_env_keys), notes + ["already as declared"])
    progress("image")
    ensure_image(s, spec, progress)
    progress("create")
    new_id, warnings = api_create(s, spec, secret, spec.name + NEXT)
    notes += [f"docker: {w}" for w in warnings]
    old_id = old["Id"] if old is not None else None
    try:
        if old_id:
            progress("stop")
            s.run(container_stop_argv(old_id))
            s.run(container_rename_argv(old_id, spec.name + PREV))
        s.run(container_rename_argv(new_id, spec.name))
        progress("start")
        s.run(container_start_argv(new_id))
        progress("health")
        notes.append(f"{spec.name}: {wait_healthy(s, new_id, spec, sleep=sleep, clock=clock)}")
    except BaseException as e:
        progress("rollback")
        back = _rollback(s, spec, new_id, old_id, sleep=sleep, clock=clock)
        if not isinstance(e, OperationFailed):
            raise
        raise RolloutFailed(scrub(f"{e.message}; {back}", secrets), hint=e.hint, where=spec.tenant) from None
    if old_id:
        progress("cleanup")
        s.run(container_rm_argv(old_id))
    obj = inspect_container(s, new_id)
    if obj is None:
        raise OperationFailed(f"{s.where}: container {spec.name} vanished right after its deploy", where=spec.tenant)
    progress("done")
    return Deployed(plan, normalize_container(obj, spec.secret_env_keys), notes)


def _rollback(s: "Session", spec: ContainerSpec, new_id: str, old_id: str | None, *,
              sleep: Callable[[float], None], clock: Callable[[], float]) -> str:
    """Remove the new container and put the previous one back; a sentence saying how it went."""
    try:
        s.run(container_rm_argv(new_id), check=False)
        if old_id is None:
            return "the new container was removed (there was no previous one)"
        s.run(container_rename_argv(old_id, spec.name), check=False)
        s.run(container_start_argv(old_id))
        try:
            wait_healthy(s, old_id, spec, sleep=sleep, clock=clock)
        except RolloutFailed as e:
            return f"the previous container is back under its name but not healthy: {e.message}"
        return "the new container was removed and the previous one is back and healthy"
    except OperationFailed as e:
        return (f"putting the previous container back failed ({e.message}); it may remain as "
                f"{spec.name + PREV}: rerun the deploy (it restores leftovers first)")


def remove_container(s: "Session", name: str, progress: Progress = no_progress) -> bool:
    """Remove the container and any leftovers of an interrupted deploy; False if none existed."""
    found = False
    for ref in (name + NEXT, name, name + PREV):
        obj = inspect_container(s, ref)
        if obj is not None:
            progress("remove")
            s.run(container_rm_argv(obj["Id"]))
            found = True
    return found
