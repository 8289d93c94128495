"""Restore drills and real restores: the same path, so every drill rehearses the disaster.

A drill takes the newest platform backup (or the one named), and:

1. downloads each artifact, checking its SHA-256 and size against the manifest while decrypting
   it (each chunk authenticates before its plaintext is written) into a private work directory;
2. creates the scratch database ``dn_drill_<backup id>`` next to the production database (never
   the production database itself), closed to PUBLIC;
3. restores with ``pg_restore --jobs=2`` (tenant backups: schema, COPY, then constraints);
4. compares every table's row count with the manifest and runs the sanity checks;
5. always drops the scratch database and the work directory — on success, failure, Ctrl-C or
   SIGTERM (a crash that skips even that is cleaned up by the next drill).

RPO is the age of the newest platform backup when the drill starts; RTO is the wall time from
the start of the download to a verified, queryable database. Both are compared with the
thresholds (24 h and 4 h by default, the trust page's promise). The JSON report goes into the
drill history under ``<data_dir>/dr/drills/`` and a verdict next to the backup in the store.

A real restore (:func:`restore`) runs steps 1, 3 and 4 into a staging database on the target
server, then swaps it in by renaming: the old database, if any, is kept under another name.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from dn import alert
from dn.backup import crypto, dump, keys, schedule
from dn.backup.manifest import Manifest, check_backup_id
from dn.backup.run import Progress, open_store, source_dsn
from dn.backup.store import Store
from dn.errors import DnError, InvalidInput, OperationFailed, Unreachable

if TYPE_CHECKING:
    from dn.config import Settings

DEFAULT_MAX_RPO = timedelta(hours=24)
DEFAULT_MAX_RTO = timedelta(hours=4)
OVERDUE_GRACE = timedelta(hours=24)
SCRATCH_PREFIX = "dn_drill_"


def _quiet(_: str) -> None:
    pass


# -- sanity checks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A query over the restored database that returns the rows violating an expectation."""

    name: str
    sql: str
    requires: tuple[str, ...] = ()  # tables that must exist for the check to apply


BUILTIN_CHECKS = (
    Check("indexes are valid", "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid"),
    Check("constraints are validated",
          "SELECT conrelid::regclass::text || ' ' || conname FROM pg_constraint WHERE NOT convalidated"),
    Check("audit chain head matches the log",
          "SELECT h.seq FROM audit_head h WHERE h.seq <> coalesce((SELECT max(seq) FROM audit_log), h.seq)"
          " OR (h.seq > 0 AND NOT EXISTS (SELECT 1 FROM audit_log l WHERE l.seq = h.seq AND l.hash = h.hash))",
          ("public.audit_head", "public.audit_log")),
    Check("every tenant-bound row has its tenant",
          "SELECT 'users' FROM users u WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = u.tenant_id) LIMIT 1",
          ("public.users", "public.tenants")),
)


def load_checks(path: Path | None) -> list[Check]:
    """The built-in checks plus those of a TOML file: ``[[check]] name = "..." sql = "..."``."""
    checks = list(BUILTIN_CHECKS)
    if path is None:
        return checks
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput("--checks", f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput("--checks", f"{path}: not valid TOML: {e}") from None
    extra = doc.get("check", [])
    if not isinstance(extra, list):
        raise InvalidInput("--checks", f"{path}: expected [[check]] tables")
    for i, c in enumerate(extra):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("sql"), str):
            raise InvalidInput("--checks", f"{path}: check {i + 1} needs a string name and a string sql")
        unknown = set(c) - {"name", "sql", "requires"}
        if unknown:
            raise InvalidInput("--checks", f"{path}: check {c['name']!r} has unknown keys {sorted(unknown)}")
        checks.append(Check(c["name"], c["sql"], tuple(c.get("requires", ()))))
    return checks


