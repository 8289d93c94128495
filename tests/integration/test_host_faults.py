"""Host applies whose SSH connection drops half-way, on the sandbox EU host.

The connection is cut by killing the session's sshd processes on the host, from the apply's own
progress callback, at each step of an nginx vhost apply (upload, swap, validate, reload).
Afterwards nginx serves the old or the new configuration (never a broken one), every file is
whole and the tree passes ``nginx -t``, and a rerun converges. A firewall apply cut off after its
restore is rolled back by the host itself (the dead-man timer) to exactly the previous rules.
"""
from __future__ import annotations

import ssl

import pytest

from dn import ssh
from dn.errors import DnError
from dn.host import firewall as fw
from dn.host import nginx as hn
from dn.models import HostBaseline
from dn.render import nginx as rn
from tests.integration.test_nginx_apply import (  # noqa: F401 - nginx_env is a fixture
    https,
    kill_session,
    master_and_workers,
    nginx_env,
    tenant,
    wait_until,
)

pytestmark = pytest.mark.sandbox

OLD = ["nfa.example"]
NEW = ["nfa.example", "new.nfa.example"]


@pytest.fixture(scope="module")
def fault_tenant(nginx_env, sandbox):  # noqa: F811
    t = nginx_env.tenants.add(tenant("nfa", "10.210.10.48/28", domains=OLD), cert_names=NEW, preview=False)
    with ssh.connect(sandbox.host) as s:
        hn.ensure_vhost(s, nginx_env.host, t)
    wait_until(lambda: https(OLD[0], "/healthz", ctx=nginx_env.tenants.ctx(t)).status == 200, what="nfa served")
    return t


def serves(name: str, ctx: ssl.SSLContext) -> bool:
    try:
        return https(name, "/healthz", ctx=ctx).status == 200
    except ssl.SSLError:
        return False  # the default server refuses the handshake for a name no vhost has


@pytest.mark.parametrize("step", ["upload", "swap", "validate", "reload"])
def test_connection_dropped_during_an_nginx_apply(nginx_env, fault_tenant, sandbox, step):  # noqa: F811
    host, ctx = nginx_env.host, nginx_env.tenants.ctx(fault_tenant)
    old_t = fault_tenant
    new_t = tenant("nfa", old_t.subnet, domains=NEW)
    with ssh.connect(sandbox.host) as s:
        hn.ensure_vhost(s, host, old_t)  # start from the old config, loaded
    old_file = hn.vhost_unit(host, old_t).files[rn.vhost_path(host, old_t)]
    new_file = hn.vhost_unit(host, new_t).files[rn.vhost_path(host, new_t)]
    master, _ = master_and_workers(sandbox, host)
    assert serves(OLD[0], ctx) and not serves(NEW[1], ctx)

    s = ssh.connect(sandbox.host)
    seen: list[str] = []

    def cut(at: str) -> None:
        seen.append(at)
        if at == step:
            kill_session(sandbox, s)

    try:
        with pytest.raises(DnError) as ei:
            hn.ensure_vhost(s, host, new_t, progress=cut)
    finally:
        s.close()
    assert seen[-1] == step, seen
    assert isinstance(ei.value, (ssh.RollbackIncomplete, ssh.Unreachable)), ei.value

    # never broken: nginx runs, the tree on disk is valid and whole, the old names are served
    assert master_and_workers(sandbox, host)[0] == master
    assert sandbox.ns_exec(rn.check_argv(host), check=False).returncode == 0
    on_disk = sandbox.ns_exec(["cat", rn.vhost_path(host, old_t)]).stdout
    assert on_disk in (old_file, new_file)
    assert on_disk == (old_file if step in ("upload", "swap") else new_file)
    assert serves(OLD[0], ctx)
    assert not serves(NEW[1], ctx)  # no reload happened: still the old configuration

    # a rerun converges, and a second rerun has nothing left to do
    with ssh.connect(sandbox.host) as s2:
        rerun = hn.ensure_vhost(s2, host, new_t)
        assert rerun.plan.has("reload")
        assert rerun.plan.has("update") == (step in ("upload", "swap"))
        assert hn.ensure_vhost(s2, host, new_t).plan.empty
        leftovers = [n for n in s2.listdir(host.path(rn.VHOST_DIR)) if ssh.TMP_MARK in n]
    assert not leftovers
    assert serves(NEW[1], ctx) and serves(OLD[0], ctx)


def test_a_firewall_apply_cut_off_after_its_restore_is_undone_by_the_host(sandbox):
    host = HostBaseline.from_settings(sandbox.settings)
    t = tenant("fwd", "10.210.20.32/28")
    before = {f: fw.normalized(sandbox.ns_exec([fw.SAVE[f]]).stdout.decode()) for f in fw.FAMILIES}
    s = ssh.connect(sandbox.host)
    try:
        with pytest.raises(DnError):
            fw.converge_tenant(s, host, t, deadman=3, progress=lambda at: at == "check" and kill_session(sandbox, s))
    finally:
        s.close()
    now = fw.parse_save(sandbox.ns_exec(["iptables-save"]).stdout.decode())["filter"]
    applied = t.chain_forward in now.policies
    wait_until(lambda: {f: fw.normalized(sandbox.ns_exec([fw.SAVE[f]]).stdout.decode()) for f in fw.FAMILIES} == before,
               timeout=15, what="the host restoring its previous rules")
    assert applied  # the restore had happened before the cut: the host itself undid it
    armed = sandbox.ns_exec(["ls", "-A", host.path(f"{host.data_dir}/firewall")]).stdout.decode().split()
    assert not [n for n in armed if n.startswith("rollback-")]
