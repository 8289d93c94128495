"""dn.ssh: pure helpers (data-driven) and sessions against the sandbox's real sshd."""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import shlex
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from dn import ssh
from dn.errors import ConfigError, ExitCode, HostKeyError, InvalidInput, Unreachable

HOSTILE = [
    "plain",
    "with space",
    "  leading and trailing  ",
    "it's",
    'double "quotes"',
    "semi;colon",
    "$(touch /tmp/dn-pwned)",
    "`id`",
    "$HOME ${PATH}",
    "new\nline",
    "tab\there",
    "back\\slash",
    "glob * ? [a]",
    "&& || | > < 2>&1",
    "-n",
    "--",
    "",
    "#comment",
    "~root",
    "ünïcödé ✓",
    "'",
    "''\"\"",
    "!event",
    "\x1b[31mred",
]


def keygen(path: Path, passphrase: str = "") -> ssh.PublicKey:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "test", "-f", str(path)], check=True)
    return ssh.parse_public_key(path.with_name(path.name + ".pub").read_text())


def keygen_fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


# ------------------------------------------------------------------------------------------------
# pure helpers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg", HOSTILE)
def test_quote_argv_round_trips_through_a_real_shell(arg):
    argv = ["printf", "%s\\0", arg, "x"]
    line = ssh.quote_argv(argv)
    assert shlex.split(line) == argv
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
    assert out == (arg + "\0x\0").encode()
    assert not Path("/tmp/dn-pwned").exists()


@pytest.mark.parametrize("bad, rule", [
    ("ls -l", "non-empty list"),
    (b"ls", "non-empty list"),
    ([], "non-empty list"),
    (["ls", 3], "must be a string"),
    (["ls", None], "must be a string"),
    (["echo", "a\0b"], "NUL"),
])
def test_quote_argv_rejects_what_cannot_be_a_command(bad, rule):
    with pytest.raises(InvalidInput) as e:
        ssh.quote_argv(bad)
    assert e.value.field == "argv" and rule in e.value.rule
    assert e.value.exit_code == ExitCode.INVALID


def test_fingerprint_matches_ssh_keygen(tmp_path):
    key = keygen(tmp_path / "k")
    assert key.fingerprint == keygen_fingerprint(tmp_path / "k.pub")
    assert key.type == "ssh-ed25519"
    assert ssh.parse_public_key(key.openssh()) == key


@pytest.mark.parametrize("text, error", [
    ("ssh-ed25519", "expected"),
    ("ssh-ed25519 not*base64", "not valid base64"),
    ("ssh-ed25519 AAAA", "too short"),
    # an ed25519 blob claimed to be RSA
    ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAINW1joqfA6/3WnQs9CEFpgAOeJX295TAeqPYGKGgzws/", "not a ssh-rsa key"),
])
def test_parse_public_key_errors(text, error):
    with pytest.raises(ValueError, match=error):
        ssh.parse_public_key(text)


K1 = "AAAAC3NzaC1lZDI1NTE5AAAAINW1joqfA6/3WnQs9CEFpgAOeJX295TAeqPYGKGgzws/"
K2 = "AAAAC3NzaC1lZDI1NTE5AAAAINpIbnpgFGGxwlWq7aSsNZGdtZUo5QLuhprv71iGBRe0"


def hashed(name: str, salt: bytes = b"0123456789abcdefghij") -> str:
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


