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


def batch_delete_sql(table: str, cond: Condition, limit: int) -> tuple[str, tuple[Any, ...]]:
    """Delete at most ``limit`` rows matching ``cond``, found by ctid (a TID scan needs no key
    column, so every table deletes the same way) through whatever index serves ``cond``."""
    if limit < 1:
        raise ValueError("limit must be positive")
    t = ident(table)
    return (f"DELETE FROM {t} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {cond.sql} LIMIT {int(limit)}))",
            cond.params)
