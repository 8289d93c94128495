"""The pinned Pulumi CLI and the helper programs dn's engine needs, provided once per machine.

``ensure()`` makes ``<tools dir>/pulumi/<version>/bin`` hold:

- ``pulumi``: the engine. Taken from, in order: an existing ``pulumi`` on ``PATH`` that reports the
  pinned version; the official installer (only when its host is reachable); a build from the Go
  module proxy at the pinned version.
- ``pulumi-resource-pulumi-python``: the launcher the engine starts for dynamic providers; it runs
  ``$PULUMI_PYTHON_CMD -u -m pulumi.dynamic`` (dn sets PULUMI_PYTHON_CMD to its own interpreter).
- ``pulumi-language-python`` when it can be had (built like the CLI): the engine needs it only to
  run a policy pack given as a directory. dn runs its Python policy packs through
  ``policy_pack_launcher()`` instead, which does not need it.

The tools dir is ``$DN_TOOLS_DIR`` or ``$XDG_CACHE_HOME/dn/tools`` (``~/.cache/dn/tools``): outside
any checkout, so every clone and CI run on a machine shares one build. Installing is serialised by a
file lock and atomic: everything is assembled in a temporary directory beside the target and renamed
into place, so a crashed or concurrent run never leaves a half-installed version behind.

``engine_env(settings)`` is the environment the Automation API needs to drive that CLI.

No pulumi import here: this module is shared by ``dn setup`` and the engine adapter (dn.engine).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from dn.errors import ConfigError

if TYPE_CHECKING:
    from dn.config import Settings

# The Python SDK installed is pulumi 3.272.0 (the newest on PyPI). The Go module proxy reachable
# from dn's machines refuses github.com/pulumi/pulumi/pkg/v3@v3.272.0 ("403 This module version is
# not available"); v3.274.1 is served, so the CLI is pinned there. A CLI newer than the SDK within
# major version 3 is a combination Pulumi supports (the Automation API only enforces a minimum).
PULUMI_VERSION = "3.274.1"

PKG_MODULE = "github.com/pulumi/pulumi/pkg/v3"
SDK_MODULE = "github.com/pulumi/pulumi/sdk/v3"
CLI_PACKAGE = "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"
LANGUAGE_PYTHON_MODULE = "github.com/pulumi/pulumi/sdk/python/cmd/pulumi-language-python/v3"
LANGUAGE_PYTHON_PACKAGE = LANGUAGE_PYTHON_MODULE
VERSION_VARIABLE = "github.com/pulumi/pulumi/sdk/v3/go/common/version.Version"
WRAPPER_MODULE = "dn.local/pulumi-build"

INSTALLER_HOST = "get.pulumi.com"
INSTALLER_URL = f"https://{INSTALLER_HOST}/install.sh"

# pulumi-docker 5.2.0 (the SDK in pyproject.toml) declares this provider plugin in pulumi-plugin.json.
DOCKER_PLUGIN_VERSION = "5.2.0"

MANIFEST = "dn-tools.json"
SOURCES = ("path", "installer", "go-build")

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# pure helpers


def parse_version(text: str) -> str | None:
    """The semantic version in ``pulumi version`` output ("v3.274.1\\n" -> "3.274.1"), else None."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    m = _VERSION_RE.match(lines[-1])
    if not m:
        return None
    core = ".".join(m.group(i) for i in (1, 2, 3))
    return f"{core}-{m.group(4)}" if m.group(4) else core


@dataclass(frozen=True)
class Replace:
    """One ``replace`` directive of a go.mod."""

    old_path: str
    old_version: str | None
    new_path: str
    new_version: str | None

    @property
    def local(self) -> bool:
        """A replacement by a directory (``=> ../sdk``): it only exists inside the source repository."""
        return not self.new_version and (
            self.new_path.startswith(("./", "../", "/")) or self.new_path in (".", "..")
        )

    def directive(self) -> str:
        old = f"{self.old_path} {self.old_version}" if self.old_version else self.old_path
        new = f"{self.new_path} {self.new_version}" if self.new_version else self.new_path
        return f"replace {old} => {new}"


