"""What the host-resource providers share: their inputs, the SSH session, check failures.

Conventions of every provider in this package (the engine pickles providers with dill and runs
them in its own process, ``python -m pulumi.dynamic``):

- A provider holds no state: no connection, no key. Each method opens its own SSH session to the
  host as the *current* configuration describes it (address, port, user, key path, pinned host
  key or known_hosts path, timeouts: ``stacks.programs.ssh_target_data``), which dn's engine hands
  every provider process of a stack in ``DN_PROVIDER_HOST`` (:func:`host_env`). ``read`` and
  ``delete`` get only what the state recorded, and a pin recorded there may since have been
  replaced or marked ``@revoked``: they connect only with the current configuration
  (:func:`state_session`) and refuse without it. ``create``/``update`` may fall back to the
  ``ssh`` input (the program's, current by construction). A change of ``ssh`` alone is not a
  change of the resource: the ``ssh`` recorded in the state is never used to connect.
- ``host`` is a ``HostBaseline`` as JSON data (``model_dump(mode="json")``, prefix included);
  ``tenant`` a tenant's host view (``dn.models.host_view_data``: no ``container_config``).
- ``check`` validates with dn.models and reports the failing input and rule; ``diff`` compares
  what the new inputs render with what the last create, update or refresh recorded (dynamic
  resources get no detailed diff from the engine); ``create``/``update`` return the inputs in
  their outputs, plus what they observed; ``read`` reports what the host has, so a refresh shows
  drift and the next ``up`` repairs it; a resource that is gone reads as ``id None``.
- Secrets: dynamic providers do not accept secrets (``Configure`` answers ``acceptSecrets:
  False``), so the engine hands a secret input over in plain text and marks as secret only the
  outputs whose names match secret inputs. A secret input is therefore never returned: outputs
  carry a fingerprint of it instead.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ResourceProvider, UpdateResult
from pulumi.output import Unknown
from pulumi.runtime.rpc import UNKNOWN

from dn.errors import ConfigError, DnError, InvalidInput, OperationFailed

HOST_ENV = "DN_PROVIDER_HOST"  # the stack's host as the current configuration has it (host_env)
SSH_FIELDS = ("address", "port", "user", "key_path", "host_key", "known_hosts", "connect_timeout", "command_timeout")
SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d"  # Pulumi's "special signature" key
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"  # ... and its value for a secret


def has_unknown(value: Any) -> bool:
    """Whether ``value`` holds a value the engine does not know yet (during a preview). The SDK
    hands such a value over as its UNKNOWN sentinel string, or, when it deserializes keeping
    unknowns (``check`` and ``diff``), as a ``pulumi.output.Unknown`` object."""
    if isinstance(value, Unknown):
        return True
    if isinstance(value, str):
        return value == UNKNOWN
    if isinstance(value, Mapping):
        return any(has_unknown(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_unknown(v) for v in value)
    return False


def reveal(value: Any) -> Any:
    """The plain value of a secret input, however it arrives (plain, or wrapped as a secret)."""
    if isinstance(value, Mapping) and value.get(SECRET_SIG_KEY) == SECRET_SIG:
        return value.get("value")
    return value


def _ssh_target(data: Any, field: str):
    from pydantic import ValidationError

    from dn.config import SSHTarget
    from dn.models import invalid_from

    if not isinstance(data, Mapping):
        raise InvalidInput(field, "is required: the host's SSH target as plain data (stacks.programs.ssh_target_data)")
    try:
        return SSHTarget.model_validate({k: v for k, v in data.items() if k in SSH_FIELDS and v is not None})
    except ValidationError as e:
        raise invalid_from(e, f"{field}.") from None


def target(props: Mapping[str, Any]):
    """The ``ssh`` input as an SSHTarget (InvalidInput naming ``ssh.<field>``)."""
    return _ssh_target(props.get("ssh"), "ssh")


def host_env(name: str, ssh: Mapping[str, Any]) -> dict[str, str]:
    """The engine environment that gives every provider of a stack on host ``name`` its SSH
    target (``stacks.programs.ssh_target_data`` of the current configuration: paths and public
    keys, no secret)."""
    return {HOST_ENV: json.dumps({"name": name, "ssh": dict(ssh)}, sort_keys=True)}


def configured(props: Mapping[str, Any]):
    """The SSHTarget of the current configuration for the resource ``props`` describes (from
    ``DN_PROVIDER_HOST``), or None when the engine was not given one. A resource whose ``host``
    input names another host than the stack's is refused."""
    raw = os.environ.get(HOST_ENV)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        name, ssh = data["name"], data["ssh"]
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"{HOST_ENV}: not a host's SSH target as dn's engine passes it "
                          "(stacks.providers.common.host_env)") from None
    host = props.get("host")
    recorded = host.get("name") if isinstance(host, Mapping) else None
    if recorded is not None and recorded != name:
        raise InvalidInput("host", f"the resource is on host {recorded!r}, but this stack runs for host {name!r}: "
                                   "dn does not connect to one host with another's SSH settings")
    return _ssh_target(ssh, HOST_ENV)


def session(props: Mapping[str, Any]):
    """A new SSH session to the host of ``props`` for ``create``/``update`` (close it: use
    ``with``): the current configuration's target, else the ``ssh`` input of the program."""
    from dn import ssh

    return ssh.connect(configured(props) or target(props))


