"""`kdcode sweep`: a study in one command. Every point of a sweep is distilled, evaluated (with ``infill``,
on single-line infilling too) and benchmarked.

A sweep spec (``SweepSpec``) is a base run spec, a grid of dotted-key overrides and/or a list of named
override sets. Points run in order (a point may start from an earlier point's student, through the
``{out}`` placeholder), after the teacher itself has been measured as the baseline row. Each result is
appended to ``OUT/results.jsonl`` as soon as it exists, so an interrupted sweep resumes by skipping the
points already done; a point that fails is recorded with its error and the sweep goes on. Frozen-teacher
points that would read the same teacher outputs share one teacher-logit cache, built once.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kdcode import __version__
from kdcode.errors import KdcodeError
from kdcode.evaluation.acceptance import run_acceptance
from kdcode.evaluation.bench import run_bench
from kdcode.evaluation.evaluate import run_eval
from kdcode.models.artifacts import inside, read_manifest, utc_now, write_json
from kdcode.models.load import resolve_path
from kdcode.plugins import validate_plugins
from kdcode.spec import (
    BenchSpec,
    EvalSpec,
    RunSpec,
    SweepSpec,
    apply_overrides,
    build_spec,
    deep_merge,
    nest,
    read_spec_file,
    resolve_run_spec,
)
from kdcode.study.report import append_record, read_records
from kdcode.train.distil import run_cache_teacher, run_distil
from kdcode.train.loop import Interrupted
from kdcode.train.state import has_checkpoint
from kdcode.train.teacher_cache import CACHE_MANIFEST, blocks_for_run

RESULTS = "results.jsonl"
CACHE_DIR = "teacher_cache"
TEACHER = "teacher"
PLACEHOLDER = "{out}"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
_RESERVED = {TEACHER, CACHE_DIR, "results", "pareto"}

Log = Callable[[str], None]


@dataclass
class Point:
    """One resolved point of a sweep: its run spec and the eval/bench specs it is measured with."""

    name: str
    overrides: dict[str, Any]
    run: RunSpec
    eval: EvalSpec
    bench: BenchSpec
    cache_group: int | None = None  # index into Plan.caches when the point trains from the shared cache
    infill: EvalSpec | None = None  # the infilling eval, when the sweep asks for it
    draft_tokens: int | None = None  # k of the acceptance measurement (as the teacher's draft), when asked


@dataclass
class Baseline:
    """A teacher measured as it is (the ratio-to-teacher denominators)."""

    name: str
    run: RunSpec  # the first point that uses this teacher (its teacher and data)
    eval: EvalSpec
    bench: BenchSpec
    infill: EvalSpec | None = None


@dataclass
class CacheGroup:
    folder: Path
    teacher: str
    allow_pickle: bool
    data: Any
    block_size: int
    temperature: float
    points: list[str] = field(default_factory=list)
    reads: list[int | None] = field(default_factory=list)  # blocks each point reads (None: the whole split)


@dataclass
class Plan:
    spec: SweepSpec
    out: Path
    baselines: list[Baseline]
    points: list[Point]
    caches: list[CacheGroup]


# ------------------------------------------------------------------------------------ building specs
def load_sweep(path: Path) -> SweepSpec:
    return build_spec(SweepSpec, read_spec_file(path), str(path))


def build_sweep(
    file_data: dict[str, Any],
    base: dict[str, Any],
    layers: list[int] | None,
    eval_overrides: dict[str, Any],
    bench_overrides: dict[str, Any],
    out: str | None,
    where: str,
) -> SweepSpec:
    """A sweep spec from a file's mapping (or none: the quick form) with command-line flags on top.

    ``base`` overrides go onto the spec's base run spec, ``layers`` replaces the grid's
    ``student.layers``, ``eval_overrides`` / ``bench_overrides`` go onto its eval / bench sections.
    """
    data = dict(file_data)
    data["base"] = apply_overrides(data.get("base") or {}, base)
    if layers is not None:
        data["grid"] = {**(data.get("grid") or {}), "student.layers": layers}
    data["eval"] = deep_merge(data.get("eval") or {}, eval_overrides)
    data["bench"] = deep_merge(data.get("bench") or {}, bench_overrides)
    if out is not None:
        data["out"] = out
    return build_spec(SweepSpec, data, where)


def expand_placeholders(value: Any, out: str) -> Any:
    """``{out}`` in every string of ``value`` (nested mappings and lists too) becomes the sweep folder."""
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, out)
    if isinstance(value, dict):
        return {k: expand_placeholders(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_placeholders(v, out) for v in value]
    return value


def auto_name(overrides: dict[str, Any]) -> str:
    """A short point name from its overrides: ``8L``, ``in-training-8L``, ``temperature=1.0``."""
    parts = []
    for key, value in overrides.items():
        if key == "student.layers":
            parts.append(f"{value}L")
        elif key in ("strategy.name", "student.init", "student.init.name"):
            parts.append(str(value))
        else:
            parts.append(f"{str(key).rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts)) or "point"


def _section(sweep_section: dict[str, Any], run: RunSpec) -> dict[str, Any]:
    """An eval/bench mapping whose data defaults to the point's own (so its test split is the held-out one)."""
    return {**sweep_section, "data": deep_merge(run.data.model_dump(mode="json"), sweep_section.get("data") or {})}