def replaces_from_gomod_json(doc: Mapping) -> list[Replace]:
    """The replace directives of a go.mod, from ``go mod edit -json`` output."""
    out = []
    for r in doc.get("Replace") or []:
        out.append(
            Replace(
                old_path=r["Old"]["Path"],
                old_version=r["Old"].get("Version") or None,
                new_path=r["New"]["Path"],
                new_version=r["New"].get("Version") or None,
            )
        )
    return out


def wrapper_gomod(
    go_version: str, requires: Mapping[str, str], replaces: Sequence[Replace], module: str = WRAPPER_MODULE
) -> str:
    """A throwaway main module that builds a command of a module whose go.mod has replace directives.

    ``go install module/cmd@version`` refuses such modules, and a dependency's replace directives are
    ignored anyway: only the main module's count. So the wrapper requires the modules at the pinned
    version and repeats their non-local replacements; local ones (``=> ../sdk``) point into the source
    repository and are covered by requiring that module at the same version instead.
    """
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", go_version):
        raise ValueError(f"go directive {go_version!r} is not a Go version")
    lines = [f"module {module}", "", f"go {go_version}", "", "require ("]
    lines += [f"\t{path} {ver}" for path, ver in sorted(requires.items())]
    lines.append(")")
    seen: set[tuple[str, str | None]] = set()
    kept = []
    for r in replaces:
        if r.local or r.old_path in requires or (r.old_path, r.old_version) in seen:
            continue
        seen.add((r.old_path, r.old_version))
        kept.append(r)
    if kept:
        lines.append("")
        lines += [r.directive() for r in kept]
    return "\n".join(lines) + "\n"


