"""The contracts of student-initialisation schemes, and the weight surgery they share.

:class:`Init` builds a student with ``layers`` transformer blocks from a teacher, any way it likes, and
returns the layer map it used (student block i <- teacher block map[i]; None where nothing was copied).
:class:`LayerCopyInit` is the common kind: it selects teacher blocks and copies them. Works for any
Hugging Face causal LM whose blocks sit in one ModuleList (GPT-2 ``transformer.h``, Llama-style
``model.layers``, GPT-NeoX ``gpt_neox.layers``, ...). A scheme's name is the one it is registered under.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM

from kdcode.errors import KdcodeError

BLOCK_PATHS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")


class InitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    copy_embeddings: bool = True


def block_path(model: torch.nn.Module) -> str:
    """Dotted path of the ModuleList that holds the transformer blocks."""
    for path in BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return path
    # Any other layout (biogpt.layers, bert.encoder.layer, ...): the one ModuleList as long as the model is deep.
    depth = getattr(model.config, "num_hidden_layers", None)
    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth]
    if len(found) == 1:
        return found[0]
    raise KdcodeError(
        f"cannot find the transformer blocks of {type(model).__name__} (looked for {', '.join(BLOCK_PATHS)}); "
        "this architecture is not supported for layer-copy inits yet, use --init random"
    )


def n_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def evenly_spaced(n_teacher: int, layers: int) -> list[int]:
    """Evenly spaced teacher blocks keeping the first and the last (12 -> 6: [0, 2, 4, 7, 9, 11])."""
    if layers == 1:
        return [0]
    return [math.floor(i * (n_teacher - 1) / (layers - 1) + 0.5) for i in range(layers)]


# Lists in configs that are never per-layer, whatever their length (token ids, class names, labels).
_NOT_PER_LAYER = ("token", "architectures", "label", "words")
# Names of lists that name layers by index (``mlp_only_layers``, ``moe_layers``, ``full_attn_idxs``).
_INDEX_WORDS = ("layer", "idx", "indices")


def _is_layer_index_list(key: str, value: Any, n_teacher: int) -> bool:
    """A list naming some layers by index (e.g. ``mlp_only_layers: [0, 3]``, ``moe_layers: [0, 1, 2, 3]``), not one
    entry per layer: increasing distinct layer numbers under an index-like name."""
    return (
        any(w in key for w in _INDEX_WORDS)
        and isinstance(value, (list, tuple))
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(0 <= v < n_teacher for v in value)
        and list(value) == sorted(set(value))
    )


def reindex_per_layer_fields(config: Any, n_teacher: int, layer_map: list[int]) -> list[str]:
    """Re-index every per-layer field of ``config`` by ``layer_map``, in place; returns the fields changed.

    A field is per-layer when it is a list or tuple whose length is the teacher's depth (``layer_types``,
    sliding-window patterns, per-layer rope or MoE settings, ...): student block i takes entry
    ``layer_map[i]``, so a block copied from teacher layer j keeps layer j's type. A list of layer indices
    (``mlp_only_layers: [0, 3]``, ``moe_layers: [0, 1, 2, 3]``: increasing layer numbers under an index-like name,
    whatever its length) keeps the student blocks whose teacher block it names. Found generically, not by name;
    a layer-like field of another shape is refused (it cannot be mapped).
    """
    changed = []
    for key, listed in sorted(config.to_dict().items()):
        value = getattr(config, key, listed)  # as the config holds it (to_dict gives lists for tuples)
        if not isinstance(value, (list, tuple)) or any(w in key for w in _NOT_PER_LAYER) or n_teacher < 2:
            continue
        if value and _is_layer_index_list(key, value, n_teacher):
            named = set(value)
            setattr(config, key, type(value)(i for i, j in enumerate(layer_map) if j in named))
            changed.append(key)
        elif len(value) == n_teacher:
            setattr(config, key, type(value)(value[j] for j in layer_map))
            changed.append(key)
        elif "layer" in key and value and any(isinstance(v, (list, tuple, dict)) for v in value):
            raise KdcodeError(
                f"the teacher's config field {key!r} looks per-layer but has {len(value)} entries for "
                f"{n_teacher} layers; kdcode cannot map it to the student (please report the model)"
            )
    return changed


def student_config(
    teacher: torch.nn.Module,
    layer_map: list[int | None],
    hidden_size: int | None = None,
    heads: int | None = None,
) -> Any:
    """The teacher's config with ``len(layer_map)`` blocks, every per-layer field re-indexed by the layer map
    (blocks that copy nothing take the evenly spaced map's entries), and optionally another width / heads."""
    config = copy.deepcopy(teacher.config)
    n_teacher, layers = int(config.num_hidden_layers), len(layer_map)
    spaced = evenly_spaced(n_teacher, layers)
    reindex_per_layer_fields(config, n_teacher, [j if j is not None else spaced[i] for i, j in enumerate(layer_map)])
    config.num_hidden_layers = layers
    if hidden_size is not None:
        config.hidden_size = hidden_size
    if heads is not None:
        config.num_attention_heads = heads
    if config.hidden_size % config.num_attention_heads:
        raise KdcodeError(
            f"student hidden size {config.hidden_size} is not a multiple of its {config.num_attention_heads} heads; "
            "set --hidden-size and --heads to fit"
        )
    return config


def calibration_sample(blocks: Any, seed: int, n: int = 256) -> Any:
    """Up to ``n`` training blocks in a fixed random order: what an init measures the teacher on."""
    g = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(len(blocks), generator=g)[:n]]


