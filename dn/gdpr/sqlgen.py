"""SQL fragments built from the data map (pure).

Identifiers come only from the validated data map (lower-case identifiers, checked again here)
and are double-quoted; values always travel as query parameters, never in the SQL text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dn.gdpr.datamap import IDENT_RE, TABLE_RE, DataMap, Table


def ident(name: str) -> str:
    """A quoted identifier; ``schema.table`` becomes ``"schema"."table"``."""
    if not TABLE_RE.match(name):
        raise ValueError(f"not a data map identifier: {name!r}")
    return ".".join(f'"{part}"' for part in name.split("."))


def column(name: str) -> str:
    if not IDENT_RE.match(name):
        raise ValueError(f"not a column name: {name!r}")
    return f'"{name}"'


@dataclass(frozen=True)
class Condition:
    sql: str
    params: tuple[Any, ...]


def tenant_condition(dm: DataMap, table: Table, tenant_id: int, slug: str) -> Condition:
    """The WHERE condition selecting ``table``'s rows of one tenant."""
    link = table.tenant
    if link.kind == "column":
        return Condition(f"{column(link.column)} = %s", (tenant_id,))
    if link.kind == "slug":
        return Condition(f"{column(link.column)} = %s", (slug,))
    if link.kind == "join":
        parent = dm.tables[link.via]
        inner = tenant_condition(dm, parent, tenant_id, slug)
        return Condition(f"{column(link.column)} IN (SELECT {column(link.key)} FROM {ident(parent.name)} "
                         f"WHERE {inner.sql})", inner.params)
    raise ValueError(f"{table.name}: its rows belong to no tenant")


def count_sql(table: str, cond: Condition) -> tuple[str, tuple[Any, ...]]:
    return f"SELECT count(*) FROM {ident(table)} WHERE {cond.sql}", cond.params


# The smallest value of a batch key's type, as SQL: a walk "from the bottom" starts there.
FLOORS = {"smallint": "-32768", "integer": "-2147483648", "bigint": "-9223372036854775808", "text": "''",
          "character varying": "''", "timestamp with time zone": "'-infinity'",
          "timestamp without time zone": "'-infinity'", "date": "'-infinity'"}


def floor_of(type_name: str) -> str | None:
    """The SQL literal of the smallest value of ``type_name`` (format_type), if dn knows it."""
    return FLOORS.get(type_name.split("(")[0].strip())


def batch_delete_sql(table: str, cond: Condition, limit: int, order: str | None = None,
                     after: bool = False, prefix: str | None = None,
                     floor: str | None = None) -> tuple[str, tuple[Any, ...]]:
    """Delete at most ``limit`` rows matching ``cond``, found by ctid (a TID scan needs no key
    column, so every table deletes the same way).

    With ``order`` (a column indexed together with the condition's column), the rows are taken in
    that order through the index, which stops after ``limit`` entries, and the statement returns
    (rows found, rows deleted, the largest ``order`` value found) — a row updated by another
    session while the batch waited for it is found but not deleted. ``after`` adds a lower bound (a parameter,
    or the literal ``floor``: the smallest value of the key's type) so a batch starts where the
    last one ended instead of scanning past the entries it deleted: with ``prefix`` (the column
    ``cond`` fixes, leading the index) the row comparison ``(prefix, order) >= (%s, bound)``, which
    only the index on (prefix, order) can serve — a plain ``order >= bound`` would let the planner
    walk the index of ``order`` alone through every other tenant's rows while the statistics still
    count the deleted ones; else ``order >= bound``. Without ``order`` the statement returns
    nothing and the row count is the cursor's."""
    if limit < 1:
        raise ValueError("limit must be positive")
    if floor is not None and floor not in FLOORS.values():
        raise ValueError(f"not a known floor literal: {floor!r}")
    t = ident(table)
    if order is None:
        return (f"DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {cond.sql} LIMIT {int(limit)}))",
                cond.params)
    o = column(order)
    keys = f"{column(prefix)}, {o}" if prefix else o
    where = cond.sql
    if after:
        bound = floor if floor is not None else "%s"
        where += f" AND ({keys}) >= (%s, {bound})" if prefix else f" AND {o} >= {bound}"
    return (f"WITH s AS MATERIALIZED (SELECT ctid, {o} FROM {t} WHERE {where} ORDER BY {keys} LIMIT {int(limit)}), "
            f"d AS (DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM s)) RETURNING 1) "
            f"SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM d), (SELECT max({o}) FROM s)", cond.params)


def exists_sql(table: str, cond: Condition) -> tuple[str, tuple[Any, ...]]:
    return f"SELECT EXISTS (SELECT 1 FROM {ident(table)} WHERE {cond.sql})", cond.params
