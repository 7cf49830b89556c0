"""`kdcode distil`: a teacher into a smaller student, through the one loop, saved with its manifest.

``run_distil`` resolves the plugins, checks what can be checked before loading (output folder, memory),
loads the teacher, builds the student through the init's layer map, trains it (live teacher or teacher
cache) and saves it atomically. Interrupted runs leave ``OUT.ckpt`` for ``--resume``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from kdcode.compression.compress import prune_at_init
from kdcode.compression.prune import heads_per_layer
from kdcode.data import fim
from kdcode.data.corpus import (
    Corpus,
    data_section,
    encode_documents,
    fingerprint,
    load_corpus,
    split_blocks,
    to_blocks,
    train_blocks,
)
from kdcode.data.fim import cache_key as fim_key
from kdcode.device import resolve_device, torch_dtype
from kdcode.errors import KdcodeError
from kdcode.evaluation.perplexity import held_out_loss
from kdcode.inits.base import calibration_sample
from kdcode.models.artifacts import check_output, check_trainable, record_layout
from kdcode.models.load import check_depth, check_vocab, count_params, load_model, resolve_path, weights_bytes
from kdcode.planning.plan import apply_plan, plan_for_run, write_runtime
from kdcode.plugins import validate_plugins
from kdcode.spec import RunSpec
from kdcode.train.loop import train_loop
from kdcode.train.resources import check_block_size, check_memory
from kdcode.train.state import check_round_trip, run_context, save_trained
from kdcode.train.teacher_cache import (
    CACHE_MANIFEST,
    blocks_for_run,
    build_cache,
    check_cache,
    coverage,
    grow_cache,
    load_cache,
    read_manifest,
    tokenizer_hash,
)


def distil_inputs(spec: RunSpec) -> dict[str, Any]:
    """Every local path a distil run reads, by the flag that names it (an output may be none of them)."""
    teacher = resolve_path(spec.teacher.name) if spec.teacher.name else None
    return {
        "--teacher": teacher,
        "--data": spec.data.source if spec.data.source != "stdlib" else None,
        "--teacher-cache": spec.teacher_cache,
        "student.init.params.path": spec.student.init.params.get("path"),
    }


def run_distil(spec: RunSpec, overwrite: bool = False, resume: bool = False) -> tuple[Path, dict[str, Any]]:
    """Distil ``spec.teacher`` into a smaller student; returns (student folder, manifest).

    Everything that can be checked before loading is (the output path against every input, its disk and free
    space, the plugins); the student is saved and reloaded once before the first step, so a save-time fault
    costs seconds. Interrupted runs (SIGINT/SIGTERM) leave a checkpoint in ``OUT.ckpt``; ``resume=True``
    continues it. If the final save fails, the final weights stay in ``OUT.ckpt`` and the error says so.
    """
    out = Path(spec.out)
    strategy, init = _plugins(spec)
    check_output(out, overwrite, distil_inputs(spec), need_bytes=weights_bytes(spec.teacher.name))
    _check_cache_path(spec, out)
    if spec.student.init.name != "pretrained" and spec.latency is None:  # a budget chooses the depth later
        check_depth(spec.teacher.name, spec.student.layers, spec.teacher.revision)
    run = run_context(spec, resume, spec.train.tensorboard)
    teacher = load_model(spec.teacher.name, revision=spec.teacher.revision,
                         trust_remote_code=spec.teacher.trust_remote_code, allow_pickle=spec.teacher.allow_pickle)
    # FIM as the spec says, else as the teacher was trained (a FIM teacher's students keep infilling)
    transform, fim_section = fim.prepare(fim.effective(spec.data.fim, teacher.manifest), teacher.tokenizer,
                                         teacher.model)
    _check_teacher(spec, strategy, teacher)
    corpus = load_corpus(spec.data)
    cache, blocks, valid_blocks = _training_blocks(spec, strategy, teacher, corpus, transform)
    plan = None
    if spec.latency is not None:  # the shape chosen by measuring candidates on this machine
        plan = plan_for_run(spec, teacher, blocks, valid_blocks, out)
        spec = apply_plan(spec, plan)
        strategy, init = _plugins(spec)
    calibration = calibration_sample(blocks, spec.train.seed)
    if init.needs_calibration:
        init.prepare(teacher.model, calibration, spec.student.layers)
    student, layer_map = init.build(
        teacher.model, spec.student.layers, spec.student.hidden_size, spec.student.heads, tokenizer=teacher.tokenizer
    )
    student, pruned = prune_at_init(student, spec.student.prune_heads, spec.student.prune_ffn, calibration)
    start = _loss_before_training(spec, init, teacher.model, student, layer_map, valid_blocks)
    check_vocab(student, teacher.tokenizer, "the student")
    check_round_trip(student, teacher.tokenizer)
    _hold_teacher(spec, strategy, teacher.model)  # after the init: the student copies the weights as stored
    result = train_loop(student, strategy, blocks, valid_blocks, spec.train,
                        teacher=None if cache is not None else teacher.model,
                        description=f"distil {teacher.n_layer}->{spec.student.layers} layers",
                        layer_map=layer_map, cache=cache, run=run, vocab=len(teacher.tokenizer))
    if not result.is_main:  # data-parallel workers: the main process writes the student
        return out, {}
    manifest = {
        "kind": "student",
        "spec": spec.model_dump(mode="json"),
        "teacher": teacher.describe(),
        "strategy": {"name": spec.strategy.name, "params": strategy.params.model_dump()},
        "init": {"name": spec.student.init.name, "params": init.params.model_dump(), "origin": init.origin,
                 "before_training": start, "pruned": pruned or None},
        "latency_plan": plan,
        "layer_map": layer_map,
        "model": {
            "n_layer": student.config.num_hidden_layers,
            "hidden_size": student.config.hidden_size,
            "params_m": round(count_params(student) / 1e6, 3),
        },
        "data": data_section(corpus, blocks, valid_blocks, spec.data.format),
        "fim": fim_section,
        "teacher_cache": {"path": spec.teacher_cache, "top_k": cache.manifest["top_k"], "blocks": len(blocks),
                          **cache.manifest["run"]} if cache else None,
        "training": result.summary(),
    }
    record_layout(manifest, heads_per_layer(student), f"init {spec.student.init.name} {init.params.model_dump()}")
    save_trained(out, student, teacher.tokenizer, manifest, overwrite, result, run)
    if plan is not None or spec.student.runtime != "fp32":
        write_runtime(out, spec, plan, overwrite)
    return out, manifest


def _loss_before_training(spec: RunSpec, init: Any, teacher: Any, student: Any, layer_map: list[int | None],
                          valid_blocks: Any) -> dict[str, Any] | None:
    """The held-out loss of the student as initialised and of the teacher (same blocks), printed as distil's first
    line and recorded in the manifest: an init that starts near uniform shows here, before any step is paid."""
    if len(valid_blocks) == 0:
        return None
    device = next(teacher.parameters()).device
    n = min(len(valid_blocks), max(spec.train.batch_size, 1) * 2)
    loss = {name: round(held_out_loss(model, valid_blocks[:n], spec.train.batch_size, None, device), 4)
            for name, model in (("student", student), ("teacher", teacher))}
    out = {"held_out_loss": loss["student"], "teacher_held_out_loss": loss["teacher"],
           "uniform_loss": round(math.log(student.config.vocab_size), 4), "tokens": int(valid_blocks[:n].numel())}
    measured = (init.origin or {}).get("measured") or {}
    extra = ""
    if "spread_calibration_loss" in measured:
        extra = f"; calibration loss {measured['calibration_loss']} vs spread {measured['spread_calibration_loss']}"
    elif "calibration_loss" in measured:
        extra = f"; calibration loss {measured['calibration_loss']}"
    kept = [j for j in layer_map if j is not None]
    print(f"init {spec.student.init.name}: teacher blocks {kept}; held-out loss before training {out['held_out_loss']}"
          f" (teacher {out['teacher_held_out_loss']}, uniform {out['uniform_loss']}, {out['tokens']} tokens){extra}",
          file=sys.stderr, flush=True)
    return out


def _check_cache_path(spec: RunSpec, out: Path) -> None:
    """A ``--teacher-cache`` folder that holds no cache yet is where distil builds one: new or empty, and neither
    an input nor the student's folder (checked before loading)."""
    folder = Path(spec.teacher_cache) if spec.teacher_cache else None
    if folder is None or (folder / CACHE_MANIFEST).exists():
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise KdcodeError(f"--teacher-cache {folder} holds files but no {CACHE_MANIFEST}: it is not a teacher cache; "
                          "give a new or empty folder (distil builds the cache there) or one kdcode cache-teacher made")
    a, b = folder.expanduser().resolve(), out.expanduser().resolve()
    if a == b or b in a.parents or a in b.parents:
        raise KdcodeError(f"--teacher-cache {folder} and --out {out} overlap: the student's folder is replaced when it "
                          "is saved; put the cache elsewhere")
    inputs = {k: v for k, v in distil_inputs(spec).items() if k != "--teacher-cache"}
    check_output(folder, False, inputs, flag="--teacher-cache")


