"""`dn export`: one tenant's data as a ZIP, streamed so memory stays flat whatever its size.

Every row comes from one REPEATABLE READ snapshot through server-side cursors and is written
straight into a ZIP entry (deflated, ZIP64), so neither a table nor the archive is ever held in
memory. What is exported, and in which format, is declared per table in the data map
(``export``); its column lists are allow-lists, so secrets (password hashes, MFA secrets, API
key and container-config ciphertexts) are never exported.

The archive (format ``dn-export/1``) is described by the ``README.txt`` inside it:

- ``manifest.json``: tenant, export time, and per file: table, format, rows, bytes, SHA-256;
- ``*.csv``: RFC 4180 (comma, double quotes, CRLF line ends, UTF-8), a header row of column
  names, an empty field for NULL; times in ISO 8601 UTC, JSON columns as JSON text;
- ``*.json``: an array of objects, one per row, keys = column names, JSON types;
- ``gtm-workspaces/<version>.json``: each GTM workspace exactly as imported.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from dn.errors import InvalidInput
from dn.gdpr import datamap as dmap
from dn.gdpr.sqlgen import column, ident, tenant_condition

if TYPE_CHECKING:
    from dn.context import Context
    from dn.db import Connection

FORMAT = "dn-export/1"
FETCH_ROWS = 2000
Progress = Callable[[str], None]

README = """dn tenant export ({format})

Tenant: {slug}
Exported: {at} (one consistent database snapshot)

Files (manifest.json lists each with its table, row count, size and SHA-256):
{files}

Formats
- .csv: RFC 4180 (comma separator, double-quote quoting, CRLF line ends, UTF-8), first row =
  column names, an empty field = no value (NULL). Times are ISO 8601 in UTC; JSON values (event
  payloads) are JSON text.
- .json: a JSON array with one object per row; keys are the column names.
- gtm-workspaces/<version>.json: each GTM workspace version exactly as it was imported; it can be
  imported into Google Tag Manager again.

