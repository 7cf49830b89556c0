"""The dependency policy (docs/dependencies.md) holds: every pin in constraints.txt lies inside pyproject.toml's
ranges, the libraries that decide the golden numbers have an upper bound, and this environment, where the suite
runs, is inside the ranges too."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NUMERICS = {"torch", "transformers", "tokenizers"}  # their releases move the golden figures


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (project["optional-dependencies"][extra] if extra else project["dependencies"])]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, v = line.partition("==")
            pins[canonicalize_name(name)] = Version(v.strip())
    return pins


def test_every_pin_is_inside_the_declared_ranges():
    pins = _pins()
    for req in _requirements() + _requirements("dev"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt pins {name} {pins[name]} " \
                                                                      f"outside pyproject's {req}"


def test_the_libraries_behind_the_golden_figures_have_an_upper_bound():
    for req in _requirements():
        if canonicalize_name(req.name) in NUMERICS:
            assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{req} has no upper bound"


def test_this_environment_is_inside_the_ranges():
    for req in _requirements():
        try:
            installed = Version(version(req.name))
        except PackageNotFoundError:  # pragma: no cover - the package would not import
            raise AssertionError(f"{req.name} is not installed") from None
        assert req.specifier.contains(Version(installed.base_version), prereleases=True), f"{req.name} {installed}"
