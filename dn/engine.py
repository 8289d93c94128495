"""The Pulumi engine adapter: the only module that imports ``pulumi.automation``.

One stack per tenant or host, each a LocalWorkspace over dn's pinned CLI (dn.tooling) with:

- project ``dn``, runtime python, the state backend of the settings (``file://<data_dir>/state`` by
  default), the passphrase secrets provider (passphrase from settings.secrets, never in argv);
- a persistent work dir ``<data_dir>/stacks/<stack>``: ``Pulumi.<stack>.yaml`` there holds the stack's
  config and the salt of its secrets, so it must survive between runs (and be backed up);
- an inline program run in this process; dynamic providers run in a separate process started by the
  engine (``pulumi-resource-pulumi-python``), which imports their modules by name.

``up``/``preview``/``refresh``/``destroy`` stream engine events to ``on_event`` while they run and
return an :class:`Outcome`. Pulumi's failures become dn errors: a held stack lock is
:class:`~dn.errors.Locked` (exit 5), a missing plugin names the plugin and points at ``dn setup``,
anything else is :class:`~dn.errors.OperationFailed` carrying the engine's own error lines, with
every known secret value scrubbed.

A stack lock left in the file backend by a Pulumi CLI that died (``.pulumi/locks/<org>/dn/<stack>/
<id>.json``: pid, user, host name, time) is taken over when its holder is provably dead (this
machine and its pid gone or reused, or older than ``database.lock_stale_after``) and the caller
passed ``on_lock_takeover``, which writes the audit entry; a live holder's lock is never removed.

``destroy(remove=True)`` removes the stack with every copy of its state: ``pulumi stack rm
--remove-backups`` (stack file, ``.bak``, backups, history), then whatever of the stack's own paths
is still in a file backend, and its work dir (config and salt); it then searches the backend and
the work dirs for any file naming the stack or holding one of its ciphertexts or its salt, and
returns what it removed and checked (:class:`Purge`).
"""
from __future__ import annotations

import enum
import functools
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import pulumi.automation as auto
from pulumi.automation import errors as auto_errors
from semver import VersionInfo

from dn import tooling
from dn.errors import DnError, HostKeyError, InvalidInput, Locked, OperationFailed, PolicyViolation, Unreachable

if TYPE_CHECKING:
    from dn.config import Settings

PROJECT = "dn"
STACK_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
OnEvent = Callable[["auto.EngineEvent"], None]

# The engine's wording when a plugin is neither in PULUMI_HOME/plugins nor on PATH (automatic
# acquisition is off in dn's engine environment), e.g. "no resource plugin 'pulumi-resource-docker'
# found in the workspace at version v5.2.0 or on your $PATH".
_PLUGIN_MISSING = [
    re.compile(r"no (?:resource|analyzer|language|converter|tool) plugin '(?P<name>[^']+)' found"
               r"(?: in the workspace)?(?: at version (?P<version>v?[0-9][\w.+-]*))?"),
    re.compile(r"could not find (?:the )?(?:language )?plugin '?(?P<name>[\w.-]+)'?"),
]


@functools.lru_cache(maxsize=4)
def pulumi_command(root: str, version: str) -> "auto.PulumiCommand":
    """The CLI at ``root/bin/pulumi``, checked once (``pulumi version``) and reused by every stack.

    Built with ``PulumiCommand(root=...)``, which never downloads (``PulumiCommand.install`` would).
    """
    exe = Path(root) / "bin" / "pulumi"
    if not exe.exists():
        raise OperationFailed(f"the Pulumi CLI v{version} is not installed ({exe} is missing)",
                              hint="run `dn setup`")
    try:
        return auto.PulumiCommand(root=root, version=VersionInfo.parse(version))
    except auto.InvalidVersionError as e:
        raise OperationFailed(f"{exe}: {e}", hint="run `dn setup --rebuild`") from None
    except (OSError, subprocess.CalledProcessError) as e:  # `pulumi version` did not run
        raise OperationFailed(f"{exe} does not run: {e}", hint="run `dn setup --rebuild`") from None