def plan_sweep(spec: SweepSpec, where: str = "sweep spec") -> Plan:
    """Expand every point and validate its run spec and plugins; loads no model."""
    out = spec.out
    base = expand_placeholders(spec.base, out)
    sections = {"eval": expand_placeholders(spec.eval, out), "bench": expand_placeholders(spec.bench, out)}
    named: list[tuple[str, dict[str, Any]]] = []
    grid = expand_placeholders(spec.grid, out)
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid.keys(), values))
        named.append((auto_name(overrides), overrides))
    for i, raw in enumerate(expand_placeholders(spec.points, out)):
        overrides = {k: v for k, v in raw.items() if k != "name"}
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise KdcodeError(
                f"invalid spec in {where}: points.{i}.name {name!r}: use letters, digits and . _ = + - (a folder name)"
            )
        named.append((name or auto_name(overrides), overrides))
    seen: set[str] = set()
    points: list[Point] = []
    for name, overrides in named:
        if name in seen or name in _RESERVED:
            why = "is reserved" if name in _RESERVED else "is used twice"
            raise KdcodeError(f"invalid spec in {where}: point name {name!r} {why}; give each point its own name")
        seen.add(name)
        data = apply_overrides(base, overrides)
        if "out" not in nest(overrides):  # each point its own folder, whatever the base says
            data["out"] = str(Path(out) / name)
        run = resolve_run_spec(data, {}, f"{where} (point {name})")
        ev = build_spec(EvalSpec, _section(sections["eval"], run), f"{where} (eval, point {name})")
        be = build_spec(BenchSpec, _section(sections["bench"], run), f"{where} (bench, point {name})")
        infill = ev.model_copy(update={"task": "infill", "ppl_blocks": 0}) if spec.infill else None
        points.append(Point(name, overrides, run, ev, be, infill=infill, draft_tokens=spec.draft_tokens))

    # Plugin params, and points that start from a later point's student (they would find no folder).
    order = {p.name: i for i, p in enumerate(points)}
    root = Path(out).resolve()
    strategies = {}
    for i, p in enumerate(points):
        strategies[p.name], _ = validate_plugins(p.run)
        path = p.run.student.init.params.get("path")
        if isinstance(path, str):
            try:
                first = Path(path).resolve().relative_to(root).parts[0]
            except (ValueError, IndexError):
                continue
            if order.get(first, -1) >= i:
                raise KdcodeError(
                    f"invalid spec in {where}: point {p.name!r} starts from {path}, the student of point {first!r}, "
                    f"which runs {'later' if order[first] > i else 'as that same point'}; list {first!r} first"
                )

    caches: list[CacheGroup] = []
    if spec.teacher_cache:
        _plan_caches(points, strategies, Path(out), caches)
    baselines: list[Baseline] = []
    for p in points:
        teacher = p.run.teacher
        if any(b.run.teacher == teacher for b in baselines):
            continue
        name = TEACHER if not baselines else f"{TEACHER}:{teacher.name}"
        baselines.append(Baseline(name, p.run, p.eval, p.bench, p.infill))
    return Plan(spec, Path(out), baselines, points, caches)


