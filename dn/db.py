"""The platform database adapter: connections, error translation and schema migrations.

This is the only dn module that imports psycopg. Passwords never appear in a DSN, argv or a
message: libpq reads them from the passfile named in ``database.passfile`` (or ``PGPASSFILE``).

Schema migrations are the files ``dn/schema/NNN_name.sql``, applied in order by ``dn db init`` as
the owner role (``database.admin_dsn``), each in its own transaction, recorded with their
SHA-256 in ``schema_migrations``. A migration that was changed after it was applied is refused.

Two NOLOGIN roles are cluster-wide objects that a migration cannot create as a plain owner, so
they are made once by a role that may create roles (a superuser or CREATEROLE) — ``dn db init
--bootstrap-dsn``, or automatically when the owner role may create roles:

- ``dn_audit_owner`` owns the audit tables; nobody logs in as it. The owner role is a member so
  that migrations can build the audit schema.
- ``dn_app`` carries the day-to-day grants; the login role of ``database.dsn`` is a member.
- ``dn_preview`` may only read the tenant registry: CI's pull-request preview logs in as a member.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import psycopg
from psycopg import conninfo, errors as pgerrors, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from dn.errors import ConfigError, DnError, InvalidInput, OperationFailed, Unreachable

if TYPE_CHECKING:
    from dn.config import DatabaseConfig

SCHEMA_DIR = Path(__file__).with_name("schema")
MIGRATION_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
AUDIT_OWNER = "dn_audit_owner"
APP_ROLE = "dn_app"
PREVIEW_ROLE = "dn_preview"  # read-only: CI's pull-request preview (schema/007_preview_role.sql)
# Session advisory lock held while migrating, so two `dn db init` never interleave.
MIGRATE_LOCK = int.from_bytes(b"dn:schem", "big")
CONNECT_TIMEOUT = 10

Connection = psycopg.Connection


# -- connections ---------------------------------------------------------------------------------
def describe_dsn(dsn: str) -> str:
    """``user@host:port/db`` for messages (a DSN never holds a password; see DatabaseConfig)."""
    try:
        p = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparseable DSN)"
    host = p.get("host") or "local socket"
    return f"{p.get('user', '?')}@{host}:{p.get('port', '5432')}/{p.get('dbname', '?')}"


def dsn_user(dsn: str) -> str | None:
    return conninfo.conninfo_to_dict(dsn).get("user")


def check_dsn(dsn: str, field: str) -> str:
    """Reject a DSN that does not parse or that carries a password."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise InvalidInput(field, "is not a PostgreSQL connection string (postgresql://user@host:port/db)") from None
    if "password" in parts:
        raise InvalidInput(field, "must not contain a password; libpq reads it from database.passfile")
    if not parts.get("user"):
        raise InvalidInput(field, "must name the role (postgresql://ROLE@host:port/db)")
    return dsn


def _first_line(e: BaseException) -> str:
    # libpq messages name host, port, role and database, never a password.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def connect_dsn(dsn: str, passfile: Path | None, *, autocommit: bool = True,
                application_name: str = "dn") -> psycopg.Connection:
    """Open a connection; failures raise Unreachable naming user@host:port/db and what to do."""
    kw: dict[str, Any] = {"autocommit": autocommit, "connect_timeout": CONNECT_TIMEOUT,
                          "application_name": application_name[:63]}
    if passfile is not None:
        kw["passfile"] = str(passfile)
    try:
        return psycopg.connect(dsn, **kw)
    except psycopg.OperationalError as e:
        raise Unreachable(
            f"cannot connect to PostgreSQL {describe_dsn(dsn)}: {_first_line(e)}",
            hint="check that the database runs (the sandbox's: `dn sandbox up`) and that "
                 "database.passfile holds this role's password (mode 0600)",
            where="database",
        ) from None
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"database DSN {describe_dsn(dsn)}: {_first_line(e)}") from None


