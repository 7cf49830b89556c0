"""Close the half-depth gap (issue 20): the default 6-layer student under one change per row, all on the same
held-out samples, with the standard error of ES.

Every row is `kdcode distil` with the default spec plus its overrides, bound by a **step budget** (so that a busy
CPU changes only the wall clock, not the result; the default's 8-minute budget gives ~410 steps on an idle 2-core
CPU), then scored on two fixed completion sets of 500 samples each:

- ``stdlib``: the held-out stdlib test split, exactly the samples `kdcode eval` draws by default (seed 0);
- ``thirdparty``: installed third-party packages that are never in the corpus (rich, click, typer, pydantic,
  jinja2, packaging, urllib3, requests, httpx, fastapi, starlette, tqdm, fsspec, networkx), drawn file-first.

ES / EM are CodeXGLUE's (kdcode.evaluation.metrics), greedy; SE = sample std / sqrt(n) of the per-sample ES.
The baseline row repeats the previous non-blank line. Rows append to ``results.jsonl`` (resumable: a row already
there is skipped) and ``results.md`` is rewritten after each.

    python examples/benchmarks/gap/ablation.py --out /tmp/gap            # every row, in order
    python examples/benchmarks/gap/ablation.py --out /tmp/gap --rows default,hard-only
    python examples/benchmarks/gap/ablation.py --out /tmp/gap --score new-default=./student  # a distil student
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kdcode.evaluation.completion_sets import LineSample, build_line_samples, eval_docs, write_lines_file
from kdcode.evaluation.evaluate import run_eval
from kdcode.evaluation.metrics import sample_scores
from kdcode.spec import EvalSpec, resolve_run_spec
from kdcode.train.distil import run_distil

THIRD_PARTY = ("rich", "click", "typer", "pydantic", "jinja2", "packaging", "urllib3", "requests", "httpx", "fastapi",
               "starlette", "tqdm", "fsspec", "networkx")
STEPS = 400  # ~ what the old default 8-minute budget gave on an idle 2-core CPU (413 steps measured, bf16 on AMX)
BASE_LR = 5e-4  # the default peak lr when the ablation began: every row is one change from that default
BASE_STRATEGY = "pretraining"  # and its strategy (forward KL T=2; the default became reverse-kl after these rows)
SAMPLES = 500

# name -> (spec overrides on top of the default, what the row changes). Order: most informative first.
ROWS: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, "the old default: 6L spread, pretraining KD T=2 a_ce=a_clm=0.5, lr 5e-4, 400 steps"),
    "hard-only": ({"strategy": {"name": "hard-only"}}, "no KD, same init and budget (the control)"),
    "cache-2x": ({"train": {"max_steps": 2 * STEPS}, "teacher_cache": "{cache}"}, "teacher cache, 2x the steps"),
    "cache-4x": ({"train": {"max_steps": 4 * STEPS}, "teacher_cache": "{cache}"}, "teacher cache, 4x the steps"),
    "cache-2x-lr-1e-3": ({"train": {"max_steps": 2 * STEPS, "lr": 1e-3}, "teacher_cache": "{cache}"},
                         "teacher cache, 2x the steps, peak lr 1e-3"),
    "with-tests": ({"data": {"exclude_tests": False}}, "the teacher's data: the stdlib with its test folders"),
    "lr-1e-3": ({"train": {"lr": 1e-3}}, "peak lr 1e-3"),
    "lr-2e-4": ({"train": {"lr": 2e-4}}, "peak lr 2e-4"),
    "cosine-to-0": ({"train": {"min_lr_ratio": 0.0, "warmup_steps": 20}}, "warm-up 20, cosine to 0"),
    "T1": ({"strategy": {"params": {"temperature": 1.0}}}, "temperature 1"),
    "soft-0.9": ({"strategy": {"params": {"alpha_ce": 0.9, "alpha_clm": 0.1}}}, "0.9 soft / 0.1 hard"),
    "soft-1.0": ({"strategy": {"params": {"alpha_ce": 1.0, "alpha_clm": 0.0}}}, "soft only"),
    "jsd": ({"strategy": {"name": "jsd", "params": {"beta": 0.5, "alpha_clm": 0.5}}}, "generalised JSD beta 0.5"),
    "reverse-kl": ({"strategy": {"name": "jsd", "params": {"beta": 1.0, "alpha_clm": 0.5}}}, "reverse KL (MiniLLM)"),
    "intermediate": ({"strategy": {"name": "intermediate"}}, "hidden-state MSE on the layer map + logit KD"),
    "alternate": ({"student": {"init": "alternate"}}, "init: alternate blocks [0,2,4,6,8,10]"),
    "first": ({"student": {"init": "first"}}, "init: first six blocks"),
    "default-seed1": ({"train": {"seed": 1}}, "default, seed 1"),
    "hard-only-seed1": ({"strategy": {"name": "hard-only"}, "train": {"seed": 1}}, "hard-only, seed 1"),
    "hard-only-lr-1e-3": ({"strategy": {"name": "hard-only"}, "train": {"lr": 1e-3}},
                          "hard-only at peak lr 1e-3 (the control of today's default)"),
    "lr-1e-3-seed1": ({"train": {"lr": 1e-3, "seed": 1}}, "peak lr 1e-3, seed 1"),
    "hard-only-lr-1e-3-800": ({"strategy": {"name": "hard-only"}, "train": {"lr": 1e-3, "max_steps": 2 * STEPS}},
                              "hard-only, lr 1e-3, 800 steps (the control of the new default and of cache-2x-lr-1e-3)"),
    "cache-2x-lr-1e-3-seed1": ({"train": {"max_steps": 2 * STEPS, "lr": 1e-3, "seed": 1}, "teacher_cache": "{cache}"},
                               "teacher cache, 2x the steps, peak lr 1e-3, seed 1"),
    "cache-4x-lr-1e-3": ({"train": {"max_steps": 4 * STEPS, "lr": 1e-3}, "teacher_cache": "{cache}"},
                         "teacher cache, 4x the steps, peak lr 1e-3"),
    "hard-only-lr-1e-3-1230": ({"strategy": {"name": "hard-only"}, "train": {"lr": 1e-3, "max_steps": 1230}},
                               "hard-only, lr 1e-3, 1230 steps: what 15 idle minutes give it (the default's clock)"),
    "alternate-lr-1e-3": ({"student": {"init": "alternate"}, "train": {"lr": 1e-3}}, "init alternate, peak lr 1e-3"),
    "reverse-kl-seed1": ({"strategy": {"name": "jsd", "params": {"beta": 1.0, "alpha_clm": 0.5}}, "train": {"seed": 1}},
                         "reverse KL (MiniLLM), seed 1"),
    "reverse-kl-lr-1e-3": ({"strategy": {"name": "jsd", "params": {"beta": 1.0, "alpha_clm": 0.5}},
                            "train": {"lr": 1e-3}}, "reverse KL (MiniLLM), peak lr 1e-3"),
    "reverse-kl-lr-1e-3-seed1": ({"strategy": {"name": "jsd", "params": {"beta": 1.0, "alpha_clm": 0.5}},
                                  "train": {"lr": 1e-3, "seed": 1}}, "reverse KL (MiniLLM), peak lr 1e-3, seed 1"),
    "hard-only-lr-1e-3-seed1": ({"strategy": {"name": "hard-only"}, "train": {"lr": 1e-3, "seed": 1}},
                                "hard-only at peak lr 1e-3, seed 1"),
    # the 15-minute default's 618 steps, bound by steps (a second seed of the timed no-flag runs)
    "forward-kl-618-seed1": ({"train": {"lr": 1e-3, "max_steps": 618, "seed": 1}},
                             "forward KL (the default until issue 20), lr 1e-3, 618 steps, seed 1"),
    "reverse-kl-618-seed1": ({"strategy": {"name": "reverse-kl"}, "train": {"lr": 1e-3, "max_steps": 618, "seed": 1}},
                             "reverse KL (today's default), lr 1e-3, 618 steps, seed 1"),
}


def completion_sets(out: Path) -> dict[str, Path]:
    """The two fixed 500-sample sets, written once as {id, input, gt} lines (a rerun reads the same files)."""
    import importlib

    sets = {"stdlib": out / "stdlib_test.jsonl", "thirdparty": out / "thirdparty.jsonl"}
    if not sets["stdlib"].exists():
        spec = EvalSpec(samples=SAMPLES, seed=0)
        docs, _ = eval_docs(spec)
        write_lines_file(sets["stdlib"], build_line_samples(docs, SAMPLES, 0))
    if not sets["thirdparty"].exists():
        from kdcode.data.corpus import Document

        docs = []
        for name in THIRD_PARTY:
            root = Path(importlib.import_module(name).__file__).parent
            for p in sorted(root.rglob("*.py")):
                try:
                    docs.append(Document(f"{name}/{p.relative_to(root).as_posix()}", p.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError):
                    pass
        write_lines_file(sets["thirdparty"], [s for s in build_line_samples(docs, SAMPLES, 0) if s.gt.strip()])
    return sets


def _prev_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def score(model: str, lines: Path) -> dict[str, Any]:
    """ES, EM, SE of ES and the baseline on one completion set (greedy, as `kdcode eval`)."""
    samples = [LineSample(**json.loads(x)) for x in lines.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        pred_file = Path(tmp) / "pred.txt"
        result = run_eval(model, EvalSpec(lines=str(lines), samples=len(samples), ppl_blocks=0, threads=None),
                          predictions=pred_file)
        preds = pred_file.read_text(encoding="utf-8").split("\n")[: len(samples)]
    es = [sample_scores(p, s.gt)[0] for p, s in zip(preds, samples)]
    base = [sample_scores(_prev_line(s.input), s.gt)[0] for s in samples]
    return {
        "es": round(statistics.mean(es), 2), "es_se": round(statistics.stdev(es) / math.sqrt(len(es)), 2),
        "em": result["em"], "kdcode_es": result["es"], "samples": len(es),
        "baseline_es": round(statistics.mean(base), 2), "seconds": result["seconds"],
    }


def run_row(name: str, overrides: dict[str, Any], out: Path, sets: dict[str, Path], cache: Path) -> dict[str, Any]:
    folder = out / "students" / name
    if (folder / "kdcode.json").exists():
        shutil.rmtree(folder)
    text = json.dumps(overrides).replace("{cache}", str(cache))
    data = json.loads(text)
    data.setdefault("train", {})
    data["train"] = {"max_steps": STEPS, "lr": BASE_LR, **data["train"]}
    data["strategy"] = {"name": BASE_STRATEGY, **data.get("strategy", {})}
    spec = resolve_run_spec({"out": str(folder)}, data, f"row {name}")
    if spec.teacher_cache and not (cache / "cache.json").exists():
        from kdcode.train.distil import run_cache_teacher

        run_cache_teacher(spec.teacher.name, spec.data, spec.train.block_size, 64, 2.0, cache, batch_size=16)
    t0 = time.perf_counter()
    _, manifest = run_distil(spec)
    wall = time.perf_counter() - t0
    tr = manifest["training"]
    row = {"name": name, "overrides": overrides, "steps": tr["steps"], "train_time_s": tr.get("train_time_s"),
           "wall_s": round(wall, 1), "valid_loss": tr["final"].get("valid_loss")}
    for key, lines in sets.items():
        row[key] = score(str(folder), lines)
    return row


def score_folder(name: str, folder: Path, sets: dict[str, Path]) -> dict[str, Any]:
    """A row for a student trained elsewhere: its manifest's training figures and its scores on both sets."""
    tr = json.loads((folder / "kdcode.json").read_text())["training"]
    return {"name": name, "overrides": {}, "note": f"scored from {folder}", "steps": tr["steps"],
            "train_time_s": tr.get("train_time_s"), "valid_loss": tr["final"].get("valid_loss"),
            **{key: score(str(folder), lines) for key, lines in sets.items()}}


