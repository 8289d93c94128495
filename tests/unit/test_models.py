"""Tenant and host baseline specs: validation rules (data-driven), secrecy, derived names."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from dn.config import PlanConfig, ScheduleConfig, Settings, embedded_default
from dn.errors import ExitCode, InvalidInput
from dn.models import (
    RESERVED_SLUGS,
    HostBaseline,
    TenantSpec,
    allocate_subnet,
    check_image_allowed,
    check_oncalendar,
    check_tenant_set,
    normalize_domain,
    parse_host,
    parse_image,
    parse_tenant,
)

PLANS = {"standard": PlanConfig(), "pro": PlanConfig(rate_per_ip=50, rate_per_tenant=2000, burst_per_tenant=4000)}
ALLOWED = ["gcr.io/cloud-tagging-10302018/", "dn.local/"]
SECRET = "c2VjcmV0LWNvbnRhaW5lci1jb25maWctWFlaWlk="


def tenant_data(**over):
    data = {
        "slug": "acme",
        "domains": ["tags.acme.example"],
        "image": "dn.local/sgtm-standin:1",
        "container_config": SECRET,
        "subnet": "10.210.0.0/28",
    }
    data.update(over)
    return data


def tenant(**over) -> TenantSpec:
    return parse_tenant(tenant_data(**over), plans=PLANS, allowed_registries=ALLOWED)


def host(**over) -> HostBaseline:
    data = {"name": "eu1", "admin_sources": ["192.0.2.10/32"]}
    data.update(over)
    return parse_host(data)


def rejects(field: str, rule: str, **over) -> InvalidInput:
    with pytest.raises(InvalidInput) as ei:
        tenant(**over)
    e = ei.value
    assert e.field == field, (e.field, str(e))
    assert rule in e.rule, (rule, e.rule)
    assert e.exit_code == ExitCode.INVALID
    assert str(e).startswith(f"{field}: ")
    return e


# --------------------------------------------------------------------------- slug

@pytest.mark.parametrize("slug", ["acme", "a1b", "shop-eu-1", "x" + "y" * 30 + "z", "abc"])
def test_good_slugs(slug):
    assert tenant(slug=slug).slug == slug


@pytest.mark.parametrize(
    "slug, rule",
    [
        ("ab", "3-32 characters"),
        ("a" * 33, "3-32 characters"),
        ("Acme", "lower-case"),
        ("1acme", "start with a letter"),
        ("acme-", "end with a letter or digit"),
        ("ac me", "lower-case a-z"),
        ("acme;reload", "lower-case a-z"),
        ("ącme", "lower-case a-z"),
        ("", "3-32 characters"),
        ("a--b", "must not contain '--'"),
        ("admin", "reserved"),
        ("www", "reserved"),
        ("localhost", "reserved"),
        ("docker", "reserved"),
        ("platform", "reserved"),
        (123, "valid string"),
    ],
)
def test_bad_slugs(slug, rule):
    rejects("slug", rule, slug=slug)


def test_every_reserved_name_is_refused_and_would_otherwise_be_valid():
    import re

    for name in sorted(RESERVED_SLUGS):
        if re.fullmatch(r"[a-z][a-z0-9-]{1,30}[a-z0-9]", name):
            rejects("slug", "reserved", slug=name)


# --------------------------------------------------------------------------- domains

@pytest.mark.parametrize(
    "given, stored",
    [
        ("Tags.Acme.EXAMPLE", "tags.acme.example"),  # upper case is normalised
        ("Bücher.Example", "xn--bcher-kva.example"),  # IDN → A-label
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),  # A-label kept
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("ＥＸＡＭＰＬＥ.com", "example.com"),  # full-width letters map (UTS46)
        ("straße.de", "xn--strae-oqa.de"),  # nontransitional: ß is kept
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (".".join(["a" * 61] * 4) + ".de", ".".join(["a" * 61] * 4) + ".de"),  # 250 octets
        ("x1-y.example.co.uk", "x1-y.example.co.uk"),
    ],
)
def test_good_domains(given, stored):
    assert tenant(domains=[given]).domains == (stored,)


@pytest.mark.parametrize(
    "domain, rule",
    [
        ("example", "at least two labels"),
        ("example.com.", "must not end with a dot"),
        ("1.2.3.4", "not an IP address"),
        ("::1", "not an IP address"),
        ("[2001:db8::1]", "not an IP address"),
        ("10.0.0.300", "top-level label must not be numeric"),
        ("*.example.com", "wildcard domains need allow_wildcard"),
        ("a" * 64 + ".example", "at most 63"),
        (".".join(["a" * 62] * 4) + ".de", "at most 253"),
        ("exa mple.com", "whitespace"),
        ("example.com\nserver_name evil", "whitespace"),
        ("a.b\u200b.com", "invisible"),  # zero-width space would silently vanish under UTS46
        ("ex\x00ample.com", "control"),
        ("a;b.example", "not a valid hostname"),
        ("a{b}.example", "not a valid hostname"),
        ("$host.example", "not a valid hostname"),
        ("a_b.example", "not a valid hostname"),
        ("-a.example", "not a valid hostname"),
        ("a..example", "not a valid hostname"),
        ("ab--cd.example", "not a valid hostname"),
        ("xn--abc.example", "not a valid hostname"),  # not a decodable A-label
        ("", "must not be empty"),
    ],
)
def test_bad_domains(domain, rule):
    rejects("domains[0]", rule, domains=[domain])


def test_wildcard_allowed_with_flag_only_as_first_label():
    assert tenant(allow_wildcard=True, domains=["*.Acme.example"]).domains == ("*.acme.example",)
    rejects("domains[0]", "'*' is only allowed", allow_wildcard=True, domains=["a.*.acme.example"])
    rejects("domains[0]", "'*' is only allowed", allow_wildcard=True, domains=["*a.acme.example"])


@pytest.mark.parametrize(
    "domains, field, rule",
    [
        ([], "domains", "at least one domain"),
        ("acme.example", "domains", "must be a list"),
        (["a.example", "A.Example"], "domains[1]", "listed twice"),
        (["xn--bcher-kva.example", "bücher.example"], "domains[1]", "listed twice"),
        (["ok.example", "bad..example"], "domains[1]", "not a valid hostname"),
        ([f"d{i}.example" for i in range(51)], "domains", "at most 50"),
    ],
)
def test_domain_lists(domains, field, rule):
    rejects(field, rule, domains=domains)


def test_normalize_domain_direct():
    assert normalize_domain("Bücher.Example") == "xn--bcher-kva.example"
    with pytest.raises(ValueError, match="IP address"):
        normalize_domain("127.0.0.1")


# --------------------------------------------------------------------------- image

@pytest.mark.parametrize(
    "ref, registry, repository, tag, digest",
    [
        ("gcr.io/cloud-tagging-10302018/gtm-cloud-image:stable", "gcr.io", "cloud-tagging-10302018/gtm-cloud-image", "stable", None),
        ("dn.local/sgtm-standin:1", "dn.local", "sgtm-standin", "1", None),
        ("busybox", "docker.io", "library/busybox", None, None),
        ("localhost:5000/a/b_c.d__e@sha256:" + "a" * 64, "localhost:5000", "a/b_c.d__e", None, "sha256:" + "a" * 64),
        ("Registry.Example:443/x/y:v1.2-rc_3", "registry.example:443", "x/y", "v1.2-rc_3", None),
    ],
)
def test_good_images(ref, registry, repository, tag, digest):
    r = parse_image(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repository, tag, digest)
    assert parse_tenant(tenant_data(image=ref), plans=PLANS).image == ref


@pytest.mark.parametrize(
    "ref",
    [
        "gcr.io/Cloud/Image:1",  # upper case in the path
        "gcr.io/x:",  # empty tag
        "gcr.io/x:tag with space",
        "gcr.io/x@sha256:abc",  # digest too short
        "gcr.io/x;rm -rf /",
        "gcr.io//x",
        "-x/y",
        "gcr.io/x:" + "t" * 129,
        "gcr.io/x\n:1",
        "",
    ],
)
def test_bad_images(ref):
    rejects("image", "", image=ref)


@pytest.mark.parametrize(
    "ref, ok",
    [
        ("gcr.io/cloud-tagging-10302018/gtm-cloud-image:stable", True),
        ("dn.local/sgtm-standin:1", True),
        ("gcr.io/cloud-tagging-10302018evil/x:1", False),  # prefix entries end with '/'
        ("gcr.io/evil/gtm:1", False),
        ("busybox", False),  # docker.io/library/busybox
        ("docker.io/library/busybox", False),
    ],
)
def test_image_registry_allow_list(ref, ok):
    if ok:
        assert check_image_allowed(ref, ALLOWED).name.startswith(("gcr.io/cloud-tagging-10302018/", "dn.local/"))
    else:
        with pytest.raises(InvalidInput) as ei:
            check_image_allowed(ref, ALLOWED)
        assert ei.value.field == "image" and "not allowed" in ei.value.rule
        # parse_tenant applies the same list
        rejects("image", "not allowed", image=ref)


def test_registry_host_entry():
    assert check_image_allowed("registry.example:5000/x:1", ["registry.example:5000"]).registry == "registry.example:5000"


# --------------------------------------------------------------------------- container_config (a secret)

@pytest.mark.parametrize(
    "value, rule",
    [
        ("c2hvcnQ=", "16-4096 characters"),
        ("a" * 4097, "16-4096 characters"),
        ("aWQ9R1RNLVhYWFgm;ZW52PTE=", "must be base64"),
        ("aWQ9R1RNLVhYWFgm ZW52PTE=", "must be base64"),
        ("aWQ9R1RNLVhYWFgmZW52PTE===", "must be base64"),
        (12345678901234567890, "must be a string"),
    ],
)
def test_bad_container_config(value, rule):
    e = rejects("container_config", rule, container_config=value)
    assert str(value) not in str(e)


def test_container_config_never_shown():
    t = tenant()
    assert t.container_config.get_secret_value() == SECRET
    for text in (repr(t), str(t), str(t.model_dump()), t.model_dump_json(), repr(t.model_dump(mode="json"))):
        assert SECRET not in text
    # Nor in the error when another field is wrong, nor when the secret itself is wrong.
    with pytest.raises(InvalidInput) as ei:
        tenant(slug="Bad Slug")
    assert SECRET not in str(ei.value) and SECRET not in repr(ei.value.errors)
    bad = "TOPSECRET-" + SECRET + ";"
    with pytest.raises(InvalidInput) as ei:
        tenant(container_config=bad)
    assert "TOPSECRET" not in str(ei.value)


# --------------------------------------------------------------------------- schedules

GOOD_CALENDARS = [
    "daily",
    "weekly",
    "monthly",
    "*-*-* 02:30:00",
    "*-*-01 04:00:00",
    "Mon..Fri *-*-* 0/6:15",
    "Sat,Sun *-*-* 03:00",
    "Mon,Wed..Fri *-*-01..07 02:30:00",
    "*-02-29 01:00",
    "*-1,4,7,10-01 00:00",
    "*-*-* *:0/15:00",
]


@pytest.mark.parametrize("value", GOOD_CALENDARS)
def test_good_calendars(value):
    assert tenant(backup_schedule=value).backup_schedule == value


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("value", GOOD_CALENDARS)
def test_good_calendars_are_accepted_by_systemd(value):
    r = subprocess.run(["systemd-analyze", "calendar", value], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Next elapse" in r.stdout


@pytest.mark.parametrize(
    "value, rule",
    [
        ("2025-*-* 00:00", "the year must be '*'"),
        ("*-*-* 24:00", "hour: 24 is outside 0..23"),
        ("*-*-* 02:60", "minute: 60 is outside 0..59"),
        ("*-13-01 00:00", "month: 13 is outside 1..12"),
        ("*-02-30 00:00", "never run"),
        ("*-04-31 00:00", "never run"),
        ("*-*-* 02:30 UTC", "no time zone"),
        ("Funday *-*-* 00:00", "weekday"),
        ("bogus", "must be a shorthand"),
        ("*-*-* 02:30:00\nExecStart=/bin/sh", "must be at most 64 characters of letters"),
        ("*-*-* 02:30;reboot", "must be at most 64 characters of letters"),
        ("*-*-*  02:30", "single spaces"),
        ("*-*-* 5..3:00", "range"),
        ("*-*-0/2 00:00", "day"),
        ("minutely", "must be a shorthand"),
        ("", "must be at most 64 characters"),
    ],
)
def test_bad_calendars(value, rule):
    rejects("backup_schedule", rule, backup_schedule=value)


def test_default_settings_schedules_pass_the_strict_check():
    for value in ScheduleConfig().model_dump().values():
        assert check_oncalendar(value) == value


# --------------------------------------------------------------------------- other fields

@pytest.mark.parametrize(
    "over, field, rule",
    [
        ({"subnet": "10.210.0.1/28"}, "subnet", "host bits zero"),
        ({"subnet": "8.8.8.0/28"}, "subnet", "private"),
        ({"subnet": "10.210.0.0/16"}, "subnet", "prefix length"),
        ({"subnet": "10.210.0.0/30"}, "subnet", "prefix length"),
        ({"subnet": "banana"}, "subnet", "not an IPv4 network"),
        ({"status": "paused"}, "status", "active"),
        ({"preview": "perhaps"}, "preview", "boolean"),
        ({"surprise": 1}, "surprise", "unknown field"),
        ({"plan": "gold"}, "plan", "unknown plan 'gold'"),
        ({"limits": {"rate_per_ip": 1}}, "limits", "derived from the plan"),
    ],
)
def test_other_fields(over, field, rule):
    rejects(field, rule, **over)


def test_missing_fields_are_named():
    data = tenant_data()
    del data["image"]
    with pytest.raises(InvalidInput) as ei:
        parse_tenant(data, plans=PLANS)
    assert ei.value.field == "image" and ei.value.rule == "is required"


def test_several_errors_are_all_reported():
    with pytest.raises(InvalidInput) as ei:
        tenant(slug="Bad", domains=["1.2.3.4"], subnet="8.8.8.0/28")
    fields = [f for f, _ in ei.value.errors]
    assert fields == ["slug", "domains[0]", "subnet"]
    assert "domains[0]" in str(ei.value) and "subnet" in str(ei.value)


def test_host_view_leaves_the_secret_out():
    from dn.models import host_view_data

    t = tenant()
    data = host_view_data(t)
    assert "container_config" not in data and SECRET not in repr(data)
    view = parse_tenant(data, host_view=True)
    assert view.container_config is None and view.bridge == t.bridge and view.zones == t.zones
    # outside a host view the secret stays required
    with pytest.raises(InvalidInput) as ei:
        parse_tenant(data)
    assert ei.value.field == "container_config" and ei.value.rule == "is required"


def test_spec_is_frozen_and_plan_resolved():
    t = tenant(plan="pro")
    assert t.limits == PLANS["pro"]
    with pytest.raises(ValidationError):
        t.slug = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- derived names

def test_derived_names_follow_the_documented_scheme():
    t = tenant(slug="acme")
    h = hashlib.sha256(b"acme").hexdigest()[:12]
    assert t.bridge == "dnt" + h and len(t.bridge) <= 15
    assert t.chain_forward == "DN-T-" + h.upper() and len(t.chain_forward) <= 28
    assert t.chain_input == "DN-TI-" + h.upper() and len(t.chain_input) <= 28
    assert t.network == "dn-t-acme"
    assert (t.tagging_container, t.preview_container) == ("dn-acme-tagging", "dn-acme-preview")
    assert t.backup_unit == "dn-backup-acme"
    assert (t.volume_image, t.mapper_name, t.mount_path) == ("/var/lib/dn/volumes/acme.luks", "dn-acme", "/srv/dn/tenants/acme")
    assert (t.gateway, t.tagging_address, t.preview_address) == ("10.210.0.1", "10.210.0.2", "10.210.0.3")


def test_longest_slug_fits_every_name_limit():
    t = tenant(slug="a" * 32)
    assert len(t.bridge) == 15 and len(t.chain_input) <= 28 and len(t.mapper_name) <= 127


def test_zone_names_change_with_key_size_or_rate_and_only_then():
    a = tenant().zones
    assert a == tenant().zones  # deterministic
    assert a.req_ip_size == "1536k"  # 200 r/s × 60 s × 128 B, rounded up to 64 KiB
    assert a.conn_ip_size == "384k"  # 200 r/s × 15 s × 128 B
    assert a.req_tenant_size == "64k"
    # a different per-IP rate only: the per-IP zone is renamed, the others keep their names
    faster_ip = parse_tenant(tenant_data(), plans={"standard": PlanConfig(rate_per_ip=11)}).zones
    assert faster_ip.req_ip != a.req_ip
    assert (faster_ip.req_tenant, faster_ip.conn_ip) == (a.req_tenant, a.conn_ip)
    # a higher tenant rate changes sizes: every zone whose size or rate changed gets a new name
    pro = tenant(plan="pro").zones
    assert pro.req_ip_size == "15040k" and pro.req_ip != a.req_ip and pro.conn_ip != a.conn_ip
    assert pro.req_tenant != a.req_tenant
    # burst changes do not touch zones (burst is a limit_req parameter, not part of the zone)
    burst = parse_tenant(tenant_data(), plans={"standard": PlanConfig(burst_per_ip=99)}).zones
    assert burst == a


# --------------------------------------------------------------------------- across tenants

def test_tenant_set_rules():
    h = host()
    a = tenant(slug="alpha", domains=["a.example"], subnet="10.210.0.0/28")
    b = tenant(slug="bravo", domains=["b.example"], subnet="10.210.0.16/28")
    check_tenant_set([a, b], h)
    cases = [
        ([a, a], "slug", "listed twice"),
        ([a, tenant(slug="bravo", domains=["A.example"], subnet="10.210.0.16/28")], "domains", "claimed by tenants 'alpha' and 'bravo'"),
        ([a, tenant(slug="bravo", domains=["b.example"], subnet="10.210.0.0/29")], "subnet", "overlaps"),
        ([a, tenant(slug="bravo", domains=["b.example"], subnet="10.99.0.0/28")], "subnet", "outside the host's tenant pool"),
    ]
    for tenants, field, rule in cases:
        with pytest.raises(InvalidInput) as ei:
            check_tenant_set(tenants, h)
        assert ei.value.field == field and rule in ei.value.rule


def test_allocate_subnet():
    assert allocate_subnet("10.210.0.0/16", []) == "10.210.0.0/28"
    assert allocate_subnet("10.210.0.0/16", ["10.210.0.0/28", "10.210.0.32/27"]) == "10.210.0.16/28"
    with pytest.raises(InvalidInput) as ei:
        allocate_subnet("10.210.0.0/27", ["10.210.0.0/28", "10.210.0.16/28"])
    assert ei.value.field == "subnet" and "no free /28" in ei.value.rule


# --------------------------------------------------------------------------- host baseline

@pytest.mark.parametrize(
    "over, field, rule",
    [
        ({"admin_sources": []}, "host.admin_sources", "at least one admin source"),
        ({"admin_sources": ["0.0.0.0/0"]}, "host.admin_sources", "whole internet"),
        ({"admin_sources": ["::/0"]}, "host.admin_sources", "whole internet"),
        ({"admin_sources": ["10.0.0.0/8", "not-a-net"]}, "host.admin_sources", "[1]"),
        ({"public_ports": [80, 443, 8080]}, "host.public_ports", "exactly (80, 443)"),
        ({"hsts_max_age": 31536000}, "host.hsts_max_age", "greater than or equal to 63072000"),
        ({"tenant_host_services": ["tcp/22"]}, "host.tenant_host_services", "never reach SSH"),
        ({"tenant_host_services": ["icmp/1"]}, "host.tenant_host_services", "'tcp/PORT'"),
        ({"prefix": "relative/path"}, "host.prefix", "absolute path"),
        ({"cert_dir": "/etc/../root"}, "host.cert_dir", "without '..'"),
        ({"tenant_pool": "8.8.0.0/16"}, "host.tenant_pool", "private"),
        ({"extra": True}, "host.extra", "unknown field"),
    ],
)
def test_bad_host_baseline(over, field, rule):
    with pytest.raises(InvalidInput) as ei:
        host(**over)
    assert ei.value.field.startswith(field) and rule in str(ei.value)


def test_host_baseline_families_and_paths():
    h = host(admin_sources=["192.0.2.10", "2001:db8::/48"], prefix="/srv/dn-sandbox/eu1")
    assert h.admin_sources_v4 == ["192.0.2.10/32"] and h.admin_sources_v6 == ["2001:db8::/48"]
    assert h.public_ports == (80, 443)
    assert h.path("/etc/nginx/nginx.conf") == "/srv/dn-sandbox/eu1/etc/nginx/nginx.conf"
    assert host().path("/etc/nginx/nginx.conf") == "/etc/nginx/nginx.conf"


def test_host_baseline_from_embedded_default_settings(tmp_path: Path):
    settings = Settings.model_validate(embedded_default(tmp_path))
    h = HostBaseline.from_settings(settings)
    assert h.name == "sandbox-eu1" and h.admin_sources == ("10.231.1.1/32",)
    assert h.prefix == "/srv/dn-sandbox/eu1" and h.cert_dir == "/etc/dn/tls"


def test_core_modules_import_no_adapters():
    """dn.models and dn.render.* are the pure core: no CLI, console, SSH, database or Pulumi."""
    code = (
        "import sys, dn.models, dn.render, dn.render.nginx, dn.render.iptables, dn.render.systemd\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'typer', 'rich', 'paramiko', 'psycopg', 'pulumi'})\n"
        "print(','.join(bad))\n"
    )
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
