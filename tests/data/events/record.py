"""Record the engine event streams the preview renderer is tested on (tests/unit/test_preview*.py).

Every stream here comes from the real Pulumi engine (dn setup's CLI) running dn's own stacks
against the sandbox EU host, with dn's policy pack, through ``dn.tenants.run_stack``; debug
diagnostics are left out (as dn itself leaves them out). Run it as root on a machine with the
sandbox up (``dn sandbox up``); it holds the shared sandbox host's lock, uses a scratch data dir
and state backend, and removes everything it created (it puts dn's host baseline back):

    .venv/bin/python tests/data/events/record.py

Streams (``<name>.json``: a list of engine events as ``dn.engine.event_dict`` makes them):

host-create                  preview of the host baseline stack on an empty state (creates)
host-no-changes              preview right after ``up`` (nothing to do)
host-update-admin-source     preview after ``up`` with a second admin source (a firewall update)
host-refresh-drift           refresh after a rule was added to DN-INPUT by hand (drift)
tenant-create                preview of a new tenant (every resource created)
tenant-update-rate-limits    preview after ``up`` with a plan of higher rate limits (vhost update)
tenant-replace-network-fails preview with another subnet: the network would be replaced, but the
                             dn-ssh container provider fails its diff while the replaced
                             network's name is unknown (an error stream: the preview fails)
tenant-remove-preview        preview with the preview server switched off (a container deleted)
tenant-move-prefix           preview with the host's files under another prefix (the LUKS
                             volume and every file-backed resource replaced)
tenant-destroy               preview of an empty program over the tenant's stack (every delete)
tenant-policy-violation      preview under a policy configuration that does not allow the image's
                             registry (mandatory violations from the pack)
huge-<a,b,c>                 previews of three new tenants with 50 long domains each
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

OUT = Path(__file__).resolve().parent
CONTAINER_CONFIG = "cmVjb3JkZWQtY29udGFpbmVyLWNvbmZpZy1zZWNyZXQ="  # shows as [secret] in every stream
SLUG = "rec-acme"
DOMAIN = "gtm.rec-acme.example"


def save(name: str, events: list[dict]) -> None:
    (OUT / f"{name}.json").write_text(json.dumps(events, indent=1, sort_keys=True) + "\n")
    text = (OUT / f"{name}.json").read_text()
    assert CONTAINER_CONFIG not in text, f"{name}: the secret leaked into the stream"
    print(f"{name}: {len(events)} events, {len(text) // 1024} KiB")


def settings_for(data_dir: Path, **changes):
    from dn.config import Settings, embedded_default

    base = embedded_default(Path("/srv/dn-sandbox/test-data"))
    base["data_dir"] = str(data_dir)
    pf = data_dir / "passphrase"
    if not pf.exists():
        pf.write_text("recorder passphrase\n")
        pf.chmod(0o600)
    base["secrets"] = {"passphrase_file": str(pf)}
    base["plans"] = {"standard": {}, "busy": {"rate_per_ip": 25, "burst_per_ip": 50, "rate_per_tenant": 600,
                                              "burst_per_tenant": 1200}}
    from tests.stacks.e2e import with_changes

    with_changes(base, changes)
    return Settings.model_validate({**base, "source": "tests/data/events/record.py"})


def spec_for(settings, slug: str = SLUG, **over):
    from dn.models import parse_tenant

    data = {"slug": slug, "domains": [DOMAIN], "image": "dn.local/sgtm-standin:1", "subnet": "10.210.230.0/28",
            "container_config": CONTAINER_CONFIG, **over}
    return parse_tenant(data, plans=settings.plans)


def run(settings, st, op: str, name: str | None = None) -> list[dict]:
    from dn import tenants
    from dn.errors import DnError

    events: list[dict] = []
    try:
        tenants.run_stack(settings, st, op, events=events)
    except DnError as e:
        print(f"  ({op} ended with: {str(e).splitlines()[0]})")
    if name:
        save(name, events)
    return events


def tenant_stack(settings, spec, env):
    from dn import tenants

    host_view = spec.model_copy(update={"container_config": None})
    st = tenants.tenant_stack(settings, host_view, [], env, host=settings.default_host)
    tenants.ensure_secrets(settings, st, spec.container_config.get_secret_value())
    return st


def main() -> None:
    import fcntl

    from dn import engine, ssh, tenants
    from dn.host import firewall as hf
    from dn.host import nginx as hn
    from dn.models import HostBaseline
    from tests.integration.test_tenant_cli import self_signed
    from tests.fixtures.sandbox import HOST_LOCK
    from tests.stacks import e2e

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    e2e.ensure_host_dn()
    data_dir = Path(tempfile.mkdtemp(prefix="dn-record-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DN_")}
    env["DN_DOCKER_BACKEND"] = "dn-ssh"
    lock = open(HOST_LOCK, "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    settings = settings_for(data_dir)
    host = HostBaseline.from_settings(settings)
    crt, key = self_signed(host, DOMAIN)
    try:
        # -- host baseline
        hst = tenants.host_stack(settings, host, env)
        run(settings, hst, "preview", "host-create")
        run(settings, hst, "up")
        run(settings, hst, "preview", "host-no-changes")
        wider = settings_for(data_dir, **{"hosts.sandbox-eu1.admin_sources": ["10.231.1.1/32", "192.0.2.0/24"]})
        run(wider, tenants.host_stack(wider, HostBaseline.from_settings(wider), env), "preview",
            "host-update-admin-source")
        from dn import sandbox as sb

        sb.ns_exec(["iptables", "-w", "-I", "DN-INPUT", "1", "-p", "tcp", "-m", "tcp", "--dport", "2375", "-j", "ACCEPT"])
        run(settings, hst, "refresh", "host-refresh-drift")
        run(settings, hst, "up")

        # -- one tenant
        spec = spec_for(settings)
        st = tenant_stack(settings, spec, env)
        run(settings, st, "preview", "tenant-create")
        run(settings, st, "up")
        run(settings, tenant_stack(settings, spec_for(settings, plan="busy"), env), "preview", "tenant-update-rate-limits")
        run(settings, tenant_stack(settings, spec_for(settings, subnet="10.210.230.16/28"), env), "preview",
            "tenant-replace-network-fails")
        run(settings, tenant_stack(settings, spec_for(settings, preview=False), env), "preview", "tenant-remove-preview")
        moved = settings_for(data_dir, **{"hosts.sandbox-eu1.prefix": "/srv/dn-sandbox/eu1-moved"})
        run(moved, tenant_stack(moved, spec_for(moved), env), "preview", "tenant-move-prefix")
        strict = settings_for(data_dir, **{"images.allowed_registries": ["gcr.io/cloud-tagging-10302018/"]})
        run(strict, tenant_stack(strict, spec_for(strict), env), "preview", "tenant-policy-violation")
        from stacks.programs import provider_env

        empty = engine.stack(settings, SLUG, lambda: None, environ=env, extra_env=provider_env())
        run(settings, empty, "preview", "tenant-destroy")

        # -- three new tenants with 50 long domains each (previews only)
        for i, part in enumerate("abc"):
            slug = f"rec-huge-{part}"
            label = "x" * 40
            domains = [f"d{n:02d}-{label}.{label}.{label}.{label}.{label}.rec-huge-{part}.example" for n in range(50)]
            huge = spec_for(settings, slug=slug, domains=domains, subnet=f"10.210.231.{16 * i}/28")
            hs = tenant_stack(settings, huge, env)
            run(settings, hs, "preview", f"huge-{part}")
            engine.stack(settings, slug, lambda: None, environ=env).workspace.remove_stack(slug)
        # destroy with the real program, then the host baseline's own stack
        run(settings, tenant_stack(settings, spec, env), "destroy")
        run(settings, hst, "destroy")
    finally:
        with ssh.connect(settings.host()) as s:
            hf.converge_baseline(s, host)
            hn.ensure_base(s, host)
        crt.unlink(missing_ok=True)
        key.unlink(missing_ok=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
    print(f"recorded at {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%MZ}")


if __name__ == "__main__":
    main()
