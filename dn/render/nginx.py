"""nginx configuration for an EU host and its tenants (templates in ``templates/nginx/``).

Files (on-host paths, under the host prefix):

- ``/etc/nginx/nginx.conf``: main config: TLS 1.2/1.3 with the Mozilla intermediate ciphers,
  default servers (444 on 80, ``ssl_reject_handshake`` on 443 for unknown SNI), 429 for rate
  limits, the privacy-preserving access log, and the include of the vhost dir. It does not depend
  on the tenant list (fixed server-name hash sizes, see ``NAMES_HASH_BUCKET``), so the host
  baseline never has to change when a tenant comes or goes.
- ``/etc/nginx/dn/ffdhe2048.pem``: the RFC 7919 ffdhe2048 group for the DHE ciphers.
- ``/etc/nginx/dn/vhosts/<slug>.conf``: one tenant (``render_vhost``), self-contained at http
  level: its own ``limit_req_zone`` / ``limit_conn_zone`` definitions and its servers. Each tenant
  is one Pulumi stack, and applying it writes this one file and nothing shared.

Rate limits per tenant: per client address (``$binary_remote_addr``) and for the tenant as a
whole, keyed on a fixed per-tenant constant (never ``$host``, which clients choose), plus a
per-address connection limit; bursts are served without delay (``nodelay``) up to the plan's
burst (a burst of 0 means no queue at all: nginx refuses ``burst=0``, the plain form is that
limit). Zone sizes follow ``dn.models.zone_sizes``: per-IP request zone = rate_per_tenant × 60
states, per-IP connection zone = rate_per_tenant × 15 states, 128 bytes a state, rounded up to
64 KiB (minimum 64 KiB); the per-tenant zone holds one state (64 KiB). Zone names carry a hash
of key, size and rate, so a plan change yields a new zone instead of a refused reload.

Routing: ``/`` goes to the tagging container (``<tagging address>:8080`` on the tenant network);
the preview server, when enabled, is served under the path ``/_dn/preview/`` on the same domains
(the prefix is stripped). Give the tagging container ``PREVIEW_SERVER_URL=https://<first
domain>/_dn/preview``. A path rather than a subdomain keeps one certificate and one DNS name per
domain. Suspended and deleting tenants get 503 and no upstream.

Access log: ISO time, the vhost's configured name (``$server_name``), method, path without the
query string (``$uri``), status, bytes, timings. No client address, query, user agent, referer or
cookie is written. The error log runs at ``crit``: nginx logs request-level errors (upstream
failures, limit refusals) with the client address and request line, so they are kept out; an
upstream failure still shows in the access log as a 5xx with ``$upstream_status``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dn.errors import InvalidInput
from dn.models import KEEPALIVE_S, TENANT_PORT, HostBaseline, TenantSpec, TenantStatus, check_tenant_set
from dn.render import TEMPLATES, environment, ngx

# Mozilla SSL configuration generator, "intermediate" profile (TLS 1.2 ciphers; TLS 1.3 suites
# are not configurable in nginx and are all strong).
MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)

PREVIEW_PATH = "/_dn/preview"
BODY_MAX = "1m"  # sGTM hits are small; a bound protects the containers


NGINX_CONF = "/etc/nginx/nginx.conf"
DHPARAM = "/etc/nginx/dn/ffdhe2048.pem"
VHOST_DIR = "/etc/nginx/dn/vhosts"


def _env():
    return environment("nginx", ngx)


def _paths(host: HostBaseline) -> dict[str, str]:
    return {
        "pid": host.path("/run/nginx.pid"),
        "error_log": host.path("/var/log/nginx/error.log"),
        "access_log": host.path("/var/log/nginx/dn-access.log"),
        "temp": host.path("/var/lib/nginx"),
        "dhparam": host.path(DHPARAM),
        "vhosts": host.path(VHOST_DIR),
        "acme_root": host.path(host.acme_root),
    }


def vhost_path(host: HostBaseline, tenant: TenantSpec) -> str:
    """On-host path of a tenant's vhost file."""
    return host.path(f"{VHOST_DIR}/{tenant.slug}.conf")


def cert_paths(host: HostBaseline, tenant: TenantSpec) -> tuple[str, str]:
    """On-host (certificate, key) paths: ``<cert_dir>/<first domain>.crt`` / ``.key``."""
    base = host.path(f"{host.cert_dir.rstrip('/')}/{tenant.cert_name}")
    return base + ".crt", base + ".key"


def server_names_hash_sizes(tenants: Sequence[TenantSpec]) -> tuple[int, int]:
    """The smallest (server_names_hash_max_size, server_names_hash_bucket_size) these tenants
    need; ``render_base`` checks that the fixed ``NAMES_HASH_*`` cover them.

    A bucket entry takes the name plus a pointer and a length, padded to 8 bytes; nginx needs
    the longest name to fit one bucket (253 + 10 → 264, so 512 covers any valid hostname).
    The hash needs at least as many slots as names: 4 × names, a power of two, minimum 1024,
    leaves nginx room to find a collision-free size quickly.
    """
    names = sum(len(t.domains) for t in tenants)
    longest = max((len(d) for t in tenants for d in t.domains), default=0)
    bucket = 64
    while bucket < longest + 10 + 8:
        bucket *= 2
    size = 1024
    while size < 4 * names:
        size *= 2
    return size, max(bucket, 128)


# Fixed server-name hash sizes, so the main config is the same whatever the tenants: a bucket
# of 512 bytes holds the longest valid name (253 + 10 bytes of pointer and length, padded) and a
# maximum of 131072 slots lets nginx find a collision-free size for 100,000 names (2,000 tenants
# of 50 domains). nginx only allocates the size it settles on, not the maximum.
NAMES_HASH_BUCKET = 512
NAMES_HASH_MAX = 131072


