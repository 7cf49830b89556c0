"""Property-based tests (hypothesis) for what tests/test_spec.py, test_metrics.py and test_py150.py do
not already cover: whole-spec round trips through YAML, JSON and `--print-spec`; ES/EM symmetry and
bounds on arbitrary text and over sample lists; the py150 normaliser on fragments of real code; and
the completion-set builder's ground truths on arbitrary documents."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcode.data.corpus import Document, stdlib_root
from kdcode.data.py150 import EOL, EOS, Py150Error, lines_of, normalise
from kdcode.errors import KdcodeError
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.evaluation.metrics import line_metrics, sample_scores
from kdcode.spec import (
    BenchSpec,
    EvalSpec,
    RunSpec,
    build_spec,
    dump_yaml,
    read_spec_file,
    resolve_run_spec,
)
from kdcode.spec_pretrain import PretrainSpec

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------ spec round trip
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=16)
_name = st.text(string.ascii_letters + string.digits + "-_/.", min_size=1, max_size=20)
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False), _text
)
_params = st.dictionaries(st.text(string.ascii_lowercase + "_", min_size=1, max_size=10), _scalar, max_size=4)
_pos_float = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
_fraction = st.floats(min_value=0.0, max_value=0.49, allow_nan=False)


@st.composite
def run_spec_data(draw) -> dict:
    budget = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "max_steps": st.integers(1, 10**9),
                "epochs": _pos_float,
                "max_minutes": _pos_float,
            },
        )
    )
    return {
        "teacher": {
            "name": draw(_name),
            "revision": draw(st.none() | _name),
            "trust_remote_code": draw(st.booleans()),
            "allow_pickle": draw(st.booleans()),
        },
        "student": {
            "layers": draw(st.integers(1, 96)),
            "init": {"name": draw(_name), "params": draw(_params)},
            "hidden_size": draw(st.none() | st.integers(8, 4096)),
        },
        "strategy": {"name": draw(_name), "params": draw(_params)},
        "data": {
            "source": draw(_text.filter(bool)),
            "glob": draw(_text.filter(bool)),
            "format": draw(st.sampled_from(["raw", "py150"])),
            "valid_fraction": draw(_fraction),
            "test_fraction": draw(_fraction),
            "max_files": draw(st.none() | st.integers(1, 10**6)),
            "exclude_tests": draw(st.booleans()),
        },
        "train": {
            **budget,
            "lr": draw(_pos_float),
            "batch_size": draw(st.integers(1, 4096)),
            "block_size": draw(st.integers(8, 8192)),
            "precision": draw(st.sampled_from(["auto", "fp32", "bf16"])),
            "seed": draw(st.integers(-(2**31), 2**31)),
            "threads": draw(st.none() | st.integers(1, 256)),
        },
        "out": draw(_text),
    }


@pytest.mark.slow
@SETTINGS
@given(run_spec_data())
def test_run_spec_round_trips_through_yaml_and_json_files(data):
    spec = resolve_run_spec(data, {}, "hypothesis")
    with tempfile.TemporaryDirectory() as d:
        as_yaml, as_json = Path(d) / "run.yaml", Path(d) / "run.json"
        as_yaml.write_text(dump_yaml(spec), encoding="utf-8")
        as_json.write_text(json.dumps(spec.model_dump(mode="json")), encoding="utf-8")
        assert resolve_run_spec(read_spec_file(as_yaml), {}, str(as_yaml)) == spec
        assert resolve_run_spec(read_spec_file(as_json), {}, str(as_json)) == spec
    assert RunSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(run_spec_data())
def test_print_spec_output_is_the_same_spec(data):
    spec = resolve_run_spec(data, {}, "hypothesis")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_text(dump_yaml(spec), encoding="utf-8")
        r = run("distil", "--spec", str(path), "--print-spec")
    assert r.exit_code == 0, r.output
    assert resolve_run_spec(yaml.safe_load(r.output), {}, "printed") == spec


@SETTINGS
@given(
    st.sampled_from([EvalSpec, BenchSpec, PretrainSpec]),
    st.integers(1, 10**4),
    st.integers(-(2**31), 2**31),
    st.none() | st.integers(1, 64),
)
def test_other_specs_round_trip(model, count, seed, threads):
    data = {"seed": seed} if model is not PretrainSpec else {"train": {"seed": seed, "max_steps": count}}
    if model is EvalSpec:
        data |= {"samples": count, "threads": threads}
    elif model is BenchSpec:
        data |= {"prompts": count, "threads": threads}
    spec = build_spec(model, data, "hypothesis")
    assert build_spec(model, yaml.safe_load(dump_yaml(spec)), "yaml") == spec
    assert model.model_validate_json(spec.model_dump_json()) == spec


# ------------------------------------------------------------------------------------------ ES / EM
_any_text = st.text(max_size=40)
_code_line = st.lists(
    st.sampled_from(
        ["a", "b", "x", "_", "(", ")", "=", ":", ".", " ", "\t", "<NUM_LIT>", "<STR_LIT:s>", "é", "\u00a0"]
    ),
    max_size=20,
).map("".join)


@SETTINGS
@given(st.one_of(_any_text, _code_line), st.one_of(_any_text, _code_line))
def test_em_is_symmetric_and_es_symmetric_on_stripped_text(a, b):
    assert sample_scores(a, b)[1] == sample_scores(b, a)[1]
    assert sample_scores(a.strip(), b.strip()) == sample_scores(b.strip(), a.strip())


@SETTINGS
@given(_any_text, _any_text)
def test_es_bounds_and_em_implies_high_es_on_arbitrary_text(pred, gt):
    es, em = sample_scores(pred, gt)
    assert 0 <= es <= 100
    if em and pred.strip() == gt:
        assert es == 100


@SETTINGS
@given(st.lists(st.tuples(_code_line, _code_line), max_size=12), st.randoms(use_true_random=False))
def test_line_metrics_bounds_rounding_and_order(pairs, rnd):
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    m = line_metrics(preds, gts)
    assert m["samples"] == len(pairs)
    assert 0 <= m["es"] <= 100 and 0 <= m["em"] <= 100
    assert m["es"] == round(m["es"], 2) and m["em"] == round(m["em"], 2)
    shuffled = pairs[:]
    rnd.shuffle(shuffled)
    assert line_metrics([p for p, _ in shuffled], [g for _, g in shuffled]) == m
    stripped = [g.strip() for g in gts]  # the prediction is stripped, the ground truth is not (CodeXGLUE)
    assert line_metrics(stripped, stripped) == (
        {"es": 100.0, "em": 100.0, "samples": len(gts)} if gts else {"es": 0.0, "em": 0.0, "samples": 0}
    )


# ----------------------------------------------------------------------------- py150 normaliser
_STDLIB_FILES = sorted(p for p in stdlib_root().glob("*.py") if 1_000 < p.stat().st_size < 40_000)[:40]


@pytest.fixture(scope="module")
def stdlib_lines() -> list[list[str]]:
    return [p.read_text(encoding="utf-8").splitlines(keepends=True) for p in _STDLIB_FILES]


@SETTINGS
@given(st.data())
def test_normaliser_on_fragments_of_real_code(stdlib_lines, data):
    lines = data.draw(st.sampled_from(stdlib_lines))
    start = data.draw(st.integers(0, max(len(lines) - 1, 0)))
    length = data.draw(st.integers(0, 60))
    source = "".join(lines[start : start + length])
    try:
        out = normalise(source)
    except Py150Error:
        return
    tokens = out.split(" ")
    assert out.split() == tokens and all(tokens)  # split on spaces gives the tokens back, none empty
    assert tokens[0] == "<s>" and tokens[-1] == EOS
    assert normalise(source) == out  # deterministic
    body = [t for line in lines_of(out) for t in line.split()]
    assert body == [t for t in tokens[1:-1] if t != EOL]


# ---------------------------------------------------------------------------- completion samples
_doc_text = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.sampled_from(["x = 1", "    y", "", "  ", "\t", "def f():", "\r", "\x0c", "\u2028", "é", "#"]), max_size=30
    ).map("\n".join),
)
_py150_token = st.sampled_from(["<s>", "</s>", EOL, "a", "=", "(", ")", "<NUM_LIT>", "'<STR_LIT>'", "def", ":"])
_py150_text = st.one_of(
    st.lists(_py150_token, max_size=40).map(" ".join),  # any token soup
    st.lists(st.lists(_py150_token, max_size=6).map(" ".join), max_size=8).map(  # file-shaped
        lambda lines: "<s> " + f" {EOL} ".join(lines) + " </s>"
    ),
)


def _docs(texts: list[str]) -> list[Document]:
    return [Document(f"f{i}.py", t) for i, t in enumerate(texts)]


@SETTINGS
@given(st.lists(_doc_text, min_size=1, max_size=5), st.integers(1, 50), st.integers(0, 2**32))
def test_raw_samples_never_have_an_empty_ground_truth(texts, n, seed):
    docs = _docs(texts)
    try:
        samples = build_line_samples(docs, n, seed, "raw")
    except KdcodeError:  # no candidate line: covered by test_no_candidate_is_a_clear_error_not_a_crash
        return
    assert 1 <= len(samples) <= n
    assert len({s.id for s in samples}) == len(samples)
    by_key = {d.key: d.text for d in docs}
    for s in samples:
        assert s.gt.strip() and s.gt == s.gt.strip()
        assert len(s.gt.splitlines()) == 1
        text = by_key[s.id.rsplit("@", 1)[0]]
        assert text.startswith(s.input)
        assert text[len(s.input) :].lstrip().startswith(s.gt)
    assert build_line_samples(docs, n, seed, "raw") == samples  # seeded: the same draw


@SETTINGS
@given(st.lists(_py150_text, min_size=1, max_size=5), st.integers(1, 50), st.integers(0, 99))
def test_py150_samples_never_have_an_empty_ground_truth(texts, n, seed):
    try:
        samples = build_line_samples(_docs(texts), n, seed, "py150")
    except KdcodeError:
        return
    by_key = {d.key: d.text.split() for d in _docs(texts)}
    for s in samples:
        gt = s.gt.split()
        assert gt, s
        assert EOL not in gt and EOS not in gt
        assert s.gt == " ".join(gt)
        tokens, cut = by_key[s.id.rsplit("#", 1)[0]], len(s.input.split())
        assert tokens[:cut] == s.input.split() and tokens[cut : cut + len(gt)] == gt  # the rest of that line
        assert tokens[cut + len(gt) : cut + len(gt) + 1] in ([], [EOL], [EOS])


@SETTINGS
@given(st.lists(st.one_of(_doc_text, _py150_text), max_size=4), st.sampled_from(["raw", "py150"]))
def test_no_candidate_is_a_clear_error_not_a_crash(texts, fmt):
    try:
        samples = build_line_samples(_docs(texts), 5, 0, fmt)
    except KdcodeError as exc:
        assert "nothing to complete" in str(exc)
        return
    assert samples and all(s.gt.strip() for s in samples)
