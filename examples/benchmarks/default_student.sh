#!/usr/bin/env bash
# Issue 3's goal for the default run: the default student keeps >= 97% of the bundled teacher's ES and
# runs >= 1.9x faster. Evaluates and benchmarks teacher and student on the same held-out samples
# (stdlib test split, seed 0) and prints both ratios.
#   examples/benchmarks/default_student.sh [STUDENT_DIR] [SAMPLES]
set -euo pipefail
student=${1:-student}
samples=${2:-500}
out=${OUT:-runs/default_student}
mkdir -p "$out"
kdcode eval bundled --samples "$samples" --json "$out/teacher_eval.json"
kdcode eval "$student" --samples "$samples" --json "$out/student_eval.json"
kdcode bench "$student" --compare bundled --json "$out/bench.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
t = json.load(open(f"{out}/teacher_eval.json"))
s = json.load(open(f"{out}/student_eval.json"))
b = json.load(open(f"{out}/bench.json"))
es_ratio = s["es"] / t["es"]
speed = b["samples_per_s"] / b["compare"]["samples_per_s"]
print(f"teacher ES {t['es']} EM {t['em']} ppl {t['perplexity']}; student ES {s['es']} EM {s['em']} ppl {s['perplexity']}")
print(f"baseline (repeat previous line) ES {t['baseline']['es']}")
print(f"ES ratio {es_ratio:.3f} (goal >= 0.97); throughput ratio {speed:.2f}x (goal >= 1.9x) "
      f"on {b['device']} {b['cpu']}, {b['threads']} threads, {b['dtype']}")
json.dump({"teacher": t, "student": s, "bench": b, "es_ratio": es_ratio, "speedup": speed},
          open(f"{out}/summary.json", "w"), indent=2)
PY
