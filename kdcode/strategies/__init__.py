"""KD strategies, one file each, registered lazily (importing this package imports no torch).

Each name below is the strategy's only name: the registry gives it to the class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcode.registry import Registry

if TYPE_CHECKING:
    from kdcode.strategies.base import Strategy

STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy", base="kdcode.strategies.base:Strategy", group="kdcode.strategies"
)
STRATEGIES.register("reverse-kl", "kdcode.strategies.reverse_kl:ReverseKL")
STRATEGIES.register("pretraining", "kdcode.strategies.pretraining:PretrainingKD")
STRATEGIES.register("in-training", "kdcode.strategies.in_training:InTrainingKD")
STRATEGIES.register("hard-only", "kdcode.strategies.hard_only:HardOnly")
STRATEGIES.register("jsd", "kdcode.strategies.jsd:JSDKD")
STRATEGIES.register("intermediate", "kdcode.strategies.intermediate:IntermediateKD")
STRATEGIES.register("tvd", "kdcode.strategies.tvd:TVDKD")
