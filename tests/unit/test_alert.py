"""The failure alert: a real command with JSON on stdin, and real SMTP to a server on loopback."""
import json
import sys

from dn import alert
from dn.config import AlertConfig

EVENT = {"drill_id": "abc", "result": "failed", "failures": ["artifact platform.dump.enc: truncated"]}


def test_command_gets_the_event_as_json_on_stdin(tmp_path):
    out = tmp_path / "got.json"
    cmd = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.stdin.read())", str(out)]
    done = alert.send(AlertConfig(command=cmd), "[dn] DR drill FAILED", EVENT, "summary")
    assert done == [f"alert command {sys.executable} ran"]
    assert json.loads(out.read_text()) == EVENT


def test_a_failing_or_missing_command_is_a_warning_not_an_exception(tmp_path):
    done = alert.send(AlertConfig(command=[sys.executable, "-c", "raise SystemExit(3)"]), "s", EVENT, "x")
    assert done == [f"warning: alert command {sys.executable} exited with 3"]
    done = alert.send(AlertConfig(command=[str(tmp_path / "nope")]), "s", EVENT, "x")
    assert done[0].startswith(f"warning: alert command {tmp_path / 'nope'} could not run")


def test_nothing_configured_says_so():
    assert alert.send(AlertConfig(), "s", EVENT, "x") == [
        "warning: no alert channel configured (alert.command or alert.smtp_host + smtp_to)"]


def test_smtp_mail_reaches_the_server():
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    got = []

    class Keep(Message):
        def handle_message(self, message):
            got.append(message)

    import socket

    with socket.socket() as probe:  # a free loopback port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctl = Controller(Keep(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        cfg = AlertConfig(smtp_host="127.0.0.1", smtp_port=port, smtp_from="dn@example.cz", smtp_to=["founder@example.cz"])
        done = alert.send(cfg, "[dn] DR drill FAILED", EVENT, "DR drill abc: FAILED")
    finally:
        ctl.stop()
    assert done == ["alert mailed to founder@example.cz"]
    (msg,) = got
    assert msg["Subject"] == "[dn] DR drill FAILED" and msg["To"] == "founder@example.cz"
    assert "artifact platform.dump.enc: truncated" in msg.get_payload()


def test_smtp_server_down_is_a_warning():
    cfg = AlertConfig(smtp_host="127.0.0.1", smtp_port=1, smtp_to=["founder@example.cz"])
    (line,) = alert.send(cfg, "s", EVENT, "x")
    assert line.startswith("warning: alert mail via 127.0.0.1:1 failed")