def connect(dbcfg: "DatabaseConfig", *, admin: bool = False, autocommit: bool = True,
            application_name: str = "dn") -> psycopg.Connection:
    """Connect as the day-to-day role (``database.dsn``) or, with admin, as the owner role."""
    if admin:
        if not dbcfg.admin_dsn:
            raise ConfigError("database.admin_dsn is not set: `dn db init` needs the owner role's DSN")
        dsn = dbcfg.admin_dsn
    else:
        dsn = dbcfg.dsn
    return connect_dsn(dsn, dbcfg.passfile, autocommit=autocommit, application_name=application_name)


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn database errors into DnErrors that say what failed; ``what`` names the operation."""
    try:
        yield
    except DnError:
        raise
    except pgerrors.UndefinedTable as e:
        raise OperationFailed(f"{what}: the database schema is missing ({_first_line(e)})",
                              hint="run `dn db init`", where="database") from None
    except pgerrors.UndefinedFunction as e:
        raise OperationFailed(f"{what}: the database schema is out of date ({_first_line(e)})",
                              hint="run `dn db init`", where="database") from None
    except pgerrors.InsufficientPrivilege as e:
        raise OperationFailed(f"{what}: refused by the database: {_first_line(e)}", where="database") from None
    except pgerrors.ObjectInUse as e:  # an OperationalError, but the connection is fine
        raise OperationFailed(f"{what}: refused by the database: {_first_line(e)}", where="database") from None
    except psycopg.OperationalError as e:
        raise Unreachable(f"{what}: lost the database connection: {_first_line(e)}", where="database",
                          hint="check the database and rerun") from None
    except psycopg.Error as e:
        raise OperationFailed(f"{what}: database error: {_first_line(e)}", where="database") from None


def rows(conn: psycopg.Connection, query: str, params: Any = None) -> list[dict[str, Any]]:
    """Run a query and return its rows as dicts."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def row(conn: psycopg.Connection, query: str, params: Any = None) -> dict[str, Any] | None:
    found = rows(conn, query, params)
    return found[0] if found else None


def jsonb(value: Any) -> Jsonb:
    """Wrap JSON data for a jsonb parameter."""
    return Jsonb(value)


# -- advisory locks (dn.locks and dn.audit build on these) --------------------------------------
def try_advisory_lock(conn: psycopg.Connection, key: int) -> bool:
    return bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])


