"""nginx base and vhosts applied over SSH to the sandbox EU host, checked from outside.

Every request goes from this (root) namespace to 10.231.1.2:443 with SNI, through the real nginx
of the sandbox, to stand-in sGTM containers on each tenant's Docker network (created with the
docker CLI over SSH, bridge named as dn names it, ICC off). Certificates are self-signed (made
with the cryptography package) and installed into the host's cert dir by the tests.

The module removes its vhosts, containers and certificates afterwards; dn's base config stays
(it is what ``dn host up`` puts on the host, and other sessions may serve vhosts on it).

Helpers here (``Tenants``, ``https``, ``kill_session`` ...) are also used by test_host_faults.py
and bench/ratelimit.py.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from dn import ssh
from dn.config import PlanConfig
from dn.host import nginx as hn
from dn.models import HostBaseline, TenantSpec, parse_tenant
from dn.render import nginx as rn
from dn.sandbox import IMAGE
from tests.integration.test_nginx_render_real import self_signed

EU1 = "10.231.1.2"
PLANS = {
    "standard": PlanConfig(),
    "flood": PlanConfig(rate_per_ip=5, burst_per_ip=0, rate_per_tenant=1000, burst_per_tenant=100, conn_per_ip=50),
}

pytestmark = pytest.mark.sandbox


# --------------------------------------------------------------------------- helpers


def tenant(slug: str, subnet: str, *, domains: Sequence[str] | None = None, **over) -> TenantSpec:
    data = {"slug": slug, "domains": list(domains or [f"{slug}.example", f"www.{slug}.example"]),
            "image": IMAGE, "subnet": subnet, **over}
    return parse_tenant(data, plans=PLANS, host_view=True)


def sandbox_host(sandbox, **over) -> HostBaseline:
    return HostBaseline.from_settings(sandbox.settings, **over)


class SNIConnection(http.client.HTTPSConnection):
    """HTTPS to the sandbox host's address with ``domain`` as SNI and Host header."""

    def __init__(self, domain: str, context: ssl.SSLContext, timeout: float = 10, address: str = EU1,
                 source: str | None = None):
        super().__init__(domain, 443, context=context, timeout=timeout)
        self._address = address
        self._source = source

    def connect(self) -> None:
        sock = socket.create_connection((self._address, 443), self.timeout,
                                        source_address=(self._source, 0) if self._source else None)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def client_context(cert_pem: bytes, *, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """Trusts exactly ``cert_pem`` and checks the host name; ``version`` pins the protocol."""
    ctx = ssl.create_default_context(cadata=cert_pem.decode())
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose: it must be refused
            ctx.minimum_version = ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it: the server must refuse
    return ctx


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    version: str = ""


def https(domain: str, path: str = "/", *, ctx: ssl.SSLContext, method: str = "GET", body: bytes | None = None,
          conn: SNIConnection | None = None) -> Reply:
    own = conn is None
    c = conn or SNIConnection(domain, ctx)
    try:
        c.request(method, path, body=body, headers={"Connection": "close" if own else "keep-alive"})
        version = c.sock.version() if c.sock else ""
        r = c.getresponse()
        data = r.read()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, data, version or "")
    finally:
        if own:
            c.close()


def hsts_ok(reply: Reply) -> bool:
    value = reply.headers.get("strict-transport-security", "")
    return value.startswith("max-age=") and int(value.split(";")[0].split("=")[1]) >= 63072000


def wait_until(predicate, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout:g}s")
        time.sleep(0.2)


def kill_session(sandbox, session: ssh.Session) -> None:
    """Drop ``session`` by killing its sshd processes on the host."""
    port = session._t.sock.getsockname()[1]
    pids = sandbox.sshd_pids_for(port)
    assert pids, "no sshd process found for this connection"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def master_and_workers(sandbox, host: HostBaseline) -> tuple[int, set[int]]:
    """The nginx master pid (from its pid file) and its serving workers, read from this side."""
    pid = int(open(rn.pid_path(host)).read().strip())
    procs = hn.parse_ps(sandbox.ns_exec(["ps", "-e", "-o", "pid=,ppid=,args="]).stdout.decode())
    assert hn.master_of(procs, pid) == pid
    return pid, hn.serving_workers(procs, pid)


