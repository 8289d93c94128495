"""The pure parts of the host appliers: plans, parsers and the firewall's packet evaluation.

Recorded inputs come from the sandbox host: ``iptables-save`` with Docker's chains, ``ps`` of an
nginx master and its workers, ``cryptsetup luksDump --dump-json-metadata`` of a fresh and of an
erased volume.
"""
from __future__ import annotations

import json

import pytest

from dn.config import PlanConfig, ScheduleConfig
from dn.host import firewall as fw
from dn.host import luks
from dn.host import nginx as hn
from dn.host import timers as ht
from dn.host.plan import Change, Plan, digest, file_changes
from dn.models import parse_host, parse_tenant
from dn.render import nginx as rn
from dn.render.iptables import Hook, Ruleset, parse_save, render_baseline

HOST = parse_host({"name": "eu1", "prefix": "/srv/dn-sandbox/eu1", "admin_sources": ["10.231.1.1/32", "2001:db8::/48"]})


def tenant(slug="acme", **over):
    data = {"slug": slug, "domains": [f"{slug}.example"], "image": "dn.local/sgtm-standin:1",
            "subnet": "10.210.0.0/28", **over}
    return parse_tenant(data, plans={"standard": PlanConfig()}, host_view=True)


# --------------------------------------------------------------------------- common


def test_file_changes_and_digest():
    desired = {"/a": b"1", "/b": b"2", "/c": None, "/d": None}
    current = {"/a": b"1", "/b": b"x", "/c": b"old", "/d": None}
    assert [(c.action, c.target) for c in file_changes(desired, current)] == [("update", "/b"), ("delete", "/c")]
    assert [c.action for c in file_changes({"/n": b""}, {})] == ["create"]
    assert digest({"/a": b"1", "/b": None}) == digest([("/b", None), ("/a", b"1")])  # order does not matter
    assert digest({"/a": b"1"}) != digest({"/a": b"1 "}) != digest({"/a": None})
    assert digest({"/a": b""}) != digest({"/a": None})  # empty is not absent


def test_plan_description():
    p = Plan("nginx base on h", (Change("update", "/x", "differs"), Change("reload", "nginx", "changed")), ("n1",))
    assert p.describe() == ["nginx base on h: 2 change(s)", "  update /x: differs", "  reload nginx: changed", "  note: n1"]
    assert p.has("reload") and not p.has("start") and p.targets("update") == ["/x"]
    assert p.to_dict()["changes"][0] == {"action": "update", "target": "/x", "reason": "differs"}
    assert Plan("r").empty and Plan("r").describe() == ["r: no change"]


# --------------------------------------------------------------------------- nginx

PS = """\
    1       0 /sbin/init
19700       1 nginx: master process /usr/sbin/nginx -c /srv/dn-sandbox/eu1/etc/nginx/nginx.conf
 8579   19700 nginx: worker process
 8580   19700 nginx: worker process is shutting down
 8581   19700 nginx: cache manager process
24498       1 nginx: master process nginx -c /tmp/other.conf
24500   24498 nginx: worker process
"""


def test_ps_parsing_finds_the_master_and_its_serving_workers():
    procs = hn.parse_ps(PS)
    assert hn.master_of(procs, 19700) == 19700
    assert hn.master_of(procs, 8579) is None and hn.master_of(procs, 4242) is None and hn.master_of(procs, None) is None
    assert hn.serving_workers(procs, 19700) == {8579}
    assert hn.log_errors("x [notice] 1#1: signal\n2024 [emerg] 2#2: bad\n[alert] y\n") == ["2024 [emerg] 2#2: bad", "[alert] y"]


def _state(files, loaded=None, master=100, missing=()):
    return hn.NginxState(files, loaded, master, missing)


