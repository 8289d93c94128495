"""The data map: every table of the platform database, how its rows belong to a tenant, its data
class and retention, and what a GDPR deletion does with it (``policies/datamap.toml``).

Loading validates the file strictly (unknown keys, classes, strategies and malformed
identifiers are errors naming the table and key). :func:`check_coverage` compares the map with
the live database's catalogue: a table the map does not cover, a table or column the map names
that the database lacks, or a tenant-bound table without the GDPR write guard makes dn refuse to
delete or enforce retention (:func:`require_coverage`).

Pure except :func:`read_catalog`, which reads the catalogue over a dn.db connection.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from dn.errors import ConfigError, PolicyViolation

if TYPE_CHECKING:
    from dn.db import Connection

DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "policies" / "datamap.toml"
TENANTS = "tenants"  # the tenant registry: its row is the tenant
IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
TABLE_RE = re.compile(r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$")
ON_DELETE = ("delete", "retain", "minimise", "none")
MINIMISE = ("null", "pseudonym", "empty")
EXPORT_FORMATS = ("csv", "json", "json-files")
UNITS = ("days", "months", "years")
GUARD_TRIGGERS = ("gdpr_write_guard_insert", "gdpr_write_guard_update")


@dataclass(frozen=True)
class Period:
    """A retention period: ``setting`` names a field of settings.retention in ``unit``s, or
    ``setting`` is None and ``text`` says how long (e.g. until the tenant's deletion)."""

    text: str
    setting: str | None = None
    unit: str | None = None
    start: str | None = None  # "end of the calendar year"
    enforced_by: str | None = None  # another dn command enforces it (the audit log's prune)

    def describe(self, retention: Any | None = None) -> str:
        if self.setting is None:
            return self.text
        n = getattr(retention, self.setting, "?") if retention is not None else f"retention.{self.setting}"
        out = f"{n} {self.unit}"
        if self.start:
            out += f" from the {self.start}"
        return out


@dataclass(frozen=True)
class DataClass:
    name: str
    description: str
    personal: bool
    period: Period


@dataclass(frozen=True)
class TenantLink:
    """How a row belongs to a tenant."""

    kind: str  # column | join | slug | none
    column: str | None = None
    via: str | None = None
    key: str | None = None

    def describe(self) -> str:
        if self.kind == "column":
            return f"{self.column} = tenants.id"
        if self.kind == "join":
            return f"{self.column} = {self.via}.{self.key} (a row of the tenant)"
        if self.kind == "slug":
            return f"{self.column} = tenants.slug"
        return "none"


@dataclass(frozen=True)
class Encrypted:
    column: str
    key_id_column: str


@dataclass(frozen=True)
class Export:
    format: str
    file: str | None = None
    dir: str | None = None
    columns: tuple[str, ...] = ()
    order: str | None = None
    name_column: str | None = None
    document_column: str | None = None

    @property
    def used_columns(self) -> tuple[str, ...]:
        extra = tuple(c for c in (self.order, self.name_column, self.document_column) if c)
        return self.columns + extra


@dataclass(frozen=True)
class Table:
    name: str
    data_class: str
    tenant: TenantLink
    on_delete: str
    age: str | None = None
    minimise: Mapping[str, str] = field(default_factory=dict)
    reason: str | None = None
    encrypted: tuple[Encrypted, ...] = ()
    export: Export | None = None
    batch_key: str | None = None

    def columns_named(self) -> list[tuple[str, str]]:
        """(column, what it is for) for every column the map names in this table."""
        out = []
        if self.tenant.column:
            out.append((self.tenant.column, "tenant"))
        if self.age:
            out.append((self.age, "age"))
        if self.batch_key:
            out.append((self.batch_key, "batch_key"))
        out += [(c, "minimise") for c in self.minimise]
        for e in self.encrypted:
            out += [(e.column, "encrypted"), (e.key_id_column, "encrypted.key_id_column")]
        if self.export:
            out += [(c, "export") for c in self.export.used_columns]
        return out


@dataclass(frozen=True)
class DataMap:
    path: str
    classes: Mapping[str, DataClass]
    tables: Mapping[str, Table]

    def table(self, name: str) -> Table:
        return self.tables[name]

    def data_class(self, table: Table) -> DataClass:
        return self.classes[table.data_class]

    def tenant_bound(self) -> list[Table]:
        return [t for t in self.tables.values() if t.tenant.kind != "none"]

    def needs_guard(self, t: Table) -> bool:
        """Tables the write guard must protect: a tenant_id-style column, and either deleted with
        the tenant or holding personal data."""
        return (t.name != TENANTS and t.tenant.kind == "column"
                and (t.on_delete == "delete" or self.classes[t.data_class].personal))


# -- loading -------------------------------------------------------------------------------------
class _Reader:
    """Reads one TOML table, remembering which keys were used so unknown keys are reported."""

    def __init__(self, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a table")
        self.where = where
        self.data = data
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, rule: str | None = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise ConfigError(f"{self.where}.{key}: required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.where}.{key}: must be {rule or names}")
        return value

    def ident(self, key: str, default: Any = ..., *, pattern: re.Pattern = IDENT_RE) -> Any:
        value = self.get(key, str, default)
        if value is not None and value is not default and not pattern.match(value):
            raise ConfigError(f"{self.where}.{key}: {value!r} is not a lower-case SQL identifier")
        return value

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise ConfigError(f"{self.where}: unknown key(s) {', '.join(extra)}")


def _period(where: str, raw: Any, retention_fields: set[str]) -> Period:
    if isinstance(raw, str):
        return Period(text=raw)
    r = _Reader(where, raw)
    setting = r.get("setting", str)
    if setting not in retention_fields:
        raise ConfigError(f"{where}.setting: {setting!r} is not a field of [retention] "
                          f"({', '.join(sorted(retention_fields))})")
    unit = r.get("unit", str)
    if unit not in UNITS:
        raise ConfigError(f"{where}.unit: must be one of {', '.join(UNITS)}")
    start = r.get("from", str, None)
    if start not in (None, "end of the calendar year"):
        raise ConfigError(f"{where}.from: only 'end of the calendar year' is known")
    if start and unit != "years":
        raise ConfigError(f"{where}.from: counting from the end of the year needs unit = 'years'")
    enforced = r.get("enforced_by", str, None)
    if enforced not in (None, "audit prune"):
        raise ConfigError(f"{where}.enforced_by: only 'audit prune' is known")
    r.done()
    return Period(text=f"retention.{setting} {unit}", setting=setting, unit=unit, start=start, enforced_by=enforced)


def _tenant(where: str, raw: Any) -> TenantLink:
    if isinstance(raw, str):
        if raw == "none":
            return TenantLink("none")
        if not IDENT_RE.match(raw):
            raise ConfigError(f"{where}: {raw!r} is not a column name (or \"none\")")
        return TenantLink("column", column=raw)
    r = _Reader(where, raw)
    if "slug_column" in raw:
        link = TenantLink("slug", column=r.ident("slug_column"))
    else:
        link = TenantLink("join", column=r.ident("column"), via=r.ident("via", pattern=TABLE_RE), key=r.ident("key"))
    r.done()
    return link


def _export(where: str, raw: Any) -> Export:
    r = _Reader(where, raw)
    fmt = r.get("format", str)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"{where}.format: must be one of {', '.join(EXPORT_FORMATS)}")
    path_re = re.compile(r"^[a-z0-9][a-z0-9_./-]{0,100}$")
    if fmt == "json-files":
        directory = r.get("dir", str)
        if not path_re.match(directory) or ".." in directory:
            raise ConfigError(f"{where}.dir: {directory!r} must be a relative path of [a-z0-9_./-]")
        exp = Export(fmt, dir=directory, name_column=r.ident("name_column"), document_column=r.ident("document_column"))
    else:
        file = r.get("file", str)
        if not path_re.match(file) or ".." in file or not file.endswith("." + fmt):
            raise ConfigError(f"{where}.file: {file!r} must be a relative path of [a-z0-9_./-] ending in .{fmt}")
        cols = r.get("columns", list, rule="a list of column names")
        if not cols or not all(isinstance(c, str) and IDENT_RE.match(c) for c in cols):
            raise ConfigError(f"{where}.columns: must be a non-empty list of column names")
        exp = Export(fmt, file=file, columns=tuple(cols), order=r.ident("order", None))
    r.done()
    return exp


def parse(data: Mapping[str, Any], path: str = "datamap") -> DataMap:
    """A validated DataMap from the parsed TOML document."""
    from dn.config import RetentionConfig

    retention_fields = set(RetentionConfig.model_fields)
    top = _Reader(path, dict(data))
    version = top.get("version", int)
    if version != 1:
        raise ConfigError(f"{path}: version {version} is not supported (1)")
    classes: dict[str, DataClass] = {}
    for name, raw in top.get("classes", dict).items():
        where = f"{path}: classes.{name}"
        if not IDENT_RE.match(name):
            raise ConfigError(f"{where}: class names are lower-case identifiers")
        r = _Reader(where, raw)
        classes[name] = DataClass(name, r.get("description", str), r.get("personal", bool),
                                  _period(f"{where}.period", r.get("period", (str, dict)), retention_fields))
        r.done()
    tables: dict[str, Table] = {}
    for name, raw in top.get("tables", dict).items():
        where = f"{path}: tables.{name}"
        if not TABLE_RE.match(name):
            raise ConfigError(f"{where}: table names are lower-case identifiers (schema.table outside public)")
        r = _Reader(where, raw)
        cls = r.get("class", str)
        if cls not in classes:
            raise ConfigError(f"{where}.class: {cls!r} is not one of the classes ({', '.join(sorted(classes))})")
        tenant = _tenant(f"{where}.tenant", r.get("tenant", (str, dict)))
        on_delete = r.get("on_delete", str)
        if on_delete not in ON_DELETE:
            raise ConfigError(f"{where}.on_delete: must be one of {', '.join(ON_DELETE)}")
        minimise = r.get("minimise", dict, {})
        for col, how in minimise.items():
            if not IDENT_RE.match(col) or how not in MINIMISE:
                raise ConfigError(f"{where}.minimise.{col}: must map a column to one of {', '.join(MINIMISE)}")
        enc = []
        for i, e in enumerate(r.get("encrypted", list, [])):
            er = _Reader(f"{where}.encrypted[{i}]", e)
            enc.append(Encrypted(er.ident("column"), er.ident("key_id_column")))
            er.done()
        raw_export = r.get("export", dict, None)
        t = Table(name=name, data_class=cls, tenant=tenant, on_delete=on_delete, age=r.ident("age", None),
                  minimise=dict(minimise), reason=r.get("reason", str, None), encrypted=tuple(enc),
                  export=_export(f"{where}.export", raw_export) if raw_export is not None else None,
                  batch_key=r.ident("batch_key", None))
        r.done()
        _check_table(where, t, classes[cls])
        tables[name] = t
    top.done()
    if TENANTS not in tables or tables[TENANTS].tenant != TenantLink("column", column="id"):
        raise ConfigError(f"{path}: tables.{TENANTS} must be mapped with tenant = \"id\" (it is the tenant registry)")
    for t in tables.values():
        if t.tenant.kind == "join":
            parent = tables.get(t.tenant.via or "")
            if parent is None or parent.tenant.kind not in ("column", "join"):
                raise ConfigError(f"{path}: tables.{t.name}.tenant.via: {t.tenant.via!r} must be a mapped table "
                                  "whose rows belong to a tenant")
    _check_join_cycles(path, tables)
    return DataMap(path, classes, tables)


def _check_table(where: str, t: Table, cls: DataClass) -> None:
    if t.on_delete == "none" and t.tenant.kind != "none":
        raise ConfigError(f"{where}.on_delete: 'none' is only for tables whose rows belong to no tenant")
    if t.tenant.kind == "none" and t.on_delete != "none":
        raise ConfigError(f"{where}.on_delete: a table whose rows belong to no tenant has on_delete = 'none'")
    if t.on_delete == "delete" and t.tenant.kind not in ("column", "join"):
        raise ConfigError(f"{where}.on_delete: 'delete' needs tenant = a column or a join")
    if t.on_delete == "delete" and t.name == TENANTS:
        raise ConfigError(f"{where}.on_delete: the tenant's own row is minimised, never deleted")
    if t.on_delete in ("retain", "minimise") and not t.reason:
        raise ConfigError(f"{where}.reason: required when on_delete = {t.on_delete!r} (say why the rows are kept)")
    if t.on_delete == "minimise" and not t.minimise:
        raise ConfigError(f"{where}.minimise: on_delete = 'minimise' names the columns to minimise")
    if t.minimise and t.on_delete != "minimise":
        raise ConfigError(f"{where}.minimise: only with on_delete = 'minimise'")
    if t.tenant.column and t.tenant.column in t.minimise:
        raise ConfigError(f"{where}.minimise: the tenant column cannot be minimised")
    if cls.period.setting and cls.period.enforced_by is None and not t.age:
        raise ConfigError(f"{where}.age: class {cls.name!r} has a retention period, so name the column "
                          "a row's age is measured by")
    if t.batch_key and t.tenant.kind != "column":
        raise ConfigError(f"{where}.batch_key: needs tenant = a column (the index is on (tenant column, batch_key))")
    if t.export and t.export.format == "json-files" and t.tenant.kind != "column":
        raise ConfigError(f"{where}.export: json-files export needs a tenant column")


def _check_join_cycles(path: str, tables: Mapping[str, Table]) -> None:
    for t in tables.values():
        seen = [t.name]
        cur = t
        while cur.tenant.kind == "join":
            cur = tables[cur.tenant.via]  # validated above
            if cur.name in seen:
                raise ConfigError(f"{path}: tables.{t.name}.tenant: the joins {' -> '.join(seen + [cur.name])} form a cycle")
            seen.append(cur.name)


def load(path: Path | str | None = None) -> DataMap:
    """Load and validate the data map (default: policies/datamap.toml of this checkout)."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: the data map is missing", hint="dn ships it as policies/datamap.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse(data, str(p))


# -- the live catalogue and coverage -------------------------------------------------------------
@dataclass(frozen=True)
class Catalog:
    """What the database holds: tables with their columns, enabled triggers, foreign keys."""

    columns: Mapping[str, tuple[str, ...]]
    triggers: Mapping[str, frozenset[str]] = field(default_factory=dict)
    foreign_keys: tuple[tuple[str, str], ...] = ()  # (referencing table, referenced table)
    indexes: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)  # leading key columns


@dataclass
class Coverage:
    uncovered: list[str] = field(default_factory=list)        # in the database, not in the map
    missing_tables: list[str] = field(default_factory=list)   # in the map, not in the database
    missing_columns: list[str] = field(default_factory=list)  # "table.column (what)"
    unguarded: list[str] = field(default_factory=list)        # tenant-bound, no write guard
    unindexed: list[str] = field(default_factory=list)        # batch_key without an index on (tenant, key)

    @property
    def ok(self) -> bool:
        return not (self.uncovered or self.missing_tables or self.missing_columns or self.unguarded or self.unindexed)

    def problems(self) -> list[str]:
        out = []
        if self.uncovered:
            out.append(f"tables the data map does not cover: {', '.join(self.uncovered)}")
        if self.missing_tables:
            out.append(f"tables the data map names that the database lacks: {', '.join(self.missing_tables)}")
        if self.missing_columns:
            out.append(f"columns the data map names that the database lacks: {', '.join(self.missing_columns)}")
        if self.unguarded:
            out.append(f"tenant-bound tables without the GDPR write guard triggers: {', '.join(self.unguarded)}")
        if self.unindexed:
            out.append(f"batch keys without an index on (tenant column, batch key): {', '.join(self.unindexed)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "uncovered": self.uncovered, "missing_tables": self.missing_tables,
                "missing_columns": self.missing_columns, "unguarded": self.unguarded, "unindexed": self.unindexed}


def check_coverage(dm: DataMap, catalog: Catalog) -> Coverage:
    cov = Coverage()
    cov.uncovered = sorted(set(catalog.columns) - set(dm.tables))
    cov.missing_tables = sorted(set(dm.tables) - set(catalog.columns))
    for name in sorted(set(dm.tables) & set(catalog.columns)):
        t = dm.tables[name]
        have = set(catalog.columns[name])
        for col, what in t.columns_named():
            if col not in have:
                cov.missing_columns.append(f"{name}.{col} ({what})")
        if t.tenant.kind == "join" and t.tenant.via in catalog.columns and t.tenant.key not in catalog.columns[t.tenant.via]:
            cov.missing_columns.append(f"{t.tenant.via}.{t.tenant.key} (join key of {name})")
        if dm.needs_guard(t) and not set(GUARD_TRIGGERS) <= set(catalog.triggers.get(name, ())):
            cov.unguarded.append(name)
        if t.batch_key and not any(idx[:2] == (t.tenant.column, t.batch_key) for idx in catalog.indexes.get(name, ())):
            cov.unindexed.append(f"{name} ({t.tenant.column}, {t.batch_key})")
    return cov


def require_coverage(dm: DataMap, catalog: Catalog, doing: str) -> None:
    """Raise PolicyViolation naming what the map and the database disagree on."""
    cov = check_coverage(dm, catalog)
    if not cov.ok:
        raise PolicyViolation(
            f"refusing {doing}: the data map ({dm.path}) does not match the database: " + "; ".join(cov.problems()),
            hint="classify every table in policies/datamap.toml (class, tenant, on_delete, retention) "
                 "and run `dn db init` for pending migrations",
            where="database")


_CATALOG_SQL = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END AS name,
       array_agg(a.attname::text ORDER BY a.attnum) AS columns
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
 GROUP BY 1
"""

_TRIGGERS_SQL = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END AS name,
       array_agg(t.tgname::text) AS triggers
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE NOT t.tgisinternal AND t.tgenabled <> 'D'
 GROUP BY 1
"""

_FKS_SQL = """
SELECT CASE WHEN cn.nspname = 'public' THEN c.relname ELSE cn.nspname || '.' || c.relname END AS child,
       CASE WHEN pn.nspname = 'public' THEN p.relname ELSE pn.nspname || '.' || p.relname END AS parent
  FROM pg_constraint k
  JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
  JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
 WHERE k.contype = 'f'
"""


_INDEXES_SQL = """
SELECT CASE WHEN n.nspname = 'public' THEN c.relname ELSE n.nspname || '.' || c.relname END AS name,
       array_agg(coalesce(a.attname::text, '') ORDER BY k.ord) AS cols
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
  LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum AND k.attnum > 0
 WHERE i.indisvalid AND k.ord <= i.indnkeyatts
 GROUP BY i.indexrelid, 1
"""


def read_catalog(conn: "Connection") -> Catalog:
    """The live catalogue (pg_catalog is readable by every role, unlike information_schema,
    which hides tables the role has no privilege on)."""
    from dn import db

    with db.translate_errors("reading the database catalogue"):
        cols = {r["name"]: tuple(r["columns"]) for r in db.rows(conn, _CATALOG_SQL)}
        trig = {r["name"]: frozenset(r["triggers"]) for r in db.rows(conn, _TRIGGERS_SQL)}
        fks = tuple(sorted({(r["child"], r["parent"]) for r in db.rows(conn, _FKS_SQL)}))
        idx: dict[str, list[tuple[str, ...]]] = {}
        for r in db.rows(conn, _INDEXES_SQL):
            idx.setdefault(r["name"], []).append(tuple(r["cols"]))
    return Catalog(cols, trig, fks, {k: tuple(v) for k, v in idx.items()})
