"""PostgreSQL producers and consumers for backups: snapshot, pg_dump, COPY, pg_restore.

Consistency: a backup opens a REPEATABLE READ, READ ONLY transaction, exports its snapshot with
``pg_export_snapshot()`` and keeps the transaction open while ``pg_dump --snapshot`` runs, and
counts every table's rows in that same transaction. The row counts in the manifest therefore
describe exactly the data in the dump.

Platform backups are one ``pg_dump --format=custom`` archive, streamed (never written to disk).

Tenant backups hold one tenant's rows and nothing of the others: a schema-only custom archive of
the whole database plus, for ``tenants`` (the tenant's own row) and every table with a
``tenant_id`` column, the result of ``COPY (SELECT * FROM t WHERE tenant_id = $id) TO STDOUT
(FORMAT binary)`` — all in the one snapshot. Restoring one is: the schema's pre-data section,
the COPYs, then the post-data section (indexes, constraints, triggers), as pg_restore itself
orders a full restore.

Passwords: every tool and connection gets them from the libpq passfile (``PGPASSFILE``); DSNs
never hold one (dn.config refuses them).
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from dn.errors import ConfigError, InvalidInput, OperationFailed

PIPE_SIZE = 1 << 20  # a larger pipe lets pg_dump run ahead while dn encrypts and uploads
STDERR_TAIL = 1500
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def pg_tool(name: str) -> str:
    """The newest PostgreSQL client binary ``name`` (pg_dump, pg_restore): Debian's versioned
    directories first, then PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if not path:
        raise ConfigError(f"{name} not found", hint="install the PostgreSQL client (apt-get install postgresql-client)")
    return path


def libpq_env(passfile: Path | None, application: str) -> dict[str, str]:
    env = dict(os.environ)
    if passfile is not None:
        env["PGPASSFILE"] = str(passfile)
        env.pop("PGPASSWORD", None)  # the configured passfile wins over a stray variable
    env["PGAPPNAME"] = application[:63]
    return env


def _tail(b: bytes) -> str:
    text = b.decode("utf-8", "replace").strip()
    return text if len(text) <= STDERR_TAIL else "…" + text[-STDERR_TAIL:]


def table_key(schema: str, name: str) -> str:
    return f"{schema}.{name}"


# -- the snapshot -------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """An open REPEATABLE READ transaction whose snapshot pg_dump and the counts share."""

    conn: Any
    id: str
    at: datetime
    database: str
    server_version: str
    schema_version: int | None
    tables: list[tuple[str, str, str]] = field(default_factory=list)  # (schema, name, quoted)


@contextlib.contextmanager
def snapshot(dsn: str, passfile: Path | None) -> Iterator[Snapshot]:
    """Open the snapshot transaction; it stays open until the ``with`` block ends."""
    from dn import db

    conn = db.connect_dsn(dsn, passfile, autocommit=True, application_name="dn backup (snapshot)")
    try:
        with db.translate_errors("taking the backup snapshot"):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            sid, at, dbname, version = conn.execute(
                "SELECT pg_export_snapshot(), clock_timestamp(), current_database(), current_setting('server_version')"
            ).fetchone()
            tables = [tuple(r) for r in conn.execute(
                "SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                " AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'"
                " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
                "                 AND d.objid = c.oid AND d.deptype = 'e')"
                " ORDER BY 1, 2").fetchall()]
            schema_version = None
            if conn.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL").fetchone()[0]:
                schema_version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        yield Snapshot(conn, sid, at, dbname, version, schema_version, tables)
    finally:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        conn.close()


def count_rows(conn, tables: list[tuple[str, str, str]], where: str = "", params: tuple = ()) -> dict[str, int]:
    """Rows per table (``schema.table`` -> n) on ``conn``, optionally filtered by ``where``."""
    from dn import db

    out = {}
    with db.translate_errors("counting rows"):
        for schema, name, quoted in tables:
            out[table_key(schema, name)] = conn.execute(f"SELECT count(*) FROM {quoted} {where}", params).fetchone()[0]
    return out


