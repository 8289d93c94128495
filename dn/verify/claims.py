"""Every claim `dn verify` checks, in the order of the trust page, with its stable id.

The ``claim`` text quotes the trust page (../shared/trust-center.md in the project's design
notes); ``method`` says how the check establishes it. Ids never change: the evidence history and
anyone reading it depend on them.
"""
from __future__ import annotations

from dn.verify import access, auditlog, backups, data, hostkey, network, nginx, shredding, storage
from dn.verify.core import Claim
from dn.verify.state import check_state_purged

CLAIMS: tuple[Claim, ...] = (
    Claim("net.public-ports",
          "Only 80/443 exposed publicly, everything else behind a firewall",
          "listening sockets (ss -ltnu); the IPv4/IPv6 firewall (iptables-save: INPUT policy, every rule that "
          "accepts new connections or forwards a port); a TCP connect scan of the host's address from dn's side "
          "(ports 1-1024, common service ports, every listening port)",
          network.check_public_ports),
    Claim("net.admin-ssh",
          "who has access to the production systems? … Only the founder … SSH keys with a passphrase",
          "every firewall rule that accepts SSH must be limited to the configured admin sources "
          "(hosts.<name>.admin_sources), IPv4 and IPv6",
          network.check_admin_ssh),
    Claim("access.ci-preview-read-only",
          "who has access to the production systems? … Only the founder",
          "the database catalogue: the CI preview's role dn_preview (what a pull request's preview holds) is "
          "NOLOGIN, may write no relation, read only the tenant registry (tenants, tenant_settings) and execute "
          "no SECURITY DEFINER function; no role that is it or a member of it is a superuser, may create roles or "
          "bypass row security, or is a member of any other role",
          access.check_preview_read_only),
    Claim("ssh.host-key",
          "who has access to the production systems? … Only the founder … SSH keys with a passphrase",
          "one SSH handshake per host-key type (no login): the host presents a key pinned in the current "
          "configuration (host_key / known_hosts, never a pin recorded in a stack's state) and no key marked "
          "@revoked there, under any type",
          hostkey.check_host_key),
    Claim("net.tenant-isolation",
          "Per-tenant Docker network namespaces + iptables; No access between sGTM containers",
          "docker network inspect (own bridge network per tenant, enable_icc=false), docker inspect (each sGTM "
          "container attached only to its tenant's network, no container publishes a port), the tenant's "
          "iptables chains and hooks, and connections attempted from each tenant container's network namespace "
          "to every other sGTM container and to the host's services",
          network.check_tenant_isolation),
    Claim("net.tenant-default-closed",
          "Per-tenant Docker network namespaces + iptables; No access between sGTM containers",
          "iptables-save, IPv4 and IPv6: traffic from a tenant bridge (dnt+) is dropped unless that tenant's own "
          "chain lets it through: FORWARD enters DOCKER-USER and DOCKER-USER enters DN-TENANTS-FWD before any "
          "accept, DN-TENANTS-FWD holds only per-bridge gotos and ends in the drop for dnt+, DN-INPUT drops dnt+ "
          "after DN-TENANTS-IN, IPv6 drops dnt+; so a new tenant's bridge, before its chain exists or after its "
          "apply failed, reaches nothing",
          network.check_tenant_default_closed),
    Claim("nginx.rate-limits",
          "Nginx reverse proxy with rate-limiting per IP and per tenant",
          "nginx -T: every location that proxies has a per-IP limit_req ($binary_remote_addr zone), a "
          "per-tenant limit_req (a zone keyed on a constant of its own) and a per-IP limit_conn",
          nginx.check_rate_limits),
    Claim("nginx.tls",
          "In transit: TLS 1.2 / 1.3",
          "nginx -T: ssl_protocols exactly TLSv1.2 TLSv1.3 everywhere; and TLS handshakes with every vhost "
          "(its own name as SNI): TLS 1.1 refused, 1.2 and 1.3 accepted, certificate not expired",
          nginx.check_tls),
    Claim("nginx.hsts",
          "Let's Encrypt auto-renewal, HSTS",
          "HTTPS requests to every vhost and each of its locations: Strict-Transport-Security with "
          "max-age ≥ 15552000 (180 days) on the live response",
          nginx.check_hsts),
    Claim("nginx.no-drift",
          "Nginx reverse proxy with rate-limiting per IP and per tenant; "
          "In transit: TLS 1.2 / 1.3, Let's Encrypt auto-renewal, HSTS",
          "every file nginx loads (nginx -T) equals what dn renders for the registered tenants, no other vhost "
          "is loaded, and no file changed after nginx last reloaded",
          nginx.check_no_drift),
    Claim("storage.luks",
          "At rest: LUKS disk encryption; DB: PostgreSQL on an encrypted disk",
          "cryptsetup luksDump of every tenant volume; the PostgreSQL data directory's mount and its dm-crypt "
          "mapping (cryptsetup status): LUKS2, aes-xts-plain64, 512-bit key (AES-256)",
          storage.check_luks),
    Claim("backup.fresh",
          "A daily pg_dump to a second EU region … RPO 24h",
          "the newest platform backup in the second region is at most 24 h old; each artifact's size and SHA-256 "
          "read back from the region match its manifest, and the manifest's MAC verifies with its data key "
          "(UNKNOWN when this machine cannot have the key); a newer backup whose manifest cannot be read fails",
          backups.check_fresh),
    Claim("backup.retention",
          "30-day retention",
          "retention.backup_daily_days ≥ 30; over the last 30 days every day since the series began has a "
          "platform backup, and dn's prune plan keeps one of each",
          backups.check_retention),
    Claim("backup.monthly",
          "Backups to a second EU region, 30-day retention (daily) + a monthly offline copy",
          "dn's prune plan keeps the first backup of each month (retention.backup_monthly_months ≥ 1), every "
          "complete month since the series began has one, and each complete month's copy was also copied offline "
          "(dn backup offline)",
          backups.check_monthly),
    Claim("dr.drill",
          "restore tested monthly. RPO 24h, RTO 4h for a full restore",
          "the newest restore drill (this machine's drill history and the verdicts in the second region) is at "
          "most 31 days old, passed, and its measured RTO is at most 4 h",
          backups.check_drill),
    Claim("audit.chain",
          "An append-only audit log of all privileged actions",
          "dn audit verify: every entry's hash, the chain links, the head row, the anchors (signed by a key pinned "
          "in audit.anchor_keys), the newest signed witness in the second region and this machine's witness",
          auditlog.check_chain),
    Claim("audit.witness",
          "An append-only audit log of all privileged actions",
          "the newest witness of the chain's head in the second region (a new signed file per witness, out of the "
          "database's reach) is signed by a pinned key and covers the whole chain or is at most 36 h old",
          auditlog.check_witness),
    Claim("audit.retention",
          "An append-only audit log of all privileged actions (90-day retention)",
          "no entry older than retention.audit_days (+1 day for the daily prune) remains; the chain starts right "
          "after the last signed anchor; no anchor pruned entries younger than 90 days",
          auditlog.check_retention),
    Claim("retention.events",
          "Event capture for debugging: 15 days",
          "no row of events older than 15 days (+1 day for the daily enforcement); retention.events_days ≤ 15",
          data.check_events),
    Claim("retention.aggregates",
          "Aggregated statistics (request log per hour): 24 months",
          "no row of hourly_stats older than 24 months (+1 day); retention.aggregates_months ≤ 24",
          data.check_aggregates),
    Claim("gdpr.deadlines",
          "Deletion happens within 30 days (a legal obligation)",
          "no deletion request open past its deadline, no deadline later than 30 days after receipt, no tenant "
          "cancelled more than 30 days ago and still not deleted",
          data.check_deadlines),
    Claim("gdpr.state-purged",
          "Deletion happens within 30 days (a legal obligation)",
          "for every tenant deleted (GDPR) or destroyed: no file of the Pulumi state backend (stack file, .bak, "
          "backups, history, locks) or of the stack work dirs (config and salt) names its stack",
          check_state_purged),
    Claim("gdpr.keys-shredded",
          "Deletion happens within 30 days (a legal obligation)",
          "for every tenant deleted (GDPR) and every crypto-shredded key owner: no key file in this machine's "
          "keystore, in the verified host's keystore (its timers' data dir, over SSH) or in the second region's "
          "escrow, and a tombstone for each deleted tenant in all three",
          shredding.check_keys_shredded),
    Claim("keys.no-retired",
          "Platform API keys: Fernet symmetric encryption in the DB, keys in the env",
          "no api_keys value remains encrypted under a retired Fernet key (dn keys status)",
          data.check_no_retired),
)


def ids() -> list[str]:
    return [c.id for c in CLAIMS]