def render_base(host: HostBaseline, tenants: Sequence[TenantSpec] = ()) -> dict[str, str]:
    """The host's nginx main config and DH group, keyed by on-host path.

    ``tenants``, when given, are only checked as a set (``check_tenant_set``: unique domains,
    bridges, subnets); nothing of them is rendered here: each tenant's file is ``render_vhost``.
    """
    check_tenant_set(tenants, host)
    need_max, need_bucket = server_names_hash_sizes(tenants)
    if need_max > NAMES_HASH_MAX or need_bucket > NAMES_HASH_BUCKET:
        raise InvalidInput("domains", f"{sum(len(t.domains) for t in tenants)} server names exceed what one host's "
                           f"nginx is sized for ({NAMES_HASH_MAX // 4}); spread the tenants over more hosts")
    env = _env()
    paths = _paths(host)
    common = {"host": host, "paths": paths, "keepalive": KEEPALIVE_S, "body_max": BODY_MAX}
    return {
        host.path(NGINX_CONF): env.get_template("nginx.conf.j2").render(
            ciphers=MOZILLA_INTERMEDIATE_CIPHERS, names_max=NAMES_HASH_MAX, names_bucket=NAMES_HASH_BUCKET, **common
        ),
        host.path(DHPARAM): (TEMPLATES / "nginx" / "ffdhe2048.pem").read_text(),
    }


def render_vhost(tenant: TenantSpec, host: HostBaseline) -> str:
    """The vhost file of one tenant (write it to ``vhost_path``): its rate-limit zones and its
    servers, included inside ``http {}`` by the main config."""
    cert, key = cert_paths(host, tenant)
    paths = dict(_paths(host), cert=cert, key=key)
    return _env().get_template("vhost.conf.j2").render(
        t=tenant,
        host=host,
        paths=paths,
        active=tenant.status == TenantStatus.active,
        port=TENANT_PORT,
        preview_path=PREVIEW_PATH,
        body_max=BODY_MAX,
    )


def check_argv(host: HostBaseline, nginx: str = "nginx") -> list[str]:
    """argv that validates the host's whole nginx configuration (``nginx -t``) in place."""
    p = _paths(host)
    return [nginx, "-t", "-q", "-p", host.path("/"), "-e", p["error_log"], "-c", host.path(NGINX_CONF)]


def control_argv(host: HostBaseline, signal: str | None = None, nginx: str = "nginx") -> list[str]:
    """argv that starts nginx on the host's configuration, or sends it ``signal`` (reload, quit)."""
    p = _paths(host)
    argv = [nginx, "-p", host.path("/"), "-e", p["error_log"], "-c", host.path(NGINX_CONF)]
    return argv + (["-s", signal] if signal else [])


def pid_path(host: HostBaseline) -> str:
    """On-host path of the nginx master's pid file."""
    return _paths(host)["pid"]


def error_log_path(host: HostBaseline) -> str:
    """On-host path of nginx's error log (startup and configuration errors land here)."""
    return _paths(host)["error_log"]


def runtime_dirs(host: HostBaseline) -> list[str]:
    """Directories nginx needs before it starts (logs, temp files, pid, ACME webroot, vhosts)."""
    p = _paths(host)
    return [host.path("/var/log/nginx"), p["temp"], host.path("/run"), p["acme_root"], p["vhosts"], host.path(host.cert_dir)]


@dataclass(frozen=True)
class Directive:
    """One parsed nginx directive: name, arguments (quotes removed) and block (None if none)."""

    name: str
    args: tuple[str, ...]
    block: tuple["Directive", ...] | None = None

    def find(self, name: str) -> list["Directive"]:
        return [d for d in self.block or () if d.name == name]


def _nginx_tokens(text: str):
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in ";{}":
            yield c, False
            i += 1
        elif c in "\"'":
            j, buf = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise InvalidInput("nginx config", "unterminated quoted string")
            yield "".join(buf), True
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in ";{}\"'":
                j += 1
            yield text[i:j], True
            i = j


def parse_config(text: str) -> tuple[Directive, ...]:
    """Parse nginx configuration text into a directive tree (for checks and comparisons;
    ``include`` is not followed). Raises InvalidInput on unbalanced braces or a missing ``;``."""
    stack: list[list[Directive]] = [[]]
    pending: list[str] = []
    names: list[tuple[str, tuple[str, ...]]] = []
    for tok, is_word in _nginx_tokens(text):
        if is_word:
            pending.append(tok)
        elif tok == ";":
            if not pending:
                raise InvalidInput("nginx config", "empty directive (stray ';')")
            stack[-1].append(Directive(pending[0], tuple(pending[1:])))
            pending = []
        elif tok == "{":
            if not pending:
                raise InvalidInput("nginx config", "block without a directive name")
            names.append((pending[0], tuple(pending[1:])))
            stack.append([])
            pending = []
        else:
            if pending or len(stack) == 1:
                raise InvalidInput("nginx config", "unexpected '}'" if len(stack) == 1 else "directive without ';' before '}'")
            body = stack.pop()
            name, args = names.pop()
            stack[-1].append(Directive(name, args, tuple(body)))
    if pending or len(stack) != 1:
        raise InvalidInput("nginx config", "unexpected end of file (missing ';' or '}')")
    return tuple(stack[0])


def render_all(host: HostBaseline, tenants: Sequence[TenantSpec]) -> dict[str, str]:
    """Base files plus every tenant's vhost, keyed by on-host path."""
    files = render_base(host, tenants)
    for t in tenants:
        files[vhost_path(host, t)] = render_vhost(t, host)
    return files