def _plugins(spec: RunSpec) -> tuple[Any, Any]:
    strategy, init = validate_plugins(spec)
    if spec.teacher_cache and not strategy.supports_cache:
        raise KdcodeError(f"strategy {spec.strategy.name!r} cannot train from a teacher cache; drop teacher_cache")
    if spec.teacher.dtype not in ("auto", "fp32") and strategy.needs_teacher_grad:
        raise KdcodeError(f"strategy {spec.strategy.name!r} trains the teacher, which keeps float32 weights; "
                          f"drop teacher.dtype {spec.teacher.dtype}")
    return strategy, init


def _hold_teacher(spec: RunSpec, strategy: Any, model: Any) -> None:
    """The teacher in ``teacher.dtype``; one that trains alongside the student keeps float32 weights."""
    if strategy.needs_teacher_grad:
        model.float()
    elif spec.teacher.dtype != "auto":
        model.to(torch_dtype(spec.teacher.dtype))


def _check_teacher(spec: RunSpec, strategy: Any, teacher: Any) -> None:
    """What the loaded teacher must allow: its vocabulary, the block size, training it (in-training KD), the step's
    memory."""
    check_vocab(teacher.model, teacher.tokenizer, f"teacher {spec.teacher.name}")
    check_block_size(teacher.model, spec.train.block_size, "the teacher")
    if strategy.needs_teacher_grad:
        check_trainable(teacher.manifest, f"teacher {spec.teacher.name} (strategy {spec.strategy.name!r} trains it)")
    check_memory(
        spec.train.batch_size,
        spec.train.block_size,
        spec.student.hidden_size or teacher.model.config.hidden_size,
        spec.student.layers + (teacher.n_layer if strategy.needs_teacher_grad else 0),
        len(teacher.tokenizer),
        resolve_device("auto"),
    )
    eol = teacher.tokenizer.convert_tokens_to_ids("<EOL>")
    if spec.data.format == "py150" and eol in (None, teacher.tokenizer.unk_token_id):
        raise KdcodeError("data.format py150 needs a tokenizer with the <EOL> token (CodeGPT-style)")


