"""dn's error types and exit codes.

Every failure that dn can explain is a DnError: a message that says what failed and where,
an optional hint (the next step) and runbook reference, and the exit code it maps to.
The CLI's single error handler prints these; nothing else decides exit codes.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of every dn command (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # the operation ran and failed
    INVALID = 2  # invalid input, configuration or usage
    UNREACHABLE = 3  # cannot reach a host, the backup region or the database
    POLICY = 4  # policy violation, failed verification or drift found
    LOCKED = 5  # another operation holds the lock


class DnError(Exception):
    """A failure dn can explain. Never put a secret into message or hint."""

    exit_code: ExitCode = ExitCode.FAILED
    default_runbook: str | None = None

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        runbook: str | None = None,
        where: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.runbook = runbook or self.default_runbook  # e.g. "incident-response#detection"
        self.where = where  # tenant / host / stack the failure concerns

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class OperationFailed(DnError):
    exit_code = ExitCode.FAILED


class InvalidInput(DnError):
    """Bad input: the message names the field and the rule it breaks."""

    exit_code = ExitCode.INVALID

    def __init__(self, field: str, rule: str, **kw) -> None:
        super().__init__(f"{field}: {rule}", **kw)
        self.field = field
        self.rule = rule


class ConfigError(DnError):
    """Invalid configuration: names the file, the key and the rule."""

    exit_code = ExitCode.INVALID


class Unreachable(DnError):
    exit_code = ExitCode.UNREACHABLE


class HostKeyError(Unreachable):
    """Unknown or changed SSH host key: dn refuses to connect."""

    default_runbook = "host-key-compromise#a-host-key-changed-or-is-unknown"


class PolicyViolation(DnError):
    exit_code = ExitCode.POLICY


class DriftFound(DnError):
    exit_code = ExitCode.POLICY


class Locked(DnError):
    exit_code = ExitCode.LOCKED
    default_runbook = "incident-response#a-lock-is-held"