def table(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> str:
    head = ("| row | change | steps | stdlib ES ± SE | x teacher | 3rd-party ES ± SE | x teacher | EM std/3rd |"
            " valid loss |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        s, t = r["stdlib"], r["thirdparty"]
        lines.append(
            f"| {r['name']} | {ROWS.get(r['name'], ({}, r.get('note', '')))[1]} | {r.get('steps', '')} | "
            f"{s['es']:.2f} ± {s['es_se']:.2f} | {s['es'] / teacher['stdlib']['es']:.3f} | "
            f"{t['es']:.2f} ± {t['es_se']:.2f} | {t['es'] / teacher['thirdparty']['es']:.3f} | "
            f"{s['em']:.1f} / {t['em']:.1f} | {r.get('valid_loss') or 0:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all, in order)")
    ap.add_argument("--score", action="append", default=[], metavar="NAME=FOLDER",
                    help="score a student made elsewhere (e.g. `kdcode distil` with no flags) as row NAME")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sets = completion_sets(args.out)
    results = args.out / "results.jsonl"
    done = {json.loads(x)["name"]: json.loads(x) for x in results.read_text().splitlines()} if results.exists() else {}
    if "teacher" not in done:
        done["teacher"] = {"name": "teacher", "note": "the bundled teacher (12 layers)",
                           **{k: score("bundled", v) for k, v in sets.items()}}
        with results.open("a") as fh:
            fh.write(json.dumps(done["teacher"]) + "\n")
    bad = [x for x in args.score if "=" not in x or not (Path(x.split("=", 1)[1]) / "kdcode.json").is_file()]
    if bad:
        ap.error(f"--score {bad[0]}: give NAME=FOLDER, a student folder with its kdcode.json")
    made = dict(x.split("=", 1) for x in args.score)
    for name in list(made) if made else args.rows.split(","):
        if name in done:
            continue
        if name in made:
            row = score_folder(name, Path(made[name]), sets)
        else:
            print(f"== {name}: {ROWS[name][1]}", flush=True)
            row = run_row(name, ROWS[name][0], args.out, sets, args.out / "teacher_cache")
        done[name] = row
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        # other processes may append rows to the same file: the table is written from all of them
        done.update({json.loads(x)["name"]: json.loads(x) for x in results.read_text().splitlines()})
        teacher = done["teacher"]
        base = {"name": "baseline", "note": "repeat the previous line",
                "stdlib": {**teacher["stdlib"], "es": teacher["stdlib"]["baseline_es"], "em": 0.0},
                "thirdparty": {**teacher["thirdparty"], "es": teacher["thirdparty"]["baseline_es"], "em": 0.0}}
        ordered = [teacher, base] + [done[n] for n in ROWS if n in done] + [r for n, r in done.items()
                                                                          if n not in ROWS and n != "teacher"]
        (args.out / "results.md").write_text(table(ordered, teacher))
        print(table(ordered, teacher).splitlines()[-1], flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