Not included: passwords (hashes), MFA secrets, API key values and the sGTM container
configuration string: they are credentials. Create new ones where you move to.
"""


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.sink.write(b)
        return len(b)


@dataclass
class FileEntry:
    name: str
    table: str
    format: str
    rows: int = 0
    bytes: int = 0
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ExportResult:
    tenant: str
    out: str
    exported_at: str
    files: list[FileEntry] = field(default_factory=list)
    not_exported: list[dict[str, str]] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "tenant": self.tenant, "exported_at": self.exported_at,
                "files": [f.to_dict() for f in self.files], "not_exported": self.not_exported}


def _rows(conn: "Connection", query: str, params: tuple, name: str) -> Iterator[tuple]:
    with conn.cursor(name=name) as cur:
        cur.itersize = FETCH_ROWS
        cur.execute(query, params)
        yield from cur


def _entry(zf: zipfile.ZipFile, name: str):
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o600 << 16
    return zf.open(info, "w", force_zip64=True)


def _csv(zf, conn, dm, t: dmap.Table, tenant_id: int, slug: str) -> FileEntry:
    exp = t.export
    cond = tenant_condition(dm, t, tenant_id, slug)
    cols = ", ".join(f"{column(c)}::text" for c in exp.columns)
    order = f" ORDER BY {column(exp.order)}" if exp.order else ""
    fe = FileEntry(exp.file, t.name, "csv")
    with _entry(zf, exp.file) as raw:
        h = _Hashing(raw)
        text = io.TextIOWrapper(io.BufferedWriter(h, 1 << 16), encoding="utf-8", newline="")
        w = csv.writer(text, lineterminator="\r\n")
        w.writerow(exp.columns)
        for row in _rows(conn, f"SELECT {cols} FROM {ident(t.name)} WHERE {cond.sql}{order}", cond.params,
                         f"dn_export_{t.name}"):
            w.writerow(["" if v is None else v for v in row])
            fe.rows += 1
        text.flush()
        text.detach().flush()
    fe.bytes, fe.sha256 = h.size, h.sha.hexdigest()
    return fe


def _json(zf, conn, dm, t: dmap.Table, tenant_id: int, slug: str) -> FileEntry:
    exp = t.export
    cond = tenant_condition(dm, t, tenant_id, slug)
    obj = ", ".join(f"'{c}', {column(c)}" for c in exp.columns)
    order = f" ORDER BY {column(exp.order)}" if exp.order else ""
    fe = FileEntry(exp.file, t.name, "json")
    with _entry(zf, exp.file) as raw:
        h = _Hashing(raw)
        buf = io.BufferedWriter(h, 1 << 16)
        buf.write(b"[")
        for (doc,) in _rows(conn, f"SELECT jsonb_build_object({obj}) FROM {ident(t.name)} WHERE {cond.sql}{order}",
                            cond.params, f"dn_export_{t.name}"):
            buf.write((b",\n " if fe.rows else b"\n ") + json.dumps(doc, ensure_ascii=False, sort_keys=True).encode())
            fe.rows += 1
        buf.write(b"\n]\n")
        buf.flush()
    fe.bytes, fe.sha256 = h.size, h.sha.hexdigest()
    return fe


def _json_files(zf, conn, dm, t: dmap.Table, tenant_id: int, slug: str) -> list[FileEntry]:
    exp = t.export
    cond = tenant_condition(dm, t, tenant_id, slug)
    out = []
    q = (f"SELECT {column(exp.name_column)}::text, {column(exp.document_column)} FROM {ident(t.name)} "
         f"WHERE {cond.sql} ORDER BY {column(exp.name_column)}")
    for name, doc in _rows(conn, q, cond.params, f"dn_export_{t.name}"):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        fe = FileEntry(f"{exp.dir}/{safe}.json", t.name, "json-document", rows=1)
        data = json.dumps(doc, ensure_ascii=False, indent=2).encode() + b"\n"
        with _entry(zf, fe.name) as raw:
            raw.write(data)
        fe.bytes, fe.sha256 = len(data), hashlib.sha256(data).hexdigest()
        out.append(fe)
    return out


def write_export(conn: "Connection", dm: dmap.DataMap, slug: str, out: Path, *,
                 progress: Progress = lambda s: None) -> ExportResult:
    """Write the ZIP of ``slug``'s data to ``out`` (atomically: a temp file renamed at the end)."""
    from dn import db

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with db.translate_errors(f"exporting tenant {slug}"):
        dmap.require_coverage(dm, dmap.read_catalog(conn), f"to export tenant {slug}")
        t = db.row(conn, "SELECT id, status FROM tenants WHERE slug = %s", (slug,))
        if t is None:
            raise InvalidInput("TENANT", f"no tenant named {slug!r} exists")
        if t["status"] == "deleted":
            raise InvalidInput("TENANT", f"tenant {slug} was deleted (GDPR request): there is nothing to export")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf, \
                    conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute("SET LOCAL TimeZone = 'UTC'")
                at = conn.execute("SELECT to_char(transaction_timestamp(), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')").fetchone()[0]
                res = ExportResult(slug, str(out), at)
                for table in sorted(dm.tenant_bound(), key=lambda x: x.name):
                    if table.export is None:
                        res.not_exported.append({"table": table.name, "why": f"{table.data_class} data of the "
                                                 "platform's own bookkeeping, not the tenant's content"})
                        continue
                    writer = {"csv": _csv, "json": _json, "json-files": _json_files}[table.export.format]
                    made = writer(zf, conn, dm, table, t["id"], slug)
                    for fe in made if isinstance(made, list) else [made]:
                        res.files.append(fe)
                        progress(f"{fe.name}: {fe.rows} rows")
                listing = "\n".join(f"- {fe.name}: {fe.rows} rows ({fe.table})" for fe in res.files)
                with _entry(zf, "README.txt") as w:
                    w.write(README.format(format=FORMAT, slug=slug, at=at, files=listing).encode())
                with _entry(zf, "manifest.json") as w:
                    w.write(json.dumps(res.manifest(), indent=2, sort_keys=True).encode() + b"\n")
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return res


def export(ctx: "Context", slug: str, out: Path, *, force: bool = False, progress: Progress = lambda s: None) -> ExportResult:
    """`dn export`: the ZIP of one tenant's data, audited (personal data leaves the platform)."""
    from dn import audit, db
    from dn.gdpr.workflow import check_slug

    check_slug(slug)
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise InvalidInput("--out", f"{out} must name a .zip file")
    if not out.parent.is_dir():
        raise InvalidInput("--out", f"directory {out.parent} does not exist")
    if out.exists() and not force:
        raise InvalidInput("--out", f"{out} exists; choose another name or pass --force to replace it")
    dm = dmap.load()
    with audit.privileged(ctx, "export", {"tenant": slug, "out": str(out)}, tenant=slug, lock=False) as op:
        with db.connect(ctx.settings.database, application_name=f"dn export {ctx.request_id}") as conn:
            res = write_export(conn, dm, slug, out, progress=progress)
        op.args["files"] = {f.name: f.rows for f in res.files}
    return res
