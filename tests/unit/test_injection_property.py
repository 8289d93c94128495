"""Property: hostile tenant input is either refused by validation or renders harmlessly.

Hypothesis feeds hostile strings (nginx directives, ``;``, braces, newlines, ``$``, quotes,
unicode confusables, NUL, bidi and zero-width characters) — and valid-looking ones, so the
render path is really taken — into the slug, a domain, the image and the backup schedule. For
every example either ``parse_tenant`` raises InvalidInput naming the field, or:

- the rendered nginx files pass the real ``nginx -t`` and have exactly the directive structure
  (names, nesting, argument counts) of a benign reference tenant: no directive the spec did not
  produce;
- the rendered iptables rules equal the reference's once the tenant's own names are abstracted:
  no argument beyond the expected ones;
- the rendered systemd units have the reference's keys and ExecStart argument count.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dn.config import PlanConfig, ScheduleConfig
from dn.errors import InvalidInput
from dn.models import TenantSpec, parse_host, parse_tenant
from dn.render.iptables import render_tenant_rules
from dn.render.nginx import parse_config, render_base, render_vhost
from dn.render.systemd import render_units
from tests.integration.test_nginx_render_real import nginx_t, self_signed, write_nginx_tree

pytestmark = [pytest.mark.nginx, pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")]

PLANS = {"standard": PlanConfig()}
ALLOWED = ["gcr.io/cloud-tagging-10302018/", "dn.local/", "registry.example"]
BASE = {
    "slug": "refslug",
    "domains": ["ref.example", "www.ref.example"],
    "image": "dn.local/sgtm-standin:1",
    "container_config": "aWQ9R1RNLVhYWFgmZW52PTE=",
    "subnet": "10.210.0.0/28",
    "backup_schedule": "*-*-* 02:30:00",
}
OTHER = parse_tenant({**BASE, "slug": "othertenant", "domains": ["other.example"], "subnet": "10.210.0.16/28"}, plans=PLANS)
CERT = self_signed(["cert.example"])
_dirs = itertools.count()

PAYLOADS = [
    ";", "; include /etc/shadow;", "}", "{", "} server { listen 8081; }", "\n", "\r\nreturn 200;", "$host",
    "${jndi:x}", '"', "'", "\\", "#", "\x00", "\t", " ", "\u2028", "\u0085", "\u037e",  # Greek question mark
    "\uff1b", "\uff5b", "\uff5d", "\uff04", "\u200b", "\u200d", "\u202e", "\ufeff", "\u00a0",
    "-j ACCEPT", "\n-A INPUT -j ACCEPT", "%n", "%h", "\nExecStartPre=/bin/sh", "*", "..", "xn--", "--",
    "ａｄｍｉｎ", "ADMIN", "localhost", "127.0.0.1", "[::1]", "a" * 70,
]
DANGEROUS = st.sampled_from(list(";{}$\"'\\#\n\r\t \x00%*-_.:/@=\u037e\uff1b\u200b\u202e\u2028"))

labels = st.text(alphabet=st.characters(categories=["Ll", "Lu", "Nd"]), min_size=1, max_size=12)
valid_slug = st.from_regex(r"[a-z][a-z0-9-]{1,30}[a-z0-9]", fullmatch=True)
valid_domain = st.builds(lambda a, b: f"{a}.{b}.example", labels, labels)
valid_image = st.from_regex(r"(dn\.local|registry\.example|gcr\.io/cloud-tagging-10302018)/[a-z0-9]{1,8}(/[a-z0-9]{1,8})?(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,10})?", fullmatch=True)
valid_schedule = st.sampled_from(["daily", "weekly", "*-*-* 02:30:00", "Mon..Fri *-*-* 0/6:15", "*-*-01 04:00", "Sat,Sun *-*-* 03:00"])


def hostile(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Valid values, payloads, and valid values with a payload or dangerous characters spliced in."""
    spliced = st.builds(lambda v, p, at: v[:at] + p + v[at:], valid, st.sampled_from(PAYLOADS) | st.text(DANGEROUS, min_size=1, max_size=4), st.integers(0, 40))
    return st.one_of(valid, st.sampled_from(PAYLOADS), spliced, st.text(min_size=0, max_size=30))


FIELDS = {
    "slug": hostile(valid_slug),
    "domain": hostile(valid_domain),
    "image": hostile(valid_image),
    "backup_schedule": hostile(valid_schedule),
}


def shape(directives) -> list:
    return [(d.name, len(d.args), shape(d.block) if d.block is not None else None) for d in directives]


def abstract_rules(t: TenantSpec) -> list[tuple[str, tuple[str, ...]]]:
    names = {t.chain_forward: "<F>", t.chain_input: "<I>", t.bridge: "<B>"}
    rs = render_tenant_rules(t, [t.bridge, OTHER.bridge])
    out = []
    for chain, rule in rs.rules:
        toks = tuple(names.get(tok, tok.replace(f"dn:{t.slug}:", "dn:<S>:")) for tok in rule)
        out.append((names.get(chain, chain), toks))
    for h in rs.hooks:
        out.append((h.chain, tuple(names.get(tok, tok) for tok in h.rule)))
    return out


def unit_shape(files: dict[str, str]) -> list:
    out = []
    for path in sorted(files, key=lambda p: p.rsplit("/", 1)[1].replace(p.rsplit("/", 1)[1].split(".")[0], "")):
        keys = [line.split("=", 1)[0] for line in files[path].splitlines() if line and not line.startswith("#")]
        execs = [len(line.split()) for line in files[path].splitlines() if line.startswith("ExecStart=")]
        out.append((path.rsplit(".", 1)[1], keys, execs))
    return sorted(out)


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="dn-injection-")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_hostile_input_is_refused_or_harmless(workdir, field, data):
    value = data.draw(FIELDS[field], label=field)
    spec = dict(BASE)
    if field == "domain":
        spec["domains"] = [value, "www.ref.example"]
    else:
        spec[field] = value
    try:
        t = parse_tenant(spec, plans=PLANS, allowed_registries=ALLOWED)
    except InvalidInput as e:
        expected_field = "domains" if field == "domain" else field
        assert e.field.startswith(expected_field), (e.field, str(e))
        assert e.rule
        event(f"{field}: refused")
        return
    event(f"{field}: rendered")

    ref = parse_tenant(BASE, plans=PLANS)
    root = workdir / str(next(_dirs))
    host = parse_host({"name": "eu1", "prefix": str(root), "admin_sources": ["192.0.2.10/32"]})

    # nginx: same structure as the reference, and the real nginx accepts it
    assert shape(parse_config(render_vhost(t, host))) == shape(parse_config(render_vhost(ref, host)))
    got_base = render_base(host, [t, OTHER])
    ref_base = render_base(host, [ref, OTHER])
    for path in ref_base:
        if path.endswith(".conf"):
            assert shape(parse_config(got_base[path])) == shape(parse_config(ref_base[path])), path
    write_nginx_tree(host, [t, OTHER], cert=CERT)
    r = nginx_t(host)
    assert r.returncode == 0, (value, r.stderr)
    shutil.rmtree(root, ignore_errors=True)

    # iptables: identical to the reference once the tenant's own names are abstracted
    assert abstract_rules(t) == abstract_rules(ref)

    # systemd: the same keys and argument counts as the reference
    assert unit_shape(render_units(host, [t], ScheduleConfig())) == unit_shape(render_units(host, [ref], ScheduleConfig()))