# -- producers ----------------------------------------------------------------------------------
class Producer:
    """A child process whose stdout is the artifact; :meth:`read` streams it, :meth:`finish`
    checks the exit status (a dump is only good if the tool says so)."""

    def __init__(self, argv: list[str], env: dict[str, str], what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd="/")
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._err = bytearray()
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._err += line
            if len(self._err) > 64 * STDERR_TAIL:
                del self._err[: len(self._err) - 4 * STDERR_TAIL]

    def read(self, n: int) -> bytes:
        return self.proc.stdout.read(n)

    def finish(self) -> None:
        self.proc.stdout.close()
        rc = self.proc.wait()
        self._t.join(timeout=10)
        if rc != 0:
            raise OperationFailed(f"{self.what} failed (exit {rc}): {_tail(bytes(self._err))}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(Exception):
            self.proc.stdout.close()


def pg_dump(dsn: str, passfile: Path | None, snapshot_id: str, *, schema_only: bool = False) -> Producer:
    argv = [pg_tool("pg_dump"), "--format=custom", f"--snapshot={snapshot_id}", "--no-password"]
    if schema_only:
        argv.append("--schema-only")
    argv += ["--dbname", dsn]
    return Producer(argv, libpq_env(passfile, "dn backup (pg_dump)"), "pg_dump")


def tenant_row_id(conn, slug: str) -> int:
    from dn import db

    with db.translate_errors(f"looking up tenant {slug}"):
        r = conn.execute("SELECT id FROM tenants WHERE slug = %s", (slug,)).fetchone()
    if r is None:
        raise InvalidInput("tenant", f"no tenant {slug!r} in the platform database")
    return r[0]


def tenant_tables(conn, all_tables: list[tuple[str, str, str]]) -> list[tuple[str, str, str, str]]:
    """(schema, name, quoted, filter column) for ``tenants`` and every table with ``tenant_id``."""
    from dn import db

    with db.translate_errors("finding tenant tables"):
        with_col = {(r[0], r[1]) for r in conn.execute(
            "SELECT n.nspname, c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE a.attname = 'tenant_id' AND NOT a.attisdropped AND c.relkind = 'r'").fetchall()}
    out = []
    for schema, name, quoted in all_tables:
        if (schema, name) == ("public", "tenants"):
            out.append((schema, name, quoted, "id"))
        elif (schema, name) in with_col:
            out.append((schema, name, quoted, "tenant_id"))
    if not any(t[1] == "tenants" for t in out):
        raise OperationFailed("the platform database has no public.tenants table: not a dn database?")
    return out


def copy_out(conn, quoted: str, column: str, tenant_id: int) -> Iterator[bytes]:
    """The tenant's rows of one table, as PostgreSQL binary COPY data, block by block."""
    from dn import db

    if not _IDENT.fullmatch(column):
        raise ValueError("bad column")
    with db.translate_errors(f"copying {quoted}"):
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT * FROM {quoted} WHERE {column} = %s) TO STDOUT (FORMAT binary)",
                          (tenant_id,)) as cp:
                for block in cp:
                    yield bytes(block)


# -- consumers ----------------------------------------------------------------------------------
def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def database_exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn, name: str, *, connect_to: list[str] = ()) -> None:
    """Create an empty database owned by the connected role, closed to PUBLIC."""
    from dn import db

    with db.translate_errors(f"creating database {name}"):
        can = conn.execute("SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        if not can:
            role = conn.execute("SELECT current_user").fetchone()[0]
            raise OperationFailed(
                f"role {role} may not create databases, which restores and drills need",
                hint=f"as a PostgreSQL superuser: ALTER ROLE {role} CREATEDB",
                runbook="disaster-recovery#database-privileges",
            )
        conn.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0 ENCODING 'UTF8'")
        conn.execute(f"REVOKE ALL ON DATABASE {quote_ident(name)} FROM PUBLIC")
        for role in connect_to:
            conn.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {quote_ident(name)} TO {quote_ident(role)}")


def drop_database(conn, name: str) -> None:
    from dn import db

    with db.translate_errors(f"dropping database {name}"):
        conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


def with_dbname(dsn: str, dbname: str) -> str:
    """``dsn`` pointing at another database of the same server (URL or key=value form)."""
    if re.match(r"^postgres(ql)?://", dsn):
        u = urlsplit(dsn)
        return urlunsplit((u.scheme, u.netloc, "/" + quote(dbname, safe=""), u.query, u.fragment))
    # key=value form: libpq takes the last value of a repeated keyword
    return f"{dsn} dbname='" + dbname.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dsn_dbname(dsn: str) -> str | None:
    """The database a DSN names (None: libpq's default, the user name)."""
    if re.match(r"^postgres(ql)?://", dsn):
        path = unquote(urlsplit(dsn).path.lstrip("/"))
        return path or None
    found = re.findall(r"(?:^|\s)dbname\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
    if not found:
        return None
    v = found[-1]
    return re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith("'") else v


def archive_owners(archive: Path) -> set[str]:
    """Roles that own objects in a custom-format archive (from ``pg_restore --list``)."""
    r = subprocess.run([pg_tool("pg_restore"), "--list", str(archive)], capture_output=True, cwd="/")
    if r.returncode:
        raise OperationFailed(f"pg_restore --list {archive.name} failed: {_tail(r.stderr)}")
    owners = set()
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith(";") or not line.strip():
            continue
        parts = line.split()
        # "<id>; <oid> <oid> <TYPE ...> <schema> <name> <owner>"
        if len(parts) >= 6 and parts[-1] != "-":
            owners.add(parts[-1])
    return owners


def pg_restore(archive: Path, dsn: str, passfile: Path | None, *, jobs: int = 2, section: str | None = None,
               no_owner: bool = False, cancel: threading.Event | None = None,
               started: Callable[[subprocess.Popen], None] | None = None) -> None:
    """Restore ``archive`` into the database of ``dsn``; stop at the first error."""
    argv = [pg_tool("pg_restore"), "--exit-on-error", "--no-password", f"--jobs={jobs}"]
    if section:
        argv.append(f"--section={section}")
    if no_owner:
        argv.append("--no-owner")
    argv += ["--dbname", dsn, str(archive)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=libpq_env(passfile, "dn restore (pg_restore)"), cwd="/")
    if started:
        started(proc)
    try:
        _, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise OperationFailed(f"pg_restore of {archive.name} failed (exit {proc.returncode}): {_tail(err)}")


def copy_in(conn, quoted: str, read: Callable[[int], bytes], block: int = 1 << 20) -> None:
    from dn import db

    with db.translate_errors(f"loading {quoted}"):
        with conn.cursor() as cur:
            with cur.copy(f"COPY {quoted} FROM STDIN (FORMAT binary)") as cp:
                while True:
                    b = read(block)
                    if not b:
                        break
                    cp.write(b)

