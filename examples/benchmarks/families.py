"""Which model families kdcode handles (issue 18.3): every causal-LM architecture of the installed transformers
that can be built from a tiny generic config goes through the commands a user runs, and each gets pass/fail.

Per architecture: a random teacher (4 blocks, width 64, 4 heads, 2 key-value heads where the family has them,
small MoE where it has experts; the vocabulary of a BPE tokenizer trained here on a few stdlib files) is
saved with that tokenizer as a plain Hugging Face folder. Then, each through the `kdcode` CLI:

- copy:     the init's student block i equals teacher block map[i] (spread, 4 -> 3 blocks);
- distil:   `distil --init spread --strategy pretraining --layers 3` (2 steps);
- interm.:  `distil --init alternate --strategy intermediate --layers 2` (2 steps);
- reload:   the student with plain `AutoModelForCausalLM` / `AutoTokenizer`, same logits as kdcode's load;
- eval, bench, complete, int8 (`compress --int8`, then one completion from the int8 folder).

A cell holds `ok`, or the first words of the error; `-` where an earlier step failed. No hub access.

    python examples/benchmarks/families.py                      # all architectures (~10-20 min on 2 cores)
    python examples/benchmarks/families.py --only llama qwen2   # some
    python examples/benchmarks/families.py --markdown families.md --json families.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from kdcode.cli import app
from kdcode.data.bpe import train_bpe
from kdcode.plugins import make_init

STEP_SECONDS = 180  # a family whose tiny model takes longer for one command is reported as too slow here
COMMANDS = ("copy", "distil", "interm.", "reload", "eval", "bench", "complete", "int8")
# What a tiny teacher of any family is made of; a key is given only where the family's config has it.
TINY: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "max_position_embeddings": 256, "n_inner": 128, "ffn_dim": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "n_shared_experts": 1, "shared_expert_intermediate_size": 32,
    "sliding_window": 64, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "rotary_dim": 8,
    # state-space and hybrid blocks (Mamba, Jamba, Falcon-H1, ...): small states, few heads
    "state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_expand": 2, "time_step_rank": 8, "expand": 2, "n_groups": 1,
}
DROPOUTS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
            "hidden_dropout_prob", "attention_probs_dropout_prob")


def corpus(folder: Path, n: int = 24) -> Path:
    """A few small stdlib modules (the test corpus's rule: 2-25 kB each)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    picked = [p for p in sorted(root.glob("*.py")) if 2_000 <= p.stat().st_size <= 25_000][:n]
    for p in picked:
        shutil.copy(p, folder / p.name)
    return folder


def tiny_config(model_type: str, tokenizer: Any) -> Any:
    """The family's config at tiny size (only keys its default config has), or an exception."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    kwargs = {k: v for k, v in TINY.items() if hasattr(default, k)}
    kwargs.update({k: 0.0 for k in DROPOUTS if isinstance(getattr(default, k, None), float)})
    kwargs.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = cls(**kwargs)
    if getattr(config, "num_hidden_layers", None) != 4:
        raise ValueError(f"tiny config has {getattr(config, 'num_hidden_layers', None)} layers, not 4")
    return config


def build_teacher(model_type: str, tokenizer: Any, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tokenizer)).eval()
    with torch.no_grad():  # a config the family cannot run is the builder's failure, not kdcode's
        model(torch.tensor([tokenizer("def f(x):\n    return x")["input_ids"]]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def blocks_copied(teacher: Any) -> None:
    """Student block i == teacher block map[i], tensor for tensor (spread, 4 -> 3)."""
    from kdcode.inits.base import block_path

    student, layer_map = make_init("spread", {}).build(teacher, 3)
    path = block_path(teacher)
    t_blocks, s_blocks = teacher.get_submodule(path), student.get_submodule(path)
    for i, j in enumerate(layer_map):
        ts, ss = t_blocks[j].state_dict(), s_blocks[i].state_dict()
        if ts.keys() != ss.keys() or not all(torch.equal(ts[k], ss[k]) for k in ts):
            raise AssertionError(f"student block {i} is not teacher block {j}")


runner = CliRunner(env={"COLUMNS": "200", "TERM": "dumb"})


def cli(*args: Any) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    if r.exit_code != 0:
        text = r.output.strip() or repr(r.exception)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit {r.exit_code}")


def distil(teacher: Path, out: Path, data: Path, init: str, strategy: str, layers: int) -> None:
    cli("distil", "--teacher", teacher, "--init", init, "--strategy", strategy, "--layers", layers,
        "--data", data, "--max-steps", 2, "--batch-size", 2, "--block-size", 32, "--precision", "fp32",
        "--out", out)


def reload(student: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdcode.models.load import load_model

    plain = AutoModelForCausalLM.from_pretrained(student).eval()
    tok = AutoTokenizer.from_pretrained(student)
    x = torch.tensor([tok("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        a, b = plain(x).logits, load_model(str(student)).model(x).logits
    if not torch.allclose(a, b, atol=1e-5):
        raise AssertionError("plain transformers and kdcode load different logits")


def run_family(model_type: str, tokenizer: Any, work: Path, data: Path, sample: Path) -> dict[str, str]:
    """One row: each command's 'ok' or error, '-' once an earlier step it needs failed."""
    row = {c: "-" for c in COMMANDS}
    teacher_dir, student, student2, q8 = (work / model_type / n for n in ("teacher", "student", "s2", "int8"))

    def step(name: str, fn: Any, *args: Any) -> bool:
        signal.alarm(STEP_SECONDS)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                fn(*args)
            row[name] = "ok"
            return True
        except Exception as exc:  # noqa: BLE001 - the table shows what broke
            text = " ".join(str(exc).split()) or type(exc).__name__
            row[name] = text[:90]
            if "--verbose" in sys.argv:
                traceback.print_exc()
            return False
        finally:
            signal.alarm(0)

    holder: dict[str, Any] = {}
    if not step("copy", lambda: holder.update(t=build_teacher(model_type, tokenizer, teacher_dir))):
        row["copy"] = "build: " + row["copy"]
        return row
    step("copy", blocks_copied, holder["t"])
    if step("distil", distil, teacher_dir, student, data, "spread", "pretraining", 3):
        step("reload", reload, student)
        step("eval", cli, "eval", student, "--data", data, "--samples", 4, "--max-new-tokens", 4,
             "--ppl-blocks", 2, "--batch-size", 2)
        step("bench", cli, "bench", student, "--data", data, "--prompts", 2, "--new-tokens", 4)
        step("complete", cli, "complete", student, "--file", sample, "--line", 3, "--max-tokens", 4)
        if step("int8", cli, "compress", student, "--int8", "--out", q8, "--data", data):
            step("int8", cli, "complete", q8, "--file", sample, "--line", 3, "--max-tokens", 4)
    step("interm.", distil, teacher_dir, student2, data, "alternate", "intermediate", 2)
    shutil.rmtree(work / model_type, ignore_errors=True)
    return row


class TooSlow(Exception):
    def __init__(self, *args: Any) -> None:
        super().__init__(f"over {STEP_SECONDS} s (a reference kernel on CPU?)")


def _too_slow(signum: int, frame: Any) -> None:
    raise TooSlow()


def markdown(rows: dict[str, dict[str, str]]) -> str:
    lines = ["| family | " + " | ".join(COMMANDS) + " |", "|---" * (len(COMMANDS) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(row[c].replace("|", "/") for c in COMMANDS) + " |")
    return "\n".join(lines)


def main() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="these model types (default: every causal-LM architecture)")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _too_slow)
    names = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="kdcode-families-") as tmp:
        work = Path(tmp)
        data = corpus(work / "corpus")
        tokenizer = train_bpe([p.read_text(encoding="utf-8") for p in sorted(data.glob("*.py"))], vocab_size=512)
        sample = work / "sample.py"
        sample.write_text("import os\n\ndef main(path):\n    return os.path.join(path, 'x')\n", encoding="utf-8")
        for name in names:
            t0 = time.perf_counter()
            rows[name] = run_family(name, tokenizer, work, data, sample)
            ok = sum(v == "ok" for v in rows[name].values())
            print(f"{name:28s} {ok}/{len(COMMANDS)} ok  ({time.perf_counter() - t0:.1f} s)", flush=True)
    import transformers

    table = markdown(rows)
    full = sum(all(v == "ok" for v in r.values()) for r in rows.values())
    summary = (f"transformers {transformers.__version__}, torch {torch.__version__}: {full} of {len(rows)} "
               "causal-LM architectures pass every command")
    print(f"\n{summary}\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"{summary}\n\n{table}\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
