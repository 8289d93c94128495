"""The tenant spec and the host baseline spec, with strict validation and derived names.

Pure: no typer, rich, paramiko, psycopg or pulumi. Everything a renderer puts into nginx, iptables
or systemd configuration comes from a validated ``TenantSpec`` or ``HostBaseline``; the renderers
check every value again (defence in depth), but these models are the first and main gate.

Validation failures are raised as ``dn.errors.InvalidInput`` naming the field and the rule
(``parse_tenant``, ``parse_host``); the secret ``container_config`` never appears in an error,
``repr``, ``str`` or ``model_dump`` (it is a ``SecretStr``).

Derived names (all deterministic functions of the slug, documented here because other layers and
the live host depend on them):

==================  ===========================================================================
bridge              ``"dnt" + sha256(slug)[:12]`` — 15 characters, the kernel's IFNAMSIZ limit;
                    every dn bridge starts with ``dnt`` so firewall rules can match ``dnt+``.
docker network      ``dn-t-<slug>``
containers          ``dn-<slug>-tagging``, ``dn-<slug>-preview``
nginx zones         ``dn_<slug>_<kind>_<h>``: ``h`` = sha256(kind|key|size|rate)[:8], so changing a
                    zone's key, size or rate gives a new name (nginx refuses a reload that binds
                    an existing zone name to another key). The per-tenant zone's key is the
                    constant ``dn-tenant-<slug>``.
iptables chains     ``DN-T-<H>`` (forward), ``DN-TI-<H>`` (input); ``H`` = sha256(slug)[:12]
                    upper-cased: 17/18 characters (iptables allows 28).
systemd units       ``dn-backup-<slug>.service`` / ``.timer``
LUKS volume         image ``/var/lib/dn/volumes/<slug>.luks``, mapper ``dn-<slug>``,
                    mount ``/srv/dn/tenants/<slug>`` (on-host paths; a host prefix is applied by
                    ``HostBaseline.path``).
addresses           in the tenant's subnet: gateway = 1st host address, tagging = 2nd, preview = 3rd.
==================  ===========================================================================
"""
from __future__ import annotations

import calendar
import hashlib
import ipaddress
import itertools
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import idna
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

from dn.config import PlanConfig
from dn.errors import InvalidInput

if TYPE_CHECKING:
    from dn.config import Settings

SLUG_RE = re.compile(r"[a-z][a-z0-9-]{1,30}[a-z0-9]")

# Names that would be confusing or dangerous as a tenant slug: they collide with dn's own
# subcommands, units, chains or well-known host names, or look like infrastructure.
RESERVED_SLUGS = frozenset(
    {
        "admin", "administrator", "api", "app", "audit", "backup", "backups", "default", "dn",
        "docker", "docker0", "host", "hosts", "health", "internal", "localhost", "mail", "nginx",
        "platform", "preview", "proxy", "postgres", "root", "sandbox", "status", "system", "systemd",
        "tenant", "tenants", "test", "verify", "www", "ftp", "smtp", "dns", "ns1", "ns2", "null",
        "none", "all", "any", "self", "static", "assets", "cdn", "dashboard", "support", "security",
    }
)

BRIDGE_PREFIX = "dnt"
TENANT_PORT = 8080  # the sGTM tagging and preview containers both listen on 8080
MAX_DOMAINS = 50

# CONTAINER_CONFIG is a base64 (standard or URL-safe) string produced by the GTM UI.
_CONTAINER_CONFIG_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
CONTAINER_CONFIG_MIN = 16
CONTAINER_CONFIG_MAX = 4096


class TenantStatus(str, Enum):
    """Lifecycle state of a tenant: active serves traffic; suspended keeps data but serves 503s;
    deleting is set while a GDPR erasure or cancellation is being carried out."""

    active = "active"
    suspended = "suspended"
    deleting = "deleting"


