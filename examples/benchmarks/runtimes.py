"""Runtimes (issue 19.2, 19.3, 19.5): backend x precision x model -> size, samples/s median [min-max],
ms/token p50, line-completion ms p50, ES; one Markdown table, and the issue's goals checked against it.

Models: the bundled 12-layer teacher and a 6-layer student (--student DIR; made with
`kdcode distil --max-steps 50 --out DIR` when DIR does not exist). Variants of each (--variants):

    torch-fp32       today's path: transformers, a KV cache that grows every step
    torch-static     a static KV cache (allocated once, written in place)
    torch-compile    static KV cache + torch.compile'd decode step
    torch-int8       kdcode compress --int8 (torch's dynamic int8 kernels)
    ort-fp32         kdcode export --format onnx, run by ONNX Runtime
    ort-int8         kdcode export --format onnx --int8
    llama-f32        kdcode export --format gguf, run by llama.cpp
    llama-q8_0       kdcode export --format gguf --quant q8_0   (also: llama-f16, llama-q4_0)

Exports are made once under --work (made again when their source's weights changed). Every figure comes from
kdcode's own decoder (greedy, KV cache) driving the backend:

- speed: every variant in its own process, warmed up, then timed in interleaved rounds (run_bench_many):
  batch 1, --prompts held-out line prefixes per round, 16 new tokens each with no early stop; samples/s is
  the median over rounds [min-max], ms/token the median decode step;
- line completion: as `kdcode complete` does it (stop at the end of the line, at most 16 tokens), prompts of
  256 tokens (the models have 256 positions, so they see the last 240), median over --latency-prompts, each
  student variant in a fresh process;
- ES: kdcode eval's line completion (CodeXGLUE ES) on --es-samples held-out samples, the same for every row.

Goals (issue 19): student vs teacher throughput in the fastest backend >= 1.9x at batch 1; an 8-bit variant
>= 1.5x its backend's fp32 student, <= 1 ES point lost and >= 3.5x smaller; the fastest backend's student line
completion under 40 ms.

    python examples/benchmarks/runtimes.py --student /tmp/s6 --threads 2 --rounds 5 --es-samples 500 \\
        --markdown runtimes.md --json runtimes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from kdcode.compression.compress import run_compress
from kdcode.evaluation.bench import run_bench_many
from kdcode.evaluation.evaluate import run_eval
from kdcode.export.run import run_export, sidecar_path
from kdcode.models.artifacts import read_manifest, weights_sha256
from kdcode.models.load import resolve_path
from kdcode.spec import BenchSpec, EvalSpec
from kdcode.spec_compress import CompressSpec, ExportSpec

# variant -> (backend, precision, decode path)
VARIANTS = {
    "torch-fp32": ("torch", "fp32", "dynamic cache"),
    "torch-static": ("torch", "fp32", "static cache"),
    "torch-compile": ("torch", "fp32", "static + compile"),
    "torch-int8": ("torch", "int8", "dynamic cache"),
    "ort-fp32": ("onnxruntime", "fp32", "past key values"),
    "ort-int8": ("onnxruntime", "int8", "past key values"),
    "llama-f32": ("llama.cpp", "f32", "llama_decode"),
    "llama-f16": ("llama.cpp", "f16", "llama_decode"),
    "llama-q8_0": ("llama.cpp", "q8_0", "llama_decode"),
    "llama-q4_0": ("llama.cpp", "q4_0", "llama_decode"),
}
DEFAULT = "torch-fp32,torch-static,torch-compile,torch-int8,ort-fp32,ort-int8,llama-f32,llama-q8_0"
FLOAT = {"fp32", "f32"}
EIGHT_BIT = {"torch-int8": "torch-fp32", "ort-int8": "ort-fp32", "llama-q8_0": "llama-f32"}
NEW_TOKENS, LINE_PROMPT = 16, 256
GOALS = {"student_speedup": 1.9, "int8_speedup": 1.5, "int8_es_loss": 1.0, "int8_smaller": 3.5, "line_ms": 40.0}


# ---------------------------------------------------------------------------------------------- the models
def ensure_student(path: Path) -> Path:
    if not path.exists():
        print(f"making the student: kdcode distil --max-steps 50 --out {path}", flush=True)
        subprocess.run([sys.executable, "-m", "kdcode", "distil", "--max-steps", "50", "--out", str(path)], check=True)
    return path


def _made_from(record: dict[str, Any] | None, source: Path) -> bool:
    """Whether an export's (or an int8 folder's) record names ``source``'s current weights."""
    if not record:
        return False
    parent = record.get("source") or (record.get("compression") or {}).get("parent") or {}
    return parent.get("weights_sha256") == weights_sha256(source)