def test_nginx_plans():
    unit = hn.vhost_unit(HOST, tenant())
    path, content = next(iter(unit.files.items()))
    actions = lambda p: [c.action for c in p.changes]  # noqa: E731
    assert actions(hn.plan(unit, _state({path: None}))) == ["create", "reload"]
    assert actions(hn.plan(unit, _state({path: b"old"}, "d"))) == ["update", "reload"]
    assert hn.plan(unit, _state({path: content}, unit.digest)).empty
    # files in place but never loaded (an apply stopped between swap and reload): reload only
    rerun = hn.plan(unit, _state({path: content}, "another digest"))
    assert actions(rerun) == ["reload"] and "never loaded" in rerun.changes[0].reason
    assert actions(hn.plan(unit, _state({path: content}, unit.digest, master=None))) == ["start"]
    assert actions(hn.plan(unit, _state({path: None}, master=None))) == ["create", "start"]
    missing = hn.plan(unit, _state({path: None}, missing=unit.requires[:1]))
    assert missing.notes and unit.requires[0] in missing.notes[0]


def test_nginx_removal_plans():
    t = tenant()
    gone = hn.vhost_removal(HOST, t)
    path = rn.vhost_path(HOST, t)
    actions = lambda s: [c.action for c in hn.plan(gone, s).changes]  # noqa: E731
    assert actions(_state({path: b"x"}, "d")) == ["delete", "reload"]
    assert actions(_state({path: None}, "d")) == ["reload"]  # removed, but nginx may still serve it
    assert actions(_state({path: b"x"}, "d", master=None)) == ["delete"]
    assert actions(_state({path: None}, "d", master=None)) == ["forget"]
    assert actions(_state({path: None}, None)) == []


def test_units_name_their_files_and_requirements():
    t = tenant()
    unit = hn.vhost_unit(HOST, t)
    assert list(unit.files) == ["/srv/dn-sandbox/eu1/etc/nginx/dn/vhosts/acme.conf"]
    assert unit.requires == (*rn.cert_paths(HOST, t), "/srv/dn-sandbox/eu1/var/lib/dn/nginx/base.loaded")
    assert b"limit_req_zone" in unit.files[rn.vhost_path(HOST, t)]  # the tenant's zones are in its own file
    base = hn.base_unit(HOST)
    assert sorted(base.files) == ["/srv/dn-sandbox/eu1/etc/nginx/dn/ffdhe2048.pem", "/srv/dn-sandbox/eu1/etc/nginx/nginx.conf"]
    # the base does not depend on the tenants: a tenant stack never has to touch it
    assert rn.render_base(HOST) == rn.render_base(HOST, [tenant("acme"), tenant("bravo", subnet="10.210.0.16/28")])
    assert b"limit_req_zone" not in base.files["/srv/dn-sandbox/eu1/etc/nginx/nginx.conf"]


# --------------------------------------------------------------------------- firewall

