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
        cfg = AlertConfig(smtp_host="127.0.0.1", smtp_port=port, smtp_from="dn@example.cz", smtp_to=["founder@example.cz"],
                          smtp_security="none")
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


# --------------------------------------------------------------------------------------------
# TLS and login, against a real aiosmtpd server with its own certificate
# --------------------------------------------------------------------------------------------
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402

import pytest  # noqa: E402

from dn.errors import ConfigError  # noqa: E402

USER, PASSWORD = "alerts@example.cz", "pw-" + "x" * 20  # a throwaway value for a loopback server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory):
    """A certificate for 127.0.0.1 (its own CA) and the server's TLS context."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("smtp-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = d / "server.crt", d / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, pem)
    return crt, ctx


@contextlib.contextmanager
def smtp_server(*, tls_context=None, starttls: bool = True, implicit_tls: bool = False):
    """A loopback aiosmtpd server that requires STARTTLS (or speaks TLS from the start) and a
    login with USER/PASSWORD; yields (port, received messages, logins it saw)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    got, logins = [], []

    class Keep:
        async def handle_DATA(self, server, session, envelope):
            got.append(envelope.content.decode())
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and data.login.decode() == USER and data.password.decode() == PASSWORD
        logins.append((data.login.decode(), ok))
        return AuthResult(success=ok, handled=False)

    port = _free_port()
    # PLAIN only: after a refused PLAIN, smtplib retries with LOGIN and an initial response,
    # which this aiosmtpd version leaves waiting until the client's timeout
    kwargs = dict(hostname="127.0.0.1", port=port, authenticator=authenticator, auth_required=True,
                  auth_require_tls=True, auth_exclude_mechanism=["LOGIN"])
    if implicit_tls:  # TLS from the first byte; this aiosmtpd only counts STARTTLS as TLS for AUTH
        kwargs.update(ssl_context=tls_context, auth_require_tls=False)
    elif starttls:
        kwargs.update(tls_context=tls_context, require_starttls=True)
    ctl = Controller(Keep(), **kwargs)
    ctl.start()
    try:
        yield port, got, logins
    finally:
        ctl.stop()


def login_cfg(port: int, cafile, **more) -> AlertConfig:
    return AlertConfig(smtp_host="127.0.0.1", smtp_port=port, smtp_from="dn@example.cz", smtp_to=["founder@example.cz"],
                       smtp_user=USER, smtp_password_env="DN_SMTP_PASSWORD", smtp_cafile=cafile, **more)


def test_starttls_login_delivers_over_a_verified_connection(server_cert):
    crt, tls = server_cert
    with smtp_server(tls_context=tls) as (port, got, logins):
        done = alert.send(login_cfg(port, crt), "[dn] verify FAIL", EVENT, "summary", {"DN_SMTP_PASSWORD": PASSWORD})
    assert done == ["alert mailed to founder@example.cz"]
    assert logins == [(USER, True)] and len(got) == 1 and "[dn] verify FAIL" in got[0]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_implicit_tls_with_a_password_file(server_cert, tmp_path):
    crt, tls = server_cert
    pw = tmp_path / "smtp-password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    cfg = AlertConfig(smtp_host="127.0.0.1", smtp_to=["founder@example.cz"], smtp_security="tls",
                      smtp_user=USER, smtp_password_file=pw, smtp_cafile=crt, smtp_port=1)
    with smtp_server(tls_context=tls, implicit_tls=True) as (port, got, logins):
        done = alert.send(cfg.model_copy(update={"smtp_port": port}), "s", EVENT, "x", {})
    assert done == ["alert mailed to founder@example.cz"] and logins == [(USER, True)] and len(got) == 1


def test_a_refused_login_is_a_warning_without_the_password(server_cert):
    crt, tls = server_cert
    wrong = "wrong-" + "y" * 16
    with smtp_server(tls_context=tls) as (port, got, logins):
        (line,) = alert.send(login_cfg(port, crt), "s", EVENT, "x", {"DN_SMTP_PASSWORD": wrong})
    assert line.startswith(f"warning: alert mail via 127.0.0.1:{port} failed: the server refused the login of {USER}")
    assert wrong not in line and logins == [(USER, False)] and got == []


def test_a_missing_password_variable_sends_nothing(server_cert):
    crt, tls = server_cert
    with smtp_server(tls_context=tls) as (port, got, logins):
        (line,) = alert.send(login_cfg(port, crt), "s", EVENT, "x", {})
    assert "the SMTP password variable DN_SMTP_PASSWORD is not set" in line and logins == [] and got == []


def test_an_untrusted_certificate_is_refused(server_cert):
    _crt, tls = server_cert
    with smtp_server(tls_context=tls) as (port, got, logins):
        (line,) = alert.send(login_cfg(port, None), "s", EVENT, "x", {"DN_SMTP_PASSWORD": PASSWORD})
    assert "CERTIFICATE_VERIFY_FAILED" in line and logins == [] and got == []


def test_starttls_is_required_not_opportunistic():
    """A server (or a man in the middle) that hides STARTTLS gets no mail and no password."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    got = []

    class Keep(Message):
        def handle_message(self, message):
            got.append(message)

    port = _free_port()
    ctl = Controller(Keep(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        (line,) = alert.send(AlertConfig(smtp_host="127.0.0.1", smtp_port=port, smtp_to=["founder@example.cz"]),
                             "s", EVENT, "x", {})
    finally:
        ctl.stop()
    assert line.endswith('the server does not offer STARTTLS (smtp_security = "starttls")') and got == []


@pytest.mark.parametrize("alert_cfg, rule", [
    ({"smtp_user": USER}, "smtp_user needs smtp_password_env or smtp_password_file"),
    ({"smtp_password_env": "DN_SMTP_PASSWORD"}, "need smtp_user"),
    ({"smtp_user": USER, "smtp_password_env": "DN_SMTP_PASSWORD", "smtp_password_file": "/x"}, "give one, not both"),
    ({"smtp_user": USER, "smtp_password_env": "DN_SMTP_PASSWORD", "smtp_security": "none"}, "never sent without TLS"),
    ({"smtp_security": "ssl"}, "smtp_security"),
])
def test_login_settings_are_checked_when_the_config_loads(tmp_path, alert_cfg, rule):
    from dn.config import load_settings

    lines = ["[alert]", 'smtp_host = "mail.example.cz"'] + [
        f"{k} = {json.dumps(v)}" for k, v in alert_cfg.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_settings(path, environ={"DN_HOME": str(tmp_path)})
    assert rule in str(e.value) and "alert" in str(e.value)
