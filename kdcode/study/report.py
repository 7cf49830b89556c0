"""A sweep's results as the study shows them: a Markdown table and a size/speed-vs-ES Pareto plot.

Everything here reads results.jsonl records only (``kdcode report`` rebuilds both files from them).
The table has the study's columns (Model, Params (M), Size (MB), Inf (samples/s), ES, EM) and, for
each, the ratio of the student's figure to its teacher's. The plot needs matplotlib (``kdcode[plots]``);
without it the table is still written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdcode.errors import KdcodeError

# (header, record section, key, decimals): the study's columns.
COLUMNS = [
    ("Params (M)", "bench", "params_m", None),
    ("Size (MB)", "bench", "size_mb", None),
    ("Inf (samples/s)", "bench", "samples_per_s", None),
    ("ES", "eval", "es", 2),
    ("EM", "eval", "em", 2),
]
# shown when a record has an infill eval (a sweep with `infill: true` / --task infill)
INFILL_COLUMN = ("Infill ES", "infill", "es", 2)
# shown when a sweep measures its students as the teacher's speculative drafts (`draft_tokens: k`)
ACCEPTANCE_COLUMNS = [("Accepted/pass", "acceptance", "accepted_per_pass", 2),
                      ("Acceptance", "acceptance", "acceptance_rate", 2)]
MD = "results.md"
PNG = "pareto.png"
NO_MATPLOTLIB = "matplotlib is not installed, so pareto.png was not drawn: pip install 'kdcode[plots]'"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a results.jsonl file, in order (a torn last line from a kill is skipped)."""
    if not path.is_file():
        raise KdcodeError(f"{path} does not exist; pass the results.jsonl of a sweep")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines):  # interrupted mid-write: that point simply runs again
                break
            raise KdcodeError(f"{path}:{i} is not a JSON record ({exc.msg}); fix or remove that line") from exc
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed to disk before the next point starts."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())



