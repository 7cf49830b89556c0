"""A plan: the measured candidate table for a teacher and a budget, its choice, and what a student made by it
records (`kdcode plan`, `kdcode distil --latency-ms`, `kdcode bench` on such a student)."""

from __future__ import annotations

import gc
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from kdcode.compression.compress import run_compress
from kdcode.compression.smooth import int8_scheme_for
from kdcode.data.corpus import encode_documents, load_corpus
from kdcode.device import resolve_device, set_threads
from kdcode.errors import KdcodeError
from kdcode.inference.decode import n_positions
from kdcode.inference.loader import load_for_inference
from kdcode.inits.base import calibration_sample
from kdcode.models.artifacts import update_metrics, write_json
from kdcode.models.load import load_model
from kdcode.planning.search import Finalists, Log, Search, _stderr, families, machine, proxy_text
from kdcode.planning.shapes import Shape
from kdcode.planning.timing import Task, Timed, make_task, summary, time_interleaved
from kdcode.quiet import quiet_hf
from kdcode.spec_compress import CompressSpec
from kdcode.spec_latency import PRECISIONS, LatencySpec

PLAN_FILE_SUFFIX = ".plan.json"  # OUT.plan.json: a distil run's plan, reused by --resume
CALIBRATION_BLOCKS = 64  # train blocks kdcode plan reads (the init and the pruning score 8 of them)


def _outcome_teacher(plan: dict[str, Any], task: Task) -> str:
    t = plan["teacher"]
    return (f"the teacher itself ({t['layers']} layers, fp32) completes {task.describe()} in {t['ms']} ms, within "
            f"{plan['budget_ms']:g} ms: no student is needed (distil --layers N still makes a smaller one)")


def _outcome_none(plan: dict[str, Any], task: Task) -> str:
    fastest = min(plan["candidates"], key=lambda r: r["ms"])
    label = Shape.of(fastest).label()
    return (f"no candidate meets {plan['budget_ms']:g} ms for {task.describe()}: the fastest, {label}, takes "
            f"{fastest['ms']} ms; raise --latency-ms to at least "
            f"{math.ceil(fastest['ms'] / (1 - plan['spec']['margin']))} (with the margin kept in hand) or shorten the "
            "task (--prompt-tokens, --new-tokens)")


def _final_round(search: Search, fin: Finalists, shapes: list[Shape], log: Log) -> dict[Shape, Any]:
    """Build ``shapes`` with the teacher's measured blocks, score the proxy, time them in interleaved rounds."""
    built = {}
    for s in sorted(shapes):  # one shape's precisions in a row: they share its proxy training
        model, info = fin.build(s)
        built[s] = model
        search.rows.setdefault(s, {**s.as_dict()}).update(info)
        log(f"plan: {s.label()}: proxy loss {info['proxy_loss']}")
    ms = time_interleaved({s: Timed(m, search.tokenizer) for s, m in built.items()}, search.task, search.spec.rounds)
    for s in shapes:
        search.rows[s].update({**summary(ms[s]), "phase": "final"})
        search.rows[s]["meets"] = search.rows[s]["ms"] <= search.spec.target_ms()
    del built
    gc.collect()
    return {s: search.rows[s] for s in shapes}


def _choose(search: Search, fin: Finalists, ok: list[Shape], log: Log) -> Shape:
    """The lowest proxy loss of the finalists within the budget (ties: the faster). Near-ties (within ``proxy_tie``
    of the best) are scored again after ``tie_steps`` KD steps, which decide among them: a few steps of KD leave
    shapes of one budget within the proxy's noise of each other, more steps separate them."""
    spec, rows = search.spec, search.rows
    by_proxy = lambda s: (rows[s]["proxy_loss"], rows[s]["ms"])  # noqa: E731
    best = min(rows[s]["proxy_loss"] for s in ok)
    close = [s for s in ok if rows[s]["proxy_loss"] <= best + abs(best) * spec.proxy_tie]
    if len(close) < 2 or spec.tie_steps <= spec.proxy_steps:
        return min(ok, key=by_proxy)
    log(f"plan: {len(close)} finalists within {spec.proxy_tie:.0%} of the best proxy loss: each scored again after "
        f"{spec.tie_steps} KD steps")
    for s in sorted(close):  # one shape's precisions in a row: they share its training
        _, info = fin.build(s, spec.tie_steps)
        rows[s]["tie_loss"] = info["proxy_loss"]
        log(f"plan: {s.label()}: proxy loss after {spec.tie_steps} steps {info['proxy_loss']}")
    return min(close, key=lambda s: (rows[s]["tie_loss"], rows[s]["ms"]))