@pytest.mark.parametrize("field, host, port, expected", [
    ("10.0.0.1", "10.0.0.1", 22, True),
    ("10.0.0.1", "10.0.0.2", 22, False),
    ("10.0.0.1", "10.0.0.1", 2222, False),  # a bare name means port 22 only
    ("[10.0.0.1]:2222", "10.0.0.1", 2222, True),
    ("[10.0.0.1]:2222", "10.0.0.1", 22, False),
    ("[10.0.0.1]:2222", "10.0.0.1", 2223, False),
    ("a.example,10.0.0.1", "10.0.0.1", 22, True),
    ("*.example", "eu1.example", 22, True),
    ("*.example", "example", 22, False),
    ("eu?.example", "eu1.example", 22, True),
    ("eu?.example", "eu12.example", 22, False),
    ("*.example,!bad.example", "bad.example", 22, False),
    ("!bad.example,*.example", "bad.example", 22, False),
    ("!bad.example", "good.example", 22, False),  # negation alone matches nothing
    ("EU1.Example", "eu1.example", 22, True),
    ("[10.0.0.1]:22", "10.0.0.1", 22, False),  # OpenSSH writes port 22 bare, and so looks it up
    ("1[0].0.0.1", "10.0.0.1", 22, False),  # '[' is literal, not a character class
    (hashed("10.0.0.1"), "10.0.0.1", 22, True),
    (hashed("10.0.0.1"), "10.0.0.2", 22, False),
    (hashed("[10.0.0.1]:2222"), "10.0.0.1", 2222, True),
    (hashed("[10.0.0.1]:2222"), "10.0.0.1", 22, False),
    ("|1|broken", "10.0.0.1", 22, False),
    ("|1|!!!|!!!", "10.0.0.1", 22, False),
])
def test_host_matches(field, host, port, expected):
    assert ssh.host_matches(field, host, port) is expected


