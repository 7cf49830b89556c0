"""The task a budget is for, timed as a user runs it: one completion of ``prompt_tokens`` held-out tokens and
``new_tokens`` generated (no early stop), through kdcode's own greedy decoding with its KV cache, batch 1.

Several models are timed in **interleaved rounds** (A B C, C B A, ...), as `kdcode bench` times them, so a drift of
the machine falls on all; each figure is the median over rounds with its range.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from kdcode.errors import KdcodeError
from kdcode.inference.decode import DecodeOptions, greedy
from kdcode.inference.vocab import VocabIndex
from kdcode.spec_latency import LatencySpec


@dataclass
class Task:
    """What one timed completion is."""

    kind: str
    prompt: str
    prompt_tokens: int
    new_tokens: int

    def describe(self) -> str:
        what = "an infill" if self.kind == "infill" else "a line completion"
        return f"{what} of {self.prompt_tokens} prompt tokens and {self.new_tokens} new tokens"

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.kind, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens}


def default_prompt_tokens(n_positions: int, new_tokens: int) -> int:
    """kdcode eval's default context: min(positions, 1024) minus the new tokens."""
    return max(1, min(n_positions, 1024) - new_tokens)


def make_task(spec: LatencySpec, tokenizer: Any, held_out: torch.Tensor, n_positions: int) -> Task:
    """The timed prompt: the first ``prompt_tokens`` of the held-out token stream, as text (an infill's prefix,
    suffix and markers are timed as one prompt of that many tokens: the cost is the same)."""
    n = spec.prompt_tokens or default_prompt_tokens(n_positions, spec.new_tokens)
    if n + spec.new_tokens > n_positions:
        raise KdcodeError(f"--prompt-tokens {n} plus --new-tokens {spec.new_tokens} exceed the teacher's "
                          f"{n_positions} positions; lower them")
    stream = held_out.reshape(-1)
    if stream.numel() < n + 8:
        raise KdcodeError(f"the held-out split holds {stream.numel()} tokens, fewer than the {n} prompt tokens "
                          "timed; lower --prompt-tokens or use more data")
    text = tokenizer.decode(stream[: n + 64].tolist())
    return Task(spec.task, text, n, spec.new_tokens)


def options(task: Task) -> DecodeOptions:
    return DecodeOptions(max_new_tokens=task.new_tokens, context_tokens=task.prompt_tokens, fixed_length=True)


class Timed:
    """One model ready to complete the task (its vocabulary index built once)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model, self.index = model, VocabIndex.for_model(model, tokenizer)

    def once(self, task: Task) -> float:
        """Milliseconds of one completion."""
        sync = torch.cuda.synchronize if next(self.model.parameters()).is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        greedy(self.model, self.index, [task.prompt], options(task), batch_size=1)
        sync()
        return 1000 * (time.perf_counter() - start)


def time_interleaved(models: dict[Any, Timed], task: Task, rounds: int, warmup: int = 1) -> dict[Any, list[float]]:
    """Milliseconds per completion of every model, ``rounds`` each, in alternating order; ``warmup`` untimed first."""
    keys = list(models)
    for key in keys:
        for _ in range(warmup):
            models[key].once(task)
    out: dict[Any, list[float]] = {k: [] for k in keys}
    with torch.inference_mode():
        for r in range(rounds):
            for key in keys if r % 2 == 0 else reversed(keys):
                out[key].append(models[key].once(task))
    return out


def summary(ms: list[float]) -> dict[str, Any]:
    return {"ms": round(statistics.median(ms), 1), "ms_range": [round(min(ms), 1), round(max(ms), 1)],
            "rounds": len(ms)}
