"""Command-line options derived from the specs, so that each option's type, default and help are written once: in
the spec field it sets (its ``description`` is the help, its default the default shown).

``spec_option(RunSpec, "train.lr")`` is the option ``--lr`` of type float whose help is the field's description and
whose ``[default: ...]`` is the spec's; the parameter's own default is None (a bool: None too, with a ``--no-``
form), meaning "not given: the spec file's or the spec's default stays". :func:`spec_flags` turns a command's
given options into the dotted overrides its spec is built from, by the :class:`SpecKey` each option carries.
tests/test_cli_options.py walks every command's options against its spec.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from kdcode.spec import RuntimeSpec, build_spec

_MISSING = object()


@dataclass(frozen=True)
class SpecKey:
    """Which field of which spec an option sets (``key`` dotted: ``train.lr``)."""

    model: type[BaseModel]
    key: str
    flag: str  # the option's name, as errors name it


def _strip_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def spec_field(model: type[BaseModel], key: str) -> tuple[Any, Any]:
    """The pydantic field that dotted ``key`` names inside ``model``, and its default as the spec fills it in (a
    section's own default wins: RunSpec's ``train.max_steps`` is 800, not TrainSpec's None); ``_MISSING`` when the
    field is required. KeyError names the key when it is not a field."""
    cls: Any = model
    value: Any = _MISSING
    field: Any = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            raise KeyError(f"{key!r} is not a field of {model.__name__}")
        field = fields[part]
        if value is not _MISSING and value is not None:
            value = getattr(value, part)
        else:
            value = _MISSING if field.is_required() else field.get_default(call_default_factory=True)
        if i < len(parts) - 1:
            cls = _strip_none(field.annotation)
    return field, value


def cli_type(annotation: Any) -> type:
    """The type a flag is parsed as: the field's, a name from a fixed set (Literal) as a string that the spec
    validates, a list as one comma-separated string."""
    inner = _strip_none(annotation)
    origin = typing.get_origin(inner)
    if origin is Literal or origin is list:
        return str
    if inner in (bool, int, float, str):
        return inner
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def help_text(description: str) -> str:
    text = description[0].upper() + description[1:]
    return text if text.endswith((".", ")")) else text + "."


def shown_default(default: Any) -> str | bool:
    """What ``--help`` shows as the default: the spec's value (none for a flag or an unset field)."""
    if default is _MISSING or default is None or isinstance(default, bool):
        return False
    return _shown(default)


def spec_option(model: type[BaseModel], key: str, flag: str | None = None, *, also: str | None = None) -> Any:
    """``Annotated[T | None, typer.Option(...), SpecKey(model, key)]`` for the field ``key`` of ``model``: the flag
    is ``--<last part, dashes>`` unless ``flag`` names it; a bool is ``--x/--no-x`` (``flag`` may name both).
    ``also``: where else the command puts the value (said in the help: ``sweep --threads``)."""
    field, default = spec_field(model, key)
    if not field.description:
        raise TypeError(f"{model.__name__}.{key} has no description: it is the --help of its option")
    kind = cli_type(field.annotation)
    name = flag or "--" + key.rsplit(".", 1)[-1].replace("_", "-")
    if kind is bool and "/" not in name:
        name = f"{name}/--no-{name.removeprefix('--')}"
    text = help_text(field.description + (f"; {also}" if also else ""))
    if typing.get_origin(_strip_none(field.annotation)) is list:
        text += " Comma-separated."
    option = typer.Option(name, help=text, show_default=shown_default(default))
    return Annotated[kind | None, option, SpecKey(model, key, name.split("/")[0])]  # type: ignore[valid-type]


@functools.cache
def option_keys(command: Any) -> dict[str, SpecKey]:
    """Parameter name -> SpecKey for each spec-derived option of ``command`` (its annotations, evaluated once)."""
    hints = typing.get_type_hints(getattr(command, "__wrapped__", command), include_extras=True)
    keys = {}
    for name, hint in hints.items():
        marks = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, SpecKey)]
        if marks:
            keys[name] = marks[0]
    return keys


def spec_flags(command: Any, values: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """The options given to ``command`` (``values``: its locals) as one nested override mapping of its spec (of
    ``model`` alone where a command builds more than one); an option not given (None) is left out, a list field's
    comma-separated value is split."""
    nested: dict[str, Any] = {}
    for name, mark in option_keys(command).items():
        value = values.get(name)
        if value is None or (model is not None and mark.model is not model):
            continue
        field, _ = spec_field(mark.model, mark.key)
        if typing.get_origin(_strip_none(field.annotation)) is list and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        *parents, leaf = mark.key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def from_flags(model: type[Any], command: Any, values: dict[str, Any]) -> Any:
    """``command``'s options for ``model`` (``values``: its locals) as that spec, validated; an error names the
    flag at fault (``--body-timeout: Input should be greater than 0``)."""
    names = {mark.key: mark.flag for mark in option_keys(command).values() if mark.model is model}
    return build_spec(model, spec_flags(command, values, model), "flags", names)


def runtime_of(command: Any, values: dict[str, Any]) -> dict[str, Any]:
    """--backend / --kv-cache / --compile of ``command``, validated (:class:`kdcode.spec.RuntimeSpec`), as the dict
    the loaders take."""
    return from_flags(RuntimeSpec, command, values).model_dump()


def runtime_given(runtime: dict[str, Any]) -> dict[str, bool]:
    """The runtime flags that were set away from their defaults, by name (for a refusal that lists them)."""
    return {f"--backend {runtime['backend']}": runtime["backend"] != "auto",
            "--kv-cache static": runtime["kv_cache"] == "static", "--compile": bool(runtime["compile"])}
