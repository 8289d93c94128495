"""The host baseline stack end to end: the real Pulumi engine (dn setup's CLI, local file state
backend) and dn's dynamic providers against the sandbox EU host, through the `dn` command.

One lifecycle: `dn host up` creates every resource; a second `up` changes nothing; a new admin
source shows exactly that diff in `dn preview` (text, markdown and JSON from real engine events);
a rule added on the host behind dn's back is found by `dn refresh` (exit 4) and removed by the
next `dn up`; `dn host destroy` leaves the host as it was before dn. dn's policy pack runs with
the real engine on every preview and up.
"""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dn.errors import ExitCode
from tests.fixtures.sandbox import host_lock
from tests.stacks import e2e

pytestmark = [pytest.mark.engine, pytest.mark.sandbox, pytest.mark.postgres,
              pytest.mark.skipif(e2e.engine_missing() is not None, reason=e2e.engine_missing() or "")]

HOST = "sandbox-eu1"
STACK = "host--sandbox-eu1"
ROGUE = ["-p", "tcp", "-m", "tcp", "--dport", "2375", "-j", "ACCEPT"]


@pytest.fixture
def env(sandbox, dn_settings_data, tmp_path):
    e2e.ensure_host_dn()
    with host_lock():
        yield e2e.make_env(sandbox, dn_settings_data, tmp_path)


def iptables(sandbox, family: int = 4) -> str:
    cmd = "iptables-save" if family == 4 else "ip6tables-save"
    return sandbox.ns_exec([cmd, "-t", "filter"]).stdout.decode()


def dn_lines(save: str) -> list[str]:
    """dn's part of a filter table: its chains, their rules and the jumps into them."""
    return sorted(ln for ln in save.splitlines() if "DN-" in ln or ln.startswith((":INPUT", ":FORWARD")))


