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

from dn.models import BRIDGE_PREFIX, short_hash

NETWORK_PREFIX = "dn-t-"
VHOST_DIR = "/etc/nginx/dn/vhosts"  # dn.render.nginx.VHOST_DIR


@dataclass(frozen=True)
class TenantNames:
    slug: str
    status: str = "active"

    @property
    def _h(self) -> str:
        return short_hash(self.slug, 12)

    @property
    def bridge(self) -> str:
        return BRIDGE_PREFIX + self._h

    @property
    def network(self) -> str:
        return f"{NETWORK_PREFIX}{self.slug}"

    @property
    def containers(self) -> tuple[str, str]:
        return f"dn-{self.slug}-tagging", f"dn-{self.slug}-preview"

    @property
    def chain_forward(self) -> str:
        return "DN-T-" + self._h.upper()

    @property
    def chain_input(self) -> str:
        return "DN-TI-" + self._h.upper()

    @property
    def volume_image(self) -> str:
        return f"/var/lib/dn/volumes/{self.slug}.luks"

    @property
    def mapper(self) -> str:
        return f"dn-{self.slug}"

    @property
    def vhost_file(self) -> str:
        return f"{VHOST_DIR}/{self.slug}.conf"


def registered(rows: list[dict]) -> list[TenantNames]:
    """TenantNames for registry rows (``slug``, ``status``)."""
    return [TenantNames(r["slug"], r.get("status") or "active") for r in rows]


def slug_of_network(name: str) -> str | None:
    return name[len(NETWORK_PREFIX):] if name.startswith(NETWORK_PREFIX) else None
