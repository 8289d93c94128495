"""The failure alert: ``alert.command`` gets the event as JSON on stdin; or an email via SMTP.

An alert that cannot be delivered never hides the failure it reports: it is returned as a
warning for the caller to print, next to the original error.
"""
from __future__ import annotations

import json
import smtplib
import subprocess
from email.message import EmailMessage
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dn.config import AlertConfig

TIMEOUT = 30


def send(cfg: "AlertConfig", subject: str, event: dict, summary: str) -> list[str]:
    """Deliver the alert by every configured channel; returns one line per channel (or problem)."""
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
            with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=TIMEOUT) as s:
                s.ehlo()
                if s.has_extn("starttls"):
                    s.starttls()
                    s.ehlo()
                s.send_message(msg)
            done.append(f"alert mailed to {', '.join(cfg.smtp_to)}")
        except (OSError, smtplib.SMTPException) as e:
            done.append(f"warning: alert mail via {cfg.smtp_host}:{cfg.smtp_port} failed: {e}")
    if not done:
        done.append("warning: no alert channel configured (alert.command or alert.smtp_host + smtp_to)")
    return done
