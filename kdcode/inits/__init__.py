"""Student-initialisation schemes, one file each, registered lazily (names written here only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcode.registry import Registry

if TYPE_CHECKING:
    from kdcode.inits.base import Init

INITS: Registry[type[Init]] = Registry("init", base="kdcode.inits.base:Init", group="kdcode.inits")
INITS.register("alternate", "kdcode.inits.layer_copy:Alternate")
INITS.register("spread", "kdcode.inits.layer_copy:Spread")
INITS.register("random", "kdcode.inits.random_init:RandomInit")
INITS.register("first", "kdcode.inits.layer_copy:First")
INITS.register("last", "kdcode.inits.layer_copy:Last")
INITS.register("layers", "kdcode.inits.layer_copy:Explicit")
INITS.register("pretrained", "kdcode.inits.pretrained:Pretrained")
INITS.register("measured", "kdcode.inits.measured:Measured")
INITS.register("auto", "kdcode.inits.measured:Auto")
