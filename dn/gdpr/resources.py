"""The steps of a GDPR deletion that act outside the database, over the components that own them.

- the LUKS volume: crypto-erased by :mod:`dn.host.luks`; dn reads ``cryptsetup luksDump`` on the
  host afterwards as evidence that no keyslot remains;
- the tenant's stack (containers, network, nginx vhost, firewall chains, timers): destroyed by
  :func:`dn.tenants.destroy_stack`; dn then probes the host for every resource by its derived
  name (dn.models) as evidence that none remains;
- the backup keys: crypto-shredded by :func:`dn.backup.run.shred` in every keystore dn ever put
  one in (this machine's, each host's, the region's escrow), each checked afterwards (``checked``:
  key files found and tombstone, per place), with the list of affected backups and the date each
  expires anyway.

When a component's API is missing, the step fails loudly naming what it cannot do — unless the
tenant has no such resource (the probe shows it), which is recorded as "nothing to do" with the
probe as evidence. Every method is idempotent: a resumed deletion may run a step again.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dn.errors import OperationFailed
from dn.gdpr.plan import BackupKeys, HostNames

if TYPE_CHECKING:
    from dn.config import Settings
    from dn.context import Context

RUNBOOK = "gdpr-deletion#a-step-fails"
UNIT_DIR = "/etc/systemd/system"
Progress = Callable[[str], None]


class StepFailed(OperationFailed):
    default_runbook = RUNBOOK


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def host_names(settings: "Settings", slug: str, host: str) -> HostNames:
    """The tenant's resources on ``host`` by the names dn.models derives from the slug."""
    from dn.models import HostBaseline, TenantSpec
    from dn.render.nginx import vhost_path

    hb = HostBaseline.from_settings(settings, host)
    # The derived names depend on the slug alone; the rest of the spec is not needed for them.
    spec = TenantSpec.model_construct(slug=slug)
    unit = spec.backup_unit
    return HostNames(
        host=host, network=spec.network, containers=(spec.tagging_container, spec.preview_container),
        vhost=vhost_path(hb, spec), chains=(spec.chain_forward, spec.chain_input),
        timers=(hb.path(f"{UNIT_DIR}/{unit}.timer"), hb.path(f"{UNIT_DIR}/{unit}.service")),
        volume=hb.path(spec.volume_image), mapper=spec.mapper_name, mount=hb.path(spec.mount_path))


# -- luksDump ------------------------------------------------------------------------------------
def _keyslots_json(session: Any, path: str) -> list[int] | None:
    """The keyslot ids of a LUKS2 header (from its JSON metadata), or None if ``path`` is not LUKS2."""
    r = session.run(["cryptsetup", "luksDump", "--dump-json-metadata", path], check=False)
    if not r.ok:
        return None
    try:
        meta = json.loads(r.text)
    except ValueError:
        return None
    return sorted(int(k) for k in (meta.get("keyslots") or {}))


def luks_keyslots(dump: str) -> list[str]:
    """The keyslot numbers a LUKS1 or LUKS2 ``luksDump`` lists as in use."""
    if re.search(r"^Key Slot \d+: ", dump, re.M):  # LUKS1
        return re.findall(r"^Key Slot (\d+): ENABLED", dump, re.M)
    m = re.search(r"^Keyslots:\s*\n(?P<body>(?:[ \t]+.*\n|\n)*)", dump + "\n", re.M)
    if not m:
        return []
    return re.findall(r"^\s{1,2}(\d+): ", m.group("body"), re.M)


