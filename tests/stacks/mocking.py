"""Pulumi mocks for dn's stack programs: run a program with ``preview=False`` and record every
resource it registers — type, name, parent, dependencies, the inputs as the provider would get
them, and the inputs as they went over the wire (where secrets are still marked as secrets).

``set_mocks`` is called here, before any program module is imported by the tests.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import pulumi
from google.protobuf import json_format
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor

SECRET_SIG = "4dabf18193072939515e22adb298388d"
SECRET_VALUE = "1b47061264138c4ac30d75fd1eb44270"


@dataclass
class Registered:
    type: str
    name: str
    inputs: dict[str, Any]
    wire: dict[str, Any]
    parent: str
    dependencies: list[str]
    urn: str = ""

    @property
    def short_parent(self) -> str:
        return self.parent.rsplit("::", 1)[-1] if self.parent else ""


@dataclass
class Recording:
    resources: list[Registered] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # urn -> registered outputs (wire)

    def by_name(self, name: str) -> Registered:
        found = [r for r in self.resources if r.name == name]
        assert len(found) == 1, f"{name}: registered {len(found)} times; have {[r.name for r in self.resources]}"
        return found[0]

    def of_type(self, type_: str) -> list[Registered]:
        return [r for r in self.resources if r.type == type_]

    def names(self) -> list[str]:
        return [r.name for r in self.resources]


class Mocks(pulumi.runtime.Mocks):
    def __init__(self, rec: Recording) -> None:
        self.rec = rec

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        # Resources echo their inputs as outputs (dynamic providers return their inputs too).
        return f"{args.name}-id", dict(args.inputs)

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


class RecordingMonitor(MockMonitor):
    """Registrations arrive on executor threads, concurrently."""

    def __init__(self, mocks: Mocks, rec: Recording) -> None:
        super().__init__(mocks)
        self.rec = rec
        self._lock = threading.Lock()

    def RegisterResource(self, request):
        resp = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            # the base class deserialized the same way to call new_resource (same thread)
            inputs = rpc.deserialize_properties(request.object)
            with self._lock:
                self.rec.resources.append(Registered(
                    type=request.type, name=request.name, inputs=inputs,
                    wire=json_format.MessageToDict(request.object), parent=request.parent,
                    dependencies=list(request.dependencies), urn=resp.urn))
        return resp

    def RegisterResourceOutputs(self, request):
        with self._lock:
            self.rec.outputs[request.urn] = json_format.MessageToDict(request.outputs)
        return super().RegisterResourceOutputs(request)


def run(program: Callable[[], Any], *, stack: str = "test", config: dict[str, str] | None = None,
        secret_keys: list[str] | None = None) -> tuple[Recording, dict[str, Any]]:
    """Run ``program`` under mocks (preview=False: apply callbacks run) and return what it
    registered plus the resolved values of the Outputs it returned."""
    rec = Recording()
    mocks = Mocks(rec)
    pulumi.runtime.set_mocks(mocks, project="dn", stack=stack, preview=False, monitor=RecordingMonitor(mocks, rec))
    pulumi.runtime.set_all_config(config or {}, secret_keys=secret_keys or [])
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def body():
        outs = program() or {}
        return pulumi.Output.all(**outs).apply(lambda values: resolved.update(values)) if outs else None

    body()
    return rec, resolved


def wire_plain(wire: Any, needle: str, *, under_secret: bool = False) -> list[str]:
    """Paths in a wire struct where ``needle`` occurs in a string that is NOT inside a secret
    wrapper (a secret on the wire is ``{SECRET_SIG: SECRET_VALUE, "value": ...}``)."""
    hits: list[str] = []

    def walk(v: Any, path: str, secret: bool) -> None:
        if isinstance(v, dict):
            is_secret = v.get(SECRET_SIG) == SECRET_VALUE
            for k, x in v.items():
                walk(x, f"{path}.{k}" if path else k, secret or is_secret)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", secret)
        elif isinstance(v, str) and needle in v and not secret:
            hits.append(path)

    walk(wire, "", under_secret)
    return hits


def wire_secret(wire: Any, needle: str) -> bool:
    """Whether ``needle`` occurs inside a secret wrapper somewhere in the wire struct."""
    found = False

    def walk(v: Any, secret: bool) -> None:
        nonlocal found
        if isinstance(v, dict):
            is_secret = v.get(SECRET_SIG) == SECRET_VALUE
            for x in v.values():
                walk(x, secret or is_secret)
        elif isinstance(v, list):
            for x in v:
                walk(x, secret)
        elif isinstance(v, str) and needle in v and secret:
            found = True

    walk(wire, False)
    return found


def reveal(value: Any) -> Any:
    """The plain value of a secret as deserialized from the wire (or the value itself)."""
    if isinstance(value, dict) and value.get(SECRET_SIG) == SECRET_VALUE:
        return value.get("value")
    return value
