"""`dn export`: the ZIP round-trips to the tenant's row counts, holds no secret and no other
tenant's data, and is written streaming (memory stays flat)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from dn.errors import InvalidInput, PolicyViolation
from dn.gdpr import export
from tests.integration.test_gdpr_setup import add_tenant, fernet_key, markers

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def three(dn_settings):
    from dn import db

    environ = {"DN_FERNET_KEYS": fernet_key()}
    with db.connect(dn_settings.database) as conn:
        return {s: add_tenant(conn, s, environ, events=500, hours=30, invoices=4, host="test-eu1")
                for s in ("exp-one", "exp-two", "exp-three")}


def _db_counts(conn, tid: int) -> dict[str, int]:
    q = {"config/tenant.json": "SELECT count(*) FROM tenants WHERE id = %s",
         "config/users.json": "SELECT count(*) FROM users WHERE tenant_id = %s",
         "config/api_keys.json": "SELECT count(*) FROM api_keys WHERE tenant_id = %s",
         "config/containers.json": "SELECT count(*) FROM tenant_containers WHERE tenant_id = %s",
         "config/settings.json": "SELECT count(*) FROM tenant_settings WHERE tenant_id = %s",
         "events.csv": "SELECT count(*) FROM events WHERE tenant_id = %s",
         "hourly_stats.csv": "SELECT count(*) FROM hourly_stats WHERE tenant_id = %s",
         "invoices.csv": "SELECT count(*) FROM invoices WHERE tenant_id = %s"}
    return {name: conn.execute(sql, (tid,)).fetchone()[0] for name, sql in q.items()}


def test_the_zip_round_trips_to_the_same_row_counts(dn_settings, dn_ctx, three, tmp_path):
    from dn import audit, db

    out = tmp_path / "exp-two.zip"
    res = export.export(dn_ctx, "exp-two", out)
    assert out.stat().st_mode & 0o777 == 0o600
    with db.connect(dn_settings.database) as conn:
        expected = _db_counts(conn, three["exp-two"])
        workspaces = dict(conn.execute("SELECT version::text, workspace FROM gtm_workspaces WHERE tenant_id = %s",
                                       (three["exp-two"],)).fetchall())
        first_event = conn.execute("SELECT id::text, client_ip::text, cookie_id, payload::text FROM events "
                                   "WHERE tenant_id = %s ORDER BY id LIMIT 1", (three["exp-two"],)).fetchone()
    with zipfile.ZipFile(out) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["format"] == "dn-export/1" and manifest["tenant"] == "exp-two"
        files = {f["name"]: f for f in manifest["files"]}
        for name, n in expected.items():
            raw = zf.read(name)
            assert hashlib.sha256(raw).hexdigest() == files[name]["sha256"] and len(raw) == files[name]["bytes"]
            if name.endswith(".csv"):
                rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
                assert len(rows) - 1 == n == files[name]["rows"], name
            else:
                assert len(json.loads(raw)) == n == files[name]["rows"], name
        events = list(csv.DictReader(io.StringIO(zf.read("events.csv").decode(), newline="")))
        assert (events[0]["id"], events[0]["client_ip"], events[0]["cookie_id"]) == first_event[:3]
        assert json.loads(events[0]["payload"]) == json.loads(first_event[3])
        for version, doc in workspaces.items():
            assert json.loads(zf.read(f"gtm-workspaces/{version}.json")) == doc
        readme = zf.read("README.txt").decode()
        assert "RFC 4180" in readme and "events.csv: 500 rows" in readme
        everything = b"".join(zf.read(n) for n in zf.namelist())
    assert res.manifest()["files"] == manifest["files"]
    # no secret, nothing of another tenant
    for secret in (b"gAAAAA", b"pbkdf2_sha256", b"totp", b"ciphertext"):
        assert secret not in everything, secret
    for other in ("exp-one", "exp-three"):
        for m in markers(other):
            assert m.encode() not in everything
    assert b"exp-two-mail.example" in everything
    entry = [e for e in audit.show(dn_ctx, tenant="exp-two") if e.command == "export"][-1]
    assert entry.outcome == "ok" and entry.args["files"]["events.csv"] == 500


def test_refusals(dn_ctx, three, tmp_path, pg_super):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    with pytest.raises(InvalidInput, match="no tenant named 'exp-nope'"):
        export.export(dn_ctx, "exp-nope", tmp_path / "x.zip")
    assert not list(tmp_path.iterdir())  # no half-written archive
    with pytest.raises(InvalidInput, match="--out: .* must name a .zip file"):
        export.export(dn_ctx, "exp-one", tmp_path / "x.tar")
    (tmp_path / "there.zip").write_bytes(b"keep me")
    with pytest.raises(InvalidInput, match="exists"):
        export.export(dn_ctx, "exp-one", tmp_path / "there.zip")
    assert (tmp_path / "there.zip").read_bytes() == b"keep me"
    pg_super.execute("CREATE TABLE tenant_notes (tenant_id bigint, note text)")
    try:
        with pytest.raises(PolicyViolation, match="tenant_notes"):
            export.export(dn_ctx, "exp-one", tmp_path / "y.zip")
    finally:
        pg_super.execute("DROP TABLE tenant_notes")
    assert not (tmp_path / "y.zip").exists()


def test_memory_stays_flat_while_the_archive_grows(dn_settings, dn_ctx, tmp_path):
    from dn import db

    environ = {"DN_FERNET_KEYS": fernet_key()}
    with db.connect(dn_settings.database) as conn:
        add_tenant(conn, "exp-big", environ, events=120_000, hours=10, invoices=1, host="test-eu1")
    out = tmp_path / "big.zip"
    tracemalloc.start()
    try:
        res = export.export(dn_ctx, "exp-big", out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    csv_bytes = next(f.bytes for f in res.files if f.name == "events.csv")
    assert next(f.rows for f in res.files if f.name == "events.csv") == 120_000
    # the events CSV alone is tens of MB; the Python heap never held more than a few fetch batches
    assert csv_bytes > 25 * 2**20
    assert peak < csv_bytes / 4, f"peak {peak} bytes for a {csv_bytes}-byte CSV"


def test_cli_export(dn_settings, dn_cli_env, three, tmp_path):
    dn = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")
    out = tmp_path / "cli.zip"
    r = subprocess.run([dn, "export", "exp-one", "--out", str(out), "--json"], env=dn_cli_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {f["name"]: f["rows"] for f in json.loads(r.stdout)["files"]}["invoices.csv"] == 4
    r = subprocess.run([dn, "export", "exp-one", "--out", str(out)], env=dn_cli_env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--force" in r.stderr
