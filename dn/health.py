"""dn health check: is every active tenant's sGTM serving? Run every 60 s by the host's timer.

Two facts per tenant, read from the outside in:
- Docker's own health state of the tagging (and preview) container (its healthcheck polls
  /healthz inside the container), read over SSH with ``docker inspect``;
- the public path: an HTTPS request to the host's address with the tenant's first domain as SNI
  and Host, for ``/healthz`` through nginx to the tagging container.

Consecutive failures per tenant are kept in ``<data_dir>/health/state.json``; when a tenant has
failed ``alert_after`` checks in a row, the alert hook runs once, and once more on recovery.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dn.config import HostConfig, Settings
    from dn.models import TenantSpec

PROBE_TIMEOUT = 5.0


@dataclass
class TenantHealth:
    slug: str
    host: str
    containers: dict[str, str] = field(default_factory=dict)  # name -> healthy/unhealthy/starting/missing/stopped
    public: str = "unknown"  # "200" or the failure
    failures_in_a_row: int = 0

    @property
    def ok(self) -> bool:
        return self.public == "200" and all(v == "healthy" for v in self.containers.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def parse_inspect(text: str, names: list[str]) -> dict[str, str]:
    """``docker inspect --format '{{.Name}} {{.State.Status}} {{health}}'`` lines → state per name.

    A running container with a healthcheck reports its health; one without reports "running"
    only when it has no healthcheck (treated as unhealthy: every sGTM container has one).
    """
    seen: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        name, state, health = parts[0].lstrip("/"), parts[1], parts[2]
        if state != "running":
            seen[name] = "stopped"
        else:
            seen[name] = health if health in ("healthy", "unhealthy", "starting") else "no-healthcheck"
    return {n: seen.get(n, "missing") for n in names}


def probe_public(address: str, port: int, domain: str, timeout: float = PROBE_TIMEOUT) -> str:
    """GET https://<domain>/healthz at ``address``: "200", or what went wrong.

    The certificate is not verified: this measures whether the tenant is served; certificate
    validity is `dn verify`'s job.
    """
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw:
            with tls.wrap_socket(raw, server_hostname=domain) as s:
                s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\nUser-Agent: dn-health\r\n\r\n".encode())
                resp = http.client.HTTPResponse(s)
                resp.begin()
                return str(resp.status)
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        return f"error: {type(e).__name__}: {str(e)[:80]}"


def container_states(host: "HostConfig", specs: list["TenantSpec"]) -> dict[str, dict[str, str]]:
    from dn import ssh

    out: dict[str, dict[str, str]] = {}
    with ssh.connect(host) as s:
        for t in specs:
            names = [t.tagging_container] + ([t.preview_container] if t.preview else [])
            r = s.run(["docker", "inspect", "--format",
                       "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                       *names], check=False, timeout=30)
            out[t.slug] = parse_inspect(r.stdout.decode("utf-8", "replace"), names)
    return out


def _state_path(settings: "Settings") -> Path:
    d = settings.data_dir / "health"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d / "state.json"


def load_state(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, path)


def transitions(previous: dict[str, dict], results: list[TenantHealth], alert_after: int) -> tuple[dict, list[tuple[str, TenantHealth]]]:
    """Pure: the new state and the alerts to send ("down" once per outage, "recovered" once)."""
    state, alerts = {}, []
    for r in results:
        prev = previous.get(r.slug, {})
        fails = 0 if r.ok else int(prev.get("failures", 0)) + 1
        alerted = bool(prev.get("alerted", False))
        if fails >= alert_after and not alerted:
            alerts.append(("down", r))
            alerted = True
        elif r.ok and alerted:
            alerts.append(("recovered", r))
            alerted = False
        r.failures_in_a_row = fails
        state[r.slug] = {"failures": fails, "alerted": alerted}
    return state, alerts


def check(settings: "Settings", *, alert_after: int, only: str | None = None,
          send_alerts: bool = True) -> tuple[list[TenantHealth], list[str]]:
    """Check every active tenant (or only one); returns the results and the alert delivery lines."""
    from dn import alert, tenants
    from dn.errors import DnError

    with tenants.connect(settings, "health check") as conn:
        if only is not None:
            records = [tenants.require_tenant(conn, only)]
        else:
            records = [r for r in tenants.list_tenants(conn) if r.status == "active"]
    results: list[TenantHealth] = []
    by_host: dict[str, list] = {}
    for r in records:
        by_host.setdefault(r.host, []).append(r)
    for host_name, recs in sorted(by_host.items()):
        host = settings.host(host_name)
        specs = [r.host_view(settings) for r in recs]
        try:
            states = container_states(host, specs)
        except DnError as e:
            states = {t.slug: {"(host)": f"unreachable: {str(e)[:80]}"} for t in specs}
        for t in specs:
            results.append(TenantHealth(t.slug, host_name, states.get(t.slug, {}),
                                        probe_public(host.address, 443, t.domains[0])))
    path = _state_path(settings)
    previous = load_state(path)
    state, alerts = transitions(previous, results, alert_after)
    save_state(path, {**previous, **state} if only is not None else state)
    delivered: list[str] = []
    if send_alerts:
        for kind, r in alerts:
            subject = f"dn health: tenant {r.slug} {'DOWN' if kind == 'down' else 'recovered'} on {r.host}"
            event = {"kind": f"health.{kind}", "time": datetime.now(timezone.utc).isoformat(), **r.to_dict()}
            delivered += alert.send(settings.alert, subject, event, subject)
    return results, delivered