@dataclass
class Outcome:
    """What an engine operation did: counts per step kind ("create", "update", "same", ...) and the
    stack outputs after it (secret values masked)."""

    op: str
    stack: str
    changes: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: list[str] = field(default_factory=list)
    stdout: str = ""
    purge: "Purge | None" = None
    lock_takeovers: list["StackLock"] = field(default_factory=list)

    @property
    def changed(self) -> int:
        """Steps that change something (everything but "same" and reads)."""
        return sum(n for k, n in self.changes.items() if k not in ("same", "read", "refresh"))


# ---------------------------------------------------------------------------------------------
# errors


def _secret_values(env: Mapping[str, str]) -> list[str]:
    vals = [v for k, v in env.items() if k in tooling.SECRET_ENV_KEYS and v]
    pf = env.get("PULUMI_CONFIG_PASSPHRASE_FILE")
    if pf:
        try:
            v = Path(pf).read_text().strip()
            if v:
                vals.append(v)
        except OSError:
            pass
    return vals


def scrub(text: str, secrets: list[str]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        if len(s) >= 4:
            text = text.replace(s, "[secret]")
    return text


@dataclass
class _Result:
    code: str
    stdout: str
    stderr: str


def _command_result(e: Exception) -> _Result:
    """CommandError keeps only ``str(CommandResult)``: " code: N\n stdout: ...\n stderr: ..."."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.match(r"\s*code: (?P<code>-?\d+)\n stdout: (?P<out>.*)\n stderr: (?P<err>.*)\Z", text, re.S)
    if not m:
        return _Result("?", "", text)
    return _Result(m.group("code"), m.group("out"), m.group("err"))


def _error_lines(result: _Result, limit: int = 8) -> str:
    """The engine's own diagnostics: lines that say "error" (stderr first), and for a Python
    traceback (a provider or program that raised) the exception it ends with."""
    lines = [ln.strip() for ln in f"{result.stderr}\n{result.stdout}".splitlines() if ln.strip()]
    picked = [ln for ln in lines if re.search(r"\berror\b|panic:|Exception|Error:", ln)
              or re.match(r"[A-Za-z_][\w.]*(Error|Exception|Input|Failed|Refused|Violation|Exit)\b.*?: ", ln)]
    picked = list(dict.fromkeys(picked or lines[-limit:]))[:limit]
    return "\n".join(picked)[:1500]


def policy_violations(stdout: str) -> list[str]:
    """The mandatory violations of the "Policies:" block of the engine's output, one line each:
    "<policy> (<type>: <name>): <message>"."""
    out: list[str] = []
    block = stdout.split("\nPolicies:", 1)
    if len(block) < 2:
        return out
    lines = block[1].split("\n\n", 1)[0].splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"(\s*)- \[mandatory\]\s+(.*)$", lines[i])
        if m:
            indent = len(m.group(1))
            head = re.sub(r"\s{2,}", " ", m.group(2).strip())
            msgs = []
            i += 1
            while i < len(lines) and len(lines[i]) - len(lines[i].lstrip()) > indent:
                msgs.append(lines[i].strip())
                i += 1
            out.append(f"{head}: {' '.join(msgs[1:] or msgs)}".rstrip(": "))
            continue
        i += 1
    return out


# A provider that refused its host's key or could not reach the host: the last line of its traceback
# names dn's exception, and the message (all that crosses the process boundary) says what the host
# presented and what to do.
_PROVIDER_REFUSAL = re.compile(
    r"^\s*dn\.(?:errors|ssh)\.(?P<kind>HostKeyError|AuthRefused|Unreachable): (?P<msg>.+?)\s*$", re.M)


def provider_refusal(text: str) -> "DnError | None":
    """The HostKeyError (or Unreachable) a provider raised, as the engine's output reports it:
    a host-key refusal first, since it is the one that must never read as a mere failure."""
    found = list(_PROVIDER_REFUSAL.finditer(text))
    if not found:
        return None
    m = next((m for m in found if m.group("kind") == "HostKeyError"), found[0])
    if m.group("kind") == "HostKeyError":
        return HostKeyError(m.group("msg"), hint="the key was checked against the host's pin in the current "
                                                 "configuration, not the one recorded in the stack's state")
    return Unreachable(m.group("msg"))


def missing_plugin(text: str) -> str | None:
    """The plugin (and version) a Pulumi error says is missing, if it says so."""
    for rx in _PLUGIN_MISSING:
        m = rx.search(text)
        if m:
            ver = m.groupdict().get("version")
            return f"{m.group('name')} {ver}" if ver else m.group("name")
    return None


def _settle_aborted_program(timeout: float = 2.0) -> None:
    """Let an inline program the engine aborted (missing plugin, policy failure) wind down here.

    The SDK's program thread keeps running for a moment after the CLI exits and leaves the
    program's coroutine suspended on a closed event loop. Its finaliser then runs wherever the
    garbage collector next fires, raising inside unrelated code (seen: CPython 3.11 "AST
    constructor recursion depth mismatch" in a later ast.parse). Collect until nothing more turns
    up, so that happens now, at a known point.
    """
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        time.sleep(0.05)
        quiet = quiet + 1 if gc.collect() == 0 else 0


@contextmanager
def _mapped(op: str, stack_name: str, env: Mapping[str, str]) -> Iterator[None]:
    where = f"stack {stack_name}"
    secrets = _secret_values(env)
    try:
        try:
            yield
        except BaseException:
            _settle_aborted_program()
            raise
    except DnError:
        raise
    except auto_errors.ConcurrentUpdateError:
        held = stack_locks(env.get("PULUMI_BACKEND_URL", ""), stack_name)
        who = "; ".join(lk.describe() for lk in held) or "a run dn cannot see (not a file backend)"
        raise StackLocked(
            f"{op}: another update holds the stack's lock: {who}",
            hint="wait for it to finish and rerun; a lock whose holder is provably dead (on this machine with its "
                 "pid gone, or older than database.lock_stale_after) is taken over by the rerun of a dn command",
            where=where, locks=held,
        ) from None
    except auto_errors.StackNotFoundError:
        raise InvalidInput("stack", f"no stack named {stack_name!r} in the state backend", where=where) from None
    except auto_errors.StackAlreadyExistsError:
        raise InvalidInput("stack", f"a stack named {stack_name!r} already exists", where=where) from None
    except auto_errors.CommandError as e:
        result = _command_result(e)
        plugin = missing_plugin(f"{result.stderr}\n{result.stdout}")
        if plugin:
            raise OperationFailed(
                f"{op}: the Pulumi plugin {plugin} is not installed", where=where,
                hint="run `dn setup`: it lists what is missing and how to provide it",
            ) from None
        violations = policy_violations(result.stdout)
        if violations:
            raise PolicyViolation(
                scrub(f"{op}: mandatory policy violated:\n" + "\n".join(violations), secrets), where=where,
            ) from None
        refused = provider_refusal(f"{result.stderr}\n{result.stdout}")
        if refused is not None:  # exit 3 naming the fingerprint, not a "Traceback" and exit 1
            raise type(refused)(scrub(f"{op}: {refused.message}", secrets), hint=refused.hint, where=where) from None
        detail = scrub(_error_lines(result), secrets)
        kind = {
            auto_errors.InlineSourceRuntimeError: "the stack program raised an exception",
            auto_errors.RuntimeError: "the stack program failed",
            auto_errors.CompilationError: "the stack program does not compile",
        }.get(type(e), f"pulumi {op} failed (exit {result.code})")
        raise OperationFailed(f"{op}: {kind}:\n{detail}", where=where) from None
    except FileNotFoundError as e:
        raise OperationFailed(f"{op}: {e.filename or 'pulumi'} not found", where=where,
                              hint="run `dn setup`") from None


class StackLocked(Locked):
    """Pulumi's lock on a stack is held (by ``locks``, as read from a file backend; empty when the
    backend cannot be read)."""

    def __init__(self, message: str, *, locks: list["StackLock"], **kw: Any) -> None:
        super().__init__(message, **kw)
        self.locks = locks


# ---------------------------------------------------------------------------------------------
# the file backend: stack locks, and every copy of a stack's state


def backend_dir(backend_url: str) -> Path | None:
    """The directory of a ``file://`` state backend (None for object storage or a service)."""
    return Path(backend_url[len("file://"):]) if backend_url.startswith("file://") else None


@dataclass(frozen=True)
class StackLock:
    """One lock file of a stack in a file backend, as Pulumi wrote it (pid, user, host, time)."""

    path: str
    pid: int
    username: str
    hostname: str
    timestamp: str
    at: float | None  # the timestamp as a Unix time (None: unreadable)

    def describe(self) -> str:
        return f"{self.username}@{self.hostname} (pid {self.pid}) since {self.timestamp}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "pid": self.pid, "username": self.username, "hostname": self.hostname,
                "timestamp": self.timestamp}

    def dead(self, stale_after: float | None, now: float | None = None) -> str | None:
        """Why this lock's holder is provably dead, or None (alive, or not provably dead)."""
        from dn import locks

        if self.at is None:
            return None
        gone = locks.process_gone(self.hostname, self.pid, since=self.at)
        if gone:
            return gone
        if self.hostname == socket.gethostname():
            return None  # a process of this machine with that pid runs, and it is not younger than the lock
        age = (now if now is not None else time.time()) - self.at
        if stale_after is not None and age > stale_after:
            return (f"its holder runs on another machine ({self.hostname}) and the lock is {int(age)}s old "
                    f"(database.lock_stale_after: {int(stale_after)}s)")
        return None


