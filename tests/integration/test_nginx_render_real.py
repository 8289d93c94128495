"""Rendered configuration against the real tools.

nginx: ``nginx -t`` on the base config plus several vhosts (self-signed certificates made with
the cryptography package), and a live nginx in a scratch network namespace serving real TLS with
SNI, proxying to a stub upstream on the tenant addresses, answering 429 past the limits, and
reloading after a plan change. iptables: rendered rulesets loaded with the real
``iptables-restore --noflush`` in a scratch namespace, read back with ``iptables-save`` and
compared; applied twice (hooks stay single); one tenant removed.

The helpers here (``write_nginx_tree``, ``netns``) are also used by the injection property test
and the render benchmark.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dn.config import PlanConfig
from dn.models import HostBaseline, TenantSpec, parse_host, parse_tenant
from dn.render.iptables import (
    combined_restore_text,
    missing_chains,
    parse_save,
    render_baseline,
    render_tenant_rules,
    render_tenants,
)
from dn.render.nginx import cert_paths, check_argv, control_argv, render_all, runtime_dirs

HAVE_NGINX = shutil.which("nginx") is not None
IS_ROOT = os.geteuid() == 0
needs_nginx = pytest.mark.skipif(not HAVE_NGINX, reason="nginx not installed")
needs_netns = pytest.mark.skipif(not (IS_ROOT and shutil.which("ip") and shutil.which("iptables-restore")), reason="needs root, iproute2 and iptables")

PLANS = {
    "standard": PlanConfig(),
    "tiny": PlanConfig(rate_per_ip=1, burst_per_ip=2, rate_per_tenant=100, burst_per_tenant=100, conn_per_ip=10),
    "noburst": PlanConfig(burst_per_ip=0, burst_per_tenant=0),
}


# --------------------------------------------------------------------------- helpers


def self_signed(names: Sequence[str]) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``names`` (first is the CN), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_nginx_tree(host: HostBaseline, tenants: Sequence[TenantSpec], cert: tuple[bytes, bytes] | None = None) -> dict[str, str]:
    """Render and write the host's nginx files plus a certificate per tenant under the prefix.

    With ``cert`` every tenant gets the same certificate (fast, for many tenants); otherwise each
    gets its own for its domains.
    """
    for d in runtime_dirs(host):
        Path(d).mkdir(parents=True, exist_ok=True)
    files = render_all(host, tenants)
    for path, text in files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    for t in tenants:
        crt, key = cert_paths(host, t)
        pem, key_pem = cert or self_signed(list(t.domains))
        Path(crt).write_bytes(pem)
        Path(key).write_bytes(key_pem)
        os.chmod(key, 0o600)
    return files


def nginx_t(host: HostBaseline) -> subprocess.CompletedProcess:
    return subprocess.run(check_argv(host), capture_output=True, text=True, timeout=300)


_ns_counter = itertools.count()


@contextlib.contextmanager
def netns(tag: str = "render") -> Iterator[str]:
    """A scratch network namespace with loopback up, deleted afterwards."""
    name = f"dn-test-{tag}-{os.getpid()}-{next(_ns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_ns(ns: str, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, check=check, timeout=300)


def tenant(slug: str, i: int, **over) -> TenantSpec:
    data = {
        "slug": slug,
        "domains": [f"{slug}.example", f"www.{slug}.example"],
        "image": "dn.local/sgtm-standin:1",
        "container_config": "aWQ9R1RNLVhYWFgmZW52PTE=",
        "subnet": f"10.210.{i}.0/28",
    }
    data.update(over)
    return parse_tenant(data, plans=PLANS)


def mixed_tenants() -> list[TenantSpec]:
    return [
        tenant("alpha", 0),
        tenant("bravo", 1, domains=["Bücher.example", "例え.テスト"], preview=False),
        tenant("charlie", 2, domains=["*.charlie.example", "charlie.example"], allow_wildcard=True, plan="tiny"),
        tenant("delta", 3, status="suspended"),
        tenant("echo", 4, plan="noburst"),
    ]


def host_at(root: Path, **over) -> HostBaseline:
    data = {"name": "eu1", "prefix": str(root), "admin_sources": ["192.0.2.10/32", "2001:db8::/48"]}
    data.update(over)
    return parse_host(data)


# --------------------------------------------------------------------------- nginx -t


@pytest.mark.nginx
@needs_nginx
def test_nginx_accepts_base_and_vhosts(tmp_path):
    host = host_at(tmp_path)
    files = write_nginx_tree(host, mixed_tenants())
    assert len(files) == 2 + 5
    r = nginx_t(host)
    assert r.returncode == 0, r.stderr


@pytest.mark.nginx
@needs_nginx
def test_nginx_t_catches_a_broken_tree(tmp_path):
    """The check above can fail: a missing certificate and a zone clash are both refused."""
    host = host_at(tmp_path)
    ts = mixed_tenants()
    write_nginx_tree(host, ts)
    os.unlink(cert_paths(host, ts[0])[1])
    r = nginx_t(host)
    assert r.returncode != 0 and "alpha.example.key" in r.stderr
    write_nginx_tree(host, ts)
    vhosts = tmp_path / "etc/nginx/dn/vhosts"
    (vhosts / "copy.conf").write_text((vhosts / "alpha.conf").read_text())  # the same zones declared twice
    r = nginx_t(host)
    assert r.returncode != 0 and "is already bound" in r.stderr


# --------------------------------------------------------------------------- live nginx in a scratch netns

UPSTREAM = r"""
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"path": self.path, "who": sys.argv[2], "headers": dict(self.headers)}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer((sys.argv[1], 8080), H).serve_forever()
"""


def curl(ns: str, *args: str) -> tuple[int, str, str]:
    """(status or 0 on failure, headers, body) of one request made from inside ``ns``."""
    r = in_ns(ns, ["curl", "-sS", "-k", "--max-time", "5", "-D", "-", *args], check=False)
    if r.returncode != 0:
        return 0, r.stderr, ""
    head, _, body = r.stdout.partition("\n\n")  # text mode: CRLF already became LF
    status = int(head.split()[1])
    return status, head, body


@pytest.mark.nginx
@pytest.mark.netns
@needs_nginx
@needs_netns
def test_live_nginx_serves_rendered_tenants(tmp_path):
    import json

    host = host_at(tmp_path)
    ts = mixed_tenants()
    alpha, charlie = ts[0], ts[2]
    write_nginx_tree(host, ts)
    with netns("nginx") as ns:
        upstreams = []
        try:
            for t in (alpha, charlie):
                for addr, who in ((t.tagging_address, "tagging"), (t.preview_address, "preview")):
                    in_ns(ns, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])
                    upstreams.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", UPSTREAM, addr, f"{t.slug}-{who}"]))
            in_ns(ns, control_argv(host))
            deadline = time.monotonic() + 10
            while curl(ns, "--resolve", "alpha.example:443:127.0.0.1", "https://alpha.example/healthz")[0] != 200:
                assert time.monotonic() < deadline, "nginx or the stub upstream did not come up"
                time.sleep(0.2)

            resolve = ["--resolve", "alpha.example:443:127.0.0.1", "--resolve", "alpha.example:80:127.0.0.1"]
            # HTTPS with SNI reaches the tagging upstream with X-Forwarded-* set by nginx
            status, head, body = curl(ns, *resolve, "-H", "X-Forwarded-For: 6.6.6.6", "https://alpha.example/g/collect?uid=secret-uid-123")
            assert status == 200
            got = json.loads(body)
            assert got["who"] == "alpha-tagging" and got["path"] == "/g/collect?uid=secret-uid-123"
            assert got["headers"]["X-Forwarded-For"] == "127.0.0.1"  # the client's claim is replaced
            assert got["headers"]["X-Forwarded-Proto"] == "https" and got["headers"]["Host"] == "alpha.example"
            assert "strict-transport-security: max-age=63072000; includesubdomains" in head.lower()
            # the preview route strips its prefix and still sends HSTS
            status, head, body = curl(ns, *resolve, "https://alpha.example/_dn/preview/gtm/debug")
            assert status == 200 and json.loads(body)["who"] == "alpha-preview" and json.loads(body)["path"] == "/gtm/debug"
            assert "strict-transport-security: max-age=63072000" in head.lower() and "x-robots-tag" in head.lower()
            # port 80 redirects known names, closes on unknown ones
            status, head, _ = curl(ns, *resolve, "http://alpha.example/x?y=1")
            assert status == 301 and "location: https://alpha.example/x?y=1" in head.lower()
            assert curl(ns, "--resolve", "unknown.example:80:127.0.0.1", "http://unknown.example/")[0] == 0
            # unknown SNI: no handshake, so no certificate is shown
            status, err, _ = curl(ns, "--resolve", "unknown.example:443:127.0.0.1", "https://unknown.example/")
            assert status == 0 and ("alert" in err.lower() or "handshake" in err.lower() or "ssl" in err.lower()), err
            # the TLS versions: 1.1 is refused, 1.2 and 1.3 work
            assert curl(ns, *resolve, "--tls-max", "1.1", "https://alpha.example/")[0] == 0
            assert curl(ns, *resolve, "--tlsv1.2", "--tls-max", "1.2", "https://alpha.example/")[0] == 200
            assert curl(ns, *resolve, "--tlsv1.3", "https://alpha.example/")[0] == 200
            # IDN vhost: served under its A-label; suspended tenant: 503
            assert curl(ns, "--resolve", "xn--bcher-kva.example:443:127.0.0.1", "https://xn--bcher-kva.example/")[0] == 502  # no upstream here
            assert curl(ns, "--resolve", "delta.example:443:127.0.0.1", "https://delta.example/")[0] == 503
            # per-IP limit of the tiny plan: 1 r/s with burst 2 → the 4th immediate request gets 429
            codes = [curl(ns, "--resolve", "a.charlie.example:443:127.0.0.1", "https://a.charlie.example/")[0] for _ in range(6)]
            assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes

            # the access log holds no client address and no query string
            log = (tmp_path / "var/log/nginx/dn-access.log").read_text()
            assert "alpha.example" in log and "/g/collect" in log
            assert "127.0.0.1" not in log and "secret-uid-123" not in log and "6.6.6.6" not in log and "curl" not in log
            err = (tmp_path / "var/log/nginx/error.log").read_text()
            # upstream failures (bravo has no upstream) and limit refusals happened: none logged
            assert "127.0.0.1" not in err and "secret-uid" not in err and "[error]" not in err

            # a plan change renames the zones; the live reload is accepted
            ts2 = [*ts[:2], tenant("charlie", 2, domains=["*.charlie.example", "charlie.example"], allow_wildcard=True), *ts[3:]]
            assert ts2[2].zones.req_ip != charlie.zones.req_ip
            write_nginx_tree(host, ts2)
            assert nginx_t(host).returncode == 0
            in_ns(ns, control_argv(host, "reload"))
            time.sleep(1.0)
            codes = [curl(ns, "--resolve", "a.charlie.example:443:127.0.0.1", "https://a.charlie.example/")[0] for _ in range(6)]
            assert codes == [200] * 6, codes  # the standard plan's burst of 20
            assert "[emerg]" not in (tmp_path / "var/log/nginx/error.log").read_text()
        finally:
            in_ns(ns, control_argv(host, "quit"), check=False)
            for p in upstreams:
                p.terminate()
            for p in upstreams:
                p.wait(timeout=10)


# --------------------------------------------------------------------------- iptables in a scratch netns


def save(ns: str, family: int):
    return parse_save(in_ns(ns, ["iptables-save" if family == 4 else "ip6tables-save"]).stdout)


def restore(ns: str, family: int, text: str) -> None:
    in_ns(ns, ["iptables-restore" if family == 4 else "ip6tables-restore", "--noflush"], stdin=text)


@pytest.mark.netns
@needs_netns
def test_iptables_rules_load_and_read_back_identically():
    host = parse_host({"name": "eu1", "admin_sources": ["192.0.2.10", "198.51.100.0/24", "2001:db8::/48"], "tenant_host_services": ["udp/53"]})
    ts = [tenant(s, i) for i, s in enumerate(["alpha", "bravo", "charlie"])]
    with netns("ipt") as ns:
        base = render_baseline(host)
        tenant_sets = render_tenants(ts, host)
        for attempt in range(2):  # the second apply must change nothing
            current4 = save(ns, 4)
            text4 = combined_restore_text([base[4], *tenant_sets], current4)
            assert missing_chains(text4, current4) == {}
            in_ns(ns, ["iptables-restore", "--noflush", "--test"], stdin=text4)
            restore(ns, 4, text4)
            restore(ns, 6, base[6].restore_text(save(ns, 6)))
            now4, now6 = save(ns, 4), save(ns, 6)
            for rs in (base[4], *tenant_sets):
                assert rs.drift(now4) == [], (attempt, rs.chains)
                for chain, rules in rs.expected().items():
                    assert now4["filter"].chain(chain) == rules  # canonical form: byte-for-byte equal
            assert base[6].drift(now6) == []
            assert now4["filter"].chain("INPUT") == [("-j", "DN-INPUT")]
            assert now4["filter"].chain("DOCKER-USER") == [("-j", "DN-TENANTS-FWD")]
            assert len(now4["filter"].chain("DN-TENANTS-FWD")) == 4  # three tenants' hooks, then the default drop
            assert now4["filter"].policies["INPUT"] == "DROP" and now6["filter"].policies["INPUT"] == "DROP"

        # a tenant's own re-apply never touches the others' hooks
        restore(ns, 4, tenant_sets[1].restore_text(save(ns, 4)))
        assert all(rs.drift(save(ns, 4)) == [] for rs in tenant_sets)

        # removing one tenant leaves the rest in place
        restore(ns, 4, tenant_sets[0].removal_text(save(ns, 4)))
        after = save(ns, 4)
        assert ts[0].chain_forward not in after["filter"].policies and ts[0].chain_input not in after["filter"].policies
        assert len(after["filter"].chain("DN-TENANTS-FWD")) == 3
        assert all(rs.drift(after) == [] for rs in (base[4], *tenant_sets[1:]))


@pytest.mark.netns
@needs_netns
def test_missing_chain_is_caught_before_apply():
    """iptables-nft-restore --test accepts a jump to a missing chain; missing_chains does not."""
    t = tenant("alpha", 0)
    rs = render_tenant_rules(t, [t.bridge])
    with netns("ipt") as ns:
        text = rs.restore_text(save(ns, 4))
        # drop the declarations of the shared chains, as a careless hand-written file would
        broken = "\n".join(line for line in text.splitlines() if not line.startswith(":DN-TENANTS-")) + "\n"
        assert missing_chains(broken, save(ns, 4)) == {"filter": {"DN-TENANTS-FWD", "DN-TENANTS-IN"}}
        tested = in_ns(ns, ["iptables-restore", "--noflush", "--test"], stdin=broken, check=False)
        applied = in_ns(ns, ["iptables-restore", "--noflush"], stdin=broken, check=False)
        assert applied.returncode != 0  # the real apply fails ...
        if tested.returncode == 0:  # ... which the nft backend's --test does not predict
            assert "nf_tables" in in_ns(ns, ["iptables", "-V"]).stdout
        assert save(ns, 4).get("filter") is None or t.chain_forward not in save(ns, 4)["filter"].policies  # nothing half-applied
        restore(ns, 4, text)
        assert rs.drift(save(ns, 4)) == []