# -- the host probe ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One read-only look at the host. ``absent`` recognises the answer "does not exist"; exit 0
    means present; any other answer (daemon down, command missing) makes the probe fail rather
    than report a resource as gone."""

    resource: str
    argv: tuple[str, ...]
    absent: Callable[[int, str], bool]
    present: Callable[[int, str], bool] = lambda rc, out: rc == 0


def _stderr_says(pattern: str) -> Callable[[int, str], bool]:
    rx = re.compile(pattern)
    return lambda rc, err: rc == 1 and bool(rx.search(err))


def _chain_in_save(chain: str) -> tuple[Callable[[int, str], bool], Callable[[int, str], bool]]:
    # iptables-nft answers `-S MISSING` with "incompatible, use 'nft'", so read the saved ruleset
    rx = re.compile(rf"^:{re.escape(chain)} ", re.M)
    return (lambda rc, out: rc == 0 and bool(rx.search(out)), lambda rc, out: rc == 0 and not rx.search(out))


def probe_checks(names: HostNames) -> list[Check]:
    checks = [Check(f"docker container {c}", ("docker", "container", "inspect", "--format", "{{.Id}}", c),
                    absent=_stderr_says(r"No such (container|object)")) for c in names.containers]
    checks.append(Check(f"docker network {names.network}",
                        ("docker", "network", "inspect", "--format", "{{.Id}}", names.network),
                        absent=_stderr_says(r"not found|No such network")))
    exists = {"absent": lambda rc, err: rc == 1}
    checks.append(Check(f"nginx vhost {names.vhost}", ("test", "-e", names.vhost), **exists))
    for tool in ("iptables-save", "ip6tables-save"):
        for chain in names.chains:
            present, absent = _chain_in_save(chain)
            checks.append(Check(f"{tool.removesuffix('-save')} chain {chain}", (tool,), absent=absent, present=present))
    checks += [Check(f"systemd unit {u}", ("test", "-e", u), **exists) for u in names.timers]
    return checks


def probe(session: Any, names: HostNames) -> dict[str, Any]:
    """Look for every resource of the tenant's stack on the host (read-only)."""
    results = []
    outputs: dict[tuple[str, ...], Any] = {}
    for c in probe_checks(names):
        r = outputs.get(c.argv) or session.run(list(c.argv), check=False)
        outputs[c.argv] = r
        text = r.text if c.argv[0].endswith("-save") else r.stderr.decode("utf-8", "replace")
        if c.present(r.rc, text if c.argv[0].endswith("-save") else ""):
            present = True
        elif c.absent(r.rc, text):
            present = False
        else:
            raise StepFailed(f"cannot tell whether {c.resource} exists on {names.host}: `{' '.join(c.argv)}` exited "
                             f"{r.rc}: {r.stderr.decode('utf-8', 'replace').strip()[:200]}",
                             hint="fix the host (is dockerd running? are iptables and docker installed?) and rerun")
        results.append({"resource": c.resource, "present": present, "command": " ".join(c.argv), "exit": r.rc})
    return {"host": names.host, "checked_at": _now(), "checks": results,
            "present": [r["resource"] for r in results if r["present"]]}


def volume_files(session: Any, names: HostNames) -> list[str]:
    """The volume image and any file next to it named after it (header backups)."""
    directory, _, base = names.volume.rpartition("/")
    r = session.run(["find", directory, "-maxdepth", "1", "-name", f"{base}*"], check=False)
    if r.rc != 0:  # the directory does not exist: no volume
        return []
    return sorted(line for line in r.text.splitlines() if line.strip())


