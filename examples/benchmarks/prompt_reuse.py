"""Time to first token with the server's prompt KV reuse: a ~1k-token prompt (a held-out stdlib file up to a cursor in
its last line) completed cold, against the same prompt completed right after a request that differed from it only
in its last line (the editor's next keystrokes), so that only the tokens after their common prefix are prefilled.

Through the engine `kdcode serve` uses (``Engine.complete``, one new token, greedy), in interleaved rounds (cold and
warm alternate which goes first); the median and [min-max] of each, their ratio, and the tokens the warm request
took from the cache. The prompt is cut to fit the model's window (the server cuts a longer one from its start,
which moves with every edit and leaves nothing to reuse).

    python examples/benchmarks/prompt_reuse.py smollm2 --rounds 10 --threads 2 --json prompt_reuse.json
    python examples/benchmarks/prompt_reuse.py bundled --rounds 3        # a check that it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from kdcode.data.corpus import load_corpus
from kdcode.inference.engine import Engine, load_engine
from kdcode.spec import DataSpec

NEW_TOKENS = 1  # time to first token: the prefill and one step


def edit_pair(engine: Engine, tokens: int) -> tuple[str, str]:
    """(before, after): a held-out file's lines up to about ``tokens`` tokens, then a last line typed half-way, and
    the same with four more characters of that line typed."""
    docs = sorted(load_corpus(DataSpec()).splits["test"], key=lambda d: -len(d.text))
    lines = docs[0].text.split("\n")
    head: list[str] = []
    for i, line in enumerate(lines):
        last = next((x for x in lines[i + 1 :] if len(x.strip()) >= 12), None)
        if last is None or engine.count_tokens("\n".join([*head, line, last])) > tokens:
            break
        head.append(line)
    if last is None:
        raise SystemExit("the held-out file is too short for this many tokens")
    base = "\n".join(head) + "\n" + last[: len(last) // 2]
    return base, base + last[len(last) // 2 : len(last) // 2 + 4]


def ttft(engine: Engine, prompt: str) -> tuple[float, int]:
    done = engine.complete(prompt, NEW_TOKENS, stop=[])
    return 1000 * (done.first_token_s or 0.0), done.cached_tokens


def spread(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 2), "min_ms": round(min(values), 2),
            "max_ms": round(max(values), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model folder, 'bundled', 'smollm2' or a hub id")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="the prompt's length, within the model's window")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    engine = load_engine(args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    room = engine.n_positions - NEW_TOKENS - 8  # the prompt fits the window whole, edit and healing included
    before, after = edit_pair(engine, min(args.prompt_tokens, room))
    cold, warm, cached = [], [], []
    for r in range(args.rounds):
        for mode in (("cold", "warm") if r % 2 == 0 else ("warm", "cold")):
            if mode == "cold":
                engine.clear_prompt_cache()
                cold.append(ttft(engine, after)[0])
            else:
                engine.clear_prompt_cache()
                ttft(engine, before)  # the previous request: its cache is kept
                ms, took = ttft(engine, after)
                warm.append(ms)
                cached.append(took)
    ratios = sorted(c / w for c, w in zip(cold, warm))
    summary = {
        "model": args.model, "runtime": engine.runtime, "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": engine.count_tokens(after), "cached_tokens": statistics.median(cached),
        "rounds": args.rounds, "cold": spread(cold), "warm": spread(warm),
        "speedup": round(statistics.median(ratios), 2), "speedup_range": [round(ratios[0], 2), round(ratios[-1], 2)],
    }
    print(f"{args.model}: {summary['prompt_tokens']} prompt tokens, {summary['cached_tokens']:.0f} from the cache, "
          f"{args.rounds} rounds, {engine.runtime.get('threads')} threads, {engine.runtime.get('dtype')}")
    print(f"{'':6} {'median ms':>10} {'min':>8} {'max':>8}")
    for name in ("cold", "warm"):
        s = summary[name]
        print(f"{name:6} {s['median_ms']:>10.1f} {s['min_ms']:>8.1f} {s['max_ms']:>8.1f}")
    print(f"time to first token: {summary['speedup']}x faster warm [{ratios[0]:.2f}-{ratios[-1]:.2f}]")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