# -- interruption --------------------------------------------------------------------------------
@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end a drill like Ctrl-C does, so every ``finally`` runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Cleanup must finish: hold off Ctrl-C/SIGTERM/SIGHUP while it runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- fetching ------------------------------------------------------------------------------------
def find_key(ks: keys.KeyStore, store: Store, m: Manifest) -> bytes:
    """The manifest's data key, from the keystore or, when this machine lacks it, from the escrow
    copy in the backup region (unlocked with the passphrase); the manifest is not checked here.
    Raises :class:`crypto.MissingKey`, or the keystore's error (no passphrase, a wrong one)."""
    kid = bytes.fromhex(m.key.id)
    key = ks.lookup(kid)
    if key is None:
        raw = store.get_key(m.key.owner)
        if raw is not None:
            ks.import_wrapped(m.key.owner, raw)
            key = ks.lookup(kid)
    if key is None:
        gone = m.key.id in ks.destroyed_key_ids() or m.key.id in store.destroyed_key_ids()
        raise crypto.MissingKey(
            f"backup {m.id}: its key {m.key.id} ({m.key.owner}) is "
            + ("destroyed (crypto-shredded); the backup is unreadable by design" if gone
               else "neither in the keystore nor in the backup region's escrow"),
            hint=None if gone else "restore <data_dir>/backup-keys from where it is kept, with the same passphrase",
            runbook="disaster-recovery#keys-and-passphrase",
        )
    return key


def key_lookup(ks: keys.KeyStore, store: Store, m: Manifest) -> Callable[[bytes], bytes | None]:
    """The artifacts' key lookup of a backup whose manifest authenticates with its data key
    (:func:`find_key`); raises :class:`crypto.WrongKey` when it does not, before anything is restored."""
    kid = bytes.fromhex(m.key.id)
    key = find_key(ks, store, m)
    try:
        m.verify(key)
    except OperationFailed:
        raise crypto.WrongKey(
            f"backup {m.id}: the manifest does not authenticate with key {m.key.id}: either the manifest was "
            "changed after the backup was made, or this keystore's key is not the one that made it",
            hint="do not use this backup; check the keystore and who can write to the backup region",
            runbook="disaster-recovery#keys-and-passphrase",
        ) from None
    return lambda k: key if k == kid else ks.lookup(k)


def fetch(store: Store, m: Manifest, lookup: Callable[[bytes], bytes | None], workdir: Path,
          on_bytes: Callable[[int], None] = lambda n: None) -> dict[str, Path]:
    """Download, verify and decrypt every artifact into ``workdir``; name the first bad one."""
    files: dict[str, Path] = {}
    for a in m.artifacts:
        out = workdir / a.name.removesuffix(".enc")
        reader = store.open_artifact(m.id, a.name)
        try:
            if reader.size != a.size:
                raise crypto.IntegrityError(
                    f"artifact {a.name} of backup {m.id}: {reader.size} bytes stored, the manifest says {a.size}"
                    + (" (truncated)" if reader.size < a.size else ""),
                    hint="the backup is damaged; use another backup")
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                def sink(b: bytes) -> None:
                    f.write(b)
                    on_bytes(len(b))

                stats = crypto.decrypt_stream(reader.read, sink, lookup, context=m.context(a.name),
                                              name=f"{a.name} of backup {m.id}")
        finally:
            reader.close()
        if stats.cipher_sha256 != a.sha256 or stats.cipher_size != a.size:
            raise crypto.IntegrityError(f"artifact {a.name} of backup {m.id}: SHA-256 differs from the manifest")
        if stats.plain_sha256 != a.plain_sha256 or stats.plain_size != a.plain_size:
            raise crypto.IntegrityError(f"artifact {a.name} of backup {m.id}: plaintext SHA-256 differs from the manifest")
        files[a.name] = out
    return files


# -- restoring -----------------------------------------------------------------------------------
def _archive_acl_sql(archive: Path, workdir: Path) -> str:
    """The SQL of the archive's ACL entry for schema public (empty if it has none)."""
    pr = dump.pg_tool("pg_restore")
    lst = subprocess.run([pr, "--list", str(archive)], capture_output=True, text=True, cwd="/")
    lines = [ln for ln in lst.stdout.splitlines() if " ACL - SCHEMA public " in ln]
    if not lines:
        return ""
    listfile = workdir / "acl.list"
    listfile.write_text("\n".join(lines) + "\n")
    r = subprocess.run([pr, "-L", str(listfile), "-f", "-", str(archive)], capture_output=True, text=True, cwd="/")
    return r.stdout