def _plan_caches(points: list[Point], strategies: dict[str, Any], out: Path, caches: list[CacheGroup]) -> None:
    """Group the frozen-teacher points that read identical teacher outputs; point each group at one cache."""
    groups: dict[str, CacheGroup] = {}
    for p in points:
        strategy, run = strategies[p.name], p.run
        temperature = getattr(strategy.params, "temperature", None)
        if (
            run.teacher_cache is not None
            or not strategy.supports_cache
            or temperature is None
            or getattr(strategy.params, "temperature_schedule", "constant") != "constant"
            or run.teacher.revision is not None  # run_cache_teacher loads the default revision only
            or run.teacher.trust_remote_code
        ):
            continue
        key = json.dumps(
            [
                run.teacher.name,
                run.teacher.allow_pickle,
                run.data.model_dump(mode="json"),
                run.train.block_size,
                temperature,
            ],
            sort_keys=True,
        )
        if key not in groups:
            folder = out / (CACHE_DIR if not groups else f"{CACHE_DIR}-{len(groups) + 1}")
            groups[key] = CacheGroup(
                folder, run.teacher.name, run.teacher.allow_pickle, run.data, run.train.block_size, temperature
            )
            caches.append(groups[key])
        group = groups[key]
        group.points.append(p.name)
        group.reads.append(blocks_for_run(run.train))
        p.cache_group = caches.index(group)
        p.run = p.run.model_copy(update={"teacher_cache": str(group.folder)})


def _identity(m: Point | Baseline) -> str:
    """What a record must match to count as done on --resume: the same run, eval, bench and infill specs (and the
    same draft k, when acceptance is measured)."""
    run = m.run if isinstance(m, Point) else None
    dumps = [x.model_dump(mode="json") if x is not None else None for x in (run, m.eval, m.bench, m.infill)]
    k = getattr(m, "draft_tokens", None)
    return json.dumps(dumps + ([k] if k else []), sort_keys=True)


def _record_identity(record: dict[str, Any]) -> str:
    keys = ("spec", "eval_spec", "bench_spec", "infill_spec")
    k = record.get("draft_tokens")
    return json.dumps([record.get(k) for k in keys] + ([k] if k else []), sort_keys=True)


def _acceptance(model: str, spec: EvalSpec, teacher: str, k: int, **_load: Any) -> dict[str, Any]:
    """The student as its teacher's speculative draft on the eval's held-out lines (greedy, k draft tokens)."""
    result = run_acceptance(model, teacher, spec.model_copy(update={"lines": None}), k)
    return {key: v for key, v in result.items() if key != "runtime"}


def _measure(record: dict[str, Any], model: str, m: Point | Baseline, load: dict[str, Any]) -> None:
    """Eval, infill (when asked) and bench of ``model``: each stage's figures and wall time into ``record``."""
    stages = (("eval", run_eval, m.eval), ("infill", run_eval, m.infill), ("bench", run_bench, m.bench))
    k = getattr(m, "draft_tokens", None)
    if k:
        stages += (("acceptance", partial(_acceptance, teacher=m.run.teacher.name, k=k), m.eval),)
    for stage, fn, spec in stages:
        if spec is None:
            continue
        record["stage"] = stage
        t0 = time.perf_counter()
        record[stage] = fn(model, spec, **load)
        record["wall_s"][stage] = round(time.perf_counter() - t0, 2)
    record["stage"] = None


def _error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, KdcodeError) else f"{type(exc).__name__}: {exc}"