# iptables-save of the sandbox host with only Docker's rules (recorded).
DOCKER_ONLY = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Nov 26 18:13:47 2026
*filter
:INPUT ACCEPT [50:6568]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
# Completed on Thu Nov 26 18:13:47 2026
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.231.64.0/24 ! -o docker0 -j MASQUERADE
COMMIT
"""
ADMIN = fw.Admin("10.231.1.1", "10.231.1.2", 22, "eth0")


def state(admin=ADMIN, v4=DOCKER_ONLY, v6="") -> fw.FirewallState:
    saved = {4: v4, 6: v6}
    return fw.FirewallState(saved, {f: parse_save(t) for f, t in saved.items()}, admin)


def test_ssh_connection_and_route_parsing():
    assert fw.parse_ssh_connection("10.231.1.1 40022 10.231.1.2 22") == ("10.231.1.1", "10.231.1.2", 22)
    assert fw.parse_ssh_connection("2001:db8::5 40022 2001:db8::1 2222") == ("2001:db8::5", "2001:db8::1", 2222)
    assert fw.parse_ssh_connection("::ffff:192.0.2.7 1 ::ffff:192.0.2.1 22") == ("192.0.2.7", "192.0.2.1", 22)
    assert fw.parse_ssh_connection("") is None and fw.parse_ssh_connection("a b c d") is None
    assert fw.parse_route_dev("10.231.1.1 dev eth0 src 10.231.1.2 uid 0 \\    cache") == "eth0"
    assert fw.parse_route_dev("local 10.231.1.2 dev lo table local") == "lo"


def test_filter_section_and_normalized_ignore_counters_and_comments():
    text = fw.filter_section(DOCKER_ONLY)
    assert text.startswith("*filter\n:INPUT ACCEPT [50:6568]") and text.endswith("COMMIT\n") and "#" not in text
    assert "*nat" not in text
    assert fw.normalized(DOCKER_ONLY) == fw.normalized(DOCKER_ONLY.replace("[50:6568]", "[0:0]"))
    assert fw.normalized(DOCKER_ONLY) != fw.normalized(DOCKER_ONLY.replace("-A DOCKER-USER -j RETURN\n", ""))
    assert fw.filter_section("") == "*filter\nCOMMIT\n"


def _after_baseline(host=HOST, family=4):
    rs = render_baseline(host)[family]
    return fw.simulate([rs], parse_save(DOCKER_ONLY) if family == 4 else {})


@pytest.mark.parametrize(
    "source, port, iface, verdict",
    [
        ("10.231.1.1", 22, "eth0", "ACCEPT"),  # admin source
        ("10.231.1.9", 22, "eth0", "DROP"),  # anyone else
        ("10.231.1.9", 443, "eth0", "ACCEPT"),
        ("203.0.113.5", 80, "eth0", "ACCEPT"),
        ("203.0.113.5", 8080, "eth0", "DROP"),
        ("10.210.0.2", 22, "dnt0123456789ab", "DROP"),  # from a tenant bridge, even to port 22
        # interface unknown: it could be a tenant bridge, whose traffic is dropped; so, conservatively, no
        ("10.231.1.1", 22, None, "DROP"),
        ("127.0.0.1", 5432, "lo", "ACCEPT"),
    ],
)
def test_baseline_verdicts_for_new_connections(source, port, iface, verdict):
    table = _after_baseline()
    assert fw.evaluate(table, fw.Packet(source, "10.231.1.2", port, iface)) == verdict


def test_evaluation_is_conservative_about_matches_it_cannot_judge():
    t = parse_save("*filter\n:INPUT DROP [0:0]\n-A INPUT -m recent --rcheck -j ACCEPT\nCOMMIT\n")["filter"]
    assert fw.evaluate(t, fw.Packet("10.0.0.1", "10.0.0.2", 22, "eth0")) == "DROP"  # unknown never accepts
    t = parse_save("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m recent --rcheck -j DROP\nCOMMIT\n")["filter"]
    assert fw.evaluate(t, fw.Packet("10.0.0.1", "10.0.0.2", 22, "eth0")) == "DROP"  # but may drop
    t = parse_save("*filter\n:INPUT DROP [0:0]\n-A INPUT ! -s 10.0.0.0/8 -j DROP\n-A INPUT -p tcp -m multiport "
                   "--dports 20:25,80 -j ACCEPT\nCOMMIT\n")["filter"]
    assert fw.evaluate(t, fw.Packet("10.0.0.1", "10.0.0.2", 22, "eth0")) == "ACCEPT"
    assert fw.evaluate(t, fw.Packet("192.0.2.1", "10.0.0.2", 22, "eth0")) == "DROP"
    assert fw.evaluate(t, fw.Packet("10.0.0.1", "10.0.0.2", 26, "eth0")) == "DROP"


def test_simulate_puts_hooks_once_at_the_top():
    rs = render_baseline(HOST)[4]
    twice = DOCKER_ONLY.replace("-A DOCKER-USER -j RETURN", "-A DOCKER-USER -j DN-TENANTS-FWD\n-A DOCKER-USER -j RETURN\n"
                                "-A DOCKER-USER -j DN-TENANTS-FWD").replace(":DOCKER-USER - [0:0]",
                                                                           ":DOCKER-USER - [0:0]\n:DN-TENANTS-FWD - [0:0]")
    t = fw.simulate([rs], parse_save(twice))
    assert t.chain("INPUT")[0] == ("-j", "DN-INPUT") and t.count("INPUT", ("-j", "DN-INPUT")) == 1
    assert t.chain("DOCKER-USER") == [("-j", "RETURN"), ("-j", "DN-TENANTS-FWD")]  # "-D" removes the first
    assert t.policies["INPUT"] == "DROP" and t.chain("DN-INPUT") == rs.expected()["DN-INPUT"]


def test_baseline_plan_and_admin_refusals():
    p = fw.plan(fw.baseline_rulesets(HOST), state(), name="baseline", where="h")
    assert [c.target for c in p.changes] == ["IPv4 filter", "IPv6 filter"]
    assert not [n for n in p.notes if n.startswith("refused")] and p.touches_admin
    assert dict(p.restore)[4].startswith("*filter\n:INPUT DROP [0:0]")
    # the admin would lose access
    locked = parse_host({"name": "eu1", "admin_sources": ["192.0.2.0/24"]})
    refused = fw.plan(fw.baseline_rulesets(locked), state(), name="baseline")
    assert any("10.231.1.1" in n and "lock itself out" in n for n in refused.notes)
    # an IPv4 admin is not affected by an IPv6-only concern, and vice versa
    v6admin = fw.Admin("2001:db8::9", "2001:db8::1", 22, "eth0")
    assert not [n for n in fw.plan(fw.baseline_rulesets(HOST), state(v6admin), name="b").notes if "refused" in n]
    v6locked = parse_host({"name": "eu1", "admin_sources": ["10.231.1.1/32"]})
    assert [n for n in fw.plan(fw.baseline_rulesets(v6locked), state(v6admin), name="b").notes if "lock itself out" in n]
    # unknown admin address: no INPUT change blind
    assert any("SSH_CONNECTION" in n for n in fw.plan(fw.baseline_rulesets(HOST), state(None), name="b").notes)


def test_tenant_plans_and_missing_chains():
    t = tenant()
    rss = fw.tenant_rulesets(HOST, t)
    p = fw.plan(rss, state(), name="tenant acme")
    assert len(p.changes) == 1 and not p.touches_admin and not p.notes
    # applied already: nothing to do
    applied = fw.simulate(rss, parse_save(DOCKER_ONLY))
    lines = ["*filter"] + [f":{c} {pol or '-'} [0:0]" for c, pol in applied.policies.items()]
    lines += [" ".join(["-A", c, *r]) for c, rules in applied.rules.items() for r in rules] + ["COMMIT"]
    assert fw.plan(rss, state(v4="\n".join(lines) + "\n"), name="t").empty
    # a hook into a chain that is neither declared nor on the host is refused
    odd = Ruleset(family=4, chains=("DN-X",), rules=(("DN-X", ("-j", "ACCEPT")),), hooks=(Hook("NOPE", ("-j", "DN-X")),))
    notes = fw.plan([odd], state(), name="odd").notes
    assert any(n.startswith("refused") and "NOPE" in n for n in notes)


def test_removal_plans():
    t = tenant()
    rss = fw.tenant_rulesets(HOST, t)
    with_tenant = fw.simulate([*fw.baseline_rulesets(HOST)[:1], *rss], parse_save(DOCKER_ONLY))
    lines = ["*filter"] + [f":{c} {pol or '-'} [0:0]" for c, pol in with_tenant.policies.items()]
    lines += [" ".join(["-A", c, *r]) for c, rules in with_tenant.rules.items() for r in rules] + ["COMMIT"]
    st = state(v4="\n".join(lines) + "\n")
    rp = fw.removal_plan(rss, st, name="tenant acme")
    text = dict(rp.restore)[4]
    assert f"-X {t.chain_forward}" in text and f"-D DN-TENANTS-FWD -i {t.bridge} -g {t.chain_forward}" in text
    base = fw.removal_plan(fw.baseline_rulesets(HOST)[:1], st, name="baseline", open_input=True,
                           drop_shared=("DN-TENANTS-IN", "DN-TENANTS-FWD"))
    assert ":INPUT ACCEPT [0:0]" in dict(base.restore)[4]
    assert any("kept" in n and "DN-TENANTS-FWD" in n for n in base.notes)  # the tenant is still hooked


# --------------------------------------------------------------------------- LUKS

# cryptsetup luksDump --dump-json-metadata of a fresh volume (salts shortened).
FRESH = {
    "keyslots": {"0": {"type": "luks2", "key_size": 64, "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                       "area": {"type": "raw", "offset": "32768", "size": "258048", "encryption": "aes-xts-plain64",
                                "key_size": 64},
                       "kdf": {"type": "argon2id", "time": 4, "memory": 541374, "cpus": 2, "salt": "kCZy"}}},
    "tokens": {},
    "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic", "iv_tweak": "0",
                       "encryption": "aes-xts-plain64", "sector_size": 4096}},
    "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256"}},
    "config": {"json_size": "12288", "keyslots_size": "16744448"},
}
ERASED = {**FRESH, "keyslots": {}}
SPEC = luks.volume_spec(HOST, tenant())


def test_luks_json_parsing():
    h = luks.parse_luks_json(json.dumps(FRESH))
    assert (h.cipher, h.key_bits, h.sector_size) == ("aes-xts-plain64", 512, 4096)
    assert h.keyslots == (luks.Keyslot(0, 512, "aes-xts-plain64", "argon2id"),) and not h.problems(SPEC)
    e = luks.parse_luks_json(json.dumps(ERASED))
    assert e.keyslots == () and e.key_bits is None
    weak = json.loads(json.dumps(FRESH))
    weak["segments"]["0"]["encryption"] = "aes-cbc-essiv:sha256"
    weak["keyslots"]["0"]["key_size"] = 32
    weak["keyslots"]["0"]["kdf"]["type"] = "pbkdf2"
    problems = luks.parse_luks_json(json.dumps(weak)).problems(SPEC)
    assert len(problems) == 3 and "aes-cbc-essiv:sha256" in problems[0] and "256 bits" in problems[1]
    for bad in ("", "{}", "[1]", '{"segments": {}, "keyslots": {}}'):
        with pytest.raises(ValueError):
            luks.parse_luks_json(bad)


def test_volume_spec_paths_follow_the_host_prefix():
    assert SPEC.image == "/srv/dn-sandbox/eu1/var/lib/dn/volumes/acme.luks"
    assert SPEC.mount == "/srv/dn-sandbox/eu1/srv/dn/tenants/acme" and SPEC.mapper_path == "/dev/mapper/dn-acme"
    assert SPEC.size == 256 * 1024 * 1024 and (SPEC.cipher, SPEC.key_bits, SPEC.pbkdf) == ("aes-xts-plain64", 512, "argon2id")


def _actions(state, **kw):
    return [c.action for c in luks.plan(SPEC, state, **kw).changes]


def test_luks_plans_without_and_with_device_mapper():
    fresh = luks.parse_luks_json(json.dumps(FRESH))
    assert _actions(luks.VolumeState(False)) == ["allocate", "format", "verify"]
    assert luks.DM_MISSING in luks.plan(SPEC, luks.VolumeState(False)).notes
    assert _actions(luks.VolumeState(False, dm=True)) == ["allocate", "format", "verify", "open", "mkfs", "mount"]
    done = luks.VolumeState(True, SPEC.size, True, fresh, dm=True, opened=True, mounted=True)
    assert _actions(done) == [] and not luks.plan(SPEC, done).notes
    assert _actions(luks.VolumeState(True, SPEC.size, True, fresh, dm=True, opened=True)) == ["mount"]
    assert _actions(luks.VolumeState(True, SPEC.size, True, fresh)) == []
    assert _actions(luks.VolumeState(True, SPEC.size, True, fresh), verify_key=True) == ["verify"]
    assert _actions(luks.VolumeState(True, SPEC.size // 2, True, fresh)) == ["grow"]
    # an interrupted create: the file exists, blank, not LUKS yet
    assert _actions(luks.VolumeState(True, SPEC.size, False, blank=True)) == ["format", "verify"]
    # a create killed inside luksFormat: a header and no keyslot, which no key opens: formatted anew
    erased = luks.VolumeState(True, SPEC.size, True, luks.parse_luks_json(json.dumps(ERASED)))
    assert _actions(erased) == ["format", "verify"]
    assert not [n for n in luks.plan(SPEC, erased).notes if n.startswith("refused:")]


@pytest.mark.parametrize(
    "state, why",
    [
        (luks.VolumeState(True, SPEC.size, False, blank=False), "holds data"),
        (luks.VolumeState(True, SPEC.size * 2, True, luks.parse_luks_json(json.dumps(FRESH))), "shrinking"),
    ],
)
def test_luks_refusals(state, why):
    notes = luks.plan(SPEC, state).notes
    assert any(n.startswith("refused:") and why in n for n in notes), notes


def test_keys():
    k = luks.new_key()
    assert len(k) == 64 and luks.new_key() != k
    assert luks.key_fingerprint(k) == luks.key_fingerprint(bytes(k)) != luks.key_fingerprint(luks.new_key())
    assert k.hex() not in luks.key_fingerprint(k)
    with pytest.raises(luks.InvalidInput):
        luks.check_key(b"short")


def test_luks_removal_plan():
    fresh = luks.parse_luks_json(json.dumps(FRESH))
    st = luks.VolumeState(True, SPEC.size, True, fresh, dm=True, opened=True, mounted=True,
                          header_backups=(SPEC.image + ".header",))
    assert [c.action for c in luks.removal_plan(SPEC, st).changes] == ["umount", "close", "erase", "erase", "delete"]
    assert luks.removal_plan(SPEC, luks.VolumeState(False)).empty


# --------------------------------------------------------------------------- timers


def test_timer_sets_and_plans():
    t = tenant()
    ts = ht.tenant_timers(HOST, t)
    assert ts.timers == ("dn-backup-acme.timer",)
    assert sorted(ts.files) == ["/srv/dn-sandbox/eu1/etc/systemd/system/dn-backup-acme.service",
                                "/srv/dn-sandbox/eu1/etc/systemd/system/dn-backup-acme.timer"]
    hs = ht.host_timers(HOST, ScheduleConfig())
    assert "dn-health.timer" in hs.timers and not [u for u in hs.timers if "acme" in u]
    none = {p: None for p in ts.files}
    off = ht.TimerState(none, False, True, {}, "systemd is not running on this host")
    p = ht.plan(ts, off)
    assert [c.action for c in p.changes] == ["create", "create"] and "systemd is not running" in p.notes[0]
    on = ht.TimerState(none, True, True, {})
    assert [c.action for c in ht.plan(ts, on).changes] == ["create", "create", "daemon-reload", "enable"]
    enabled = ht.TimerState(dict(ts.files), True, True, {"dn-backup-acme.timer": True})
    assert ht.plan(ts, enabled).empty
    assert [c.action for c in ht.plan(ts.without(), enabled).changes] == ["disable", "delete", "delete", "daemon-reload"]
    assert ht.plan(ts.without(), ht.TimerState(none, False, True, {})).empty
