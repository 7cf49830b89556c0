"""Run specifications: pydantic models, every one ``extra="forbid"``.

A RunSpec is read from YAML/JSON, overridden by CLI flags, validated here before anything heavy is
loaded, and stored whole in the student's manifest. Strategy and init params are free-form here and
validated against the plugin's own ``Params`` model by ``kdcode.plugins.validate_plugins``.
This module imports neither torch nor any plugin.
"""

from __future__ import annotations

import difflib
import json
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from kdcode.errors import KdcodeDeprecation, KdcodeError
from kdcode.spec_base import DeviceName, _Spec
from kdcode.spec_latency import LatencySpec, Precision

BUNDLED = "bundled"
TEACHER_HELP = "teacher: 'bundled', a HF id, a local folder, FILE.gguf, ollama:NAME[:TAG] or smollm2"
CONTEXT_HELP = "prompt tokens kept (default: min(the model's positions, 1024) minus the new tokens)"


class LoadSpec(_Spec):
    """What loading a model may do beyond reading safetensors (off unless asked)."""

    trust_remote_code: bool = Field(False, description="run the model repo's own Python code (only if you trust it)")
    allow_pickle: bool = Field(False, description="load pickle weights (pytorch_model.bin), which can run code")


class TeacherSpec(LoadSpec):
    """Which model teaches: ``bundled``, a Hugging Face id, or a local folder."""

    name: str = Field(BUNDLED, description=TEACHER_HELP)
    revision: str | None = Field(None, description="hub revision (commit, branch, tag)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="hold the frozen teacher in this dtype (auto: as its weights are stored)"
    )


class PluginSpec(_Spec):
    """A pluggable choice by registry name, with its own params (validated against the plugin's ``Params``)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data  # `init: spread` is `init: {name: spread}`


class StrategySpec(PluginSpec):
    """KD strategy (see `kdcode list`)."""

    name: str = Field("reverse-kl", description="KD strategy (see `kdcode list`)")


class InitSpec(PluginSpec):
    """Student-init scheme (see `kdcode list`)."""

    name: str = Field("auto", description="student init scheme (see `kdcode list`)")


class StudentSpec(_Spec):
    """Shape of the student and how its weights start."""

    layers: int = Field(6, ge=1, description="number of transformer blocks")
    init: InitSpec = Field(default_factory=InitSpec)
    hidden_size: int | None = Field(None, ge=8, description="narrower student (random/pretrained init only)")
    heads: int | None = Field(None, ge=1, description="attention heads of a narrower student")
    prune_heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of each block's attention heads removed at "
                               "init, by importance on calibration blocks (as kdcode compress prunes)")
    prune_ffn: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of each block's MLP channels removed at init")
    runtime: Precision = Field("fp32", description="also write the trained student in this runtime precision, to "
                               "OUT-<precision> (kdcode compress): bf16, int8 (compress's auto scheme), "
                               "int8-weight-only or int8-per-token")

    @model_validator(mode="before")
    @classmethod
    def _old_init_params(cls, data: Any) -> Any:
        """``init: NAME`` + ``init_params: {...}`` (kdcode <= 0.1.0) still load, as ``init: {name, params}``."""
        if not isinstance(data, dict) or "init_params" not in data:
            return data
        data = dict(data)
        params = data.pop("init_params") or {}
        init = data.get("init", InitSpec().name)
        init = {"name": init} if isinstance(init, str) else dict(init or {})
        init["params"] = {**params, **(init.get("params") or {})}
        data["init"] = init
        warnings.warn(
            "student.init_params is deprecated: write student.init as {name: ..., params: {...}}",
            KdcodeDeprecation,
            stacklevel=2,
        )
        return data


FimFormatName = Literal["starcoder", "qwen", "codellama", "deepseek"]  # the keys of kdcode.models.fim_tokens.FORMATS
FIM_FORMATS: tuple[str, ...] = typing.get_args(FimFormatName)
# order of an infilling prompt: prefix-suffix-middle, suffix-prefix-middle, or as the model was trained
# (kdcode.models.fim_tokens.infill_order)
FimOrderName = Literal["auto", "psm", "spm"]


class FimSpec(_Spec):
    """Fill-in-the-middle training (Bavarian et al. 2022): a piece of a document (what of it one training block
    holds) is split at two random points into prefix, middle and suffix and trained as PSM
    (``<pre> prefix <suf> suffix <mid> middle``) or SPM (``<pre> <suf> suffix <mid> prefix middle``). Seeded per
    block, so a teacher cache and a live teacher see the same blocks."""

    rate: float = Field(0.5, ge=0.0, le=1.0, description="fraction of pieces rearranged (0: FIM off)")
    spm_rate: float = Field(0.5, ge=0.0, le=1.0, description="fraction of the rearranged pieces in SPM order")
    mode: Literal["document", "line"] = Field(
        "document", description="document: two random characters; line: the middle is one whole non-blank line"
    )
    format: FimFormatName | None = Field(
        None, description="FIM token names (fim_format; default: the tokenizer's, StarCoder's added if it has none)"
    )
    seed: int = Field(0, ge=0, description="seed of the split points (with the block index)")


class DataSpec(_Spec):
    """Where the code comes from and how it is split (by a hash of each file's path)."""

    source: str = Field("stdlib", description="'stdlib', a folder, a .jsonl file, or a HF dataset id")
    revision: str | None = Field(None, description="hub dataset revision (commit, branch or tag); default main")
    glob: str = Field("**/*.py", description="file pattern inside a data folder")
    format: Literal["raw", "py150"] = Field("raw", description="raw or py150")
    field: str = Field("code", description="text field of .jsonl / HF dataset records")
    valid_fraction: float = Field(0.02, ge=0.0, lt=0.5, description="share of files in the valid split (hash split)")
    test_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="share of files in the test split (hash split)")
    max_files: int | None = Field(None, ge=1)
    exclude_tests: bool = Field(True, description="skip the test/ and tests/ folders of the stdlib corpus")
    max_file_bytes: int = Field(
        8 * 2**20, ge=1, description="skip (and count) files and records larger than this; memory stays bounded"
    )
    max_line_chars: int = Field(
        20_000, ge=1, description="skip (and count) source files with a longer line (generated data, not code)"
    )
    fim: FimSpec | None = Field(
        None, description="fill-in-the-middle training blocks (null: off; distil: as its teacher was trained)"
    )