class Resources:
    """The real adapter over dn.ssh, dn.host.luks, dn.tenants and dn.backup."""

    def __init__(self, ctx: "Context", progress: Progress | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.progress = progress or (lambda _: None)

    def _session(self, host: str):
        from dn import ssh

        return ssh.connect(self.settings.host(host))

    # -- LUKS ----------------------------------------------------------------------------------
    def erase_volume(self, slug: str, names: HostNames) -> dict[str, Any]:
        """Crypto-erase the tenant's volume with dn.host.luks.remove (every keyslot of the image
        and of any header backup wiped, then the files removed), keeping ``cryptsetup luksDump``
        of each erased file, taken after its erase and before its removal, as evidence."""
        luks = _optional("dn.host.luks")
        with self._session(names.host) as s:
            files = volume_files(s, names)
            if not files:
                directory, _, base = names.volume.rpartition("/")
                return {"summary": "nothing to do: no LUKS volume of the tenant on the host", "volume": names.volume,
                        "present": False, "files": [], "checked_at": _now(),
                        "command": f"find {directory} -maxdepth 1 -name {base}*"}
            if luks is None or not all(hasattr(luks, f) for f in ("remove", "VolumeSpec")):
                raise StepFailed(
                    f"tenant {slug} has a LUKS volume on host {names.host} ({', '.join(files)}), and this dn cannot "
                    "crypto-erase it: dn.host.luks.remove is missing; nothing was erased",
                    hint="install a dn with the LUKS applier and rerun the same command", where=f"tenant:{slug}")
            before = {f: _keyslots_json(s, f) for f in files}
            # The size of a volume plays no part in removing it.
            spec = luks.VolumeSpec(name=slug, image=names.volume, size_mb=0, mapper=names.mapper, mount=names.mount)
            dumps: dict[str, dict[str, Any]] = {}

            def on_progress(what: str) -> None:
                # remove() reports "delete" right before it removes a file it has erased: the
                # moment the erased header can still be read
                if what == "delete":
                    for f in files:
                        if f not in dumps and (slots := _keyslots_json(s, f)) == []:
                            text = s.run(["cryptsetup", "luksDump", f], check=False)
                            dumps[f] = {"keyslots": slots, "luks_dump": text.text if text.ok else None}

            self.progress(f"crypto-erasing {names.volume} on {names.host}")
            applied = luks.remove(s, spec, progress=on_progress)
            left = volume_files(s, names)
        if left:
            raise StepFailed(f"after the crypto-erase, files remain on {names.host}: {', '.join(left)}",
                             where=f"tenant:{slug}")
        luks_files = [f for f, slots in before.items() if slots is not None]
        missing = [f for f in luks_files if f not in dumps]
        return {"summary": f"crypto-erased {len(luks_files)} LUKS header(s) (no keyslot remains) and removed "
                           f"{len(files)} file(s)",
                "volume": names.volume, "present": True, "files_before": files, "files_after": left,
                "keyslots_before": {f: before[f] for f in luks_files},
                "after_erase": dumps,
                "evidence_missing": missing,
                "changes": [{"action": c.action, "target": c.target} for c in applied.plan.changes],
                "checked_at": _now()}

    # -- the stack -----------------------------------------------------------------------------
    def destroy_stack(self, slug: str, names: HostNames) -> dict[str, Any]:
        from dn import db

        tenants = _optional("dn.tenants")
        api = all(hasattr(tenants, f) for f in ("destroy_stack", "get_tenant", "list_tenants")) if tenants else False
        destroyed: dict[str, Any] = {"api": "dn.tenants.destroy_stack" if api else None}
        if api:
            exists = self._stack_exists(slug)
            destroyed["stack_existed"] = exists
            if exists:
                with db.connect(self.settings.database, application_name="dn gdpr delete (stack)") as conn:
                    rec = tenants.get_tenant(conn, slug)
                    others = [o for o in tenants.list_tenants(conn, host=names.host) if o.slug != slug]
                spec = rec.host_view(self.settings)
                self.progress(f"destroying stack {slug}")
                run = tenants.destroy_stack(self.ctx, spec, others)
                destroyed["changes"] = getattr(run, "changes", None)
                destroyed["state"] = getattr(run, "purge", None)
        destroyed["state"] = self._purge_state(slug, destroyed.get("state"))
        with self._session(names.host) as s:
            evidence = probe(s, names)
        if evidence["present"]:
            why = ("the stack was destroyed but" if destroyed.get("stack_existed") else
                   "no stack of the tenant exists, but" if api else
                   "this dn has no stack destroy (dn.tenants.destroy_stack is missing) and")
            raise StepFailed(f"{why} the host {names.host} still has: {', '.join(evidence['present'])}; "
                             "nothing else was changed", where=f"tenant:{slug}",
                             hint="remove them (`dn tenant show` names them) and rerun the same command")
        summary = ("stack destroyed; no resource remains on the host" if destroyed.get("stack_existed")
                   else "nothing to do: no stack and no resource of the tenant on the host")
        st = destroyed["state"]
        summary += (f"; no copy of its state remains ({st['files_searched']} files of {', '.join(st['searched'])} "
                    f"searched)" if st.get("checked") else f"; state: {st.get('note')}")
        return {"summary": summary, **destroyed, "probe": evidence}

    def _purge_state(self, slug: str, done: dict[str, Any] | None) -> dict[str, Any]:
        """No copy of the stack's state may outlive it: its history, backups, .bak files and work
        dir (the secret config and its salt) are removed and the state backend and work dirs
        searched for anything naming the stack or holding its ciphertexts. ``done`` is what the
        stack's removal just did and checked; without it (a resume after a crash, the stack already
        removed) the removal and the search happen here."""
        from dn import engine

        if not done:
            done = engine.purge_stack(self.settings.backend_url, engine.stack_work_dir(self.settings, slug).parent,
                                      slug).to_dict()
        if done.get("remaining"):
            raise StepFailed(f"copies of the stack {slug}'s state remain after its removal: "
                             f"{', '.join(done['remaining'])}", where=f"tenant:{slug}",
                             hint="remove them and rerun the same command")
        return done

    def _stack_exists(self, slug: str) -> bool:
        from dn import engine

        return (engine.stack_work_dir(self.settings, slug) / f"Pulumi.{slug}.yaml").exists()

    # -- backups -------------------------------------------------------------------------------
    def _owner(self, slug: str, tenant_id: int) -> str:
        """The key owner of the tenant being deleted (its identity: the row, not the slug)."""
        from dn.backup import run

        row = run.tenant_row(self.settings, slug)
        if row is None or row.id != tenant_id:
            raise StepFailed(f"tenant {slug} is no longer registry row {tenant_id}: its backup keys cannot be named",
                             where=f"tenant:{slug}")
        return row.owner

    def backup_keys(self, slug: str, tenant_id: int) -> BackupKeys:
        from dn.backup import keys

        owner = self._owner(slug, tenant_id)
        ks = keys.keystore(self.settings, self.ctx.environ)
        ids = tuple(ks.key_ids(owner)) + tuple(ks.key_ids(keys.legacy_owner(slug)))
        return BackupKeys(owner, ids, ks.is_destroyed(owner), str(ks.dir),
                          self.settings.backup.region if self.settings.backup else None)

    def shred_backups(self, slug: str, tenant_id: int) -> dict[str, Any]:
        """Crypto-shred the tenant's backup keys in every keystore dn ever put one in (this
        machine's, each host's, the region's escrow) with :func:`dn.backup.run.shred`, which checks
        each place afterwards; the result says what was checked where."""
        from dn.backup import keys, run

        owner = self._owner(slug, tenant_id)
        ks = keys.keystore(self.settings, self.ctx.environ)
        if self.settings.backup is None:
            done = run.shred(self.settings, self.ctx.environ, slug, owner)
            return {"summary": f"destroyed {len(done['key_ids'])} backup key(s) (no backup region configured: no escrow)",
                    "owner": owner, "key_ids": done["key_ids"], "checked": done["checked"],
                    "tenant_backups": [], "platform_backups": []}
        now = datetime.now(timezone.utc)
        self.progress(f"crypto-shredding the backup keys of {owner}")
        with run.open_store(self.settings) as store:
            listings = store.list()
            done = run.shred(self.settings, self.ctx.environ, slug, owner, store=store)
            rows = run.plan(self.settings, self.ctx.environ, store, now, listings=listings)
        destroyed_ids = set(done["key_ids"])
        tenant_backups, platform_backups = [], []
        for row in rows:
            m = row.listing.manifest
            if m is None:
                continue
            if m.kind == "tenant" and m.key.owner in done["owners"]:
                tenant_backups.append({
                    "id": m.id, "created": m.snapshot_at.isoformat(), "key_id": m.key.id,
                    "key_destroyed": m.key.id in destroyed_ids and ks.lookup(bytes.fromhex(m.key.id)) is None,
                    "removed_by": "the next `dn backup prune` (unreadable from now on)"})
            elif m.kind == "platform":
                platform_backups.append({"id": m.id, "created": m.snapshot_at.isoformat(),
                                         "tier": row.decision.tier,
                                         "expires_by": _expires_by(row, self.settings, now)})
        unreadable = [b for b in tenant_backups if not b["key_destroyed"]]
        if unreadable:
            raise StepFailed(f"after shredding, the key of tenant backup(s) {', '.join(b['id'] for b in unreadable)} "
                             "is still known", where=f"tenant:{slug}")
        last = max((b["expires_by"] for b in platform_backups if b["expires_by"]), default=None)
        return {"summary": f"destroyed {len(done['key_ids'])} backup key(s); {len(tenant_backups)} tenant backup(s) "
                           f"unreadable; {len(platform_backups)} platform backup(s) expire by {last or '-'}",
                "owner": owner, "key_ids": done["key_ids"], "escrow_removed": done["escrow_removed"],
                "destroyed_at": done["destroyed_at"], "region": self.settings.backup.region,
                "checked": done["checked"],
                "tenant_backups": tenant_backups, "platform_backups": platform_backups,
                "platform_note": "platform backups hold every tenant's rows under the platform key; the tenant's "
                                 "rows in them are beyond use and disappear when each expires"}


def _expires_by(row: Any, settings: "Settings", now: datetime) -> str | None:
    from dn.backup.retention import add_months

    created = row.listing.created
    r = settings.retention
    tier = row.decision.tier
    if tier == "monthly":
        return add_months(created, r.backup_monthly_months).date().isoformat()
    if tier == "daily":
        return (created + timedelta(days=r.backup_daily_days)).date().isoformat()
    if tier in ("expired", "shredded", "incomplete"):
        return now.date().isoformat()  # removed by the next prune
    return None  # "newest": kept until a newer platform backup exists


def _optional(module: str):
    """A dn module another component provides, or None while it does not exist yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise


def describe_missing(apis: Sequence[tuple[str, str]]) -> list[str]:
    """Which of (module, function) are not available in this dn."""
    out = []
    for module, fn in apis:
        m = _optional(module)
        if m is None or not hasattr(m, fn):
            out.append(f"{module}.{fn}")
    return out
