"""KD strategies, one file each, registered lazily (importing this package imports no torch)."""

from kdcode.registry import Registry

STRATEGIES: Registry = Registry("strategy", group="kdcode.strategies")
STRATEGIES.register("pretraining", "kdcode.strategies.pretraining:PretrainingKD")
STRATEGIES.register("in-training", "kdcode.strategies.in_training:InTrainingKD")
STRATEGIES.register("hard-only", "kdcode.strategies.hard_only:HardOnly")
STRATEGIES.register("jsd", "kdcode.strategies.jsd:JSDKD")
STRATEGIES.register("intermediate", "kdcode.strategies.intermediate:IntermediateKD")
