"""The one context object, built in the CLI's root callback and passed through ``ctx.obj``.

It holds the settings (loaded lazily, so ``--help`` never reads configuration), the two consoles
(stdout for data, stderr for progress and errors) and the adapter factories. Tests build their own.
Heavy modules (paramiko, psycopg, pulumi) are imported inside the factories, never at import time.
"""
from __future__ import annotations

import getpass
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from dn.config import Settings


@dataclass
class Context:
    config_path: Path | None = None
    traceback: bool = False
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    _settings: "Settings | None" = None
    _err: "Console | None" = None

    @property
    def settings(self) -> "Settings":
        if self._settings is None:
            from dn.config import load_settings

            self._settings = load_settings(self.config_path, self.environ)
        return self._settings

    @property
    def err(self) -> "Console":
        """stderr console: progress, warnings, errors."""
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False)
        return self._err

    def out(self, text: str) -> None:
        """stdout is data: write it plainly, without markup."""
        sys.stdout.write(text if text.endswith("\n") else text + "\n")

    def out_json(self, data: Any) -> None:
        import json

        self.out(json.dumps(data, indent=2, sort_keys=True, default=str))

    @property
    def actor(self) -> str:
        """Who acts: the CI identity when running in CI, else the OS user (plus SSH key fingerprint
        when the key is known, added by the audit module)."""
        env = self.environ
        if env.get("GITHUB_ACTIONS") == "true":
            return f"ci:github:{env.get('GITHUB_REPOSITORY', '?')}:{env.get('GITHUB_RUN_ID', '?')}"
        if env.get("CI"):
            return f"ci:{env.get('CI_JOB_ID', 'local')}"
        try:
            return f"user:{getpass.getuser()}"
        except Exception:  # no passwd entry (containers)
            return f"uid:{os.getuid()}"
