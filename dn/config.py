"""dn's configuration: one TOML file, every value overridable from the environment.

Where the file is found, in order: ``--config PATH``, ``$DN_CONFIG``, ``$XDG_CONFIG_HOME/dn/config.toml``
(``~/.config/dn/config.toml``). With no file at all dn runs on the *embedded default*: the local
sandbox EU host made by ``dn sandbox up``, a local file state backend inside the data dir, and the
local PostgreSQL cluster of the sandbox.

Environment overrides: ``DN__SECTION__KEY=value`` (double underscores separate the path;
``DN__HOSTS__EU1__PORT=2222``). Values are read as TOML values when they parse as one
(numbers, booleans, arrays), otherwise as strings.

Secrets never live in this file: the state passphrase comes from ``secrets.passphrase_env`` or
``secrets.passphrase_file``; the database password from libpq's own means (``PGPASSFILE``).
Unknown keys are errors, not silently ignored.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dn.errors import ConfigError

ENV_PREFIX = "DN__"
NAME_RE = r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$"

# The sandbox EU host's fixed addresses (our own network namespaces; see dn/sandbox.py).
SANDBOX_HOST = "sandbox-eu1"
SANDBOX_EU1_ADDR = "10.231.1.2"
SANDBOX_EU1_GW = "10.231.1.1"
SANDBOX_EU2_ADDR = "10.231.2.2"
SANDBOX_EU2_GW = "10.231.2.1"
SANDBOX_PG_PORT = 54329
SANDBOX_ROOT = "/srv/dn-sandbox"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SSHTarget(Strict):
    """How dn reaches a machine over SSH. The host key is always pinned."""

    address: str
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    key_path: Path
    host_key: str | None = Field(
        None, description='pinned public host key, "ssh-ed25519 AAAA..."'
    )
    known_hosts: Path | None = Field(None, description="a known_hosts file holding the pinned key")
    connect_timeout: float = Field(10.0, gt=0, le=300)
    command_timeout: float = Field(600.0, gt=0, le=86400)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        if not re.fullmatch(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", v):
            raise ValueError("must be an IP address or a lower-case DNS hostname")
        return v

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(ssh-ed25519|ecdsa-sha2-nistp(256|384|521)|ssh-rsa|rsa-sha2-(256|512)) [A-Za-z0-9+/=]+( .*)?", v.strip()):
            raise ValueError('must be "<key-type> <base64>" as in a known_hosts or .pub file')
        return v.strip() if v else v

    @model_validator(mode="after")
    def _pinned(self) -> "SSHTarget":
        if not self.host_key and not self.known_hosts:
            raise ValueError("host_key or known_hosts is required: dn never accepts an unknown host key")
        return self


class HostConfig(SSHTarget):
    """An EU host that runs tenants."""

    region: str = "eu-de-1"
    admin_sources: list[str] = Field(default_factory=list, description="CIDRs allowed to reach SSH")
    prefix: str = Field("/", description="root under which dn writes its files on the host")
    docker_host: str | None = Field(None, description="docker endpoint; default ssh://user@address:port")
    public_interface: str | None = None
    dn_bin: str = Field("/usr/local/bin/dn", description="the dn executable on the host, run by its timers")
    dn_config: str | None = Field(None, description="DN_CONFIG of the timer-run dn commands on the host")
    dn_data_dir: str = Field("/var/lib/dn", description="dn's data dir on the host (writable by its timers)")

    @field_validator("admin_sources")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"{c!r} is not a CIDR network") from None
        return v

    @field_validator("prefix", "dn_bin", "dn_config", "dn_data_dir")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or ".." in v.split("/") or not re.fullmatch(r"[A-Za-z0-9_./-]+", v)):
            raise ValueError("must be an absolute path of [A-Za-z0-9_./-] without '..'")
        return v

    def path(self, p: str) -> str:
        """The on-host path of ``p`` (an absolute path as on a real host)."""
        return p if self.prefix == "/" else self.prefix.rstrip("/") + p

    @property
    def docker_url(self) -> str:
        return self.docker_host or f"ssh://{self.user}@{self.address}:{self.port}"


class BackupTarget(SSHTarget):
    """The second EU region: an SFTP target."""

    region: str = "eu-de-2"
    path: str = Field("/backups", pattern=r"^/[A-Za-z0-9_./-]*$")
    retries: int = Field(4, ge=0, le=20)


class DatabaseConfig(Strict):
    dsn: str = Field(f"postgresql://dn@127.0.0.1:{SANDBOX_PG_PORT}/dn")
    admin_dsn: str | None = Field(
        None, description="owner connection used only by `dn db init` (migrations, roles)"
    )
    passfile: Path | None = Field(None, description="libpq password file (mode 0600); the DSN never holds a password")
    lock_timeout: float = Field(30.0, ge=0, le=3600, description="seconds to wait for a tenant/host lock")
    lock_stale_after: float = Field(
        21600.0, ge=600, le=30 * 86400,
        description="seconds after which a lock whose holder is on another machine (so its process cannot be "
                    "checked) and whose database session is gone counts as dead and is taken over")

    @field_validator("dsn", "admin_dsn")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        if v and (re.search(r"://[^/@]*:[^/@]*@", v) or re.search(r"(^|\s)password\s*=", v)):
            raise ValueError("must not contain a password; use PGPASSFILE or PGPASSWORD")
        return v


class SecretsConfig(Strict):
    passphrase_env: str = Field("DN_PASSPHRASE", pattern=r"^[A-Z_][A-Z0-9_]*$")
    passphrase_file: Path | None = None


class StateConfig(Strict):
    backend_url: str | None = Field(None, description="default: file://<data_dir>/state")

    @field_validator("backend_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(file://|s3://|gs://|azblob://|https://)", v):
            raise ValueError("must be a file://, s3://, gs://, azblob:// or https:// URL")
        return v


class RetentionConfig(Strict):
    events_days: int = Field(15, ge=1, le=3650)
    aggregates_months: int = Field(24, ge=1, le=240)
    accounting_years: int = Field(5, ge=5, le=15, description="Czech law: 5 y invoices; VAT records may need 10")
    audit_days: int = Field(90, ge=90, le=3650, description="the trust page promises 90; the database enforces it as the prune floor")
    backup_daily_days: int = Field(30, ge=1, le=365)
    backup_monthly_months: int = Field(12, ge=0, le=120)
    gdpr_deadline_days: int = Field(30, ge=1, le=30)


_ONCALENDAR = r"^[A-Za-z0-9*:,./~ -]{1,64}$"


class ScheduleConfig(Strict):
    """systemd OnCalendar expressions."""

    backup: str = Field("*-*-* 02:30:00", pattern=_ONCALENDAR)
    drill: str = Field("*-*-01 04:00:00", pattern=_ONCALENDAR)
    verify: str = Field("*-*-* 05:00:00", pattern=_ONCALENDAR)
    retention: str = Field("*-*-* 03:30:00", pattern=_ONCALENDAR)


class PlanConfig(Strict):
    """A commercial plan: rate limits and container limits."""

    rate_per_ip: int = Field(10, ge=1, le=10000, description="requests/second per client IP")
    burst_per_ip: int = Field(20, ge=0, le=100000)
    rate_per_tenant: int = Field(200, ge=1, le=100000, description="requests/second for the whole tenant")
    burst_per_tenant: int = Field(400, ge=0, le=1000000)
    conn_per_ip: int = Field(50, ge=1, le=10000)
    cpus: float = Field(1.0, gt=0, le=64)
    memory_mb: int = Field(512, ge=64, le=262144)
    volume_mb: int = Field(256, ge=32, le=1048576)


class ImagesConfig(Strict):
    sgtm: str = "gcr.io/cloud-tagging-10302018/gtm-cloud-image:stable"
    allowed_registries: list[str] = Field(
        default_factory=lambda: ["gcr.io/cloud-tagging-10302018/", "dn.local/"]
    )


class AlertConfig(Strict):
    """Where failure alerts go: a command (JSON on stdin), mail over SMTP, or both.

    SMTP is encrypted unless ``smtp_security = "none"``: ``starttls`` (default, port 587) refuses a
    server that does not offer STARTTLS, ``tls`` connects with TLS (port 465); the server's
    certificate is verified against the system CAs or ``smtp_cafile``. A login (``smtp_user``) takes
    its password from the environment variable ``smtp_password_env`` or the file
    ``smtp_password_file``, never from this file, and is never sent without TLS.
    """

    command: list[str] | None = Field(None, description="argv run with the alert JSON on stdin")
    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_from: str | None = None
    smtp_to: list[str] = Field(default_factory=list)
    smtp_security: str = Field("starttls", pattern=r"^(starttls|tls|none)$", description="starttls, tls or none")
    smtp_cafile: Path | None = Field(None, description="CA bundle for the server's certificate (default: system CAs)")
    smtp_user: str | None = None
    smtp_password_env: str | None = Field(None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    smtp_password_file: Path | None = None

    @model_validator(mode="after")
    def _login(self) -> "AlertConfig":
        has_password = self.smtp_password_env is not None or self.smtp_password_file is not None
        if self.smtp_password_env is not None and self.smtp_password_file is not None:
            raise ValueError("smtp_password_env and smtp_password_file: give one, not both")
        if self.smtp_user is not None and not has_password:
            raise ValueError("smtp_user needs smtp_password_env or smtp_password_file")
        if has_password and self.smtp_user is None:
            raise ValueError("smtp_password_env/smtp_password_file need smtp_user")
        if self.smtp_user is not None and self.smtp_security == "none":
            raise ValueError('smtp_security = "none" with smtp_user: the password is never sent without TLS')
        return self


class TLSConfig(Strict):
    cert_dir: str = Field("/etc/dn/tls", pattern=r"^/[A-Za-z0-9_./-]*$", description="on-host dir of <domain>.crt/.key")
    hsts_max_age: int = Field(63072000, ge=15552000)


class DRConfig(Strict):
    """Restore drills: the trust page's promises are the default thresholds."""

    max_rpo_hours: float = Field(24.0, gt=0, le=720, description="the newest backup may be at most this old")
    max_rto_hours: float = Field(4.0, gt=0, le=168, description="download to verified database at most this long")
    checks_file: Path | None = Field(None, description='TOML of extra sanity checks: [[check]] name = "..." sql = "..."')