def decode_json_stream(text: str) -> list[dict]:
    """``go mod download -json`` prints one JSON object per module, back to back."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


# ---------------------------------------------------------------------------------------------
# where things live


def tools_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("DN_TOOLS_DIR"):
        return Path(env["DN_TOOLS_DIR"]).expanduser()
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dn" / "tools"


def install_root(version: str = PULUMI_VERSION, environ: Mapping[str, str] | None = None) -> Path:
    """``<tools dir>/pulumi/<version>``: ``bin/`` inside it is what PulumiCommand(root=...) expects."""
    return tools_dir(environ) / "pulumi" / version


# ---------------------------------------------------------------------------------------------
# launchers

DYNAMIC_LAUNCHER = "pulumi-resource-pulumi-python"

# The engine starts dynamic providers as a plugin named pulumi-resource-pulumi-python, found next to
# the CLI or on PATH, with its own arguments (the engine address, logging flags): pass them all on.
_DYNAMIC_LAUNCHER_TEXT = """#!/bin/sh
# Dynamic providers of Pulumi Python programs: run by the Pulumi engine (installed by dn).
exec "${PULUMI_PYTHON_CMD:-python3}" -u -m pulumi.dynamic "$@"
"""

# The engine starts an executable given as a policy pack directly, as an analyzer plugin, with the
# engine address as its first argument; pulumi.policy then runs the pack's __main__.py.
_POLICY_LAUNCHER_TEXT = """#!/bin/sh
# Python policy pack {pack}: run by the Pulumi engine as an analyzer plugin (installed by dn).
exec "${{PULUMI_PYTHON_CMD:-python3}}" -u -m pulumi.policy "$1" {pack_q}
"""


def _write_executable(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def write_dynamic_launcher(bin_dir: Path) -> Path:
    path = bin_dir / DYNAMIC_LAUNCHER
    _write_executable(path, _DYNAMIC_LAUNCHER_TEXT)
    return path


def policy_pack_launcher(pack_dir: Path, data_dir: Path) -> Path:
    """An analyzer launcher for the Python policy pack in ``pack_dir``; pass it to ``--policy-pack``.

    Pulumi runs a policy pack *directory* through the pulumi-language-python plugin, which cannot be
    built from the module proxy here; an *executable* policy pack it runs directly. The launcher
    lives under ``<data_dir>/policy-launchers/`` so the pack's own directory stays untouched.
    """
    import hashlib
    import shlex

    pack = Path(pack_dir).resolve()
    if not (pack / "__main__.py").is_file():
        raise ConfigError(f"{pack}: not a Python policy pack (no __main__.py)")
    digest = hashlib.sha256(str(pack).encode()).hexdigest()[:16]
    d = Path(data_dir) / "policy-launchers" / digest
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"pulumi-analyzer-policy-{pack.name}"
    _write_executable(path, _POLICY_LAUNCHER_TEXT.format(pack=pack.name, pack_q=shlex.quote(str(pack))))
    return path


# ---------------------------------------------------------------------------------------------
# running things


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 3600, log_file: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(argv), env=dict(env) if env is not None else None, cwd=cwd, capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if log_file is not None:
        with log_file.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}[exit {proc.returncode}]\n")
    return proc


def binary_version(path: Path | str, timeout: float = 30) -> str | None:
    """What ``<path> version`` reports, or None when it does not run or says nothing parseable."""
    env = dict(os.environ, PULUMI_SKIP_UPDATE_CHECK="true")
    try:
        p = _run([str(path), "version"], env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(p.stdout) if p.returncode == 0 else None


def _tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


class SourceUnavailable(Exception):
    """This source cannot provide the tool here; the message says why (shown by ``dn setup``)."""


# ---------------------------------------------------------------------------------------------
# the three sources of the CLI


@dataclass
class BuildContext:
    version: str
    staging: Path  # the version dir being assembled; binaries go to staging/bin
    log: Log
    environ: Mapping[str, str]
    exclude_dirs: tuple[Path, ...] = ()

    @property
    def bin(self) -> Path:
        return self.staging / "bin"


def from_path(bc: BuildContext) -> dict:
    """An existing ``pulumi`` on PATH that reports exactly the pinned version: linked, not copied."""
    path_var = bc.environ.get("PATH", "")
    dirs = [d for d in path_var.split(os.pathsep) if d]
    excluded = {p.resolve() for p in bc.exclude_dirs if p.exists()}
    candidates = []
    for d in dirs:
        try:
            if Path(d).resolve() in excluded:
                continue
        except OSError:
            continue
        exe = Path(d) / "pulumi"
        if exe.is_file() and os.access(exe, os.X_OK):
            candidates.append(exe)
    if not candidates:
        raise SourceUnavailable("no pulumi on PATH")
    seen = []
    for exe in candidates:
        v = binary_version(exe)
        if v == bc.version:
            target = exe.resolve()
            (bc.bin / "pulumi").symlink_to(target)
            # the CLI's siblings (language hosts, launchers) come along when they are there
            for sib in target.parent.glob("pulumi-language-python"):
                (bc.bin / sib.name).symlink_to(sib.resolve())
            return {"detail": f"on PATH: {exe}"}
        seen.append(f"{exe} is {v or 'unknown version'}")
    raise SourceUnavailable(f"pulumi on PATH is not v{bc.version} ({'; '.join(seen)})")


def probe_installer(host: str = INSTALLER_HOST, port: int = 443, timeout: float = 3.0) -> str | None:
    """None when ``host`` answers on ``port``, else why not. Contacts that host only (and DNS)."""
    result: dict = {}

    def resolve() -> None:
        try:
            result["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return f"{host} did not resolve within {timeout:.0f}s (no internet here)"
    if "error" in result:
        return f"{host} does not resolve ({result['error']}): no internet here"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} unreachable ({e})"


def from_installer(bc: BuildContext, probe: Callable[[], str | None] = probe_installer) -> dict:
    """The official installer script, as ``curl -fsSL https://get.pulumi.com | sh`` would run it."""
    why = probe()
    if why:
        raise SourceUnavailable(f"official installer skipped: {why}")
    script = bc.staging.parent / f".install-{os.getpid()}.sh"
    try:
        with urllib.request.urlopen(INSTALLER_URL, timeout=60) as r:  # noqa: S310 (fixed https URL)
            script.write_bytes(r.read())
        p = _run(["sh", str(script), "--no-edit-path", "--install-root", str(bc.staging), "--version", bc.version],
                 timeout=900)
        if p.returncode != 0:
            raise SourceUnavailable(f"official installer failed (exit {p.returncode}): {_tail(p.stdout + p.stderr, 4)}")
    except OSError as e:
        raise SourceUnavailable(f"official installer failed: {e}") from None
    finally:
        script.unlink(missing_ok=True)
    return {"detail": f"official installer ({INSTALLER_URL})"}


