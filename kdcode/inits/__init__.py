"""Student-initialisation schemes, one file each, registered lazily."""

from kdcode.registry import Registry

INITS: Registry = Registry("init", group="kdcode.inits")
INITS.register("alternate", "kdcode.inits.layer_copy:Alternate")
INITS.register("spread", "kdcode.inits.layer_copy:Spread")
INITS.register("random", "kdcode.inits.random_init:RandomInit")
INITS.register("first", "kdcode.inits.layer_copy:First")
INITS.register("last", "kdcode.inits.layer_copy:Last")
INITS.register("layers", "kdcode.inits.layer_copy:Explicit")
INITS.register("pretrained", "kdcode.inits.pretrained:Pretrained")
