"""Pulumi dynamic resource for a tenant's encrypted volume: ``LuksVolume``, a thin wrapper over
``dn.host.luks`` (see ``common`` for the conventions).

The ``key`` input is the base64 text of the 64 random bytes ``dn.host.luks.new_key`` makes; it
must be a Pulumi secret (``LuksVolume`` makes it one in any case). The provider receives it in
plain text (dynamic providers do not accept secrets), passes it to cryptsetup on stdin only, and
never returns it: outputs hold ``key_fingerprint`` (a domain-separated SHA-256) instead, so state,
previews and outputs never carry the key, and a new key shows as a change without revealing it.

Outputs: the inputs but the key, ``key_fingerprint``, ``spec`` (image, size, cipher, key size,
pbkdf), ``header`` (what luksDump says: cipher, key size, keyslots; for drift and ``dn verify``),
``opened`` and ``notes`` (e.g. that the volume cannot be opened on a host without
device-mapper).

Diffs: a new image path (host prefix or tenant slug) or a new cipher, key size or pbkdf cannot
happen in place: the volume is replaced, deleting first (the data is crypto-erased: a preview shows
the replacement). A larger size grows it; a smaller one is refused. A new key is accepted only if
it already opens the volume (a rotation made with both keys, which updates the stack's secret
afterwards); dn never formats an existing volume to change its key.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import pulumi
from pulumi.dynamic import CheckResult, CreateResult, DiffResult, ReadResult, Resource, ResourceProvider, UpdateResult

from dn.errors import InvalidInput
from dn.host import luks
from dn.host.plan import ApplyRefused
from stacks.providers import common as c

SECRET = "key"
OUTPUTS = ("key_fingerprint", "spec", "header", "opened", "notes")
FORMAT_FIELDS = ("image", "cipher", "key_bits", "pbkdf")


def key_of(props: Mapping[str, Any]) -> bytes:
    """The volume key from the ``key`` input (never shown in an error)."""
    value = c.reveal(props.get(SECRET))
    if not isinstance(value, str):
        raise InvalidInput(SECRET, "is required: the base64 text of 64 random bytes (dn.host.luks.new_key), "
                                   "as a Pulumi secret")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        raise InvalidInput(SECRET, "must be base64 text") from None
    if len(raw) != luks.KEY_BYTES:
        raise InvalidInput(SECRET, f"must decode to {luks.KEY_BYTES} bytes")
    return raw


def encode_key(key: bytes) -> str:
    """The ``key`` input for a key made by ``dn.host.luks.new_key``."""
    return base64.b64encode(luks.check_key(key)).decode("ascii")


def spec_of(props: Mapping[str, Any]) -> luks.VolumeSpec:
    return luks.volume_spec(c.host(props), c.tenant(props))


def _spec_data(spec: luks.VolumeSpec) -> dict[str, Any]:
    return {"image": spec.image, "size_mb": spec.size_mb, "cipher": spec.cipher, "key_bits": spec.key_bits,
            "pbkdf": spec.pbkdf}


def _outs(props: Mapping[str, Any], spec: luks.VolumeSpec, fingerprint: str | None, state: luks.VolumeState,
          notes: list[str]) -> dict[str, Any]:
    return {
        **c.inputs(props, (SECRET, *OUTPUTS)),
        "key_fingerprint": fingerprint,
        "spec": _spec_data(spec),
        "header": state.header.to_dict() if state.header else None,
        "opened": state.opened,
        "notes": notes,
    }


class LuksVolumeProvider(ResourceProvider):
    """Provider of :class:`LuksVolume`."""

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        if c.has_unknown({k: v for k, v in news.items() if k != SECRET}):
            return CheckResult(news, [])
        checks = [c.target, spec_of]
        if not c.has_unknown(news.get(SECRET)):
            checks.append(key_of)
        return CheckResult(news, c.failures(news, *checks))

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        if c.has_unknown({k: v for k, v in news.items() if k not in ("ssh", SECRET)}):
            return DiffResult(changes=True, replaces=[], delete_before_replace=True)
        new = _spec_data(spec_of(news))
        old = olds.get("spec") or {}
        replaces = [f for f in FORMAT_FIELDS if old.get(f) != new[f]]
        changed = bool(replaces) or old.get("size_mb") != new["size_mb"]
        if c.has_unknown(news.get(SECRET)):
            changed = True
        elif olds.get("key_fingerprint") != luks.key_fingerprint(key_of(news)):
            changed = True
        return DiffResult(changes=changed, replaces=replaces, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec, key = spec_of(props), key_of(props)
        with c.session(props) as s:
            done = luks.converge(s, spec, key)
            state = luks.read(s, spec)
        return CreateResult(id_=spec.image, outs=_outs(props, spec, luks.key_fingerprint(key), state, done.notes))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        spec, key = spec_of(news), key_of(news)
        new_key = olds.get("key_fingerprint") != luks.key_fingerprint(key)
        with c.session(news) as s:
            try:
                done = luks.converge(s, spec, key, verify_key=new_key)
            except ApplyRefused as e:
                if new_key:
                    raise InvalidInput(SECRET, f"the new key does not open {spec.image}: rotate the key on the host "
                                               "with both keys first (add the new one, remove the old), then update "
                                               "the stack's secret") from e
                raise
            state = luks.read(s, spec)
        return UpdateResult(outs=_outs(news, spec, luks.key_fingerprint(key), state, done.notes))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        spec = spec_of(props)
        with c.state_session(props) as s:
            state = luks.read(s, spec)
        if not state.exists:
            return ReadResult(id_=None, outs={})
        header = state.header
        seen = luks.VolumeSpec(spec.name, spec.image, (state.size or 0) // luks.MIB, spec.mapper, spec.mount,
                               header.cipher if header else "not LUKS",
                               (header.key_bits or 0) if header else 0,
                               ",".join(sorted({k.pbkdf for k in header.keyslots})) if header else "")
        notes = [] if state.header is None or state.header.keyslots else ["no keyslot left: the volume was erased"]
        return ReadResult(id_=id_, outs=_outs(props, seen, props.get("key_fingerprint"), state, notes))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            luks.remove(s, spec_of(props))


class LuksVolume(Resource):
    """A tenant's LUKS2 volume (aes-xts-plain64, 512-bit key, argon2id) on its EU host; opened
    and mounted at the tenant's path where the host has device-mapper (tenant stack)."""

    key_fingerprint: pulumi.Output[str]
    spec: pulumi.Output[dict]
    header: pulumi.Output[dict]
    opened: pulumi.Output[bool]
    notes: pulumi.Output[list]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 host: pulumi.Input[Mapping[str, Any]], tenant: pulumi.Input[Mapping[str, Any]],
                 key: pulumi.Input[str], opts: pulumi.ResourceOptions | None = None) -> None:
        props = {"ssh": ssh, "host": host, "tenant": tenant, SECRET: pulumi.Output.secret(key),
                 **{k: None for k in OUTPUTS}}
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=[SECRET]))
        super().__init__(LuksVolumeProvider(), resource_name, props, opts)
