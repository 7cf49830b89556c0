"""CodeXGLUE line-level metrics: hand-computed golden cases, then an independent re-implementation of
CodeXGLUE's evaluator (code/CodeCompletion-line/evaluator/evaluator.py: post_process, fuzzywuzzy
``fuzz.ratio`` backed by python-Levenshtein, ``pred.split() == gt.split()``) checked against
``kdcode.evaluation.metrics`` on deterministic pseudo-random pairs."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcode.evaluation.metrics import fuzzy_ratio, line_metrics, mean, post_process, sample_scores

# ---------------------------------------------------------------------------------------------------
# Golden cases, computed by hand.
# indel distance d = len(a) + len(b) - 2 * LCS(a, b); ratio r = (len(a) + len(b) - d) / (len(a) + len(b));
# score = int(round(100 * r)) with Python's round (half to even).
# ---------------------------------------------------------------------------------------------------


def test_identical_strings_score_100_and_match() -> None:
    assert sample_scores("x = foo(1, 2)", "x = foo(1, 2)") == (100, True)
    assert fuzzy_ratio("return self", "return self") == 100


def test_both_empty_is_100_because_equality_is_checked_before_emptiness() -> None:
    assert fuzzy_ratio("", "") == 100
    assert sample_scores("", "") == (100, True)
    # a whitespace-only prediction is stripped to "" and so equals an empty ground truth
    assert sample_scores("   \t ", "") == (100, True)


def test_one_empty_is_0() -> None:
    assert fuzzy_ratio("", "abc") == 0
    assert fuzzy_ratio("abc", "") == 0
    assert sample_scores("", "x = 1") == (0, False)
    assert sample_scores("   ", "x = 1") == (0, False)
    # the ground truth is not stripped: " " is not empty, so this is a real (zero-overlap) ratio
    assert sample_scores("x", " ") == (0, False)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("abc", "abd", 67),  # LCS 2, d 2: 4/6 = 66.67 -> 67
        ("kitten", "sitting", 62),  # LCS "ittn" 4, d 5: 8/13 = 61.54 -> 62
        ("x = 1", "x = 2", 80),  # LCS 4, d 2: 8/10
        ("print(x)", "print(x, y)", 84),  # LCS 8, d 3: 16/19 = 84.21 -> 84
        ("return x", "return y", 88),  # LCS 7, d 2: 14/16 = 87.5 -> 88 (half to even: up)
        ("abcde", "abcdeXXXXXX", 62),  # LCS 5, d 6: 10/16 = 62.5 -> 62 (half to even: down)
        ("ab", "ba", 50),  # LCS 1, d 2: 2/4 (substitution-free: not 0 as plain Levenshtein would give)
        ("a", "b", 0),  # LCS 0: both non-empty, no common character
        ("abcd", "dcba", 25),  # LCS 1, d 6: 2/8
    ],
)
def test_fuzzy_ratio_golden(a: str, b: str, expected: int) -> None:
    assert fuzzy_ratio(a, b) == expected
    assert fuzzy_ratio(b, a) == expected


def test_whitespace_differences_count_for_es_but_not_em() -> None:
    # EM compares whitespace-split tokens, ES the raw strings
    assert sample_scores("a  =  1", "a = 1") == (83, True)  # LCS 5, 10/12 = 83.33
    assert sample_scores("a\t=\n1", "a = 1") == (60, True)  # LCS 3 ("a", "=", "1"), 6/10
    # removing all spaces changes the token split, so EM fails
    assert sample_scores("a=1", "a = 1") == (75, False)  # LCS 3, 6/8


def test_prediction_is_stripped_but_ground_truth_is_not() -> None:
    assert sample_scores("  x  \n", "x") == (100, True)
    # gt " x" stays " x": ratio("x", " x") = 2/3 -> 67, but the token split matches
    assert sample_scores("x", " x") == (67, True)
    assert sample_scores("x", "x ") == (67, True)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("<NUM_LIT>", "0"),
        ("x = <STR_LIT>", "x = "),
        ("c = <CHAR_LIT>", "c = "),
        ("open(f, encoding=<STR_LIT:utf-8>)", "open(f, encoding=utf-8)"),
        ("range(<NUM_LIT:1>, <NUM_LIT>)", "range(1, 0)"),
        ("<CHAR_LIT:a> + <STR_LIT:b c>", "a + b c"),
        ("<STR_LIT:a\nb>", "a\nb"),  # re.S: the value may span lines
        ("<STR_LIT:>", ""),
        ("<NUM_LIT:1><NUM_LIT:2>", "12"),  # non-greedy: two literals, not one
        ("<FOO_LIT:1> <NUM_LIT", "<FOO_LIT:1> <NUM_LIT"),  # not literal markers: untouched
        ("no literals here", "no literals here"),
    ],
)
def test_post_process(code: str, expected: str) -> None:
    assert post_process(code) == expected


def test_literals_are_post_processed_on_both_sides() -> None:
    assert sample_scores("x = <NUM_LIT>", "x = 0") == (100, True)
    assert sample_scores("x = 0", "x = <NUM_LIT>") == (100, True)
    assert sample_scores("f(<STR_LIT:utf-8>)", "f(utf-8)") == (100, True)
    # "s = <STR_LIT>" -> "s = " (the strip happens before post-processing): vs "s =", LCS 3, 6/7 = 85.71
    assert sample_scores("s = <STR_LIT>", "s =") == (86, True)


def test_line_metrics_golden() -> None:
    preds = ["a = 1", "b", "  c  ", "x = <NUM_LIT>"]
    gts = ["a = 1", "x", "c", "x = 0"]
    # ES: 100, 0, 100, 100 -> 75.0; EM: 3 of 4 -> 75.0
    assert line_metrics(preds, gts) == {"es": 75.0, "em": 75.0, "samples": 4}
    # means are rounded to 2 decimals: ES (100 + 0 + 67) / 3 = 55.666..., EM 2/3 = 66.666...%
    assert line_metrics(["a", "b", "x"], ["a", "c", " x"]) == {"es": 55.67, "em": 66.67, "samples": 3}


def test_line_metrics_edge_cases() -> None:
    assert line_metrics([], []) == {"es": 0.0, "em": 0.0, "samples": 0}
    with pytest.raises(ValueError, match="2 predictions for 1 ground truths"):
        line_metrics(["a", "b"], ["a"])


def test_mean() -> None:
    assert mean([1, 2, 3, 4]) == 2.5
    assert mean(iter([5.0])) == 5.0
    assert mean([]) == 0.0


# ---------------------------------------------------------------------------------------------------
# An independent re-implementation of CodeXGLUE's evaluator, in pure Python.
# ---------------------------------------------------------------------------------------------------


def ref_post_process(code: str) -> str:
    """CodeXGLUE's post_process, as written there: findall, then str.replace of each literal."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    pattern = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)
    for kind, value in re.findall(pattern, code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def ref_indel_distance(a: str, b: str) -> int:
    """Edit distance with insertions and deletions only (a substitution costs 2), by dynamic programming."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = prev[j - 1] if ca == cb else 1 + min(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def ref_fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio: @check_for_equivalence, then @check_empty_string, then
    int(round(100 * Levenshtein.ratio)) where ratio = (lensum - dist) / lensum (python-Levenshtein)."""
    if a == b:
        return 100
    if len(a) == 0 or len(b) == 0:
        return 0
    lensum = len(a) + len(b)
    return int(round(100 * ((lensum - ref_indel_distance(a, b)) / lensum)))


def ref_line_metrics(preds: list[str], gts: list[str]) -> dict[str, float]:
    edit_sim = 0.0
    em = 0
    for pred, gt in zip(preds, gts):
        pred = ref_post_process(pred.strip())
        gt = ref_post_process(gt)
        edit_sim += ref_fuzz_ratio(pred, gt)
        if pred.split() == gt.split():
            em += 1
    total = len(gts)
    return {"es": round(edit_sim / total, 2), "em": round(em / total * 100, 2), "samples": total}


_ATOMS = [
    "self",
    "x",
    "y",
    "foo",
    "bar_baz",
    "return",
    "def",
    "if",
    "in",
    "for",
    "import",
    "os.path",
    "(",
    ")",
    "[",
    "]",
    ":",
    ",",
    ".",
    "=",
    "==",
    "+",
    "-",
    "*",
    "->",
    "<NUM_LIT>",
    "<STR_LIT>",
    "<CHAR_LIT>",
    "<NUM_LIT:1>",
    "<NUM_LIT:42>",
    "<STR_LIT:utf-8>",
    "<STR_LIT:%s>",
    "<CHAR_LIT:a>",
    "<STR_LIT:a b>",
]


def _code_line(rng: random.Random) -> str:
    if rng.random() < 0.08:
        return ""
    parts = []
    for _ in range(rng.randint(1, 9)):
        parts.append(rng.choice(_ATOMS))
        parts.append(rng.choice(["", "", " ", " ", "  ", "\t"]))
    return "".join(parts)


def _mutate(rng: random.Random, line: str) -> str:
    """A plausible prediction for ``line``: equal, whitespace-changed, edited, or unrelated."""
    choice = rng.random()
    if choice < 0.15:
        return line
    if choice < 0.3:
        return "  " + re.sub(r" +", "  ", line) + " \n"
    if choice < 0.45:
        return _code_line(rng)
    chars = list(line)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(chars))
        if op < 0.4 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op < 0.8:
            chars.insert(pos, rng.choice("abxyz(),. _0"))
        else:
            chars[pos:pos] = list(rng.choice(_ATOMS))
    return "".join(chars)


