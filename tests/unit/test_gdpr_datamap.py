"""The data map: the shipped file, strict validation, coverage against a catalogue (pure)."""
from __future__ import annotations

import copy
import tomllib

import pytest

from dn.errors import ConfigError, PolicyViolation
from dn.gdpr import datamap
from dn.gdpr.datamap import Catalog, check_coverage, parse, require_coverage

RAW = tomllib.loads(datamap.DEFAULT_PATH.read_text())


def _with(change) -> dict:
    data = copy.deepcopy(RAW)
    change(data)
    return data


def test_the_shipped_map_loads_and_classifies_what_the_trust_page_promises():
    dm = datamap.load()
    assert dm.tables["events"].data_class == "tracking" and dm.tables["events"].age == "occurred_at"
    assert dm.classes["tracking"].period.setting == "events_days"
    assert dm.classes["aggregate"].period.setting == "aggregates_months"
    acc = dm.classes["accounting"].period
    assert (acc.setting, acc.unit, acc.start) == ("accounting_years", "years", "end of the calendar year")
    assert dm.classes["audit"].period.enforced_by == "audit prune"
    assert dm.tables["invoices"].on_delete == "retain" and "563/1991" in dm.tables["invoices"].reason
    assert dm.tables["tenants"].on_delete == "minimise"
    # every secret column is encrypted and never exported
    for t in dm.tables.values():
        for e in t.encrypted:
            assert not t.export or e.column not in t.export.used_columns, (t.name, e.column)
    assert "password_hash" not in dm.tables["users"].export.columns
    assert {c for t in dm.tables.values() for c in [e.column for e in t.encrypted]} == {
        "totp_secret_ciphertext", "key_ciphertext", "container_config_ciphertext"}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tables"]["events"].update({"class": "secret"}), "tables.events.class: 'secret' is not one of"),
    (lambda d: d["tables"]["events"].update({"on_delete": "shred"}), "tables.events.on_delete: must be one of"),
    (lambda d: d["tables"]["events"].update({"colour": "red"}), "tables.events: unknown key(s) colour"),
    (lambda d: d["tables"]["events"].pop("age"), "tables.events.age: class 'tracking' has a retention period"),
    (lambda d: d["tables"]["invoices"].pop("reason"), "tables.invoices.reason: required when on_delete = 'retain'"),
    (lambda d: d["tables"]["events"].update({"tenant": "Tenant-Id"}), "is not a column name"),
    (lambda d: d["tables"]["fernet_keys"].update({"on_delete": "delete"}), "a table whose rows belong to no tenant"),
    (lambda d: d["tables"]["users"].update({"tenant": "none"}), "a table whose rows belong to no tenant has on_delete"),
    (lambda d: d["tables"]["tenants"].update({"on_delete": "delete"}), "the tenant's own row is minimised"),
    (lambda d: d["tables"]["tenants"].update({"minimise": {"display_name": "scramble"}}), "must map a column to one of"),
    (lambda d: d["tables"]["events"].update({"minimise": {"user_agent": "null"}}), "only with on_delete = 'minimise'"),
    (lambda d: d["tables"]["events"]["export"].update({"columns": ["id; DROP TABLE x"]}), "non-empty list of column names"),
    (lambda d: d["tables"]["events"]["export"].update({"file": "../events.csv"}), "must be a relative path"),
    (lambda d: d["tables"]["events"]["export"].update({"format": "xml"}), "format: must be one of"),
    (lambda d: d["classes"]["tracking"].update({"period": {"setting": "events_weeks", "unit": "days"}}),
     "'events_weeks' is not a field of [retention]"),
    (lambda d: d["classes"]["tracking"].update({"period": {"setting": "events_days", "unit": "fortnights"}}),
     "unit: must be one of"),
    (lambda d: d["tables"]["gdpr_steps"].update({"tenant": {"column": "request_id", "via": "nowhere", "key": "id"}}),
     "must be a mapped table"),
    (lambda d: d.update({"version": 2}), "version 2 is not supported"),
    (lambda d: d["tables"].pop("tenants"), "tables.tenants must be mapped"),
])
def test_invalid_maps_are_refused_naming_the_table_and_key(change, message):
    with pytest.raises(ConfigError) as e:
        parse(_with(change), "datamap.toml")
    assert message in str(e.value)


def test_join_cycles_are_refused():
    def change(d):
        d["tables"]["gdpr_runs"]["tenant"] = {"column": "request_id", "via": "gdpr_steps", "key": "request_id"}
    with pytest.raises(ConfigError, match="form a cycle"):
        parse(_with(change))


def _catalog(**overrides) -> Catalog:
    dm = datamap.load()
    cols = {}
    for t in dm.tables.values():
        cols[t.name] = tuple(sorted({c for c, _ in t.columns_named()} | {"id"}))
    cols["gdpr_runs"] += ("request_id",)
    trig = {t.name: frozenset(datamap.GUARD_TRIGGERS) for t in dm.tables.values() if dm.needs_guard(t)}
    idx = {t.name: ((t.tenant.column, t.batch_key),) for t in dm.tables.values() if t.batch_key}
    cols.update(overrides.pop("columns", {}))
    idx.update(overrides.pop("indexes", {}))
    return Catalog(cols, {**trig, **overrides.pop("triggers", {})}, (), idx)


def test_coverage_of_a_matching_catalogue_is_clean():
    assert check_coverage(datamap.load(), _catalog()).ok


def test_coverage_names_every_disagreement():
    dm = datamap.load()
    cat = _catalog(columns={"marketing_contacts": ("tenant_id", "email"), "events": ("id", "tenant_id")},
                   triggers={"users": frozenset({"gdpr_write_guard_insert"})})
    cat.columns.pop("hourly_stats")
    cov = check_coverage(dm, cat)
    assert cov.uncovered == ["marketing_contacts"]
    assert cov.missing_tables == ["hourly_stats"]
    assert "events.occurred_at (tenant)" not in cov.missing_columns and "events.occurred_at (age)" in cov.missing_columns
    assert cov.unguarded == ["users"]
    with pytest.raises(PolicyViolation) as e:
        require_coverage(dm, cat, "to delete tenant acme")
    msg = str(e.value)
    assert "refusing to delete tenant acme" in msg and "marketing_contacts" in msg and "hourly_stats" in msg
    assert e.value.exit_code == 4


def test_a_batch_key_needs_an_index_led_by_the_tenant_column():
    cov = check_coverage(datamap.load(), _catalog(indexes={"events": (("occurred_at",), ("id",), ("id", "tenant_id"))}))
    assert cov.unindexed == ["events (tenant_id, id)"] and not cov.ok


def test_tables_in_other_schemas_are_named_with_their_schema():
    cat = _catalog(columns={"reporting.daily": ("tenant_id",)})
    assert check_coverage(datamap.load(), cat).uncovered == ["reporting.daily"]
