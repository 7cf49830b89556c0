"""Students chosen by a latency budget, checked against a grid of hand-picked shapes that meet the same budget.

    python examples/benchmarks/latency_budget.py --out DIR plan --teacher bundled --budgets 40,60,90  # quiet machine
    python examples/benchmarks/latency_budget.py --out DIR grid --teacher bundled --budget 60 \\
        --shapes 6:1:0:fp32,8:0.5:0:fp32,... --steps 300 [--teacher-cache C]  # distil + ES of the chosen and the grid
    python examples/benchmarks/latency_budget.py --out DIR check                 # quiet: `kdcode bench` of the chosen
    python examples/benchmarks/latency_budget.py --out DIR table

- ``plan``: `kdcode plan` for each budget (the candidate table; DIR/plan-<teacher>-<budget>.json).
- ``grid``: the plan's chosen shape and every ``--shapes`` entry (``layers:ffn_keep:head_prune:precision``; each
  must meet the budget in the plan's own measurements, or be shallower than a shape of its family that did), each
  built as the plan builds its finalists (the measured-importance init's blocks, pruned by importance), its quality
  proxy recorded (the plan's own score where the plan trained it as a finalist, else scored here), distilled with
  the same ``--steps`` and written in its runtime precision; then line-completion ES
  (CodeXGLUE's, greedy) with its standard error on ``--samples`` held-out stdlib lines. A shape already distilled
  for the budget is not distilled again (a later plan that chooses it is recorded against its row).
  Appends rows to DIR/results.jsonl (with each line's ES). Where the plan file is gone, ``--spec-json`` restates the
  plan's latency spec (with ``--without-chosen``, or ``--chosen`` naming its recorded choice): every shape is then
  scored here, and its fit within the budget rests on the plan's recorded table.
- ``proxy``: every grid shape scored again by the plan's proxy with ``--proxy-steps`` KD steps (0: the loss at init),
  as `kdcode plan --proxy-steps` scores its finalists; appends ``proxy`` rows.
- ``check``: `kdcode bench` on each chosen student as written: its budget's task timed independently of the plan.
- ``table``: per budget, the chosen shape, its measured ms, ES +- SE, the best grid ES +- SE, whether the chosen is
  within one SE of the best, and the Spearman rank correlation of each proxy (the one the grid recorded, and every
  ``proxy`` rescoring) with ES, per budget and pooled.

Every row names the CPU's instruction sets and threads. Distillation and ES runs are not timed; ``plan`` and
``check`` are, and belong on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdcode.device import machine_line

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _append(out: Path, row: dict[str, Any]) -> None:
    with (out / "results.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def plan_path(out: Path, teacher: str, budget: float) -> Path:
    return out / f"plan-{Path(teacher).name}-{budget:g}.json"


def plan(args: argparse.Namespace) -> None:
    from kdcode.planning.plan import run_plan
    from kdcode.spec import PlanSpec

    for budget in [float(b) for b in args.budgets.split(",")]:
        latency = {"latency_ms": budget, "threads": args.threads, "new_tokens": args.new_tokens}
        if args.prompt_tokens:
            latency["prompt_tokens"] = args.prompt_tokens
        for key in ("ffn_keep", "head_prune", "precisions"):
            value = getattr(args, key)
            if value:
                latency[key] = [v if key == "precisions" else float(v) for v in value.split(",")]
        latency["rounds"] = args.rounds
        result = run_plan(PlanSpec(teacher=args.teacher, latency=latency))
        plan_path(args.out, args.teacher, budget).write_text(json.dumps(result, indent=1))
        chosen = result["chosen"]
        print(f"{args.teacher} {budget:g} ms: {result['outcome']}"
              + (f", chosen {chosen['layers']} layers MLP {chosen['ffn_keep']} heads -{chosen['head_prune']} "
                 f"{chosen['precision']} {chosen['ms']} ms proxy {chosen['proxy_loss']}" if chosen else
                 f": {result['line']}"), flush=True)


def _shape(text: str) -> dict[str, Any]:
    layers, ffn, heads, precision = text.split(":")
    return {"layers": int(layers), "ffn_keep": float(ffn), "head_prune": float(heads), "precision": precision}


def _key(row: dict[str, Any]) -> tuple:
    return (row["layers"], row["ffn_keep"], row["head_prune"], row["precision"])


def _teacher_data(name: str, block_size: int) -> tuple[Any, Any, Any]:
    """The teacher, its calibration blocks (as a plan draws them, seed 0) and the held-out blocks of the stdlib."""
    from kdcode.data.corpus import load_corpus, split_blocks
    from kdcode.inits.base import calibration_sample
    from kdcode.models.load import load_model
    from kdcode.spec import DataSpec

    teacher = load_model(name)
    train, valid = split_blocks(load_corpus(DataSpec()), teacher.tokenizer, block_size)
    return teacher, calibration_sample(train, 0), valid


def grid(args: argparse.Namespace) -> None:
    import torch

    from kdcode.planning.search import Finalists
    from kdcode.planning.shapes import Shape
    from kdcode.spec import RunSpec, TrainSpec
    from kdcode.spec_latency import LatencySpec
    from kdcode.train.distil import run_distil

    result = _plan_or_spec(args)
    measured = {_key(r): r for r in result["candidates"]}
    shapes = [result["chosen"]] * (not args.without_chosen) + [_shape(s) for s in args.shapes.split(",") if s]
    # each within the budget as the plan measured it (or a deeper shape of its family was)
    for s in shapes[0 if args.without_chosen else 1:] if result["candidates"] else []:
        fits = [r for r in result["candidates"] if r["meets"] and _key(r)[1:] == _key(s)[1:]
                and r["layers"] >= s["layers"]]
        if not fits:
            sys.exit(f"grid shape {s} was not measured within {args.budget:g} ms by the plan; pick from its table")
        s["plan_ms"] = measured[_key(s)]["ms"] if _key(s) in measured else f"<= {min(r['ms'] for r in fits)}"
    teacher, calibration, valid = _teacher_data(args.teacher, args.block_size)
    spec = LatencySpec(**result["spec"])
    fin = Finalists(teacher.model, calibration, valid, spec, torch.device("cpu"), len(teacher.tokenizer))
    real_teacher = _load("real_teacher", HERE / "real_teacher.py")
    sets = real_teacher.completion_sets(args.out, args.samples)
    done = {(r["budget_ms"], tuple(r["shape"].values())): r for r in _rows(args.out) if r.get("kind") == "grid"}
    for i, s in enumerate(shapes, start=int(args.without_chosen)):
        shape = Shape.of(s)
        earlier = done.get((args.budget, tuple(shape.as_dict().values())))
        if earlier is not None:  # distilled already (a grid shape a new plan chose: recorded again as the choice)
            if i == 0 and not earlier["chosen"]:
                _append(args.out, {**earlier, "chosen": True, "plan_ms": result["chosen"].get("ms"),
                                   "proxy_loss": result["chosen"].get("proxy_loss", earlier["proxy_loss"])})
            continue
        info = _scored(measured.get(_key(s)), result["chosen"] if i == 0 else None)
        proxy_from = "plan" if info else "grid"
        info = info or fin.build(shape)[1]
        name = f"b{args.budget:g}-{shape.layers}l-f{shape.ffn_keep:g}-h{shape.head_prune:g}-{shape.precision}"
        out = args.out / Path(args.teacher).name / name
        run_spec = RunSpec(
            teacher={"name": args.teacher},
            student={"layers": shape.layers, "init": {"name": "layers", "params": {"layers": info["teacher_blocks"]}},
                     "prune_heads": shape.head_prune, "prune_ffn": round(1 - shape.ffn_keep, 6),
                     "runtime": shape.precision},
            train=TrainSpec(max_steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                            lr=args.lr, eval_every=max(args.steps, 1), threads=args.threads),
            teacher_cache=args.teacher_cache, out=str(out))
        run_distil(run_spec, overwrite=True)
        folder = out if shape.precision == "fp32" else out.with_name(f"{out.name}-{shape.precision}")
        es = real_teacher.score(str(folder), sets["stdlib"], None)
        row = {"kind": "grid", "teacher": args.teacher, "budget_ms": args.budget, "chosen": i == 0,
               "shape": shape.as_dict(), "plan_ms": s.get("plan_ms", measured.get(_key(s), {}).get("ms")),
               "proxy_loss": info["proxy_loss"], "proxy_from": proxy_from, "teacher_blocks": info["teacher_blocks"],
               "steps": args.steps, "folder": str(folder), "es": es["es"], "es_se": es["es_se"],
               "samples": es["samples"], "per_sample_es": es["per_sample_es"], "machine": machine_line()}
        _append(args.out, row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_sample_es"}), flush=True)


def _plan_or_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The budget's plan file; or, where it is gone and ``--spec-json`` restates the plan's latency spec, a plan with
    no candidates and no choice: every shape is then scored here, and its fit within the budget is the caller's word
    (the plan's recorded table)."""
    from kdcode.spec_latency import LatencySpec

    path = plan_path(args.out, args.teacher, args.budget)
    if path.exists():
        return json.loads(path.read_text())
    if not args.spec_json:
        sys.exit(f"no plan at {path}: run `plan` for {args.budget:g} ms first, or restate its spec with --spec-json")
    try:
        spec = LatencySpec(**json.loads(args.spec_json))
        chosen = args.chosen and _shape(args.chosen)
    except (ValueError, TypeError) as exc:  # bad JSON, a field the spec refuses, a shape not L:F:H:P
        sys.exit(f"--spec-json / --chosen: {' '.join(str(exc).split())}")
    if spec.latency_ms != args.budget or args.without_chosen == bool(args.chosen):
        sys.exit("--spec-json needs latency_ms equal to --budget, and either --without-chosen or the plan's recorded "
                 "choice as --chosen L:F:H:P")
    print(f"no plan at {path}: shapes taken as fitting {args.budget:g} ms by an earlier plan", file=sys.stderr)
    return {"candidates": [], "chosen": chosen, "spec": spec.model_dump(mode="json")}


