"""nginx renderer: structure of the main config, zones and vhosts (parsed, not grepped)."""
from __future__ import annotations

import re

import pytest

from dn.config import PlanConfig
from dn.errors import InvalidInput
from dn.models import TenantSpec, parse_host, parse_tenant
from dn.render import UnsafeValue
from dn.render.nginx import (
    MOZILLA_INTERMEDIATE_CIPHERS,
    Directive,
    cert_paths,
    parse_config,
    render_all,
    render_base,
    render_vhost,
    vhost_path,
)

PLANS = {"standard": PlanConfig(), "small": PlanConfig(rate_per_ip=2, burst_per_ip=3, rate_per_tenant=20, burst_per_tenant=30, conn_per_ip=4)}
SECRET = "aWQ9R1RNLVhYWFgmZW52PTEmYXV0aD14eXo="


def tenant(slug="acme", **over) -> TenantSpec:
    data = {
        "slug": slug,
        "domains": [f"{slug}.example", f"www.{slug}.example"],
        "image": "dn.local/sgtm-standin:1",
        "container_config": SECRET,
        "subnet": "10.210.0.0/28",
    }
    data.update(over)
    return parse_tenant(data, plans=PLANS)


HOST = parse_host({"name": "eu1", "admin_sources": ["192.0.2.10/32"], "prefix": "/srv/dn-sandbox/eu1"})


def walk(directives, path=()):
    for d in directives:
        yield path, d
        if d.block is not None:
            yield from walk(d.block, path + (d,))


