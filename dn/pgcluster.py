"""A local PostgreSQL cluster for the sandbox and the tests.

Runs Debian's PostgreSQL binaries as the ``postgres`` OS user on 127.0.0.1 only, with
scram-sha-256 passwords generated here and written to a libpq password file (mode 0600), so no
DSN and no argv ever carries a password. Roles:

- ``postgres``  superuser (tests use it to tamper with tables, as an attacker with DB access would)
- ``dn_owner``  owns the ``dn`` database and its schema; used by ``dn db init``
- ``dn``        the role dn runs as day to day (grants are set by the schema migrations)
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dn.errors import OperationFailed

ROLES = ("postgres", "dn_owner", "dn")


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise OperationFailed(
            "PostgreSQL server binaries not found", hint="apt-get install postgresql (see scripts/setup)"
        )
    return Path(found[-1]).parent


@dataclass(frozen=True)
class Cluster:
    root: Path  # holds data/, run/, log
    port: int
    passfile: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def dsn(self, role: str = "dn", db: str = "dn") -> str:
        return f"postgresql://{role}@127.0.0.1:{self.port}/{db}"

    # -- lifecycle -------------------------------------------------------------------------
    def _as_postgres(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        pw = pwd.getpwnam("postgres")

        def demote() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

        return subprocess.run(argv, preexec_fn=demote if os.getuid() == 0 else None, cwd="/",
                              capture_output=True, text=True, **kw)

    def running(self) -> bool:
        r = subprocess.run([str(_bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"])
        return r.returncode == 0

    def ensure(self) -> "Cluster":
        """Create (once) and start the cluster; idempotent."""
        bindir = _bindir()
        pw = pwd.getpwnam("postgres")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.run_dir.mkdir(exist_ok=True)
        os.chown(self.run_dir, pw.pw_uid, pw.pw_gid)
        passwords = self._passwords()
        if not (self.data / "PG_VERSION").exists():
            pwfile = self.root / ".initpw"
            pwfile.write_text(passwords["postgres"] + "\n")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
            os.chmod(pwfile, 0o600)
            try:
                r = self._as_postgres([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                                       "--pwfile", str(pwfile), "--auth-local=scram-sha-256",
                                       "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
            finally:
                pwfile.unlink(missing_ok=True)
            if r.returncode:
                raise OperationFailed(f"initdb failed: {r.stderr.strip()[-400:]}")
            with open(self.data / "postgresql.auto.conf", "a") as f:
                f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                        f"unix_socket_directories = '{self.run_dir}'\n"
                        "log_min_messages = warning\nlog_lock_waits = on\n")
        if not self.running():
            r = self._as_postgres([str(bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                                   "-w", "-t", "60", "start"])
            if r.returncode:
                log = (self.root / "log").read_text()[-600:] if (self.root / "log").exists() else ""
                raise OperationFailed(f"PostgreSQL did not start: {r.stderr.strip()[-300:]} {log}")
        self._ensure_roles(passwords)
        return self

    def stop(self) -> None:
        if (self.data / "PG_VERSION").exists() and self.running():
            self._as_postgres([str(_bindir() / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"])

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        self.passfile.unlink(missing_ok=True)

    # -- roles and passwords ---------------------------------------------------------------
    def _passwords(self) -> dict[str, str]:
        """Passwords from the passfile, generating the missing ones (kept 0600, never logged)."""
        found: dict[str, str] = {}
        if self.passfile.exists():
            for line in self.passfile.read_text().splitlines():
                parts = line.split(":")
                if len(parts) == 5 and parts[1] == str(self.port):
                    found[parts[3]] = parts[4]
        for role in ROLES:
            found.setdefault(role, secrets.token_urlsafe(24))
        self.passfile.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"127.0.0.1:{self.port}:*:{r}:{found[r]}" for r in ROLES]
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.passfile, 0o600)
        return found

    def _ensure_roles(self, passwords: dict[str, str]) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres", "postgres"), passfile=str(self.passfile), autocommit=True) as c:
            for role in ("dn_owner", "dn"):
                exists = c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                verb = "ALTER" if exists else "CREATE"
                c.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(passwords[role])))
            # Restore drills and restores create scratch/staging databases as the owner role.
            c.execute("ALTER ROLE dn_owner CREATEDB")
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = 'dn'").fetchone():
                c.execute("CREATE DATABASE dn OWNER dn_owner")
            c.execute("REVOKE ALL ON DATABASE dn FROM PUBLIC")
            c.execute("GRANT CONNECT, TEMPORARY ON DATABASE dn TO dn")
