"""Reading nginx -T the way nginx.rate-limits, nginx.tls and nginx.hsts judge it."""
from __future__ import annotations

import pytest

from dn.config import PlanConfig
from dn.models import HostBaseline, parse_tenant
from dn.render import nginx as rn
from dn.verify import nginx as vn

HOST = HostBaseline(name="eu1", admin_sources=("10.0.0.1/32",), prefix="/srv/h")

PLANS = {"standard": PlanConfig()}


def _spec(slug, subnet, **over):
    return parse_tenant({"slug": slug, "domains": [f"{slug}.example", f"*.{slug}.example"], "allow_wildcard": True,
                         "image": "dn.local/x:1", "subnet": subnet, **over}, plans=PLANS, host_view=True)


A, B = _spec("acme", "10.210.0.0/28"), _spec("beta", "10.210.0.16/28")


def dump(files: dict[str, str]) -> str:
    """What nginx -T prints: every file it read, after a header line."""
    return "".join(f"# configuration file {p}:\n{body}\n" for p, body in files.items())


def rendered(**replace) -> dict[str, str]:
    files = {p: t for p, t in rn.render_all(HOST, [A, B]).items() if not p.endswith(".pem")}
    for path, (old, new) in replace.items():
        key = next(p for p in files if p.endswith(path))
        assert old in files[key]
        files[key] = files[key].replace(old, new)
    return files


def test_split_keeps_files_in_order():
    files = rendered()
    got = vn.split_dump(dump(files))
    assert list(got) == list(files) and got[HOST.path(rn.NGINX_CONF)].rstrip() == files[HOST.path(rn.NGINX_CONF)].rstrip()


def test_rendered_config_has_every_limit_and_only_tls_1_2_1_3():
    cfg = vn.load(dump(rendered()))
    fails, ev, zone_users = vn.rate_limit_findings(cfg)
    assert fails == []
    assert len(ev) == 4  # two proxying locations (tagging, preview) per tenant
    assert {z for z in zone_users} == {A.zones.req_tenant, B.zones.req_tenant}
    fails, ev = vn.tls_config_findings(cfg)
    assert fails == [] and ev == ["http: ssl_protocols TLSv1.2 TLSv1.3"]
    tls = [s for s in cfg.servers if s.tls and not s.default]
    assert sorted(s.sni() for s in tls) == ["acme.example", "beta.example"]
    assert vn.request_paths(tls[0]) == ["/", "/_dn/preview/"]


def test_missing_limits_are_named():
    files = rendered(**{"beta.conf": (f"    limit_req zone={B.zones.req_tenant}", "    #")})
    fails, _, _ = vn.rate_limit_findings(vn.load(dump(files)))
    assert len(fails) == 2 and all("beta.conf" in f and "per-tenant limit_req" in f for f in fails)
    files = rendered(**{"acme.conf": (f"    limit_conn {A.zones.conn_ip}", "    #")})
    fails, _, _ = vn.rate_limit_findings(vn.load(dump(files)))
    assert fails and all("a per-IP limit_conn" in f for f in fails)


def test_a_location_with_its_own_limit_loses_the_servers():
    # nginx inherits limit_req into a location only if the location defines none of its own
    files = rendered(**{"acme.conf": ("location / {\n", f"location / {{\n        limit_req zone={A.zones.req_ip};\n")})
    fails, _, _ = vn.rate_limit_findings(vn.load(dump(files)))
    assert fails == ["acme.conf: acme.example *.acme.example (TLS) location /: proxies without a per-tenant "
                     "limit_req (zone keyed on a per-tenant constant)"]


def test_a_shared_tenant_zone_is_not_per_tenant():
    files = rendered(**{"beta.conf": (f"limit_req zone={B.zones.req_tenant}", f"limit_req zone={A.zones.req_tenant}")})
    fails, _, _ = vn.rate_limit_findings(vn.load(dump(files)))
    assert any(f"per-tenant zone {A.zones.req_tenant} is shared by 2 vhost files" in f for f in fails)


@pytest.mark.parametrize("old, new, expect", [
    ("ssl_protocols TLSv1.2 TLSv1.3;", "ssl_protocols TLSv1.1 TLSv1.2 TLSv1.3;", "http: ssl_protocols TLSv1.1"),
    ("ssl_protocols TLSv1.2 TLSv1.3;", "", "no ssl_protocols (nginx's default enables TLSv1 and TLSv1.1)"),
])
def test_tls_config(old, new, expect):
    fails, _ = vn.tls_config_findings(vn.load(dump(rendered(**{"nginx.conf": (old, new)}))))
    assert fails and expect in fails[0]


def test_server_level_protocols_count_too():
    files = rendered(**{"acme.conf": ("    ssl_certificate ", "    ssl_protocols TLSv1 TLSv1.2;\n    ssl_certificate ")})
    fails, _ = vn.tls_config_findings(vn.load(dump(files)))
    assert fails == ["acme.conf: acme.example *.acme.example (TLS): ssl_protocols TLSv1 TLSv1.2 (must be exactly TLSv1.2 TLSv1.3)"]


@pytest.mark.parametrize("value, age", [
    ("max-age=63072000; includeSubDomains", 63072000),
    ('max-age="300"', 300),
    ("includeSubDomains; MAX-AGE = 15552000", 15552000),
    ("includeSubDomains", None),
])
def test_hsts_max_age(value, age):
    assert vn.hsts_max_age(value) == age


def test_wildcard_only_vhost_gets_a_probe_name():
    s = vn.Server("f", rn.Directive("server", (), (rn.Directive("server_name", ("*.shop.example",)),)))
    assert s.sni() == "dn-verify.shop.example"
    assert vn.Server("f", rn.Directive("server", (), (rn.Directive("server_name", ("_",)),))).default


def test_empty_dump_is_unknown():
    from dn.verify.core import Unknown

    with pytest.raises(Unknown):
        vn.load("nginx: configuration file /etc/nginx/nginx.conf test is successful\n")