def _go_time(text: str) -> float | None:
    """A Go RFC 3339 time (nanoseconds, Z or an offset) as a Unix time."""
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text or "")
    if not m:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(f"{m.group(1)}.{frac}{tz}").timestamp()
    except ValueError:
        return None


def _stack_lock_dirs(root: Path, name: str) -> list[Path]:
    # .pulumi/locks/<org>/<project>/<stack>/ (project-scoped layout; the org is "organization")
    return sorted(p for p in (root / ".pulumi" / "locks").glob(f"*/{PROJECT}/{name}") if p.is_dir())


def stack_locks(backend_url: str, name: str) -> list[StackLock]:
    """The lock files of stack ``name`` in a file backend (none for other backends). A file that
    cannot be read or parsed is listed with no time, so it is never judged dead."""
    root = backend_dir(backend_url)
    if root is None or not STACK_NAME_RE.match(name):
        return []
    out = []
    for d in _stack_lock_dirs(root, name):
        for f in sorted(d.glob("*.json")):
            try:
                data = json.loads(f.read_text())
                out.append(StackLock(str(f), int(data["pid"]), str(data["username"]), str(data["hostname"]),
                                     str(data["timestamp"]), _go_time(str(data["timestamp"]))))
            except (OSError, ValueError, KeyError, TypeError):
                out.append(StackLock(str(f), 0, "?", "?", "?", None))
    return out