def go_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The Go build environment: trimmed paths, static binaries, no workspace; the default module
    and build caches, so later builds and CI on the same machine reuse them."""
    env = dict(environ)
    flags = env.get("GOFLAGS", "").split()
    flags = [f for f in flags if not f.startswith("-mod=")]
    if "-trimpath" not in flags:
        flags.append("-trimpath")
    env.update(GOFLAGS=" ".join(flags), CGO_ENABLED="0", GOWORK="off", GO111MODULE="on")
    return env


def _go(args: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_file: Path, timeout: float = 3600) -> str:
    p = _run(["go", *args], env=env, cwd=cwd, log_file=log_file, timeout=timeout)
    if p.returncode != 0:
        raise SourceUnavailable(f"`go {' '.join(args[:3])}` failed: {_tail(p.stderr or p.stdout, 6)}")
    return p.stdout


def go_build_command(
    bc: BuildContext,
    *,
    module: str,
    package: str,
    output: Path,
    pin_modules: Sequence[str] = (),
) -> dict:
    """Build ``package`` of ``module`` at ``v<version>`` through a generated wrapper module.

    ``pin_modules`` are required at the same version too (the pulumi sdk/pkg modules, which the
    source repository's go.mod points at by local replacements).
    """
    if shutil.which("go", path=bc.environ.get("PATH")) is None:
        raise SourceUnavailable("no Go toolchain: install Go 1.21 or newer (newer toolchains then come "
                                "from the module proxy by themselves, GOTOOLCHAIN=auto)")
    tag = f"v{bc.version}"
    bc.log(f"building {package}@{tag} from the Go module proxy (minutes, the first time on a machine)")
    env = go_env(bc.environ)
    work = Path(tempfile.mkdtemp(prefix="dn-go-build-"))
    log_file = bc.staging / "build.log"
    try:
        mods = [module] + [m for m in pin_modules if m != module]
        p = _run(["go", "mod", "download", "-json", *[f"{m}@{tag}" for m in mods]], env=env, cwd=work,
                 log_file=log_file, timeout=1800)
        infos = decode_json_stream(p.stdout) if p.stdout.strip() else []
        errors = [i["Error"] for i in infos if i.get("Error")]
        if errors or p.returncode != 0:
            msg = errors[0] if errors else _tail(p.stderr, 4)
            raise SourceUnavailable(f"module proxy: {msg.splitlines()[0]}")
        main = next(i for i in infos if i.get("Path") == module)
        out = _go(["mod", "edit", "-json", main["GoMod"]], env=env, cwd=work, log_file=log_file)
        doc = json.loads(out)
        go_version = (doc.get("Go") or "1.21")
        (work / "go.mod").write_text(
            wrapper_gomod(go_version, {m: tag for m in mods}, replaces_from_gomod_json(doc))
        )
        _go(["get", f"{package}@{tag}"], env=env, cwd=work, log_file=log_file, timeout=3600)
        ldflags = f"-s -w -X {VERSION_VARIABLE}={tag}"
        output.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        _go(["build", "-trimpath", "-ldflags", ldflags, "-o", str(output), package], env=env, cwd=work,
            log_file=log_file, timeout=5400)
        seconds = round(time.monotonic() - t0, 1)
        gov = _run(["go", "env", "GOVERSION"], env=env, cwd=work).stdout.strip()
        return {"detail": f"built from the Go module proxy ({package}@{tag}, {gov})",
                "build_seconds": seconds, "go": gov}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def from_go_build(bc: BuildContext) -> dict:
    t0 = time.monotonic()
    res = go_build_command(bc, module=PKG_MODULE, package=CLI_PACKAGE, output=bc.bin / "pulumi",
                           pin_modules=[PKG_MODULE, SDK_MODULE])
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


Source = Callable[[BuildContext], dict]
DEFAULT_SOURCES: tuple[tuple[str, Source], ...] = (
    ("path", from_path),
    ("installer", from_installer),
    ("go-build", from_go_build),
)


# ---------------------------------------------------------------------------------------------
# the result


@dataclass
class ToolStatus:
    name: str
    required: bool
    present: bool
    path: str | None = None
    version: str | None = None
    source: str | None = None
    detail: str | None = None
    how: str | None = None  # how to provide it, when missing

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Provisioning:
    version: str
    root: Path
    tools: list[ToolStatus] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)  # what each CLI source said, this run
    installed_now: bool = False

    @property
    def missing(self) -> list[ToolStatus]:
        return [t for t in self.tools if t.required and not t.present]

    @property
    def ok(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "root": str(self.root),
            "ok": self.ok,
            "installed_now": self.installed_now,
            "tools": [t.to_dict() for t in self.tools],
            "attempts": self.attempts,
        }


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(root: Path) -> dict:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode):
                total += st.st_blocks * 512
    return total


def _install(version: str, root: Path, sources: Sequence[tuple[str, Source]], environ: Mapping[str, str],
             log: Log, prov: Provisioning) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root.parent))
    staging.chmod(0o755)
    try:
        (staging / "bin").mkdir()
        bc = BuildContext(version=version, staging=staging, log=log, environ=environ,
                          exclude_dirs=(root / "bin",))
        manifest: dict = {"version": version, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for name, source in sources:
            try:
                res = source(bc)
            except SourceUnavailable as e:
                prov.attempts.append({"source": name, "ok": False, "reason": str(e)})
                log(f"pulumi: {name}: {e}")
                for leftover in (staging / "bin").iterdir():
                    leftover.unlink()
                continue
            got = binary_version(staging / "bin" / "pulumi")
            if got != version:
                prov.attempts.append({"source": name, "ok": False,
                                      "reason": f"the result reports {got or 'no version'}, not v{version}"})
                for leftover in (staging / "bin").iterdir():
                    leftover.unlink()
                continue
            prov.attempts.append({"source": name, "ok": True, "reason": res.get("detail")})
            manifest["pulumi"] = {"source": name, **res}
            break
        else:
            return
        _language_python(bc, manifest)
        write_dynamic_launcher(staging / "bin")
        manifest["disk_bytes"] = _du(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if root.exists():  # replaced deliberately (rebuild): keep the swap short
            old = root.with_name(f".{version}-old-{os.getpid()}")
            os.rename(root, old)
            os.rename(staging, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, root)
        prov.installed_now = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _language_python(bc: BuildContext, manifest: dict) -> None:
    target = bc.bin / "pulumi-language-python"
    if target.exists():
        manifest["language_python"] = {"source": manifest["pulumi"]["source"], "detail": "next to the CLI"}
        return
    if manifest["pulumi"]["source"] == "path":
        manifest["language_python"] = {"error": "not next to the pulumi found on PATH"}
        return
    try:
        res = go_build_command(bc, module=LANGUAGE_PYTHON_MODULE, package=LANGUAGE_PYTHON_PACKAGE,
                               output=target, pin_modules=[PKG_MODULE, SDK_MODULE])
        manifest["language_python"] = {"source": "go-build", **res}
    except SourceUnavailable as e:
        manifest["language_python"] = {"error": str(e)}
        bc.log(f"pulumi-language-python: {e}")


def plugin_dir(pulumi_home: Path, kind: str, name: str, version: str) -> Path:
    return pulumi_home / "plugins" / f"{kind}-{name}-v{version}"


def status(version: str = PULUMI_VERSION, *, environ: Mapping[str, str] | None = None,
           pulumi_home: Path | None = None) -> Provisioning:
    """What is installed now, without installing anything."""
    env = dict(os.environ if environ is None else environ)
    root = install_root(version, env)
    prov = Provisioning(version=version, root=root)
    _describe(prov, env, pulumi_home)
    return prov


def _describe(prov: Provisioning, env: Mapping[str, str], pulumi_home: Path | None) -> None:
    root, version = prov.root, prov.version
    bin_dir = root / "bin"
    manifest = read_manifest(root)
    cli = bin_dir / "pulumi"
    got = binary_version(cli) if cli.exists() else None
    src = manifest.get("pulumi", {})
    how_cli = (f"run `dn setup`: it takes pulumi v{version} from PATH, else the official installer (needs "
               "internet), else builds it from the Go module proxy (needs Go 1.21+ on PATH); or set "
               "DN_TOOLS_DIR to a tools dir that has it")
    prov.tools.append(ToolStatus(
        name="pulumi", required=True, present=got == version, path=str(cli) if cli.exists() else None,
        version=got, source=src.get("source"), detail=src.get("detail"),
        how=None if got == version else (f"{cli} reports {got}, not v{version}; " if cli.exists() else "") + how_cli,
    ))
    dyn = bin_dir / DYNAMIC_LAUNCHER
    prov.tools.append(ToolStatus(
        name=DYNAMIC_LAUNCHER, required=True, present=dyn.is_file() and os.access(dyn, os.X_OK),
        path=str(dyn), source="launcher", detail="runs $PULUMI_PYTHON_CMD -m pulumi.dynamic",
        how=None if dyn.is_file() else "run `dn setup`",
    ))
    lp = bin_dir / "pulumi-language-python"
    lp_info = manifest.get("language_python", {})
    prov.tools.append(ToolStatus(
        name="pulumi-language-python", required=False, present=lp.exists(),
        path=str(lp) if lp.exists() else None, version=binary_version(lp) if lp.exists() else None,
        source=lp_info.get("source"),
        detail=lp_info.get("detail") or lp_info.get("error"),
        how=None if lp.exists() else (
            "only needed to run a policy pack given as a directory; dn runs its packs through "
            "dn.tooling.policy_pack_launcher() instead. To have it anyway, put pulumi-language-python "
            f"v{version} into {bin_dir}"),
    ))
    docker = None
    candidates = [bin_dir / "pulumi-resource-docker"]
    if pulumi_home is not None:
        candidates.append(plugin_dir(pulumi_home, "resource", "docker", DOCKER_PLUGIN_VERSION) / "pulumi-resource-docker")
    path_hit = shutil.which("pulumi-resource-docker", path=env.get("PATH"))
    if path_hit:
        candidates.append(Path(path_hit))
    docker = next((c for c in candidates if c.exists()), None)
    prov.tools.append(ToolStatus(
        name="pulumi-resource-docker", required=False, present=docker is not None,
        path=str(docker) if docker else None, version=DOCKER_PLUGIN_VERSION if docker else None,
        detail="provider plugin of pulumi-docker (tenant containers)",
        how=None if docker else (
            f"needed by tenant stacks' docker resources. Not obtainable offline: the Go module proxy "
            f"serves no github.com/pulumi/pulumi-docker/provider module. On a machine with internet: "
            f"`pulumi plugin install resource docker {DOCKER_PLUGIN_VERSION}`, or copy the binary and run "
            f"`pulumi plugin install resource docker {DOCKER_PLUGIN_VERSION} --file <binary>` with dn's PULUMI_HOME"),
    ))


def ensure(
    version: str = PULUMI_VERSION,
    *,
    environ: Mapping[str, str] | None = None,
    sources: Sequence[tuple[str, Source]] = DEFAULT_SOURCES,
    log: Log = _quiet,
    rebuild: bool = False,
    pulumi_home: Path | None = None,
) -> Provisioning:
    """Provide the pinned CLI and launchers (once per machine); return what is there and from where.

    Never raises for a missing tool: the result names what is missing and how to provide it.
    """
    env = dict(os.environ if environ is None else environ)
    root = install_root(version, env)
    prov = Provisioning(version=version, root=root)
    if rebuild or binary_version(root / "bin" / "pulumi") != version:
        root.parent.mkdir(parents=True, exist_ok=True)
        with _locked(root.parent / f".{version}.lock"):
            # another process may have finished while we waited for the lock
            if rebuild or binary_version(root / "bin" / "pulumi") != version:
                _install(version, root, sources, env, log, prov)
    if (root / "bin").is_dir() and not (root / "bin" / DYNAMIC_LAUNCHER).exists():
        with _locked(root.parent / f".{version}.lock"):
            write_dynamic_launcher(root / "bin")
    _describe(prov, env, pulumi_home)
    return prov


# ---------------------------------------------------------------------------------------------
# the engine's environment


def pulumi_home(data_dir: Path) -> Path:
    """dn's PULUMI_HOME: plugins, workspace files and engine logs, kept inside the data dir."""
    return Path(data_dir) / "pulumi-home"


def passphrase_env(settings: "Settings", environ: Mapping[str, str]) -> dict[str, str]:
    """PULUMI_CONFIG_PASSPHRASE_FILE (preferred) or PULUMI_CONFIG_PASSPHRASE, from settings.secrets."""
    sec = settings.secrets
    if sec.passphrase_file is not None:
        p = Path(sec.passphrase_file)
        if not p.is_file():
            raise ConfigError(f"secrets.passphrase_file: {p} does not exist",
                              hint="create it (mode 0600) or set secrets.passphrase_env")
        if p.stat().st_mode & 0o077:
            raise ConfigError(f"secrets.passphrase_file: {p} is readable by group or others",
                              hint=f"chmod 600 {p}")
        return {"PULUMI_CONFIG_PASSPHRASE_FILE": str(p)}
    value = environ.get(sec.passphrase_env)
    if not value:
        raise ConfigError(f"secrets.passphrase_env: ${sec.passphrase_env} is not set and secrets.passphrase_file is not configured",
                          hint="set one of them: the state passphrase encrypts Pulumi secrets")
    return {"PULUMI_CONFIG_PASSPHRASE": value}


def engine_env(settings: "Settings", environ: Mapping[str, str] | None = None,
               version: str = PULUMI_VERSION) -> dict[str, str]:
    """The environment the Automation API runs the CLI with. Holds the passphrase when it comes from
    an environment variable: never print or log the values of this mapping."""
    env = os.environ if environ is None else environ
    root = install_root(version, env)
    data = Path(settings.data_dir)
    out = {
        "PATH": os.pathsep.join([str(root / "bin"), env.get("PATH", os.defpath)]),
        "PULUMI_HOME": str(pulumi_home(data)),
        "PULUMI_PYTHON_CMD": sys.executable,
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        # no plugin downloads: they would hang on a machine without internet and would fetch code
        # dn did not pin; a missing plugin fails at once with its name
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_BACKEND_URL": settings.backend_url,
        # plain JSON checkpoints: readable by dn verify and auditors; secrets in them are encrypted
        "PULUMI_DIY_BACKEND_GZIP": "false",
    }
    out.update(passphrase_env(settings, env))
    return out


SECRET_ENV_KEYS = frozenset({"PULUMI_CONFIG_PASSPHRASE"})


def describe_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with secret values replaced, for display."""
    return {k: ("<set, not shown>" if k in SECRET_ENV_KEYS else v) for k, v in env.items()}
