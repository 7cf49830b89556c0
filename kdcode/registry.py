"""One typed registry for every pluggable kind (KD strategies, student inits).

Entries are registered with a decorator, or lazily as a ``"module:attr"`` string so that start-up imports
nothing heavy. Third-party packages add entries through an entry-point group, loaded on the first lookup
(``KDCODE_DISABLE_PLUGINS=1`` turns that off). An entry must be a subclass of the registry's base class,
checked when it is registered (an object) or first resolved (a lazy target). A plugin's name is written
once, where it is registered (:func:`kdcode.plugins.make_strategy` gives each instance that name); a class
that names itself otherwise is refused. The registry knows no specific plugin.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from rapidfuzz import process

from kdcode.errors import KdcodeError

T = TypeVar("T")

DISABLE_ENV = "KDCODE_DISABLE_PLUGINS"


class UnknownNameError(KdcodeError):
    pass


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' Did you mean ...?' suffix for the closest known names (empty when none is close)."""
    close = [c for c, score, _ in process.extract(name, choices, limit=3) if score >= 60]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """``Registry[type[Strategy]]``: names to classes derived from ``base`` (a class, or a lazy ``"module:attr"``)."""

    def __init__(self, kind: str, base: type | str | None = None, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._base = base
        self._targets: dict[str, T | str] = {}
        self._sources: dict[str, str] = {}
        self._plugins_loaded = False

    @property
    def base(self) -> type | None:
        if isinstance(self._base, str):
            self._base = _resolve(self._base)
        return self._base  # type: ignore[return-value]

    def _checked(self, name: str, obj: Any, source: str) -> T:
        """``obj`` if it is a subclass of the base that does not name itself otherwise."""
        base = self.base
        if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
            raise KdcodeError(
                f"{self.kind} {name!r} from {source} is {obj!r}, not a subclass of {base.__module__}."
                f"{base.__name__}; fix the plugin or set {DISABLE_ENV}=1"
            )
        declared = vars(obj).get("name") if isinstance(obj, type) else None
        if declared and declared != name:
            raise KdcodeError(
                f"{self.kind} {name!r} from {source} calls itself {declared!r}; a plugin's name is the one it is "
                "registered under: remove its `name` attribute"
            )
        return obj

    def register(self, name: str, target: T | str | None = None, *, source: str = "kdcode") -> Callable:
        """Register ``target`` (a class, or a lazy "module:attr") under ``name``; usable as a decorator."""

        def add(obj: T | str) -> T | str:
            if name in self._targets:
                raise KdcodeError(
                    f"{self.kind} {name!r} is registered twice: by {self._sources[name]} and by {source}; "
                    f"uninstall one of them or set {DISABLE_ENV}=1"
                )
            self._targets[name] = obj if isinstance(obj, str) else self._checked(name, obj, source)
            self._sources[name] = source
            return obj

        if target is not None:
            add(target)
            return lambda obj: obj
        return add

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        if self.group is None or os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            self._plugins_loaded = True
            return
        found = []
        for ep in entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            source = f"package {dist.name!r}" if dist is not None else f"entry point {ep.value!r}"
            if ep.name in self._targets:  # fail every time, not only on the first lookup
                self.register(ep.name, ep.value, source=source)
            found.append((ep.name, ep.value, source))
        for name, value, source in found:
            self.register(name, value, source=source)
        self._plugins_loaded = True

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._targets)

    def source(self, name: str) -> str:
        self.get(name)
        return self._sources[name]

    def get(self, name: str) -> T:
        self._load_plugins()
        if name not in self._targets:
            known = sorted(self._targets)
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known)}"
            )
        target = self._targets[name]
        if isinstance(target, str):
            try:
                obj = _resolve(target)
            except (ImportError, AttributeError) as exc:
                raise KdcodeError(
                    f"{self.kind} {name!r} points at {target!r}, which cannot be imported: {exc}"
                ) from exc
            target = self._targets[name] = self._checked(name, obj, self._sources[name])
        return target

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