def _training_blocks(
    spec: RunSpec, strategy: Any, teacher: Any, corpus: Corpus, fim: Any
) -> tuple[Any, Any, Any]:
    """(teacher cache or None, training blocks, validation blocks): the cache's blocks when it is used."""
    if not spec.teacher_cache:
        return (None, *split_blocks(corpus, teacher.tokenizer, spec.train.block_size, fim))
    # The cache replaces the teacher's forward passes; the teacher's weights are still read once
    # for the init (layer-copy inits copy its blocks), then dropped.
    folder = Path(spec.teacher_cache)
    key = cache_key(teacher, corpus, spec.data.format, spec.train.block_size, fim)
    wanted_t = getattr(strategy.params, "temperature", None)
    if wanted_t is not None and getattr(strategy.params, "temperature_schedule", "constant") != "constant":
        raise KdcodeError("a teacher cache holds soft targets at one temperature; use a constant temperature")
    info = _ready_cache(spec, teacher, corpus, fim, folder, key, wanted_t)
    cache = load_cache(folder)
    cache.manifest["run"] = info
    valid_stream = encode_documents(corpus.splits["valid"], teacher.tokenizer)
    bs = spec.train.block_size
    valid_blocks = to_blocks(valid_stream, bs) if len(valid_stream) >= bs else cache.input_ids[:0]
    return cache, cache.input_ids, valid_blocks