OnLockTakeover = Callable[["StackLock", str], None]


def take_over_dead_locks(backend_url: str, name: str, on_takeover: OnLockTakeover,
                         stale_after: float | None) -> list[StackLock]:
    """Remove the stack's lock files when every one of them has a provably dead holder
    (``on_takeover`` is called for each before its file goes: it writes the audit entry).
    Returns what was removed: nothing when any holder may be alive (then nothing is touched)."""
    held = stack_locks(backend_url, name)
    dead = [(lk, why) for lk in held if (why := lk.dead(stale_after)) is not None]
    if not held or len(dead) < len(held):
        return []
    for lk, why in dead:
        on_takeover(lk, why)
        Path(lk.path).unlink(missing_ok=True)
        # the file bucket keeps a key's metadata beside it (gocloud fileblob); its Delete removes both
        Path(lk.path + ".attrs").unlink(missing_ok=True)
    return held


@dataclass
class Purge:
    """What removing a stack left behind (nothing, when it worked) and what was checked."""

    stack: str
    backend: str
    removed: list[str] = field(default_factory=list)
    searched: list[str] = field(default_factory=list)
    files_searched: int = 0
    markers: int = 0
    remaining: list[str] = field(default_factory=list)
    checked: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"stack": self.stack, "backend": self.backend, "removed": self.removed, "searched": self.searched,
                "files_searched": self.files_searched, "ciphertexts_and_salts_searched_for": self.markers,
                "remaining": self.remaining, "checked": self.checked, "note": self.note}


