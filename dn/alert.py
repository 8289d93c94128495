"""The failure alert: ``alert.command`` gets the event as JSON on stdin; or an email via SMTP.

An alert that cannot be delivered never hides the failure it reports: it is returned as a
warning for the caller to print, next to the original error.

Mail goes over TLS unless the configuration says ``smtp_security = "none"`` (see
``dn.config.AlertConfig``): STARTTLS is required, not opportunistic, and the server's
certificate is verified. The login password is read when the alert is sent and appears in no
message.
"""
from __future__ import annotations

import json
import os
import smtplib
import ssl
import subprocess
from email.message import EmailMessage
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from dn.config import AlertConfig

TIMEOUT = 30


class _Undeliverable(Exception):
    """Why the mail cannot go (no secret in it)."""


def _password(cfg: "AlertConfig", environ: Mapping[str, str]) -> str:
    if cfg.smtp_password_env is not None:
        value = environ.get(cfg.smtp_password_env)
        if not value:
            raise _Undeliverable(f"the SMTP password variable {cfg.smtp_password_env} is not set")
        return value
    try:
        value = cfg.smtp_password_file.read_text().rstrip("\n")
    except OSError as e:
        raise _Undeliverable(f"cannot read smtp_password_file {cfg.smtp_password_file}: {e.strerror}") from None
    if not value:
        raise _Undeliverable(f"smtp_password_file {cfg.smtp_password_file} is empty")
    return value


def _tls_context(cfg: "AlertConfig") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.smtp_cafile) if cfg.smtp_cafile else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _mail(cfg: "AlertConfig", msg: EmailMessage, environ: Mapping[str, str]) -> None:
    password = _password(cfg, environ) if cfg.smtp_user is not None else None
    if cfg.smtp_security == "tls":
        conn = smtplib.SMTP_SSL(cfg.smtp_host, cfg.smtp_port, timeout=TIMEOUT, context=_tls_context(cfg))
    else:
        conn = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=TIMEOUT)
    with conn as s:
        s.ehlo()
        if cfg.smtp_security == "starttls":
            if not s.has_extn("starttls"):
                raise _Undeliverable("the server does not offer STARTTLS (smtp_security = \"starttls\")")
            s.starttls(context=_tls_context(cfg))
            s.ehlo()
        if password is not None:
            s.login(cfg.smtp_user, password)
        s.send_message(msg)


def send(cfg: "AlertConfig", subject: str, event: dict, summary: str,
         environ: Mapping[str, str] | None = None) -> list[str]:
    """Deliver the alert by every configured channel; returns one line per channel (or problem).
    ``environ`` holds the SMTP password variable (default: this process's environment)."""
    done: list[str] = []
    payload = json.dumps(event, sort_keys=True, default=str).encode()
    if cfg.command:
        try:
            r = subprocess.run(cfg.command, input=payload, capture_output=True, timeout=TIMEOUT, cwd="/")
            if r.returncode == 0:
                done.append(f"alert command {cfg.command[0]} ran")
            else:
                done.append(f"warning: alert command {cfg.command[0]} exited with {r.returncode}")
        except (OSError, subprocess.TimeoutExpired) as e:
            done.append(f"warning: alert command {cfg.command[0]} could not run: {getattr(e, 'strerror', None) or e}")
    if cfg.smtp_host and cfg.smtp_to:
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = cfg.smtp_from or "dn@localhost"
        msg["To"] = ", ".join(cfg.smtp_to)
        msg.set_content(summary + "\n\n" + json.dumps(event, indent=2, sort_keys=True, default=str) + "\n")
        try:
            _mail(cfg, msg, os.environ if environ is None else environ)
            done.append(f"alert mailed to {', '.join(cfg.smtp_to)}")
        except smtplib.SMTPAuthenticationError as e:
            done.append(f"warning: alert mail via {cfg.smtp_host}:{cfg.smtp_port} failed: the server refused "
                        f"the login of {cfg.smtp_user} ({e.smtp_code})")
        except (_Undeliverable, OSError, smtplib.SMTPException) as e:
            done.append(f"warning: alert mail via {cfg.smtp_host}:{cfg.smtp_port} failed: {e}")
    if not done:
        done.append("warning: no alert channel configured (alert.command or alert.smtp_host + smtp_to)")
    return done
