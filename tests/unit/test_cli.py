"""The CLI's conventions: exit codes, one error handler, help without heavy imports, runbooks."""
import subprocess
import sys

import pytest

from cli.main import NOUNS, _report, app, run
from dn import errors, runbooks
from dn.errors import ExitCode


def invoke(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        run(argv)
    out, err = capsys.readouterr()
    return ei.value.code, out, err


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.OperationFailed("boom"), ExitCode.FAILED),
        (errors.InvalidInput("slug", "must match ^[a-z]"), ExitCode.INVALID),
        (errors.ConfigError("f: k: rule"), ExitCode.INVALID),
        (errors.Unreachable("host eu1 unreachable"), ExitCode.UNREACHABLE),
        (errors.HostKeyError("unknown host key"), ExitCode.UNREACHABLE),
        (errors.PolicyViolation("ports published"), ExitCode.POLICY),
        (errors.DriftFound("nginx drifted"), ExitCode.POLICY),
        (errors.Locked("tenant:acme held"), ExitCode.LOCKED),
        (RuntimeError("surprise"), ExitCode.FAILED),
    ],
)
def test_error_handler_maps_exit_codes(exc, code, capsys):
    assert _report(exc, traceback=False) == code
    err = capsys.readouterr().err
    if isinstance(exc, errors.DnError):
        assert str(exc) in err
    else:
        assert "rerun with --traceback" in err and "Traceback" not in err


def test_exit_code_values_are_documented():
    # README's table and these values must agree; the values are an interface for schedulers and CI.
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5]
    readme = (runbooks.RUNBOOK_DIR.parent / "README.md").read_text()
    for c in ExitCode:
        assert f"| {int(c)} |" in readme, f"exit code {int(c)} missing from README"


def test_usage_error_is_exit_2(capsys):
    code, _, err = invoke(["no-such-noun"], capsys)
    assert code == 2 and "No such command" in err


def test_domain_error_through_run(capsys):
    code, out, err = invoke(["runbook", "show", "nope"], capsys)
    assert code == ExitCode.INVALID
    assert out == "" and "runbook: no runbook named 'nope'" in err


def test_runbook_show_json(capsys):
    import json

    code, out, _ = invoke(["runbook", "show", "incident-response", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["name"] == "incident-response" and doc["section"] is None
    assert doc["text"] == runbooks.get("incident-response") and doc["sections"]
    anchor = doc["sections"][0]
    code, out, _ = invoke(["runbook", "show", f"incident-response#{anchor}", "--json"], capsys)
    one = json.loads(out)
    assert code == 0 and one["section"] == anchor and one["text"] == runbooks.get(f"incident-response#{anchor}")


@pytest.mark.parametrize("noun", [""] + [n for n, _, _ in NOUNS])
def test_help_does_not_import_heavy_modules(noun):
    code = (
        "import sys\n"
        "from cli.main import run\n"
        f"argv = {[noun, '--help'] if noun else ['--help']!r}\n"
        "try:\n    run(argv)\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('pulumi', 'pulumi_docker', 'paramiko', 'psycopg') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout[-500:]


def _command_paths():
    import typer
    from typer.core import TyperGroup

    root = typer.main.get_command(app)
    paths = set()

    def walk(cmd, prefix, ctx):
        paths.add(prefix)
        if isinstance(cmd, TyperGroup):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), prefix + (name,), ctx)

    with typer.Context(root) as ctx:
        walk(root, (), ctx)
    return paths


def test_every_command_a_runbook_names_exists():
    paths = _command_paths()
    books = runbooks.all_runbooks()
    assert books, "no runbooks found"
    for book in books:
        for words in runbooks.commands_named(book.text):
            # `dn audit show --since 7d` -> the longest prefix of words must be a command path
            known = [words[:i] for i in range(len(words), 0, -1) if words[:i] in paths]
            assert known and len(known[0]) >= min(2, len(words)), f"{book.name}: `dn {' '.join(words)}` is not a dn command"


def test_runbook_sections_resolve():
    text = runbooks.get("incident-response#notification-under-art-33-gdpr")
    assert "72 hours" in text and "48 hours" in text
