"""Distillation step time per strategy, and with a teacher-logit cache vs the live teacher.

Same student init, same batches, same machine, back to back in one process. Reports the median time
per optimiser step (after warm-up steps, timed with perf_counter between steps) and its ratio to a
`hard-only` step of the same student. `hard-only` runs first and again last; the ratio's base is the mean
of the two (their difference shows the drift of the machine during the run).
Goal (issue 5): with the cache, a KD step costs at most 1.3x a hard-only step.

    python examples/benchmarks/strategy_steps.py --teacher bundled --layers 6 --steps 30
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcode.data.corpus import encode_documents, load_corpus, to_blocks
from kdcode.device import cpu_has_bf16, resolve_device
from kdcode.models.load import load_model
from kdcode.plugins import make_init, make_strategy
from kdcode.spec import DataSpec, TrainSpec
from kdcode.train.loop import train_loop
from kdcode.train.teacher_cache import build_cache, load_cache

STRATEGIES = ["hard-only", "pretraining", "in-training", "jsd", "intermediate"]


class StepClock:
    """``on_step`` hook of train_loop: perf_counter at the end of every optimiser step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, record: dict) -> None:
        self.stamps.append(time.perf_counter())

    def median_ms(self, warmup: int) -> float:
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:])][warmup:]
        return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="bundled")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list; hard-only always runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = load_model(args.teacher)
    corpus = load_corpus(DataSpec())
    n_blocks = args.batch_size * (args.steps + 1)
    blocks = to_blocks(encode_documents(corpus.splits["train"], teacher.tokenizer), args.block_size)[:n_blocks]
    student0, layer_map = make_init("spread", {}).build(teacher.model, args.layers)
    cfg = TrainSpec(
        max_steps=args.steps + 1,
        batch_size=args.batch_size,
        block_size=args.block_size,
        precision=args.precision,
        warmup_steps=0,
        eval_every=10**9,
    )

    def timed(name: str, **kw) -> float:
        clock = StepClock()
        train_loop(
            copy.deepcopy(student0),
            make_strategy(name, {}),
            blocks,
            None,
            cfg,
            description=name,
            layer_map=layer_map,
            on_step=clock,
            **kw,
        )
        return clock.median_ms(args.warmup)

    rows = {}
    for name in ["hard-only", *(n for n in args.strategies.split(",") if n and n != "hard-only")]:
        rows[name] = timed(name, teacher=copy.deepcopy(teacher.model))
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        build_cache(teacher.model.to(resolve_device("auto")), blocks, cache_dir, args.top_k, 2.0, {"benchmark": True})
        rows[f"pretraining + cache (top-{args.top_k})"] = timed("pretraining", cache=load_cache(cache_dir))
    rows["hard-only (again, last)"] = timed("hard-only")

    base = (rows["hard-only"] + rows["hard-only (again, last)"]) / 2
    out = {
        "teacher": args.teacher,
        "teacher_layers": teacher.n_layer,
        "student_layers": args.layers,
        "batch": f"{args.batch_size}x{args.block_size}",
        "threads": torch.get_num_threads(),
        "precision": args.precision if args.precision != "auto" else ("bf16" if cpu_has_bf16() else "fp32"),
        "ms_per_step": {k: round(v, 1) for k, v in rows.items()},
        "ratio_to_hard_only": {k: round(v / base, 3) for k, v in rows.items()},
    }
    print(f"{'strategy':<34}{'ms/step':>10}{'x hard-only':>14}")
    for k, v in rows.items():
        print(f"{k:<34}{v:>10.1f}{v / base:>14.2f}")
    print(json.dumps({k: out[k] for k in ("teacher", "batch", "threads", "precision")}))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