AUDIT_KEY_RE = r"^ed25519:[A-Za-z0-9+/]{43}=$"


class AuditConfig(Strict):
    """The audit log: whose signatures on its anchors and witnesses are trusted."""

    anchor_keys: list[str] = Field(
        default_factory=list,
        description='pinned Ed25519 public keys, "ed25519:<base64>" (`dn audit key` prints this machine\'s); '
                    "verification fails while none is set",
    )

    @field_validator("anchor_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for k in v:
            if not re.fullmatch(AUDIT_KEY_RE, k.strip()):
                raise ValueError(f"{k!r} must be \"ed25519:<base64 of the 32-byte public key>\" as `dn audit key` prints it")
        return [k.strip() for k in v]


class VerifyConfig(Strict):
    """dn verify: what it checks beyond what the registry and the host report."""

    luks_volumes: list[str] = Field(
        default_factory=list,
        description="on-host files or block devices that must be LUKS2, aes-xts-plain64, 512-bit (e.g. the PostgreSQL volume)",
    )

    @field_validator("luks_volumes")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/") or ".." in p.split("/") or not re.fullmatch(r"[A-Za-z0-9_./-]+", p):
                raise ValueError(f"{p!r} must be an absolute path of [A-Za-z0-9_./-] without '..'")
        return v


class Settings(Strict):
    data_dir: Path
    default_host: str = SANDBOX_HOST
    hosts: dict[str, HostConfig] = Field(default_factory=dict)
    backup: BackupTarget | None = None
    database: DatabaseConfig = DatabaseConfig()
    secrets: SecretsConfig = SecretsConfig()
    state: StateConfig = StateConfig()
    retention: RetentionConfig = RetentionConfig()
    schedules: ScheduleConfig = ScheduleConfig()
    plans: dict[str, PlanConfig] = Field(default_factory=lambda: {"standard": PlanConfig()})
    images: ImagesConfig = ImagesConfig()
    alert: AlertConfig = AlertConfig()
    tls: TLSConfig = TLSConfig()
    dr: DRConfig = DRConfig()
    verify: VerifyConfig = VerifyConfig()
    audit: AuditConfig = AuditConfig()
    source: str = Field("embedded default", description="where these settings came from")

    @field_validator("hosts", "plans")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for k in v:
            if not re.fullmatch(NAME_RE, k):
                raise ValueError(f"name {k!r} must match {NAME_RE}")
        return v

    @model_validator(mode="after")
    def _default_host(self) -> "Settings":
        if self.hosts and self.default_host not in self.hosts:
            raise ValueError(f"default_host {self.default_host!r} is not one of hosts: {sorted(self.hosts)}")
        return self

    @property
    def backend_url(self) -> str:
        return self.state.backend_url or f"file://{self.data_dir / 'state'}"

    def host(self, name: str | None = None) -> HostConfig:
        from dn.errors import InvalidInput

        name = name or self.default_host
        try:
            return self.hosts[name]
        except KeyError:
            raise InvalidInput("host", f"unknown host {name!r}; configured: {', '.join(sorted(self.hosts)) or 'none'}") from None

    def plan(self, name: str) -> PlanConfig:
        from dn.errors import InvalidInput

        try:
            return self.plans[name]
        except KeyError:
            raise InvalidInput("plan", f"unknown plan {name!r}; configured: {', '.join(sorted(self.plans))}") from None


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("DN_HOME"):
        return Path(env["DN_HOME"])
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dn"


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dn" / "config.toml"


def embedded_default(data_dir: Path) -> dict[str, Any]:
    """The configuration of the local sandbox (``dn sandbox up``)."""
    sb = data_dir / "sandbox"
    return {
        "data_dir": str(data_dir),
        "default_host": SANDBOX_HOST,
        "hosts": {
            SANDBOX_HOST: {
                "address": SANDBOX_EU1_ADDR,
                "user": "root",
                "key_path": str(sb / "id_ed25519"),
                "known_hosts": str(sb / "known_hosts"),
                "admin_sources": [f"{SANDBOX_EU1_GW}/32"],
                "prefix": f"{SANDBOX_ROOT}/eu1",
                "region": "eu-de-1",
            }
        },
        "backup": {
            "address": SANDBOX_EU2_ADDR,
            "user": "backup",
            "key_path": str(sb / "id_ed25519"),
            "known_hosts": str(sb / "known_hosts"),
            "path": "/backups",
            "region": "eu-de-2",
        },
        "database": {
            "dsn": f"postgresql://dn@127.0.0.1:{SANDBOX_PG_PORT}/dn",
            "admin_dsn": f"postgresql://dn_owner@127.0.0.1:{SANDBOX_PG_PORT}/dn",
            "passfile": str(sb / "pgpass"),
        },
        "secrets": {"passphrase_file": str(sb / "passphrase")},
        "images": {"sgtm": "dn.local/sgtm-standin:1"},
        "tls": {"cert_dir": "/etc/dn/tls"},
    }


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_path(key: str) -> list[str]:
    """DN__HOSTS__SANDBOX_EU1__KEY_PATH -> ["hosts", "sandbox-eu1", "key_path"].

    Host and plan names use '-', which environment variable names cannot hold: in the name
    segment under ``hosts`` and ``plans``, '_' stands for '-'.
    """
    parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
    if len(parts) > 2 and parts[0] in ("hosts", "plans"):
        parts[1] = parts[1].replace("_", "-")
    return parts


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = _env_path(key)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {'.'.join(parts)} is not a table in the configuration")
        node[parts[-1]] = _env_value(raw)
    return data


def _describe(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README, Configuration)"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Load and validate the settings. Raises ConfigError naming the file, key and rule."""
    environ = dict(os.environ if environ is None else environ)
    explicit = path or (Path(environ["DN_CONFIG"]) if environ.get("DN_CONFIG") else None)
    cfg_path = explicit or default_config_path(environ)
    data_dir = default_data_dir(environ)
    if cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{cfg_path}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{cfg_path}: cannot read: {e.strerror}") from None
        data.setdefault("data_dir", str(data_dir))
        source = str(cfg_path)
    elif explicit:
        raise ConfigError(f"{cfg_path}: configuration file not found", hint="check --config / DN_CONFIG")
    else:
        data = embedded_default(data_dir)
        source = "embedded default (sandbox)"
    data = _apply_env(data, environ)
    data["source"] = source
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source), hint="fix the configuration and rerun") from None
