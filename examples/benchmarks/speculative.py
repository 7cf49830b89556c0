"""The student as a draft (issue 22): acceptance rate per student depth and per strategy, and the teacher's
own greedy completions with a draft vs without, side by side.

    python examples/benchmarks/speculative.py --out /tmp/spec --steps 400            # distil the students first
    python examples/benchmarks/speculative.py --out /tmp/spec --students 6=/tmp/d4/student --skip-distil

Students (default: 2/4/6/8 layers with `pretraining`, and 6 layers with `tvd`) are distilled from the bundled
teacher with the default recipe at a step budget (--steps). Acceptance: greedy speculative decoding of
--samples held-out stdlib lines (max 48 new tokens, stop at the end of the line), k = --k. Speed: --prompts
held-out lines, fixed 16 new tokens each (no early stop), batch 1, teacher alone and teacher + draft for each k
in --ks, in interleaved rounds (A B, B A, ...), median [min-max] of tokens/s; the outputs are checked equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kdcode.data.corpus import load_corpus
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, VocabIndex, greedy
from kdcode.inference.loader import load_for_inference
from kdcode.inference.speculative import speculative
from kdcode.spec import DataSpec, resolve_run_spec
from kdcode.train.distil import run_distil

DEFAULT_STUDENTS = {"2L-pretraining": (2, "pretraining"), "4L-pretraining": (4, "pretraining"),
                    "6L-pretraining": (6, "pretraining"), "8L-pretraining": (8, "pretraining"), "6L-tvd": (6, "tvd")}


def prompts(n: int, seed: int) -> list[str]:
    docs = load_corpus(DataSpec()).splits["test"]
    return [s.input for s in build_line_samples(docs, n, seed)]


def distil_students(out: Path, steps: int) -> dict[str, Path]:
    folders = {}
    for name, (layers, strategy) in DEFAULT_STUDENTS.items():
        folder = out / name
        if not (folder / "kdcode.json").exists():
            spec = resolve_run_spec({}, {"student": {"layers": layers}, "strategy": {"name": strategy},
                                         "train": {"max_steps": steps}, "out": str(folder)}, name)
            run_distil(spec)
        folders[name] = folder
    return folders


def acceptance_table(teacher, students: dict[str, Path], lines: list[str], k: int, threads: int) -> list[dict]:
    index = VocabIndex.for_model(teacher.model, teacher.tokenizer)
    opts = DecodeOptions(max_new_tokens=48)
    own = greedy(teacher.model, index, lines, opts, batch_size=1).token_ids
    rows = []
    for name, folder in students.items():
        draft = load_for_inference(str(folder), "cpu", "auto", threads)
        gen, acc = speculative(teacher.model, draft.model, index, lines, opts, k=k)
        rows.append({"student": name, "layers": draft.n_layer, **acc.summary(), "identical": gen.token_ids == own})
        print(rows[-1], flush=True)
    return rows


def speed_table(teacher, draft_dir: Path, lines: list[str], ks: list[int], rounds: int, threads: int) -> list[dict]:
    draft = load_for_inference(str(draft_dir), "cpu", "auto", threads)
    index = VocabIndex.for_model(teacher.model, teacher.tokenizer)
    opts = DecodeOptions(max_new_tokens=16, fixed_length=True)
    runs = {"teacher": lambda: greedy(teacher.model, index, lines, opts, batch_size=1)}
    for k in ks:
        runs[f"k={k}"] = lambda k=k: speculative(teacher.model, draft.model, index, lines, opts, k=k)[0]
    for fn in runs.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list] = {}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            t0 = time.perf_counter()
            gen = runs[name]()
            rates[name].append(sum(gen.token_counts) / (time.perf_counter() - t0))
            outputs[name] = gen.token_ids
    base = statistics.median(rates["teacher"])
    return [{"run": name, "tokens_per_s": round(statistics.median(v), 1),
             "range": [round(min(v), 1), round(max(v), 1)], "x_teacher": round(statistics.median(v) / base, 3),
             "identical": outputs[name] == outputs["teacher"]} for name, v in rates.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--students", default=None, help="NAME=DIR,... instead of distilling the default set")
    ap.add_argument("--skip-distil", action="store_true")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ks", default="2,3,4,6")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft", default="6L-pretraining", help="the student drafting in the speed table")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.students:
        students = {n: Path(p) for n, p in (x.split("=", 1) for x in args.students.split(","))}
    else:
        students = {n: args.out / n for n in DEFAULT_STUDENTS} if args.skip_distil else distil_students(args.out,
                                                                                                         args.steps)
    teacher = load_for_inference("bundled", "cpu", "auto", args.threads)
    acc = acceptance_table(teacher, students, prompts(args.samples, 0), args.k, args.threads)
    speed = speed_table(teacher, students[args.draft], prompts(args.prompts, 1), [int(k) for k in args.ks.split(",")],
                        args.rounds, args.threads)
    (args.out / "results.json").write_text(json.dumps({"acceptance": acc, "speed": speed}, indent=2))
    print("| student | layers | k | acceptance | accepted / pass | tokens / pass | output = teacher's |")
    print("|---|---|---|---|---|---|---|")
    for r in acc:
        print(f"| {r['student']} | {r['layers']} | {r['draft_tokens']} | {r['acceptance_rate']} | "
              f"{r['accepted_per_pass']} | {r['tokens_per_pass']} | {r['identical']} |")
    print(f"\n| run (draft {args.draft}) | tokens/s median [min-max] | x teacher | output = teacher's |")
    print("|---|---|---|---|")
    for r in speed:
        print(f"| {r['run']} | {r['tokens_per_s']} [{r['range'][0]}-{r['range'][1]}] | {r['x_teacher']} | "
              f"{r['identical']} |")


if __name__ == "__main__":
    main()
