"""The CI workflows (.github/workflows/) keep pull-request code away from every credential.

Two kinds of check: zizmor and actionlint over the workflows (a finding fails; a missing tool
fails too: scripts/ci-tools installs both, scripts/setup runs it), and dn's own rules on the
parsed YAML (docs/ci-security.md says why each holds):

- every action is pinned by a full commit SHA; every checkout keeps no token on disk;
- the workflow grants nothing by default (``permissions: {}``), each job its own;
- a secret is only ever in the ``env`` of the one step that uses it (never workflow- or job-wide);
- in a workflow a pull request triggers, a job that runs its code (checks it out) either holds no
  secret and only read permissions, or waits for an approval environment, runs on an ephemeral
  runner, is skipped for forks, and still has only read permissions; a job with a write token
  checks nothing out; ``pull_request_target`` never checks out anything;
- the persistent runners (``dn-ops``, ``dn-dr``) run only workflows that no pull request or push
  triggers, from main only, with the ``production`` environment's secrets.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])

PR_EVENTS = {"pull_request", "pull_request_target", "pull_request_review", "pull_request_review_comment",
             "issue_comment", "workflow_run"}
TRUSTED_EVENTS = {"schedule", "workflow_dispatch"}
PERSISTENT_LABELS = {"dn-ops", "dn-dr"}   # self-hosted runners that keep their disk between jobs
EPHEMERAL_LABELS = {"dn-preview"}         # just-in-time runners: one job, then the VM is destroyed
GITHUB_HOSTED = re.compile(r"^(ubuntu|windows|macos)-[\w.-]+$")
APPROVAL_ENVIRONMENTS = {"preview"}       # required reviewers (docs/ci-security.md)
PRODUCTION_ENVIRONMENT = "production"     # deployment branches: main only
SAME_REPO_ONLY = "github.event.pull_request.head.repo.full_name == github.repository"
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
SECRET_REF = re.compile(r"\$\{\{[^}]*\bsecrets\.")
WRITE_TOKEN_REF = re.compile(r"\$\{\{[^}]*\b(github\.token|secrets\.GITHUB_TOKEN)\b")


# --------------------------------------------------------------------------- the rules


def _on(wf: dict) -> dict[str, Any]:
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {e: None for e in on}
    return dict(on or {})


def _labels(job: dict) -> set[str]:
    runs_on = job.get("runs-on")
    if isinstance(runs_on, str):
        return {runs_on}
    if isinstance(runs_on, dict):
        return set(runs_on.get("labels") or []) | ({runs_on["group"]} if runs_on.get("group") else set())
    return set(runs_on or [])


def _env_name(job: dict) -> str | None:
    env = job.get("environment")
    return env.get("name") if isinstance(env, dict) else env


def _has_secret(value: Any) -> bool:
    return bool(SECRET_REF.search(json.dumps(value)))


def _checkouts(job: dict) -> list[dict]:
    return [s for s in job.get("steps") or [] if str(s.get("uses", "")).startswith("actions/checkout@")]


def _writes(perms: Any) -> list[str]:
    if perms in ("write-all",):
        return ["write-all"]
    if isinstance(perms, dict):
        return sorted(k for k, v in perms.items() if v == "write")
    return []


def problems(name: str, wf: dict) -> list[str]:
    """Every rule of this module that the workflow ``wf`` (parsed YAML, file ``name``) breaks."""
    out: list[str] = []
    events = set(_on(wf))
    pr = events & PR_EVENTS
    if wf.get("permissions") != {}:
        out.append(f"{name}: the workflow must grant nothing by default (permissions: {{}})")
    if _has_secret(wf.get("env")):
        out.append(f"{name}: a secret in the workflow's env reaches every step")
    for jid, job in (wf.get("jobs") or {}).items():
        where = f"{name}: job {jid}"
        labels, env_name, perms = _labels(job), _env_name(job), job.get("permissions")
        if perms is None:
            out.append(f"{where}: declares no permissions of its own")
            perms = wf.get("permissions")  # what the job then gets
        if _has_secret(job.get("env")):
            out.append(f"{where}: a secret in the job's env reaches every step (give it to the step that uses it)")
        for i, step in enumerate(job.get("steps") or []):
            uses = step.get("uses")
            if uses and not uses.startswith(("./", "docker://")) and not PINNED.match(uses):
                out.append(f"{where}: step {i} uses {uses!r}, not pinned by a full commit SHA")
            if _has_secret({k: v for k, v in step.items() if k != "env"}):
                out.append(f"{where}: step {i} has a secret outside its env (in its script or inputs)")
        for step in _checkouts(job):
            if (step.get("with") or {}).get("persist-credentials") is not False:
                out.append(f"{where}: checkout without persist-credentials: false leaves a token on disk")
        runs_pr_code = bool(pr) and bool(_checkouts(job))
        if "pull_request_target" in events and _checkouts(job):
            out.append(f"{where}: pull_request_target runs with the base's secrets: it must never check out code")
        if runs_pr_code:
            if _writes(perms):
                out.append(f"{where}: runs pull-request code with write permissions {_writes(perms)}")
            if WRITE_TOKEN_REF.search(json.dumps(job)):
                out.append(f"{where}: runs pull-request code and hands it the GITHUB_TOKEN")
            if labels & PERSISTENT_LABELS:
                out.append(f"{where}: runs pull-request code on a persistent runner {sorted(labels & PERSISTENT_LABELS)}")
            self_hosted = "self-hosted" in labels
            if self_hosted and not labels & EPHEMERAL_LABELS:
                out.append(f"{where}: runs pull-request code on a self-hosted runner that is not ephemeral")
            if not self_hosted and not all(GITHUB_HOSTED.match(lb) for lb in labels):
                out.append(f"{where}: runs pull-request code on an unknown runner {sorted(labels)}")
            if _has_secret(job) or self_hosted or env_name:
                if env_name not in APPROVAL_ENVIRONMENTS:
                    out.append(f"{where}: runs pull-request code with secrets or on our runners without "
                               f"waiting for an approval environment ({sorted(APPROVAL_ENVIRONMENTS)})")
                if SAME_REPO_ONLY not in str(job.get("if", "")):
                    out.append(f"{where}: a fork's pull request must never reach it (if: {SAME_REPO_ONLY})")
        elif pr and _writes(perms) and any(not str(s.get("uses", "")).startswith("actions/download-artifact@")
                                           and "uses" in s for s in job.get("steps") or []):
            out.append(f"{where}: holds a write token and runs an action other than download-artifact")
        if pr and _has_secret(job) and env_name not in APPROVAL_ENVIRONMENTS:
            out.append(f"{where}: a workflow a pull request triggers (its own file, then) uses secrets only behind "
                       f"an approval environment ({sorted(APPROVAL_ENVIRONMENTS)}), never {env_name!r}")
        if labels & PERSISTENT_LABELS:
            if events - TRUSTED_EVENTS:
                out.append(f"{where}: a persistent runner runs only scheduled or manual workflows, "
                           f"not {sorted(events - TRUSTED_EVENTS)}")
            if str(job.get("if", "")).strip() != "github.ref == 'refs/heads/main'":
                out.append(f"{where}: a persistent runner runs main's code only (if: github.ref == 'refs/heads/main')")
            if env_name != PRODUCTION_ENVIRONMENT:
                out.append(f"{where}: its secrets must come from the {PRODUCTION_ENVIRONMENT!r} environment")
        elif _has_secret(job) and env_name not in APPROVAL_ENVIRONMENTS | {PRODUCTION_ENVIRONMENT}:
            out.append(f"{where}: uses secrets outside an environment (repository secrets reach every branch)")
    return out


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- dn's workflows


def test_there_are_workflows():
    assert {p.name for p in WORKFLOW_FILES} >= {"preview.yml", "verify.yml", "dr-drill.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_keeps_pull_request_code_from_credentials(path):
    assert problems(path.name, load(path)) == []


def test_preview_waits_for_approval_and_runs_on_an_ephemeral_runner():
    wf = load(WORKFLOWS / "preview.yml")
    jobs = wf["jobs"]
    assert set(_on(wf)) == {"pull_request"}
    assert _has_secret(jobs["preview"]) and _env_name(jobs["preview"]) == "preview"
    assert _labels(jobs["preview"]) == {"self-hosted", "dn-preview"}
    assert jobs["preview"]["needs"] == "checks"
    # the secret-free checks run on a GitHub-hosted VM; the comment job checks nothing out
    assert not _has_secret(jobs["checks"]) and GITHUB_HOSTED.match(jobs["checks"]["runs-on"])
    assert _checkouts(jobs["comment"]) == [] and not _has_secret(jobs["comment"])
    # no job of the preview gets an SSH key or the day-to-day database role's passfile
    text = json.dumps(wf)
    assert "DN_SSH_KEY" not in text and "secrets.DN_PGPASS" not in text
    # the top of the file says what a malicious pull request can and cannot reach, in order
    head = (WORKFLOWS / "preview.yml").read_text().split("\nname:")[0]
    for words in ("UNTRUSTED", "In order:", "can decrypt every", "It cannot reach", "ephemeral"):
        assert words in head


# --------------------------------------------------------------------------- the rules catch the old design

# The preview as it was: pull_request on the persistent runner, the passphrase job-wide, the PR's
# `pip install -e .` and `dn`, the operator's SSH key on disk, a commenting token beside PR code.
OLD_PREVIEW = """
name: preview
on:
  pull_request:
