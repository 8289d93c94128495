"""The checks of a tenant request that need no I/O (dn.tenants.check_create_request /
check_update_request, dn.models.parse_tenant): every invalid field is named at once, in the
order of the request, and a valid request passes them."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from dn.config import Settings, embedded_default
from dn.errors import InvalidInput
from dn.models import parse_tenant
from dn.tenants import TenantRequest, check_create_request, check_update_request

CONFIG = SecretStr("c2d0bS1jb250YWluZXItY29uZmlnLXNlY3JldC12YWx1ZQ==")


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings.model_validate(embedded_default(Path("/nonexistent/dn")))


def fields_of(e: InvalidInput) -> list[str]:
    return [f for f, _ in getattr(e, "errors", [(e.field, e.rule)])]


def test_valid_requests_pass(settings):
    check_create_request(settings, TenantRequest("acme", domains=["gtm.acme.example"], container_config=CONFIG))
    check_update_request(settings, TenantRequest("acme"))
    check_update_request(settings, TenantRequest("acme", domains=["*.acme.example"], plan="standard"))


@pytest.mark.parametrize("kw, want", [
    ({"slug": "Bad;Slug", "domains": ["gtm.acme.example"]}, ["slug", "container_config"]),
    ({"slug": "Bad;Slug", "domains": ["not a domain", "ok.example"], "plan": "gold", "container_config": CONFIG,
      "image": "docker.io/library/nginx:1", "backup_schedule": "*-*-* 25:00", "host": "nowhere", "status": "suspended"},
     ["slug", "domains[0]", "plan", "image", "backup_schedule", "status", "host"]),
    ({"slug": "acme", "domains": [], "container_config": SecretStr("short")}, ["domains", "container_config"]),
    ({"slug": "acme", "domains": ["gtm.acme.example"], "unreadable": [("container_config", "cannot read /x")]},
     ["container_config"]),
    ({"slug": "acme", "domains": ["gtm.acme.example"], "container_config": CONFIG, "display_name": "a\x01"},
     ["display_name"]),
])
def test_create_names_every_invalid_field_in_request_order(settings, kw, want):
    with pytest.raises(InvalidInput) as ei:
        check_create_request(settings, TenantRequest(**kw))
    assert fields_of(ei.value) == want
    assert str(ei.value).startswith(f"{want[0]}: ")
    assert "c2d0bS1jb25" not in str(ei.value)  # never the secret


def test_update_names_every_invalid_given_field(settings):
    with pytest.raises(InvalidInput) as ei:
        check_update_request(settings, TenantRequest("Bad;Slug", domains=["a b"], plan="gold", status="deleted",
                                                     host="nowhere", display_name=""))
    assert fields_of(ei.value) == ["slug", "domains[0]", "plan", "status", "display_name", "host"]


def test_parse_tenant_reports_an_unknown_plan_with_the_other_fields(settings):
    with pytest.raises(InvalidInput) as ei:
        parse_tenant({"slug": "x", "domains": ["a b"], "plan": "gold", "image": "docker.io/x:1",
                      "subnet": "10.0.0.0/28"}, plans=settings.plans,
                     allowed_registries=settings.images.allowed_registries, host_view=True)
    assert fields_of(ei.value) == ["slug", "domains[0]", "plan", "image"]