class TrainSpec(_Spec):
    """Optimisation budget and settings for the training loop."""

    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    epochs: float | None = Field(None, gt=0, description="stop after this many passes over the train split")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget; the LR schedule follows it")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (1e-3: the gap ablation, docs/ablation.md)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    batch_size: int = Field(16, ge=1, description="blocks per step")
    block_size: int = Field(256, ge=8, description="tokens per block")
    seed: int = Field(0, description="random seed")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="autocast dtype (fp16: CUDA)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step (batch_size is the global batch)")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="LR decay after warmup")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch")
    eval_every: int = Field(200, ge=1, description="held-out loss every N steps")
    eval_batches: int = Field(20, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint into OUT.ckpt every N steps")
    tensorboard: bool = Field(False, description="also log to OUT.tensorboard (needs the tensorboard package)")
    teacher_lr: float | None = Field(None, gt=0, description="in-training KD: teacher LR (default: lr / 10)")
    activation_checkpointing: bool = Field(
        False, description="recompute each student block's activations in the backward instead of keeping them "
        "(gradient checkpointing): about a third more student compute for a fraction of its activation memory"
    )
    loss_chunk: int | None = Field(
        None, ge=0, description="sequence positions per chunk of the fused KD loss (default: chunks of ~32 MB of "
        "float32; 0: one pass, the fastest when memory allows)"
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSpec:
        if self.max_steps is None and self.epochs is None and self.max_minutes is None:
            raise ValueError("set a budget: max_steps, epochs or max_minutes")
        return self


class RunSpec(_Spec):
    """Everything one `kdcode distil` run needs; stored whole in the student's manifest."""

    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(**DEFAULT_DISTIL_BUDGET))
    teacher_cache: str | None = Field(None, description="train from this teacher-logit cache (kdcode cache-teacher)")
    latency: LatencySpec | None = Field(None, description="choose the student's shape by this latency budget, "
                                        "measured on this machine (kdcode plan); replaces student.layers")
    out: str = Field("student", description="student folder to write")


# The default distillation finishes in at most 15 minutes on a 2-core laptop-class CPU: issue 20's ablation showed
# that twice the steps pay (+2.7 ES, 3.6 paired SE), and allowed 15 minutes (issue 3 had 10).
DEFAULT_DISTIL_BUDGET: dict[str, Any] = {"max_steps": 800, "max_minutes": 15.0}
BUDGET_KEYS = ("max_steps", "epochs", "max_minutes")


def _with_budget(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``data`` whose train section has ``defaults`` under it, less their budget keys when a budget is given: a
    default budget applies only when no budget key was given."""
    train = dict(data.get("train") or {})
    given = any(train.get(k) is not None for k in BUDGET_KEYS)
    base = {k: v for k, v in defaults.items() if not (given and k in BUDGET_KEYS)}
    return {**data, "train": {**base, **train}}


def resolve_run_spec(file_data: dict[str, Any], overrides: dict[str, Any], where: str) -> RunSpec:
    """File, then CLI flags on top; the default budget applies only when no budget key was given."""
    return build_spec(RunSpec, _with_budget(apply_overrides(file_data, overrides), DEFAULT_DISTIL_BUDGET), where)


class PlanSpec(_Spec):
    """`kdcode plan`: the candidate table for a teacher and a latency budget, without training."""

    teacher: str = Field(BUNDLED, description=TEACHER_HELP)
    latency: LatencySpec
    data: DataSpec = Field(default_factory=DataSpec)
    block_size: int = Field(256, ge=8, description="token block of the calibration and held-out blocks")
    seed: int = 0


def _known_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the section that ``loc`` (minus its last part) points at inside ``model``."""
    cls: Any = model
    for part in loc[:-1]:
        fields = getattr(cls, "model_fields", None) if isinstance(cls, type) else None
        if not fields or part not in fields:
            return []
        cls = fields[part].annotation
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _renamed(loc: str, names: dict[str, str]) -> str:
    """``loc`` with its longest prefix that ``names`` knows replaced (``latency.ffn_keep.1`` -> ``--ffn-keep.1``)."""
    parts = loc.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in names:
            return ".".join([names[head], *parts[i:]])
    return loc


def format_validation_error(exc: ValidationError, where: str, model: type[BaseModel] | None = None,
                            names: dict[str, str] | None = None) -> str:
    """One line per problem: the dotted field (or its name in ``names``: a flag), what is wrong (with a
    did-you-mean for unknown keys)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        loc = _renamed(loc, names or {})
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
            close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(model, err["loc"]), n=2, cutoff=0.6)
            if close:
                msg += ", did you mean " + " or ".join(repr(c) for c in close) + "?"
        parts.append(f"{loc}: {msg}")
    return f"invalid spec in {where}: " + "; ".join(parts)


def read_spec_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdcodeError(f"spec file {path} does not exist; pass an existing .yaml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise KdcodeError(f"spec file {path} is not valid YAML/JSON: {exc}".splitlines()[0]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdcodeError(f"spec file {path} must hold a mapping of sections (teacher, student, ...)")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys (``student.layers``) and nested mappings alike, as one nested mapping."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = nest(value)
        *parents, leaf = str(key).split(".")
        branch: dict[str, Any] = {}
        node = branch
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        nested = deep_merge(nested, branch)
    return nested


def _plugin_name(section: Any, default: str) -> str:
    if isinstance(section, str):
        return section
    return (section or {}).get("name", default) if isinstance(section, dict) else default


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` (dotted or nested) on top. A strategy or init whose name an override changes
    starts from its own default params, unless the override gives params too: one plugin's rarely fit another."""
    base = nest(base)
    nested = nest(overrides)
    merged = deep_merge(base, nested)
    for path, default in ((("strategy",), StrategySpec().name), (("student", "init"), InitSpec().name)):
        old, new, out = base, nested, merged
        for part in path[:-1]:
            old, new, out = (old.get(part) or {}), (new.get(part) or {}), out.get(part, {})
        key = path[-1]
        if key not in new or not isinstance(out, dict):
            continue
        changed = _plugin_name(new[key], default) != _plugin_name(old.get(key), default)
        gives_params = isinstance(new[key], dict) and "params" in new[key]
        if changed and not gives_params:
            out[key] = {"name": _plugin_name(new[key], default)}
    return merged


def build_spec(model: type[_Spec], data: dict[str, Any], where: str, names: dict[str, str] | None = None) -> Any:
    """``data`` validated as ``model``, or one KdcodeError line naming each field at fault (by ``names``, where a
    field has another name there: its flag)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KdcodeError(format_validation_error(exc, where, model, names)) from exc


def dump_yaml(spec: BaseModel) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


DtypeName = Literal["auto", "fp32", "fp16", "bf16"]
# Where a model runs (kdcode.inference.backends): "auto" picks by what the path is (a .gguf file: llama.cpp, a
# folder with model.onnx: onnxruntime, else torch).
BackendName = Literal["auto", "torch", "onnxruntime", "llama.cpp"]
KvCacheName = Literal["dynamic", "static"]


class RuntimeSpec(_Spec):
    """How a model runs for eval / bench / complete / serve: the backend, and torch's decode path."""

    backend: BackendName = Field("auto", description="auto (a .gguf file: llama.cpp, an ONNX export folder: "
                                 "onnxruntime, else torch), torch, onnxruntime or llama.cpp")
    kv_cache: KvCacheName = Field("dynamic", description="torch: dynamic (grows each step) or static (allocated once "
                                  "at the model's context)")
    compile: bool = Field(False, description="torch: torch.compile the decode step (static KV cache)")

    @model_validator(mode="after")
    def _torch_only(self) -> RuntimeSpec:
        if self.backend in ("onnxruntime", "llama.cpp") and (self.compile or self.kv_cache != "dynamic"):
            raise ValueError(f"--compile and --kv-cache are torch options; the {self.backend} backend has its own")
        return self


class _RunsOn(_Spec):
    """Where and how a measured or served model runs (the fields eval, bench, complete and serve share)."""

    device: DeviceName = "auto"
    dtype: DtypeName = Field("auto", description="auto (as the model's config says), fp32, fp16 or bf16")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch")


class _FimPrompt(_Spec):
    """How an infilling prompt is written for the model (eval --task infill, complete, serve)."""

    fim_format: FimFormatName | None = Field(
        None, description="the model's FIM token names: starcoder, qwen, codellama or deepseek (default: detected "
        "from its tokenizer)"
    )
    fim_order: FimOrderName = Field("auto", description="infilling prompt order: psm, spm, or auto (as the model "
                                    "was trained)")


class EvalSpec(_RunsOn, _FimPrompt):
    """`kdcode eval`: line-level completion (or single-line infilling) on held-out files, and perplexity on
    held-out blocks."""

    data: DataSpec = Field(default_factory=DataSpec)
    task: Literal["line", "infill"] = Field(
        "line", description="line: complete a line from the code before it; infill: fill a removed line from the "
        "code before and after it (prefix-only completion of the same holes reported beside it)"
    )
    split: Literal["test", "valid", "train", "all"] = Field(
        "test", description="test, valid, train, or all (every file of the data)")
    lines: str | None = Field(
        None,
        description="a completion set: a {id,input,gt} or {code} .jsonl/.json file, or a CodeXGLUE "
        "code-completion dataset id (NAME[:CONFIG])",
    )
    samples: int = Field(500, ge=1, description="completions to score")
    seed: int = Field(0, description="seed of the sample draw")
    beams: int = Field(1, ge=1, description="1 = greedy; >1 = beam search")
    max_new_tokens: int = Field(48, ge=1, le=1000, description="longest completion in tokens")
    context_tokens: int | None = Field(None, ge=1, description=CONTEXT_HELP)
    batch_size: int = Field(8, ge=1, description="prompts decoded together (greedy)")
    heal: bool | None = Field(None, description="token healing (default: on for raw code, off for py150)")
    ppl_blocks: int = Field(64, ge=0, description="held-out blocks for perplexity (0 skips it)")
    token_level: bool | None = Field(
        None, description="token-level accuracy (CodeXGLUE CodeCompletion-token; default: on for py150 data)"
    )
    token_blocks: int = Field(64, ge=1, description="held-out blocks scored for token-level accuracy")


class BenchSpec(_RunsOn):
    """`kdcode bench`: size, memory and speed of a model on a fixed completion set."""

    data: DataSpec = Field(default_factory=DataSpec)
    prompts: int = Field(16, ge=1, description="timed completions per round")
    rounds: int = Field(5, ge=1, description="interleaved rounds (A B, B A, ...): medians with their range")
    warmup: int = Field(2, ge=0, description="untimed completions first")
    new_tokens: int = Field(16, ge=1, description="tokens generated per completion (no early stop)")
    context_tokens: int | None = Field(None, ge=1, description=CONTEXT_HELP)
    batch_size: int = Field(1, ge=1, description="prompts decoded together")
    seed: int = Field(0, description="seed of the prompt draw")


class CacheSpec(_Spec):
    """`kdcode cache-teacher`: a frozen teacher's top-k soft targets over the training blocks, stored for reuse."""

    teacher: str = Field(BUNDLED, description=TEACHER_HELP)
    data: DataSpec = Field(default_factory=DataSpec, description="corpus whose train split is cached")
    block_size: int = Field(256, ge=8, description="tokens per block (must match the distil runs)")
    top_k: int = Field(64, ge=1, description="teacher logits kept per position")
    temperature: float | None = Field(None, gt=0, description="temperature of the stored soft targets (default: "
                                      "what the default strategy asks for)")
    batch_size: int = Field(8, ge=1, description="blocks per teacher forward pass")
    max_blocks: int | None = Field(None, ge=1, description="cache only this many training blocks (a seeded random "
                                   "sample; distil grows it when a run needs more)")
    max_steps: int | None = Field(None, ge=1, description="size the cache to a run of this many steps (x "
                                  "--train-batch-size blocks)")
    train_batch_size: int = Field(16, ge=1, description="the distil run's batch size (with --max-steps)")


class SweepSpec(_Spec):
    """`kdcode sweep`: one run spec swept over a grid of overrides and/or a list of named points.

    Every point is ``base`` with its overrides on top (dotted keys such as ``student.layers``, or nested
    mappings). ``grid`` points (the cartesian product of its lists, in key order) come first, then
    ``points`` in order; each is distilled, evaluated with ``eval`` and benchmarked with ``bench``.
    The string ``{out}`` in any value stands for the sweep folder ``out``. An override that changes
    ``strategy.name`` (``student.init.name``) without giving its ``params`` starts from that plugin's
    defaults, since one plugin's params rarely fit another.
    """

    base: dict[str, Any] = Field(default_factory=dict, description="a RunSpec-shaped mapping shared by all points")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values (cartesian product)")
    points: list[dict[str, Any]] = Field(default_factory=list, description="named override sets ({name, key: value})")
    eval: dict[str, Any] = Field(default_factory=dict, description="an EvalSpec-shaped mapping (data: the point's)")
    bench: dict[str, Any] = Field(default_factory=dict, description="a BenchSpec-shaped mapping (data: the point's)")
    teacher_cache: bool = Field(True, description="frozen-teacher points share one teacher-logit cache")
    teacher_cache_top_k: int = Field(64, ge=1, description="teacher logits kept per position in that cache")
    infill: bool = Field(False, description="also score single-line infilling (kdcode eval --task infill)")
    draft_tokens: int | None = Field(
        None, ge=1, le=16, description="also measure each student as its teacher's speculative draft with this k "
        "(kdcode eval --draft-for): acceptance columns"
    )
    out: str = Field("sweep", description="sweep folder")

    @model_validator(mode="after")
    def _something_to_sweep(self) -> SweepSpec:
        if not self.grid and not self.points:
            raise ValueError("a sweep needs a grid (dotted key -> list of values) or a list of points")
        for key, values in self.grid.items():
            if not key or not values:
                raise ValueError(f"grid key {key!r} needs a non-empty list of values")
        return self
