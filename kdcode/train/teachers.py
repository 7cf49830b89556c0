"""Where a step's teacher outputs come from: nowhere, a frozen teacher, a teacher-logit cache, or a teacher
that trains alongside the student (in-training KD). The loop asks the same four questions of each."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from kdcode.errors import KdcodeError
from kdcode.train.optim import make_optimizer


class TeacherSource:
    """No teacher (hard-only): outputs are None and nothing is trained."""

    trained = False

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.model = model  # what the strategy's setup sees (None for a cache)

    def wrap(self, accelerator: Any, world: int) -> None:
        """Data parallel: wrap what learns (a frozen teacher is just a replica on every process)."""

    def no_sync(self, accelerator: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def outputs(self, x: torch.Tensor, part: torch.Tensor, fwd: dict[str, bool]) -> Any:
        return None

    def extra_terms(self, strategy: Any, t_out: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def backward(self, terms: dict[str, torch.Tensor], scaler: Any, grad_accum: int) -> None:
        pass

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return []


class FrozenTeacher(TeacherSource):
    """A live teacher in eval mode, run without gradients (pre-training KD)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__(model.to(device).eval().requires_grad_(False))

    def outputs(self, x: torch.Tensor, part: torch.Tensor, fwd: dict[str, bool]) -> Any:
        with torch.no_grad():
            return self.model(x, **fwd)


class CachedTeacher(TeacherSource):
    """Top-k soft targets read from a teacher-logit cache instead of a forward pass."""

    def __init__(self, cache: Any, device: torch.device) -> None:
        super().__init__(None)
        self.cache, self.device = cache, device

    def outputs(self, x: torch.Tensor, part: torch.Tensor, fwd: dict[str, bool]) -> Any:
        return self.cache.targets(part).to(self.device)


class TrainedTeacher(TeacherSource):
    """In-training KD: the teacher trains on its own hard loss in the same step, with its own optimiser."""

    trained = True

    def __init__(self, model: torch.nn.Module, device: torch.device, lr: float, weight_decay: float) -> None:
        super().__init__(model.to(device).train())
        self.optimizer = make_optimizer(self.model, lr, weight_decay)
        self.wrapped: Any = self.model

    def wrap(self, accelerator: Any, world: int) -> None:
        if world > 1:
            self.wrapped = accelerator.prepare_model(self.model)

    def no_sync(self, accelerator: Any) -> contextlib.AbstractContextManager:
        return accelerator.no_sync(self.wrapped) if self.wrapped is not self.model else contextlib.nullcontext()

    def outputs(self, x: torch.Tensor, part: torch.Tensor, fwd: dict[str, bool]) -> Any:
        return self.wrapped(x, **fwd)

    def extra_terms(self, strategy: Any, t_out: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher_hard": strategy.teacher_loss(t_out, x)}

    def backward(self, terms: dict[str, torch.Tensor], scaler: Any, grad_accum: int) -> None:
        scaler.scale(terms["teacher_hard"] / grad_accum).backward()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"teacher": self.optimizer}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.model}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())


def teacher_source(
    strategy: Any, teacher: torch.nn.Module | None, cache: Any, cfg: Any, device: torch.device
) -> TeacherSource:
    """The source a strategy needs, given a live teacher and/or a cache."""
    if cache is not None:
        if not strategy.supports_cache:
            raise KdcodeError(f"strategy {strategy.name!r} cannot train from a teacher cache; drop --teacher-cache")
        return CachedTeacher(cache, device)
    if not strategy.needs_teacher:
        return TeacherSource(teacher)
    if teacher is None:
        raise KdcodeError(f"strategy {strategy.name!r} needs a teacher")
    if strategy.needs_teacher_grad:
        return TrainedTeacher(teacher, device, cfg.teacher_lr or cfg.lr / 10, cfg.weight_decay)
    return FrozenTeacher(teacher, device)