permissions:
  contents: read
  pull-requests: write
jobs:
  preview:
    runs-on: [self-hosted, dn-ops]
    env:
      DN_PASSPHRASE: ${{ secrets.DN_PASSPHRASE }}
    steps:
      - uses: actions/checkout@v4
      - run: .venv/bin/pip install -e . && .venv/bin/dn setup
      - env:
          DN_SSH_KEY: ${{ secrets.DN_SSH_KEY }}
        run: printf '%s\\n' "$DN_SSH_KEY" > "$DN_HOME/id_ed25519"
      - run: .venv/bin/dn preview --all --format markdown > preview.md
      - env:
          GH_TOKEN: ${{ github.token }}
        run: gh api -X POST "repos/$REPO/issues/$PR/comments" --input comment.json
"""


def test_the_rules_refuse_the_old_preview():
    found = "\n".join(problems("old-preview.yml", yaml.safe_load(OLD_PREVIEW)))
    for expected in ("grant nothing by default", "declares no permissions", "secret in the job's env",
                     "with write permissions ['pull-requests']",
                     "not pinned by a full commit SHA", "persist-credentials", "hands it the GITHUB_TOKEN",
                     "persistent runner ['dn-ops']", "approval environment", "a fork's pull request",
                     "runs only scheduled or manual", "main's code only"):
        assert expected in found, expected


def test_the_rules_refuse_pull_request_target_checkouts_and_secrets_outside_environments():
    wf = yaml.safe_load("""
