"""The sandbox EU host (dn.sandbox, `dn sandbox`): real namespaces, sshd, dockerd, nginx, PostgreSQL."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dn import sandbox as sb
from dn import ssh
from dn.config import SANDBOX_PG_PORT

pytestmark = pytest.mark.sandbox
DN = str(Path(sys.executable).with_name("dn"))


def http_get(address: str, port: int, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(address, port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def dn_cli(args: list[str], data_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DN_")}
    env.update(DN_HOME=str(data_dir), XDG_CONFIG_HOME=str(tmp_path / "no-config"))
    return subprocess.run([DN, *args], capture_output=True, text=True, env=env, timeout=600)


def ns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def daemon_pids() -> dict[str, int | None]:
    return {
        "sshd": sb._daemon_pid(sb.EU1.sshd_pid, sb.SSHD, sb.EU1.netns),
        "eu2-sshd": sb._daemon_pid(sb.EU2.sshd_pid, sb.SSHD, sb.EU2.netns),
        "dockerd": sb._daemon_pid(sb.EU1.p("run/docker.pid"), sb.DOCKERD, sb.EU1.netns),
        "nginx": sb._daemon_pid(sb.NGINX_PID, sb.NGINX, sb.EU1.netns),
    }


def test_status_reports_every_part_up(sandbox, tmp_path):
    parts = sb.status(sandbox.data_dir)
    assert [p.name for p in parts] == ["netns", "sshd", "dockerd", "nginx", "second-region", "postgresql",
                                      "image", "client"]
    assert all(p.up for p in parts), parts
    r = dn_cli(["sandbox", "status", "--json"], sandbox.data_dir, tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["up"] is True and set(doc["parts"]) == {p.name for p in parts}
    assert all(v["up"] for v in doc["parts"].values())
    text = dn_cli(["sandbox", "status"], sandbox.data_dir, tmp_path)
    assert text.returncode == 0 and "dockerd" in text.stdout and "down" not in text.stdout


def test_ssh_into_eu1_lands_in_the_namespace(sandbox):
    with ssh.connect(sandbox.host) as s:
        port = s._t.sock.getsockname()[1]
        pids = sandbox.sshd_pids_for(port)
        assert pids and all(os.stat(f"/proc/{p}/ns/net").st_ino == ns_inode("dn-eu1") for p in pids)
        assert "10.231.1.2/24" in s.run(["ip", "-4", "-o", "addr", "show", "eth0"]).text
    effective = sandbox.ns_exec(["/usr/sbin/sshd", "-T", "-f", str(sb.EU1.sshd_config)]).stdout.decode()
    for line in ("passwordauthentication no", "kbdinteractiveauthentication no", "permitrootlogin without-password",
                 "listenaddress 10.231.1.2:22", "allowagentforwarding no", "allowtcpforwarding no"):
        assert line in effective.splitlines(), line
    listening = sandbox.ns_exec(["ss", "-Htlnp"]).stdout.decode()
    sshd_sockets = [ln.split()[3] for ln in listening.splitlines() if '"sshd"' in ln]
    assert sshd_sockets == ["10.231.1.2:22"]


def test_known_hosts_and_client_files(sandbox):
    files = sb.ClientFiles.of(sandbox.data_dir)
    for f, mode in ((files.key, 0o600), (files.passphrase, 0o600), (files.pgpass, 0o600), (files.known_hosts, 0o644)):
        assert (f.stat().st_mode & 0o777) == mode, f
    assert (files.dir.stat().st_mode & 0o777) == 0o700
    lines = files.known_hosts.read_text().splitlines()
    for region, line in zip(sb.REGIONS, lines):
        pub = region.host_key.with_name(region.host_key.name + ".pub").read_text().split()
        assert line.split()[:3] == [region.address, *pub[:2]]
    assert len(files.passphrase.read_text().strip()) >= 40
    assert "password" not in sb.STATE_PATH.read_text().lower()


def test_docker_over_ssh_runs_the_standin_image(sandbox):
    name = f"dn-test-{uuid.uuid4().hex[:8]}"
    with ssh.connect(sandbox.host) as s:
        assert s.run(["docker", "info", "--format", "{{.ServerVersion}}"]).text.strip().startswith("20.10")
        try:
            s.run(["docker", "run", "-d", "--name", name, "-p", "10.231.1.2::8080", sb.IMAGE])
            s.run(["docker", "run", "-d", "--name", name + "-p", "-e", "RUN_AS_PREVIEW_SERVER=true", sb.IMAGE])
            host_port = int(s.run(["docker", "port", name, "8080"]).text.split(":")[-1])
            ip = s.run(["docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", name + "-p"]).text.strip()
            # from the root namespace, through the published port
            deadline = time.monotonic() + 20
            while True:
                try:
                    status, headers, body = http_get("10.231.1.2", host_port, "/healthz")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert (status, body) == (200, b"ok")
            status, headers, body = http_get("10.231.1.2", host_port, "/g/collect?v=2&tid=G-1")
            assert status == 200 and headers["x-dn-standin"] == "tagging"
            assert json.loads(body)["path"] == "/g/collect?v=2&tid=G-1"
            # from inside the host's namespace, straight to the container
            r = sandbox.ns_exec(["curl", "-s", "-m", "5", f"http://{ip}:8080/gtm/debug"])
            assert json.loads(r.stdout)["role"] == "preview"
            user = s.run(["docker", "exec", name, "id", "-u"]).text.strip()
            assert user == "65534"  # the stand-in does not run as root
        finally:
            s.run(["docker", "rm", "-f", name, name + "-p"], check=False)


def test_dockerd_manages_iptables_inside_the_namespace(sandbox):
    rules = sandbox.ns_exec(["iptables", "-S", "DOCKER-USER"]).stdout.decode()
    assert "-N DOCKER-USER" in rules
    nat = sandbox.ns_exec(["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout.decode()
    assert "10.231.64.0/24" in nat  # docker0's masquerade rule lives in dn-eu1, not on this machine


def test_docker_dial_stdio_over_ssh_finds_the_daemon(sandbox):
    """pulumi-docker reaches ssh:// hosts with `docker system dial-stdio`: it must find the daemon."""
    with ssh.connect(sandbox.host) as s:
        r = s.run(["docker", "system", "dial-stdio"], stdin=b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n", timeout=30)
    assert r.stdout.startswith(b"HTTP/1.0 200 OK") and r.stdout.endswith(b"OK")


def test_openssh_client_accepts_the_generated_known_hosts(sandbox):
    files = sb.ClientFiles.of(sandbox.data_dir)
    r = subprocess.run(["ssh", "-F", "/dev/null", "-i", str(files.key), "-o", f"UserKnownHostsFile={files.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                        "root@10.231.1.2", "docker", "version", "--format", "{{.Server.Version}}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("20.10")


def test_second_region_allows_sftp_only(sandbox):
    name = f"t-{uuid.uuid4().hex[:8]}"
    with ssh.connect(sandbox.backup) as s:
        assert s.listdir("/") == ["backups"]  # jailed
        s.install_file(f"/backups/{name}", b"dump")
        assert s.read_file(f"/backups/{name}") == b"dump"
        assert (sb.EU2_CHROOT / "backups" / name).read_bytes() == b"dump"
        r = s.run(["touch", f"/backups/{name}-shell"], check=False)
        s.remove(f"/backups/{name}")
    assert r.rc != 0 and b"sftp connections only" in r.stdout + r.stderr
    assert not (sb.EU2_CHROOT / "backups" / f"{name}-shell").exists()
    with pytest.raises(ssh.AuthRefused):
        ssh.connect(sandbox.backup.model_copy(update={"user": "root"}))
    effective = sandbox.ns_exec(["/usr/sbin/sshd", "-T", "-f", str(sb.EU2.sshd_config), "-C",
                                 "user=backup,host=x,addr=10.231.2.1"], netns="dn-eu2").stdout.decode().splitlines()
    assert "forcecommand internal-sftp -d /backups" in effective
    assert f"chrootdirectory {sb.EU2_CHROOT}" in effective


def test_nginx_answers_in_eu1(sandbox):
    try:
        status, headers, _ = http_get("10.231.1.2", 80, "/")
    except http.client.RemoteDisconnected:
        # once dn's host baseline is applied, a name no tenant serves is closed unanswered (444)
        conf = Path(sandbox.host.path("/etc/nginx/nginx.conf")).read_text()
        assert "return 444;" in conf
    else:
        assert headers.get("server", "").startswith("nginx")
        assert status in (200, 301, 302, 404, 421)
    pid = daemon_pids()["nginx"]
    assert pid and os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode("dn-eu1")


def test_postgres_cluster_accepts_dn_with_the_passfile(sandbox):
    import psycopg

    with psycopg.connect(sandbox.pg.dsn("dn", "dn"), passfile=str(sandbox.pg.passfile), connect_timeout=5) as c:
        assert c.execute("SELECT current_user").fetchone() == ("dn",)


def test_nothing_in_the_namespaces_can_route_beyond_them(sandbox):
    for region in sb.REGIONS:
        assert sandbox.ns_exec(["ip", "route", "show", "default"], netns=region.netns).stdout == b""
        r = sandbox.ns_exec(["ip", "route", "get", "192.0.2.1"], netns=region.netns, check=False)
        assert r.returncode != 0 and b"unreachable" in r.stderr.lower()


def test_up_twice_is_idempotent(sandbox):
    before = daemon_pids()
    files = sb.ClientFiles.of(sandbox.data_dir)
    contents = {p: p.read_bytes() for p in (*files.all(), sb.EU1.host_key, sb.EU2.host_key, sb.NGINX_CONF)}
    sandbox.up()
    sandbox.up()
    assert daemon_pids() == before and all(before.values())
    assert {p: p.read_bytes() for p in contents} == contents


def test_a_second_data_dir_shares_the_sandbox(sandbox, tmp_path):
    other = tmp_path / "other-data"
    sb.up(other)
    settings = sb_settings(other)
    with ssh.connect(settings.host()) as s:
        assert s.run(["true"]).rc == 0
    assert sb.ClientFiles.of(other).pgpass.read_bytes() == sb.ClientFiles.of(sandbox.data_dir).pgpass.read_bytes()
    assert sb.ClientFiles.of(other).key.read_bytes() != sb.ClientFiles.of(sandbox.data_dir).key.read_bytes()
    with ssh.connect(sandbox.host) as s:  # the first data dir still works
        assert s.run(["true"]).rc == 0
    # a data dir that disappears is forgotten by the next `up`: its key is no longer authorised
    other_pub = sb.ClientFiles.of(other).pub.read_text().strip()
    assert other_pub in sb.EU1.p("etc/ssh/authorized_keys/root").read_text()
    shutil.rmtree(other)
    sandbox.up()
    assert other_pub not in sb.EU1.p("etc/ssh/authorized_keys/root").read_text()
    assert str(other) not in sb.STATE_PATH.read_text()


def sb_settings(data_dir: Path):
    from tests.fixtures.sandbox import sandbox_settings

    return sandbox_settings(data_dir)


def test_up_repairs_killed_daemons_and_stale_pid_files(sandbox):
    with sandbox.exclusive():
        pids = daemon_pids()
        os.kill(pids["nginx"], signal.SIGKILL)
        os.kill(pids["eu2-sshd"], signal.SIGKILL)
        time.sleep(0.5)
        sb.NGINX_PID.write_text(f"{os.getpid()}\n")  # a live pid that is not nginx
        state = {p.name: p.up for p in sb.status()}
        assert state["nginx"] is False and state["second-region"] is False and state["sshd"] is True
        sandbox.up()
        after = daemon_pids()
        assert after["nginx"] not in (None, pids["nginx"]) and after["eu2-sshd"] not in (None, pids["eu2-sshd"])
        assert after["sshd"] == pids["sshd"] and after["dockerd"] == pids["dockerd"]


def test_up_replaces_a_config_that_no_longer_loads(sandbox):
    """A stopped nginx whose config includes a file that is gone: `up` keeps the broken file for
    reading and starts nginx on the bootstrap config instead of failing."""
    with sandbox.exclusive():
        before = sb.NGINX_CONF.read_bytes()
        gone = sb.EU1.p("etc/nginx/dn/gone.conf")
        broken = before.replace(b"http {", f"http {{\n    include {gone};".encode(), 1)
        assert broken != before
        try:
            os.kill(daemon_pids()["nginx"], signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while daemon_pids()["nginx"] and time.monotonic() < deadline:
                time.sleep(0.1)
            sb.NGINX_CONF.write_bytes(broken)
            sandbox.up()
            kept = sorted(sb.NGINX_CONF.parent.glob("nginx.conf.broken-*"))
            assert kept and kept[-1].read_bytes() == broken
            assert sb.NGINX_CONF.read_bytes() == sb._render("nginx.conf.j2", prefix=sb.EU1.prefix)
            assert daemon_pids()["nginx"]
        finally:
            for k in sb.NGINX_CONF.parent.glob("nginx.conf.broken-*"):
                k.unlink()
            if sb.NGINX_CONF.read_bytes() != before:
                sb.NGINX_CONF.write_bytes(before)
                subprocess.run(["ip", "netns", "exec", "dn-eu1", sb.NGINX, "-c", str(sb.NGINX_CONF), "-s", "reload"],
                               check=True)


def mounts_under(*prefixes: str) -> list[str]:
    return [m for m in sb._mountpoints() if any(m == p or m.startswith(p + "/") for p in prefixes)]


def test_down_removes_everything_and_up_rebuilds_from_leftovers(sandbox, tmp_path):
    with sandbox.exclusive():
        # something running in every part: a container (mounts, cgroups) and an open SSH session
        with ssh.connect(sandbox.host) as s:
            s.run(["docker", "run", "-d", "--name", f"dn-test-{uuid.uuid4().hex[:8]}", sb.IMAGE])
        held = ssh.connect(sandbox.host)
        assert mounts_under(sb.SANDBOX_ROOT) and sb.sandbox_processes()
        # what dn recorded about this sandbox world in an embedded-default data dir, and a data
        # dir with its own configuration that also used the sandbox (its records are its own)
        marker = f"witness-{uuid.uuid4().hex[:8]}"
        (sandbox.data_dir / "audit").mkdir(mode=0o700, exist_ok=True)
        (sandbox.data_dir / "audit" / marker).write_text("head 42\n")
        own = tmp_path / "own-config-data"
        sb.up(own, embedded=False)
        (own / "state").mkdir()
        (own / "state" / "stack.json").write_text("{}")
        started = time.monotonic()
        r = dn_cli(["sandbox", "down"], sandbox.data_dir, tmp_path)
        took_down = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        held.close()
        (reset,) = sandbox.data_dir.glob(sb.RESET_PREFIX + "*")
        assert (reset / "audit" / marker).read_text() == "head 42\n" and (reset / "passphrase").exists()
        assert not any((sandbox.data_dir / n).exists() for n in sb.SANDBOX_RECORDS)
        assert "set aside in" in r.stderr
        assert (own / "state" / "stack.json").read_text() == "{}"
        assert not any(f.exists() for f in sb.ClientFiles.of(own).all())

        netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
        assert "dn-eu1" not in netns and "dn-eu2" not in netns
        assert not Path("/sys/class/net/dn-eu1").exists() and not Path("/sys/class/net/dn-eu2").exists()
        assert mounts_under(sb.SANDBOX_ROOT, "/run/netns/dn-eu1", "/run/netns/dn-eu2") == []
        assert sb.sandbox_processes() == []
        leftovers = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if sb.SANDBOX_ROOT.encode() in cmd and sb._alive(int(pid)):
                leftovers.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
        assert leftovers == []
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{sb.CGROUP_PARENT}"))
        for gone in (sb.EU1.prefix, sb.EU2.prefix, sb.PG_ROOT, sb.STATE_PATH, *sb.ClientFiles.of(sandbox.data_dir).all()):
            assert not gone.exists(), gone
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", SANDBOX_PG_PORT), timeout=2).close()
        assert not any(p.up for p in sb.status(sandbox.data_dir))
        assert dn_cli(["sandbox", "status"], sandbox.data_dir, tmp_path).returncode == 1
        assert dn_cli(["sandbox", "down"], sandbox.data_dir, tmp_path).returncode == 0  # nothing left: no-op

        # leftovers of a crashed run: a bare netns without its veth, pid files naming live strangers,
        # and an nginx configuration dn already manages (which `up` must keep)
        subprocess.run(["ip", "netns", "add", "dn-eu1"], check=True)
        managed = sb._render("nginx.conf.j2", prefix=sb.EU1.prefix) + b"# managed by dn\n"
        sb.NGINX_CONF.parent.mkdir(parents=True)
        sb.NGINX_CONF.write_bytes(managed)
        for pidfile in (sb.EU1.sshd_pid, sb.EU1.p("run/docker.pid"), sb.NGINX_PID):
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            pidfile.write_text(f"{os.getpid()}\n")
        started = time.monotonic()
        r = dn_cli(["sandbox", "up"], sandbox.data_dir, tmp_path)
        took_up = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        assert all(p.up for p in sb.status(sandbox.data_dir))
        assert sb.NGINX_CONF.read_bytes() == managed
        started = time.monotonic()
        assert dn_cli(["sandbox", "up"], sandbox.data_dir, tmp_path).returncode == 0
        took_again = time.monotonic() - started
        print(f"\nsandbox down {took_down:.1f}s, up from leftovers {took_up:.1f}s, up when up {took_again:.2f}s")
