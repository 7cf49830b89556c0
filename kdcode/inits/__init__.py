"""Student-initialisation schemes, one file each, registered lazily."""

from kdcode.registry import Registry

INITS: Registry = Registry("init", group="kdcode.inits")
INITS.register("alternate", "kdcode.inits.layer_copy:Alternate")
INITS.register("spread", "kdcode.inits.layer_copy:Spread")
INITS.register("random", "kdcode.inits.random_init:RandomInit")
