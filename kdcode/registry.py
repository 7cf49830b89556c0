"""One generic registry for every pluggable kind (KD strategies, student inits).

Entries are registered with a decorator, or lazily as a ``"module:attr"`` string so that start-up
imports nothing heavy. Third-party packages add entries through an entry-point group, loaded on the
first lookup (``KDCODE_DISABLE_PLUGINS=1`` turns that off). The registry knows no specific plugin.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from kdcode.errors import KdcodeError

T = TypeVar("T")

DISABLE_ENV = "KDCODE_DISABLE_PLUGINS"


class UnknownNameError(KdcodeError):
    pass


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' Did you mean ...?' suffix for the closest known names (empty when none is close)."""
    from rapidfuzz import process

    close = [c for c, score, _ in process.extract(name, choices, limit=3) if score >= 60]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._targets: dict[str, T | str] = {}
        self._sources: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, name: str, target: T | str | None = None, *, source: str = "kdcode") -> Callable:
        """Register ``target`` (an object or a lazy "module:attr") under ``name``; usable as a decorator."""

        def add(obj: T | str) -> T | str:
            if name in self._targets:
                raise KdcodeError(
                    f"{self.kind} {name!r} is registered twice: by {self._sources[name]} and by {source}; "
                    f"uninstall one of them or set {DISABLE_ENV}=1"
                )
            self._targets[name] = obj
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
            module, _, attr = target.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise KdcodeError(
                    f"{self.kind} {name!r} points at {target!r}, which cannot be imported: {exc}"
                ) from exc
            self._targets[name] = obj
            return obj
        return target

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