def prepare(label: str, source: str, variant: str, work: Path) -> tuple[str, dict[str, Any] | None]:
    """(model name to load, runtime) for one variant of one model; exports made under ``work`` when missing."""
    backend, precision, _ = VARIANTS[variant]
    src = resolve_path(source)
    if variant in ("torch-fp32", "torch-static", "torch-compile"):
        runtime = {"torch-static": {"kv_cache": "static"}, "torch-compile": {"compile": True}}.get(variant)
        return source, runtime
    if variant == "torch-int8":
        out = work / f"{label}-int8"
        if not _made_from(read_manifest(out) if out.is_dir() else None, src):
            run_compress(source, CompressSpec(int8=True), out, overwrite=True)
        return str(out), None
    if backend == "onnxruntime":
        out = work / f"{label}-onnx-{precision}"
        if not _made_from(read_manifest(out) if (out / "model.onnx").is_file() else None, src):
            run_export(source, ExportSpec(format="onnx", int8=precision == "int8"), out, overwrite=True)
        return str(out), None
    out = work / f"{label}.{precision}.gguf"
    side = sidecar_path(out)
    if not (out.is_file() and side.is_file() and _made_from(json.loads(side.read_text()), src)):
        run_export(source, ExportSpec(format="gguf", quant=precision), out, overwrite=True)
    return str(out), None


# ---------------------------------------------------------------------------------------------- line latency
def line_prompts(n: int, seed: int = 0) -> list[str]:
    """Held-out files cut after the indentation of a line (an editor's prefix), ``n`` of them."""
    import random

    from kdcode.data.corpus import load_corpus
    from kdcode.spec import DataSpec

    docs = load_corpus(DataSpec()).splits["test"]
    cuts = []
    for doc in docs:
        offset = 0
        for line in doc.text.splitlines(keepends=True):
            if line.strip() and offset > 4000:  # far enough into the file for a full 256-token prompt
                cuts.append(doc.text[: offset + len(line) - len(line.lstrip(" \t"))])
            offset += len(line)
    return random.Random(seed).sample(cuts, min(n, len(cuts)))


def _line_latency(name: str, runtime: dict[str, Any] | None, texts: list[str], threads: int) -> dict[str, Any]:
    """In a fresh process: ms to complete each prompt's line as `kdcode complete` does (<= 16 tokens)."""
    import statistics

    from kdcode.inference.engine import load_engine

    engine = load_engine(name, device="cpu", threads=threads, runtime=runtime)
    prompts = []
    for text in texts:
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"][-LINE_PROMPT:]
        prompts.append(engine.tokenizer.decode(ids))
    for prompt in prompts[:2]:
        engine.complete(prompt, NEW_TOKENS)  # warm-up (a compiled step compiles here)
    ms, tokens = [], []
    for prompt in prompts:
        done = engine.complete(prompt, NEW_TOKENS)
        ms.append(1000 * done.total_s)
        tokens.append(done.choices[0].tokens)
    return {"line_ms_p50": round(statistics.median(ms), 1), "line_ms_max": round(max(ms), 1),
            "line_tokens_mean": round(sum(tokens) / len(tokens), 1), "line_prompts": len(prompts)}


def line_latency(name: str, runtime: dict[str, Any] | None, texts: list[str], threads: int) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_line_latency, name, runtime, texts, threads).result()


# ---------------------------------------------------------------------------------------------- goals, table
def _ratio(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float]:
    """a / b samples/s: median, and the lowest and highest the ranges allow."""
    (alo, ahi), (blo, bhi) = a["samples_per_s_range"], b["samples_per_s_range"]
    return a["samples_per_s"] / b["samples_per_s"], alo / bhi, ahi / blo


