"""The pure deletion planner, the SQL it leads to, the certificate and retention cutoffs."""
from __future__ import annotations

import copy
from datetime import date, datetime, timedelta, timezone

import pytest

from dn.config import RetentionConfig
from dn.errors import ConfigError
from dn.gdpr import certificate, datamap, plan, retention, sqlgen

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
FKS = (("api_keys", "tenants"), ("api_keys", "users"), ("deletion_requests", "tenants"), ("events", "tenants"),
       ("gdpr_steps", "gdpr_runs"), ("gtm_workspaces", "tenants"), ("hourly_stats", "tenants"), ("invoices", "tenants"),
       ("tenant_containers", "tenants"), ("tenant_settings", "tenants"), ("users", "tenants"))
NAMES = plan.HostNames("eu1", "dn-t-acme", ("dn-acme-tagging", "dn-acme-preview"), "/etc/nginx/dn/vhosts/acme.conf",
                       ("DN-T-X", "DN-TI-X"), ("/etc/systemd/system/dn-backup-acme.timer",), "/var/lib/dn/volumes/acme.luks",
                       "dn-acme", "/srv/dn/tenants/acme")
KEYS = plan.BackupKeys("tenant-acme", ("ab" * 16,), False, "/var/lib/dn/backup-keys", "eu-de-2")


def _plan(**kw):
    dm = datamap.load()
    req = plan.Request(7, 3, NOW - timedelta(days=4), NOW + timedelta(days=26, hours=1), "pending")
    counts = {t.name: 10 for t in dm.tenant_bound()}
    args = dict(tenant=plan.Tenant(3, "acme", "active", "eu1"), request=req, counts=counts, foreign_keys=FKS,
                host=NAMES, keys=KEYS, now=NOW, retention=RetentionConfig())
    args.update(kw)
    return plan.build(dm, **args)


def test_children_are_deleted_before_their_parents():
    order = plan.deletion_order(datamap.load(), FKS)
    assert set(order) == {"api_keys", "users", "tenant_containers", "tenant_settings", "gtm_workspaces", "events",
                          "hourly_stats"}
    assert order.index("api_keys") < order.index("users")


def test_a_kept_table_referencing_a_deleted_one_is_a_map_error():
    with pytest.raises(ConfigError, match="invoices is kept but references users"):
        plan.deletion_order(datamap.load(), FKS + (("invoices", "users"),))


def test_a_foreign_key_cycle_among_deleted_tables_is_refused():
    with pytest.raises(ConfigError, match="cycle"):
        plan.deletion_order(datamap.load(), FKS + (("users", "api_keys"),))


def test_the_plan_lists_everything_with_counts_reasons_and_deadline():
    p = _plan()
    d = p.to_dict()
    assert d["days_left"] == 26 and p.days_left == 26
    order = [x["table"] for x in d["delete"]]
    assert order.index("api_keys") < order.index("users")
    assert all(x["rows"] == 10 for x in d["delete"])
    retained = {r["table"]: r for r in d["retain"]}
    assert retained["invoices"]["kept_for"] == "5 years from the end of the calendar year"
    assert retained["tenants"]["minimise"] == {"display_name": "pseudonym"}
    assert d["retain"][0]["table"] == "tenants"
    assert [s["step"] for s in d["steps"]] == list(plan.STEPS)
    text = plan.render_text(p)
    for needle in ("request 7", "26 day(s) left", "docker network: dn-t-acme", "DN-TI-X", "/var/lib/dn/volumes/acme.luks",
                   "backup keys of tenant-acme", "escrow copy in region eu-de-2", "why: § 35", "steps: disable -> luks"):
        assert needle in text, needle


def test_an_overdue_request_says_so():
    req = plan.Request(7, 3, NOW - timedelta(days=40), NOW - timedelta(days=10), "pending")
    p = _plan(request=req)
    assert p.days_left == -10
    assert "OVERDUE by 10 day(s)" in plan.render_text(p)
    assert any("deadline passed 10 day(s) ago" in n for n in p.notes)


def test_accounting_retention_setting_reaches_the_plan():
    p = _plan(retention=RetentionConfig(accounting_years=10))
    assert next(r for r in p.retain if r["table"] == "invoices")["kept_for"].startswith("10 years")