def state_session(props: Mapping[str, Any]):
    """A new SSH session for ``read``/``delete``, whose ``props`` come from the state: only ever
    with the current configuration's target, so a pin replaced or revoked since the resource was
    created is never trusted again."""
    from dn import ssh

    current = configured(props)
    if current is None:
        # the whole explanation is in the message: only it crosses back to dn from the engine
        raise OperationFailed(
            f"no SSH target of the current configuration was given ({HOST_ENV}): the host key pinned in the "
            "state may be one replaced or revoked since, so dn does not connect with it; run this through dn "
            "(dn refresh, dn up, dn tenant destroy), which passes the host's current settings to its providers")
    return ssh.connect(current)


def host(props: Mapping[str, Any]):
    from dn.models import parse_host

    data = props.get("host")
    if not isinstance(data, Mapping):
        raise InvalidInput("host", "is required: the host baseline as data (HostBaseline.model_dump(mode='json'))")
    return parse_host(data)


def tenant(props: Mapping[str, Any]):
    from dn.models import check_tenant_set, parse_tenant

    data = props.get("tenant")
    if not isinstance(data, Mapping):
        raise InvalidInput("tenant", "is required: the tenant's host view (dn.models.host_view_data)")
    try:
        spec = parse_tenant(data, host_view=True)
    except InvalidInput as e:
        raise InvalidInput(f"tenant.{e.field}", e.rule) from None
    if isinstance(props.get("host"), Mapping):
        check_tenant_set([spec], host(props))
    return spec


def failures(props: Mapping[str, Any], *checks: Callable[[Mapping[str, Any]], Any]) -> list[CheckFailure]:
    """Run ``checks`` on ``props``; each refusal becomes a CheckFailure naming the top-level input."""
    out = []
    for check in checks:
        try:
            check(props)
        except InvalidInput as e:
            out.append(CheckFailure(e.field.split(".")[0].split("[")[0], str(e)))
        except DnError as e:
            out.append(CheckFailure("", str(e)))
    return out


def inputs(props: Mapping[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """The inputs worth returning in outputs: all but ``drop`` (secrets, previous outputs) and
    the engine's own ``__provider``."""
    skip = set(drop) | {"__provider"}
    return {k: v for k, v in props.items() if k not in skip}


def same_place(olds: Mapping[str, Any], news: Mapping[str, Any]) -> bool:
    """Whether old outputs and new inputs name the same host prefix (files live under it)."""
    old_host, new_host = olds.get("host") or {}, news.get("host") or {}
    return old_host.get("prefix", "/") == new_host.get("prefix", "/")


class DigestProvider(ResourceProvider):
    """The shape of a resource whose wanted state is rendered from its inputs and summed up by a
    digest (nginx units, firewall rulesets, systemd timers): ``check`` renders it, ``diff``
    compares the digest the last create, update or refresh recorded with the digest the new inputs
    render, ``create``/``update`` converge the host and record the rendered digest.

    A subclass names ``outputs`` (``digest`` and what ``apply`` observes), ``replace_slugs``
    (inputs whose ``slug`` change replaces the resource), ``replace_keys`` (inputs whose change
    replaces it), whether a new host prefix replaces it (``files_on_host``) and
    ``delete_before_replace``; and implements ``render``, ``wanted``, ``apply``, ``resource_id``,
    ``read`` and ``delete``.
    """

    outputs: tuple[str, ...] = ("digest",)
    replace_slugs: tuple[str, ...] = ()
    replace_keys: tuple[str, ...] = ()
    files_on_host: bool = True
    delete_before_replace: bool = True

    def render(self, props: Mapping[str, Any]) -> Any:
        """What the inputs render to (InvalidInput naming the input when they are wrong)."""
        raise NotImplementedError

    def wanted(self, props: Mapping[str, Any]) -> str:
        """The digest of what the inputs render to."""
        raise NotImplementedError

    def apply(self, session: Any, props: Mapping[str, Any]) -> dict[str, Any]:
        """Converge the host to ``props``; the observed outputs besides ``digest``."""
        raise NotImplementedError

    def resource_id(self, props: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        if has_unknown(news):
            return CheckResult(news, [])
        return CheckResult(news, failures(news, target, self.render))

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        if has_unknown({k: v for k, v in news.items() if k != "ssh"}):
            return DiffResult(changes=True, replaces=[], delete_before_replace=self.delete_before_replace)
        replaces = [] if not self.files_on_host or same_place(olds, news) else ["host"]
        replaces += [k for k in self.replace_slugs if (olds.get(k) or {}).get("slug") != (news.get(k) or {}).get("slug")]
        replaces += [k for k in self.replace_keys if olds.get(k) != news.get(k)]
        changed = bool(replaces) or olds.get("digest") != self.wanted(news)
        return DiffResult(changes=changed, replaces=replaces, delete_before_replace=self.delete_before_replace)

    def outs(self, props: Mapping[str, Any], the_digest: str, observed: Mapping[str, Any]) -> dict[str, Any]:
        return {**inputs(props, self.outputs), **observed, "digest": the_digest}

    def _converge(self, props: Mapping[str, Any]) -> dict[str, Any]:
        with session(props) as s:
            observed = self.apply(s, props)
        return self.outs(props, self.wanted(props), observed)

    def create(self, props: dict[str, Any]) -> CreateResult:
        outs = self._converge(props)
        return CreateResult(id_=self.resource_id(props), outs=outs)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(outs=self._converge(news))