def advisory_lock(conn: psycopg.Connection, key: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the session-level advisory lock ``key``."""
    if try_advisory_lock(conn, key):
        return True
    if timeout <= 0:
        return False
    # lock_timeout bounds the wait inside the server; Ctrl-C cancels the wait (psycopg sends a cancel).
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(timeout * 1000))}ms",))
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        return True
    except pgerrors.LockNotAvailable:
        return False
    finally:
        # After Ctrl-C the cancelled session may refuse this; the original error must win.
        with contextlib.suppress(psycopg.Error):
            if not conn.closed:
                conn.execute("SELECT set_config('lock_timeout', '0', false)")


def advisory_unlock(conn: psycopg.Connection, key: int) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def advisory_holders(conn: psycopg.Connection, key: int) -> list[int]:
    """Backend pids holding the session-level advisory lock ``key`` in this database."""
    u = key & 0xFFFFFFFFFFFFFFFF
    found = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid::bigint = %s AND objid::bigint = %s ORDER BY pid",
        (u >> 32, u & 0xFFFFFFFF),
    ).fetchall()
    return [r[0] for r in found]


# -- migrations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"


def migrations(schema_dir: Path = SCHEMA_DIR) -> list[Migration]:
    """The migration files in order; a misnamed or duplicate file is an error."""
    found: dict[int, Migration] = {}
    for p in sorted(schema_dir.glob("*.sql")):
        m = MIGRATION_RE.match(p.name)
        if not m:
            raise ConfigError(f"{p}: migration files are named NNN_name.sql (lower-case name)")
        v = int(m.group(1))
        if v in found:
            raise ConfigError(f"{p}: migration number {v:03d} is used twice")
        found[v] = Migration(v, m.group(2), p.read_text())
    return [found[v] for v in sorted(found)]


_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text NOT NULL DEFAULT current_user
)"""


ROLE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def role_setup_sql(owner: str, app_login: str) -> list[sql.Composed]:
    """The statements a role-creating role runs once. Idempotent, and they write the catalogue
    only when something is missing (concurrent runs then never collide on the same role)."""
    for field, name in (("database.admin_dsn", owner), ("database.dsn", app_login)):
        if not ROLE_NAME_RE.match(name):
            raise InvalidInput(field, f"role {name!r} must match {ROLE_NAME_RE.pattern} for dn to set up its grants")
    stmts = []
    for role in (AUDIT_OWNER, APP_ROLE, PREVIEW_ROLE):
        stmts.append(sql.SQL(
            "DO $$BEGIN"
            " IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN CREATE ROLE {ident} NOLOGIN;"
            " ELSIF (SELECT rolcanlogin FROM pg_roles WHERE rolname = {lit}) THEN ALTER ROLE {ident} NOLOGIN;"
            " END IF; END$$").format(lit=sql.Literal(role), ident=sql.Identifier(role)))
    for group, member in ((AUDIT_OWNER, owner), (APP_ROLE, app_login)):
        stmts.append(sql.SQL(
            "DO $$BEGIN IF NOT pg_has_role({m}, {g}, 'MEMBER') THEN GRANT {gi} TO {mi}; END IF; END$$").format(
            m=sql.Literal(member), g=sql.Literal(group), gi=sql.Identifier(group), mi=sql.Identifier(member)))
    return stmts


def _roles_missing(conn: psycopg.Connection, owner: str, app_login: str) -> list[str]:
    r = row(conn, """
        SELECT
          EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(ao)s AND NOT rolcanlogin) AS audit_owner,
          EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(app)s AND NOT rolcanlogin) AS app,
          EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(preview)s AND NOT rolcanlogin) AS preview,
          EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(login)s) AS login,
          (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(ao)s)
             AND pg_has_role(%(owner)s, %(ao)s, 'MEMBER')) AS owner_member,
          (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(app)s)
             AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(login)s)
             AND pg_has_role(%(login)s, %(app)s, 'MEMBER')) AS login_member
        """, {"ao": AUDIT_OWNER, "app": APP_ROLE, "preview": PREVIEW_ROLE, "login": app_login, "owner": owner})
    assert r is not None
    missing = []
    if not r["audit_owner"]:
        missing.append(f"NOLOGIN role {AUDIT_OWNER}")
    if not r["app"]:
        missing.append(f"NOLOGIN role {APP_ROLE}")
    if not r["preview"]:
        missing.append(f"NOLOGIN role {PREVIEW_ROLE}")
    if not r["login"]:
        missing.append(f"login role {app_login}")
    if not r["owner_member"]:
        missing.append(f"{owner} as member of {AUDIT_OWNER}")
    if not r["login_member"]:
        missing.append(f"{app_login} as member of {APP_ROLE}")
    return missing


def bootstrap_roles(dsn: str, passfile: Path | None, *, owner: str, app_login: str) -> None:
    """Create the NOLOGIN roles and memberships, connected as a role that may create roles."""
    with connect_dsn(dsn, passfile, application_name="dn db init (roles)") as c, translate_errors("creating roles"):
        for stmt in role_setup_sql(owner, app_login):
            c.execute(stmt)


def _roles_hint(owner: str, app_login: str) -> str:
    return ("as a PostgreSQL superuser run once: "
            f"CREATE ROLE {AUDIT_OWNER} NOLOGIN; CREATE ROLE {APP_ROLE} NOLOGIN; CREATE ROLE {PREVIEW_ROLE} NOLOGIN; "
            f"GRANT {AUDIT_OWNER} TO {owner}; GRANT {APP_ROLE} TO {app_login}; "
            "or rerun with `dn db init --bootstrap-dsn postgresql://SUPERUSER@host:port/db`")


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    sha256: str
    applied_at: datetime
    applied_by: str


def _applied(conn: psycopg.Connection) -> dict[int, AppliedMigration] | None:
    exists = conn.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return None
    return {r["version"]: AppliedMigration(**r) for r in rows(
        conn, "SELECT version, name, sha256, applied_at, applied_by FROM schema_migrations ORDER BY version")}


def _check_unchanged(known: list[Migration], applied: dict[int, AppliedMigration]) -> None:
    by_version = {m.version: m for m in known}
    for v, a in sorted(applied.items()):
        m = by_version.get(v)
        if m is None:
            raise OperationFailed(
                f"the database has migration {v:03d}_{a.name} which this dn does not know",
                hint="run a dn at least as new as the one that migrated this database", where="database")
        if m.sha256 != a.sha256:
            raise OperationFailed(
                f"migration {m.filename} was changed after it was applied (sha256 differs)",
                hint="never edit an applied migration; add a new NNN_name.sql instead", where="database")


def migrate(dbcfg: "DatabaseConfig", *, bootstrap_dsn: str | None = None,
            schema_dir: Path = SCHEMA_DIR, audit_retention_days: int | None = None) -> list[Migration]:
    """Apply the pending migrations as the owner role; returns those applied (idempotent).
    ``audit_retention_days`` (retention.audit_days) becomes the audit prune's floor, which only
    the owner role can set."""
    known = migrations(schema_dir)
    if not dbcfg.admin_dsn:
        raise ConfigError("database.admin_dsn is not set: `dn db init` runs as the database owner role")
    owner = dsn_user(dbcfg.admin_dsn) or "?"
    app_login = dsn_user(dbcfg.dsn) or "?"
    if bootstrap_dsn:
        bootstrap_roles(check_dsn(bootstrap_dsn, "--bootstrap-dsn"), dbcfg.passfile, owner=owner, app_login=app_login)
    done: list[Migration] = []
    with connect(dbcfg, admin=True, application_name="dn db init") as conn, translate_errors("dn db init"):
        missing = _roles_missing(conn, owner, app_login)
        if missing:
            can = row(conn, "SELECT rolsuper OR rolcreaterole AS can FROM pg_roles WHERE rolname = current_user")
            if not (can and can["can"]):
                raise OperationFailed(f"roles missing: {', '.join(missing)}", where="database",
                                      hint=_roles_hint(owner, app_login))
            for stmt in role_setup_sql(owner, app_login):
                conn.execute(stmt)
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        try:
            conn.execute(_MIGRATIONS_TABLE)
            conn.execute(sql.SQL("GRANT SELECT ON schema_migrations TO {}").format(sql.Identifier(APP_ROLE)))
            applied = _applied(conn) or {}
            _check_unchanged(known, applied)
            for m in known:
                if m.version in applied:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(m.sql)
                        conn.execute("INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                                     (m.version, m.name, m.sha256))
                except psycopg.Error as e:
                    raise OperationFailed(f"migration {m.filename} failed and was rolled back: {_first_line(e)}",
                                          where="database") from None
                done.append(m)
            if audit_retention_days is not None:
                conn.execute("SELECT audit_set_retention(%s)", (audit_retention_days,))
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
    return done


@dataclass
class Status:
    target: str
    server_version: str
    role: str
    applied: list[AppliedMigration]
    pending: list[str]
    audit_head: int | None
    locks_held: int | None

    @property
    def current(self) -> bool:
        return not self.pending

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "server_version": self.server_version,
            "role": self.role,
            "applied": [{"version": a.version, "name": a.name, "sha256": a.sha256,
                         "applied_at": a.applied_at.isoformat(), "applied_by": a.applied_by} for a in self.applied],
            "pending": self.pending,
            "current": self.current,
            "audit_head": self.audit_head,
            "locks_held": self.locks_held,
        }


def status(dbcfg: "DatabaseConfig", schema_dir: Path = SCHEMA_DIR) -> Status:
    """What the day-to-day role sees: server, applied and pending migrations, audit head, locks."""
    known = migrations(schema_dir)
    with connect(dbcfg, application_name="dn db status") as conn, translate_errors("dn db status"):
        version = conn.execute("SHOW server_version").fetchone()[0]
        role = conn.execute("SELECT current_user").fetchone()[0]
        applied = _applied(conn) or {}
        _check_unchanged(known, applied)
        pending = [m.filename for m in known if m.version not in applied]
        head = locks = None
        if conn.execute("SELECT to_regclass('public.audit_head') IS NOT NULL").fetchone()[0]:
            head = conn.execute("SELECT seq FROM audit_head").fetchone()[0]
        if conn.execute("SELECT to_regclass('public.op_locks') IS NOT NULL").fetchone()[0]:
            locks = conn.execute("SELECT count(*) FROM op_locks").fetchone()[0]
    return Status(describe_dsn(dbcfg.dsn), version, role, [applied[v] for v in sorted(applied)], pending, head, locks)