def short_hash(value: str, n: int) -> str:
    """The first ``n`` hex digits of sha256(value): a stable, short name component."""
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def _show(value: Any, limit: int = 60) -> str:
    """A safe, bounded rendering of a rejected (non-secret) value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- slugs


def check_slug(value: str) -> str:
    """Validate a tenant slug; returns it unchanged. Raises ValueError with the rule broken."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not SLUG_RE.fullmatch(value):
        raise ValueError(
            "must be 3-32 characters of lower-case a-z, 0-9 and '-', start with a letter and end "
            "with a letter or digit"
        )
    if "--" in value:
        raise ValueError("must not contain '--'")
    if value in RESERVED_SLUGS:
        raise ValueError(f"{value!r} is a reserved name")
    return value


# --------------------------------------------------------------------------- domains


def normalize_domain(value: str, *, allow_wildcard: bool = False) -> str:
    """Validate a hostname and return its lower-case A-label (punycode) form.

    IDNA per UTS46 (so ``Bücher.Example`` becomes ``xn--bcher-kva.example``), at least two labels,
    labels of at most 63 and a total of at most 253 octets, no trailing dot, no IP address, no
    invisible characters, and a ``*.`` first label only when ``allow_wildcard`` is set.
    Raises ValueError naming the rule.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not value:
        raise ValueError("must not be empty")
    if value.endswith("."):
        raise ValueError(f"{_show(value)}: must not end with a dot")
    for ch in value:
        cat = unicodedata.category(ch)
        if ch.isspace() or cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
            raise ValueError(f"{_show(value)}: must not contain whitespace, control or invisible characters")
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"{_show(value)}: must be a hostname, not an IP address")
    wildcard = value.startswith("*.")
    rest = value[2:] if wildcard else value
    if wildcard and not allow_wildcard:
        raise ValueError(f"{_show(value)}: wildcard domains need allow_wildcard")
    if "*" in rest:
        raise ValueError(f"{_show(value)}: '*' is only allowed as the whole first label ('*.example.com')")
    try:
        alabel = idna.encode(rest, uts46=True, std3_rules=True).decode("ascii")
        idna.decode(alabel)  # A-labels given as input must decode to a valid U-label
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError(f"{_show(value)}: not a valid hostname (IDNA: {_idna_reason(e)})") from None
    labels = alabel.split(".")
    if wildcard:
        alabel = "*." + alabel
    if len(labels) < 2:
        raise ValueError(f"{_show(value)}: must have at least two labels (e.g. 'example.com')")
    if any(len(label) > 63 for label in labels):
        raise ValueError(f"{_show(value)}: each label must be at most 63 characters")
    if len(alabel) > 253:
        raise ValueError(f"{_show(value)}: must be at most 253 characters in total")
    if labels[-1].isdigit():
        raise ValueError(f"{_show(value)}: the top-level label must not be numeric")
    if not re.fullmatch(r"(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)+", alabel):
        raise ValueError(f"{_show(value)}: not a valid hostname")
    return alabel


_IDNA_RULES = {
    "Label too long": "each label must be at most 63 characters",
    "Domain too long": "must be at most 253 characters in total",
}


def _idna_reason(e: Exception) -> str:
    # idna's messages quote the offending input; keep only the rule part, bounded.
    msg = str(e).split(" in '")[0].split(" of '")[0]
    return _IDNA_RULES.get(msg, msg[:80])


# --------------------------------------------------------------------------- images

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_IMAGE_RE = re.compile(
    rf"(?P<name>(?:(?P<domain>{_DOMAIN})/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)


@dataclass(frozen=True)
class ImageRef:
    """A parsed OCI image reference; ``registry`` is explicit (``docker.io`` when omitted)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_image(value: str) -> ImageRef:
    """Parse an image reference by the OCI distribution grammar. Raises ValueError naming the rule."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty image reference")
    if len(value) > 512:
        raise ValueError("must be at most 512 characters")
    m = _IMAGE_RE.fullmatch(value)
    if not m:
        raise ValueError(
            f"{_show(value)}: not a valid image reference ([registry/]path[:tag][@sha256:digest], "
            "path components lower-case)"
        )
    name = m.group("name")
    if len(name) > 255:
        raise ValueError("the repository name must be at most 255 characters")
    first, _, rest = name.partition("/")
    # Same rule as docker: the first component is a registry if it looks like a host.
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = "docker.io", name if "/" in name else f"library/{name}"
    return ImageRef(registry=registry.lower(), repository=repository, tag=m.group("tag"), digest=m.group("digest"))


def check_image_allowed(value: str, allowed_registries: Sequence[str]) -> ImageRef:
    """Parse ``value`` and require its registry to be allowed.

    An entry ending in ``/`` is a prefix of the full name (``gcr.io/cloud-tagging-10302018/``);
    any other entry is a registry host (``dn.local``). Raises InvalidInput on field ``image``.
    """
    try:
        ref = parse_image(value)
    except ValueError as e:
        raise InvalidInput("image", str(e)) from None
    name = ref.name + "/"
    for entry in allowed_registries:
        if (entry.endswith("/") and name.startswith(entry.lower())) or ref.registry == entry.lower():
            return ref
    raise InvalidInput(
        "image",
        f"registry of {_show(value)} is not allowed; allowed: {', '.join(allowed_registries) or 'none'} "
        "(settings images.allowed_registries)",
    )


# --------------------------------------------------------------------------- OnCalendar

_CAL_SHORTHANDS = frozenset({"hourly", "daily", "weekly", "monthly", "quarterly", "semiannually", "yearly", "annually"})
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _cal_values(part: str, lo: int, hi: int, what: str, *, repeat: bool) -> list[int] | None:
    """Check one calendar component: '*', N, N..M, lists of those, and (if repeat) N/step."""
    if part == "*":
        return None
    values: list[int] = []
    items = part.split(",")
    if len(items) > 12:
        raise ValueError(f"{what}: at most 12 comma-separated values")
    for item in items:
        m = re.fullmatch(r"(\d{1,2})(?:\.\.(\d{1,2})|/(\d{1,2}))?", item)
        if not m or (m.group(3) and not repeat):
            raise ValueError(f"{what}: {item!r} is not a number, range (a..b){' or repetition (a/step)' if repeat else ''}")
        a = int(m.group(1))
        if not lo <= a <= hi:
            raise ValueError(f"{what}: {a} is outside {lo}..{hi}")
        if m.group(2):
            b = int(m.group(2))
            if not a <= b <= hi:
                raise ValueError(f"{what}: range {item!r} must be increasing and within {lo}..{hi}")
            values.extend(range(a, b + 1))
        elif m.group(3):
            step = int(m.group(3))
            if not 1 <= step <= hi:
                raise ValueError(f"{what}: step {step} must be within 1..{hi}")
            values.extend(range(a, hi + 1, step))
        else:
            values.append(a)
    return values


def check_oncalendar(value: str) -> str:
    """Validate a systemd OnCalendar expression from dn's strict subset; returns it unchanged.

    Accepted: a shorthand (hourly, daily, weekly, monthly, quarterly, semiannually, yearly,
    annually), or ``[WEEKDAYS ]*-MM-DD HH:MM[:SS]`` where WEEKDAYS is a comma list of Mon..Sun or
    ranges (Mon..Fri); the year is always ``*``; month, day, hour, minute and second are ``*``,
    numbers, ranges (a..b) or comma lists; hour, minute and second may use repetition (0/15).
    No time zone (the host runs in UTC). Raises ValueError naming the rule.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if value in _CAL_SHORTHANDS:
        return value
    if len(value) > 64 or not re.fullmatch(r"[A-Za-z0-9*:,./ -]+", value):
        raise ValueError(
            f"{_show(value)}: must be at most 64 characters of letters, digits and * : , . / - space"
        )
    parts = value.split(" ")
    if "" in parts:
        raise ValueError(f"{_show(value)}: parts must be separated by single spaces")
    if len(parts) == 3 and "-" in parts[0]:
        raise ValueError(f"{_show(value)}: must be '[WEEKDAYS ]*-MM-DD HH:MM[:SS]' (no time zone, no extra fields)")
    if len(parts) == 3:
        wd, date, time = parts
        for item in wd.split(","):
            ends = item.split("..")
            if len(ends) > 2 or any(e not in _WEEKDAYS for e in ends):
                raise ValueError(f"weekday {item!r} must be one of {', '.join(_WEEKDAYS)} or a range like Mon..Fri")
    elif len(parts) == 2:
        date, time = parts
    else:
        raise ValueError(
            f"{_show(value)}: must be a shorthand ({', '.join(sorted(_CAL_SHORTHANDS))}) or "
            "'[Mon..Fri ]*-MM-DD HH:MM[:SS]' with single spaces"
        )
    dparts = date.split("-")
    if len(dparts) != 3:
        raise ValueError(f"date {date!r} must be '*-MM-DD'")
    if dparts[0] != "*":
        raise ValueError(f"date {date!r}: the year must be '*' (a fixed year stops the schedule for good)")
    months = _cal_values(dparts[1], 1, 12, "month", repeat=False)
    days = _cal_values(dparts[2], 1, 31, "day", repeat=False)
    tparts = time.split(":")
    if len(tparts) not in (2, 3):
        raise ValueError(f"time {time!r} must be 'HH:MM' or 'HH:MM:SS'")
    _cal_values(tparts[0], 0, 23, "hour", repeat=True)
    _cal_values(tparts[1], 0, 59, "minute", repeat=True)
    if len(tparts) == 3:
        _cal_values(tparts[2], 0, 59, "second", repeat=True)
    if months is not None and days is not None:
        # 2000 is a leap year: 29 February is a real (if rare) date.
        if not any(d <= calendar.monthrange(2000, mo)[1] for mo in months for d in days):
            raise ValueError(f"{_show(value)}: no listed day exists in the listed months: it would never run")
    return value