def check_goals(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """One line per goal: the figures behind it and whether it holds (PASS / FAIL / n/a)."""
    out = []
    students = {v: r for (m, v), r in rows.items() if m == "student"}
    if not students:
        return ["no student rows: nothing to check"]
    fastest = max(students, key=lambda v: students[v]["samples_per_s"])
    backend = VARIANTS[fastest][0]
    same = [v for v in students if VARIANTS[v][0] == backend and ("teacher", v) in rows and VARIANTS[v][1] in FLOAT]
    if same:
        v = max(same, key=lambda v: students[v]["samples_per_s"])
        r, lo, hi = _ratio(students[v], rows[("teacher", v)])
        verdict = "PASS" if r >= GOALS["student_speedup"] else "FAIL"
        out.append(f"{verdict} student vs teacher in the fastest backend ({backend}, {v}): {r:.2f}x "
                   f"[{lo:.2f}-{hi:.2f}] (goal >= {GOALS['student_speedup']}x)")
    else:
        out.append(f"n/a student vs teacher: no float teacher row in the fastest backend ({backend})")
    for eight, base in EIGHT_BIT.items():
        if eight not in students or base not in students:
            continue
        q, f = students[eight], students[base]
        r, lo, hi = _ratio(q, f)
        loss = (f["es"] - q["es"]) if f.get("es") is not None and q.get("es") is not None else None
        smaller = f["size_mb"] / q["size_mb"] if q.get("size_mb") else None
        tensors = f" (tensors alone: {f['tensor_mb'] / q['tensor_mb']:.2f}x; both files hold the same tokenizer)" \
            if q.get("tensor_mb") and f.get("tensor_mb") else ""
        ok = r >= GOALS["int8_speedup"] and loss is not None and loss <= GOALS["int8_es_loss"] and \
            smaller is not None and smaller >= GOALS["int8_smaller"]
        out.append(f"{'PASS' if ok else 'FAIL'} 8-bit {eight} vs {base}: {r:.2f}x speed [{lo:.2f}-{hi:.2f}] "
                   f"(>= {GOALS['int8_speedup']}), ES {'-' if loss is None else f'{-loss:+.2f}'} "
                   f"(>= -{GOALS['int8_es_loss']}), {'-' if smaller is None else f'{smaller:.2f}'}x smaller "
                   f"(>= {GOALS['int8_smaller']}){tensors}")
    line = students[fastest].get("line_ms_p50")
    verdict = "n/a" if line is None else "PASS" if line < GOALS["line_ms"] else "FAIL"
    out.append(f"{verdict} line completion of the fastest student ({fastest}): p50 {line} ms "
               f"(<= {NEW_TOKENS} tokens, {LINE_PROMPT}-token prompts; goal < {GOALS['line_ms']:.0f} ms)")
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    rng = row.get(f"{key}_range")
    return f"{value} [{rng[0]}-{rng[1]}]" if rng else str(value)


def markdown(rows: dict[tuple[str, str], dict[str, Any]], header: list[str], goals: list[str]) -> str:
    cols = ["model", "backend", "precision", "decode path", "size (MB)", "samples/s median [min-max]",
            "ms/token p50", "line ms p50", "ES"]
    lines = header + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (model, variant), r in rows.items():
        backend, precision, path = VARIANTS[variant]
        lines.append("| " + " | ".join([model, backend, precision, path, _cell(r, "size_mb"),
                                        _cell(r, "samples_per_s"), _cell(r, "ms_per_token_p50"),
                                        _cell(r, "line_ms_p50"), _cell(r, "es")]) + " |")
    return "\n".join(lines + ["", "Goals:", *[f"- {g}" for g in goals]]) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="bundled")
    ap.add_argument("--student", type=Path, default=Path("/tmp/s6"), help="6-layer student (made when missing)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdcode-runtimes"), help="where exports are kept")
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16, help="timed completions per round")
    ap.add_argument("--es-samples", type=int, default=500)
    ap.add_argument("--latency-prompts", type=int, default=20)
    ap.add_argument("--note", default="", help="printed with the table (e.g. 'busy shared CPU')")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    models = {"teacher": args.teacher, "student": str(ensure_student(args.student))}
    plan = {(m, v): prepare(m, src, v, args.work) for m, src in models.items() for v in variants}
    spec = BenchSpec(prompts=args.prompts, rounds=args.rounds, new_tokens=NEW_TOKENS, batch_size=1,
                     threads=args.threads, device="cpu")
    keys = list(plan)
    results = run_bench_many([plan[k][0] for k in keys], spec, runtimes=[plan[k][1] for k in keys])
    rows = dict(zip(keys, results))
    for key, row in rows.items():
        if plan[key][0].endswith(".gguf"):  # a GGUF file also holds its tokenizer: its tensors' bytes too
            import gguf

            row["tensor_mb"] = round(sum(int(t.n_bytes) for t in gguf.GGUFReader(plan[key][0]).tensors) / 1e6, 3)
    texts = line_prompts(args.latency_prompts + 2)
    for (model, variant), row in rows.items():
        if model == "student":
            row.update(line_latency(plan[(model, variant)][0], plan[(model, variant)][1], texts, args.threads))
        if variant != "torch-compile":  # its tokens are the static cache's (tests/test_runtimes.py)
            name, runtime = plan[(model, variant)]
            ev = run_eval(name, EvalSpec(samples=args.es_samples, ppl_blocks=0, threads=args.threads, device="cpu"),
                          runtime=runtime)
            row.update(es=ev["es"], em=ev["em"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [f"Runtimes: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} "
              f"threads, batch 1, {args.prompts} prompts x {NEW_TOKENS} new tokens x {args.rounds} interleaved rounds "
              f"(median [min-max]); ES on {args.es_samples} held-out samples; load average {load:.1f} at the end"
              + (f"; {args.note}" if args.note else "")]
    goals = check_goals(rows)
    text = markdown(rows, header, goals)
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "goals": goals,
                                         "rows": [{"model": m, "variant": v, **r} for (m, v), r in rows.items()]},
                                        indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
