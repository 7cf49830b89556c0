"""The bench protocol (issue 19.1): interleaved rounds, medians with ranges, and a ranking only when the ranges
separate; tested with a model slowed on purpose, and on figures made up to sit on either side of the line."""

from __future__ import annotations

import functools
import types

import pytest

import kdcode.evaluation.bench as bench
from kdcode.cli.measure import ratio_line
from kdcode.spec import BenchSpec


def _spec(corpus_dir, **kw) -> BenchSpec:
    return BenchSpec(data={"source": str(corpus_dir)}, prompts=3, rounds=3, new_tokens=3, warmup=1, **kw)


@pytest.mark.slow
def test_a_model_slowed_on_purpose_is_ranked_slower_and_the_order_alternates(monkeypatch, teacher_dir, corpus_dir):
    """The bench reads an injected clock that every forward pass advances: 1 ms for the model, 21 ms for the same
    weights slowed on purpose. The figures are then exact on any machine, loaded or fast (no wall-clock range
    decides the test), and the protocol (alternation, medians, ranges, ranking) is what is tested."""
    real_init, real_round = bench.Runner.__init__, bench.Runner.round
    calls: list[str] = []
    clock = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def init(self, name, spec, verify=True, **load):
        real_init(self, name.removesuffix("#slow"), spec, verify, **load)
        self.name = name
        cost = 0.021 if name.endswith("#slow") else 0.001  # seconds of the injected clock per forward pass
        forward = self.lm.model.forward

        def ticking(*a, **k):
            clock[0] += cost
            return forward(*a, **k)

        self.lm.model.forward = functools.wraps(forward)(ticking)

    def round_(self):
        calls.append(self.name)
        return real_round(self)

    monkeypatch.setattr(bench.Runner, "__init__", init)
    monkeypatch.setattr(bench.Runner, "round", round_)
    slow = f"{teacher_dir}#slow"
    result = bench.run_bench(str(teacher_dir), _spec(corpus_dir), compare=slow, isolate=False)
    assert calls == [str(teacher_dir), slow, slow, str(teacher_dir), str(teacher_dir), slow]  # A B, B A, A B
    r = result["ratios"]
    assert r["separated"] is True and r["ranking"] == str(teacher_dir)
    assert r["speedup"] == pytest.approx(21.0, rel=1e-6)  # same weights, same passes: exactly the cost ratio
    for res in (result, result["compare"]):
        assert res["rounds"] == 3 and len(res["round_figures"]) == 3
        lo, hi = res["samples_per_s_range"]
        assert lo <= res["samples_per_s"] <= hi
        assert res["backend"] == "torch" and res["threads"] >= 1 and res["dtype"] == "float32"
    assert result["compare"]["samples_per_s"] == pytest.approx(result["samples_per_s"] / 21.0, rel=1e-6)
    assert "ranges separate" in ratio_line(slow, r)


def test_overlapping_ranges_are_not_ranked():
    a = {"samples_per_s": 10.0, "samples_per_s_range": [9.0, 11.0]}
    b = {"samples_per_s": 10.5, "samples_per_s_range": [10.2, 12.0]}
    c = {"samples_per_s": 20.0, "samples_per_s_range": [19.0, 21.0]}
    assert not bench.separated(a, b) and bench.separated(a, c) and bench.separated(c, a)
    line = ratio_line("b", {"speedup": 0.952, "speedup_range": [0.75, 1.078], "separated": False, "ranking": None,
                            "size": 1.0, "params": 1.0})
    assert "ranges overlap: too close to rank" in line


def test_summary_is_the_median_and_range_of_the_rounds():
    rounds = [{k: v for k in bench.TIMED} for v in (3.0, 1.0, 2.0, 10.0, 2.5)]
    s = bench.summarise(rounds)
    assert s["samples_per_s"] == 2.5 and s["samples_per_s_range"] == [1.0, 10.0] and s["rounds"] == 5
