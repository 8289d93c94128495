"""The tenants a host should run, as far as verify needs them: the registry rows (platform
database ``tenants``) and the names dn derives from a slug.

Every name that ties a tenant to a resource on the host — Docker network and bridge, containers,
iptables chains, nginx vhost file, LUKS volume — is a function of the slug alone
(dn.models.TenantSpec documents them), so the checks can find a tenant's resources from the
registry without the full spec. ``tests/unit/test_verify_names.py`` holds these equal to
TenantSpec's own properties.
"""
from __future__ import annotations

from dataclasses import dataclass

from dn.models import SlugNames

NETWORK_PREFIX = "dn-t-"
VHOST_DIR = "/etc/nginx/dn/vhosts"  # dn.render.nginx.VHOST_DIR


@dataclass(frozen=True)
class TenantNames(SlugNames):
    """A registered tenant's slug-derived names (dn.models.SlugNames) and its registry status."""

    slug: str
    status: str = "active"

    @property
    def containers(self) -> tuple[str, str]:
        return self.tagging_container, self.preview_container

    @property
    def mapper(self) -> str:
        return self.mapper_name

    @property
    def vhost_file(self) -> str:
        return f"{VHOST_DIR}/{self.slug}.conf"


def registered(rows: list[dict]) -> list[TenantNames]:
    """TenantNames for registry rows (``slug``, ``status``)."""
    return [TenantNames(r["slug"], r.get("status") or "active") for r in rows]


def slug_of_network(name: str) -> str | None:
    return name[len(NETWORK_PREFIX):] if name.startswith(NETWORK_PREFIX) else None