CACHE_TOP_K = 64  # top-k of a cache that distil builds itself (cache-teacher's default)


def _ready_cache(
    spec: RunSpec, teacher: Any, corpus: Corpus, fim: Any, folder: Path, key: dict[str, Any], temperature: float | None
) -> dict[str, Any]:
    """Make the cache in ``folder`` cover the blocks this run reads (``max_steps`` x batch; all for an epoch or
    minutes budget): build it when there is none (at the strategy's temperature), grow it when it holds fewer, after
    checking it was made for this run. What it did, and in how long."""
    wanted = blocks_for_run(spec.train)
    t0 = time.perf_counter()
    if not (folder / CACHE_MANIFEST).exists():
        blocks = train_blocks(corpus, teacher.tokenizer, spec.train.block_size, fim)
        meta = {"teacher": spec.teacher.name, **key, "data": corpus.summary()}
        m = build_cache(teacher.model, blocks, folder, CACHE_TOP_K, 2.0 if temperature is None else temperature,
                        meta, spec.train.batch_size, vocab=len(teacher.tokenizer), max_blocks=wanted)
        return {"action": "built", "blocks": m["blocks"], "seconds": round(time.perf_counter() - t0, 1)}
    manifest = read_manifest(folder)
    check_cache(manifest, key, folder)
    have_t = manifest["temperature"]
    if temperature is not None and abs(temperature - have_t) > 1e-9:
        raise KdcodeError(
            f"teacher cache {folder} holds soft targets at T={have_t}, the strategy asks for T={temperature}; "
            f"pass --temperature {have_t} or rebuild the cache"
        )
    have, total = coverage(manifest)
    target = total if wanted is None else min(wanted, total)
    if target <= have:
        return {"action": "reused", "blocks": have}
    blocks = train_blocks(corpus, teacher.tokenizer, spec.train.block_size, fim)
    m = grow_cache(teacher.model, blocks, folder, target, len(teacher.tokenizer), spec.train.batch_size)
    return {"action": "grown", "blocks": m["blocks"], "from_blocks": have,
            "seconds": round(time.perf_counter() - t0, 1)}


def cache_key(teacher: Any, corpus: Corpus, fmt: str, block_size: int, fim: Any = None) -> dict[str, Any]:
    """What a teacher cache must match to be reused: teacher, tokenizer, training data, block size, and the FIM
    transform of the blocks (None: none)."""
    return {
        "teacher_fingerprint": teacher.fingerprint,
        "tokenizer_hash": tokenizer_hash(teacher.tokenizer),
        "data_fingerprint": f"{fmt}:{fingerprint(corpus.splits['train'])}",
        "block_size": block_size,
        "fim": fim_key(fim),
    }


def run_cache_teacher(
    teacher_name: str, data: Any, block_size: int, top_k: int, temperature: float, out: Path,
    batch_size: int = 8, overwrite: bool = False, allow_pickle: bool = False, max_blocks: int | None = None,
) -> dict[str, Any]:
    """One teacher pass over the training blocks of ``data`` (``max_blocks`` of them, a seeded random sample, when
    given), stored as top-k soft targets; FIM-transformed as `distil` would transform them (``data.fim``, else as
    the teacher was trained)."""
    check_output(out, overwrite, {"--teacher": resolve_path(teacher_name), "--data": data.source})
    teacher = load_model(teacher_name, allow_pickle=allow_pickle)
    check_vocab(teacher.model, teacher.tokenizer, f"teacher {teacher_name}")
    check_block_size(teacher.model, block_size, "the teacher")
    transform, _ = fim.prepare(fim.effective(data.fim, teacher.manifest), teacher.tokenizer, teacher.model)
    corpus = load_corpus(data)
    blocks = train_blocks(corpus, teacher.tokenizer, block_size, transform)
    teacher.model.to(resolve_device("auto"))
    key = cache_key(teacher, corpus, data.format, block_size, transform)
    meta = {"teacher": teacher_name, **key, "data": corpus.summary()}
    return build_cache(teacher.model, blocks, out, top_k, temperature, meta, batch_size, overwrite,
                       vocab=len(teacher.tokenizer), max_blocks=max_blocks)


