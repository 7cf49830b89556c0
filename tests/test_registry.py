"""The generic Registry: decorator and lazy registration, errors, and entry-point plugins.

Every test builds its own Registry; the global STRATEGIES / INITS registries are only read."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

import kdcode.registry as registry_module
from kdcode.errors import KdcodeError
from kdcode.registry import DISABLE_ENV, Registry, UnknownNameError, did_you_mean
from kdcode.strategies import STRATEGIES

GROUP = "kdcode.test_plugins"


def fake_entry_point(name: str, value: str, dist: str | None = "fake-kd-plugin") -> SimpleNamespace:
    return SimpleNamespace(name=name, value=value, dist=SimpleNamespace(name=dist) if dist else None)


@pytest.fixture
def plugins_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch):
    """Replace importlib.metadata.entry_points in kdcode.registry; returns (add, calls)."""
    installed: dict[str, list[SimpleNamespace]] = {}
    calls: list[str] = []

    def entry_points(*, group: str) -> list[SimpleNamespace]:
        calls.append(group)
        return list(installed.get(group, []))

    monkeypatch.setattr(registry_module, "entry_points", entry_points)

    def add(*eps: SimpleNamespace, group: str = GROUP) -> None:
        installed.setdefault(group, []).extend(eps)

    return add, calls


# --- registration -------------------------------------------------------------------------------


def test_decorator_registration_returns_the_object() -> None:
    reg: Registry = Registry("widget")

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8  # the decorator hands back the function itself
    assert reg.get("double") is double
    assert "double" in reg
    assert "triple" not in reg
    assert reg.source("double") == "kdcode"


def test_lazy_registration_imports_on_first_get(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    reg: Registry = Registry("widget")
    reg.register("dumps", "json:dumps")
    reg.register("hsv", "colorsys:rgb_to_hsv", source="test suite")
    assert "colorsys" not in sys.modules  # registering imported nothing
    assert reg.names() == ["dumps", "hsv"]
    assert "colorsys" not in sys.modules  # nor did listing names
    assert reg.get("dumps") is json.dumps
    hsv = reg.get("hsv")
    assert "colorsys" in sys.modules
    assert hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert reg.get("hsv") is hsv  # resolved once, then cached
    assert reg.source("hsv") == "test suite"


def test_names_and_iteration_are_sorted() -> None:
    reg: Registry = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name, f"json:{name}")
    assert reg.names() == ["alpha", "mid", "zeta"]
    assert list(reg) == ["alpha", "mid", "zeta"]


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_name_suggests_close_match_and_lists_known() -> None:
    with pytest.raises(UnknownNameError) as info:
        STRATEGIES.get("pretrainig")
    message = str(info.value)
    assert "unknown strategy 'pretrainig'" in message
    assert "Did you mean 'pretraining'" in message
    known = message.split(" Known: ")[1].split(", ")
    assert known == STRATEGIES.names() == sorted(known)
    assert {"hard-only", "in-training", "pretraining"} <= set(known)
    assert isinstance(info.value, KdcodeError)  # the CLI prints it as a one-line error


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    reg: Registry = Registry("init")
    reg.register("spread", "json:dumps")
    reg.register("alternate", "json:loads")
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzz")
    assert str(info.value) == "unknown init 'zzzz'. Known: alternate, spread"


def test_did_you_mean() -> None:
    assert did_you_mean("sprad", ["spread", "random"]) == " Did you mean 'spread'?"
    assert did_you_mean("qqqq", ["spread", "random"]) == ""
    assert did_you_mean("x", []) == ""


def test_collision_names_both_sources() -> None:
    reg: Registry = Registry("strategy")
    reg.register("kd", "json:dumps", source="package 'first'")
    with pytest.raises(KdcodeError) as info:
        reg.register("kd", "json:loads", source="package 'second'")
    message = str(info.value)
    assert "strategy 'kd' is registered twice" in message
    assert "by package 'first' and by package 'second'" in message
    assert DISABLE_ENV in message
    assert reg.get("kd") is json.dumps  # the first registration stays


def test_collision_through_decorator() -> None:
    reg: Registry = Registry("init")
    reg.register("same")(len)
    with pytest.raises(KdcodeError, match="registered twice: by kdcode and by kdcode"):
        reg.register("same")(max)


@pytest.mark.parametrize(
    ("target", "detail"),
    [
        ("kdcode_no_such_module_xyz:thing", "No module named 'kdcode_no_such_module_xyz'"),
        ("json:no_such_attribute", "no_such_attribute"),
    ],
)
def test_lazy_target_that_cannot_be_imported(target: str, detail: str) -> None:
    reg: Registry = Registry("strategy")
    reg.register("broken", target)
    assert "broken" in reg  # registering is fine; resolving fails
    with pytest.raises(KdcodeError) as info:
        reg.get("broken")
    assert not isinstance(info.value, UnknownNameError)
    message = str(info.value)
    assert f"strategy 'broken' points at {target!r}, which cannot be imported" in message
    assert detail in message
    assert isinstance(info.value.__cause__, (ImportError, AttributeError))


# --- entry-point plugins ----------------------------------------------------------------------------


def test_entry_point_plugins_are_discovered_lazily(plugins_on, fake_entry_points) -> None:
    add, calls = fake_entry_points
    add(fake_entry_point("dumper", "json:dumps"), fake_entry_point("orphan", "json:loads", dist=None))
    add(fake_entry_point("elsewhere", "json:dump"), group="some.other.group")
    reg: Registry = Registry("strategy", group=GROUP)
    reg.register("builtin", "json:JSONEncoder")
    assert calls == []  # nothing is discovered at construction or registration
    assert reg.names() == ["builtin", "dumper", "orphan"]
    assert calls == [GROUP]
    assert reg.get("dumper") is json.dumps
    assert reg.get("orphan") is json.loads
    assert reg.source("dumper") == "package 'fake-kd-plugin'"
    assert reg.source("orphan") == "entry point 'json:loads'"
    assert reg.source("builtin") == "kdcode"
    assert "dumper" in reg
    assert calls == [GROUP]  # discovered once


def test_entry_point_discovery_on_first_get(plugins_on, fake_entry_points) -> None:
    add, calls = fake_entry_points
    add(fake_entry_point("dumper", "json:dumps"))
    reg: Registry = Registry("strategy", group=GROUP)
    assert reg.get("dumper") is json.dumps
    assert calls == [GROUP]


def test_entry_point_colliding_with_builtin_names_both(plugins_on, fake_entry_points) -> None:
    add, _ = fake_entry_points
    add(fake_entry_point("pretraining", "json:dumps", dist="evil-plugin"))
    reg: Registry = Registry("strategy", group=GROUP)
    reg.register("pretraining", "kdcode.strategies.pretraining:PretrainingKD")
    with pytest.raises(KdcodeError) as info:
        reg.names()
    message = str(info.value)
    assert "strategy 'pretraining' is registered twice" in message
    assert "by kdcode and by package 'evil-plugin'" in message


def test_broken_entry_point_fails_only_when_used(plugins_on, fake_entry_points) -> None:
    add, _ = fake_entry_points
    add(fake_entry_point("broken", "kdcode_no_such_plugin_mod:Strategy", dist="broken-plugin"))
    reg: Registry = Registry("strategy", group=GROUP)
    reg.register("ok", "json:dumps")
    assert reg.get("ok") is json.dumps
    with pytest.raises(KdcodeError, match="'kdcode_no_such_plugin_mod:Strategy', which cannot be imported"):
        reg.get("broken")


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_env_turns_discovery_off(monkeypatch: pytest.MonkeyPatch, fake_entry_points, value: str) -> None:
    add, calls = fake_entry_points
    add(fake_entry_point("dumper", "json:dumps"))
    monkeypatch.setenv(DISABLE_ENV, value)
    reg: Registry = Registry("strategy", group=GROUP)
    reg.register("builtin", "json:loads")
    assert reg.names() == ["builtin"]
    assert "dumper" not in reg
    with pytest.raises(UnknownNameError, match="Known: builtin"):
        reg.get("dumper")
    assert calls == []  # entry points were not even listed


@pytest.mark.parametrize("value", ["", "0"])
def test_disable_env_empty_or_zero_keeps_discovery_on(
    monkeypatch: pytest.MonkeyPatch, fake_entry_points, value: str
) -> None:
    add, calls = fake_entry_points
    add(fake_entry_point("dumper", "json:dumps"))
    monkeypatch.setenv(DISABLE_ENV, value)
    reg: Registry = Registry("strategy", group=GROUP)
    assert reg.names() == ["dumper"]
    assert calls == [GROUP]


def test_registry_without_group_never_looks_for_plugins(plugins_on, fake_entry_points) -> None:
    add, calls = fake_entry_points
    add(fake_entry_point("dumper", "json:dumps"))
    reg: Registry = Registry("widget")
    assert reg.names() == []
    assert calls == []


# --- contracts: base class, a name written once -------------------------------------------------------


def test_base_class_is_checked_at_registration_and_on_first_lazy_get() -> None:
    from kdcode.strategies.base import Strategy

    reg: Registry = Registry("strategy", base=Strategy)
    with pytest.raises(KdcodeError, match="not a subclass of kdcode.strategies.base.Strategy"):
        reg.register("not-a-strategy")(json.JSONEncoder)
    reg.register("lazy-bad", "json:JSONEncoder", source="package 'bad'")
    with pytest.raises(KdcodeError, match="'lazy-bad' from package 'bad' is .*not a subclass"):
        reg.get("lazy-bad")
    lazy_base: Registry = Registry("strategy", base="kdcode.strategies.base:Strategy")
    lazy_base.register("fine", "kdcode.strategies.hard_only:HardOnly")
    assert issubclass(lazy_base.get("fine"), Strategy)


def test_a_plugin_is_named_where_it_is_registered_and_refused_a_second_name() -> None:
    from kdcode.plugins import make_strategy
    from kdcode.strategies.base import Strategy

    class Named(Strategy):
        pass

    reg: Registry = Registry("strategy", base=Strategy)
    reg.register("my-kd")(Named)
    assert reg.get("my-kd") is Named and Named.name == ""  # the class is not changed
    assert make_strategy("hard-only", {}).name == "hard-only"

    class SaysOtherwise(Strategy):
        name = "something-else"

    with pytest.raises(KdcodeError, match="calls itself 'something-else'"):
        reg.register("mine")(SaysOtherwise)


def test_every_builtin_plugin_takes_its_name_from_the_registry() -> None:
    from kdcode.inits import INITS
    from kdcode.plugins import make_init, make_strategy

    for reg, make in ((STRATEGIES, make_strategy), (INITS, make_init)):
        for name in reg.names():
            assert "name" not in vars(reg.get(name))  # written once: in the registration
            params = {"layers": [0]} if name == "layers" else {"path": "x"} if name == "pretrained" else {}
            assert make(name, params).name == name