def new_model(config: Any) -> torch.nn.Module:
    """A model of ``config`` with float32 weights, whatever dtype the teacher is stored in: the optimiser's
    updates need them (bf16/fp16 compute is autocast's job)."""
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def copy_weights(
    student: torch.nn.Module, teacher: torch.nn.Module, layer_map: list[int | None], copy_embeddings: bool
) -> None:
    """Copy teacher block layer_map[i] into student block i, and (optionally) every non-block weight."""
    path = block_path(teacher)
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    new_state = {}
    unfit: list[str] = []
    for key, value in s_state.items():
        m = pattern.match(key)
        if m:
            src_layer = layer_map[int(m.group(1))]
            if src_layer is None:
                continue
            src = f"{path}.{src_layer}.{m.group(2)}"
        elif copy_embeddings:
            src = key
        else:
            continue
        if src in t_state and t_state[src].shape == value.shape:
            new_state[key] = t_state[src].clone()
        else:
            unfit.append(src)
    if unfit:
        kind = getattr(teacher.config, "model_type", "?")
        raise KdcodeError(
            f"cannot copy the teacher's {unfit[0]} into the student ({len(unfit)} tensors missing or of another "
            "shape: a head-pruned or int8 teacher from kdcode compress?); distil from its float, unpruned parent "
            f"or use --init random (a plain {kind} teacher: a per-layer setting kdcode cannot map; please report it)"
        )
    student.load_state_dict(new_state, strict=False)
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()


class Init:
    """A student-init scheme: ``build(teacher, layers) -> (student, layer_map)``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[InitParams]] = InitParams
    #: False for inits that copy teacher blocks (they need the teacher's width)
    allows_width_change: ClassVar[bool] = False
    #: True for inits that measure the teacher on calibration blocks (:meth:`prepare`) before :meth:`build`
    needs_calibration: ClassVar[bool] = False

    def __init__(self, params: InitParams | None = None, **kwargs: Any) -> None:
        self.params = params if params is not None else self.Params(**kwargs)
        self.origin: dict[str, Any] | None = None  # a checkpoint the student starts from, as a manifest names it

    def build(
        self,
        teacher: torch.nn.Module,
        layers: int,
        hidden_size: int | None = None,
        heads: int | None = None,
        tokenizer: Any = None,
    ) -> tuple[torch.nn.Module, list[int | None]]:
        """A student with ``layers`` blocks and the map of the teacher blocks it was made from."""
        raise NotImplementedError

    def prepare(self, teacher: torch.nn.Module, calibration: torch.Tensor, layers: int) -> None:
        """Measure what the scheme needs on ``calibration`` (token blocks of the training data) before
        :meth:`build`; called by distil when :attr:`needs_calibration` is set. Records go to ``self.origin``."""


class LayerCopyInit(Init):
    """Copy the teacher blocks :meth:`select` names (and, unless told otherwise, embeddings, final norm, LM head)."""

    def select(self, n_teacher: int, layers: int) -> list[int | None]:
        """The teacher block for each student block (None: leave it as initialised)."""
        raise NotImplementedError

    def check(self, n_teacher: int, layers: int) -> None:
        if not 1 <= layers <= n_teacher:
            raise KdcodeError(
                f"student.layers={layers} is outside 1..{n_teacher} (the teacher's depth); pick a smaller --layers"
            )

    def build(
        self,
        teacher: torch.nn.Module,
        layers: int,
        hidden_size: int | None = None,
        heads: int | None = None,
        tokenizer: Any = None,
    ) -> tuple[torch.nn.Module, list[int | None]]:
        n_teacher = n_layers(teacher)
        self.check(n_teacher, layers)
        narrower = (hidden_size not in (None, teacher.config.hidden_size)) or (
            heads not in (None, teacher.config.num_attention_heads))
        if narrower and not self.allows_width_change:
            raise KdcodeError(
                f"init {self.name!r} copies teacher blocks, so the student keeps the teacher's width and heads; "
                "use --init random (or pretrained) for a narrower student"
            )
        layer_map = self.select(n_teacher, layers)
        student = new_model(student_config(teacher, layer_map, hidden_size, heads))
        copy_weights(student, teacher, layer_map, self.params.copy_embeddings and not narrower)
        return student, layer_map