def plan_shapes(teacher: torch.nn.Module, tokenizer: Any, calibration: torch.Tensor, held_out: torch.Tensor,
                spec: LatencySpec, log: Log = _stderr) -> dict[str, Any]:
    """Search, score and choose (see :mod:`kdcode.planning.search`). The plan's ``outcome``: ``chosen``,
    ``teacher`` (the teacher itself fits) or ``none`` (nothing fits); ``line`` says the last two in words."""
    device = resolve_device(spec.device)
    threads = set_threads(spec.threads)
    was_training = teacher.training
    teacher.to(device).eval()
    task = make_task(spec, tokenizer, held_out, n_positions(teacher))
    log(f"plan: budget {spec.latency_ms:g} ms (shapes must fit {spec.target_ms():.1f} ms: margin {spec.margin:g}) for "
        f"{task.describe()}, {threads} threads, {device.type}")
    search = Search(teacher, tokenizer, task, spec, device, log)
    depth = search.depth
    top = Shape(depth)
    search.measure(top)
    plan: dict[str, Any] = {"budget_ms": spec.latency_ms, "task": {**task.as_dict(), "prompt": task.prompt},
                            "machine": machine(device, threads), "proxy": proxy_text(spec.proxy_steps),
                            "spec": spec.model_dump(mode="json"),
                            "teacher": {**search.rows[top]}, "notes": []}
    note = lambda line: (plan["notes"].append(line), log(line))  # noqa: E731
    try:
        fams = families(teacher, spec, device, note)
        if any(f[-1] == "int8" for f in fams):
            scheme, why = int8_scheme_for(teacher, str(PRECISIONS["int8"]["int8_scheme"]))
            note(f"int8 is {scheme}, as kdcode compress --int8 writes it here ({why})")
        deepest = {f: search.deepest(f) for f in fams} if search.rows[top]["ms"] > spec.target_ms() else {}
        finalists = list(dict.fromkeys(s for s in deepest.values() if s is not None))
        chosen = None
        if finalists:
            fin = Finalists(teacher, calibration, held_out, spec, device, len(tokenizer))
            rows = _final_round(search, fin, finalists, log)
            for _ in range(2):  # a finalist over the budget in the final rounds: one block less, timed again
                missed = [s for s, r in rows.items() if not r["meets"] and s.layers > 1]
                if not missed:
                    break
                rows = _final_round(search, fin, [Shape(s.layers - 1, *s.family) for s in missed], log)
            ok = [s for s, r in search.rows.items() if r.get("phase") == "final" and r["meets"]]
            if ok:
                chosen = _choose(search, fin, ok, log)
    finally:
        teacher.train(was_training)
    for s, row in search.rows.items():
        row["chosen"] = s == chosen if chosen else False
        row.setdefault("meets", row["ms"] <= spec.target_ms())
    plan["candidates"] = [search.rows[s] for s in sorted(search.rows)]
    plan["chosen"] = search.rows[chosen] if chosen else None
    if search.rows[top]["ms"] <= spec.target_ms():
        plan["outcome"], plan["line"] = "teacher", _outcome_teacher(plan, task)
    elif chosen is None:
        plan["outcome"], plan["line"] = "none", _outcome_none(plan, task)
    else:
        plan["outcome"], plan["line"] = "chosen", None
    return plan


def require_student(plan: dict[str, Any]) -> dict[str, Any]:
    """The chosen row; the plan's one line as the error when the teacher fits or nothing does."""
    if plan["outcome"] != "chosen":
        raise KdcodeError(plan["line"])
    return plan["chosen"]