def _restore_archive(archive: Path, dsn: str, passfile: Path | None, jobs: int, workdir: Path,
                     section: str | None = None) -> None:
    """pg_restore keeping object owners. A non-superuser may hand a table to a role it belongs to
    only if that role may create in the schema, which the archive grants only at the end: grant it
    for the duration and take back what the archive itself does not grant."""
    from dn import db

    owners = dump.archive_owners(archive)
    granted: list[str] = []
    with db.connect_dsn(dsn, passfile, application_name="dn restore (grants)") as c, db.translate_errors("preparing the restore"):
        me, superuser = c.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not superuser:
            for role in sorted(owners - {me}):
                if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                    raise OperationFailed(
                        f"role {role}, which owns objects in the backup, does not exist on the target server",
                        hint="create dn's roles first: `dn db init` (with --bootstrap-dsn on a new server)",
                        runbook="disaster-recovery#database-privileges")
                if not c.execute("SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)).fetchone()[0]:
                    c.execute(f"GRANT CREATE ON SCHEMA public TO {dump.quote_ident(role)}")
                    granted.append(role)
    dump.pg_restore(archive, dsn, passfile, jobs=jobs, section=section)
    if granted and section != "pre-data":
        acl = _archive_acl_sql(archive, workdir)
        with db.connect_dsn(dsn, passfile, application_name="dn restore (grants)") as c, db.translate_errors("finishing the restore"):
            for role in granted:
                if not re.search(rf"GRANT (ALL|[A-Z, ]*\bCREATE\b[A-Z, ]*) ON SCHEMA public TO {re.escape(role)};", acl):
                    c.execute(f"REVOKE CREATE ON SCHEMA public FROM {dump.quote_ident(role)}")


def _reset_identities(conn) -> None:
    """After COPY, move identity and serial sequences past the restored ids."""
    cols = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname), a.attname,"
        " pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " AND pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname) IS NOT NULL").fetchall()
    for table, col, seq in cols:
        conn.execute(f"SELECT setval(%s, coalesce((SELECT max({dump.quote_ident(col)}) FROM {table}), 0) + 1, false)",
                     (seq,))