on: [pull_request_target, push]
permissions: {}
jobs:
  build:
    runs-on: ubuntu-24.04
    permissions: {contents: read}
    steps:
      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1
        with: {ref: "${{ github.event.pull_request.head.sha }}", persist-credentials: false}
      - run: make
  deploy:
    runs-on: [self-hosted, dn-preview]
    permissions: {contents: read}
    steps:
      - run: echo "${{ secrets.DN_PASSPHRASE }}" > p
""")
    found = "\n".join(problems("prt.yml", wf))
    assert "pull_request_target runs with the base's secrets" in found
    assert "step 0 has a secret outside its env" in found
    assert "uses secrets outside an environment" in found


def test_the_rules_refuse_production_secrets_in_a_pull_request_workflow():
    wf = yaml.safe_load("""
on: pull_request
permissions: {}
jobs:
  deploy:
    environment: production
    runs-on: ubuntu-24.04
    permissions: {}
    steps:
      - env: {KEY: "${{ secrets.DN_SSH_KEY }}"}
        run: echo "$KEY" | wc -c
""")
    found = "\n".join(problems("pr-prod.yml", wf))
    assert "uses secrets only behind an approval environment (['preview']), never 'production'" in found


def test_the_rules_accept_a_secret_free_pull_request_check():
    wf = yaml.safe_load("""
on: pull_request
permissions: {}
jobs:
  test:
    runs-on: ubuntu-24.04
    permissions: {contents: read}
    steps:
      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1
        with: {persist-credentials: false}
      - run: make test
""")
    assert problems("ok.yml", wf) == []


# --------------------------------------------------------------------------- zizmor and actionlint


def _tool(path: Path, name: str) -> str:
    if not path.is_file():
        pytest.fail(f"{name} is not installed ({path} is missing): run scripts/ci-tools (scripts/setup does)")
    return str(path)


def test_zizmor_finds_nothing():
    exe = _tool(Path(sys.executable).parent / "zizmor", "zizmor")
    r = subprocess.run([exe, "--offline", "--persona", "pedantic", "--no-progress", "--color", "never",
                        "--format", "json", *map(str, WORKFLOW_FILES)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    findings = json.loads(r.stdout or "[]")
    assert r.returncode == 0 and findings == [], (r.stderr[-2000:], findings)


def test_actionlint_finds_nothing():
    where = subprocess.run([str(ROOT / "scripts" / "ci-tools"), "--print"], capture_output=True, text=True,
                           check=True).stdout.strip()
    exe = _tool(Path(where), "actionlint")
    r = subprocess.run([exe, "-no-color", "-config-file", str(ROOT / ".github" / "actionlint.yaml"),
                        *map(str, WORKFLOW_FILES)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
