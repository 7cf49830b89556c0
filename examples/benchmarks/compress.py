"""What each compression step buys: teacher, student, student+int8, student+prune+int8 (issue 8), and
student+prune+KD+int8: the pruned student distilled a few more steps from the teacher (init
`pretrained` from the pruned folder, the default strategy) before it is quantized.

Every row is written by `kdcode compress` (and `kdcode distil`) from the student folder, then evaluated
(`run_eval`: ES/EM on the held-out split, the same samples for every row) and benchmarked on CPU
(`run_bench`: each model in its own fresh process, same prompts, fixed new tokens). Ratios are against the fp32 student.
Goal: int8 on a distilled student gives >= 3.5x smaller weights than its fp32 version and >= 1.5x CPU
throughput, losing <= 1 ES point.

    python examples/benchmarks/compress.py --teacher bundled --student student --samples 200 --threads 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kdcode.compression.compress import run_compress
from kdcode.evaluation.bench import run_bench
from kdcode.evaluation.evaluate import run_eval
from kdcode.models.load import resolve_path
from kdcode.spec import BenchSpec, DataSpec, EvalSpec, RunSpec
from kdcode.spec_compress import CompressSpec
from kdcode.train.distil import run_distil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="bundled")
    ap.add_argument("--student", required=True, help="a distilled student folder (fp32)")
    ap.add_argument("--data", default="stdlib", help="corpus: held-out split for eval/bench, train split to calibrate")
    ap.add_argument("--prune-heads", type=float, default=0.25)
    ap.add_argument("--prune-ffn", type=float, default=0.0)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--recover-steps", type=int, default=100, help="KD steps after pruning (0: no such row)")
    ap.add_argument("--recover-lr", type=float, default=2e-4)
    ap.add_argument("--samples", type=int, default=200, help="eval completions per model")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--ppl-blocks", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=32, help="timed bench completions per model")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1, help="bench batch")
    ap.add_argument("--bench-rounds", type=int, default=3, help="bench each model this often, keep its fastest")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the compressed folders go (default: temp)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    data = DataSpec(source=args.data)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kdcode-compress-bench-"))
    student = str(resolve_path(args.student) or args.student)
    calib = {"data": data, "calib_batches": args.calib_batches}
    rows: dict[str, str] = {"teacher": args.teacher, "student": student}
    rows["student+int8"] = str(
        run_compress(student, CompressSpec(int8=True, **calib), work / "int8", overwrite=True)[0]
    )
    prune = {"prune_heads": args.prune_heads, "prune_ffn": args.prune_ffn}
    tag = "+".join(f"{k.split('_')[1]}{v}" for k, v in prune.items() if v)
    rows[f"student+prune({tag})+int8"] = str(
        run_compress(student, CompressSpec(int8=True, **prune, **calib), work / "prune-int8", overwrite=True)[0]
    )
    if args.recover_steps:
        pruned, pruned_manifest = run_compress(student, CompressSpec(**prune, **calib), work / "prune", overwrite=True)
        recover = RunSpec.model_validate(
            {
                "teacher": {"name": args.teacher},
                "student": {
                    "layers": pruned_manifest["model"]["n_layer"],
                    "init": {"name": "pretrained", "params": {"path": str(pruned)}},
                },
                "data": {"source": args.data},
                "train": {
                    "max_steps": args.recover_steps,
                    "max_minutes": 60,
                    "lr": args.recover_lr,
                    "warmup_steps": min(10, args.recover_steps),
                    "threads": args.threads,
                },
                "out": str(work / "prune-kd"),
            }
        )
        recovered = run_distil(recover, overwrite=True)[0]
        rows[f"student+prune({tag})+KD{args.recover_steps}+int8"] = str(
            run_compress(str(recovered), CompressSpec(int8=True, **calib), work / "prune-kd-int8", overwrite=True)[0]
        )

    eval_spec = EvalSpec(
        data=data,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        ppl_blocks=args.ppl_blocks,
        threads=args.threads,
    )
    bench_spec = BenchSpec(
        data=data,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        threads=args.threads,
        device="cpu",
    )
    evals = {label: run_eval(folder, eval_spec) for label, folder in rows.items()}
    # Bench rounds interleave the models and keep each one's fastest round: on a shared CPU the noise is
    # other work, which only ever slows a round down.
    benches: dict[str, dict] = {}
    for _ in range(args.bench_rounds):
        for label, folder in rows.items():
            b = run_bench(folder, bench_spec)
            if label not in benches or b["samples_per_s"] > benches[label]["samples_per_s"]:
                benches[label] = b
    results = {}
    for label, folder in rows.items():
        ev, b = evals[label], benches[label]
        results[label] = {
            "folder": folder,
            "es": ev["es"],
            "em": ev["em"],
            "perplexity": ev["perplexity"],
            "params_m": b["params_m"],
            "size_mb": b["size_mb"],
            "weights_memory_mb": b.get("weights_memory_mb"),
            "peak_memory_mb": b["peak_memory_mb"],
            "samples_per_s": b["samples_per_s"],
            "ms_per_token_p50": b["ms_per_token_p50"],
            "dtype": b["dtype"],
            "threads": b["threads"],
        }
    base = results["student"]
    for r in results.values():
        r["size_ratio"] = round(base["size_mb"] / r["size_mb"], 2)  # > 1: smaller than the fp32 student
        r["speed_ratio"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
        r["es_delta"] = round(r["es"] - base["es"], 2)
    q = results["student+int8"]
    goal = {
        "size_x>=3.5": q["size_ratio"] >= 3.5,
        "speed_x>=1.5": q["speed_ratio"] >= 1.5,
        "es_loss<=1": q["es_delta"] >= -1.0,
    }

    print(
        f"{'model':<40}{'ES':>7}{'EM':>7}{'size MB':>10}{'x smaller':>10}{'samples/s':>11}{'x speed':>9}"
        f"{'dES':>7}{'weights MB':>11}{'peak MB':>9}"
    )
    for label, r in results.items():
        print(
            f"{label:<40}{r['es']:>7.2f}{r['em']:>7.2f}{r['size_mb']:>10.3f}{r['size_ratio']:>10.2f}"
            f"{r['samples_per_s']:>11.2f}{r['speed_ratio']:>9.2f}{r['es_delta']:>7.2f}{r['weights_memory_mb']:>11.2f}"
            f"{r['peak_memory_mb']:>9.1f}"
        )
    print(
        f"CPU, {base['threads']} threads, eval {args.samples} samples, bench {args.prompts} prompts x "
        f"{args.new_tokens} tokens, batch {args.batch_size}, best of {args.bench_rounds} rounds"
        f"; goal (student+int8 vs student): {goal}"
    )
    out = {"rows": results, "goal": goal, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