def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each name (a resumed point supersedes its failure) at the place of its first one
    (the sweep's order), teachers first."""
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        if "name" in r:
            last[r["name"]] = r
    rows = list(last.values())
    return [r for r in rows if r.get("kind") == "teacher"] + [r for r in rows if r.get("kind") != "teacher"]


def value(record: dict[str, Any], section: str, key: str) -> float | None:
    v = (record.get(section) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _fmt(v: float | None, decimals: int | None = None) -> str:
    if v is None:
        return "–"
    if decimals is not None:
        return f"{v:.{decimals}f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, int | None]]:
    return (COLUMNS + ([INFILL_COLUMN] if any(r.get("infill") for r in rows) else [])
            + (ACCEPTANCE_COLUMNS if any(r.get("acceptance") for r in rows) else []))


def table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (strings) of the results table: ok records only, each with its ratio to its teacher."""
    rows_in = [r for r in latest(records) if r.get("status") == "ok"]
    teachers = {r["name"]: r for r in rows_in if r.get("kind") == "teacher"}
    columns = _columns(rows_in)
    headers = ["Model"]
    for header, *_ in columns:
        headers += [header, f"{header.split(' (')[0]} ratio"]
    rows = []
    for r in rows_in:
        base = teachers.get(r.get("baseline") or "")
        for shown in [r, *([_trivial_baseline(r)] if r.get("kind") == "teacher" else [])]:
            if shown is None:
                continue
            row = [shown["name"]]
            for _, section, key, decimals in columns:
                v = value(shown, section, key)
                t = value(base or r, section, key)
                row += [_fmt(v, decimals), f"{v / t:.2f}" if v is not None and t else "–"]
            rows.append(row)
    return headers, rows


def _trivial_baseline(teacher: dict[str, Any]) -> dict[str, Any] | None:
    """The repeat-the-previous-line baseline, scored on the teacher's samples, as a row of its own: no table hides
    that a model is below it."""
    line = (teacher.get("eval") or {}).get("baseline")
    if not line:
        return None
    infill = (teacher.get("infill") or {}).get("baseline")
    return {"name": f"baseline: {line.get('name', 'repeat previous line')}", "eval": line,
            "infill": infill or {}, "bench": {}}


def markdown(records: list[dict[str, Any]]) -> str:
    headers, rows = table(records)
    lines = ["# kdcode sweep results", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Ratios are the model's figure divided by its teacher's (the `teacher` row)."]
    ok = [r for r in latest(records) if r.get("status") == "ok"]
    if ok:
        be, ev = ok[0].get("bench") or {}, ok[0].get("eval") or {}
        dec = ev.get("decoding") or {}
        lines.append(
            f"ES/EM: {ev.get('samples')} line completions ({ev.get('split')} split, beams {dec.get('beams')}, "
            f"format {dec.get('format')}); Size: weight files on disk; Inf: completions per second, "
            f"{be.get('new_tokens')} new tokens each, batch {be.get('batch_size')}, on {be.get('device')} "
            f"({be.get('cpu')}), {be.get('dtype')}, {be.get('threads')} thread(s)."
        )
        infill = [r for r in ok if r.get("infill")]
        if infill:
            lines.append(
                f"Infill ES: {infill[0]['infill'].get('samples')} single-line holes of the same files (prefix and "
                "suffix around one removed line, `kdcode eval --task infill`); prefix-only ES of the same holes: "
                + ", ".join(f"{r['name']} {r['infill'].get('prefix_only', {}).get('es')}" for r in infill) + "."
            )
        drafts = [r for r in ok if r.get("acceptance")]
        if drafts:
            a = drafts[0]["acceptance"]
            lines.append(
                f"Accepted/pass, Acceptance: each student drafting for its teacher (greedy, k={a.get('draft_tokens')} "
                f"draft tokens per teacher pass, `kdcode eval --draft-for`) on {a.get('samples')} of the same held-out "
                "lines: draft tokens accepted per teacher pass, and the share of draft tokens accepted."
            )
    failed = [r for r in latest(records) if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed points (rerun with `kdcode sweep ... --resume`)", ""]
        lines += [f"- `{r['name']}` at {r.get('stage')}: {r.get('error')}" for r in failed]
    return "\n".join(lines) + "\n"


def _front(xy: list[tuple[float, float]], smaller_x_better: bool) -> list[tuple[float, float]]:
    """The non-dominated points (higher ES is better), sorted by x."""
    pts = sorted(xy, key=lambda p: (p[0] if smaller_x_better else -p[0], -p[1]))
    front, best = [], float("-inf")
    for x, y in pts:
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """ES against size and against speed, every model labelled; False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # the object API: no backend is chosen or switched
    except ImportError:
        return False
    ok = [r for r in latest(records) if r.get("status") == "ok"]
    fig = Figure(figsize=(12, 5), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, label, smaller_better) in zip(
        axes, (("size_mb", "Size (MB)", True), ("samples_per_s", "Inf (samples/s)", False))
    ):
        xy = []
        for r in ok:
            x, y = value(r, "bench", key), value(r, "eval", "es")
            if x is None or y is None:
                continue
            teacher = r.get("kind") == "teacher"
            ax.scatter(
                [x],
                [y],
                marker="*" if teacher else "o",
                s=160 if teacher else 40,
                color="tab:red" if teacher else "tab:blue",
                zorder=3,
            )
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            xy.append((x, y))
        if len(xy) > 1:
            front = _front(xy, smaller_better)
            ax.plot(
                [p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, zorder=2, label="Pareto front"
            )
            ax.legend(loc="best", fontsize=8)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        ax.set_xlabel(label + (" (smaller is better)" if smaller_better else " (larger is better)"))
        ax.set_ylabel("ES (edit similarity)")
        ax.set_title(f"ES against {'size' if smaller_better else 'speed'}")
        ax.grid(True, alpha=0.3)
    devices = sorted({str((r.get("bench") or {}).get("device")) for r in ok})
    fig.suptitle(f"kdcode sweep: {len(ok)} models, measured on {', '.join(devices)}", fontsize=10)
    fig.savefig(path)
    return True


def write_report(records: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write results.md (always) and pareto.png (with matplotlib) into ``out``; say what was written."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / MD
    md.write_text(markdown(records), encoding="utf-8")
    png = out / PNG
    drawn = plot(records, png)
    return {"results_md": md, "pareto_png": png if drawn else None, "note": None if drawn else NO_MATPLOTLIB}
