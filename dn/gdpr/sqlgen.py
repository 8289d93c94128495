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


def batch_delete_sql(table: str, cond: Condition, limit: int, order: str | None = None,
                     after: bool = False) -> tuple[str, tuple[Any, ...]]:
    """Delete at most ``limit`` rows matching ``cond``, found by ctid (a TID scan needs no key
    column, so every table deletes the same way).

    With ``order`` (a column indexed together with the condition's column), the rows are taken in
    that order through the index, which stops after ``limit`` entries, and the statement returns
    (rows deleted, the largest ``order`` value deleted); ``after`` adds ``order >= %s`` so the
    next batch starts where the last one ended instead of scanning past the entries it deleted.
    Without ``order`` it returns nothing and the row count is the cursor's."""
    if limit < 1:
        raise ValueError("limit must be positive")
    t = ident(table)
    if order is None:
        return (f"DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {cond.sql} LIMIT {int(limit)}))",
                cond.params)
    o = column(order)
    where = f"{cond.sql} AND {o} >= %s" if after else cond.sql
    return (f"WITH d AS (DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {where} "
            f"ORDER BY {o} LIMIT {int(limit)})) RETURNING {o}) SELECT count(*), max({o}) FROM d", cond.params)
