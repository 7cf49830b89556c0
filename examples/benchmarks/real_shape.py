"""Memory at real size (issue 18.6): distil a CodeGPT-small-py-shaped teacher (GPT-2, 12 blocks of 768, 12 heads,
vocabulary 50,001, 1,024 positions; random weights are fine for memory and time) into 8 blocks at batch 4 x 512,
and report the peak resident memory and the seconds per step of each way of running it:

- before:      the KD loss in one pass (``--loss-chunk 0``: its float copies and softmaxes of the whole batch kept
               for the backward, as kdcode 0.1 did), teacher float32;
- after:       the defaults: the loss chunked along the sequence (the student's logits become their gradient),
               teacher float32 (as stored);
- after-ckpt:  the defaults, and the student's activations recomputed in the backward
               (``--activation-checkpointing``);
- after-bf16:  the defaults, and the frozen teacher held in bf16 (``--teacher-dtype bf16``); only worth it where
               bf16 matmuls are native (a GPU, AVX512-BF16/AMX CPUs): an AVX2-only CPU runs them many times slower;
- main:        with ``--baseline-code DIR`` (e.g. ``git archive REV kdcode | tar -x -C DIR``), that code's own
               path (teacher float32), to check that `before` is what it was.

Each runs in a fresh process (peak RSS is the process's VmHWM: loading included; on CUDA the peak allocated
memory). The tokenizer is the bundled one with unused entries up to 50,001 tokens, so the shared vocabulary is
the teacher's whole head. s/step is the mean over the steps after the first. The goal: <= 4.5 GB.

    python examples/benchmarks/real_shape.py --steps 4                  # CPU: before, after, after-ckpt
    python examples/benchmarks/real_shape.py --steps 20 --precision bf16 --modes before after after-ckpt \
        after-bf16 after-ckpt-bf16 --device-note "(H200)" --json real_shape.json        # the GPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB, POSITIONS, WIDTH, DEPTH, HEADS = 50001, 1024, 768, 12, 12
MODES = {
    "before": {"loss_chunk": 0, "teacher_dtype": "auto"},
    "after": {"loss_chunk": None, "teacher_dtype": "auto"},
    "after-ckpt": {"loss_chunk": None, "teacher_dtype": "auto", "activation_checkpointing": True},
    "after-bf16": {"loss_chunk": None, "teacher_dtype": "bf16"},
    "after-ckpt-bf16": {"loss_chunk": None, "teacher_dtype": "bf16", "activation_checkpointing": True},
}


def make_teacher(folder: Path) -> None:
    """A random GPT-2 of CodeGPT-small-py's shape and a tokenizer of its 50,001 tokens (the bundled BPE + unused)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from kdcode.models.load import bundled_path

    spec = json.loads((bundled_path() / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB)})
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    base = PreTrainedTokenizerFast.from_pretrained(str(bundled_path()))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **base.special_tokens_map)
    assert len(tok) == VOCAB, len(tok)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints its figures as one JSON line."""
    from kdcode.spec import RunSpec
    from kdcode.train.distil import run_distil

    mode = MODES.get(args.mode, {})
    spec: dict = {
        "teacher": {"name": str(args.teacher)},
        "student": {"layers": 8, "init": "spread"},
        "data": {"source": "stdlib", "max_files": 60},
        "train": {"max_steps": args.steps, "batch_size": 4, "block_size": 512, "precision": args.precision,
                  "eval_every": 10**9, "eval_batches": 1, "warmup_steps": 0, "threads": args.threads},
        "out": str(Path(args.work) / f"student-{args.mode}"),
    }
    if mode:  # main's code has neither key
        spec["teacher"]["dtype"] = mode["teacher_dtype"]
        spec["train"]["loss_chunk"] = mode["loss_chunk"]
        spec["train"]["activation_checkpointing"] = mode.get("activation_checkpointing", False)
    out, manifest = run_distil(RunSpec.model_validate(spec), overwrite=True)
    tr = manifest["training"]
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    times = [r["elapsed_s"] for r in steps]  # the first step (allocations, warm-up) is left out
    per_step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else tr["train_time_s"] / tr["steps"]
    print(json.dumps({"mode": args.mode, "peak_rss_gb": round(tr["peak_memory_mb"] / 1024, 2),
                      "s_per_step": round(per_step, 2), "steps": tr["steps"], "device": tr["device"],
                      "precision": tr["precision"], "threads": tr["threads"], "loss": tr["final"].get("loss")}))


def run_mode(mode: str, teacher: Path, work: Path, args: argparse.Namespace, code: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=code or os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--teacher", str(teacher), "--work", str(work),
           "--steps", str(args.steps), "--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": f"no result within {args.timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"mode": mode, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--precision", default="fp32", help="training autocast: fp32 on CPU, bf16 on a GPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", nargs="*", default=["before", "after", "after-ckpt"], choices=list(MODES))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--baseline-code", default=None, help="a folder holding another kdcode (e.g. main's) to run too")
    ap.add_argument("--device-note", default="", help="what to call the machine in the table")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="after", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="kdcode-real-shape-") as tmp:
        work = Path(tmp)
        make_teacher(work / "teacher")
        print(f"real shape: GPT-2 12x768 (vocab {VOCAB}) -> 8 blocks, batch 4 x 512, {args.steps} steps "
              f"{args.device_note}".rstrip())
        print("| run | peak memory (GB) | s/step | device | precision | threads |\n|---|---|---|---|---|---|",
              flush=True)
        rows = []
        runs = [(m, None) for m in args.modes] + ([("main", args.baseline_code)] if args.baseline_code else [])
        for mode, code in runs:
            r = run_mode(mode, work / "teacher", work, args, code)
            rows.append(r)
            if "error" in r:
                print(f"| {r['mode']} | error: {r['error']} | | | | |", flush=True)
            else:
                print(f"| {r['mode']} | {r['peak_rss_gb']} | {r['s_per_step']} | {r['device']} | {r['precision']} | "
                      f"{r['threads']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
