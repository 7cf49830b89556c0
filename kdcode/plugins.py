"""Resolve a RunSpec's strategy and init names to plugin instances, validating their params."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kdcode.errors import KdcodeError
from kdcode.inits import INITS
from kdcode.registry import Registry
from kdcode.spec import RunSpec, format_validation_error
from kdcode.strategies import STRATEGIES


def _make(registry: Registry, name: str, params: dict[str, Any]) -> Any:
    cls = registry.get(name)
    try:
        plugin = cls(cls.Params(**params))
    except ValidationError as exc:
        raise KdcodeError(format_validation_error(exc, f"{registry.kind} {name!r} params", cls.Params)) from exc
    plugin.name = name  # the name it is registered under: written once, in the registration
    return plugin


def make_strategy(name: str, params: dict[str, Any]) -> Any:
    return _make(STRATEGIES, name, params)


def make_init(name: str, params: dict[str, Any]) -> Any:
    return _make(INITS, name, params)


def validate_plugins(spec: RunSpec) -> tuple[Any, Any]:
    """Instantiate the spec's strategy and init (checks names and params; loads no model)."""
    strategy = make_strategy(spec.strategy.name, spec.strategy.params)
    return strategy, make_init(spec.student.init.name, spec.student.init.params)


def describe_plugins(name: str | None = None) -> list[dict[str, Any]]:
    """Every strategy and init (or the one called ``name``): kind, name, summary, source, params schema."""
    entries = []
    for kind, reg in (("strategy", STRATEGIES), ("init", INITS)):
        for n in reg.names():
            if name and n != name:
                continue
            cls = reg.get(n)
            schema = cls.Params.model_json_schema()
            entries.append({"kind": kind, "name": n, "summary": cls.summary, "source": reg.source(n), "params": schema})
    return entries