def _random_pairs(seed: int, n: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    gts = [_code_line(rng) for _ in range(n)]
    preds = [_mutate(rng, gt) for gt in gts]
    return preds, gts


def test_reference_implementation_sanity() -> None:
    # the reference itself reproduces the hand-computed cases, so it is not vacuously agreeing
    assert ref_indel_distance("kitten", "sitting") == 5
    assert ref_indel_distance("", "abc") == 3
    assert ref_fuzz_ratio("abcde", "abcdeXXXXXX") == 62
    assert ref_fuzz_ratio("", "") == 100
    assert ref_post_process("f(<STR_LIT:utf-8>, <NUM_LIT>)") == "f(utf-8, 0)"


def test_line_metrics_agree_with_independent_codexglue_reimplementation() -> None:
    preds, gts = _random_pairs(0, 30)
    # the generated set exercises the interesting branches
    processed = [(ref_post_process(p.strip()), ref_post_process(g)) for p, g in zip(preds, gts)]
    assert any(p == g for p, g in processed)
    assert any(p != g and p.split() == g.split() for p, g in processed)
    assert any((p == "") != (g == "") for p, g in processed)
    assert any("_LIT" in g for g in gts)
    for pred, gt in zip(preds, gts):
        p, g = ref_post_process(pred.strip()), ref_post_process(gt)
        assert sample_scores(pred, gt) == (ref_fuzz_ratio(p, g), p.split() == g.split()), (pred, gt)
    assert line_metrics(preds, gts) == ref_line_metrics(preds, gts)


# Former divergences from the reference, now fixed: half-way rounding and nested literals.


def test_fuzzy_ratio_half_way_cases_follow_python_levenshtein() -> None:
    a, b = "a" * 17 + "x" * 23, "a" * 17 + "y" * 23  # lensum 80, LCS 17, d 46: exactly 42.5 -> 42 (float 42.5)
    assert ref_fuzz_ratio(a, b) == 42
    assert fuzzy_ratio(a, b) == 42


def test_post_process_nested_literal_matches_codexglue() -> None:
    code = "<NUM_LIT:<STR_LIT:b>><STR_LIT:b>"
    assert ref_post_process(code) == "bb"
    assert post_process(code) == "bb"


# ---------------------------------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------------------------------

_code_text = st.lists(
    st.sampled_from(list("ab xy_()=:,.\t\n") + ["<NUM_LIT>", "<STR_LIT:s>", "<CHAR_LIT>"]), max_size=30
).map("".join)


@settings(max_examples=200, deadline=None)
@given(_code_text, _code_text)
def test_es_in_range_and_em_consistent(pred: str, gt: str) -> None:
    es, em = sample_scores(pred, gt)
    assert isinstance(es, int)
    assert 0 <= es <= 100
    p, g = post_process(pred.strip()), post_process(gt)
    assert em == (p.split() == g.split())
    if p == g:
        assert (es, em) == (100, True)
    elif not p or not g:
        assert es == 0


@settings(max_examples=200, deadline=None)
@given(_code_text)
def test_identity_scores_100_and_exact_match(text: str) -> None:
    assert sample_scores(text, text.strip()) == (100, True)
    metrics = line_metrics([text], [text.strip()])
    assert metrics == {"es": 100.0, "em": 100.0, "samples": 1}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_fuzzy_ratio_symmetric(a: str, b: str) -> None:
    assert fuzzy_ratio(a, b) == fuzzy_ratio(b, a)
    assert 0 <= fuzzy_ratio(a, b) <= 100