def _scored(*rows: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan's own proxy score of a shape it trained as a finalist (blocks, loss): the score the choice was made
    on, so the grid does not train the proxy again (at another thread count it would differ in the last digits)."""
    for row in rows:
        if row and row.get("proxy_loss") is not None and row.get("teacher_blocks"):
            return {"teacher_blocks": row["teacher_blocks"], "proxy_loss": row["proxy_loss"]}
    return None


def proxy(args: argparse.Namespace) -> None:
    import torch

    from kdcode.planning.search import Finalists
    from kdcode.planning.shapes import Shape
    from kdcode.spec_latency import LatencySpec

    grids = [r for r in _rows(args.out) if r.get("kind") == "grid" and r["teacher"] == args.teacher]
    done = {(r["budget_ms"], tuple(r["shape"].values())) for r in _rows(args.out)
            if r.get("kind") == "proxy" and r["proxy_steps"] == args.proxy_steps and r["teacher"] == args.teacher}
    teacher, calibration, valid = _teacher_data(args.teacher, args.block_size)
    for r in grids:
        if (r["budget_ms"], tuple(r["shape"].values())) in done:
            continue
        spec = LatencySpec(**{**json.loads(plan_path(args.out, args.teacher, r["budget_ms"]).read_text())["spec"],
                              "proxy_steps": args.proxy_steps})
        fin = Finalists(teacher.model, calibration, valid, spec, torch.device("cpu"), len(teacher.tokenizer))
        _, info = fin.build(Shape.of(r["shape"]))
        row = {"kind": "proxy", "teacher": args.teacher, "budget_ms": r["budget_ms"], "shape": r["shape"],
               "proxy_steps": args.proxy_steps, "proxy_loss": info["proxy_loss"], "es": r["es"],
               "machine": machine_line()}
        _append(args.out, row)
        print(json.dumps(row), flush=True)


def _record_plan(folder: Path, plan_file: Path) -> None:
    """The plan a chosen student was made by, in its manifest as `distil --latency-ms` records it (so `kdcode bench`
    checks its budget)."""
    from kdcode.models.artifacts import MANIFEST, read_manifest, write_json

    manifest = read_manifest(folder)
    if manifest is not None and not manifest.get("latency_plan"):
        manifest["latency_plan"] = json.loads(plan_file.read_text())
        write_json(folder / MANIFEST, manifest)


def check(args: argparse.Namespace) -> None:
    for row in [r for r in _rows(args.out) if r.get("kind") == "grid" and r["chosen"]]:
        plan_file = plan_path(args.out, row["teacher"], row["budget_ms"])
        if not plan_file.exists():  # a grid run from --spec-json: no plan to check the student against
            print(f"skipped {row['folder']}: no plan at {plan_file}", file=sys.stderr)
            continue
        _record_plan(Path(row["folder"]), plan_file)
        proc = subprocess.run(["kdcode", "bench", row["folder"], "--prompts", "4", "--rounds", "3", "--json", "-"],
                              capture_output=True, text=True, check=True)
        budget = json.loads(proc.stdout[proc.stdout.index("{"):])["latency_budget"]
        out = {"kind": "check", "teacher": row["teacher"], "budget_ms": row["budget_ms"], "folder": row["folder"],
               **budget, "machine": machine_line()}
        _append(args.out, out)
        print(json.dumps(out), flush=True)


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return round(cov / var, 3) if var else None


def _proxies(rows: list[dict[str, Any]], grids: list[dict[str, Any]]) -> dict[str, dict[tuple, float]]:
    """Each proxy's loss by (teacher, budget, shape): the grid's own (``plan``) and every ``proxy`` rescoring."""
    key = lambda r: (r["teacher"], r["budget_ms"], tuple(r["shape"].values()))  # noqa: E731
    out: dict[str, dict[tuple, float]] = {"plan": {key(r): r["proxy_loss"] for r in grids}}
    for r in rows:
        if r.get("kind") == "proxy":
            out.setdefault(f"{r['proxy_steps']} KD steps", {})[key(r)] = r["proxy_loss"]
    return out


def _paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """ES of ``a`` minus ``b`` on the same lines: mean +- SE of the per-line differences, lines better / worse."""
    x, y = (r and r.get("per_sample_es") for r in (a, b))
    if not x or not y or len(x) != len(y):
        return "-"
    d = [p - q for p, q in zip(x, y)]
    se = math.sqrt(sum((v - sum(d) / len(d)) ** 2 for v in d) / (len(d) - 1) / len(d))
    return f"{sum(d) / len(d):+.2f} +- {se:.2f} ({sum(v > 0 for v in d)} better, {sum(v < 0 for v in d)} worse)"


def table(args: argparse.Namespace) -> None:
    rows = _rows(args.out)
    latest = {(r["teacher"], r["budget_ms"], tuple(r["shape"].values())): r for r in rows if r.get("kind") == "grid"}
    grids = list(latest.values())  # a shape recorded again (chosen by a later plan): its last row
    checks = {(r["teacher"], r["budget_ms"]): r for r in rows if r.get("kind") == "check"}
    proxies = _proxies(rows, grids)
    print("| teacher | budget ms | chosen shape | plan ms | bench ms [range] | ES +- SE | best grid ES +- SE (shape) "
          "| within 1 SE | chosen - best, paired | " + " | ".join(f"rank corr. ({p})" for p in proxies) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(proxies))
    pooled: dict[str, tuple[list[float], list[float]]] = {p: ([], []) for p in proxies}
    for key in sorted({(r["teacher"], r["budget_ms"]) for r in grids}):
        group = [r for r in grids if (r["teacher"], r["budget_ms"]) == key]
        chosen = next((r for r in group if r["chosen"]), None)
        others = [r for r in group if not r["chosen"]]
        best = max(others, key=lambda r: r["es"]) if others else None
        rhos = []
        for name, losses in proxies.items():
            scored = [(losses[(*key, tuple(r["shape"].values()))], r["es"]) for r in group
                      if (*key, tuple(r["shape"].values())) in losses]
            pooled[name][0].extend(-x for x, _ in scored)
            pooled[name][1].extend(y for _, y in scored)
            rhos.append(f"{spearman([-x for x, _ in scored], [y for _, y in scored])} (n={len(scored)})")
        c = checks.get(key)
        bench = f"{c['ms']} [{c['ms_range'][0]}-{c['ms_range'][1]}] {'meets' if c['meets'] else 'MISSES'}" if c else "-"
        s = chosen["shape"] if chosen else {}
        label = lambda sh: f"{sh['layers']}L MLP {sh['ffn_keep']:g} heads -{sh['head_prune']:g} {sh['precision']}"  # noqa: E731
        within = chosen and best and chosen["es"] >= best["es"] - best["es_se"]
        print(f"| {Path(key[0]).name} | {key[1]:g} | {label(s) if s else '-'} | {chosen and chosen['plan_ms']} | "
              f"{bench} | {chosen and chosen['es']} +- {chosen and chosen['es_se']} | "
              f"{best and best['es']} +- {best and best['es_se']} ({best and label(best['shape'])}) | "
              f"{'yes' if within else 'no'} | {_paired(chosen, best)} | " + " | ".join(rhos) + " |")
    for name, (x, y) in pooled.items():
        print(f"pooled rank correlation ({name}): {spearman(x, y)} over {len(x)} students")
    if grids:
        print(f"machine: {grids[0]['machine']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--teacher", default="bundled")
    p.add_argument("--budgets", required=True)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ffn-keep", default=None, help="e.g. 1,0.75,0.5 (default: the spec's)")
    p.add_argument("--head-prune", default=None, help="e.g. 0,0.5")
    p.add_argument("--precisions", default=None, help="e.g. fp32,bf16,int8")
    p.add_argument("--rounds", type=int, default=5, help="the finalists' interleaved rounds")
    g = sub.add_parser("grid")
    g.add_argument("--teacher", default="bundled")
    g.add_argument("--budget", type=float, required=True)
    g.add_argument("--shapes", required=True, help="layers:ffn_keep:head_prune:precision,...")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--block-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--samples", type=int, default=100)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--teacher-cache", default=None,
                   help="train every student from this teacher-logit cache (built by the first run that needs it)")
    g.add_argument("--spec-json", default=None,
                   help="a lost plan's latency spec as JSON (with --without-chosen or --chosen)")
    g.add_argument("--chosen", default=None,
                   help="with --spec-json: the plan's recorded choice (L:F:H:P), distilled first and marked chosen")
    g.add_argument("--without-chosen", action="store_true",
                   help="only the --shapes (the chosen one distilled by another grid run, e.g. on another core)")
    q = sub.add_parser("proxy")
    q.add_argument("--teacher", default="bundled")
    q.add_argument("--proxy-steps", type=int, default=30)
    q.add_argument("--block-size", type=int, default=256)
    sub.add_parser("check")
    sub.add_parser("table")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"plan": plan, "grid": grid, "proxy": proxy, "check": check, "table": table}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
