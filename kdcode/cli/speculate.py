"""What `eval --draft-for` and `bench --draft` print: a student as its teacher's speculative draft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcode.cli._common import parse_draft_tokens, record_metrics, write_json
from kdcode.cli._console import metrics_table, out_console

ACCEPTANCE_COLUMNS = [("draft_tokens", "k"), ("acceptance_rate", "acceptance"), ("accepted_per_pass", "accepted/pass"),
                      ("tokens_per_pass", "tokens/pass"), ("samples", "samples"),
                      ("identical_to_teacher_greedy", "= teacher's output")]


def eval_acceptance(student: str, teacher: str, spec: Any, draft_tokens: str, verify: bool, json_out: Path | None,
                    record: bool) -> None:
    """``kdcode eval STUDENT --draft-for TEACHER``: acceptance of the student's drafts on the held-out lines."""
    from kdcode.evaluation.acceptance import run_acceptance

    result = run_acceptance(student, teacher, spec, parse_draft_tokens(draft_tokens), verify)
    if str(json_out) != "-":
        title = (f"{student} drafting for {teacher}: greedy line completions, {spec.split} split, seed {spec.seed}, "
                 f"k={result['draft_tokens']} ({result['runtime']['device']}, {result['runtime']['threads']} threads)")
        out_console().print(metrics_table(title, [(student, result)], ACCEPTANCE_COLUMNS))
    write_json(json_out, result)
    if record:
        record_metrics(student, "acceptance", {k: v for k, v in result.items() if k != "runtime"})


def bench_draft(model: str, spec: Any, draft: str, draft_tokens: str, verify: bool, json_out: Path | None,
                record: bool, columns: list[tuple[str, str]], with_ranges: Any) -> None:
    """``kdcode bench TEACHER --draft STUDENT|lookup``: the teacher alone and with the draft, interleaved."""
    from kdcode.evaluation.bench import run_bench_draft
    from kdcode.inference.lookup import LOOKUP

    result = run_bench_draft(model, spec, draft, parse_draft_tokens(draft_tokens), verify)
    drafted = result["with_draft"]
    lookup = draft == LOOKUP  # prompt lookup: no draft model
    rows = [(f"{model} alone", with_ranges(result)),
            (f"{model} + {'prompt lookup' if lookup else f'draft {draft}'}", with_ranges(drafted))]
    if str(json_out) != "-":
        console = out_console()
        console.print(metrics_table(
            f"bench: {result['device']} ({result['cpu']}), {result['dtype']}, {result['threads']} threads, batch 1, "
            f"{spec.new_tokens} new tokens x {result['prompts']} prompts x {result['rounds']} interleaved rounds "
            "(median [min-max])", rows, columns))
        r, acc = result["ratios"], drafted.get("acceptance") or {}
        lo, hi = r["speedup_range"]
        console.print(
            f"with {'prompt lookup' if lookup else 'the draft'}: {r['speedup']}x samples/s [{lo}-{hi}] "
            f"({'ranges separate' if r['separated'] else 'ranges overlap: too close to rank'}); k="
            f"{acc.get('draft_tokens')}, acceptance {acc.get('acceptance_rate')}, {acc.get('tokens_per_pass')} "
            f"tokens per teacher pass; output identical to the teacher's own: {r['identical_output']}",
            highlight=False)
    write_json(json_out, result)
    if record:
        record_metrics(model, "bench_draft", {k: v for k, v in result.items() if k != "round_figures"})
