"""The dependency lock (requirements.txt) against what dn declares, and pip-audit of the locked set.

The lock is `uv pip compile` output (README "Dependencies" says how to regenerate it): every package
scripts/setup installs, at an exact version with its hashes. The offline checks here fail when
pyproject.toml (or requirements-build.in) and the lock disagree, when an installed package is not the
locked one, and when an advisory ignore is malformed or expired. The audit asks PyPI's advisory
service about every locked pin; when the service cannot answer, the test fails (closed): a set that
was not audited is never reported as clean.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.txt"
BUILD_IN = ROOT / "requirements-build.in"
IGNORES = ROOT / "requirements-audit-ignore.toml"
MAX_IGNORE_DAYS = 90
VIA_PYPROJECT = "dn (pyproject.toml)"
VIA_BUILD = "-r requirements-build.in"


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: int
    via: tuple[str, ...]


def parse_lock(text: str) -> dict[str, Pin]:
    """The pins of a `uv pip compile --generate-hashes` file, by canonical name."""
    pins: dict[str, Pin] = {}
    current: dict | None = None

    def close() -> None:
        if current is not None:
            pins[current["name"]] = Pin(current["name"], current["version"], current["hashes"], tuple(current["via"]))

    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line:
            continue
        if not raw[0].isspace() and not line.startswith("#"):
            close()
            m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            if not m:
                raise ValueError(f"requirements.txt: not an exact pin: {line[:80]!r}")
            current = {
                "name": canonicalize_name(m.group(1)),
                "version": m.group(2),
                "hashes": len(re.findall(r"--hash=sha256:[0-9a-f]{64}", line)),
                "via": [],
            }
        elif current is not None and line.startswith("#"):
            via = re.sub(r"^#\s*(via)?\s*", "", line).strip()
            if via:
                current["via"].append(via)
    close()
    return pins


def declared(pyproject: Mapping, build_in: str) -> dict[str, list[Requirement]]:
    """What dn declares, by where: pyproject.toml (runtime and every extra) and requirements-build.in."""
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    build = [ln.split("#", 1)[0].strip() for ln in build_in.splitlines()]
    return {VIA_PYPROJECT: [Requirement(r) for r in reqs], VIA_BUILD: [Requirement(r) for r in build if r]}


def lock_problems(
    pyproject: Mapping, build_in: str, pins: Mapping[str, Pin], requires_of: Callable[[str], Iterable[str]]
) -> list[str]:
    """Every way the lock disagrees with the declarations; empty when it follows from them.

    ``requires_of(name)`` gives a locked package's Requires-Dist lines (to resolve extras such as
    ``psycopg[binary]``)."""
    problems: list[str] = []
    sources = declared(pyproject, build_in)
    build_system = [Requirement(r) for r in pyproject.get("build-system", {}).get("requires", [])]
    for req in build_system:
        if canonicalize_name(req.name) not in {canonicalize_name(r.name) for r in sources[VIA_BUILD]}:
            problems.append(
                f"{req.name}: pyproject.toml's [build-system] requires it, requirements-build.in does not list it"
            )
    for source, reqs in sources.items():
        names = set()
        for req in [*reqs, *(build_system if source == VIA_BUILD else [])]:
            name = canonicalize_name(req.name)
            names.add(name)
            pin = pins.get(name)
            if pin is None:
                problems.append(f"{req}: declared ({source}) but not in requirements.txt")
                continue
            if not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{req}: declared ({source}) but requirements.txt pins {pin.name}=={pin.version}")
            if source not in pin.via:
                problems.append(
                    f"{pin.name}: declared ({source}) but requirements.txt does not say it is via {source!r}"
                )
            for extra in sorted(req.extras):
                for line in requires_of(name):
                    dep = Requirement(line)
                    if (
                        dep.marker is not None
                        and dep.marker.evaluate({"extra": extra})
                        and not dep.marker.evaluate({"extra": ""})
                        and canonicalize_name(dep.name) not in pins
                    ):
                        problems.append(f"{req}: its extra {extra!r} needs {dep.name}, not in requirements.txt")
        for pin in pins.values():
            if source in pin.via and pin.name not in names:
                problems.append(f"{pin.name}=={pin.version}: locked via {source!r}, which no longer declares it")
    problems += [f"{p.name}=={p.version}: no --hash in requirements.txt" for p in pins.values() if p.hashes == 0]
    return problems


def regenerate_hint() -> str:
    header = LOCK.read_text().splitlines()[1].lstrip("# ").strip() if LOCK.is_file() else ""
    return f"regenerate the lock (README, Dependencies): {header or 'uv pip compile … -o requirements.txt'}"


def _requires_installed(name: str) -> list[str]:
    try:
        return md.distribution(name).requires or []
    except md.PackageNotFoundError:
        return [f"{name}-is-not-installed; extra == 'any'"]


def _lock() -> dict[str, Pin]:
    assert LOCK.is_file(), f"{LOCK} is missing: {regenerate_hint()}"
    return parse_lock(LOCK.read_text())


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --------------------------------------------------------------------------- the lock


def test_lock_follows_from_pyproject():
    problems = lock_problems(PYPROJECT, BUILD_IN.read_text(), _lock(), _requires_installed)
    assert not problems, "\n".join([*problems, regenerate_hint()])


def test_installed_packages_are_the_locked_ones():
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
    wrong = [
        f"{n}: installed {installed.get(n, 'nothing')}, locked {p.version}"
        for n, p in sorted(pins.items())
        if installed.get(n) != p.version
    ]
    unlocked = [
        f"{n}=={v}: installed but not in requirements.txt"
        for n, v in sorted(installed.items())
        if n not in pins and n != "dn"
    ]
    assert not wrong + unlocked, "\n".join(
        [*wrong, *unlocked, "install from the lock: scripts/setup (pip install --require-hashes -r requirements.txt)"]
    )


LOCK_SAMPLE = """\
# This file was autogenerated by uv via the following command:
#    uv pip compile pyproject.toml requirements-build.in --all-extras --generate-hashes -o requirements.txt
psycopg==3.3.9 \\
    --hash=sha256:{h}
    # via dn (pyproject.toml)
