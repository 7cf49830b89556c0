"""A real teacher at real scale: SmolLM2-135M (``--teacher smollm2``), its students and drafts, measured.

Sub-commands (each appends rows to OUT/results.jsonl and prints a table; all name the CPU's instruction sets):

    python examples/benchmarks/real_teacher.py --out DIR quality --models smollm2,bundled,STUDENT [--samples 100]
    python examples/benchmarks/real_teacher.py --out DIR curve --run STUDENT_OUT           # loss vs KD tokens
    python examples/benchmarks/real_teacher.py --out DIR checkpoint --run STUDENT_OUT --layer-map 0,1,...  # a folder
    python examples/benchmarks/real_teacher.py --out DIR lookup --teacher smollm2 [--draft DRAFT] [--k 8]
    python examples/benchmarks/real_teacher.py --out DIR speed --teacher smollm2 --student STUDENT [--rounds 3]
    python examples/benchmarks/real_teacher.py --out DIR speed --teacher smollm2 --draft lookup [--k 8]  # or a DRAFT

- ``quality``: line-completion ES / EM (CodeXGLUE's, greedy) with the standard error of ES, on two fixed sets of
  ``--samples`` lines: the held-out stdlib test split (what `kdcode eval` draws, seed 0) and installed third-party
  packages that are never in the corpus (the gap ablation's ``thirdparty`` set), beside the repeat-the-previous-line
  baseline. Context: `kdcode eval`'s default (min(positions, 1024) minus 48 new tokens).
- ``curve``: the student's held-out loss against KD tokens seen, from its ``train_log.jsonl`` (a run bound by steps).
- ``lookup``: drafting by prompt lookup (``--draft lookup``, kdcode.inference.lookup: no draft model), decoded for
  real on the teacher's greedy continuations (no timing): at each teacher pass the proposal is the ``k`` tokens that
  followed the most recent earlier occurrence of the context's final 3-, 2- or 1-gram; the pass keeps the
  proposal's longest prefix the teacher agrees with plus the teacher's own next token. The output is checked against
  plain greedy decoding. With ``--draft``: the same for a draft model's greedy proposals. Tokens per teacher pass is
  what a memory-bound decode step turns into speed. (The figures of docs/real-teacher.md from before prompt lookup
  was a draft were simulated on the greedy continuations, the last ``k``-token proposal not cut to the tokens left.)
- ``speed``: `kdcode bench` of teacher and student in interleaved rounds (A B, B A, ...) on the same prompts, torch
  fp32, the ratio with its range. With ``--draft lookup`` (or ``--draft DRAFT``) instead of ``--student``: `kdcode
  bench TEACHER --draft lookup`, the teacher alone vs drafted by prompt lookup, the ratio, tokens per teacher pass
  and acceptance at ``--k``, and whether the outputs were identical. Run it on a quiet machine only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdcode.device import machine_line
from kdcode.evaluation.completion_sets import LineSample
from kdcode.evaluation.evaluate import run_eval
from kdcode.evaluation.metrics import sample_scores
from kdcode.spec import EvalSpec

HERE = Path(__file__).resolve().parent


def _ablation() -> Any:
    """The gap ablation's fixed completion sets (stdlib test split and third-party packages)."""
    spec = importlib.util.spec_from_file_location("gap_ablation", HERE / "gap" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def completion_sets(out: Path, samples: int) -> dict[str, Path]:
    gap = _ablation()
    gap.SAMPLES = samples
    folder = out / f"sets-{samples}"
    folder.mkdir(parents=True, exist_ok=True)
    return gap.completion_sets(folder)


def _prev_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def score(model: str, lines: Path, context: int | None) -> dict[str, Any]:
    samples = [LineSample(**json.loads(x)) for x in lines.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        pred_file = Path(tmp) / "pred.txt"
        t0 = time.perf_counter()
        result = run_eval(model, EvalSpec(lines=str(lines), samples=len(samples), ppl_blocks=0,
                                          context_tokens=context), predictions=pred_file)
        wall = time.perf_counter() - t0
        preds = pred_file.read_text(encoding="utf-8").split("\n")[: len(samples)]
    es = [sample_scores(p, s.gt)[0] for p, s in zip(preds, samples)]
    base = [sample_scores(_prev_line(s.input), s.gt)[0] for s in samples]
    return {"es": round(statistics.mean(es), 2), "es_se": round(statistics.stdev(es) / math.sqrt(len(es)), 2),
            "em": result["em"], "samples": len(es), "baseline_es": round(statistics.mean(base), 2),
            "context_tokens": result["decoding"]["context_tokens"], "wall_s": round(wall, 1), "per_sample_es": es}


def quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    sets = completion_sets(args.out, args.samples)
    rows = []
    for model in args.models.split(","):
        row = {"kind": "quality", "model": model, "machine": machine_line()}
        for key, path in sets.items():
            row[key] = score(model, path, args.context)
            print(f"{model} {key}: ES {row[key]['es']} ± {row[key]['es_se']} (baseline {row[key]['baseline_es']}, "
                  f"{row[key]['wall_s']} s)", flush=True)
        rows.append(row)
    return rows


def curve(args: argparse.Namespace) -> list[dict[str, Any]]:
    run = Path(args.run)
    log = run / "train_log.jsonl"
    if not log.exists():
        log = run.with_name(run.name + ".ckpt") / "train_log.jsonl"
    points = [r for r in map(json.loads, log.read_text().splitlines()) if "valid_loss" in r]
    manifest = json.loads((run / "kdcode.json").read_text()) if (run / "kdcode.json").exists() else {}
    start = (manifest.get("init") or {}).get("before_training") or {}
    rows = [{"kind": "curve", "run": str(run), "step": 0, "tokens": 0, "valid_loss": start.get("held_out_loss"),
             "teacher_valid_loss": start.get("teacher_held_out_loss")}]
    rows += [{"kind": "curve", "run": str(run), "step": r["step"], "tokens": r["tokens"],
              "valid_loss": round(r["valid_loss"], 4), "elapsed_s": r.get("elapsed_s")} for r in points]
    for r in rows:
        print(f"step {r['step']:>5}  tokens {r['tokens']:>9,}  held-out loss {r['valid_loss']}")
    return rows


def checkpoint(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A model folder from a run's periodic checkpoint (OUT.ckpt/trainable.safetensors), to evaluate a point of the
    curve while the run goes on: the student rebuilt from the teacher with the run's layer map, its weights loaded."""
    from safetensors.torch import load_file

    from kdcode.models.artifacts import save_model
    from kdcode.models.load import load_model
    from kdcode.plugins import make_init

    ckpt = Path(args.run).with_name(Path(args.run).name + ".ckpt")
    state = dict(json.loads((ckpt / "state.json").read_text())["__dict__"])
    teacher = load_model(args.teacher)
    layer_map = [int(x) for x in args.layer_map.split(",")]
    student, _ = make_init("layers", {"layers": layer_map}).build(teacher.model, len(layer_map))
    weights = {k.removeprefix("0."): v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    missing, unexpected = student.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "embed_tokens" not in k]:
        raise SystemExit(f"checkpoint does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if student.config.tie_word_embeddings:
        student.get_input_embeddings().weight = student.get_output_embeddings().weight
    out = args.out / f"checkpoint-{state['step']}"
    save_model(out, student, teacher.tokenizer, {"kind": "student", "checkpoint": {
        "run": str(args.run), "step": state["step"], "tokens": state["tokens"], "layer_map": layer_map}},
        overwrite=True)
    print(f"step {state['step']} ({state['tokens']:,} tokens) written to {out}")
    return [{"kind": "checkpoint", "run": str(args.run), "step": state["step"], "tokens": state["tokens"],
             "folder": str(out)}]


def lookup(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kdcode.inference.decode import DecodeOptions, VocabIndex, encode_prompt, greedy, n_positions
    from kdcode.inference.loader import load_for_inference
    from kdcode.inference.lookup import PromptLookup
    from kdcode.inference.speculative import speculative

    sets = completion_sets(args.out, args.samples)
    lm = load_for_inference(args.teacher, "cpu", "fp32")
    index = VocabIndex(lm.tokenizer)
    draft = load_for_inference(args.draft, "cpu", "fp32") if args.draft else None
    rows = []
    for key, path in sets.items():
        prompts = [LineSample(**json.loads(x)).input for x in path.read_text().splitlines()][: args.prompts]
        opts = DecodeOptions(max_new_tokens=args.new_tokens, context_tokens=args.context, heal=False,
                             fixed_length=True)
        context = opts.context_for(n_positions(lm.model))
        encoded = [encode_prompt(index, text, opts, context) for text in prompts]  # what the teacher sees
        own = greedy(lm.model, index, encoded, opts, 1)
        gen, acc = speculative(lm.model, PromptLookup(max_n=args.max_n), index, encoded, opts, args.k)
        s = acc.summary()
        tokens = sum(gen.token_counts)
        row = {"kind": "lookup", "set": key, "teacher": args.teacher, "k": args.k, "max_n": args.max_n,
               "prompts": len(prompts), "tokens": tokens, "teacher_passes": s["target_passes"],
               "proposed": s["proposed"], "accepted": s["accepted"], "tokens_per_pass": s["tokens_per_pass"],
               "acceptance_rate": s["acceptance_rate"], "identical_to_greedy": gen.token_ids == own.token_ids,
               "machine": machine_line()}
        print(f"prompt lookup on {key}: {tokens} tokens in {s['target_passes']} teacher passes = "
              f"{row['tokens_per_pass']} tokens per pass (acceptance {row['acceptance_rate']}; output = greedy: "
              f"{row['identical_to_greedy']})", flush=True)
        rows.append(row)
        if draft is not None:
            dgen, dacc = speculative(lm.model, draft.model, index, encoded, opts, args.k)
            s = dacc.summary()
            rows.append({"kind": "draft", "set": key, "teacher": args.teacher, "draft": args.draft, **s,
                         "identical_to_greedy": dgen.token_ids == own.token_ids, "machine": machine_line()})
            print(f"draft {args.draft} on {key}: {s['tokens_per_pass']} tokens per pass (acceptance "
                  f"{s['acceptance_rate']})", flush=True)
    return rows


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kdcode.evaluation.bench import run_bench, run_bench_draft
    from kdcode.spec import BenchSpec

    spec = BenchSpec(prompts=args.prompts, rounds=args.rounds, new_tokens=args.new_tokens, threads=args.threads,
                     context_tokens=args.context, device="cpu", dtype="fp32")
    if args.draft:  # kdcode bench TEACHER --draft lookup|DRAFT: the teacher alone and drafted, interleaved
        result = run_bench_draft(args.teacher, spec, args.draft, args.k if args.k == "auto" else int(args.k))
        r, drafted = result["ratios"], result["with_draft"]
        acc = drafted.get("acceptance") or {}
        row = {"kind": "speed_draft", "teacher": args.teacher, "draft": args.draft, "k": acc.get("draft_tokens"),
               "speedup": r["speedup"], "speedup_range": r["speedup_range"], "separated": r["separated"],
               "identical_output": r["identical_output"], "tokens_per_pass": acc.get("tokens_per_pass"),
               "acceptance_rate": acc.get("acceptance_rate"), "accepted_per_pass": acc.get("accepted_per_pass"),
               "target_passes": acc.get("target_passes"), "teacher_ms_per_token": result["ms_per_token_p50"],
               "drafted_ms_per_token": drafted["ms_per_token_p50"], "teacher_samples_per_s": result["samples_per_s"],
               "drafted_samples_per_s": drafted["samples_per_s"], "context_tokens": result["context_tokens"],
               "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": result["threads"],
               "machine": machine_line()}
        print(json.dumps(row, indent=1))
        return [row]
    if not args.student:
        raise SystemExit("speed: give --student STUDENT (the teacher vs a student) or --draft lookup|DRAFT")
    result = run_bench(args.student, spec, compare=args.teacher)
    r = result["ratios"]
    row = {"kind": "speed", "student": args.student, "teacher": args.teacher, "speedup": r["speedup"],
           "speedup_range": r.get("speedup_range"), "separated": r["separated"],
           "student_ms_per_token": result["ms_per_token_p50"], "teacher_ms_per_token":
               result["compare"]["ms_per_token_p50"], "student_first_token_ms": result["ms_first_token_p50"],
           "teacher_first_token_ms": result["compare"]["ms_first_token_p50"], "context_tokens":
               result["context_tokens"], "threads": result["threads"], "machine": machine_line()}
    print(json.dumps(row, indent=1))
    return [row]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--models", default="smollm2,bundled")
    c = sub.add_parser("curve")
    c.add_argument("--run", required=True)
    ck = sub.add_parser("checkpoint")
    ck.add_argument("--run", required=True)
    ck.add_argument("--teacher", default="smollm2")
    ck.add_argument("--layer-map", required=True, help="the run's teacher blocks, e.g. 0,1,2,3,4,20,21,...")
    lk = sub.add_parser("lookup")
    lk.add_argument("--teacher", default="smollm2")
    lk.add_argument("--draft")
    lk.add_argument("--k", type=int, default=8)
    lk.add_argument("--max-n", type=int, default=3, help="longest n-gram prompt lookup matches")
    lk.add_argument("--prompts", type=int, default=24)
    sp = sub.add_parser("speed")
    sp.add_argument("--teacher", default="smollm2")
    sp.add_argument("--student", help="time the teacher against this student")
    sp.add_argument("--draft", help="instead: time the teacher alone against it drafted by lookup (prompt lookup) "
                    "or by this draft model, identical output")
    sp.add_argument("--k", default="8", help="draft tokens per teacher pass with --draft, or auto")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--prompts", type=int, default=8)
    sp.add_argument("--threads", type=int, default=2)
    for p in (q, lk, sp):
        p.add_argument("--samples", type=int, default=100)
        p.add_argument("--context", type=int, default=None)
        p.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {"quality": quality, "curve": curve, "checkpoint": checkpoint, "lookup": lookup,
            "speed": speed}[args.what](args)
    with open(args.out / "results.jsonl", "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