# --------------------------------------------------------------------------- networks


def _private_v4_net(value: str, field: str, lo: int, hi: int) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_show(value)} is not an IPv4 network with host bits zero ({e})") from None
    if not lo <= net.prefixlen <= hi:
        raise ValueError(f"{field} prefix length must be within /{lo}../{hi}")
    if not net.is_private or net.is_loopback or net.is_link_local:
        raise ValueError(f"{field} must be a private (RFC 1918) range")
    return net


def allocate_subnet(pool: str, taken: Iterable[str], prefixlen: int = 28) -> str:
    """The first /``prefixlen`` of ``pool`` that overlaps none of ``taken``."""
    pool_net = ipaddress.IPv4Network(pool)
    used = [ipaddress.IPv4Network(t) for t in taken]
    for candidate in pool_net.subnets(new_prefix=prefixlen):
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)
    raise InvalidInput("subnet", f"the tenant pool {pool} has no free /{prefixlen} left")


# --------------------------------------------------------------------------- tenant


@dataclass(frozen=True)
class ZoneNames:
    """nginx shared-memory zones of one tenant, with their sizes."""

    req_ip: str
    req_ip_size: str
    req_tenant: str
    req_tenant_size: str
    conn_ip: str
    conn_ip_size: str
    tenant_key: str