# -- SQL -----------------------------------------------------------------------------------------
def test_tenant_conditions_use_parameters_and_quoted_identifiers():
    dm = datamap.load()
    c = sqlgen.tenant_condition(dm, dm.tables["events"], 42, "acme")
    assert (c.sql, c.params) == ('"tenant_id" = %s', (42,))
    c = sqlgen.tenant_condition(dm, dm.tables["audit_log"], 42, "acme")
    assert (c.sql, c.params) == ('"tenant" = %s', ("acme",))
    c = sqlgen.tenant_condition(dm, dm.tables["gdpr_steps"], 42, "acme")
    assert c.sql == '"request_id" IN (SELECT "request_id" FROM "gdpr_runs" WHERE "tenant_id" = %s)' and c.params == (42,)
    sql, params = sqlgen.batch_delete_sql("events", sqlgen.tenant_condition(dm, dm.tables["events"], 42, "x"), 5000)
    assert sql == ('DELETE FROM "events" WHERE ctid = ANY (ARRAY(SELECT ctid FROM "events" WHERE "tenant_id" = %s '
                   'LIMIT 5000))') and params == (42,)
    sql, params = sqlgen.batch_delete_sql("events", sqlgen.Condition('"tenant_id" = %s', (42,)), 100, "id", after=True,
                                          prefix="tenant_id")
    assert sql == ('WITH s AS MATERIALIZED (SELECT ctid, "id" FROM "events" WHERE "tenant_id" = %s AND '
                   '("tenant_id", "id") >= (%s, %s) ORDER BY "tenant_id", "id" LIMIT 100), d AS (DELETE FROM "events" '
                   'WHERE ctid = ANY (ARRAY(SELECT ctid FROM s)) RETURNING 1) SELECT (SELECT count(*) FROM s), '
                   '(SELECT count(*) FROM d), (SELECT max("id") FROM s)') and params == (42,)
    sql, _ = sqlgen.batch_delete_sql("events", sqlgen.Condition('"tenant_id" = %s', (42,)), 100, "id", after=True,
                                     prefix="tenant_id", floor=sqlgen.floor_of("bigint"))
    assert '("tenant_id", "id") >= (%s, -9223372036854775808)' in sql
    assert sqlgen.floor_of("timestamp with time zone") == "'-infinity'" and sqlgen.floor_of("jsonb") is None
    with pytest.raises(ValueError):
        sqlgen.batch_delete_sql("events", sqlgen.Condition("true", ()), 1, "id", after=True, floor="0; DROP TABLE x")
    sql, _ = sqlgen.batch_delete_sql("events", sqlgen.Condition('"occurred_at" < %s', (1,)), 100, "occurred_at", after=True)
    assert '"occurred_at" < %s AND "occurred_at" >= %s ORDER BY "occurred_at"' in sql
    with pytest.raises(ValueError):
        sqlgen.tenant_condition(dm, dm.tables["fernet_keys"], 42, "acme")
    with pytest.raises(ValueError):
        sqlgen.ident('events"; DROP TABLE tenants; --')
    assert sqlgen.ident("reporting.daily") == '"reporting"."daily"'


# -- the certificate -----------------------------------------------------------------------------
def _cert(after_events: int = 0):
    p = _plan().to_dict()
    steps = [{"step": s, "started_at": NOW, "finished_at": NOW + timedelta(seconds=1), "attempts": 1,
              "result": {"summary": s} | ({"counts": {"events": 10, "invoices": 2, "tenants": 1}} if s == "disable" else {})}
             for s in plan.STEPS[:-1]]
    return certificate.build(request={"id": 7, "received_at": NOW - timedelta(days=4), "due_at": NOW + timedelta(days=26)},
                             tenant={"id": 3, "slug": "acme", "host": "eu1"}, plan=p, steps=steps,
                             counts_after={"events": after_events, "invoices": 2, "tenants": 1},
                             completed_at=NOW + timedelta(minutes=1), dn_version="0.1.0")


def test_certificate_counts_digest_and_check():
    c = _cert()
    assert c["counts"]["events"] == {"before": 10, "after": 0, "action": "deleted"}
    assert c["counts"]["invoices"] == {"before": 2, "after": 2, "action": "retained"}
    assert c["counts"]["tenants"]["action"] == "minimised"
    assert c["on_time"] and certificate.check(c) == []
    d = certificate.digest(c)
    assert len(d) == 64 and certificate.digest(copy.deepcopy(c)) == d
    c2 = copy.deepcopy(c)
    c2["counts"]["events"]["before"] = 11
    assert certificate.digest(c2) != d
    assert "acme" in certificate.render_text(c, d) and d in certificate.render_text(c, d)


def test_a_certificate_with_rows_left_or_a_step_missing_is_no_proof():
    assert certificate.check(_cert(after_events=3)) == ["events: 3 row(s) of the tenant remain"]
    c = _cert()
    c["steps"] = [s for s in c["steps"] if s["step"] != "backup-keys"]
    assert certificate.check(c) == ["step backup-keys is not recorded"]


# -- retention cutoffs ---------------------------------------------------------------------------
@pytest.mark.parametrize("now, years, expected", [
    (datetime(2026, 3, 10, tzinfo=timezone.utc), 5, date(2021, 1, 1)),
    (datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc), 5, date(2021, 1, 1)),
    (datetime(2027, 1, 1, 0, 1, tzinfo=timezone.utc), 10, date(2017, 1, 1)),
])
def test_accounting_is_kept_n_years_from_the_end_of_its_year(now, years, expected):
    dm = datamap.load()
    cut = retention.cutoff(dm.classes["accounting"].period, RetentionConfig(accounting_years=years), now)
    assert cut == expected
    # an invoice of 2020 (5 years): kept through 31 Dec 2025, gone in 2026
    if years == 5:
        assert date(2020, 12, 31) < cut <= date(2021, 1, 1)


def test_day_and_month_cutoffs():
    dm = datamap.load()
    r = RetentionConfig()
    assert retention.cutoff(dm.classes["tracking"].period, r, NOW) == NOW - timedelta(days=15)
    assert retention.cutoff(dm.classes["aggregate"].period, r, NOW) == datetime(2024, 3, 10, 12, tzinfo=timezone.utc)
    leap = datetime(2028, 2, 29, tzinfo=timezone.utc)
    assert retention.cutoff(dm.classes["aggregate"].period, RetentionConfig(aggregates_months=12), leap) == \
        datetime(2027, 2, 28, tzinfo=timezone.utc)


def test_retention_rules_cover_the_classes_with_a_period():
    rules = {r.table: r for r in retention.rules(datamap.load(), RetentionConfig(), NOW)}
    assert set(rules) == {"events", "hourly_stats", "invoices", "audit_log"}
    assert rules["audit_log"].enforced_by == "audit prune"
    assert rules["events"].condition().sql == '"occurred_at" < %s'
