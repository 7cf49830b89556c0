"""The search: which student shape, in which runtime precision, completes the task within the budget on this
machine and keeps the most of the teacher.

1. **Families.** Every (MLP channels kept, heads removed, precision) of the spec; depth only for a family kdcode
   cannot prune. Precisions by default: fp32, bf16 where the device runs it natively, int8 where the CPU has int8
   dot products (as `kdcode compress --int8` writes it: smooth-per-token for GPT-2 and Llama-style blocks, else
   weight-only).
2. **Speed, measured.** Within a family the time of a completion grows with depth, so the deepest shape within
   the budget is found by timing random-weight models: depth 1 (the family fits at all?), the teacher's depth, the
   depth the straight line between them predicts, then one block at a time until the boundary is measured. The
   teacher itself (fp32) is timed first: when it fits, no student is needed.
3. **Quality, proxied.** Each family's deepest fitting shape is a finalist, built as distil builds it (the
   measured-importance init's blocks for that depth, heads / MLP channels pruned by importance on calibration
   blocks), then given ``proxy_steps`` KD steps (distil's default strategy and learning rate, on the calibration
   blocks) and converted to its precision; its proxy is its held-out loss then. The loss at init alone
   (``proxy_steps`` 0) favours shallow, wide shapes that a few steps of KD overtake; the benchmark in
   examples/benchmarks reports how well each proxy ranks shapes by their ES after distillation.
4. **Choice.** The finalists, with their real weights, are timed again in interleaved rounds; of those whose median
   is within the budget, the lowest proxy loss wins (ties: the faster). Near-ties (within ``proxy_tie`` of the best)
   are scored again after ``tie_steps`` KD steps, which decide among them.
"""

from __future__ import annotations

import copy
import gc
import sys
from collections.abc import Callable
from typing import Any

import torch

from kdcode.compression.compress import check_prunable, prune_at_init
from kdcode.device import cpu_features, cpu_has_bf16, cpu_has_int8_dot, cpu_name, describe_device, torch_kernels
from kdcode.errors import KdcodeError
from kdcode.evaluation.perplexity import held_out_loss
from kdcode.inits.base import copy_weights, new_model, student_config
from kdcode.inits.measured import Auto
from kdcode.planning.shapes import Shape, footprint, prune_axes, timing_model, to_precision
from kdcode.planning.timing import Task, Timed, summary, time_interleaved
from kdcode.plugins import make_strategy
from kdcode.spec import StrategySpec, TrainSpec
from kdcode.spec_latency import LatencySpec


def _default(field: str) -> Any:
    """distil's default for a training setting (TrainSpec's field default)."""
    return TrainSpec.model_fields[field].default


def proxy_text(steps: int) -> str:
    """What the proxy of a plan with ``steps`` KD steps per finalist is, in words."""
    when = f"after {steps} KD steps ({StrategySpec().name}, lr {_default('lr'):g}, on calibration blocks)" if steps \
        else "at init"
    return (f"held-out loss {when} (the measured-importance init's blocks, pruned by importance, in its "
            "precision)")


def short_kd(student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor, steps: int,
             batch_size: int, vocab: int | None = None, seed: int = 0) -> None:
    """``steps`` of KD on ``blocks`` (drawn in a seeded order), in place: distil's default strategy at its
    defaults, AdamW at distil's default learning rate (constant: too few steps for a schedule), clipped as distil
    clips; ``vocab``: the tokenizer's length (logits past it are LM-head padding)."""
    strategy = make_strategy(StrategySpec().name, {})
    strategy.use_logits(vocab)
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(student.parameters(), lr=_default("lr"),
                                  weight_decay=_default("weight_decay"))
    draw = torch.Generator().manual_seed(seed)
    was_training = student.training
    student.train()
    teacher.eval()
    for _ in range(steps):
        x = blocks[torch.randint(0, len(blocks), (batch_size,), generator=draw)].to(device)
        with torch.no_grad():
            target = teacher(x)
        loss = strategy.loss(student(x), target, x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), _default("grad_clip"))
        optimizer.step()
    student.train(was_training)
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def precisions(spec: LatencySpec, device: torch.device) -> list[str]:
    """The spec's runtime precisions, else those that can pay on this device."""
    if spec.precisions:
        chosen = list(spec.precisions)
    else:
        chosen = ["fp32"]
        if device.type == "cuda" or cpu_has_bf16():
            chosen.append("bf16")
        if device.type == "cpu" and cpu_has_int8_dot():
            chosen.append("int8")
    if device.type == "cuda" and any(p.startswith("int8") for p in chosen):
        raise KdcodeError("int8 runs on the CPU (kdcode's int8 kernels); drop it from --precisions on a CUDA device")
    return chosen


def families(teacher: torch.nn.Module, spec: LatencySpec, device: torch.device, log: Log) -> list[tuple]:
    """(MLP kept, heads removed, precision) of every family searched; one line when the family cannot be pruned."""
    heads_ok, ffn_ok, why = prune_axes(teacher)
    ffn = spec.ffn_keep if ffn_ok else [1.0]
    heads = spec.head_prune if heads_ok else [0.0]
    if why is not None and (ffn != spec.ffn_keep or heads != spec.head_prune):
        log(why)
    out = []
    for f in sorted(set(ffn), reverse=True):
        for h in sorted(set(heads)):
            check_prunable(teacher, h, 1.0 - f)
            out += [(f, h, p) for p in precisions(spec, device)]
    return out


