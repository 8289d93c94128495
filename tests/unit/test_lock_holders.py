"""Judging a lock's holder dead or alive from /proc, and naming a stack's own files (pure parts)."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from datetime import UTC, datetime

import pytest

from dn import engine, locks


@pytest.mark.parametrize("filename, ours", [
    ("acme", True), ("acme.json", True), ("acme.json.bak", True), ("acme.json.attrs", True),
    ("acme.pulumi-tags", True), ("acme.1733111111222333444.json", True), ("acme-1733111111.checkpoint.json", True),
    ("acme-two", False), ("acme-two.json", False), ("acme-two-1733111111.history.json", False), ("acmex.json", False),
    ("Pulumi.acme.yaml", False), ("meta.yaml", False),
])
def test_a_stacks_own_file_names(filename, ours):
    assert engine._names(filename, "acme") is ours


@pytest.mark.parametrize("text, expected", [
    ("2026-12-02T03:40:01.123456789Z", datetime(2026, 12, 2, 3, 40, 1, 123456, tzinfo=UTC)),
    ("2026-12-02T04:40:01+01:00", datetime(2026, 12, 2, 3, 40, 1, tzinfo=UTC)),
    ("2026-12-02T03:40:01.5Z", datetime(2026, 12, 2, 3, 40, 1, 500000, tzinfo=UTC)),
])
def test_go_times(text, expected):
    assert engine._go_time(text) == expected.timestamp()


@pytest.mark.parametrize("text", ["", "yesterday", "2026-12-02 03:40:01", "2026-12-02T03:40:01"])
def test_unreadable_go_times_are_none(text):
    assert engine._go_time(text) is None


def test_this_process_is_alive_and_a_finished_one_is_gone():
    me, host = os.getpid(), socket.gethostname()
    ident = {"boot": locks.boot_id(), "pid_ns": locks.pid_namespace(), "start": locks.pid_start(me)}
    assert locks.process_gone(host, me, **ident) is None
    p = subprocess.Popen(["true"])
    p.wait()
    assert "is gone on" in locks.process_gone(host, p.pid, boot=ident["boot"], pid_ns=ident["pid_ns"], start=1)


def test_a_zombie_has_exited():
    p = subprocess.Popen(["true"])  # not waited for: it stays a zombie until reaped
    try:
        deadline = time.monotonic() + 5
        while (locks._stat(p.pid) or ("?",))[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "has exited" in (locks.process_gone(socket.gethostname(), p.pid, start=locks.pid_start(p.pid)) or "")
    finally:
        p.wait()


def test_a_process_elsewhere_cannot_be_checked():
    me = os.getpid()
    assert locks.process_gone("elsewhere.example", 999999) is None
    assert locks.process_gone(socket.gethostname(), 999999, boot="another-boot") is None
    assert locks.process_gone(socket.gethostname(), 999999, pid_ns="pid:[1]") is None
    # a pid that started after the holder already ran is another process
    assert "is now another process" in locks.process_gone(socket.gethostname(), me, since=0.0)
