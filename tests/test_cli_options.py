"""Every command's options against the specs: an option that sets a spec field takes its type, default and help from
that field (written once, in the spec), and every other option is named here with the reason it is no spec's."""

from __future__ import annotations

import pytest
import typer

from kdcode.cli import app
from kdcode.cli._options import _MISSING, SpecKey, cli_type, help_text, option_keys, spec_field, spec_flags
from kdcode.spec import build_spec

# (command, option) -> why it is not a spec field
NOT_IN_A_SPEC = {
    **{(c, "--json"): "where the figures are written" for c in ("eval", "bench", "plan", "complete", "list",
                                                                 "doctor")},
    **{(c, "--record"): "stores the figures in the model's manifest" for c in ("eval", "bench")},
    **{(c, "--no-verify"): "skips the weights' check on loading" for c in ("eval", "bench", "complete", "serve",
                                                                           "compress", "export")},
    **{(c, "--overwrite"): "what to do with an existing output" for c in ("distil", "pretrain", "cache-teacher",
                                                                          "compress", "export", "data prepare")},
    **{(c, "--out"): "the output path, checked before any work" for c in ("cache-teacher", "compress", "export",
                                                                          "data prepare", "data lines", "report")},
    **{(c, "--resume"): "continues a run, not a setting of it" for c in ("distil", "pretrain", "sweep")},
    **{(c, "--temperature"): "a strategy's param, checked by its own Params (kdcode list NAME)"
       for c in ("distil", "sweep")},
    **{(c, "--draft"): "a second model, loaded beside the first" for c in ("bench", "complete", "serve")},
    **{(c, "--draft-tokens"): "the draft's proposal length, or auto" for c in ("eval", "bench", "complete", "serve")},
    **{(c, "--validate"): "checks instead of running" for c in ("distil", "sweep")},
    ("distil", "--spec"): "the spec file itself",
    ("distil", "--print-spec"): "prints the spec instead of running",
    ("eval", "--predictions"): "a file of the predictions",
    ("eval", "--draft-for"): "a second model (eval measures the draft's acceptance)",
    ("bench", "--compare"): "a second model, timed beside the first",
    ("complete", "--file"): "the text completed (else stdin)",
    ("complete", "--no-suffix"): "whether the text after the cursor is sent",
    ("sweep", "--layers"): "a grid over student.layers (a list of depths)",
    ("data prepare", "--format"): "the output layout (py150 only)",
}


def _commands() -> dict[str, object]:
    """Command name -> the function behind it (``data prepare`` for the sub-app's commands)."""
    found: dict[str, object] = {}
    for info in app.registered_commands:
        found[info.name or info.callback.__name__] = info.callback
    for group in app.registered_groups:
        for info in group.typer_instance.registered_commands:
            found[f"{group.name} {info.name}"] = info.callback
    return found


def _click_command(name: str):  # noqa: ANN202 - typer's own click classes
    cmd = typer.main.get_command(app)
    for part in name.split():
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    return cmd


def _options(name: str) -> dict:
    return {p.opts[0]: p for p in _click_command(name).params
            if p.param_type_name == "option" and p.opts[0] != "--help"}


COMMANDS = _commands()


def test_every_command_is_walked() -> None:
    assert {"distil", "pretrain", "eval", "bench", "plan", "compress", "export", "serve", "complete", "sweep",
            "cache-teacher", "data prepare", "data lines"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_option_is_a_spec_field_or_says_why_not(name: str) -> None:
    keys = {mark.flag: mark for mark in option_keys(COMMANDS[name]).values()}
    for flag in _options(name):
        if flag in keys:
            continue
        assert (name, flag) in NOT_IN_A_SPEC, f"kdcode {name} {flag}: derive it from a spec field (spec_option), or " \
            "say here why it is no spec's"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_spec_options_take_type_default_and_help_from_the_field(name: str) -> None:
    options = _options(name)
    seen: dict[tuple[type, str], str] = {}
    for mark in option_keys(COMMANDS[name]).values():
        assert isinstance(mark, SpecKey)
        field, default = spec_field(mark.model, mark.key)
        option = options[mark.flag]
        assert (mark.model, mark.key) not in seen, f"{mark.key} set by {seen[(mark.model, mark.key)]} and {mark.flag}"
        seen[(mark.model, mark.key)] = mark.flag
        # the help is the field's description (a sweep option may say where else it goes, after it)
        assert option.help is not None and option.help.startswith(help_text(field.description).rstrip(".")), mark.key
        # not given -> None: the spec file's value or the spec's default stays
        assert option.default is None, f"{mark.flag} defaults to {option.default!r}, not the spec's"
        kind = cli_type(field.annotation)
        assert option.type_descriptor.annotation is kind, mark.flag
        if default is not _MISSING and default is not None and not isinstance(default, bool):
            shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
            assert option.show_default == shown, f"{mark.flag} shows {option.show_default!r}, the spec has {shown!r}"


def test_every_reason_given_is_for_an_option_that_exists() -> None:
    for name, flag in NOT_IN_A_SPEC:
        assert flag in _options(name), f"kdcode {name} has no {flag}: drop it from NOT_IN_A_SPEC"


def test_flags_not_given_leave_every_field_at_the_spec_default() -> None:
    from kdcode.spec import BenchSpec, EvalSpec

    for name, model in (("eval", EvalSpec), ("bench", BenchSpec)):
        fn = COMMANDS[name]
        assert spec_flags(fn, {p: None for p in option_keys(fn)}, model) == {}
        assert build_spec(model, {}, "flags") == model()


def test_a_given_flag_reaches_its_field_through_the_cli(monkeypatch) -> None:
    """One run of the real command line: the parsed flags, as the spec the library function receives."""
    from typer.testing import CliRunner

    import kdcode.evaluation.bench as bench_mod

    got = {}

    def fake_bench(model, spec, **kw):
        got["spec"], got["runtime"] = spec, kw["runtime"]
        raise SystemExit(0)

    monkeypatch.setattr(bench_mod, "run_bench", fake_bench)
    r = CliRunner().invoke(app, ["bench", "bundled", "--prompts", "3", "--rounds", "2", "--context", "100",
                                 "--data", "somewhere", "--kv-cache", "static", "--threads", "1"])
    assert r.exit_code == 0, r.output
    spec = got["spec"]
    assert (spec.prompts, spec.rounds, spec.context_tokens, spec.data.source, spec.threads) == (3, 2, 100,
                                                                                                 "somewhere", 1)
    assert spec.new_tokens == 16 and spec.seed == 0  # not given: the spec's defaults
    assert got["runtime"]["kv_cache"] == "static"


def test_a_bad_flag_value_names_the_flag() -> None:
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["plan", "--latency-ms", "50", "--ffn-keep", "1,x"])
    assert r.exit_code == 2 and "--ffn-keep" in r.output and "latency.ffn_keep" not in r.output
    r = CliRunner().invoke(app, ["serve", "bundled", "--body-timeout", "0"])
    assert r.exit_code == 2 and "--body-timeout: Input should be greater than 0" in r.output