def _reusable_student(folder: Path, run: RunSpec) -> bool:
    """A complete student of exactly this run spec (an interrupted point whose distil had finished)."""
    try:
        manifest = read_manifest(folder) if folder.is_dir() else None
    except KdcodeError:
        return False
    return bool(manifest) and manifest.get("spec") == run.model_dump(mode="json")


# ------------------------------------------------------------------------------------------- run
def _new_record(m: Point | Baseline, kind: str, baseline: str, spec: Any, folder: str | None) -> dict[str, Any]:
    """A results.jsonl record before its stages have run: what is measured, and with which specs."""
    return {
        "name": m.name, "kind": kind, "status": "ok", "error": None, "stage": None,
        "overrides": getattr(m, "overrides", {}), "spec": spec, "teacher": m.run.teacher.name, "baseline": baseline,
        "folder": folder, "eval_spec": m.eval.model_dump(mode="json"), "bench_spec": m.bench.model_dump(mode="json"),
        "infill_spec": m.infill.model_dump(mode="json") if m.infill else None,
        "draft_tokens": getattr(m, "draft_tokens", None),
        "eval": None, "infill": None, "bench": None, "acceptance": None, "wall_s": {}, "started_at": utc_now(),
        "kdcode": __version__,
    }


def _measure_teacher(b: Baseline) -> dict[str, Any]:
    t = b.run.teacher
    load = {"allow_pickle": t.allow_pickle, "trust_remote_code": t.trust_remote_code}
    record = _new_record(b, "teacher", b.name, None, None)
    start = time.perf_counter()
    try:
        record["stage"] = "load"
        path = resolve_path(t.name)
        record["folder"] = str(path) if path else None
        _measure(record, t.name, b, load)
    except Exception as exc:  # recorded; the students still run
        record.update(status="failed", error=_error(exc), traceback=traceback.format_exc(limit=-8))
    record["wall_s"]["total"] = round(time.perf_counter() - start, 2)
    record["finished_at"] = utc_now()
    return record


def _run_point(point: Point, baseline: str, root: Path, resume: bool, cache_note: Any) -> dict[str, Any]:
    folder = Path(point.run.out)
    record = _new_record(point, "student", baseline, point.run.model_dump(mode="json"), str(folder))
    record.update(teacher_cache=cache_note, reused_student=False, training=None)
    load = {"trust_remote_code": point.run.teacher.trust_remote_code}
    start = time.perf_counter()
    try:
        if isinstance(cache_note, dict) and cache_note.get("error"):
            record["stage"] = "teacher_cache"
            raise KdcodeError(f"the shared teacher cache could not be built: {cache_note['error']}")
        record["stage"] = "distil"
        t0 = time.perf_counter()
        if resume and _reusable_student(folder, point.run):
            record["reused_student"] = True
        else:
            # A folder inside the sweep folder is this sweep's own (a leftover of an interrupted point);
            # a checkpoint left by an interrupted distil is continued on --resume.
            go_on = resume and has_checkpoint(folder.with_name(folder.name + ".ckpt"))
            _, manifest = run_distil(point.run, overwrite=inside(folder, root), resume=go_on)
            record["training"] = manifest.get("training")
            record["resumed_checkpoint"] = go_on
        record["wall_s"]["distil"] = round(time.perf_counter() - t0, 2)
        _measure(record, str(folder), point, load)
    except Interrupted:  # Ctrl-C / SIGTERM in training: the sweep stops (the point's checkpoint is kept)
        raise
    except Exception as exc:  # a failed point is recorded with its error; the sweep goes on
        record.update(status="failed", error=_error(exc), traceback=traceback.format_exc(limit=-8))
    record["wall_s"]["total"] = round(time.perf_counter() - start, 2)
    record["finished_at"] = utc_now()
    return record