def test_host_stack_lifecycle(env, sandbox, tmp_path):
    from dn.host import firewall as hf
    from dn.host import nginx as hn
    from dn.models import HostBaseline
    from dn.render.iptables import parse_save
    from stacks.host import host_dirs

    host = HostBaseline.from_settings(env.settings)
    before_v4, before_v6 = iptables(sandbox, 4), iptables(sandbox, 6)

    # -- up: every resource created, the host in the declared state
    code, out, err = env.dn_json("host", "up")
    assert code == 0, err
    assert out["changes"].get("create") == 9 and not out["changes"].get("update"), out  # 8 + the default provider
    v4 = parse_save(iptables(sandbox, 4))["filter"]
    assert v4.policies["INPUT"] == "DROP" and v4.count("INPUT", ("-j", "DN-INPUT")) == 1
    public = [r for r in v4.chain("DN-INPUT") if "dn:public" in r]
    assert public and public[0][public[0].index("--dports") + 1] == "80,443"
    assert Path(host.path("/etc/nginx/nginx.conf")).read_text().count("ssl_protocols TLSv1.2 TLSv1.3;") == 1
    for unit in ("dn-backup-platform", "dn-health", "dn-verify", "dn-drill", "dn-retention"):
        assert Path(host.path(f"/etc/systemd/system/{unit}.timer")).is_file()
    for d in host_dirs(host):
        st = Path(d["path"]).stat()
        assert stat.S_ISDIR(st.st_mode) and f"{stat.S_IMODE(st.st_mode):04o}" == d["mode"]
    show = env.dn_json("host", "show")
    assert show[0] == 0 and show[1]["stack"]["last_result"] == "succeeded"

    # -- a second up: nothing to do
    code, out, err = env.dn_json("host", "up")
    assert code == 0, err
    assert set(out["changes"]) == {"same"}, out

    # -- a new admin source: dn preview shows exactly that
    wider = env.write_config(tmp_path / "wider.toml", **{f"hosts.{HOST}.admin_sources": ["10.231.1.1/32", "192.0.2.0/24"]})
    r = env.dn("preview", "--host", HOST, "--format", "json", config=wider)
    assert r.returncode == 0, r.stderr
    pv = json.loads(r.stdout)
    assert pv["changed"] is True and pv["exit_code"] == 0 and pv["violations"] == []
    assert pv["totals"] == {"create": 0, "update": 1, "replace": 0, "delete": 0, "same": 7}
    (step,) = pv["stacks"][0]["steps"]
    assert (step["op"], step["kind"], step["name"]) == ("update", "firewall", "sandbox-eu1-firewall-baseline")
    assert step["changes"] == [{"path": "host.admin_sources[1]", "how": "add", "old": None, "new": "192.0.2.0/24",
                                "replaces": False}]
    assert step["flags"] == ["firewall change", "host access change"] and step["detail_source"] == "inputs"
    assert pv["stacks"][0]["policy_packs"], "dn's policy pack ran with the real engine"
    md = env.dn("preview", "--host", HOST, "--format", "markdown", config=wider)
    assert md.returncode == 0
    assert md.stdout.startswith("<!-- dn-preview -->\n## ✅ dn preview: changes: 0 to create, 1 to update")
    assert "**firewall change; host access change**" in md.stdout and '+ host.admin_sources[1]: "192.0.2.0/24"' in md.stdout
    assert "✅ passed" in md.stdout and len(md.stdout) < 65_536
    txt = env.dn("preview", "--host", HOST, config=wider)
    assert txt.returncode == 0 and txt.stdout.startswith("changes: 0 to create, 1 to update")
    assert parse_save(iptables(sandbox, 4))["filter"].chain("DN-INPUT") == v4.chain("DN-INPUT"), \
        "a preview changes nothing on the host"
    unchanged = env.dn("preview", "--host", HOST, "--format", "json")
    assert unchanged.returncode == 0 and json.loads(unchanged.stdout)["changed"] is False

    # -- drift: a rule added on the host behind dn's back
    sandbox.ns_exec(["iptables", "-w", "-I", "DN-INPUT", "1", *ROGUE])
    r = env.dn("refresh", "--host", HOST, "--json")
    assert r.returncode == ExitCode.POLICY, r.stderr
    drift = json.loads(r.stdout)["drift"]
    fw = [d for d in drift if d["name"] == "sandbox-eu1-firewall-baseline"]
    assert fw and fw[0]["how"] == "changed"
    assert any("DN-INPUT: rules differ" in str(c["new"]) for c in fw[0]["changes"]), fw
    assert "changed behind dn's back" in r.stderr
    code, out, err = env.dn_json("up", "--host", HOST)
    assert code == 0, err
    assert out[0]["changes"].get("update", 0) >= 1
    assert not [rule for rule in parse_save(iptables(sandbox, 4))["filter"].chain("DN-INPUT") if "2375" in rule]
    again = env.dn("refresh", "--host", HOST, "--json")
    assert not [d for d in json.loads(again.stdout)["drift"] if d["name"] == "sandbox-eu1-firewall-baseline"]

    # -- destroy: the host as it was before dn (other sessions' tenants would rightly stop it)
    foreign = e2e.foreign_tenants_on_host(sandbox, host)
    if foreign:
        pytest.skip(f"other test sessions' tenants are on the shared sandbox host ({', '.join(foreign)}): "
                    "removing the baseline under them is refused by design; the destroy step was not run")
    try:
        r = env.dn("host", "destroy", "--yes", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["changes"].get("delete") == 9
        after4 = parse_save(iptables(sandbox, 4))["filter"]
        assert after4.policies["INPUT"] == "ACCEPT"
        assert not [c for c in after4.policies if c.startswith("DN-")]
        assert not [c for c in parse_save(iptables(sandbox, 6))["filter"].policies if c.startswith("DN-")]
        assert not Path(host.path("/etc/nginx/nginx.conf")).exists()
        assert not list(Path(host.path("/etc/systemd/system")).glob("dn-*"))
        for d in host_dirs(host):
            p = Path(d["path"])
            assert not p.exists() or any(p.iterdir()), f"{p} left behind empty"
        assert not (env.settings.data_dir / "stacks" / STACK / f"Pulumi.{STACK}.yaml").exists()
        del before_v4, before_v6
    finally:
        # dn's baseline back in place for whoever uses the sandbox next
        from dn import ssh

        with ssh.connect(sandbox.host) as s:
            hf.converge_baseline(s, host)
            hn.ensure_base(s, host)
