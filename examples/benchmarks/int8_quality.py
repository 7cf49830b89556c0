"""Every 8-bit variant of a model (and fp16 / bf16) against its fp32 self: size, ES and perplexity deltas on the
same held-out samples, and, with ``--speed`` (on a quiet machine only), each variant's samples/s as a ratio to
fp32's in one interleaved `kdcode bench` run (:func:`kdcode.evaluation.bench.run_bench_many`).

Each variant is written by `kdcode compress` (its own quality check off: this script measures with more
samples) and evaluated by `kdcode eval`'s :func:`~kdcode.evaluation.evaluate.run_eval`; the CPU's instruction
sets (:func:`kdcode.device.cpu_features`) are recorded with the table, since the int8 kernels depend on them.

    python examples/benchmarks/int8_quality.py --models bundled smollm2 --samples 100 --ppl-blocks 64 \\
        --json int8_quality.json
    python examples/benchmarks/int8_quality.py --models smollm2 --speed --threads 2   # a quiet machine
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from kdcode.compression.compress import run_compress
from kdcode.device import cpu_features, machine_line
from kdcode.evaluation.evaluate import run_eval
from kdcode.models.artifacts import weights_size
from kdcode.spec import BenchSpec, DataSpec, EvalSpec
from kdcode.spec_compress import INT8_SCHEMES, CompressSpec


def variants(model: str, work: Path, schemes: list[str], dtypes: list[str], data: DataSpec,
             reuse: bool = False) -> dict[str, str]:
    """name -> folder of every variant, fp32 (the model itself) first; ``reuse``: a variant already written in
    ``work`` (by an earlier run of this script) is taken as it is."""
    from kdcode.models.load import resolve_path

    out = {"fp32": str(resolve_path(model) or model)}
    off = {"check_samples": 0, "check_blocks": 0, "data": data}
    wanted = {f"int8 {s}": (work / f"int8-{s}", CompressSpec(int8=True, int8_scheme=s, **off)) for s in schemes}
    wanted |= {d: (work / d, CompressSpec(dtype=d, **off)) for d in dtypes}
    for name, (folder, spec) in wanted.items():
        done = reuse and (folder / "kdcode.json").exists()
        out[name] = str(folder if done else run_compress(model, spec, folder, overwrite=True)[0])
    return out


def quality(folders: dict[str, str], spec: EvalSpec) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for name, folder in folders.items():
        r = run_eval(folder, spec)
        rows[name] = {"folder": folder, "size_mb": round(weights_size(Path(folder)) / 1e6, 2), "es": r["es"],
                      "em": r["em"], "perplexity": r["perplexity"], "samples": r["samples"],
                      "ppl_tokens": r.get("ppl_tokens"), "dtype": r["runtime"]["dtype"]}
        base = rows["fp32"]
        rows[name]["es_delta"] = round(r["es"] - base["es"], 2)
        if r["perplexity"] and base["perplexity"]:
            rows[name]["ppl_change_pct"] = round(100 * (r["perplexity"] / base["perplexity"] - 1), 2)
        print(f"  {name:22s} {rows[name]['size_mb']:9.2f} MB  ES {r['es']:6.2f} ({rows[name]['es_delta']:+.2f})  "
              f"ppl {r['perplexity']} ({rows[name].get('ppl_change_pct', 0):+.2f}%)", flush=True)
    return rows


def speed(folders: dict[str, str], spec: BenchSpec) -> dict[str, dict[str, Any]]:
    from kdcode.evaluation.bench import run_bench_many

    names = list(folders)  # fp16 too: on a CPU without AVX512-FP16 / AMX-FP16 its matmuls are converted (slow)
    results = run_bench_many([folders[n] for n in names], spec, isolate=True)
    base = results[0]["samples_per_s"]
    return {n: {"samples_per_s": r["samples_per_s"], "ratio_to_fp32": round(r["samples_per_s"] / base, 3),
                "range": r.get("samples_per_s_range")} for n, r in zip(names, results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bundled"], help="folders, 'bundled', 'smollm2', ...")
    ap.add_argument("--schemes", nargs="*", default=list(INT8_SCHEMES), choices=INT8_SCHEMES)
    ap.add_argument("--dtypes", nargs="*", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    ap.add_argument("--data", default="stdlib", help="held-out split for eval, train split for calibration")
    ap.add_argument("--samples", type=int, default=100, help="held-out line completions per variant")
    ap.add_argument("--ppl-blocks", type=int, default=64)
    ap.add_argument("--speed", action="store_true", help="also time every variant (run it on a quiet machine)")
    ap.add_argument("--speed-only", action="store_true", help="time the variants, skip ES and perplexity")
    ap.add_argument("--reuse", action="store_true", help="take variants already in --work-dir as they are")
    ap.add_argument("--prompts", type=int, default=16, help="bench: timed completions per round")
    ap.add_argument("--rounds", type=int, default=5, help="bench: interleaved rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the variants go (default: temp)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    data = DataSpec(source=args.data)
    report: dict[str, Any] = {"machine": machine_line(), "cpu_features": cpu_features(), "models": {}}
    print(f"{report['machine']}; CPU features: {', '.join(report['cpu_features'])}")
    for model in args.models:
        work = (args.work_dir or Path(tempfile.mkdtemp(prefix="kdcode-int8-quality-"))) / model.replace("/", "_")
        folders = variants(model, work, args.schemes, args.dtypes, data, reuse=args.reuse)
        print(f"{model}:")
        eval_spec = EvalSpec(data=data, samples=args.samples, ppl_blocks=args.ppl_blocks, device="cpu",
                             threads=args.threads)
        rows = {n: {"folder": f} for n, f in folders.items()} if args.speed_only else quality(folders, eval_spec)
        if args.speed or args.speed_only:
            bench = BenchSpec(data=data, prompts=args.prompts, rounds=args.rounds, threads=args.threads, device="cpu")
            for name, s in speed(folders, bench).items():
                rows[name]["speed"] = s
                print(f"  {name:22s} {s['samples_per_s']} samples/s, {s['ratio_to_fp32']}x fp32")
        report["models"][model] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
