"""dn doctor: check every prerequisite and say how to fix what is missing.

Each check returns a Check: what was looked at, whether it is fine, the facts seen, and the fix.
Checks never raise: a failure to look is itself a failed check with its reason.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from dn.errors import DnError, ExitCode

if TYPE_CHECKING:
    from dn.context import Context

PY_DEPS = ("typer", "rich", "pulumi", "pulumi-docker", "pulumi-policy", "jinja2", "paramiko",
           "cryptography", "psycopg", "pydantic", "idna")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True
    code: int = int(ExitCode.FAILED)  # the exit code this failure stands for

    def to_dict(self) -> dict:
        return asdict(self)


def _guard(name: str, fn: Callable[[], Check], *, required: bool = True) -> Check:
    try:
        c = fn()
    except DnError as e:
        c = Check(name, False, str(e), e.hint or (f"dn runbook show {e.runbook}" if e.runbook else None),
                  code=int(e.exit_code))
    except Exception as e:  # a check must report, never crash the report
        c = Check(name, False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    c.required = required and c.required
    return c


def check_config(ctx: "Context") -> Check:
    s = ctx.settings
    return Check("configuration", True, f"{s.source}; default host {s.default_host}; state {s.backend_url}")


def check_passphrase(ctx: "Context") -> Check:
    sec = ctx.settings.secrets
    if sec.passphrase_file is not None:
        p = sec.passphrase_file
        if not p.exists():
            return Check("secrets passphrase", False, f"secrets.passphrase_file {p} does not exist",
                         "create it (mode 0600) or run `dn sandbox up` for the sandbox; see `dn runbook show passphrase-loss`")
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            return Check("secrets passphrase", False, f"{p} is readable by others (mode {mode:o})", f"chmod 600 {p}")
        if not p.read_bytes().strip():
            return Check("secrets passphrase", False, f"{p} is empty", "write the passphrase into it")
        return Check("secrets passphrase", True, f"from file {p} (mode {mode:o})")
    if ctx.environ.get(sec.passphrase_env):
        return Check("secrets passphrase", True, f"from environment variable {sec.passphrase_env}")
    return Check("secrets passphrase", False, f"${sec.passphrase_env} is not set and no passphrase_file is configured",
                 f"export {sec.passphrase_env} or set secrets.passphrase_file")


def check_python_deps(ctx: "Context") -> Check:
    seen, missing = [], []
    for dist in PY_DEPS:
        try:
            seen.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        return Check("python packages", False, f"missing: {', '.join(missing)}", "pip install -e . (scripts/setup)")
    return Check("python packages", True, ", ".join(seen))


def check_pulumi(ctx: "Context") -> list[Check]:
    from dn import tooling

    prov = tooling.status(environ=ctx.environ, pulumi_home=ctx.settings.data_dir / "pulumi-home")
    out = []
    for t in prov.tools:
        detail = f"{t.version or ''} {t.path or ''} {('(' + t.source + ')') if t.source else ''}".strip()
        out.append(Check(t.name, t.present, detail or "not found", t.how, required=t.required))
    return out


def _host_facts(ctx: "Context") -> list[Check]:
    from dn import ssh

    host = ctx.settings.host()
    name = ctx.settings.default_host
    checks = []
    with ssh.connect(host) as s:
        checks.append(Check(f"ssh {name}", True, f"{host.user}@{host.address}:{host.port}, host key pinned and matching"))

        def probe(label: str, argv: list[str], fix: str, *, required: bool = True) -> None:
            r = s.run(argv, check=False, timeout=30)
            text = (r.stdout + r.stderr).decode("utf-8", "replace").strip().splitlines()
            checks.append(Check(f"{name}: {label}", r.ok, (text[0] if text else f"exit {r.rc}")[:160],
                                None if r.ok else fix, required=required))

        probe("nginx", ["nginx", "-v"], "apt-get install nginx on the host")
        probe("iptables", ["iptables", "--version"], "apt-get install iptables on the host")
        probe("dockerd", ["docker", "version", "--format", "server {{.Server.Version}}"],
              "install docker.io on the host and start dockerd")
        probe("cryptsetup", ["cryptsetup", "--version"], "apt-get install cryptsetup-bin on the host")
        r = s.run(["sh", "-c", "test -e /dev/mapper/control && grep -qw device-mapper /proc/devices"], check=False)
        checks.append(Check(
            f"{name}: device-mapper", r.ok,
            "present: LUKS volumes can be opened and mounted" if r.ok else
            "absent: LUKS volumes are formatted and verified but cannot be opened here",
            None if r.ok else "on a real host: modprobe dm_crypt; in the sandbox this is expected",
            required=False))
    return checks


def check_host(ctx: "Context") -> list[Check]:
    try:
        return _host_facts(ctx)
    except DnError as e:
        return [Check(f"ssh {ctx.settings.default_host}", False, str(e),
                      e.hint or (f"dn runbook show {e.runbook}" if e.runbook else None), code=int(e.exit_code))]


def check_backup_region(ctx: "Context") -> Check:
    from dn import ssh

    b = ctx.settings.backup
    if b is None:
        return Check("backup region", False, "no [backup] target configured", "configure [backup] (see README)")
    with ssh.connect(b) as s:
        s.sftp.stat(b.path)
    return Check("backup region", True, f"sftp {b.user}@{b.address}:{b.port}{b.path} ({b.region}), host key pinned")


def check_database(ctx: "Context") -> Check:
    from dn import db

    st = db.status(ctx.settings.database)
    if st.pending:
        return Check("postgresql", False, f"{st.target} PostgreSQL {st.server_version}; pending migrations: {', '.join(st.pending)}",
                     "run `dn db init`")
    return Check("postgresql", True, f"{st.target} PostgreSQL {st.server_version}, schema current ({len(st.applied)} migrations)")


def run_all(ctx: "Context") -> list[Check]:
    checks = [_guard("configuration", lambda: check_config(ctx))]
    if not checks[0].ok:
        return checks
    checks.append(_guard("secrets passphrase", lambda: check_passphrase(ctx)))
    checks.append(_guard("python packages", lambda: check_python_deps(ctx)))
    for group, fn in (("pulumi", check_pulumi), ("host", check_host)):
        try:
            checks.extend(fn(ctx))
        except Exception as e:  # reported like any failed check
            checks.append(Check(group, False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"))
    checks.append(_guard("backup region", lambda: check_backup_region(ctx)))
    checks.append(_guard("postgresql", lambda: check_database(ctx)))
    return checks


def exit_code(checks: list[Check]) -> int:
    failed = [c for c in checks if c.required and not c.ok]
    if not failed:
        return 0
    if all(c.code == int(ExitCode.UNREACHABLE) for c in failed):
        return int(ExitCode.UNREACHABLE)
    return int(ExitCode.INVALID) if any(c.code == int(ExitCode.INVALID) for c in failed) else int(ExitCode.FAILED)
