"""Files dn writes on the machine it runs on (keys, certificates, the sandbox's configuration):
written whole or not at all.

``write_atomic`` writes a temp file beside the target with its final mode from the first byte,
fsyncs it, then renames it over the target (or, ``exclusive``, links it there, failing if the
target exists: nothing is ever overwritten), and fsyncs the directory so the rename survives a
crash. Files on an EU host go through ``dn.ssh`` instead.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Put ``data`` at ``path`` (mode ``mode``) in one step; ``exclusive``: FileExistsError if
    ``path`` already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask does not narrow it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
