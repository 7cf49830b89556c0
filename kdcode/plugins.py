"""Resolve a RunSpec's strategy and init names to plugin instances, validating their params."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kdcode.errors import KdcodeError
from kdcode.spec import RunSpec, format_validation_error


def make_strategy(name: str, params: dict[str, Any]) -> Any:
    from kdcode.strategies import STRATEGIES

    cls = STRATEGIES.get(name)
    try:
        return cls(cls.Params(**params))
    except ValidationError as exc:
        raise KdcodeError(format_validation_error(exc, f"strategy {name!r} params", cls.Params)) from exc


def make_init(name: str, params: dict[str, Any]) -> Any:
    from kdcode.inits import INITS

    cls = INITS.get(name)
    try:
        return cls(cls.Params(**params))
    except ValidationError as exc:
        raise KdcodeError(format_validation_error(exc, f"init {name!r} params", cls.Params)) from exc


def validate_plugins(spec: RunSpec) -> tuple[Any, Any]:
    """Instantiate the spec's strategy and init (checks names and params; loads no model)."""
    return make_strategy(spec.strategy.name, spec.strategy.params), make_init(
        spec.student.init, spec.student.init_params
    )
