"""`dn retention enforce` against the real platform database: rows just inside each window stay,
rows just outside go; the audit log is pruned through its anchored prune; audited; dry run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dn.errors import PolicyViolation
from dn.gdpr import retention
from tests.fixtures.postgres import backdate_audit

pytestmark = [pytest.mark.postgres]


@pytest.fixture(autouse=True)
def region(audit_region):
    """The audit prune verifies the chain first, which needs the second region's witness."""
    return audit_region


def _tenant(conn, slug: str) -> int:
    return conn.execute("INSERT INTO tenants (slug, display_name, host) VALUES (%s, %s, 'test-eu1') RETURNING id",
                        (slug, slug)).fetchone()[0]


def _edges(conn, tid: int) -> None:
    """For each class with a period: one row a minute/hour/day inside the window, one outside,
    plus fresh rows; 40 old events so batches are visible."""
    conn.execute("""
        INSERT INTO events (tenant_id, occurred_at, event_name) VALUES
          (%(t)s, now() - interval '15 days' + interval '1 minute', 'inside'),
          (%(t)s, now() - interval '15 days' - interval '1 minute', 'outside'),
          (%(t)s, now(), 'fresh')""", {"t": tid})
    conn.execute("INSERT INTO events (tenant_id, occurred_at, event_name) "
                 "SELECT %s, now() - interval '20 days' - g * interval '1 minute', 'old' FROM generate_series(1, 40) g",
                 (tid,))
    conn.execute("""
        INSERT INTO hourly_stats (tenant_id, hour, requests) VALUES
          (%(t)s, date_trunc('hour', now() - interval '24 months') + interval '1 hour', 1),
          (%(t)s, date_trunc('hour', now() - interval '24 months') - interval '1 hour', 2),
          (%(t)s, date_trunc('hour', now()), 3)""", {"t": tid})
    conn.execute("""
        INSERT INTO invoices (tenant_id, number, issued_at, amount, currency, billing_name, billing_address) VALUES
          (%(t)s, 'IN-' || %(t)s, make_date(extract(year FROM now())::int - 5, 1, 1), 100, 'CZK', 'B', 'A'),
          (%(t)s, 'OUT-' || %(t)s, make_date(extract(year FROM now())::int - 6, 12, 31), 100, 'CZK', 'B', 'A'),
          (%(t)s, 'NEW-' || %(t)s, current_date, 100, 'CZK', 'B', 'A')""", {"t": tid})


def _left(conn) -> dict[str, list]:
    return {
        "events": sorted(r[0] for r in conn.execute("SELECT DISTINCT event_name FROM events").fetchall()),
        "events_n": conn.execute("SELECT count(*) FROM events").fetchone()[0],
        "hourly_stats": sorted(r[0] for r in conn.execute("SELECT requests FROM hourly_stats").fetchall()),
        "invoices": sorted(r[0].split("-")[0] for r in conn.execute("SELECT number FROM invoices").fetchall()),
    }


def test_rows_just_inside_stay_rows_just_outside_go(dn_settings, dn_ctx, pg_super):
    from dn import audit, db

    with db.connect(dn_settings.database) as conn:
        a, b = _tenant(conn, "ret-a"), _tenant(conn, "ret-b")
        _edges(conn, a)
        _edges(conn, b)
        for i in range(4):
            audit.record(dn_ctx, "test op", {"i": i}, conn=conn)
    backdate_audit(pg_super, [1, 2], 100, settings=dn_settings)

    dry = retention.run(dn_ctx, dry_run=True)
    by = {t.table: t for t in dry.tables}
    assert (by["events"].expired, by["hourly_stats"].expired, by["invoices"].expired, by["audit_log"].expired) == (82, 2, 2, 2)
    assert all(t.deleted == 0 for t in dry.tables)
    with db.connect(dn_settings.database) as conn:
        assert _left(conn)["events_n"] == 86
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 4

    res = retention.run(dn_ctx, batch_size=25)
    by = {t.table: t for t in res.tables}
    assert by["events"].deleted == 82 and by["events"].batches == 4
    assert (by["hourly_stats"].deleted, by["invoices"].deleted, by["audit_log"].deleted) == (2, 2, 2)
    with db.connect(dn_settings.database) as conn:
        left = _left(conn)
        assert left["events"] == ["fresh", "inside"] and left["events_n"] == 4
        assert left["hourly_stats"] == [1, 1, 3, 3]
        assert left["invoices"] == ["IN", "IN", "NEW", "NEW"]
        assert conn.execute("SELECT min(seq) FROM audit_log").fetchone()[0] == 3
    # the prune left the chain verifiable from its anchor; the run itself is on record
    assert audit.verify(dn_ctx).ok
    entry = [e for e in audit.show(dn_ctx) if e.command == "retention enforce"][-1]
    assert entry.outcome == "ok" and entry.args["deleted"]["events"] == 82 and entry.args["deleted"]["audit_log"] == 2

    again = retention.run(dn_ctx)
    assert sum(t.deleted for t in again.tables) == 0


def test_accounting_years_follow_the_configuration(dn_settings_data, pg_super):
    from dn import db
    from dn.config import Settings
    from dn.context import Context

    settings = Settings.model_validate({**dn_settings_data, "retention": {"accounting_years": 10}, "source": "test"})
    ctx = Context(environ={}, _settings=settings)
    with db.connect(settings.database) as conn:
        _edges(conn, _tenant(conn, "ret-vat"))
    res = retention.run(ctx, dry_run=True)
    inv = next(t for t in res.tables if t.table == "invoices")
    assert inv.expired == 0 and inv.period == "10 years from the end of the calendar year"


def test_an_unmapped_table_stops_retention(dn_ctx, pg_super):
    pg_super.execute("CREATE TABLE tmp_visitor_log (tenant_id bigint, ip inet)")
    try:
        with pytest.raises(PolicyViolation, match="tmp_visitor_log"):
            retention.run(dn_ctx, dry_run=True)
    finally:
        pg_super.execute("DROP TABLE tmp_visitor_log")


def test_cli_enforce_json(dn_settings, dn_cli_env):
    from dn import db

    with db.connect(dn_settings.database) as conn:
        _edges(conn, _tenant(conn, "ret-cli"))
    dn = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")
    r = subprocess.run([dn, "retention", "enforce", "--dry-run", "--json"], env=dn_cli_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["dry_run"] and {t["table"]: t["expired"] for t in data["tables"]}["events"] == 41
    r = subprocess.run([dn, "retention", "enforce"], env=dn_cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "events" in r.stdout and "41 deleted" in r.stdout


def test_a_tampered_audit_log_fails_the_run_but_expired_data_still_goes(dn_settings, dn_ctx, pg_super):
    from dn import audit, db
    from tests.fixtures.postgres import tampering

    with db.connect(dn_settings.database) as conn:
        _edges(conn, _tenant(conn, "ret-tamper"))
        for i in range(3):
            audit.record(dn_ctx, "test op", {"i": i}, conn=conn)
    with tampering(pg_super):
        pg_super.execute("UPDATE audit_log SET command = 'something else' WHERE seq = 2")
    with pytest.raises(PolicyViolation, match="does not verify"):
        retention.run(dn_ctx)
    with db.connect(dn_settings.database) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2  # fresh + inside
        assert conn.execute("SELECT count(*) FROM audit_log WHERE seq <= 3").fetchone()[0] == 3
        last = conn.execute("SELECT command, outcome, args FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    assert last[0] == "retention enforce" and last[1] == "failed" and last[2]["deleted"]["events"] == 41
