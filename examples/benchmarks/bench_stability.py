"""Does `kdcode bench` hold still? (issue 19.1: the same folder benched 5 times in a row varies by < 5% in its median)

Runs ``kdcode bench MODEL --json F`` --runs times per setting as separate processes, one after the other, the
settings alternating run by run (A B A B ...), so that a drift of the machine touches every setting alike. Per
setting: each run's median samples/s, and the spread of those medians, (max - min) / median of them. Run it on a
quiet machine: it measures the bench *and* the machine.

    python examples/benchmarks/bench_stability.py bundled --runs 5 --threads 1,2 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(model: str, threads: int, rounds: int, prompts: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "kdcode", "bench", model, "--json", str(out), "--threads", str(threads),
               "--rounds", str(rounds), "--prompts", str(prompts), "--device", "cpu", "--backend", backend]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        data = json.loads(out.read_text())
    return {"median": data["samples_per_s"], "range": data["samples_per_s_range"], "rounds": data["rounds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, alternated run by run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = [int(t) for t in args.threads.split(",")]
    runs: dict[int, list[dict]] = {t: [] for t in settings}
    for i in range(args.runs):
        for t in settings if i % 2 == 0 else settings[::-1]:
            runs[t].append(one_run(args.model, t, args.rounds, args.prompts, args.backend))
            print(f"run {i + 1} threads {t}: {runs[t][-1]['median']:.2f} samples/s", flush=True)
    summary = {}
    for t, rs in runs.items():
        medians = [r["median"] for r in rs]
        mid = statistics.median(medians)
        summary[f"threads={t}"] = {"run_medians": medians, "median": round(mid, 2),
                                   "spread_pct": round(100 * (max(medians) - min(medians)) / mid, 1),
                                   "runs": rs}
        print(f"threads {t}: medians {', '.join(f'{m:.2f}' for m in medians)} -> spread "
              f"{summary[f'threads={t}']['spread_pct']}% (goal < 5%)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "settings": vars(args) | {"json": str(args.json)},
                                         "results": summary}, indent=2))


if __name__ == "__main__":
    main()
