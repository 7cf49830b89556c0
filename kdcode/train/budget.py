"""How long a run trains and how each step's batch is split: the budget the loop and its progress follow."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kdcode.errors import KdcodeError


@dataclass(frozen=True)
class Budget:
    """``batch`` blocks per optimiser step, split over ``world`` processes x ``grad_accum`` micro-batches of
    ``micro`` blocks; training ends at ``total_steps`` or after ``max_seconds``, whichever comes first."""

    batch: int
    micro: int
    world: int
    grad_accum: int
    total_steps: int | None
    max_seconds: float | None

    @classmethod
    def plan(cls, cfg: Any, n_blocks: int, world: int = 1) -> Budget:
        """The budget of a :class:`~kdcode.spec.TrainSpec` over ``n_blocks`` training blocks."""
        batch = min(cfg.batch_size, n_blocks)
        shards = world * cfg.grad_accum
        if batch % shards:
            raise KdcodeError(
                f"batch_size {batch} must split evenly over {world} process(es) x {cfg.grad_accum} accumulation steps"
            )
        steps_per_epoch = math.ceil(n_blocks / batch)
        limits = [s for s in (cfg.max_steps, cfg.epochs and math.ceil(cfg.epochs * steps_per_epoch)) if s]
        return cls(
            batch=batch,
            micro=batch // shards,
            world=world,
            grad_accum=cfg.grad_accum,
            total_steps=min(limits) if limits else None,
            max_seconds=cfg.max_minutes * 60 if cfg.max_minutes else None,
        )

    def done(self, step: int, elapsed: float) -> bool:
        return (self.total_steps is not None and step >= self.total_steps) or bool(
            self.max_seconds and elapsed >= self.max_seconds
        )

    def progress(self, step: int, elapsed: float) -> float:
        """How far the run is, 0..1, by whichever budget binds first (the LR schedule follows it)."""
        by_steps = step / self.total_steps if self.total_steps else 0.0
        by_time = elapsed / self.max_seconds if self.max_seconds else 0.0
        return max(by_steps, by_time)

    def eta(self, step: int, elapsed: float, seconds_per_step: float) -> float | None:
        """Seconds left by the binding budget (None before the first step's timing is known)."""
        left = []
        if self.total_steps is not None and seconds_per_step > 0:
            left.append((self.total_steps - step) * seconds_per_step)
        if self.max_seconds:
            left.append(self.max_seconds - elapsed)
        return max(0.0, min(left)) if left else None

    def micro_batches(self, index: Any, rank: int) -> Iterator[tuple[int, Any]]:
        """This process's share of each micro-batch of ``index``: (micro-batch number, block indices)."""
        for a in range(self.grad_accum):
            start = (a * self.world + rank) * self.micro
            yield a, index[start : start + self.micro]
