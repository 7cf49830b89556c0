"""A candidate student shape and the models of that shape.

Speed does not depend on the weights, so a shape is timed on a model of random weights built from the teacher's
config (depth cut, MLP channels and heads removed as the pruners remove them, converted to the runtime precision).
Quality does: a finalist is built as distil would build it (the measured-importance init's blocks, pruned by
importance on calibration blocks, a few KD steps, converted) and scored by its held-out loss
(:mod:`kdcode.planning.search`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdcode.compression.compress import int8_in_place, pruner_for
from kdcode.compression.int8 import memory_bytes
from kdcode.errors import KdcodeError
from kdcode.inits.base import evenly_spaced, new_model, student_config
from kdcode.models.load import count_params
from kdcode.spec_compress import CompressSpec
from kdcode.spec_latency import PRECISIONS


@dataclass(frozen=True, order=True)
class Shape:
    """Depth, the fraction of MLP channels kept, the fraction of heads removed, the runtime precision."""

    layers: int
    ffn_keep: float = 1.0
    head_prune: float = 0.0
    precision: str = "fp32"

    @property
    def family(self) -> tuple[float, float, str]:
        """What stays fixed while the depth is searched."""
        return (self.ffn_keep, self.head_prune, self.precision)

    def label(self, precision: bool = True) -> str:
        parts = [f"{self.layers} layer" + ("s" if self.layers != 1 else "")]
        if self.ffn_keep < 1:
            parts.append(f"MLP {self.ffn_keep:.0%}")
        if self.head_prune:
            parts.append(f"heads -{self.head_prune:.0%}")
        return ", ".join(parts + [self.precision] * precision)

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "ffn_keep": self.ffn_keep, "head_prune": self.head_prune,
                "precision": self.precision}

    @classmethod
    def of(cls, row: dict[str, Any]) -> Shape:
        """The shape a plan's row (or any mapping with the four fields) describes."""
        return cls(row["layers"], row["ffn_keep"], row["head_prune"], row["precision"])


def prune_axes(teacher: torch.nn.Module) -> tuple[bool, bool, str | None]:
    """Whether kdcode can prune the teacher's heads and its MLP channels, and a line for what it cannot."""
    ok = []
    for heads, ffn in ((0.5, 0.0), (0.0, 0.5)):
        try:
            pruner_for(teacher, heads, ffn)
            ok.append(True)
        except KdcodeError:
            ok.append(False)
    kind = getattr(teacher.config, "model_type", "?")
    if all(ok):
        return True, True, None
    what = "depth and precision" if not any(ok) else ("depth, precision and MLP width" if ok[1] else
                                                      "depth, precision and heads")
    return ok[0], ok[1], (f"the teacher's family ({kind}) cannot be pruned by kdcode in every way (GPT-2 and "
                          f"Llama-style blocks): {what} are searched")


def to_precision(model: torch.nn.Module, precision: str, calibration: torch.Tensor) -> torch.nn.Module:
    """``model`` (float32) converted in place to a runtime precision as `kdcode compress` writes it (int8: the
    scheme compress's ``auto`` takes on this CPU, its migration and float channels measured on ``calibration``)."""
    how = PRECISIONS[precision]
    if how.get("int8"):
        c = CompressSpec()  # compress's own calibration defaults: its batches x batch size, its alpha
        int8_in_place(model, str(how["int8_scheme"]), lambda: calibration[: c.calib_batches * c.calib_batch_size],
                      c.calib_batch_size, c.smooth_alpha, {})
    elif how.get("dtype") == "bf16":
        model.to(torch.bfloat16)
    return model.eval()


def fixed_prune(model: torch.nn.Module, shape: Shape) -> torch.nn.Module:
    """Remove units as the pruner would, without scores (the first ones by index): for timing only."""
    heads, ffn = shape.head_prune, 1.0 - shape.ffn_keep
    if not (heads or ffn):
        return model
    pruner = pruner_for(model, heads, ffn)
    units = pruner.units()
    n = int(model.config.num_hidden_layers)
    rank = lambda k: torch.arange(k, 0, -1, dtype=torch.float32)  # noqa: E731 - descending: the first units win
    keep_heads = [pruner.keep_heads(rank(units["heads"]), heads) for _ in range(n)] if heads else None
    keep_ffn = [pruner.keep_ffn(rank(units["ffn"]), ffn) for _ in range(n)] if ffn else None
    return pruner.apply(keep_heads, keep_ffn)


def timing_model(teacher: torch.nn.Module, shape: Shape) -> torch.nn.Module:
    """A model of ``shape`` with random weights, in its runtime precision."""
    n_teacher = int(teacher.config.num_hidden_layers)
    torch.manual_seed(0)
    model = new_model(student_config(teacher, evenly_spaced(n_teacher, shape.layers)))
    # speed does not depend on the weights: the int8 schemes' calibration runs on random tokens
    tokens = torch.randint(0, int(model.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(0))
    return to_precision(fixed_prune(model, shape), shape.precision, tokens)


def footprint(model: torch.nn.Module) -> dict[str, float]:
    """Parameters (millions) and weight bytes in memory (MB) of a model as it runs."""
    return {"params_m": round(count_params(model) / 1e6, 3), "size_mb": round(memory_bytes(model) / 1e6, 3)}