# A passphrase-provider ciphertext or salt: "v1:<base64 nonce or salt>:<base64 ...>"
_CIPHERTEXT_RE = re.compile(r"v1:[A-Za-z0-9+/=]{8,}:[A-Za-z0-9+/=:]{8,}")


def _own_paths(root: Path | None, work_root: Path, name: str) -> list[Path]:
    """Every path that belongs to stack ``name`` alone: its state file and siblings
    (``<name>.json``, ``.json.bak``, ``.pulumi-tags``, ...), backups, history, lock dir, work dir."""
    out: list[Path] = []
    if root is not None:
        meta = root / ".pulumi"
        out += sorted(p for p in (meta / "stacks" / PROJECT).glob(f"{name}.*") if _names(p.name, name))
        out += [meta / "backups" / PROJECT / name, meta / "history" / PROJECT / name]
        out += _stack_lock_dirs(root, name)
    out.append(work_root / name)
    return [p for p in out if p.exists() or p.is_symlink()]


def _names(filename: str, name: str) -> bool:
    """Whether a file name is one of stack ``name``'s (``acme.json``, ``acme.json.bak``,
    ``acme.1733111111.json``, ``acme-1733111111.checkpoint.json``), not another stack's
    (``acme-two.json``)."""
    return filename == name or re.match(rf"^{re.escape(name)}(\.|-\d+\.)", filename) is not None