def test_hashed_entries_written_by_ssh_keygen_match(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.9.8.7 ssh-ed25519 {K1}\n[10.9.8.7]:2200 ssh-ed25519 {K2}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    parsed = ssh.parse_known_hosts(kh.read_text())
    assert all(e.hosts.startswith("|1|") for e in parsed.entries)
    assert ssh.pinned_keys_for("10.9.8.7", 22, None, kh.read_text()).keys == (ssh.parse_public_key(f"ssh-ed25519 {K1}"),)
    assert ssh.pinned_keys_for("10.9.8.7", 2200, None, kh.read_text()).keys == (ssh.parse_public_key(f"ssh-ed25519 {K2}"),)


KNOWN_HOSTS_CASES = [
    # text, [(hosts, marker)], [skipped line numbers]
    (f"10.0.0.1 ssh-ed25519 {K1}\n", [("10.0.0.1", None)], []),
    (f"10.0.0.1 ssh-ed25519 {K1} a comment with spaces\n", [("10.0.0.1", None)], []),
    (f"# comment\n\n   \n10.0.0.1 ssh-ed25519 {K1}\n", [("10.0.0.1", None)], []),
    (f"@revoked 10.0.0.1 ssh-ed25519 {K1}\n", [("10.0.0.1", "@revoked")], []),
    (f"@cert-authority *.example ssh-ed25519 {K1}\n", [("*.example", "@cert-authority")], []),
    (f"@bogus 10.0.0.1 ssh-ed25519 {K1}\n", [], [1]),
    ("10.0.0.1 ssh-ed25519\n", [], [1]),
    (f"10.0.0.1 ssh-ed25519 {K1[:-4]}\n", [], [1]),
    (f"10.0.0.1 ssh-rsa {K1}\n", [], [1]),
    (f"[10.0.0.1]:2222,eu1.example ssh-ed25519 {K2}\n\tbad line\n", [("[10.0.0.1]:2222,eu1.example", None)], [2]),
]


@pytest.mark.parametrize("text, entries, skipped", KNOWN_HOSTS_CASES)
def test_parse_known_hosts(text, entries, skipped):
    parsed = ssh.parse_known_hosts(text)
    assert [(e.hosts, e.marker) for e in parsed.entries] == entries
    assert [n for n, _ in parsed.skipped] == skipped


def test_pins_from_host_key_and_known_hosts_and_revocation():
    text = f"10.0.0.1 ssh-ed25519 {K1}\n@revoked 10.0.0.1 ssh-ed25519 {K2}\n@cert-authority * ssh-ed25519 {K2}\n"
    pins = ssh.pinned_keys_for("10.0.0.1", 22, f"ssh-ed25519 {K1} pinned", text, "/x/known_hosts")
    k1, k2 = ssh.parse_public_key(f"ssh-ed25519 {K1}"), ssh.parse_public_key(f"ssh-ed25519 {K2}")
    assert pins.keys == (k1,) and pins.revoked == (k2,)
    assert pins.sources == ("host_key", "/x/known_hosts")
    ssh.check_host_key(k1, pins, "root@10.0.0.1")
    with pytest.raises(HostKeyError, match="REVOKED") as e:
        ssh.check_host_key(k2, pins, "root@10.0.0.1")
    assert k2.fingerprint in str(e.value)
    with pytest.raises(ConfigError, match="host_key"):
        ssh.pinned_keys_for("10.0.0.1", 22, "ssh-ed25519 AAAA", None)


def test_host_key_error_messages_name_host_fingerprints_and_fix():
    k1, k2 = ssh.parse_public_key(f"ssh-ed25519 {K1}"), ssh.parse_public_key(f"ssh-ed25519 {K2}")
    with pytest.raises(HostKeyError) as unknown:
        ssh.check_host_key(k1, ssh.PinnedKeys((), (), ("/kh",)), "root@10.0.0.1")
    msg = str(unknown.value)
    assert "root@10.0.0.1" in msg and "not pinned" in msg and k1.fingerprint in msg
    assert "out of band" in unknown.value.hint and "/kh" in unknown.value.hint
    assert unknown.value.exit_code == ExitCode.UNREACHABLE
    with pytest.raises(HostKeyError) as changed:
        ssh.check_host_key(k2, ssh.PinnedKeys((k1,), (), ("host_key",)), "root@10.0.0.1")
    msg = str(changed.value)
    assert "CHANGED" in msg and k2.fingerprint in msg and k1.fingerprint in msg
    assert "host_key" in changed.value.hint


@pytest.mark.parametrize("pinned, available, first", [
    (["ssh-ed25519"], ["ecdsa-sha2-nistp256", "rsa-sha2-512", "ssh-ed25519"], ["ssh-ed25519"]),
    (["ssh-rsa"], ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"], ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]),
    (["ecdsa-sha2-nistp256", "ssh-ed25519"], ["ssh-ed25519", "ecdsa-sha2-nistp256"], ["ecdsa-sha2-nistp256", "ssh-ed25519"]),
    ([], ["ssh-ed25519", "ssh-rsa"], ["ssh-ed25519", "ssh-rsa"]),
])
def test_host_key_algorithms_put_pinned_types_first(pinned, available, first):
    keys = [ssh.PublicKey(t, b"") for t in pinned]
    order = ssh.host_key_algorithms(keys, available)
    assert order[: len(first)] == first and sorted(order) == sorted(available)


@pytest.mark.parametrize("text, secret, expected", [
    ("error: hunter2-long", b"hunter2-long", "error: [redacted]"),
    ("line1 abc\nuser=ops pw=s3cr3t", b"ops\ns3cr3t\n", "line1 abc\nuser=ops pw=[redacted]"),
    ("nothing here", b"abcdef", "nothing here"),
    ("kept", None, "kept"),
])
def test_redact(text, secret, expected):
    assert ssh.redact(text, secret) == expected


# ------------------------------------------------------------------------------------------------
# against the sandbox's sshd
# ------------------------------------------------------------------------------------------------
def eu1_pub(sandbox) -> Path:
    return Path("/srv/dn-sandbox/eu1/etc/ssh/ssh_host_ed25519_key.pub")


@pytest.fixture
def workdir(sandbox):
    """A fresh directory on eu1 (under the host prefix), removed afterwards."""
    d = f"/srv/dn-sandbox/eu1/var/tmp/dn-test-{uuid.uuid4().hex[:10]}"
    sandbox.ns_exec(["mkdir", "-p", d])
    yield d
    sandbox.ns_exec(["rm", "-rf", d])


def host_stat(sandbox, path: str) -> tuple | None:
    r = sandbox.ns_exec(["stat", "-c", "%i %a %u %g %s", path], check=False)
    return tuple(r.stdout.decode().split()) if r.returncode == 0 else None


def host_read(sandbox, path: str) -> bytes:
    return sandbox.ns_exec(["cat", path]).stdout


def listing(sandbox, d: str) -> dict[str, tuple]:
    names = sandbox.ns_exec(["ls", "-A", d]).stdout.decode().split()
    return {n: (host_stat(sandbox, f"{d}/{n}"), host_read(sandbox, f"{d}/{n}")) for n in names}


@pytest.mark.sandbox
def test_pinned_key_from_known_hosts_is_accepted(sandbox):
    with ssh.connect(sandbox.host) as s:
        r = s.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        assert "10.231.1.2/24" in r.text  # really inside dn-eu1
        assert s.run(["id", "-un"]).text.strip() == "root"


@pytest.mark.sandbox
def test_pinned_key_from_host_key_value_is_accepted(sandbox):
    target = sandbox.host.model_copy(update={"known_hosts": None, "host_key": eu1_pub(sandbox).read_text().strip()})
    with ssh.connect(target) as s:
        assert s.run(["true"]).rc == 0


@pytest.mark.sandbox
def test_unknown_host_key_is_refused_with_its_fingerprint(sandbox, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.231.2.2 {Path('/srv/dn-sandbox/eu2/etc/ssh/ssh_host_ed25519_key.pub').read_text()}")
    target = sandbox.host.model_copy(update={"known_hosts": kh})
    with pytest.raises(HostKeyError) as e:
        ssh.connect(target)
    msg = str(e.value)
    assert "root@10.231.1.2" in msg and "not pinned" in msg
    assert keygen_fingerprint(eu1_pub(sandbox)) in msg
    assert str(kh) in e.value.hint


@pytest.mark.sandbox
def test_changed_host_key_is_refused_naming_both_fingerprints(sandbox, tmp_path):
    other = keygen(tmp_path / "impostor")
    target = sandbox.host.model_copy(update={"known_hosts": None, "host_key": other.openssh()})
    with pytest.raises(HostKeyError) as e:
        ssh.connect(target)
    msg = str(e.value)
    assert "CHANGED" in msg and keygen_fingerprint(eu1_pub(sandbox)) in msg and other.fingerprint in msg
    assert e.value.exit_code == ExitCode.UNREACHABLE


@pytest.mark.sandbox
def test_revoked_host_key_is_refused_even_if_also_pinned(sandbox, tmp_path):
    pub = eu1_pub(sandbox).read_text().strip()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.231.1.2 {pub}\n@revoked 10.231.1.2 {pub}\n")
    with pytest.raises(HostKeyError, match="REVOKED"):
        ssh.connect(sandbox.host.model_copy(update={"known_hosts": kh}))


@pytest.mark.sandbox
def test_wrong_client_key_is_refused(sandbox, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(ssh.AuthRefused) as e:
        ssh.connect(sandbox.host.model_copy(update={"key_path": tmp_path / "stranger"}))
    assert stranger.fingerprint in str(e.value) and "root@10.231.1.2" in str(e.value)
    assert e.value.exit_code == ExitCode.UNREACHABLE


@pytest.mark.sandbox
def test_encrypted_client_key_needs_its_passphrase(sandbox, tmp_path):
    keygen(tmp_path / "locked", passphrase="correct horse battery")
    target = sandbox.host.model_copy(update={"key_path": tmp_path / "locked"})
    with pytest.raises(ConfigError, match="encrypted"):
        ssh.connect(target)
    with pytest.raises(ConfigError, match="cannot load") as e:
        ssh.connect(target, passphrase="wrong")
    assert "wrong" not in str(e.value).replace("wrong passphrase", "")
    # with the right passphrase the key loads and is offered (and refused: it is not authorised)
    with pytest.raises(ssh.AuthRefused):
        ssh.connect(target, passphrase="correct horse battery")


@pytest.mark.sandbox
def test_missing_key_and_known_hosts_are_config_errors(sandbox, tmp_path):
    with pytest.raises(ConfigError, match="key_path .* not found"):
        ssh.connect(sandbox.host.model_copy(update={"key_path": tmp_path / "nope"}))
    with pytest.raises(ConfigError, match="known_hosts .* not found"):
        ssh.connect(sandbox.host.model_copy(update={"known_hosts": tmp_path / "nope"}))


@pytest.mark.sandbox
@pytest.mark.parametrize("update, phrase", [
    # a closed port on loopback (the sandbox host may have its DROP baseline applied: no RST there)
    ({"address": "127.0.0.1", "port": 1}, "connection refused"),
    ({"address": "10.231.1.77", "connect_timeout": 1.0}, "10.231.1.77"),  # nobody there
    ({"port": 80, "connect_timeout": 2.0}, "SSH handshake failed"),  # nginx, not sshd
])
def test_unreachable_hosts(sandbox, update, phrase):
    with pytest.raises(Unreachable) as e:
        ssh.connect(sandbox.host.model_copy(update=update))
    assert phrase in str(e.value) and e.value.hint
    assert not isinstance(e.value, HostKeyError)
    assert e.value.exit_code == ExitCode.UNREACHABLE


@pytest.mark.sandbox
def test_hostile_arguments_arrive_verbatim(sandbox):
    with ssh.connect(sandbox.host) as s:
        r = s.run(["printf", "%s\\0", *HOSTILE])
        assert r.stdout.split(b"\0")[:-1] == [a.encode() for a in HOSTILE]
        assert s.run(["test", "-e", "/tmp/dn-pwned"], check=False).rc == 1


@pytest.mark.sandbox
def test_stdin_secret_never_in_argv_environment_logs_or_errors(sandbox, caplog):
    secret = f"s3cret-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    seen_in_proc: list[str] = []
    started = threading.Event()

    def scan() -> None:
        started.wait(10)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                for f in ("cmdline", "environ"):
                    try:
                        if secret.encode() in Path(f"/proc/{pid}/{f}").read_bytes():
                            seen_in_proc.append(f"{pid}/{f}")
                    except OSError:
                        pass
            time.sleep(0.05)

    scanner = threading.Thread(target=scan)
    scanner.start()
    with ssh.connect(sandbox.host) as s:
        started.set()
        # the remote side reads the secret and keeps running while /proc is scanned
        r = s.run(["sh", "-c", 'read -r line; sleep 2; printf %s "$line" | sha256sum'],
                  stdin=(secret + "\n").encode())
        scanner.join()
        assert r.text.split()[0] == hashlib.sha256(secret.encode()).hexdigest()
        with pytest.raises(ssh.CommandFailed) as e:
            s.run(["sh", "-c", "cat >&2; exit 7"], stdin=(secret + "\n").encode())
    assert seen_in_proc == []
    assert e.value.rc == 7 and secret not in str(e.value) and secret not in e.value.stderr
    assert "[redacted]" in e.value.stderr
    assert not [r for r in caplog.records if secret in r.getMessage()]


@pytest.mark.sandbox
def test_large_stdin_and_stdout_do_not_deadlock(sandbox):
    blob = os.urandom(3 * 1024 * 1024)
    with ssh.connect(sandbox.host) as s:
        r = s.run(["cat"], stdin=blob, timeout=60)
    assert r.stdout == blob


@pytest.mark.sandbox
def test_failed_command_carries_rc_and_trimmed_stderr(sandbox):
    with ssh.connect(sandbox.host) as s:
        r = s.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
        assert (r.rc, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        with pytest.raises(ssh.CommandFailed) as e:
            s.run(["sh", "-c", "for i in $(seq 5000); do echo line-$i >&2; done; exit 4"])
    assert e.value.rc == 4 and e.value.exit_code == ExitCode.FAILED
    assert "line-5000" in str(e.value) and "line-1\n" not in str(e.value)
    assert len(e.value.stderr) <= ssh.STDERR_TAIL + 1


@pytest.mark.sandbox
def test_command_timeout(sandbox):
    """A command dn gave up on does not keep running on the host."""
    naptime = f"{30 + secrets.randbelow(1000) / 1000:.3f}"  # names this test's process alone
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(ssh.CommandTimeout, match="did not finish within 1s") as ei:
            s.run(["sleep", naptime], timeout=1)
        assert "the host stops it" in ei.value.hint
        assert s.run(["pgrep", "-fx", f"sleep {naptime}"], check=False).rc == 0  # still running now
        deadline = time.monotonic() + ssh.HOST_STOP_MARGIN + 5
        while s.run(["pgrep", "-fx", f"sleep {naptime}"], check=False).rc == 0:
            assert time.monotonic() < deadline, "the timed-out command still runs on the host"
            time.sleep(0.2)
        assert s.run(["echo", "still usable"]).text == "still usable\n"
    tight = sandbox.host.model_copy(update={"command_timeout": 1.0})
    with ssh.connect(tight) as s, pytest.raises(ssh.CommandTimeout):
        s.run(["sleep", "30"])


@pytest.mark.sandbox
def test_sftp_helpers(sandbox, workdir):
    with ssh.connect(sandbox.host) as s:
        s.mkdir_p(f"{workdir}/a/b/c")
        s.mkdir_p(f"{workdir}/a/b/c")
        assert s.exists(f"{workdir}/a/b/c") and not s.exists(f"{workdir}/nope")
        s.install_file(f"{workdir}/a/f", b"x")
        assert s.read_file(f"{workdir}/a/f") == b"x"
        assert s.listdir(f"{workdir}/a") == ["b", "f"]
        assert s.remove(f"{workdir}/a/f") is True and s.remove(f"{workdir}/a/f") is False
        s.install_file(f"{workdir}/g", b"")
        with pytest.raises(ssh.OperationFailed, match="not a directory"):
            s.mkdir_p(f"{workdir}/g/h")
        with pytest.raises(ssh.OperationFailed, match="not a regular file"):
            s.install_file(f"{workdir}/a", b"")
        with pytest.raises(InvalidInput):
            s.install_file("relative/path", b"")
        with pytest.raises(InvalidInput):
            s.install_file(f"{workdir}/../escape", b"")


@pytest.mark.sandbox
def test_install_file_is_idempotent_and_sets_mode_and_owner(sandbox, workdir):
    path = f"{workdir}/app.conf"
    with ssh.connect(sandbox.host) as s:
        first = s.install_file(path, b"v1\n", mode=0o640, owner="root", group="www-data")
        assert first == ssh.InstallResult(True, None)
        st1 = host_stat(sandbox, path)
        assert st1[1:] == ("640", "0", str(33), "3")
        assert s.install_file(path, b"v1\n", mode=0o640, owner="root", group="www-data") == ssh.InstallResult(False, None)
        assert host_stat(sandbox, path) == st1  # not even rewritten: same inode
        second = s.install_file(path, b"v2\n", mode=0o640, group="www-data")
        assert second.changed and second.backup_path == f"{workdir}/.app.conf.dn-prev"
        assert host_read(sandbox, path) == b"v2\n" and host_read(sandbox, second.backup_path) == b"v1\n"
        assert host_stat(sandbox, second.backup_path)[0] == st1[0]  # the previous file itself, kept
        assert s.install_file(path, b"v2\n", mode=0o600).changed  # mode alone is a change
        assert host_stat(sandbox, path)[1:3] == ("600", "0")
        secret = s.install_file(f"{workdir}/key", b"k", mode=0o600, keep_previous=False)
        assert secret.changed and s.install_file(f"{workdir}/key", b"k2", mode=0o600, keep_previous=False).backup_path is None
        assert sorted(n for n in s.listdir(workdir) if "key" in n) == ["key"]
        with pytest.raises(InvalidInput, match="owner"):
            s.install_file(path, b"x", owner="no-such-user")
    assert not [n for n in listing(sandbox, workdir) if ssh.TMP_MARK in n]


@pytest.mark.sandbox
def test_validation_runs_on_the_staged_file_and_a_refusal_changes_nothing(sandbox, workdir):
    path = f"{workdir}/nginx.conf"
    good = b"events {}\nhttp { server { listen 127.0.0.1:8081; } }\n"
    bad = b"events {}\nhttp { server { listen 127.0.0.1:8081 } }\n"
    validate = ["nginx", "-t", "-q", "-c", "{path}", "-e", "/dev/null", "-g", "pid /dev/null;"]
    with ssh.connect(sandbox.host) as s:
        assert s.install_file(path, good, validate=validate).changed
        before = listing(sandbox, workdir)
        with pytest.raises(ssh.ValidationFailed) as e:
            s.install_file(path, bad, validate=validate)
    assert "nginx.conf" in str(e.value) and "nothing was changed" in e.value.hint
    assert "unexpected" in e.value.stderr or "directive" in e.value.stderr
    assert listing(sandbox, workdir) == before


NGINX_MAIN = """events {{}}
pid /dev/null;
error_log /dev/null;
http {{ include {d}/conf.d/*.conf; }}
"""


def nginx_tree(sandbox, workdir: str) -> str:
    sandbox.ns_exec(["mkdir", "-p", f"{workdir}/conf.d"])
    sandbox.ns_exec(["sh", "-c", f"cat > {workdir}/main.conf"], input=NGINX_MAIN.format(d=workdir).encode())
    for name, port in (("a", 8091), ("b", 8092), ("d", 8093)):
        sandbox.ns_exec(["sh", "-c", f"cat > {workdir}/conf.d/{name}.conf"],
                        input=f"server {{ listen 127.0.0.1:{port}; }}\n".encode())
    sandbox.ns_exec(["chmod", "640", f"{workdir}/conf.d/b.conf"])
    sandbox.ns_exec(["chown", "root:www-data", f"{workdir}/conf.d/b.conf"])
    return f"{workdir}/conf.d"


@pytest.mark.sandbox
def test_transaction_rollback_restores_exactly_the_previous_files(sandbox, workdir):
    conf = nginx_tree(sandbox, workdir)
    before = listing(sandbox, conf)
    check = ["nginx", "-t", "-q", "-c", f"{workdir}/main.conf", "-e", "/dev/null"]
    rolled_back = []
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(ssh.CheckFailed) as e:
            with s.transaction(check=check, on_rollback=lambda sess: rolled_back.append(sess.where)) as tx:
                assert tx.put(f"{conf}/a.conf", b"server { listen 127.0.0.1:8191; }\n")
                assert tx.put(f"{conf}/b.conf", b"server { listen 127.0.0.1:8192; }\n", mode=0o644)
                assert tx.put(f"{conf}/c.conf", b"server { listen 127.0.0.1:8194 }\n")  # broken, new file
                assert tx.delete(f"{conf}/d.conf")
                assert not tx.delete(f"{conf}/never.conf")
                assert tx.pending == [f"{conf}/{n}.conf" for n in "abcd"]
    assert "previous versions restored" in str(e.value) and "c.conf" in str(e.value)
    assert rolled_back == ["root@10.231.1.2"]
    # same names, same inodes, modes, owners and bytes; the new file is gone, nothing else left
    assert listing(sandbox, conf) == before


@pytest.mark.sandbox
def test_transaction_commit_swaps_all_and_keeps_previous_versions(sandbox, workdir):
    conf = nginx_tree(sandbox, workdir)
    old_a = host_stat(sandbox, f"{conf}/a.conf")
    check = ["nginx", "-t", "-q", "-c", f"{workdir}/main.conf", "-e", "/dev/null"]
    with ssh.connect(sandbox.host) as s:
        with s.transaction(check=check) as tx:
            tx.put(f"{conf}/a.conf", b"server { listen 127.0.0.1:8191; }\n")
            tx.put(f"{conf}/c.conf", b"server { listen 127.0.0.1:8194; }\n")
            tx.put(f"{conf}/b.conf", host_read(sandbox, f"{conf}/b.conf"), mode=0o640)  # unchanged
            tx.delete(f"{conf}/d.conf")
    assert tx.result.changed == (f"{conf}/a.conf", f"{conf}/c.conf", f"{conf}/d.conf")
    assert tx.result.backups == {f"{conf}/a.conf": f"{conf}/.a.conf.dn-prev"}
    files = listing(sandbox, conf)
    assert sorted(files) == [".a.conf.dn-prev", "a.conf", "b.conf", "c.conf"]
    assert files[".a.conf.dn-prev"][0] == old_a
    assert files["a.conf"][1] == b"server { listen 127.0.0.1:8191; }\n"


@pytest.mark.sandbox
def test_validation_failure_in_a_transaction_aborts_before_any_swap(sandbox, workdir):
    conf = nginx_tree(sandbox, workdir)
    before = listing(sandbox, conf)
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(ssh.ValidationFailed):
            with s.transaction() as tx:
                tx.put(f"{conf}/a.conf", b"changed\n")
                tx.put(f"{conf}/b.conf", b"changed\n", validate=["grep", "-q", "listen", "{path}"])
    assert listing(sandbox, conf) == before


def _kill_session(sandbox, session: ssh.Session) -> None:
    port = session._t.sock.getsockname()[1]
    pids = sandbox.sshd_pids_for(port)
    assert pids, "no sshd process found for this connection"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.sandbox
def test_connection_dropped_during_upload_leaves_the_old_file(sandbox, workdir):
    path = f"{workdir}/big.bin"
    old = b"old content\n" * 1000
    new = os.urandom(96 * 1024 * 1024)
    with ssh.connect(sandbox.host) as s:
        s.install_file(path, old)
    s = ssh.connect(sandbox.host)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            s.install_file(path, new)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    t = threading.Thread(target=upload)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the temp file is being written
        temps = [n for n in sandbox.ns_exec(["ls", "-A", workdir]).stdout.decode().split() if ssh.TMP_MARK in n]
        if temps and int(host_stat(sandbox, f"{workdir}/{temps[0]}")[4]) > 1024 * 1024:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the upload never started")
    _kill_session(sandbox, s)
    t.join(30)
    s.close()
    assert errors and isinstance(errors[0], Unreachable), errors
    assert host_read(sandbox, path) == old
    # the partial temp file is dot-named and removed by the next install of the same file
    with ssh.connect(sandbox.host) as s2:
        assert s2.install_file(path, b"fresh\n").changed
    assert not [n for n in listing(sandbox, workdir) if ssh.TMP_MARK in n]


@pytest.mark.sandbox
def test_connection_dropped_during_check_leaves_each_file_whole(sandbox, workdir):
    conf = nginx_tree(sandbox, workdir)
    old = {n: host_read(sandbox, f"{conf}/{n}") for n in ("a.conf", "b.conf")}
    new = {"a.conf": b"server { listen 127.0.0.1:8191; }\n" * 2000, "b.conf": b"server { listen 127.0.0.1:8192; }\n"}

    def check_dropping_the_connection(session: ssh.Session) -> None:
        _kill_session(sandbox, session)
        session.run(["nginx", "-t", "-c", f"{workdir}/main.conf"])

    s = ssh.connect(sandbox.host)
    try:
        with pytest.raises(ssh.RollbackIncomplete) as e:
            with s.transaction(check=check_dropping_the_connection) as tx:
                for n, data in new.items():
                    tx.put(f"{conf}/{n}", data)
    finally:
        s.close()
    assert "a.conf" in str(e.value) and "b.conf" in str(e.value) and "whole" in e.value.hint
    for n in new:
        assert host_read(sandbox, f"{conf}/{n}") in (old[n], new[n])
    # nothing half-written anywhere: every file in the tree is one of the known versions
    for name, (_, data) in listing(sandbox, conf).items():
        assert data in (*old.values(), *new.values(), b"server { listen 127.0.0.1:8093; }\n"), name


@pytest.mark.sandbox
def test_backup_target_session_is_sftp_only(sandbox):
    with ssh.connect(sandbox.backup) as s:
        name = f"/backups/t-{uuid.uuid4().hex[:8]}"
        assert s.install_file(name, b"dump").changed
        assert s.read_file(name) == b"dump"
        s.remove(name)
        r = s.run(["touch", "/backups/pwned"], check=False)
        assert r.rc != 0
        assert not s.exists("/backups/pwned")
