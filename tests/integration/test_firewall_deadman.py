"""The firewall dead-man switch undoes only its own apply, and only while it is what that apply left.

On the sandbox EU host: a tenant's firewall apply loses its SSH connection right after its
restore (its sshd processes are killed from the apply's own progress callback), so its dead-man
timer (a few seconds here) is never disarmed. Before the timer fires, other things happen, as
they may outside the host lock: another tenant's apply, a new Docker network (Docker adds its own
FORWARD rules), or a second apply of the same tenant that changes its chains. When the timer
fires, the first apply's chains go, and everything else stays; a changed chain stays too. A
rerun that finds the first apply's rules in place disarms its timer.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dn import ssh
from dn.errors import DnError
from dn.host import firewall as fw
from dn.models import HostBaseline, TenantSpec
from dn.render.iptables import parse_save
from tests.integration.test_nginx_apply import kill_session, tenant, wait_until

pytestmark = pytest.mark.sandbox

DEADMAN = 15.0  # seconds: long enough for the cut apply to give up and for the applies in between


def filter_v4(sandbox):
    return parse_save(sandbox.ns_exec(["iptables-save"]).stdout.decode())["filter"]


def armed_files(sandbox, host: HostBaseline) -> set[str]:
    d = host.path(f"{host.data_dir}/firewall")
    r = sandbox.ns_exec(["ls", "-A", d], check=False)
    return {n for n in r.stdout.decode().split() if n.startswith("rollback-")}


def cut_apply(sandbox, host: HostBaseline, t: TenantSpec) -> set[str]:
    """Apply ``t``'s chains and lose the connection right after the restore; returns the dead-man
    files this apply left armed."""
    before = armed_files(sandbox, host)
    s = ssh.connect(sandbox.host)
    started = time.monotonic()
    try:
        with pytest.raises(DnError):
            fw.converge_tenant(s, host, t, deadman=DEADMAN,
                               progress=lambda at: at == "check" and kill_session(sandbox, s))
    finally:
        s.close()
    assert time.monotonic() - started < DEADMAN - 3, "the cut apply took too long to give up: its timer may have fired"
    mine = armed_files(sandbox, host) - before
    assert mine, "the cut apply left no dead-man timer armed"
    assert t.chain_forward in filter_v4(sandbox).policies  # the restore had happened
    return mine


def wait_fired(sandbox, host: HostBaseline, files: set[str]) -> None:
    wait_until(lambda: not (armed_files(sandbox, host) & files), timeout=DEADMAN + 20, what="the dead-man timer")


@pytest.fixture
def env(sandbox) -> Iterator[tuple[HostBaseline, list[TenantSpec]]]:
    host = HostBaseline.from_settings(sandbox.settings)
    made: list[TenantSpec] = []
    with ssh.connect(sandbox.host) as s:
        fw.converge_baseline(s, host)
    try:
        yield host, made
    finally:
        with ssh.connect(sandbox.host) as s:
            for t in made:
                s.run(["docker", "network", "rm", t.network], check=False)
                fw.remove_tenant(s, host, t)


def test_the_dead_man_takes_back_its_own_apply_and_leaves_later_ones(sandbox, env):
    host, made = env
    a, b, c = tenant("dma", "10.210.40.0/28"), tenant("dmb", "10.210.40.16/28"), tenant("dmc", "10.210.40.32/28")
    made += [a, b, c]
    files = cut_apply(sandbox, host, a)
    # meanwhile: another tenant's apply, and a Docker network with Docker's own FORWARD rules
    with ssh.connect(sandbox.host) as s:
        fw.converge_tenant(s, host, b)
        s.run(["docker", "network", "create", "--driver", "bridge", "--subnet", c.subnet,
               "-o", f"com.docker.network.bridge.name={c.bridge}", c.network])
    docker_rules = [r for r in filter_v4(sandbox).chain("FORWARD") if c.bridge in r]
    assert docker_rules
    wait_fired(sandbox, host, files)
    now = filter_v4(sandbox)
    assert a.chain_forward not in now.policies and a.chain_input not in now.policies
    assert not [r for rules in now.rules.values() for r in rules if a.bridge in r]  # its hooks went too
    tables = {"filter": now}
    assert [d for r in fw.tenant_rulesets(host, b) for d in r.drift(tables)] == []
    assert [d for r in fw.baseline_rulesets(host)[:1] for d in r.drift(tables)] == []
    assert [r for r in now.chain("FORWARD") if c.bridge in r] == docker_rules


@pytest.mark.parametrize("how", ["by hand", "by a later apply"])
def test_the_dead_man_leaves_chains_changed_since(sandbox, env, how):
    host, made = env
    a = tenant("dmd", "10.210.40.48/28")
    made.append(a)
    files = cut_apply(sandbox, host, a)
    changed = HostBaseline.from_settings(sandbox.settings, tenant_host_services=("tcp/9874",))
    if how == "by hand":  # the compare-and-swap refuses: the chain holds a rule the apply did not leave
        sandbox.ns_exec(["iptables", "-w", "-I", a.chain_input, "1", "-p", "tcp", "--dport", "7", "-j", "ACCEPT"])
    else:
        with ssh.connect(sandbox.host) as s:
            assert not fw.converge_tenant(s, changed, a).empty  # rewrites a's input chain
    wait_fired(sandbox, host, files)
    now = filter_v4(sandbox)
    if how == "by hand":
        assert now.chain(a.chain_input)[0] == ("-p", "tcp", "-m", "tcp", "--dport", "7", "-j", "ACCEPT")
        assert now.chain(a.chain_forward) == fw.tenant_rulesets(host, a)[0].expected()[a.chain_forward]
    else:
        assert [d for r in fw.tenant_rulesets(changed, a) for d in r.drift({"filter": now})] == []


def test_a_rerun_that_finds_the_rules_in_place_is_not_undone(sandbox, env):
    host, made = env
    a = tenant("dme", "10.210.40.64/28")
    made.append(a)
    files = cut_apply(sandbox, host, a)
    with ssh.connect(sandbox.host) as s:
        assert fw.converge_tenant(s, host, a).empty  # nothing to do: the first run's restore is there
    assert not armed_files(sandbox, host) & files  # and the first run's timer is disarmed
    time.sleep(DEADMAN + 2)
    assert [d for r in fw.tenant_rulesets(host, a) for d in r.drift({"filter": filter_v4(sandbox)})] == []