def _markers(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            try:
                found.update(_CIPHERTEXT_RE.findall(f.read_text(errors="replace")))
            except OSError:
                continue
    return found


def _search(dirs: list[Path], name: str, markers: set[str]) -> tuple[int, list[str]]:
    """(files searched, files that name stack ``name`` or hold one of ``markers``) under ``dirs``."""
    n, hits = 0, []
    for d in dirs:
        if not d.is_dir():
            continue
        for f in sorted(d.rglob("*")):
            if not f.is_file():
                continue
            if any(_names(part, name) for part in f.relative_to(d).parts):
                hits.append(str(f))
                continue
            n += 1
            if not markers:
                continue
            try:
                text = f.read_text(errors="replace")
            except OSError as e:
                hits.append(f"{f} (unreadable: {e.strerror})")
                continue
            if any(m in text for m in markers):
                hits.append(str(f))
    return n, hits


def stack_copies(backend_url: str, work_root: Path, name: str) -> list[str] | None:
    """Files in a file backend or under ``work_root`` that name stack ``name`` (read only; None
    when the backend is not a directory dn can list)."""
    root = backend_dir(backend_url)
    if root is None or not STACK_NAME_RE.match(name):
        return None
    return _search([root, work_root], name, set())[1]


def purge_stack(backend_url: str, work_root: Path, name: str, *, markers: set[str] | None = None) -> Purge:
    """Remove what is left of a removed stack ``name``: its own paths in a file backend and its work
    dir, then search the whole backend and ``work_root`` for any file naming the stack or holding
    one of its ciphertexts or salts (``markers``, plus those found in what is removed now).
    Restricted to the stack's own paths: another stack's files are never touched."""
    if not STACK_NAME_RE.match(name):
        raise InvalidInput("stack", f"{name!r} must match {STACK_NAME_RE.pattern}")
    root = backend_dir(backend_url)
    pg = Purge(name, backend_url)
    own = _own_paths(root, work_root, name)
    found = set(markers or ()) | _markers(own)
    if root is not None and any(p.is_file() for d in _stack_lock_dirs(root, name) for p in d.glob("*.json")):
        raise StackLocked(f"purge: stack {name} is locked; nothing was removed", where=f"stack {name}",
                          locks=stack_locks(backend_url, name), hint="rerun the same command")
    for p in own:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        pg.removed.append(str(p))
    search = ([root] if root is not None else []) + [work_root]
    pg.searched = [str(d) for d in search]
    pg.markers = len(found)
    pg.files_searched, pg.remaining = _search(search, name, found)
    pg.checked = root is not None
    if root is None:
        pg.note = ("object storage / service backend: pulumi stack rm --remove-backups removed the stack file, its "
                   ".bak, backups and history there; dn cannot list that backend, so only the work dirs were "
                   "searched")
    return pg


def _stack_rm(st: "auto.Stack") -> None:
    """``pulumi stack rm --yes --remove-backups``: the stack with its .bak, backups and history
    (the Automation API's remove_stack keeps the backups and a .bak of the state)."""
    ws = st.workspace
    env = {**({"PULUMI_HOME": ws.pulumi_home} if ws.pulumi_home else {}), **(ws.env_vars or {})}
    ws.pulumi_command.run(["stack", "rm", "--yes", "--remove-backups", st.name], ws.work_dir, env)


def _with_lock_takeover(st: "auto.Stack", op: str, fn: Callable[[], Any], on_lock_takeover: OnLockTakeover | None,
                        stale_after: float | None) -> tuple[Any, list[StackLock]]:
    """Run ``fn`` (one engine operation); if the stack's lock is held and every holder is provably
    dead, take the locks over (audited by ``on_lock_takeover``) and run it once more."""
    env = _env_of(st)
    try:
        with _mapped(op, st.name, env):
            return fn(), []
    except StackLocked:
        if on_lock_takeover is None:
            raise
        taken = take_over_dead_locks(env.get("PULUMI_BACKEND_URL", ""), st.name, on_lock_takeover, stale_after)
        if not taken:
            raise
    with _mapped(op, st.name, env):
        return fn(), taken


# ---------------------------------------------------------------------------------------------
# stacks


def stack_work_dir(settings: "Settings", name: str) -> Path:
    return Path(settings.data_dir) / "stacks" / name


def stack(
    settings: "Settings",
    name: str,
    program: Callable[[], None],
    *,
    extra_env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    version: str = tooling.PULUMI_VERSION,
) -> "auto.Stack":
    """Create or select the stack ``name`` of project ``dn`` running the inline ``program``.

    ``extra_env`` adds to the engine environment (e.g. PYTHONPATH for provider modules outside the
    installed packages).
    """
    if not STACK_NAME_RE.match(name):
        raise InvalidInput("stack", f"{name!r} must match {STACK_NAME_RE.pattern}")
    env = dict(environ if environ is not None else os.environ)
    engine_env = tooling.engine_env(settings, env, version)
    if extra_env:
        engine_env.update(extra_env)
    cmd = pulumi_command(str(tooling.install_root(version, env)), version)
    work_dir = stack_work_dir(settings, name)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    Path(engine_env["PULUMI_HOME"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    backend = settings.backend_url
    if backend.startswith("file://"):
        Path(backend[len("file://"):]).mkdir(parents=True, exist_ok=True, mode=0o700)
    opts = auto.LocalWorkspaceOptions(
        work_dir=str(work_dir),
        pulumi_home=engine_env["PULUMI_HOME"],
        env_vars=engine_env,
        secrets_provider="passphrase",
        project_settings=auto.ProjectSettings(
            name=PROJECT, runtime="python", backend=auto.ProjectBackend(url=backend),
        ),
        pulumi_command=cmd,
    )
    with _mapped("select", name, engine_env):
        return auto.create_or_select_stack(name, project_name=PROJECT, program=program, opts=opts)


def _env_of(st: "auto.Stack") -> Mapping[str, str]:
    return st.workspace.env_vars or {}


def _changes(summary: Any) -> dict[str, int]:
    if summary is None:
        return {}
    rc = getattr(summary, "resource_changes", None)
    if rc is None:  # PreviewResult carries the map itself
        rc = summary
    return {str(k): int(v) for k, v in (rc or {}).items()}


def _outputs(outs: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    values, secret = {}, []
    for k, ov in (outs or {}).items():
        if ov.secret:
            secret.append(k)
            values[k] = "[secret]"
        else:
            values[k] = ov.value
    return values, sorted(secret)


def stack_info(st: "auto.Stack") -> dict[str, Any]:
    """The stack's last update (kind, result, time, resource count) and its outputs, secret ones
    masked."""
    info: dict[str, Any] = {"name": st.name, "exists": True}
    with _mapped("info", st.name, _env_of(st)):
        last = st.info(show_secrets=False)
        outs = st.outputs()
    if last is not None:
        info.update(last_kind=last.kind, last_result=last.result,
                    last_update=last.end_time.isoformat() if last.end_time else None,
                    resources=sum((last.resource_changes or {}).values()))
    info["outputs"] = _outputs(outs)[0]
    return info


def up(st: "auto.Stack", on_event: OnEvent | None = None, *, on_lock_takeover: OnLockTakeover | None = None,
       stale_after: float | None = None, **kw: Any) -> Outcome:
    """Apply the program: create, update and delete until the stack matches it."""
    res, taken = _with_lock_takeover(st, "up", lambda: st.up(on_event=on_event, color="never", show_secrets=False,
                                                             **kw), on_lock_takeover, stale_after)
    outs, secret = _outputs(res.outputs)
    return Outcome("up", st.name, _changes(res.summary), outs, secret, res.stdout, lock_takeovers=taken)


def preview(st: "auto.Stack", on_event: OnEvent | None = None, **kw: Any) -> Outcome:
    """What ``up`` would do; each step arrives as a resource-pre event with its diff."""
    with _mapped("preview", st.name, _env_of(st)):
        res = st.preview(on_event=on_event, color="never", **kw)
    return Outcome("preview", st.name, _changes(res.change_summary), stdout=res.stdout)


def refresh(st: "auto.Stack", on_event: OnEvent | None = None, *, preview_only: bool = False,
            on_lock_takeover: OnLockTakeover | None = None, stale_after: float | None = None, **kw: Any) -> Outcome:
    """Read every resource back from where it lives and record what changed behind dn's back.

    ``preview_only`` reports the drift without writing it into the state.
    """
    if preview_only:
        with _mapped("refresh", st.name, _env_of(st)):
            res = st.preview_refresh(on_event=on_event, color="never", **kw)
        return Outcome("refresh", st.name, _changes(res.change_summary), stdout=res.stdout)
    res, taken = _with_lock_takeover(st, "refresh", lambda: st.refresh(on_event=on_event, color="never",
                                                                       show_secrets=False, **kw),
                                     on_lock_takeover, stale_after)
    return Outcome("refresh", st.name, _changes(res.summary), stdout=res.stdout, lock_takeovers=taken)


def destroy(st: "auto.Stack", on_event: OnEvent | None = None, *, remove: bool = False,
            on_lock_takeover: OnLockTakeover | None = None, stale_after: float | None = None, **kw: Any) -> Outcome:
    """Delete every resource of the stack; ``remove`` also deletes the stack with every copy of its
    state (history, backups, .bak files, work dir) and checks that none is left (``Outcome.purge``)."""
    backend = _env_of(st).get("PULUMI_BACKEND_URL", "")
    work = Path(st.workspace.work_dir)

    def run() -> Any:
        # the ciphertexts and salt are read before any file holding them is rewritten or removed
        markers = _markers(_own_paths(backend_dir(backend), work.parent, st.name)) if remove else None
        res = st.destroy(on_event=on_event, color="never", show_secrets=False, **kw)
        if remove:
            _stack_rm(st)
        return res, markers

    (res, markers), taken = _with_lock_takeover(st, "destroy", run, on_lock_takeover, stale_after)
    out = Outcome("destroy", st.name, _changes(res.summary), stdout=res.stdout, lock_takeovers=taken)
    if remove:
        out.purge = purge_stack(backend, work.parent, st.name, markers=markers)
    return out


def event_dict(event: Any) -> Any:
    """An engine event as plain JSON-able data (for renderers and logs; secrets are already masked
    by the engine as "[secret]")."""
    if isinstance(event, enum.Enum):
        return event.value
    if isinstance(event, datetime):
        return event.isoformat()
    if isinstance(event, Mapping):
        return {str(k): event_dict(v) for k, v in event.items()}
    if isinstance(event, (list, tuple)):
        return [event_dict(v) for v in event]
    if hasattr(event, "__dict__"):
        return {k: event_dict(v) for k, v in vars(event).items() if v is not None and not k.startswith("_")}
    return event
