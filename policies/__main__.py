"""dn's CrossGuard policy pack: the validators of ``policies/validators.py`` as mandatory
resource policies. Run by the engine through ``dn.tooling.policy_pack_launcher`` (dn preview and
every dn up); configured by ``stacks.programs.policy_config`` (allowed registries, retention)."""
import sys
from pathlib import Path

# The engine runs this file by path; dn's checkout (policies.validators, dn.*) must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pulumi_policy import (  # noqa: E402
    EnforcementLevel,
    PolicyConfigSchema,
    PolicyPack,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

from policies import validators as v  # noqa: E402

_SCHEMAS = {
    "dn-allowed-registries": PolicyConfigSchema(properties={
        "allowedRegistries": {"type": "array", "items": {"type": "string"},
                              "default": list(v.DEFAULT_REGISTRIES)}}),
    # the retention dn is configured with (settings.retention.backup_daily_days); the policy
    # requires it to be at least 30 days, so a lower value is a violation, not a schema error
    "dn-backup-schedule": PolicyConfigSchema(properties={
        "retentionDays": {"type": "integer", "default": v.MIN_RETENTION_DAYS}}),
}


def _config(args: ResourceValidationArgs) -> v.Config:
    cfg = args.get_config() or {}
    return v.Config(
        allowed_registries=tuple(cfg.get("allowedRegistries") or v.DEFAULT_REGISTRIES),
        retention_days=int(cfg.get("retentionDays", v.MIN_RETENTION_DAYS)),
    )


def _resource_policy(p: v.Policy) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        res = v.Resource(args.resource_type, args.name, v.plain(args.props), args.urn)
        if not p.applies(res):
            return
        for message in p.check(res, _config(args)):
            report_violation(message)

    return ResourceValidationPolicy(name=p.name, description=p.description, validate=validate,
                                    config_schema=_SCHEMAS.get(p.name))


PolicyPack(
    name="dn",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=[_resource_policy(p) for p in v.POLICIES],
)