class Search:
    """The measured rows of one plan, by shape."""

    def __init__(self, teacher: torch.nn.Module, tokenizer: Any, task: Task, spec: LatencySpec,
                 device: torch.device, log: Log = _stderr) -> None:
        self.teacher, self.tokenizer, self.task, self.spec, self.device, self.log = (
            teacher, tokenizer, task, spec, device, log)
        self.depth = int(teacher.config.num_hidden_layers)
        self.rows: dict[Shape, dict[str, Any]] = {}

    def measure(self, shape: Shape) -> float:
        """Median ms of a completion by a random-weight model of ``shape`` (each shape timed once)."""
        if shape not in self.rows:
            model = timing_model(self.teacher, shape).to(self.device)
            ms = time_interleaved({shape: Timed(model, self.tokenizer)}, self.task, self.spec.search_rounds)[shape]
            self.rows[shape] = {**shape.as_dict(), **summary(ms), **footprint(model), "phase": "search"}
            del model
            gc.collect()
            self.log(f"plan: {shape.label()}: {self.rows[shape]['ms']} ms")
        return float(self.rows[shape]["ms"])

    def deepest(self, family: tuple) -> Shape | None:
        """The deepest shape of ``family`` within the budget, measured at the boundary; None when depth 1 is over."""
        budget, top = self.spec.target_ms(), self.depth
        at = lambda d: Shape(d, *family)  # noqa: E731
        t1 = self.measure(at(1))
        if t1 > budget:
            return None
        if top == 1:
            return at(1)
        t_top = self.measure(at(top))
        if t_top <= budget:
            return at(top)
        d = min(top - 1, max(1, 1 + int((budget - t1) / max(t_top - t1, 1e-9) * (top - 1))))
        if self.measure(at(d)) <= budget:
            while d + 1 < top and self.measure(at(d + 1)) <= budget:
                d += 1
        else:
            while d > 1:
                d -= 1
                if self.measure(at(d)) <= budget:
                    break
        return at(d)


class Finalists:
    """Finalists built as distil would build them, scored by the proxy (layer maps measured once per depth)."""

    def __init__(self, teacher: torch.nn.Module, calibration: torch.Tensor, held_out: torch.Tensor,
                 spec: LatencySpec, device: torch.device, vocab: int | None = None) -> None:
        self.teacher, self.calibration, self.held_out, self.spec, self.device, self.vocab = (
            teacher, calibration, held_out, spec, device, vocab)
        self.maps: dict[int, tuple[list[int], Any]] = {}
        # the last trained float student, by (layers, MLP kept, heads removed, steps): the precisions of one shape
        # share it (training runs in float32; each precision converts a copy)
        self._trained: tuple[tuple, torch.nn.Module] | None = None

    def layer_map(self, layers: int) -> tuple[list[int], Any]:
        """The measured-importance init's teacher blocks for ``layers`` (distil's default init)."""
        if layers not in self.maps:
            init = Auto()
            init.prepare(self.teacher, self.calibration, layers)
            self.maps[layers] = ([int(j) for j in init.select(self.depth, layers)], init.origin)
        return self.maps[layers]

    @property
    def depth(self) -> int:
        return int(self.teacher.config.num_hidden_layers)

    def trained(self, shape: Shape, steps: int) -> torch.nn.Module:
        """``shape`` with the teacher's measured blocks, pruned, after ``steps`` proxy KD steps, in float32 (a copy:
        the same shape in another precision reuses the training)."""
        key = (shape.layers, shape.ffn_keep, shape.head_prune, steps)
        if self._trained is None or self._trained[0] != key:
            self._trained = None
            blocks, _ = self.layer_map(shape.layers)
            student = new_model(student_config(self.teacher, blocks))
            copy_weights(student, self.teacher, blocks, True)
            student, _ = prune_at_init(student.to(self.device), shape.head_prune, 1.0 - shape.ffn_keep,
                                       self.calibration)
            student = student.float()
            if steps:
                short_kd(student, self.teacher, self.calibration, steps, self.spec.proxy_batch_size, self.vocab)
            self._trained = (key, student)
        return copy.deepcopy(self._trained[1])

    def build(self, shape: Shape, steps: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The finalist in its precision and its proxy: held-out loss after ``steps`` (default ``proxy_steps``)."""
        steps = self.spec.proxy_steps if steps is None else steps
        student = to_precision(self.trained(shape, steps), shape.precision, self.calibration)
        blocks_n = min(len(self.held_out), self.spec.proxy_blocks)
        loss = held_out_loss(student, self.held_out[:blocks_n], 4, None, self.device)
        return student, {"teacher_blocks": self.layer_map(shape.layers)[0], "proxy_loss": round(loss, 4),
                         "proxy_tokens": int(self.held_out[:blocks_n].numel()), "proxy_steps": steps}


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    return {"device": describe_device(device), "cpu": cpu_name(), "cpu_features": cpu_features(),
            "torch_kernels": torch_kernels(), "threads": threads, "backend": "torch"}
