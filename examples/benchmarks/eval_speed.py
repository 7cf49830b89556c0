"""Line-level eval speed: kdcode's KV-cache decoding vs a naive loop, on the same model and prompts.

Every mode tokenizes each prompt and cuts it to the same context (kdcode's ``encode_prompt``), then generates
exactly ``--new-tokens`` tokens (stops disabled), without token healing, so the work is identical and only the
decoding differs:

* naive greedy: batch 1, no KV cache, the whole sequence recomputed for every new token;
* greedy (KV cache), batch 1 and batched (``--batch-size``), kdcode's ``greedy``;
* naive beam: ``--beams`` hypotheses, no KV cache, each hypothesis recomputed alone for every token;
* beam (KV cache): kdcode's ``beam_search``.

Prints completions per second per mode and the speed-up over the naive loop (goal: >= 5x for greedy).

    python examples/benchmarks/eval_speed.py --threads 1 --prompts 8
    python examples/benchmarks/eval_speed.py --model bundled --beams 5 --prompts 16

``--model`` takes a model folder or ``bundled``; the default is ``bundled`` when it is installed, else a
randomly initialised GPT-2 (12 layers, 128 wide, 4 heads, 256 positions: the bundled teacher's shape) with a
byte-level BPE (CodeGPT's special tokens) trained here on a few stdlib files. Random weights decode as fast
as trained ones: speed depends on shapes only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from kdcode.data.corpus import load_corpus
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, VocabIndex, beam_search, encode_prompt, greedy, n_positions
from kdcode.spec import DataSpec


def random_model(vocab_size: int, layers: int, hidden: int, heads: int, positions: int) -> tuple[Any, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcode.data.bpe import train_bpe
    from kdcode.data.corpus import stdlib_root

    files = sorted(p for p in stdlib_root().glob("*.py") if 5_000 < p.stat().st_size < 60_000)[:60]
    tokenizer = train_bpe([p.read_text(encoding="utf-8") for p in files], vocab_size=vocab_size)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval(), tokenizer


def load(name: str, args: argparse.Namespace) -> tuple[Any, Any, str]:
    from kdcode.models.load import bundled_path, load_model

    if name == "auto":
        name = "bundled" if (bundled_path() / "config.json").is_file() else "random"
    if name == "random":
        model, tok = random_model(args.vocab_size, args.layers, args.hidden, args.heads, args.positions)
        return model, tok, f"random GPT-2 {args.layers}L x {args.hidden} (vocab {len(tok)})"
    lm = load_model(name, check=False)
    cfg = lm.model.config
    return lm.model, lm.tokenizer, f"{name} ({cfg.num_hidden_layers}L x {cfg.hidden_size}, vocab {cfg.vocab_size})"


@torch.inference_mode()
def naive_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids) :]


@torch.inference_mode()
def naive_beam(model: Any, ids: list[int], n: int, beams: int) -> list[int]:
    hyps: list[tuple[float, list[int]]] = [(0.0, [])]
    for _ in range(n):
        cands = []
        for score, hyp in hyps:
            logp = torch.log_softmax(model(torch.tensor([ids + hyp]), use_cache=False).logits[0, -1].float(), -1)
            top = logp.topk(beams)
            cands += [(score + v, hyp + [i]) for v, i in zip(top.values.tolist(), top.indices.tolist())]
        hyps = sorted(cands, key=lambda c: c[0], reverse=True)[:beams]
    return hyps[0][1]


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto", help="a model folder, 'bundled', or 'random' (default: bundled if any)")
    ap.add_argument("--data", default="stdlib", help="corpus for the prompts (its test split, raw code)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-naive-beam", action="store_true", help="the slowest mode; skip it")
    ap.add_argument("--layers", type=int, default=12, help="random model only")
    ap.add_argument("--hidden", type=int, default=128, help="random model only")
    ap.add_argument("--heads", type=int, default=4, help="random model only")
    ap.add_argument("--positions", type=int, default=256, help="random model only")
    ap.add_argument("--vocab-size", type=int, default=8192, help="random model only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, desc = load(args.model, args)
    # fixed length: every completion (greedy, and every beam) is exactly --new-tokens tokens
    opts = DecodeOptions(max_new_tokens=args.new_tokens, heal=False, fixed_length=True)
    index = VocabIndex.for_model(model, tok)
    context = opts.context_for(n_positions(model))
    corpus = load_corpus(DataSpec(source=args.data))
    docs = corpus.splits["test"] or [d for s in corpus.splits.values() for d in s]
    prompts = [s.input for s in build_line_samples(docs, args.prompts + 1, args.seed)]
    warm, prompts = prompts[:1], prompts[1:]
    n, k = len(prompts), args.new_tokens
    encode = lambda p: list(encode_prompt(index, p, opts, context).ids)  # noqa: E731

    # warm-up of every path (allocator, kernels), untimed
    naive_greedy(model, encode(warm[0]), 2)
    greedy(model, index, warm, opts, 1)
    beam_search(model, index, warm, opts, args.beams)

    rows: list[tuple[str, float]] = []
    t_naive, naive_out = timed(lambda: [naive_greedy(model, encode(p), k) for p in prompts])
    rows.append(("naive greedy (no cache, batch 1)", t_naive))
    t_g1, g1 = timed(lambda: greedy(model, index, prompts, opts, 1))
    rows.append(("greedy, KV cache, batch 1", t_g1))
    t_gb, gb = timed(lambda: greedy(model, index, prompts, opts, args.batch_size))
    rows.append((f"greedy, KV cache, batch {args.batch_size}", t_gb))
    t_nb = None
    if not args.skip_naive_beam:
        t_nb, _ = timed(lambda: [naive_beam(model, encode(p), k, args.beams) for p in prompts])
        rows.append((f"naive beam {args.beams} (no cache, batch 1)", t_nb))
    t_b, _ = timed(lambda: beam_search(model, index, prompts, opts, args.beams))
    rows.append((f"beam {args.beams}, KV cache", t_b))

    same = sum(o == ids for o, ids in zip(naive_out, g1.token_ids))
    ctx = sum(len(encode(p)) for p in prompts) / n
    print(f"model: {desc}; {n} prompts, mean context {ctx:.0f} tokens, {k} new tokens each (fixed length); "
          f"{torch.get_num_threads()} threads, {next(model.parameters()).dtype}, cpu")
    print(f"{'mode':<38}{'completions/s':>15}{'ms/completion':>15}")
    for name, secs in rows:
        print(f"{name:<38}{n / secs:>15.2f}{1000 * secs / n:>15.1f}")
    ratios = {
        "greedy_batch1_vs_naive": round(t_naive / t_g1, 2),
        f"greedy_batch{args.batch_size}_vs_naive": round(t_naive / t_gb, 2),
    }
    if t_nb is not None:
        ratios[f"beam{args.beams}_vs_naive_beam"] = round(t_nb / t_b, 2)
    print("speed-up over the naive loop: " + ", ".join(f"{key} {v}x" for key, v in ratios.items()))
    print(f"greedy KV cache (batch 1) gives the naive loop's completion for {same}/{n} prompts")
    if args.json:
        args.json.write_text(json.dumps({
            "model": desc, "prompts": n, "new_tokens": k, "threads": torch.get_num_threads(),
            "completions_per_s": {name: round(n / secs, 3) for name, secs in rows}, "ratios": ratios,
            "greedy_matches_naive": same,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