def _ensure_cache(group: CacheGroup, top_k: int, batch_size: int, log: Log) -> dict[str, Any]:
    """Build the group's cache unless a complete one is there; returns what the point records note."""
    note: dict[str, Any] = {"path": str(group.folder), "build_s": None}
    if (group.folder / CACHE_MANIFEST).is_file():
        return note
    log(f"teacher cache for {', '.join(group.points)}: one pass of {group.teacher} -> {group.folder}")
    t0 = time.perf_counter()
    try:
        run_cache_teacher(
            group.teacher,
            group.data,
            group.block_size,
            top_k,
            group.temperature,
            group.folder,
            batch_size=batch_size,
            overwrite=True,
            allow_pickle=group.allow_pickle,
            max_blocks=None if None in group.reads else max(r or 0 for r in group.reads),  # the longest point's
        )
    except Exception as exc:  # every point of the group fails with this error; the others go on
        return {**note, "error": _error(exc)}
    note["build_s"] = round(time.perf_counter() - t0, 2)
    return note


def run_sweep(spec: SweepSpec, resume: bool = False, where: str = "sweep spec", log: Log = print) -> list[dict]:
    """Run every point of ``spec`` (teacher baseline first); returns the records written by this call.

    Without ``resume`` an existing non-empty results.jsonl is refused; with it, points whose last record
    is ``ok`` for the same specs are skipped and the others (failed, changed or never run) run again.
    """
    plan = plan_sweep(spec, where)
    out = plan.out
    results = out / RESULTS
    previous: dict[str, dict[str, Any]] = {}
    if results.is_file() and results.stat().st_size > 0:
        if not resume:
            raise KdcodeError(
                f"{results} already holds results; pass --resume to skip the points already done, "
                "or choose another --out"
            )
        previous = {r["name"]: r for r in read_records(results) if "name" in r}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", spec.model_dump(mode="json"))

    def done(name: str, identity: str) -> bool:
        r = previous.get(name)
        return bool(r) and r.get("status") == "ok" and _record_identity(r) == identity

    written: list[dict[str, Any]] = []
    for b in plan.baselines:
        if done(b.name, _identity(b)):
            log(f"{b.name}: done before, skipped")
            continue
        log(f"{b.name} ({b.run.teacher.name}): eval -> {'infill -> ' if b.infill else ''}bench")
        record = _measure_teacher(b)
        append_record(results, record)
        written.append(record)
        log(_summary(record))

    cache_notes: dict[int, Any] = {}
    total = len(plan.points)
    for i, point in enumerate(plan.points, 1):
        if done(point.name, _identity(point)):
            log(f"[{i}/{total}] {point.name}: done before, skipped")
            continue
        if point.cache_group is not None and point.cache_group not in cache_notes:
            group = plan.caches[point.cache_group]
            # Forward passes only (no grads, no student): at least the cache-teacher default batch of 8.
            cache_notes[point.cache_group] = _ensure_cache(
                group, spec.teacher_cache_top_k, max(8, point.run.train.batch_size), log
            )
        note = cache_notes.get(point.cache_group) if point.cache_group is not None else None
        baseline = next(b.name for b in plan.baselines if b.run.teacher == point.run.teacher)
        log(f"[{i}/{total}] {point.name}: distil -> eval -> {'infill -> ' if point.infill else ''}bench"
            f"{' -> acceptance' if point.draft_tokens else ''}")
        record = _run_point(point, baseline, out, resume, note)
        if note and note.get("build_s") is not None:
            cache_notes[point.cache_group] = {**note, "build_s": None}  # the build is counted once
        append_record(results, record)
        written.append(record)
        log(_summary(record))
    return written


def _summary(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"  {record['name']} failed at {record['stage']}: {record['error']}"
    ev, be = record["eval"], record["bench"]
    infill = f", infill ES {record['infill'].get('es')}" if record.get("infill") else ""
    if record.get("acceptance"):
        infill += f", {record['acceptance'].get('accepted_per_pass')} accepted per teacher pass"
    return (
        f"  {record['name']}: ES {ev.get('es')}, EM {ev.get('em')}{infill}, {be.get('params_m')}M params, "
        f"{be.get('size_mb')} MB, {be.get('samples_per_s')} samples/s ({record['wall_s']['total']:.0f} s)"
    )