@dataclass
class Tenants:
    """Stand-in containers and certificates for tenants on the sandbox host."""

    sandbox: object
    host: HostBaseline
    certs: dict[str, bytes] = field(default_factory=dict)  # slug -> certificate PEM
    made: list[TenantSpec] = field(default_factory=list)

    def add(self, t: TenantSpec, cert_names: Sequence[str] | None = None, *, preview: bool = True) -> TenantSpec:
        net = [
            "docker", "network", "create", "--driver", "bridge", "--subnet", t.subnet, "--gateway", t.gateway,
            "-o", f"com.docker.network.bridge.name={t.bridge}",
            "-o", "com.docker.network.bridge.enable_icc=false",
            "--label", f"dn.tenant={t.slug}", t.network,
        ]
        with ssh.connect(self.sandbox.host) as s:
            self._drop(s, t)
            s.run(net)
            s.run(["docker", "run", "-d", "--name", t.tagging_container, "--network", t.network,
                   "--ip", t.tagging_address, IMAGE])
            if preview:
                s.run(["docker", "run", "-d", "--name", t.preview_container, "--network", t.network,
                       "--ip", t.preview_address, "-e", "RUN_AS_PREVIEW_SERVER=true", IMAGE])
            pem, key = self_signed(list(cert_names or t.domains))
            crt_path, key_path = rn.cert_paths(self.host, t)
            s.mkdir_p(self.host.path(self.host.cert_dir))
            s.install_file(crt_path, pem, mode=0o644, keep_previous=False)
            s.install_file(key_path, key, mode=0o600, keep_previous=False)
        self.certs[t.slug] = pem
        self.made.append(t)
        return t

    @staticmethod
    def _drop(s: ssh.Session, t: TenantSpec) -> None:
        s.run(["docker", "rm", "-f", t.tagging_container, t.preview_container], check=False)
        s.run(["docker", "network", "rm", t.network], check=False)

    def ctx(self, t: TenantSpec, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        return client_context(self.certs[t.slug], version=version)

    def cleanup(self) -> None:
        with ssh.connect(self.sandbox.host) as s:
            for t in self.made:
                self._drop(s, t)
                for p in rn.cert_paths(self.host, t):
                    s.remove(p)


@dataclass
class Env:
    host: HostBaseline
    tenants: Tenants
    a: TenantSpec  # standard plan
    b: TenantSpec  # the "flood" plan: 5 r/s per client address, no burst


def served(t: TenantSpec, tenants: Tenants, path: str = "/healthz") -> bool:
    return https(t.domains[0], path, ctx=tenants.ctx(t)).status == 200


@pytest.fixture(scope="module")
def nginx_env(sandbox) -> Iterator[Env]:
    """dn's base config on the sandbox host (it stays: it is what ``dn host up`` puts there, and
    other test sessions may be serving their own vhosts on it), two tenants, and their removal."""
    host = sandbox_host(sandbox)
    tenants = Tenants(sandbox, host)
    try:
        a = tenants.add(tenant("nga", "10.210.10.0/28"))
        b = tenants.add(tenant("ngb", "10.210.10.16/28", plan="flood"))
        with ssh.connect(sandbox.host) as s:
            hn.ensure_base(s, host)
            hn.ensure_vhost(s, host, a)
            hn.ensure_vhost(s, host, b)
        for t in (a, b):  # the stand-in containers listen a moment after they start
            wait_until(lambda t=t: served(t, tenants), what=f"{t.slug} served through nginx")
        yield Env(host, tenants, a, b)
    finally:
        with ssh.connect(sandbox.host) as s:
            for t in tenants.made:
                hn.remove_vhost(s, host, t)
        tenants.cleanup()


# --------------------------------------------------------------------------- TLS, HSTS, routing


def test_tls_1_2_and_1_3_only_with_hsts_everywhere(nginx_env):
    a, tenants = nginx_env.a, nginx_env.tenants
    r = https(a.domains[0], "/g/collect?v=2&tid=G-1", ctx=tenants.ctx(a))
    assert r.status == 200 and b'"role":"tagging"' in r.body and hsts_ok(r)
    assert r.version == "TLSv1.3"
    r12 = https(a.domains[1], "/", ctx=tenants.ctx(a, ssl.TLSVersion.TLSv1_2))
    assert r12.status == 200 and r12.version == "TLSv1.2" and hsts_ok(r12)
    # A client that offers only TLS 1.1 gets the server's protocol_version alert.
    with pytest.raises(ssl.SSLError) as ei:
        https(a.domains[0], "/", ctx=tenants.ctx(a, ssl.TLSVersion.TLSv1_1))
    assert "alert protocol version" in str(ei.value).lower(), ei.value
    # the preview server under its path, an nginx error page (413), all with HSTS
    p = https(a.domains[0], "/_dn/preview/gtm/debug", ctx=tenants.ctx(a))
    assert p.status == 200 and b'"role":"preview"' in p.body and hsts_ok(p)
    big = https(a.domains[0], "/g/collect", ctx=tenants.ctx(a), method="POST", body=b"x" * (2 * 1024 * 1024))
    assert big.status == 413 and hsts_ok(big)
    # a name no tenant serves: no handshake, no certificate shown
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https("unknown.example", "/", ctx=ssl._create_unverified_context())
    # port 80 redirects to https
    c = http.client.HTTPConnection(EU1, 80, timeout=10)
    c.request("GET", "/x?y=1", headers={"Host": a.domains[0]})
    r80 = c.getresponse()
    assert r80.status == 301 and r80.getheader("Location") == f"https://{a.domains[0]}/x?y=1"
    c.close()


def flood(t: TenantSpec, ctx: ssl.SSLContext, seconds: float, threads: int = 6,
          source: str | None = None) -> tuple[Counter, list[Reply]]:
    """Requests as fast as ``threads`` keep-alive connections go, for ``seconds``."""
    counts: Counter = Counter()
    limited: list[Reply] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        conn = None
        while time.monotonic() < stop:
            try:
                conn = conn or SNIConnection(t.domains[0], ctx, source=source)
                r = https(t.domains[0], "/g/collect", ctx=ctx, conn=conn)
            except (OSError, http.client.HTTPException):
                counts["error"] += 1
                conn = None
                continue
            with lock:
                counts[r.status] += 1
                if r.status == 429 and len(limited) < 50:
                    limited.append(r)
        if conn:
            conn.close()

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return counts, limited


def test_flood_gets_429_and_does_not_starve_the_neighbour(nginx_env):
    a, b, tenants = nginx_env.a, nginx_env.b, nginx_env.tenants
    time.sleep(1.0)  # a fresh per-address budget for b
    neighbour: Counter = Counter()
    done = threading.Event()

    def steady() -> None:
        while not done.is_set():
            try:
                neighbour[https(a.domains[0], "/g/collect", ctx=tenants.ctx(a)).status] += 1
            except (OSError, http.client.HTTPException):
                neighbour["error"] += 1
            time.sleep(0.1)

    th = threading.Thread(target=steady)
    th.start()
    seconds = 4.0
    try:
        counts, limited = flood(b, tenants.ctx(b), seconds)
    finally:
        done.set()
        th.join()
    accepted = counts[200]
    # 5 r/s per address and no burst: about 5 × 4 s accepted, everything else refused with 429
    assert counts[429] > 10 * accepted, counts
    assert 5 * seconds * 0.7 <= accepted <= 5 * seconds + 3, counts
    assert limited and all(hsts_ok(r) for r in limited)
    total = sum(neighbour.values())
    assert total >= 25 and neighbour[200] / total >= 0.99, neighbour


# --------------------------------------------------------------------------- idempotency, failures, rerun


def test_applying_twice_does_nothing(nginx_env, sandbox):
    host = nginx_env.host
    before = master_and_workers(sandbox, host)
    with ssh.connect(sandbox.host) as s:
        assert hn.ensure_base(s, host).plan.empty
        for t in (nginx_env.a, nginx_env.b):
            assert hn.ensure_vhost(s, host, t).plan.empty
    assert master_and_workers(sandbox, host) == before  # no reload: the same workers serve


def _vhost_file(sandbox, host: HostBaseline, t: TenantSpec) -> bytes:
    return sandbox.ns_exec(["cat", rn.vhost_path(host, t)]).stdout


def test_broken_template_leaves_the_previous_config_serving(nginx_env, sandbox, monkeypatch, tmp_path):
    import jinja2

    from dn.render import environment, ngx

    host, a, tenants = nginx_env.host, nginx_env.a, nginx_env.tenants
    src = (rn.TEMPLATES / "nginx" / "vhost.conf.j2").read_text()
    line = "        proxy_pass http://{{ t.tagging_address }}:{{ port }};"
    assert line in src
    (tmp_path / "vhost.conf.j2").write_text(src.replace(line, line.rstrip(";")))  # a missing ';'
    broken = environment("nginx", ngx).overlay(loader=jinja2.FileSystemLoader(str(tmp_path)))
    monkeypatch.setattr(rn, "_env", lambda: broken)
    old = _vhost_file(sandbox, host, a)
    marker = sandbox.ns_exec(["cat", hn.marker_path(host, hn.vhost_unit_name(a))]).stdout
    steps: list[str] = []
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(ssh.CheckFailed) as ei:
            hn.ensure_vhost(s, host, a, progress=steps.append)
    assert "nginx -t refused" in str(ei.value) and "previous versions restored" in str(ei.value)
    assert steps[:4] == ["upload", "swap", "validate", "rollback"]
    assert _vhost_file(sandbox, host, a) == old
    assert sandbox.ns_exec(["cat", hn.marker_path(host, hn.vhost_unit_name(a))]).stdout == marker
    assert served(a, tenants, "/g/collect")

    monkeypatch.undo()  # the fix: the rerun finds the host as rendered
    with ssh.connect(sandbox.host) as s:
        assert hn.ensure_vhost(s, host, a).plan.empty
        # and a real change after the fix goes through
        wider = tenant(a.slug, a.subnet, domains=[*a.domains, f"api.{a.slug}.example"])
        assert hn.ensure_vhost(s, host, wider).changed
        assert hn.ensure_vhost(s, host, a).changed
    assert served(a, tenants)


def test_failing_reload_leaves_the_previous_config_serving(nginx_env, sandbox):
    """A zone rebound to another key passes `nginx -t` but fails the reload: dn notices."""
    host, a, tenants = nginx_env.host, nginx_env.a, nginx_env.tenants
    good = hn.vhost_unit(host, a)
    path, text = next(iter(good.files.items()))
    z = a.zones.req_ip
    bad_text = text.decode().replace(f"limit_req_zone $binary_remote_addr zone={z}", f"limit_req_zone $remote_addr zone={z}")
    assert bad_text != text.decode()
    bad = hn.Unit(good.name, {path: bad_text.encode()}, good.requires)
    master, _ = master_and_workers(sandbox, host)
    with ssh.connect(sandbox.host) as s:
        the_plan = hn.plan(bad, hn.read(s, host, bad))
        assert the_plan.has("update") and the_plan.has("reload")
        with pytest.raises(ssh.CheckFailed) as ei:
            hn.apply(s, host, bad, the_plan)
    msg = str(ei.value)
    assert "refused the reload" in msg and "previously it used" in msg and "previous versions restored" in msg
    assert _vhost_file(sandbox, host, a) == text
    assert master_and_workers(sandbox, host)[0] == master
    assert served(a, tenants, "/g/collect")
    with ssh.connect(sandbox.host) as s:
        assert hn.ensure_vhost(s, host, a).plan.empty


def test_nginx_is_started_when_it_is_not_running(nginx_env, sandbox):
    host, a, tenants = nginx_env.host, nginx_env.a, nginx_env.tenants
    master, _ = master_and_workers(sandbox, host)
    sandbox.ns_exec(rn.control_argv(host, "quit"))
    wait_until(lambda: not os.path.exists(f"/proc/{master}"), what="nginx stopped")
    with ssh.connect(sandbox.host) as s:
        result = hn.ensure_vhost(s, host, a)
    assert [c.action for c in result.plan.changes] == ["start"]
    assert master_and_workers(sandbox, host)[0] != master
    assert served(a, tenants)


def test_a_removed_vhost_is_no_longer_served(nginx_env, sandbox):
    host, a, tenants = nginx_env.host, nginx_env.a, nginx_env.tenants
    c = tenants.add(tenant("ngc", "10.210.10.32/28"), preview=False)
    with ssh.connect(sandbox.host) as s:
        assert hn.ensure_vhost(s, host, c).changed
        wait_until(lambda: served(c, tenants), what="ngc served")
        removed = hn.remove_vhost(s, host, c)
        assert removed.plan.has("delete") and removed.plan.has("reload")
        assert hn.remove_vhost(s, host, c).plan.empty
        assert not s.exists(rn.vhost_path(host, c)) and not s.exists(hn.marker_path(host, hn.vhost_unit_name(c)))
        assert c.slug not in hn.served_vhosts(s, host) and a.slug in hn.served_vhosts(s, host)
    with pytest.raises(ssl.SSLError):
        https(c.domains[0], "/", ctx=tenants.ctx(c))
    assert served(a, tenants)


def test_base_removal_is_refused_while_tenants_are_served(nginx_env, sandbox):
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(hn.OperationFailed) as ei:
            hn.remove_base(s, nginx_env.host)
    assert "nga" in str(ei.value) and "ngb" in str(ei.value)
    assert served(nginx_env.a, nginx_env.tenants)
