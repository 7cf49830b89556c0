"""ES against distillation steps, from one run: the default distillation (or any flags of RunSpec),
evaluating the student's line-completion ES on a fixed held-out sample every N steps.

The evaluation pauses the clock-free step budget only (steps, not wall time, are on the x axis), so run it
with a step budget (`--max-steps`), not `--max-minutes`. Used to choose the default budget knowingly.

    python examples/benchmarks/es_vs_steps.py --max-steps 1200 --every 200 --samples 200 --json curve.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdcode.data.corpus import load_corpus, split_blocks
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.evaluation.metrics import line_metrics
from kdcode.inference.decode import DecodeOptions, VocabIndex, greedy
from kdcode.models.load import load_model
from kdcode.plugins import validate_plugins
from kdcode.spec import RunSpec
from kdcode.train.loop import train_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="bundled")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--strategy", default="pretraining")
    ap.add_argument("--init", default="spread")
    ap.add_argument("--max-steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    train = {"max_steps": args.max_steps, "eval_every": 10**9}
    if args.lr:
        train["lr"] = args.lr
    spec = RunSpec.model_validate({"teacher": {"name": args.teacher}, "student": {"layers": args.layers,
                                   "init": args.init}, "strategy": {"name": args.strategy}, "train": train})
    strategy, init = validate_plugins(spec)
    teacher = load_model(spec.teacher.name)
    corpus = load_corpus(spec.data)
    train_blocks, valid_blocks = split_blocks(corpus, teacher.tokenizer, spec.train.block_size)
    samples = build_line_samples(corpus.splits["test"], args.samples, 0)
    gts = [s.gt for s in samples]
    student, layer_map = init.build(teacher.model, spec.student.layers)

    opts = DecodeOptions()  # kdcode eval's defaults: 48 new tokens, healed, to the end of the line
    index = VocabIndex.for_model(teacher.model, teacher.tokenizer)

    def es_now(model) -> dict:
        was = model.training
        gen = greedy(model.eval(), index, [s.input for s in samples], opts, 8)
        model.train(was)
        return line_metrics(gen.texts, gts)

    teacher_es = es_now(teacher.model)
    curve = [{"step": 0, **es_now(student), "elapsed_s": 0.0}]
    clock = {"train_s": 0.0, "last": time.perf_counter()}

    def on_step(record: dict) -> None:
        now = time.perf_counter()
        clock["train_s"] += now - clock["last"]
        if record["step"] % args.every == 0:
            with torch.no_grad():
                point = {"step": record["step"], **es_now(student), "train_s": round(clock["train_s"], 1),
                         "loss": record["loss"]}
            curve.append(point)
            print(json.dumps(point), flush=True)
        clock["last"] = time.perf_counter()

    train_loop(student, strategy, train_blocks, valid_blocks, spec.train, teacher=teacher.model,
               on_step=on_step, layer_map=layer_map)
    out = {"teacher_es": teacher_es, "spec": spec.model_dump(mode="json"), "curve": curve}
    print(f"teacher ES {teacher_es['es']}")
    for p in curve:
        print(f"step {p['step']:>5}  ES {p['es']:>6}  ({p['es'] / teacher_es['es']:.3f} of teacher)"
              f"  train {p.get('train_s', 0):>7} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
