"""RunSpec and friends: defaults, validation messages, CLI-over-file resolution, YAML round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import run
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kdcode.errors import KdcodeError
from kdcode.plugins import make_init, make_strategy, validate_plugins
from kdcode.registry import UnknownNameError
from kdcode.spec import (
    DEFAULT_DISTIL_BUDGET,
    DataSpec,
    EvalSpec,
    RunSpec,
    TrainSpec,
    build_spec,
    deep_merge,
    dump_yaml,
    read_spec_file,
    resolve_run_spec,
)
from kdcode.spec_pretrain import ModelShape, PretrainSpec

# --- defaults -------------------------------------------------------------------------------------------


def test_run_spec_defaults() -> None:
    spec = RunSpec()
    assert spec.teacher.name == "bundled"
    assert spec.teacher.revision is None
    assert spec.teacher.trust_remote_code is False
    assert spec.student.layers == 6
    assert spec.student.init.name == "auto"  # spread or the measured run, whichever starts lower
    assert spec.strategy.name == "reverse-kl"
    assert spec.strategy.params == {}
    assert spec.data.source == "stdlib"
    assert spec.data.glob == "**/*.py"
    assert (spec.data.valid_fraction, spec.data.test_fraction) == (0.02, 0.05)
    assert spec.train.max_steps == 800
    assert spec.train.max_minutes == 15.0
    assert spec.train.epochs is None
    assert spec.out == "student"


def test_resolve_empty_equals_defaults() -> None:
    assert resolve_run_spec({}, {}, "defaults") == RunSpec()


def test_default_spec_plugins_validate() -> None:
    strategy, init = validate_plugins(RunSpec())
    assert type(strategy).__name__ == "ReverseKL"
    assert strategy.params.temperature == 1.0
    assert (strategy.params.alpha_soft, strategy.params.alpha_hard) == (1.0, 0.5)
    assert type(init).__name__ == "Auto"


def test_train_spec_needs_a_budget() -> None:
    with pytest.raises(ValidationError, match="set a budget"):
        TrainSpec()
    assert TrainSpec(epochs=0.5).epochs == 0.5


# --- unknown keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"student": {"layerz": 3}}, "student.layerz"),
        ({"teacher": {"nmae": "gpt2"}}, "teacher.nmae"),
        ({"strategy": {"name": "pretraining", "temperature": 2}}, "strategy.temperature"),
        ({"data": {"fraction": 0.1}}, "data.fraction"),
        ({"train": {"max_step": 10}}, "train.max_step"),
    ],
)
def test_unknown_key_names_the_dotted_field(data: dict, field: str) -> None:
    for call in (lambda: build_spec(RunSpec, data, "run.yaml"), lambda: resolve_run_spec(data, {}, "run.yaml")):
        with pytest.raises(KdcodeError) as info:
            call()
        message = str(info.value)
        assert message.startswith("invalid spec in run.yaml: ")
        assert f"{field}: unknown key (not a field of this section)" in message


def test_unknown_key_in_cli_overrides_is_reported_too() -> None:
    with pytest.raises(KdcodeError, match=r"student\.depth: unknown key"):
        resolve_run_spec({}, {"student": {"depth": 2}}, "flags")


def test_several_problems_are_all_listed() -> None:
    with pytest.raises(KdcodeError) as info:
        build_spec(RunSpec, {"student": {"layers": 0, "x": 1}, "y": 2}, "s.yaml")
    message = str(info.value)
    assert "student.layers: Input should be greater than or equal to 1" in message
    assert "student.x: unknown key" in message
    assert "y: unknown key" in message
    assert message.count("; ") == 2


# --- wrong types and ranges ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"student": {"layers": 0}}, "student.layers: Input should be greater than or equal to 1"),
        ({"student": {"layers": "six"}}, "student.layers: Input should be a valid integer"),
        ({"train": {"max_steps": -5}}, "train.max_steps: Input should be greater than or equal to 1"),
        ({"train": {"max_minutes": 0}}, "train.max_minutes: Input should be greater than 0"),
        ({"train": {"lr": -1e-3, "max_steps": 5}}, "train.lr: Input should be greater than 0"),
        ({"train": {"precision": "fp8", "max_steps": 5}},
         "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"data": {"test_fraction": 0.5}}, "data.test_fraction: Input should be less than 0.5"),
        ({"data": {"format": "csv"}}, "data.format: Input should be 'raw' or 'py150'"),
        ({"teacher": {"trust_remote_code": "maybe"}}, "teacher.trust_remote_code: Input should be a valid boolean"),
        ({"strategy": {"params": [1, 2]}}, "strategy.params: Input should be a valid dictionary"),
    ],
)
def test_wrong_types_and_ranges(data: dict, needle: str) -> None:
    with pytest.raises(KdcodeError) as info:
        resolve_run_spec(data, {}, "spec.yaml")
    assert needle in str(info.value)


def test_explicit_budget_values_still_validated() -> None:
    # a budget key set to an invalid value does not get silently replaced by the default budget
    with pytest.raises(KdcodeError, match="train.max_steps"):
        resolve_run_spec({"train": {"max_steps": 0}}, {}, "spec.yaml")


@pytest.mark.parametrize("temperature", [0, -1.5])
def test_strategy_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(KdcodeError) as info:
        make_strategy("pretraining", {"temperature": temperature})
    message = str(info.value)
    assert message.startswith("invalid spec in strategy 'pretraining' params: ")
    assert "temperature: Input should be greater than 0" in message


def test_strategy_all_alphas_zero_rejected() -> None:
    with pytest.raises(KdcodeError, match="alpha_soft, alpha_hard and alpha_cos are all zero"):
        make_strategy("pretraining", {"alpha_soft": 0, "alpha_hard": 0, "alpha_cos": 0})
    with pytest.raises(KdcodeError, match="alpha_soft, alpha_hard, alpha_hid and alpha_attn are all zero"):
        make_strategy("intermediate", {"alpha_soft": 0, "alpha_hard": 0, "alpha_hid": 0})
    # one non-zero weight is enough
    assert make_strategy("pretraining", {"alpha_soft": 0, "alpha_hard": 1.0}).params.alpha_hard == 1.0


def test_strategy_unknown_param_named() -> None:
    with pytest.raises(KdcodeError, match=r"temprature: unknown key"):
        make_strategy("pretraining", {"temprature": 1.0})


def test_validate_plugins_reports_spec_params() -> None:
    spec = resolve_run_spec({"strategy": {"params": {"temperature": 0}}}, {}, "spec.yaml")  # free-form here
    with pytest.raises(KdcodeError, match="temperature: Input should be greater than 0"):
        validate_plugins(spec)


def test_unknown_strategy_and_init_names_suggest() -> None:
    with pytest.raises(UnknownNameError) as info:
        make_strategy("pretrainig", {})
    assert "unknown strategy 'pretrainig'. Did you mean 'pretraining'" in str(info.value)
    known = str(info.value).split(" Known: ")[1].split(", ")
    assert {"hard-only", "in-training", "pretraining"} <= set(known)
    with pytest.raises(UnknownNameError, match=r"unknown init 'sprea'\. Did you mean 'spread'"):
        make_init("sprea", {})


def test_model_shape_hidden_must_divide_by_heads() -> None:
    with pytest.raises(ValidationError, match=r"hidden \(130\) must be a multiple of heads \(4\)"):
        ModelShape(hidden=130, heads=4)
    assert ModelShape(hidden=132, heads=4).hidden == 132
    with pytest.raises(KdcodeError) as info:
        build_spec(PretrainSpec, {"model": {"hidden": 100, "heads": 3}}, "pretrain.yaml")
    assert "model: hidden (100) must be a multiple of heads (3)" in str(info.value)
    with pytest.raises(KdcodeError, match=r"model\.vocab_size: Input should be greater than or equal to 300"):
        build_spec(PretrainSpec, {"model": {"vocab_size": 100}}, "pretrain.yaml")


def test_validate_assignment() -> None:
    spec = RunSpec()
    with pytest.raises(ValidationError):
        spec.student.layers = 0
    assert spec.student.layers == 6


def test_other_specs_reject_unknown_keys() -> None:
    with pytest.raises(KdcodeError, match=r"sample: unknown key"):
        build_spec(EvalSpec, {"sample": 3}, "eval")
    assert build_spec(EvalSpec, {"samples": 3}, "eval").samples == 3


# --- resolve_run_spec -------------------------------------------------------------------------------------


def test_flags_override_file_values() -> None:
    file_data = {
        "student": {"layers": 4, "init": "alternate"},
        "train": {"lr": 1e-3, "max_steps": 100, "batch_size": 4},
        "data": {"source": "corpus/"},
        "out": "from-file",
    }
    flags = {"student": {"layers": 2}, "train": {"max_steps": 10}, "out": "from-flags"}
    spec = resolve_run_spec(file_data, flags, "run.yaml")
    assert spec.student.layers == 2  # flag wins
    assert spec.student.init.name == "alternate"  # file value kept beside the flag (deep merge)
    assert spec.train.max_steps == 10
    assert spec.train.lr == 1e-3
    assert spec.train.batch_size == 4
    assert spec.train.max_minutes is None  # the file chose a budget: no default added
    assert spec.data.source == "corpus/"
    assert spec.out == "from-flags"
    # the inputs are not mutated
    assert file_data["train"] == {"lr": 1e-3, "max_steps": 100, "batch_size": 4}
    assert flags == {"student": {"layers": 2}, "train": {"max_steps": 10}, "out": "from-flags"}


def test_default_budget_only_without_any_budget_key() -> None:
    spec = resolve_run_spec({"train": {"lr": 1e-3}}, {}, "run.yaml")
    assert (spec.train.max_steps, spec.train.max_minutes, spec.train.epochs) == (800, 15.0, None)
    assert DEFAULT_DISTIL_BUDGET == {"max_steps": 800, "max_minutes": 15.0}

    spec = resolve_run_spec({"train": {"epochs": 2}}, {}, "run.yaml")
    assert (spec.train.max_steps, spec.train.max_minutes, spec.train.epochs) == (None, None, 2.0)

    spec = resolve_run_spec({}, {"train": {"max_minutes": 3}}, "flags")
    assert (spec.train.max_steps, spec.train.max_minutes, spec.train.epochs) == (None, 3.0, None)

    spec = resolve_run_spec({"train": {"max_steps": 50}}, {}, "run.yaml")
    assert (spec.train.max_steps, spec.train.max_minutes, spec.train.epochs) == (50, None, None)

    # a budget key given as null counts as not given, so the default budget is added; the explicit null
    # then wins over the default's max_steps: no step cap, the 15-minute default only
    spec = resolve_run_spec({"train": {"max_steps": None}}, {}, "run.yaml")
    assert (spec.train.max_steps, spec.train.max_minutes) == (None, 15.0)

    # an empty train section (YAML "train:") is fine
    spec = resolve_run_spec({"train": None}, {}, "run.yaml")
    assert (spec.train.max_steps, spec.train.max_minutes) == (800, 15.0)


def test_deep_merge() -> None:
    base = {"a": {"x": 1, "y": {"p": 1}}, "b": 2}
    merged = deep_merge(base, {"a": {"y": {"q": 2}}, "b": {"new": 1}, "c": 3})
    assert merged == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": {"new": 1}, "c": 3}
    assert base == {"a": {"x": 1, "y": {"p": 1}}, "b": 2}


# --- YAML round trips -------------------------------------------------------------------------------------


def roundtrip(spec: RunSpec) -> RunSpec:
    return RunSpec.model_validate(yaml.safe_load(dump_yaml(spec)))


def test_yaml_roundtrip_default_and_custom() -> None:
    assert roundtrip(RunSpec()) == RunSpec()
    custom = resolve_run_spec(
        {
            "teacher": {"name": "microsoft/CodeGPT-small-py", "revision": "main"},
            "student": {"layers": 3, "init": {"name": "random", "params": {"seed": 3}}},
            "strategy": {"name": "in-training", "params": {"temperature": 1.5, "alpha_soft": 0.25}},
            "data": {"source": "data/train.jsonl", "format": "py150", "max_files": 100, "test_fraction": 0.1},
            "train": {"epochs": 1.5, "lr": 3e-4, "precision": "bf16", "teacher_lr": 1e-5},
            "out": "students/s3",
        },
        {},
        "custom.yaml",
    )
    text = dump_yaml(custom)
    assert text.splitlines()[0] == "teacher:"  # sections keep their declared order
    assert roundtrip(custom) == custom
    assert roundtrip(custom).train.teacher_lr == 1e-5


def test_dumped_yaml_is_a_valid_spec_file(tmp_path: Path) -> None:
    spec = resolve_run_spec({"student": {"layers": 2}, "train": {"max_steps": 7}}, {}, "x")
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(spec), encoding="utf-8")
    assert resolve_run_spec(read_spec_file(path), {}, str(path)) == spec


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(min_value=1, max_value=48),
    lr=st.floats(min_value=1e-9, max_value=10.0, allow_nan=False, allow_infinity=False),
    temperature=st.floats(min_value=1e-3, max_value=100.0),
    out=st.text(max_size=20),
    source=st.text(min_size=1, max_size=20),
    max_steps=st.one_of(st.none(), st.integers(min_value=1, max_value=10**9)),
    valid_fraction=st.floats(min_value=0.0, max_value=0.49),
)
def test_yaml_roundtrip_property(
    layers: int, lr: float, temperature: float, out: str, source: str, max_steps: int | None, valid_fraction: float
) -> None:
    train = {"lr": lr} if max_steps is None else {"lr": lr, "max_steps": max_steps}
    spec = resolve_run_spec(
        {
            "student": {"layers": layers},
            "strategy": {"params": {"temperature": temperature}},
            "data": {"source": source, "valid_fraction": valid_fraction},
            "train": train,
            "out": out,
        },
        {},
        "hypothesis",
    )
    assert roundtrip(spec) == spec


# --- read_spec_file ---------------------------------------------------------------------------------------


def test_read_spec_file_missing(tmp_path: Path) -> None:
    with pytest.raises(KdcodeError, match="does not exist; pass an existing .yaml or .json file"):
        read_spec_file(tmp_path / "nope.yaml")
    with pytest.raises(KdcodeError, match="does not exist"):
        read_spec_file(tmp_path)  # a folder is not a spec file


def test_read_spec_file_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("student: {layers: 3\ntrain: [\n")
    with pytest.raises(KdcodeError) as info:
        read_spec_file(path)
    message = str(info.value)
    assert f"spec file {path} is not valid YAML/JSON" in message
    assert "\n" not in message  # one line for the CLI


def test_read_spec_file_invalid_json_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"student": ')
    with pytest.raises(KdcodeError, match="is not valid YAML/JSON"):
        read_spec_file(path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(KdcodeError, match="is not valid YAML/JSON"):
        read_spec_file(binary)


def test_read_spec_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- student\n- teacher\n")
    with pytest.raises(KdcodeError, match="must hold a mapping of sections"):
        read_spec_file(path)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(KdcodeError, match="must hold a mapping of sections"):
        read_spec_file(scalar)


def test_read_spec_file_valid(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert read_spec_file(empty) == {}
    y = tmp_path / "run.yaml"
    y.write_text("student:\n  layers: 3\ntrain:\n  max_steps: 5\n")
    assert read_spec_file(y) == {"student": {"layers": 3}, "train": {"max_steps": 5}}
    j = tmp_path / "run.json"
    j.write_text('{"data": {"source": "x.jsonl"}}')
    assert read_spec_file(j) == {"data": {"source": "x.jsonl"}}
    spec = resolve_run_spec(read_spec_file(y), {}, str(y))
    assert (spec.student.layers, spec.train.max_steps, spec.train.max_minutes) == (3, 5, None)


def test_data_spec_defaults() -> None:
    spec = DataSpec()
    assert (spec.source, spec.field, spec.format, spec.max_files, spec.exclude_tests) == (
        "stdlib",
        "code",
        "raw",
        None,
        True,
    )


def test_old_init_params_still_load_with_one_deprecation_line(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("student:\n  layers: 2\n  init: layers\n  init_params: {layers: [0, 3]}\n")
    r = run("distil", "--spec", old, "--print-spec")
    assert r.exit_code == 0, r.output
    assert "warning: student.init_params is deprecated" in r.output
    printed = yaml.safe_load(r.stdout)
    assert printed["student"]["init"] == {"name": "layers", "params": {"layers": [0, 3]}}
    assert "init_params" not in printed["student"]
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"student": printed["student"]}))
    r = run("distil", "--spec", new, "--validate")
    assert r.exit_code == 0 and "deprecated" not in r.output, r.output
    assert "init 'layers'" in r.output


OLD_WEIGHTS = {  # strategy: {old name: new name} (kdcode <= 0.1.0)
    "pretraining": {"alpha_ce": "alpha_soft", "alpha_clm": "alpha_hard"},
    "in-training": {"alpha_ce": "alpha_soft", "alpha_clm": "alpha_hard"},
    "intermediate": {"alpha_ce": "alpha_soft", "alpha_clm": "alpha_hard"},
    "jsd": {"alpha_kd": "alpha_soft", "alpha_clm": "alpha_hard"},
    "reverse-kl": {"alpha_kd": "alpha_soft", "alpha_clm": "alpha_hard"},
    "tvd": {"alpha_tvd": "alpha_soft", "alpha_clm": "alpha_hard"},
}


@pytest.mark.parametrize("name", list(OLD_WEIGHTS))
def test_old_weight_names_still_load_as_the_new_ones_with_a_deprecation(name):
    from kdcode.errors import KdcodeDeprecation

    old = dict(zip(OLD_WEIGHTS[name], (0.25, 0.75)))
    with pytest.warns(KdcodeDeprecation) as caught:
        params = make_strategy(name, old).params
    assert sorted(str(w.message) for w in caught) == sorted(
        f"strategy param {o} is deprecated: write {n}" for o, n in OLD_WEIGHTS[name].items()
    )
    assert (params.alpha_soft, params.alpha_hard) == (0.25, 0.75)
    assert not any(k in params.model_dump() for k in OLD_WEIGHTS[name])  # manifests record the new names
    with pytest.raises(KdcodeError, match="give alpha_soft alone"):
        make_strategy(name, {next(iter(OLD_WEIGHTS[name])): 1.0, "alpha_soft": 1.0})


def test_old_weight_names_in_a_spec_file_are_one_warning_line_each(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("strategy:\n  name: pretraining\n  params: {alpha_ce: 0.9, alpha_clm: 0.1}\n")
    r = run("distil", "--spec", old, "--validate")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: strategy param alpha_ce is deprecated: write alpha_soft",
                        "warning: strategy param alpha_clm is deprecated: write alpha_hard"], r.output


def test_a_flag_that_changes_the_init_drops_the_file_init_params(tmp_path):
    from kdcode.spec import resolve_run_spec

    file = {"student": {"init": {"name": "layers", "params": {"layers": [0, 3]}}}}
    assert resolve_run_spec(file, {"student": {"init": {"name": "first"}}}, "t").student.init.params == {}
    kept = resolve_run_spec(file, {"student": {"layers": 2}}, "t").student.init
    assert kept.name == "layers" and kept.params == {"layers": [0, 3]}