def restore_into(m: Manifest, files: dict[str, Path], dsn: str, passfile: Path | None, *, jobs: int,
                 workdir: Path) -> None:
    """Restore a fetched backup into the (empty) database of ``dsn``."""
    from dn import db

    if m.kind == "platform":
        _restore_archive(files["platform.dump.enc"], dsn, passfile, jobs, workdir)
        return
    schema = files["schema.dump.enc"]
    _restore_archive(schema, dsn, passfile, 1, workdir, section="pre-data")
    with db.connect_dsn(dsn, passfile, application_name="dn restore (copy)") as c:
        quoted = {f"{s}.{t}": q for s, t, q in
                  (tuple(r) for r in c.execute("SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname)"
                                               " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                               " WHERE c.relkind = 'r'").fetchall())}
        for a in m.artifacts:
            if a.kind != "copy-binary":
                continue
            if a.table not in quoted:
                raise OperationFailed(f"backup {m.id}: table {a.table} of {a.name} is not in the backup's schema")
            with open(files[a.name], "rb") as f:
                dump.copy_in(c, quoted[a.table], f.read)
        with db.translate_errors("resetting sequences"):
            _reset_identities(c)
    _restore_archive(schema, dsn, passfile, jobs, workdir, section="post-data")


def verify_restored(conn, m: Manifest, checks: list[Check]) -> tuple[dict, list[dict], list[str]]:
    """Row counts against the manifest, then the sanity checks. Returns (tables, checks, failures)."""
    from dn import db

    failures: list[str] = []
    present = {f"{s}.{t}": q for s, t, q in (tuple(r) for r in conn.execute(
        "SELECT n.nspname, c.relname, format('%I.%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema')").fetchall())}
    tables = {}
    for name, expected in sorted(m.tables.items()):
        if name not in present:
            tables[name] = {"expected": expected, "restored": None, "ok": False}
            failures.append(f"table {name} is missing from the restored database")
            continue
        with db.translate_errors(f"counting {name}"):
            got = conn.execute(f"SELECT count(*) FROM {present[name]}").fetchone()[0]
        tables[name] = {"expected": expected, "restored": got, "ok": got == expected}
        if got != expected:
            failures.append(f"table {name}: {got} rows restored, the manifest says {expected}")
    if m.kind == "platform":
        for extra in sorted(set(present) - set(m.tables)):
            failures.append(f"table {extra} was restored but is not in the manifest")
    results = []
    for chk in checks:
        if any(t not in present for t in chk.requires):
            results.append({"name": chk.name, "ok": True, "skipped": "tables not in this backup"})
            continue
        try:
            with conn.transaction():
                bad = conn.execute(chk.sql).fetchall()
            results.append({"name": chk.name, "ok": not bad, "violations": len(bad)})
            if bad:
                failures.append(f"sanity check {chk.name!r}: {len(bad)} violation(s)")
        except Exception as e:  # a broken check is a failed drill, with the database's reason
            reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
            results.append({"name": chk.name, "ok": False, "error": reason})
            failures.append(f"sanity check {chk.name!r} could not run: {reason}")
    return tables, results, failures


# -- the drill -----------------------------------------------------------------------------------
def scratch_name(backup_id: str) -> str:
    return SCRATCH_PREFIX + backup_id.lower().replace("-", "_")


def history_dir(settings: "Settings") -> Path:
    return Path(settings.data_dir) / "dr" / "drills"


def _private_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


def write_report(settings: "Settings", report: dict) -> Path:
    d = _private_dir(history_dir(settings))
    path = d / f"{report['started_at'][:19].replace(':', '').replace('-', '')}Z-{report['drill_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def history(settings: "Settings") -> list[dict]:
    """Every recorded drill, oldest first (unreadable files are reported as such)."""
    d = history_dir(settings)
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (ValueError, OSError):
            out.append({"file": str(p), "result": "unreadable"})
    return out


def last_drill(settings: "Settings") -> dict | None:
    """The newest drill report (what `dn verify` shows as the DR evidence), or None."""
    h = [r for r in history(settings) if "started_at" in r]
    return h[-1] if h else None


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def run_drill(
    settings: "Settings",
    environ: Mapping[str, str],
    *,
    backup_id: str | None = None,
    max_rpo: timedelta = DEFAULT_MAX_RPO,
    max_rto: timedelta = DEFAULT_MAX_RTO,
    checks: list[Check] | None = None,
    jobs: int = 2,
    server_dsn: str | None = None,
    progress: Progress = _quiet,
    on_bytes: Callable[[int], None] = lambda n: None,
    store: Store | None = None,
    notify: bool = True,
) -> dict:
    """Run one drill; always returns the report (also written to the history) unless the drill
    could not even start. The report's ``result`` is ``passed``, ``failed`` or ``breach``."""
    from dn import db

    if backup_id is not None:
        check_backup_id(backup_id, "--backup")
    checks = list(BUILTIN_CHECKS) if checks is None else checks
    server = server_dsn or source_dsn(settings)
    passfile = settings.database.passfile
    started = datetime.now(timezone.utc)
    drill_id = uuid.uuid4().hex[:12]
    report: dict = {
        "drill_id": drill_id, "started_at": _iso(started), "result": "failed", "failures": [], "breaches": [],
        "thresholds": {"max_rpo_seconds": int(max_rpo.total_seconds()), "max_rto_seconds": int(max_rto.total_seconds())},
        "phases": {}, "tables": {}, "checks": [], "server": db.describe_dsn(server),
    }
    ks = keys.keystore(settings, environ)
    workdir = _private_dir(Path(settings.data_dir) / "dr" / "work") / drill_id
    scratch: str | None = None
    admin = None
    own_store = store is None
    try:
        with _terminate_as_interrupt():
            try:
                if own_store:
                    store = open_store(settings, progress=progress)
                listings = [lst for lst in store.list() if lst.manifest is not None]
                platform = [lst for lst in listings if lst.manifest.kind == "platform"]
                newest = platform[-1] if platform else None
                if newest is not None:
                    rpo = (started - newest.created).total_seconds()
                    report["newest_backup"] = {"id": newest.id, "snapshot_at": _iso(newest.created)}
                    report["rpo_seconds"] = int(rpo)
                    if rpo > max_rpo.total_seconds():
                        report["breaches"].append(
                            f"RPO: the newest backup is {rpo / 3600:.1f} h old, more than {max_rpo.total_seconds() / 3600:g} h")
                else:
                    report["breaches"].append("RPO: there is no platform backup at all")
                if backup_id is None:
                    if newest is None:
                        raise OperationFailed("no platform backup to drill", hint="run `dn backup run` first")
                    backup_id = newest.id
                m = store.manifest(backup_id)
                report["backup"] = {"id": m.id, "kind": m.kind, "tenant": m.tenant, "snapshot_at": _iso(m.snapshot_at),
                                    "size": m.size, "key_id": m.key.id}
                lookup = key_lookup(ks, store, m)
                progress(f"drilling backup {m.id} ({m.size} bytes, {len(m.tables)} tables)")
                t0 = time.monotonic()
                _private_dir(workdir)
                files = fetch(store, m, lookup, workdir, on_bytes)
                t1 = time.monotonic()
                report["phases"]["download_verify_decrypt"] = round(t1 - t0, 3)
                progress(f"downloaded, verified and decrypted in {t1 - t0:.1f}s")
                admin = db.connect_dsn(server, passfile, application_name="dn dr drill")
                with db.translate_errors("listing scratch databases"):
                    stale = [r[0] for r in admin.execute(
                        "SELECT datname FROM pg_database WHERE datname LIKE 'dn\\_drill\\_%'").fetchall()]
                for name in stale:
                    progress(f"dropping {name}, left by an earlier drill that did not finish")
                    dump.drop_database(admin, name)
                scratch = scratch_name(m.id)
                report["scratch_database"] = scratch
                dump.create_database(admin, scratch)
                scratch_dsn = dump.with_dbname(server, scratch)
                restore_into(m, files, scratch_dsn, passfile, jobs=jobs, workdir=workdir)
                t2 = time.monotonic()
                report["phases"]["restore"] = round(t2 - t1, 3)
                progress(f"restored into {scratch} in {t2 - t1:.1f}s")
                with db.connect_dsn(scratch_dsn, passfile, application_name="dn dr drill (verify)") as c:
                    tables, results, failures = verify_restored(c, m, checks)
                t3 = time.monotonic()
                report["phases"]["verify"] = round(t3 - t2, 3)
                report["tables"], report["checks"] = tables, results
                report["failures"] += failures
                report["rto_seconds"] = round(t3 - t0, 3)
                report["throughput_bytes_per_second"] = int(m.size / max(t3 - t0, 1e-6))
                if report["rto_seconds"] > max_rto.total_seconds():
                    report["breaches"].append(
                        f"RTO: the restore took {report['rto_seconds'] / 3600:.2f} h, more than {max_rto.total_seconds() / 3600:g} h")
            except DnError as e:
                report["failures"].append(str(e))
            except KeyboardInterrupt:
                report["failures"].append("interrupted")
                report["interrupted"] = True
    finally:
        with _uninterruptible():
            tc = time.monotonic()
            if scratch is not None and admin is not None:
                try:
                    dump.drop_database(admin, scratch)
                    report["scratch_dropped"] = True
                except DnError as e:
                    report["scratch_dropped"] = False
                    report["failures"].append(f"could not drop {scratch}: {e} (the next drill drops it)")
            if admin is not None:
                admin.close()
            shutil.rmtree(workdir, ignore_errors=True)
            report["phases"]["cleanup"] = round(time.monotonic() - tc, 3)
            report["finished_at"] = _iso(datetime.now(timezone.utc))
            report["result"] = "failed" if report["failures"] else ("breach" if report["breaches"] else "passed")
            if store is not None and "backup" in report:
                with contextlib.suppress(DnError):
                    store.record_drill(report["backup"]["id"], {
                        "ok": report["result"] != "failed", "drill_id": drill_id, "at": report["started_at"],
                        "rto_seconds": report.get("rto_seconds"), "result": report["result"]})
            if own_store and store is not None:
                store.close()
            if notify and report["result"] != "passed":
                report["alerts"] = alert.send(settings.alert, f"[dn] DR drill {report['result'].upper()}", report,
                                              summary(report), environ)
            report["history_file"] = str(write_report(settings, report))
    if report.get("interrupted"):
        raise KeyboardInterrupt
    return report


def summary(report: dict) -> str:
    """The human summary of a drill report."""
    lines = [f"DR drill {report['drill_id']}: {report['result'].upper()}"]
    b = report.get("backup")
    if b:
        lines.append(f"  backup      {b['id']} ({b['kind']}{', ' + b['tenant'] if b.get('tenant') else ''}, "
                     f"{b['size']} bytes, snapshot {b['snapshot_at']})")
    if "rpo_seconds" in report:
        lines.append(f"  RPO         {report['rpo_seconds'] / 3600:.2f} h (max {report['thresholds']['max_rpo_seconds'] / 3600:g} h)")
    if "rto_seconds" in report:
        lines.append(f"  RTO         {report['rto_seconds']:.1f} s (max {report['thresholds']['max_rto_seconds'] / 3600:g} h)")
    if report.get("phases"):
        lines.append("  phases      " + ", ".join(f"{k} {v:.1f}s" for k, v in report["phases"].items()))
    if report.get("tables"):
        ok = sum(1 for t in report["tables"].values() if t["ok"])
        rows = sum(t["expected"] for t in report["tables"].values())
        lines.append(f"  tables      {ok}/{len(report['tables'])} match the manifest ({rows} rows)")
    if report.get("checks"):
        ok = sum(1 for c in report["checks"] if c["ok"])
        lines.append(f"  checks      {ok}/{len(report['checks'])} passed")
    if "scratch_database" in report:
        lines.append(f"  scratch     {report['scratch_database']} "
                     + ("dropped" if report.get("scratch_dropped") else "NOT dropped"))
    for f in report.get("failures", []):
        lines.append(f"  FAILURE     {f}")
    for br in report.get("breaches", []):
        lines.append(f"  BREACH      {br}")
    return "\n".join(lines)


# -- status --------------------------------------------------------------------------------------
def status(settings: "Settings", environ: Mapping[str, str], *, max_rpo: timedelta = DEFAULT_MAX_RPO,
           now: datetime | None = None, store: Store | None = None) -> dict:
    """Last backup age, last drill, next scheduled drill, and what is wrong (``alarms``)."""
    now = now or datetime.now(timezone.utc)
    out: dict = {"now": _iso(now), "alarms": []}
    cal = schedule.parse(settings.schedules.drill)
    last = last_drill(settings)
    passed = [r for r in history(settings) if r.get("result") in ("passed", "breach") and "started_at" in r]
    last_ok = passed[-1] if passed else None
    out["schedule"] = settings.schedules.drill
    nxt = cal.next_after(now)
    out["next_drill"] = _iso(nxt) if nxt else None
    out["last_drill"] = None if last is None else {
        k: last.get(k) for k in ("drill_id", "started_at", "result", "rto_seconds", "rpo_seconds", "failures", "breaches")
    } | {"backup": (last.get("backup") or {}).get("id")}
    if last_ok is None:
        out["drill_overdue"] = True
        out["alarms"].append("no restore drill has ever succeeded")
    else:
        due = cal.next_after(datetime.fromisoformat(last_ok["started_at"]))
        overdue = due is not None and now > due + OVERDUE_GRACE
        out["drill_overdue"] = overdue
        if overdue:
            out["alarms"].append(f"the monthly restore drill is overdue: one was due at {_iso(due)}")
    if last is not None and last.get("result") == "failed":
        out["alarms"].append(f"the last drill ({last['started_at']}) FAILED")
    own = store is None
    try:
        store = store or open_store(settings, retries=0)
        platform = [lst for lst in store.list() if lst.manifest is not None and lst.manifest.kind == "platform"]
    except DnError as e:
        out["backup_region"] = f"unreachable: {e.message}"
        out["alarms"].append(f"backup region unreachable: {e.message}")
        return out
    finally:
        if own and store is not None:
            store.close()
    out["backup_region"] = "reachable"
    if platform:
        newest = platform[-1]
        age = (now - newest.created).total_seconds()
        out["last_backup"] = {"id": newest.id, "snapshot_at": _iso(newest.created), "age_seconds": int(age),
                              "size": newest.manifest.size}
        if age > max_rpo.total_seconds():
            out["alarms"].append(f"RPO breach: the newest backup is {age / 3600:.1f} h old "
                                 f"(max {max_rpo.total_seconds() / 3600:g} h)")
    else:
        out["last_backup"] = None
        out["alarms"].append("RPO breach: there is no platform backup")
    return out


# -- a real restore ------------------------------------------------------------------------------
RESTORE_LOCK = "db:dr-restore"


def replaces_platform_database(settings: "Settings", target_dsn: str) -> bool:
    """Whether ``target_dsn`` names the platform database itself (same server and database as
    ``database.dsn``, whatever the role): dn must then hold no session on it while it restores."""
    from dn import db

    def where(dsn: str) -> str:
        return db.describe_dsn(dsn).split("@", 1)[-1]

    return where(target_dsn) == where(settings.database.dsn)


def _lock_server(admin, timeout: float) -> None:
    """One restore at a time per server. The lock is held by the session on the maintenance
    database that also swaps the databases: never by one on the target, which would keep the
    target from being renamed (and whose locks would be left behind with the renamed database)."""
    from dn import db, locks
    from dn.errors import Locked

    key = locks.lock_key(RESTORE_LOCK)
    with db.translate_errors("taking the restore lock"):
        if db.advisory_lock(admin, key, timeout):
            return
        holders = db.advisory_holders(admin, key)
    raise Locked(f"another restore onto this server is running (database session {', '.join(map(str, holders)) or '?'}); "
                 f"waited {timeout:g}s", hint="wait for it to finish and rerun", where=RESTORE_LOCK)


def _verified_mark(m: Manifest) -> str:
    return f"dn: verified restore of backup {m.id} (manifest MAC {m.mac[:16]})"


def _kept_staging(admin, staging: str, m: Manifest) -> bool:
    """Whether ``staging`` is the verified restore of exactly this backup, kept by an earlier run
    whose swap failed (its comment carries the mark, set only after it verified)."""
    from dn import db

    with db.translate_errors(f"inspecting {staging}"):
        r = admin.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                          (staging,)).fetchone()
    return r is not None and r[0] == _verified_mark(m)


def _sessions(admin, name: str) -> tuple[int, str]:
    """(count, application names) of the sessions connected to database ``name``."""
    n, apps = admin.execute(
        "SELECT count(*), string_agg(DISTINCT coalesce(nullif(application_name, ''), '?'), ', ')"
        " FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()
    return n, apps or ""


def _swap(admin, staging: str, target: str, replaced: str | None) -> None:
    """Rename the target (if any) out of the way and the staging database to the target's name in
    ONE transaction (PostgreSQL allows ALTER DATABASE ... RENAME in a transaction block): both
    renames happen, or neither does. Each rename needs its database to have no session at all."""
    from dn import db

    with db.translate_errors("swapping the restored database in"), admin.transaction():
        if replaced is not None:
            n, apps = _sessions(admin, target)
            if n:
                raise OperationFailed(f"database {target} has {n} open connection(s) ({apps}); stop dn's services "
                                      "and every other client of it, then rerun")
            admin.execute(f"ALTER DATABASE {dump.quote_ident(target)} RENAME TO {dump.quote_ident(replaced)}")
        admin.execute(f"ALTER DATABASE {dump.quote_ident(staging)} RENAME TO {dump.quote_ident(target)}")
        admin.execute(f"COMMENT ON DATABASE {dump.quote_ident(target)} IS NULL")


def restore(
    settings: "Settings",
    environ: Mapping[str, str],
    *,
    backup_id: str,
    target_dsn: str,
    force: bool = False,
    confirm: Callable[[str], bool] = lambda text: True,
    jobs: int = 2,
    checks: list[Check] | None = None,
    progress: Progress = _quiet,
    store: Store | None = None,
) -> dict:
    """Restore a backup into the database named by ``target_dsn``.

    The backup is restored into a staging database on the target server and verified (row counts,
    checks); only then is it renamed to the target's name. An existing non-empty target is refused
    unless ``force``; with it, the old database is renamed to ``<name>_replaced_<time>`` (kept).
    Both renames are one transaction, so the target's name never points at nothing. The swap needs
    the target to have no session: dn's own restore lock is held on the server's maintenance
    database, and any other client makes the restore stop before anything is renamed.

    A staging database that verified is never dropped: when its swap fails it is kept, marked
    verified, and the next restore of the same backup checks it again and swaps it in without
    downloading and restoring again. ``confirm(text)`` is asked once the plan is known, before
    anything changes.
    """
    from dn import db

    check_backup_id(backup_id, "--backup")
    db.check_dsn(target_dsn, "--target")
    passfile = settings.database.passfile
    target_db = dump.dsn_dbname(target_dsn) or db.dsn_user(target_dsn)
    if not target_db:
        raise InvalidInput("--target", "must name the database to restore into")
    checks = list(BUILTIN_CHECKS) if checks is None else checks
    stamp = datetime.now(timezone.utc)
    maintenance = dump.with_dbname(target_dsn, "postgres")
    staging = "dn_restore_" + backup_id.lower().replace("-", "_")
    replaced = f"{target_db[:30]}_replaced_{stamp:%Y%m%d%H%M%S}"
    report: dict = {"backup": backup_id, "target": db.describe_dsn(target_dsn), "started_at": _iso(stamp)}
    ks = keys.keystore(settings, environ)
    own_store = store is None
    workdir = _private_dir(Path(settings.data_dir) / "dr" / "work") / f"restore-{uuid.uuid4().hex[:8]}"
    admin = None
    created = False  # a staging database of this run that has not verified: dropped on failure
    try:
        with _terminate_as_interrupt():
            store = store or open_store(settings, progress=progress)
            m = store.manifest(backup_id)
            lookup = key_lookup(ks, store, m)
            admin = db.connect_dsn(maintenance, passfile, application_name="dn dr restore")
            _lock_server(admin, settings.database.lock_timeout)
            with db.translate_errors("inspecting the target"):
                exists = dump.database_exists(admin, target_db)
            tables = 0
            if exists:
                with db.connect_dsn(target_dsn, passfile, application_name="dn dr restore (inspect)") as c:
                    tables = c.execute(
                        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                        " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
                        " AND n.nspname NOT LIKE 'pg\\_%'").fetchone()[0]
            if tables and not force:
                raise InvalidInput("--target", f"database {target_db} is not empty ({tables} tables); "
                                   f"--force replaces it (the old one is kept as {replaced})")
            kept = _kept_staging(admin, staging, m)
            plan = (f"restore backup {m.id} ({m.kind}, snapshot {_iso(m.snapshot_at)}, {sum(m.tables.values())} rows) "
                    f"into {db.describe_dsn(target_dsn)}"
                    + (f" (the verified restore kept in {staging} by an earlier run, checked again)" if kept else "")
                    + (f"; the current database {target_db} ({tables} tables) is renamed to {replaced}" if exists else ""))
            report["plan"] = plan
            if not confirm(plan):
                raise OperationFailed("restore cancelled; nothing was changed")
            t0 = time.monotonic()
            staging_dsn = dump.with_dbname(target_dsn, staging)
            failures: list[str] = []
            if kept:
                with db.connect_dsn(staging_dsn, passfile, application_name="dn dr restore (verify)") as c:
                    tables_r, results, failures = verify_restored(c, m, checks)
                if failures:
                    progress(f"{staging}, kept by an earlier run, no longer verifies ({failures[0]}): restoring again")
                    kept = False
                else:
                    progress(f"{staging}, kept verified by an earlier run, verifies again: swapping it in")
            if not kept:
                _private_dir(workdir)
                files = fetch(store, m, lookup, workdir)
                progress("downloaded, verified and decrypted")
                dump.drop_database(admin, staging)
                grantees = []
                app = db.dsn_user(settings.database.dsn)
                if app and admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app,)).fetchone():
                    grantees.append(app)
                dump.create_database(admin, staging, connect_to=grantees)
                created = True
                restore_into(m, files, staging_dsn, passfile, jobs=jobs, workdir=workdir)
                progress(f"restored into {staging}")
                with db.connect_dsn(staging_dsn, passfile, application_name="dn dr restore (verify)") as c:
                    tables_r, results, failures = verify_restored(c, m, checks)
                report["tables"], report["checks"] = tables_r, results
                if failures:
                    raise OperationFailed(f"the restored database failed verification: {'; '.join(failures[:5])}",
                                          hint="the target was not touched; try an older backup")
                # COMMENT takes no bind parameter: a literal (the mark is a backup id and hex digits)
                mark = _verified_mark(m).replace("'", "''")
                with db.translate_errors(f"marking {staging} verified"):
                    admin.execute(f"COMMENT ON DATABASE {dump.quote_ident(staging)} IS '{mark}'")
                created = False  # verified: from here on it is never dropped
            report["tables"], report["checks"] = tables_r, results
            try:
                _swap(admin, staging, target_db, replaced if exists else None)
            except Unreachable as e:  # the commit may or may not have happened: say so, guess nothing
                raise Unreachable(
                    f"the connection was lost while swapping the restored database in ({e.message}): the swap "
                    f"either happened whole or not at all", hint=f"look which database is named {target_db} "
                    f"(a kept {staging} means it did not happen), then rerun the same `dn dr restore`",
                    runbook="disaster-recovery", where="database") from None
            except DnError as e:
                raise OperationFailed(
                    f"the restored database could not be swapped in, and nothing was renamed: {e.message}",
                    hint=f"the verified restore is kept as {staging} ({target_db} is "
                         + ("unchanged" if exists else "still missing")
                         + "); fix that and rerun the same `dn dr restore`: it checks the kept copy again and "
                         "swaps it in without downloading", runbook="disaster-recovery") from None
            if exists:
                report["replaced"] = replaced
            report["rto_seconds"] = round(time.monotonic() - t0, 3)
            report["result"] = "restored"
            return report
    finally:
        with _uninterruptible():
            if created and admin is not None:
                with contextlib.suppress(DnError):
                    dump.drop_database(admin, staging)
            if admin is not None:
                admin.close()
            shutil.rmtree(workdir, ignore_errors=True)
            if own_store and store is not None:
                store.close()
