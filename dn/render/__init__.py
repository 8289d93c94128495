"""Pure renderers: nginx, iptables and systemd configuration from validated specs.

Each renderer fills Jinja2 templates from ``templates/<kind>/``. Jinja2's autoescape is for HTML,
which is not what these files are, so every ``{{ value }}`` passes a per-language guard
(the environment's ``finalize``): a value that could leave its token — whitespace, ``;``, braces,
quotes, ``$``, backslash, ``#``, control characters — is refused with ``UnsafeValue`` even though
the specs were validated before (defence in depth). The guards are also exposed as explicit
filters (``ngx``, ``ipt``, ``sd_arg``, ``sd_line``).

No typer, rich, paramiko, psycopg or pulumi here.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from dn.errors import InvalidInput

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates"


class UnsafeValue(InvalidInput):
    """A value reached a template that could break out of its token; nothing was rendered."""

    def __init__(self, language: str, value: Any, why: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        super().__init__(f"{language} value {shown}", f"refused by the {language} renderer: {why}")


def _scalar(value: Any, language: str) -> str:
    if isinstance(value, bool) or value is None:
        raise UnsafeValue(language, value, "booleans and None are never rendered directly")
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise UnsafeValue(language, value, f"only strings and integers are rendered, not {type(value).__name__}")
    if not value:
        raise UnsafeValue(language, value, "empty values are not rendered")
    return value


# Printable ASCII minus whitespace and the characters that end or open an nginx token,
# start a variable, an escape or a comment.
_NGX_BAD = re.compile(r"[^\x21-\x7e]|[;{}'\"$\\#]")


def ngx(value: Any) -> str:
    """Guard for one nginx token."""
    text = _scalar(value, "nginx")
    if _NGX_BAD.search(text):
        raise UnsafeValue("nginx", value, "whitespace, ; { } quotes $ \\ # and control or non-ASCII characters are not allowed")
    return text


# iptables-restore splits on whitespace and honours quotes; a leading '-' would start an option.
_IPT_OK = re.compile(r"[A-Za-z0-9_.:/+,][A-Za-z0-9_.:/+,-]*")


def ipt(value: Any) -> str:
    """Guard for one iptables-restore argument."""
    text = _scalar(value, "iptables")
    if not _IPT_OK.fullmatch(text):
        raise UnsafeValue("iptables", value, "only A-Z a-z 0-9 _ . : / + , - (not leading) are allowed")
    return text


# systemd: '%' starts a specifier, '\' an escape, a newline a new key; in ExecStart whitespace
# and quotes split or join arguments and ';' separates commands.
_SD_ARG_OK = re.compile(r"[A-Za-z0-9_.:/+,@=-]+")
_SD_LINE_BAD = re.compile(r"[^\x20-\x7e]|[%\\]")


def sd_arg(value: Any) -> str:
    """Guard for one argument of a systemd Exec line."""
    text = _scalar(value, "systemd")
    if not _SD_ARG_OK.fullmatch(text):
        raise UnsafeValue("systemd", value, "an Exec argument may only hold A-Z a-z 0-9 _ . : / + , @ = -")
    return text


def sd_line(value: Any) -> str:
    """Guard for a systemd value that fills the rest of a line (Description=, OnCalendar=)."""
    text = _scalar(value, "systemd")
    if _SD_LINE_BAD.search(text) or text != text.strip():
        raise UnsafeValue("systemd", value, "newlines, control characters, % and \\ are not allowed")
    return text


@cache
def environment(kind: str, finalize: Callable[[Any], str]) -> jinja2.Environment:
    """The Jinja2 environment for ``templates/<kind>/`` with ``finalize`` guarding every value."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES / kind)),
        autoescape=False,  # not HTML: the guards above do the escaping job, by refusing
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=finalize,
    )
    env.filters.update(ngx=ngx, ipt=ipt, sd_arg=sd_arg, sd_line=sd_line)
    return env
