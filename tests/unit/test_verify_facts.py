"""Pure readings behind storage.luks, the backup checks and the tenant names verify derives."""
from __future__ import annotations

import json
from datetime import date, datetime, timezone, UTC

import pytest

from dn.backup.store import Listing
from dn.host.luks import parse_luks_json
from dn.config import PlanConfig
from dn.models import parse_tenant
from dn.verify import backups, storage
from dn.verify.tenants import TenantNames

PLANS = {"standard": PlanConfig()}


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("dsn, port", [
    ("postgresql://dn@127.0.0.1:54329/dn", 54329),
    ("postgresql://dn@db.example/dn", 5432),
    ("host=10.0.0.2 port=6432 dbname=dn user=dn", 6432),
    ("host=10.0.0.2 dbname=dn", 5432),
])
def test_dsn_port(dsn, port):
    assert storage.dsn_port(dsn) == port


def _meta(cipher="aes-xts-plain64", key_bytes=64, slots=1, kdf="argon2id"):
    return json.dumps({
        "keyslots": {str(i): {"type": "luks2", "key_size": key_bytes, "kdf": {"type": kdf},
                              "area": {"encryption": cipher, "key_size": key_bytes}} for i in range(slots)},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic", "encryption": cipher,
                           "sector_size": 4096}},
        "digests": {}, "config": {}, "tokens": {}})


def test_luks_header_findings():
    assert storage.header_findings("v", parse_luks_json(_meta())) == []
    assert storage.header_findings("v", parse_luks_json(_meta(key_bytes=32))) == [
        "v: volume key 256 bits (must be 512: AES-256 in XTS mode)"]
    assert storage.header_findings("v", parse_luks_json(_meta(cipher="aes-cbc-essiv:sha256"))) == [
        "v: data cipher aes-cbc-essiv:sha256 (must be aes-xts-plain64)"]
    assert storage.header_findings("v", parse_luks_json(_meta(slots=0))) == [
        "v: no keyslot left (the volume can never be opened)"]


def test_luks_version_and_status():
    assert storage.luks_version("LUKS header information\nVersion:       \t2\nEpoch: 3\n") == 2
    assert storage.luks_version("LUKS header information for x\n\nVersion:       \t1\n") == 1
    assert storage.luks_version("not luks") is None
    st = storage.parse_status("/dev/mapper/pg is active and is in use.\n  type:    LUKS2\n  cipher:  aes-xts-plain64\n"
                              "  keysize: 512 bits\n  device:  /dev/sdb\n")
    assert st["type"] == "LUKS2" and st["keysize"] == "512 bits" and st["device"] == "/dev/sdb"


# --------------------------------------------------------------------------- backups


def test_daily_gaps_and_spans():
    days = {date(2026, 11, d) for d in (1, 2, 5, 6, 9)}
    gaps = backups.daily_gaps(days, date(2026, 11, 1), date(2026, 11, 9))
    assert backups._spans(gaps) == "2026-11-03..2026-11-04, 2026-11-07..2026-11-08"
    assert backups._spans([date(2026, 11, 3)]) == "2026-11-03"


def test_drills_merge_history_and_region_verdicts():
    t = datetime(2026, 11, 20, 4, tzinfo=UTC)
    history = [{"drill_id": "d1", "started_at": t.isoformat(), "result": "passed", "rto_seconds": 12.5,
                "backup": {"id": "b1"}},
               {"file": "/x.json", "result": "unreadable"}]
    listings = [
        Listing("20261120T023000Z-aaaaaa", t, None, {"drill_id": "d1", "at": t.isoformat(), "ok": True}),
        Listing("20261125T023000Z-bbbbbb", t, None, {"drill_id": "d2", "at": "2026-11-25T04:00:00+00:00",
                                                    "ok": False, "result": "failed", "rto_seconds": None}),
    ]
    got = backups.drills(history, listings)
    assert [(d["id"], d["result"], d["where"]) for d in got] == [("d1", "passed", "drill history"),
                                                                ("d2", "failed", "second region")]


def test_months_between():
    assert backups._months_between(date(2025, 11, 5), date(2026, 2, 1)) == [(2025, 11), (2025, 12), (2026, 1), (2026, 2)]


# --------------------------------------------------------------------------- names


def test_names_match_the_tenant_spec():
    spec = parse_tenant({"slug": "shop-eu", "domains": ["shop.example"], "image": "dn.local/x:1",
                         "subnet": "10.210.0.0/28"}, plans=PLANS, host_view=True)
    n = TenantNames("shop-eu")
    assert (n.bridge, n.network, n.containers, n.chain_forward, n.chain_input, n.volume_image, n.mapper) == (
        spec.bridge, spec.network, (spec.tagging_container, spec.preview_container), spec.chain_forward,
        spec.chain_input, spec.volume_image, spec.mapper_name)
    from dn.render.nginx import VHOST_DIR

    assert n.vhost_file == f"{VHOST_DIR}/{spec.slug}.conf"