psycopg-binary==3.3.9 \\
    --hash=sha256:{h}
    # via psycopg
pytest==9.2.0 \\
    --hash=sha256:{h} \\
    --hash=sha256:{h}
    # via dn (pyproject.toml)
setuptools==84.2.1 \\
    --hash=sha256:{h}
    # via
    #   -r requirements-build.in
    #   pulumi-policy
""".replace("{h}", "0" * 64)

PSYCOPG_REQUIRES = [
    "typing-extensions>=4.6",
    'psycopg-binary==3.3.9; implementation_name != "pypy" and extra == "binary"',
]


def _project(deps, test=(), build=("setuptools>=68",)):
    return {
        "build-system": {"requires": list(build)},
        "project": {"dependencies": list(deps), "optional-dependencies": {"test": list(test)}},
    }


def test_lock_checker_accepts_a_lock_that_follows():
    pins = parse_lock(LOCK_SAMPLE)
    assert pins["pytest"].hashes == 2 and pins["setuptools"].via == ("-r requirements-build.in", "pulumi-policy")
    assert (
        lock_problems(
            _project(["psycopg[binary]>=3.1"], ["pytest>=8"]), "setuptools>=68\n", pins, lambda n: PSYCOPG_REQUIRES
        )
        == []
    )


@pytest.mark.parametrize(
    "project, build_in, requires, expected",
    [
        # A dependency added to pyproject.toml without regenerating the lock.
        (
            _project(["psycopg[binary]>=3.1", "rich>=13"], ["pytest>=8"]),
            "setuptools>=68",
            PSYCOPG_REQUIRES,
            "rich>=13: declared (dn (pyproject.toml)) but not in requirements.txt",
        ),
        # A dependency removed from pyproject.toml: the lock still carries it as dn's.
        (
            _project(["psycopg[binary]>=3.1"]),
            "setuptools>=68",
            PSYCOPG_REQUIRES,
            "pytest==9.2.0: locked via 'dn (pyproject.toml)', which no longer declares it",
        ),
        # A specifier the locked version does not satisfy (a pin moved in pyproject.toml only).
        (
            _project(["psycopg[binary]>=3.4"], ["pytest>=8"]),
            "setuptools>=68",
            PSYCOPG_REQUIRES,
            "psycopg[binary]>=3.4: declared (dn (pyproject.toml)) but requirements.txt pins psycopg==3.3.9",
        ),
        # An extra whose packages are not locked.
        (
            _project(["psycopg[binary,pool]>=3.1"], ["pytest>=8"]),
            "setuptools>=68",
            [*PSYCOPG_REQUIRES, 'psycopg-pool; extra == "pool"'],
            "psycopg[binary,pool]>=3.1: its extra 'pool' needs psycopg-pool, not in requirements.txt",
        ),
        # The build backend changed in [build-system] but not in requirements-build.in.
        (
            _project(["psycopg[binary]>=3.1"], ["pytest>=8"], build=("flit-core>=3",)),
            "setuptools>=68",
            PSYCOPG_REQUIRES,
            "flit-core: pyproject.toml's [build-system] requires it, requirements-build.in does not list it",
        ),
    ],
)
def test_lock_checker_names_each_disagreement(project, build_in, requires, expected):
    assert expected in lock_problems(project, build_in, parse_lock(LOCK_SAMPLE), lambda n: requires)


def test_lock_checker_refuses_a_pin_without_a_hash():
    pins = parse_lock(LOCK_SAMPLE.replace("psycopg==3.3.9 \\\n    --hash=sha256:" + "0" * 64, "psycopg==3.3.9"))
    assert "psycopg==3.3.9: no --hash in requirements.txt" in lock_problems(
        _project(["psycopg[binary]>=3.1"], ["pytest>=8"]), "setuptools>=68", pins, lambda n: PSYCOPG_REQUIRES
    )


def test_lock_parser_refuses_a_range():
    with pytest.raises(ValueError, match="not an exact pin"):
        parse_lock("rich>=13\n")


# --------------------------------------------------------------------------- advisories


def ignore_problems(doc: Mapping, today: dt.date) -> list[str]:
    """What is wrong with requirements-audit-ignore.toml: missing fields, a duplicate id, an expiry
    further than MAX_IGNORE_DAYS ahead, or one reached."""
    problems: list[str] = []
    seen: set[str] = set()
    entries = doc.get("ignore")
    if not isinstance(entries, list):
        return ["requirements-audit-ignore.toml: `ignore` must be a list of [[ignore]] tables"]
    for i, e in enumerate(entries):
        where = f"ignore[{i}] ({e.get('id', 'no id') if isinstance(e, dict) else e!r})"
        if not isinstance(e, dict):
            problems.append(f"{where}: not a table")
            continue
        for key in ("id", "package", "reason"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                problems.append(f"{where}: `{key}` is required (a non-empty string)")
        expires = e.get("expires")
        if not isinstance(expires, dt.date) or isinstance(expires, dt.datetime):
            problems.append(f"{where}: `expires` is required (a TOML date, e.g. 2027-01-31)")
        elif expires <= today:
            problems.append(f"{where}: expired on {expires}: fix the dependency or decide again with a new date")
        elif (expires - today).days > MAX_IGNORE_DAYS:
            problems.append(f"{where}: `expires` {expires} is more than {MAX_IGNORE_DAYS} days away")
        if isinstance(e.get("id"), str):
            if e["id"] in seen:
                problems.append(f"{where}: listed twice")
            seen.add(e["id"])
        unknown = set(e) - {"id", "package", "reason", "expires"}
        if unknown:
            problems.append(f"{where}: unknown field(s) {sorted(unknown)}")
    return problems


def _ignores() -> dict:
    return tomllib.loads(IGNORES.read_text())


def test_audit_ignores_are_complete_and_current():
    problems = ignore_problems(_ignores(), dt.date.today())
    assert not problems, "\n".join(problems)


TODAY = dt.date(2026, 12, 2)
GOOD = {
    "id": "GHSA-aaaa-bbbb-cccc",
    "package": "jinja2",
    "reason": "dn renders no untrusted template",
    "expires": TODAY + dt.timedelta(days=30),
}


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({**GOOD, "expires": TODAY}, "expired on 2026-12-02"),
        ({**GOOD, "expires": TODAY - dt.timedelta(days=1)}, "expired on 2026-12-01"),
        ({**GOOD, "expires": TODAY + dt.timedelta(days=91)}, "more than 90 days away"),
        ({**GOOD, "expires": "2027-01-01"}, "`expires` is required (a TOML date"),
        ({k: v for k, v in GOOD.items() if k != "reason"}, "`reason` is required"),
        ({**GOOD, "reason": "  "}, "`reason` is required"),
        ({k: v for k, v in GOOD.items() if k != "id"}, "`id` is required"),
        ({**GOOD, "until": "forever"}, "unknown field(s) ['until']"),
    ],
)
def test_an_ignore_that_is_not_a_dated_decision_fails(entry, expected):
    problems = ignore_problems({"ignore": [entry]}, TODAY)
    assert any(expected in p for p in problems), problems


def test_a_current_ignore_passes_and_a_duplicate_fails():
    assert ignore_problems({"ignore": [GOOD]}, TODAY) == []
    assert any("listed twice" in p for p in ignore_problems({"ignore": [GOOD, GOOD]}, TODAY))
    assert ignore_problems({"ignore": []}, TODAY) == []


def audit_findings(report: Mapping, pins: Mapping[str, Pin]) -> list[str]:
    """What a pip-audit JSON report says is wrong: a known advisory, or a locked pin it did not audit."""
    findings: list[str] = []
    audited = {}
    for dep in report.get("dependencies", []):
        name = canonicalize_name(dep["name"])
        audited[name] = dep
        if dep.get("skip_reason"):
            findings.append(f"{name}: not audited: {dep['skip_reason']}")
        for v in dep.get("vulns", []):
            fix = ", ".join(v.get("fix_versions") or []) or "no fixed release"
            findings.append(f"{name}=={dep.get('version')}: {v['id']} (fixed in: {fix})")
    for name, pin in pins.items():
        if name not in audited:
            findings.append(f"{name}=={pin.version}: locked but absent from pip-audit's report")
    return findings


def test_audit_findings_name_advisories_and_unaudited_pins():
    pins = parse_lock(LOCK_SAMPLE)
    report = {
        "dependencies": [
            {"name": "psycopg", "version": "3.3.9", "vulns": []},
            {"name": "psycopg-binary", "version": "3.3.9", "vulns": []},
            {"name": "pytest", "version": "9.2.0", "vulns": [{"id": "PYSEC-1", "fix_versions": ["9.2.1"]}]},
            {"name": "setuptools", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        ]
    }
    assert audit_findings(report, pins) == [
        "pytest==9.2.0: PYSEC-1 (fixed in: 9.2.1)",
        "setuptools: not audited: Dependency not found on PyPI and could not be audited",
    ]
    assert audit_findings({"dependencies": []}, {"rich": Pin("rich", "15.0.0", 1, ())}) == [
        "rich==15.0.0: locked but absent from pip-audit's report"
    ]


@pytest.mark.audit
def test_locked_set_has_no_known_advisory():
    """pip-audit over requirements.txt (PyPI's advisory service, per locked version).

    Fails closed: when the service cannot be reached, or a pin is not found there, the set was not
    audited and the test says so. An advisory dn is not exposed to goes into
    requirements-audit-ignore.toml with a reason and an expiry (README, Dependencies)."""
    exe = Path(sys.executable).parent / "pip-audit"
    if not exe.is_file():
        pytest.fail(f"pip-audit is not installed ({exe}): run scripts/setup (it installs requirements.txt)")
    ignores = _ignores()
    assert not ignore_problems(ignores, dt.date.today()), "fix requirements-audit-ignore.toml first"
    skip = [a for e in ignores["ignore"] for a in ("--ignore-vuln", e["id"])]
    r = subprocess.run(
        [
            str(exe),
            "-r",
            str(LOCK),
            "--require-hashes",
            "--disable-pip",
            "--strict",
            "--format",
            "json",
            "--progress-spinner",
            "off",
            "--timeout",
            "30",
            *skip,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        report = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            "pip-audit could not audit the locked set (the advisory service did not answer for "
            f"every pin; nothing is reported clean that was not audited), exit {r.returncode}. It asks "
            "https://pypi.org/pypi/NAME/VERSION/json per pin: 'not found on PyPI' for a locked pin means "
            "that endpoint did not answer from here.\n" + r.stderr[-3000:]
        )
    findings = audit_findings(report, _lock())
    assert r.returncode == 0 and not findings, "\n".join(
        [*findings, r.stderr[-2000:], "update the pin (README, Dependencies) or add a dated ignore"]
    )