def one(directives, name) -> Directive:
    found = [d for d in directives if d.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


def servers(conf) -> list[Directive]:
    return [d for d in conf if d.name == "server"]


def base_conf(tenants=()):
    files = render_base(HOST, list(tenants))
    return files, parse_config(files["/srv/dn-sandbox/eu1/etc/nginx/nginx.conf"])


# --------------------------------------------------------------------------- main config

def test_base_files_live_under_the_host_prefix():
    files, _ = base_conf([tenant()])
    assert sorted(files) == [
        "/srv/dn-sandbox/eu1/etc/nginx/dn/ffdhe2048.pem",
        "/srv/dn-sandbox/eu1/etc/nginx/nginx.conf",
    ]
    # the main config does not depend on the tenant list
    assert files == render_base(HOST, [])
    assert files["/srv/dn-sandbox/eu1/etc/nginx/dn/ffdhe2048.pem"].startswith("-----BEGIN DH PARAMETERS-----")


def test_tls_settings_are_mozilla_intermediate():
    _, conf = base_conf()
    http = one(conf, "http").block
    assert one(http, "ssl_protocols").args == ("TLSv1.2", "TLSv1.3")
    assert one(http, "ssl_ciphers").args == (MOZILLA_INTERMEDIATE_CIPHERS,)
    for suite in MOZILLA_INTERMEDIATE_CIPHERS.split(":"):  # forward secret and AEAD only
        assert suite.startswith(("ECDHE-", "DHE-")) and ("-GCM-" in suite or suite.endswith("CHACHA20-POLY1305")), suite
    assert one(http, "ssl_prefer_server_ciphers").args == ("off",)
    assert one(http, "ssl_session_tickets").args == ("off",)
    assert one(http, "ssl_session_timeout").args == ("1d",)
    assert one(http, "ssl_dhparam").args == ("/srv/dn-sandbox/eu1/etc/nginx/dn/ffdhe2048.pem",)
    assert one(http, "server_tokens").args == ("off",)


def test_limits_answer_429():
    _, conf = base_conf()
    http = one(conf, "http").block
    assert one(http, "limit_req_status").args == ("429",)
    assert one(http, "limit_conn_status").args == ("429",)


def test_default_servers_refuse_unknown_names():
    _, conf = base_conf()
    plain, tls = servers(one(conf, "http").block)
    assert ("80", "default_server") in [d.args for d in plain.find("listen")]
    assert one(plain.block, "return").args == ("444",)
    assert ("443", "ssl", "http2", "default_server") in [d.args for d in tls.find("listen")]
    assert one(tls.block, "ssl_reject_handshake").args == ("on",)
    assert not tls.find("ssl_certificate")


def test_ipv6_listens_follow_the_host_flag():
    _, conf = base_conf()
    listens = [d.args[0] for _, d in walk(conf) if d.name == "listen"]
    assert "[::]:80" in listens and "[::]:443" in listens
    h4 = parse_host({"name": "eu1", "admin_sources": ["192.0.2.10/32"], "ipv6": False})
    conf4 = parse_config(render_base(h4, [])["/etc/nginx/nginx.conf"])
    vhost4 = parse_config(render_vhost(tenant(), h4))
    assert not [d for _, d in walk(conf4 + vhost4) if d.name == "listen" and d.args[0].startswith("[::]")]


PII_VARIABLES = ("$remote_addr", "$binary_remote_addr", "$request ", "$request_uri", "$args", "$query_string",
                 "$arg_", "$http_", "$cookie_", "$remote_user", "$realip_remote_addr", "$proxy_add_x_forwarded_for")


def test_access_log_records_no_personal_data():
    _, conf = base_conf()
    http = one(conf, "http").block
    fmt = one(http, "log_format")
    assert fmt.args[0] == "dn_access" and fmt.args[1] == "escape=json"
    line = " ".join(fmt.args[2:]) + " "
    for var in PII_VARIABLES:
        assert var not in line, var
    assert "$uri" in line and "$status" in line and "$server_name" in line
    assert one(http, "access_log").args == ("/srv/dn-sandbox/eu1/var/log/nginx/dn-access.log", "dn_access")
    # request-level errors carry the client address and request line: the error log is crit-only
    assert one(conf, "error_log").args[1] == "crit"
    assert one(http, "limit_req_log_level").args == ("notice",)


def test_includes_the_vhost_dir_inside_http():
    _, conf = base_conf()
    includes = [d.args for d in one(conf, "http").find("include")]
    assert includes == [("/srv/dn-sandbox/eu1/etc/nginx/dn/vhosts/*.conf",)]


# --------------------------------------------------------------------------- zones

def test_each_vhost_defines_its_own_zones():
    ts = [tenant("alpha", subnet="10.210.0.0/28"), tenant("bravo", subnet="10.210.0.16/28", plan="small")]
    files = render_all(HOST, ts)
    zones = [d for t in ts for d in parse_config(files[vhost_path(HOST, t)]) if d.block is None]
    req = [d for d in zones if d.name == "limit_req_zone"]
    conn = [d for d in zones if d.name == "limit_conn_zone"]
    assert len(zones) == 6  # zones only, at http level; everything else is in server blocks
    assert len(req) == 4 and len(conn) == 2
    names = [a.split("=")[1].split(":")[0] for d in req + conn for a in d.args if a.startswith("zone=")]
    assert len(set(names)) == 6
    for t in ts:
        z = t.zones
        by_zone = {a.split("=")[1]: d for d in req + conn for a in d.args if a.startswith("zone=")}
        ip = by_zone[f"{z.req_ip}:{z.req_ip_size}"]
        assert ip.args[0] == "$binary_remote_addr" and f"rate={t.limits.rate_per_ip}r/s" in ip.args
        per_tenant = by_zone[f"{z.req_tenant}:{z.req_tenant_size}"]
        # keyed on a constant: one state for the whole tenant; never a client-controlled $host
        assert per_tenant.args[0] == f"dn-tenant-{t.slug}" and "$" not in per_tenant.args[0]
        assert f"rate={t.limits.rate_per_tenant}r/s" in per_tenant.args
        assert by_zone[f"{z.conn_ip}:{z.conn_ip_size}"].args[0] == "$binary_remote_addr"
    assert "small" in [t.plan for t in ts] and ts[1].zones.req_ip_size == "192k"  # 20 × 60 × 128 B → 150 KiB → 192k


def test_base_refuses_conflicting_tenants():
    with pytest.raises(InvalidInput) as ei:
        render_base(HOST, [tenant("alpha"), tenant("bravo", domains=["alpha.example"], subnet="10.210.0.16/28")])
    assert ei.value.field == "domains" and "claimed by tenants" in ei.value.rule


# --------------------------------------------------------------------------- vhost

def vhost(t: TenantSpec):
    conf = parse_config(render_vhost(t, HOST))
    plain, tls = servers(conf)
    return plain, tls


def test_port_80_redirects_to_https_and_serves_acme():
    plain, _ = vhost(tenant())
    assert one(plain.block, "server_name").args == ("acme.example", "www.acme.example")
    locs = {d.args: d for d in plain.find("location")}
    assert one(locs[("/",)].block, "return").args == ("301", "https://$host$request_uri")
    assert one(locs[("^~", "/.well-known/acme-challenge/")].block, "root").args == ("/srv/dn-sandbox/eu1/var/lib/dn/acme",)


def test_tls_server_certificate_and_hsts():
    t = tenant()
    _, tls = vhost(t)
    assert ("443", "ssl", "http2") in [d.args for d in tls.find("listen")]
    assert one(tls.block, "ssl_certificate").args == ("/srv/dn-sandbox/eu1/etc/dn/tls/acme.example.crt",)
    assert one(tls.block, "ssl_certificate_key").args == ("/srv/dn-sandbox/eu1/etc/dn/tls/acme.example.key",)
    assert cert_paths(HOST, t) == ("/srv/dn-sandbox/eu1/etc/dn/tls/acme.example.crt", "/srv/dn-sandbox/eu1/etc/dn/tls/acme.example.key")


def _hsts_ok(block) -> bool:
    for d in block:
        if d.name == "add_header" and d.args[0] == "Strict-Transport-Security":
            m = re.fullmatch(r"max-age=(\d+); includeSubDomains", d.args[1])
            return bool(m) and int(m.group(1)) >= 63072000 and d.args[2:] == ("always",)
    return False


@pytest.mark.parametrize("preview", [True, False])
def test_hsts_is_in_every_block_that_sets_headers(preview):
    _, tls = vhost(tenant(preview=preview))
    assert _hsts_ok(tls.block)
    # nginx drops inherited add_header in a block with its own: each such block repeats HSTS
    with_headers = [d for _, d in walk(tls.block) if d.block is not None and d.find("add_header")]
    assert len(with_headers) == (1 if preview else 0)
    for d in with_headers:
        assert _hsts_ok(d.block), d


def test_rate_limits_follow_the_plan():
    t = tenant(plan="small")
    _, tls = vhost(t)
    z = t.zones
    assert sorted(d.args for d in tls.find("limit_req")) == sorted(
        [(f"zone={z.req_ip}", "burst=3", "nodelay"), (f"zone={z.req_tenant}", "burst=30", "nodelay")]
    )
    assert one(tls.block, "limit_conn").args == (z.conn_ip, "4")
    assert one(tls.block, "client_max_body_size").args == ("1m",)


def test_proxying_to_the_tenant_network():
    t = tenant(subnet="10.210.3.16/28")
    _, tls = vhost(t)
    headers = {d.args[0]: d.args[1] for d in tls.find("proxy_set_header")}
    assert headers["X-Forwarded-For"] == "$remote_addr"  # never trust a client-sent chain
    assert headers["X-Forwarded-Proto"] == "$scheme" and headers["Host"] == "$host"
    locs = {d.args: d for d in tls.find("location")}
    assert one(locs[("/",)].block, "proxy_pass").args == ("http://10.210.3.18:8080",)
    assert one(locs[("^~", "/_dn/preview/")].block, "proxy_pass").args == ("http://10.210.3.19:8080/",)
    # no location sets its own proxy_set_header (it would drop the server's X-Forwarded-*)
    assert not [d for _, d in walk(tls.block) if d.block is not None and d.find("proxy_set_header")]


def test_preview_off_has_no_preview_route():
    _, tls = vhost(tenant(preview=False))
    assert [d.args for d in tls.find("location")] == [("/",)]


@pytest.mark.parametrize("status", ["suspended", "deleting"])
def test_inactive_tenants_get_503_and_no_upstream(status):
    _, tls = vhost(tenant(status=status))
    assert not [d for _, d in walk(tls.block) if d.name == "proxy_pass"]
    assert one(one(tls.block, "location").block, "return").args == ("503",)
    assert _hsts_ok(tls.block)  # the limits and HSTS still apply
    assert tls.find("limit_req")


def test_idn_and_wildcard_names():
    t = tenant(domains=["*.Bücher.example", "bücher.example"], allow_wildcard=True)
    plain, tls = vhost(t)
    assert one(tls.block, "server_name").args == ("*.xn--bcher-kva.example", "xn--bcher-kva.example")
    assert one(tls.block, "ssl_certificate").args[0].endswith("/_wildcard.xn--bcher-kva.example.crt")


def test_render_all_keys():
    ts = [tenant("alpha", subnet="10.210.0.0/28"), tenant("bravo", subnet="10.210.0.16/28")]
    files = render_all(HOST, ts)
    assert vhost_path(HOST, ts[1]) == "/srv/dn-sandbox/eu1/etc/nginx/dn/vhosts/bravo.conf"
    assert {vhost_path(HOST, t) for t in ts} <= set(files) and len(files) == 4


def test_secret_never_reaches_nginx():
    files = render_all(HOST, [tenant()])
    assert not [p for p, text in files.items() if SECRET in text]


# --------------------------------------------------------------------------- the guard (defence in depth)

HOSTILE = [
    "evil.example;include /etc/shadow",
    "evil.example }server{",
    "evil.example\nreturn 200",
    "$host",
    "evil.example#",
    'evil"example',
    "evil'example",
    "evil\\example",
    "evil.exa\x00mple",
    "évil.example",
    "evil .example",
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_unvalidated_values_are_refused_by_the_filter(bad):
    good = tenant()
    # model_construct skips validation: this is what a bug upstream of the renderer would look like
    forged = TenantSpec.model_construct(**{**dict(good), "domains": (bad,)})
    with pytest.raises(UnsafeValue) as ei:
        render_vhost(forged, HOST)
    assert "refused by the nginx renderer" in str(ei.value)
    forged_slug = TenantSpec.model_construct(**{**dict(good), "slug": bad})
    with pytest.raises(UnsafeValue):
        render_vhost(forged_slug, HOST)


def test_filter_accepts_ordinary_tokens():
    from dn.render import ngx

    for ok in ("acme.example", "10.210.0.2", "zone=dn_acme_ip_0a1b2c3d", "/srv/x-y/z.conf", 8080):
        assert ngx(ok) == str(ok)
    for bad in (True, None, "", 1.5):
        with pytest.raises(UnsafeValue):
            ngx(bad)


def test_server_names_hash_fits_long_and_many_names():
    from dn.render.nginx import NAMES_HASH_BUCKET, NAMES_HASH_MAX, server_names_hash_sizes

    assert server_names_hash_sizes([]) == (1024, 128)
    long_name = ".".join(["a" * 61] * 4) + ".de"  # 250 octets
    assert server_names_hash_sizes([tenant(domains=[long_name])])[1] == 512 <= NAMES_HASH_BUCKET
    many = [tenant(f"t{i:04d}", subnet="10.210.0.0/28") for i in range(600)]  # 1200 names
    assert server_names_hash_sizes(many)[0] == 8192 <= NAMES_HASH_MAX
    _, conf = base_conf()
    http = one(conf, "http").block
    assert one(http, "server_names_hash_bucket_size").args == (str(NAMES_HASH_BUCKET),)
    assert one(http, "server_names_hash_max_size").args == (str(NAMES_HASH_MAX),)


def test_zero_burst_renders_a_plain_limit():
    plans = {"standard": PlanConfig(burst_per_ip=0, burst_per_tenant=0)}
    t = parse_tenant({"slug": "acme", "domains": ["acme.example"], "image": "dn.local/x:1", "container_config": SECRET, "subnet": "10.210.0.0/28"}, plans=plans)
    _, tls = vhost(t)
    assert sorted(d.args for d in tls.find("limit_req")) == sorted([(f"zone={t.zones.req_ip}",), (f"zone={t.zones.req_tenant}",)])
