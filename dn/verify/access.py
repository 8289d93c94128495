"""Access claims read from the platform database's catalogue: the CI preview identity is read-only.

A pull request's preview runs its code with the preview's database credential
(.github/workflows/preview.yml, docs/ci-security.md), so what that credential can do is what any
pull request can do. The NOLOGIN role ``dn_preview`` (dn/schema/007_preview_role.sql) may read the
tenant registry and nothing else; CI logs in as a member of it and of nothing else. Read as dn's
day-to-day role (the catalogue is readable by every role); evidence names roles and relations.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dn.verify.core import Status, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe

PREVIEW_ROLE = "dn_preview"  # dn.db.PREVIEW_ROLE
REGISTRY = ("tenant_settings", "tenants")  # what `dn preview` reads (dn/tenants.py _records)
WRITE_PRIVILEGES = "INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER"

# Every role that is dn_preview or a member of it, directly or through other roles.
_PREVIEW_MEMBERS = """
WITH RECURSIVE m(oid) AS (
    SELECT oid FROM pg_roles WHERE rolname = %(role)s
    UNION
    SELECT a.member FROM pg_auth_members a JOIN m ON a.roleid = m.oid)
SELECT r.rolname, r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolbypassrls,
       coalesce((SELECT array_agg(g.rolname ORDER BY g.rolname) FROM pg_auth_members a
                  JOIN pg_roles g ON g.oid = a.roleid
                 WHERE a.member = r.oid AND g.rolname <> %(role)s
                   AND g.oid NOT IN (SELECT oid FROM m)), '{}') AS also_member_of
  FROM pg_roles r JOIN m ON m.oid = r.oid ORDER BY r.rolname"""


def check_preview_read_only(probe: "Probe") -> tuple[Status, list[str]]:
    fails: list[str] = []
    members = probe.query(_PREVIEW_MEMBERS, {"role": PREVIEW_ROLE}, what="reading the database's roles")
    role = next((m for m in members if m["rolname"] == PREVIEW_ROLE), None)
    if role is None:
        return Status.FAIL, [f"no role {PREVIEW_ROLE}: the CI preview has no read-only identity (run `dn db init`)"]
    if role["rolcanlogin"]:
        fails.append(f"{PREVIEW_ROLE} can log in (it must be NOLOGIN; CI logs in as a member)")
    for m in members:
        powers = [p for p, on in (("SUPERUSER", m["rolsuper"]), ("CREATEROLE", m["rolcreaterole"]),
                                  ("BYPASSRLS", m["rolbypassrls"])) if on]
        if powers:
            fails.append(f"{m['rolname']} (a preview identity) has {', '.join(powers)}")
        if m["also_member_of"]:
            fails.append(f"{m['rolname']} (a preview identity) is also a member of {', '.join(m['also_member_of'])}")
    rels = probe.query(
        "SELECT c.relname,"
        " has_table_privilege(%(role)s, c.oid, %(writes)s) AS writes,"
        " has_any_column_privilege(%(role)s, c.oid, 'SELECT') AS reads"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') ORDER BY c.relname",
        {"role": PREVIEW_ROLE, "writes": WRITE_PRIVILEGES}, what="reading table privileges")
    writes = [r["relname"] for r in rels if r["writes"]]
    reads = [r["relname"] for r in rels if r["reads"]]
    if writes:
        fails.append(f"{PREVIEW_ROLE} may write {', '.join(writes)}")
    extra = [r for r in reads if r not in REGISTRY]
    if extra:
        fails.append(f"{PREVIEW_ROLE} may read {', '.join(extra)} (only the tenant registry: {', '.join(REGISTRY)})")
    definers = probe.query(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.prosecdef AND has_function_privilege(%s, p.oid, 'EXECUTE')"
        " ORDER BY p.proname", (PREVIEW_ROLE,), what="reading function privileges")
    if definers:
        fails.append(f"{PREVIEW_ROLE} may execute SECURITY DEFINER {', '.join(d['proname'] for d in definers)}")
    logins = [m["rolname"] for m in members if m["rolcanlogin"] and m["rolname"] != PREVIEW_ROLE]
    ev = [f"{PREVIEW_ROLE}: reads {', '.join(reads) or 'nothing'}; writes {', '.join(writes) or 'nothing'} "
          f"of {plural(len(rels), 'relation')}",
          f"{plural(len(logins), 'login role')} of the CI preview: {', '.join(logins) or 'none'}"]
    return (Status.FAIL if fails else Status.PASS), fails + ev