def run_plan(spec: Any, log: Log = _stderr) -> dict[str, Any]:
    """`kdcode plan`: load the teacher and the data (as distil would), then :func:`plan_shapes`."""
    teacher = load_model(spec.teacher)
    corpus = load_corpus(spec.data)
    block = min(spec.block_size, n_positions(teacher.model))
    # the calibration blocks: documents of the train split in a seeded order, until 64 blocks (not the whole split)
    docs = list(corpus.splits["train"])
    random.Random(spec.seed).shuffle(docs)
    train: list[int] = []
    for i in range(0, len(docs), 32):
        train += encode_documents(docs[i : i + 32], teacher.tokenizer)
        if len(train) >= CALIBRATION_BLOCKS * block:
            break
    valid = encode_documents(corpus.splits["valid"], teacher.tokenizer)
    if min(len(train), len(valid)) < block:
        raise KdcodeError(f"the train and held-out splits of --data {spec.data.source} need at least one {block}-token "
                          "block each; use more data")
    calibration, held_out = (torch.tensor(s[: len(s) // block * block]).view(-1, block) for s in (train, valid))
    plan = plan_shapes(teacher.model, teacher.tokenizer, calibration, held_out, spec.latency, log)
    plan["teacher_name"] = spec.teacher
    return plan


# ------------------------------------------------------------------ a student made by a plan


def plan_for_run(spec: Any, teacher: Any, blocks: torch.Tensor, valid: torch.Tensor, out: Path) -> dict[str, Any]:
    """distil --latency-ms: the plan (OUT.plan.json when a run resumes, so the shape does not change), saved."""
    path = out.with_name(out.name + PLAN_FILE_SUFFIX)
    if path.exists():
        plan = json.loads(path.read_text(encoding="utf-8"))
        if plan.get("spec") == spec.latency.model_dump(mode="json") and plan.get("teacher_name") == spec.teacher.name:
            _stderr(f"plan: reusing {path} (chosen {plan['chosen'] and Shape.of(plan['chosen']).label()})")
            return plan
    plan = plan_shapes(teacher.model, teacher.tokenizer, calibration_sample(blocks, spec.train.seed), valid,
                       spec.latency)
    plan["teacher_name"] = spec.teacher.name
    if plan["outcome"] == "chosen":
        write_json(path, plan)
    return plan


def apply_plan(spec: Any, plan: dict[str, Any]) -> Any:
    """The run spec with the chosen shape: depth and the measured blocks, pruning, runtime precision."""
    row = require_student(plan)
    student = spec.student.model_copy(update={
        "layers": row["layers"], "init": spec.student.init.model_copy(
            update={"name": "layers", "params": {"layers": row["teacher_blocks"]}}),
        "prune_heads": row["head_prune"], "prune_ffn": round(1.0 - row["ffn_keep"], 6), "runtime": row["precision"]})
    return spec.model_copy(update={"student": student})


def budget_of(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The latency plan a model folder was made by (its own manifest, or its float parent's)."""
    m = manifest or {}
    parent = (m.get("compression") or {}).get("parent_manifest") or {}  # kdcode compress keeps its parent's
    return m.get("latency_plan") or parent.get("latency_plan")


def check_budget(name: str, plan: dict[str, Any], rounds: int | None = None) -> dict[str, Any]:
    """Time the plan's task on the model ``name`` as written (loaded as `kdcode serve` loads it), in the plan's
    runtime (device, threads): the measured ms and whether it meets the budget."""
    run = plan["machine"]
    with quiet_hf():
        lm = load_for_inference(name, "cuda" if run["device"].startswith("cuda") else "cpu", "auto", run["threads"])
    t = plan["task"]
    task = Task(t["task"], t["prompt"], t["prompt_tokens"], t["new_tokens"])
    ms = time_interleaved({name: Timed(lm.model, lm.tokenizer)}, task, rounds or plan["spec"]["rounds"])[name]
    out = {"budget_ms": plan["budget_ms"], **task.as_dict(), **summary(ms), "threads": run["threads"],
           "device": run["device"]}
    out["meets"] = out["ms"] <= plan["budget_ms"]
    return out


def budget_line(check: dict[str, Any]) -> str:
    task = Task(check["task"], "", check["prompt_tokens"], check["new_tokens"])
    verdict = "meets the budget" if check["meets"] else "MISSES the budget"
    return (f"latency budget {check['budget_ms']:g} ms for {task.describe()} ({check['threads']} threads, "
            f"{check['device']}): {check['ms']} ms [{check['ms_range'][0]}-{check['ms_range'][1]}] over "
            f"{check['rounds']} rounds: {verdict}")


def write_runtime(out: Path, spec: Any, plan: dict[str, Any] | None, overwrite: bool) -> Path:
    """After distil: the student in its runtime precision (OUT-<precision>, through kdcode compress) and, for a
    student made by a plan, its measured latency as written, recorded in the manifests and printed."""
    runtime = spec.student.runtime
    folder = out
    if runtime != "fp32":
        folder = out.with_name(f"{out.name}-{runtime}")
        run_compress(str(out), CompressSpec(data=spec.data, **PRECISIONS[runtime]), folder, overwrite)
        _stderr(f"distil: the student in its runtime precision ({runtime}) is in {folder}")
    if plan is not None:
        check = check_budget(str(folder), plan)
        update_metrics(folder, "latency", check)
        if folder != out:
            update_metrics(out, "latency", {**check, "measured_on": folder.name})
        _stderr(f"{folder}: {budget_line(check)}")
    return folder