# Zone sizing (see nginx.py for the reasoning): nginx keeps one state per key; on 64-bit a
# limit_req state for $binary_remote_addr takes about 128 bytes, a limit_conn state about 96.
_STATE_BYTES = 128
_ZONE_MIN = 64 * 1024  # nginx refuses zones under 8 pages; 64k is safe on any page size
_ZONE_STEP = 64 * 1024
REQ_WINDOW_S = 60  # a limit_req state expires after 60 s without excess
KEEPALIVE_S = 15  # keepalive_timeout in nginx.conf: bounds how long a connection state lives


def _zone_size(states: int) -> str:
    size = max(_ZONE_MIN, -(-states * _STATE_BYTES // _ZONE_STEP) * _ZONE_STEP)
    return f"{size // 1024}k"


def zone_sizes(limits: PlanConfig) -> tuple[str, str, str]:
    """Zone sizes (per-IP request zone, per-tenant request zone, per-IP connection zone).

    Per-IP request zone: at the tenant's maximum rate every request could come from a new
    address, and a state lives ``REQ_WINDOW_S`` seconds: ``rate_per_tenant * 60`` states.
    Per-IP connection zone: a state lives while the connection is open (at most the keepalive
    timeout between requests): ``rate_per_tenant * 15`` states. Per-tenant zone: one state.
    Each state is budgeted 128 bytes, rounded up to 64 KiB, minimum 64 KiB.
    """
    return (
        _zone_size(limits.rate_per_tenant * REQ_WINDOW_S),
        _zone_size(1),
        _zone_size(limits.rate_per_tenant * KEEPALIVE_S),
    )


class SlugNames:
    """The names dn derives from a tenant's slug alone (see the table above): shared by
    TenantSpec and by readers that only have a slug (dn verify reads registry rows).
    Subclasses provide ``slug``."""

    @property
    def _h(self) -> str:
        return short_hash(self.slug, 12)

    @property
    def bridge(self) -> str:
        """Linux bridge of the tenant network (≤ 15 characters)."""
        return BRIDGE_PREFIX + self._h

    @property
    def network(self) -> str:
        return f"dn-t-{self.slug}"

    @property
    def tagging_container(self) -> str:
        return f"dn-{self.slug}-tagging"

    @property
    def preview_container(self) -> str:
        return f"dn-{self.slug}-preview"

    @property
    def chain_forward(self) -> str:
        return "DN-T-" + self._h.upper()

    @property
    def chain_input(self) -> str:
        return "DN-TI-" + self._h.upper()

    @property
    def backup_unit(self) -> str:
        """systemd unit name stem; the service and timer add .service / .timer."""
        return f"dn-backup-{self.slug}"

    @property
    def volume_image(self) -> str:
        return f"/var/lib/dn/volumes/{self.slug}.luks"

    @property
    def mapper_name(self) -> str:
        return f"dn-{self.slug}"

    @property
    def mapper_path(self) -> str:
        return f"/dev/mapper/{self.mapper_name}"

    @property
    def mount_path(self) -> str:
        return f"/srv/dn/tenants/{self.slug}"


class TenantSpec(SlugNames, BaseModel):
    """One tenant: its slug, domains, plan, image, secret container config and schedules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str
    allow_wildcard: bool = Field(False, description="permit '*.example.com' domains")
    domains: tuple[str, ...] = Field(description="public hostnames; the first names the certificate")
    plan: str = Field("standard", pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")
    limits: PlanConfig = Field(description="the plan's resolved limits")
    image: str
    container_config: SecretStr | None = Field(
        None, validate_default=True,
        description="the GTM container config (secret); required, except in a host view (parse_tenant(host_view=True))",
    )
    preview: bool = Field(True, description="run the sGTM preview server")
    backup_schedule: str = "*-*-* 02:30:00"
    status: TenantStatus = TenantStatus.active
    subnet: str = Field(description="the tenant network's IPv4 subnet (/24../29, private)")

    @field_validator("slug")
    @classmethod
    def _slug(cls, v: str) -> str:
        return check_slug(v)

    @field_validator("domains", mode="before")
    @classmethod
    def _domains(cls, v: Any, info: ValidationInfo) -> tuple[str, ...]:
        if isinstance(v, str) or not isinstance(v, (list, tuple)):
            raise ValueError("must be a list of hostnames")
        if not v:
            raise ValueError("at least one domain is required")
        if len(v) > MAX_DOMAINS:
            raise ValueError(f"at most {MAX_DOMAINS} domains per tenant")
        allow = bool(info.data.get("allow_wildcard", False))
        out: list[str] = []
        for i, d in enumerate(v):
            try:
                norm = normalize_domain(d, allow_wildcard=allow)
            except ValueError as e:
                raise ValueError(f"[{i}] {e}") from None
            if norm in out:
                raise ValueError(f"[{i}] {norm!r} is listed twice (after normalisation)")
            out.append(norm)
        return tuple(out)

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        parse_image(v)
        return v

    @field_validator("container_config", mode="before")
    @classmethod
    def _container_config(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            # The host resources (vhost, firewall, volume, timers) never need the secret: their
            # view of a tenant leaves it out rather than carrying it to every host resource.
            if (info.context or {}).get("host_view"):
                return None
            raise ValueError("is required")
        raw = v.get_secret_value() if isinstance(v, SecretStr) else v
        # Messages here never include the value: it is a secret.
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        if not CONTAINER_CONFIG_MIN <= len(raw) <= CONTAINER_CONFIG_MAX:
            raise ValueError(f"must be {CONTAINER_CONFIG_MIN}-{CONTAINER_CONFIG_MAX} characters long")
        if not _CONTAINER_CONFIG_RE.fullmatch(raw):
            raise ValueError("must be base64 text (A-Z a-z 0-9 + / _ - and up to two trailing '='), as shown by the GTM UI")
        return v

    @field_validator("backup_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        return check_oncalendar(v)

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        return str(_private_v4_net(v, "subnet", 24, 29))

    # ------------------------------------------------------------------ derived names













    @property
    def network_v4(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(self.network_v4.network_address + 1)

    @property
    def tagging_address(self) -> str:
        return str(self.network_v4.network_address + 2)

    @property
    def preview_address(self) -> str:
        return str(self.network_v4.network_address + 3)

    @property
    def cert_name(self) -> str:
        """File stem of the certificate: the first domain, '*' spelled '_wildcard'."""
        return self.domains[0].replace("*", "_wildcard")

    @property
    def zones(self) -> ZoneNames:
        ip_size, tenant_size, conn_size = zone_sizes(self.limits)
        key_ip = "$binary_remote_addr"
        tenant_key = f"dn-tenant-{self.slug}"
        lim = self.limits

        def name(kind: str, key: str, size: str, rate: str) -> str:
            return f"dn_{self.slug}_{kind}_{short_hash('|'.join((kind, key, size, rate)), 8)}"

        return ZoneNames(
            req_ip=name("ip", key_ip, ip_size, f"{lim.rate_per_ip}r/s"),
            req_ip_size=ip_size,
            req_tenant=name("tenant", tenant_key, tenant_size, f"{lim.rate_per_tenant}r/s"),
            req_tenant_size=tenant_size,
            conn_ip=name("conn", key_ip, conn_size, ""),
            conn_ip_size=conn_size,
            tenant_key=tenant_key,
        )


# --------------------------------------------------------------------------- host baseline


class HostBaseline(BaseModel):
    """What one EU host shares across tenants: firewall policy, nginx main config, timers.

    Only 80 and 443 are public (``public_ports`` cannot be changed); SSH is open only to
    ``admin_sources``; both IPv4 and IPv6 rulesets are rendered.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")
    prefix: str = Field("/", description="root under which dn writes its files on the host")
    admin_sources: tuple[str, ...] = Field(description="CIDRs allowed to reach SSH (IPv4 and/or IPv6)")
    ssh_port: int = Field(22, ge=1, le=65535)
    public_ports: tuple[int, ...] = (80, 443)
    ipv6: bool = Field(True, description="nginx also listens on [::]")
    tenant_pool: str = Field("10.210.0.0/16", description="private range tenant subnets come from")
    tenant_host_services: tuple[str, ...] = Field(
        (), description="host services tenant containers may reach, as 'tcp/PORT' or 'udp/PORT'"
    )
    cert_dir: str = Field("/etc/dn/tls", description="on-host dir of <domain>.crt/.key")
    hsts_max_age: int = Field(63072000, ge=63072000, description="seconds; the trust page promises HSTS")
    acme_root: str = "/var/lib/dn/acme"
    nginx_user: str = Field("www-data", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    worker_connections: int = Field(4096, ge=512, le=1048576)
    dn_bin: str = Field("/usr/local/bin/dn", description="the dn executable on the host, run by timers")
    dn_config: str | None = Field(None, description="DN_CONFIG for timer-run dn commands")
    data_dir: str = Field("/var/lib/dn", description="dn's data dir on the host (writable by timers)")
    health_alert_after: int = Field(3, ge=1, le=60, description="consecutive failed checks before alerting")

    @field_validator("admin_sources")
    @classmethod
    def _admin(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one admin source CIDR is required: with none, SSH would be closed to everyone")
        out = []
        for i, c in enumerate(v):
            try:
                net = ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"[{i}] {_show(c)} is not a CIDR network") from None
            if net.prefixlen == 0:
                raise ValueError(f"[{i}] {c} would open SSH to the whole internet")
            out.append(str(net))
        return tuple(out)

    @field_validator("public_ports")
    @classmethod
    def _ports(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(v) != (80, 443):
            raise ValueError("must be exactly (80, 443): the trust page promises only 80/443 are public")
        return v

    @field_validator("prefix", "cert_dir", "acme_root", "dn_bin", "data_dir", "dn_config")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/") or ".." in v.split("/") or not re.fullmatch(r"[A-Za-z0-9_./-]+", v):
            raise ValueError("must be an absolute path of [A-Za-z0-9_./-] without '..'")
        return v

    @field_validator("tenant_pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        return str(_private_v4_net(v, "tenant_pool", 8, 24))

    @field_validator("tenant_host_services")
    @classmethod
    def _services(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, s in enumerate(v):
            m = re.fullmatch(r"(tcp|udp)/(\d{1,5})", s) if isinstance(s, str) else None
            if not m or not 1 <= int(m.group(2)) <= 65535:
                raise ValueError(f"[{i}] {_show(s)} must be 'tcp/PORT' or 'udp/PORT'")
            if m.group(1) == "tcp" and int(m.group(2)) == 22:
                raise ValueError(f"[{i}] tenant containers must never reach SSH")
        return v

    def path(self, p: str) -> str:
        """The on-host path of ``p`` (given as on a real host) under this host's prefix."""
        return p if self.prefix == "/" else self.prefix.rstrip("/") + p

    @property
    def admin_sources_v4(self) -> list[str]:
        return [c for c in self.admin_sources if ipaddress.ip_network(c).version == 4]

    @property
    def admin_sources_v6(self) -> list[str]:
        return [c for c in self.admin_sources if ipaddress.ip_network(c).version == 6]

    @classmethod
    def from_settings(cls, settings: "Settings", host: str | None = None, **overrides: Any) -> "HostBaseline":
        """The baseline spec of a configured host (``settings.hosts``)."""
        name = host or settings.default_host
        h = settings.host(name)
        data: dict[str, Any] = {
            "name": name,
            "prefix": h.prefix,
            "admin_sources": list(h.admin_sources),
            "ssh_port": h.port,
            "cert_dir": settings.tls.cert_dir,
            "hsts_max_age": settings.tls.hsts_max_age,
            "dn_bin": h.dn_bin,
            "dn_config": h.dn_config,
            "data_dir": h.dn_data_dir,
        }
        data.update(overrides)
        return parse_host(data)


# --------------------------------------------------------------------------- parsing


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(spec)"


def _rule(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    if err.get("type") == "missing":
        return "is required"
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def invalid_from(e: ValidationError, prefix: str = "") -> InvalidInput:
    """One InvalidInput from pydantic errors: the first error names the field; the rest follow.

    Only pydantic's messages are used, never its ``input`` values (which may hold a secret).
    ``.errors`` keeps every (field, rule) pair.
    """
    pairs = []
    for err in e.errors():
        field, rule = prefix + _loc(tuple(err["loc"])), _rule(err)
        m = re.match(r"\[(\d+)\] ", rule)  # list validators report the item index first
        if m:
            field, rule = f"{field}[{m.group(1)}]", rule[m.end():]
        pairs.append((field, rule))
    return invalid_all(pairs)


def invalid_all(pairs: Sequence[tuple[str, str]]) -> InvalidInput:
    """One InvalidInput naming every (field, rule) pair: the first names the field, the rest follow
    ("; also ..."); ``.errors`` keeps them all."""
    pairs = list(pairs)
    field, rule = pairs[0]
    if len(pairs) > 1:
        rule += "; also " + "; ".join(f"{f}: {r}" for f, r in pairs[1:])
    exc = InvalidInput(field, rule)
    exc.errors = pairs  # type: ignore[attr-defined]
    return exc


def parse_tenant(
    data: Mapping[str, Any],
    *,
    plans: Mapping[str, PlanConfig] | None = None,
    allowed_registries: Sequence[str] | None = None,
    host_view: bool = False,
) -> TenantSpec:
    """Validate raw tenant input into a TenantSpec, or raise InvalidInput naming field and rule.

    With ``plans``, ``limits`` is resolved from ``plan`` (an explicit ``limits`` is refused);
    with ``allowed_registries`` the image's registry is checked too. ``host_view``: the tenant as
    the host resources see it, without the secret ``container_config`` (``host_view_data``).
    """
    data = dict(data)
    pairs: list[tuple[str, str]] = []  # every invalid field is reported at once
    if plans is not None:
        if "limits" in data:
            raise InvalidInput("limits", "is derived from the plan and must not be given")
        plan = data.get("plan", "standard")
        if not isinstance(plan, str) or plan not in plans:
            pairs.append(("plan", f"unknown plan {_show(plan)}; configured: {', '.join(sorted(plans))}"))
            data["limits"] = PlanConfig()  # stands in so that the other fields are still checked
        else:
            data["limits"] = plans[plan]
    spec = None
    try:
        spec = TenantSpec.model_validate(data, context={"host_view": host_view})
    except ValidationError as e:
        known = {f for f, _ in pairs}
        pairs += [p for p in invalid_from(e).errors if p[0] not in known]  # type: ignore[attr-defined]
    image = data.get("image")
    if allowed_registries is not None and isinstance(image, str) and not any(f == "image" for f, _ in pairs):
        try:
            check_image_allowed(image, allowed_registries)
        except InvalidInput as e:
            pairs.append((e.field, e.rule))
    if pairs:
        order = list(TenantSpec.model_fields)
        raise invalid_all(sorted(pairs, key=lambda p: field_rank(p[0], order)))
    assert spec is not None
    return spec


def field_rank(field: str, order: Sequence[str]) -> int:
    """Where ``field`` (``domains[1]`` counts as ``domains``) comes in ``order``; unknown ones last."""
    base = re.split(r"[.\[]", field, maxsplit=1)[0]
    return order.index(base) if base in order else len(order)


def host_view_data(spec: TenantSpec) -> dict[str, Any]:
    """The tenant as plain JSON data without the secret ``container_config`` (``limits``
    resolved): what the host resources carry; ``parse_tenant(data, host_view=True)`` reads it."""
    return spec.model_dump(mode="json", exclude={"container_config"})


def tenant_from_settings(data: Mapping[str, Any], settings: "Settings") -> TenantSpec:
    """parse_tenant with the plans and allowed registries of ``settings``."""
    return parse_tenant(data, plans=settings.plans, allowed_registries=settings.images.allowed_registries)


def parse_host(data: Mapping[str, Any]) -> HostBaseline:
    """Validate raw host baseline input, or raise InvalidInput naming field and rule."""
    try:
        return HostBaseline.model_validate(dict(data))
    except ValidationError as e:
        raise invalid_from(e, "host.") from None


def check_tenant_set(tenants: Sequence[TenantSpec], host: HostBaseline) -> None:
    """Rules across the tenants of one host: unique slugs, domains, bridges and subnets, and
    subnets inside the host's tenant pool. Raises InvalidInput."""
    pool = ipaddress.IPv4Network(host.tenant_pool)
    seen_slug: dict[str, int] = {}
    seen_domain: dict[str, str] = {}
    seen_bridge: dict[str, str] = {}
    nets: list[tuple[ipaddress.IPv4Network, str]] = []
    for t in tenants:
        if t.slug in seen_slug:
            raise InvalidInput("slug", f"tenant {t.slug!r} is listed twice")
        seen_slug[t.slug] = 1
        for d in t.domains:
            if d in seen_domain:
                raise InvalidInput("domains", f"{d} is claimed by tenants {seen_domain[d]!r} and {t.slug!r}", where=t.slug)
            seen_domain[d] = t.slug
        if t.bridge in seen_bridge:
            raise InvalidInput("slug", f"bridge name {t.bridge} of {t.slug!r} collides with {seen_bridge[t.bridge]!r}; rename one tenant")
        seen_bridge[t.bridge] = t.slug
        net = t.network_v4
        if not net.subnet_of(pool):
            raise InvalidInput("subnet", f"{t.subnet} of {t.slug!r} is outside the host's tenant pool {host.tenant_pool}", where=t.slug)
        nets.append((net, t.slug))
    # CIDR blocks either nest or are disjoint, so after sorting any overlap shows between neighbours.
    nets.sort(key=lambda n: (n[0].network_address, n[0].prefixlen))
    for (a, sa), (b, sb) in itertools.pairwise(nets):
        if a.overlaps(b):
            raise InvalidInput("subnet", f"{b} of {sb!r} overlaps {a} of {sa!r}", where=sb)
