"""Messages are text, never Rich markup: a model path holding ``[/b]`` prints as it is (no MarkupError traceback)
and ``pip install 'kdcode[onnx]'`` keeps its brackets. The source is checked too: every Rich console and text
column kdcode makes reads no markup, and no message carries a markup tag."""

from __future__ import annotations

import ast
import io
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import run
from rich.console import Console

import kdcode

ROOT = Path(kdcode.__file__).parent
# a style tag Rich would read ("[green]", "[bold red]", "[/]", "[/yellow]"): in a message it would be eaten or shown
STYLES = "bold|italic|dim|underline|red|green|yellow|blue|magenta|cyan|white|link"
STYLE_TAG = re.compile(rf"\[/\]|\[/?(?:{STYLES})\b[^\]]*\]")


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    out.append((path, node))
    return out


def _markup_off(call: ast.Call) -> bool:
    return any(k.arg == "markup" and isinstance(k.value, ast.Constant) and k.value.value is False
               for k in call.keywords)


def test_every_rich_console_and_text_column_reads_no_markup():
    consoles = _calls("Console")
    assert consoles, "kdcode makes its consoles somewhere"
    for name in ("Console", "TextColumn"):
        for path, call in _calls(name):
            assert _markup_off(call), f"{path.relative_to(ROOT)}:{call.lineno}: {name}(...) without markup=False"
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.keyword) and node.arg == "markup":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{where}: markup on"
            if isinstance(node, ast.ImportFrom) and node.module in ("rich", "rich.markup"):
                assert all(a.name != "print" for a in node.names) and node.module != "rich.markup", \
                    f"{where}: rich's print or markup helpers (messages are text)"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not STYLE_TAG.search(node.value), f"{where}: a markup tag in {node.value[:60]!r}"
                assert "\\[" not in node.value, f"{where}: a markup escape in {node.value[:60]!r}"


@pytest.fixture()
def bracketed(tmp_path) -> Path:
    """A folder whose path holds ``[/b]``: ``.../m[/b]x``."""
    folder = tmp_path / "m[" / "b]x"
    folder.mkdir(parents=True)
    return folder


def _one_error_line(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exception, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_serve_export_and_complete_errors_print_a_bracketed_path_as_it_is(bracketed):
    missing = str(bracketed / "nope")
    _one_error_line(run("serve", missing), f"{missing} does not exist")
    _one_error_line(run("export", missing, "--format", "gguf", "--out", str(bracketed / "o.gguf")),
                    f"{missing} does not exist")
    _one_error_line(run("complete", str(bracketed), input="x = "), f"{bracketed} has no config.json")


def test_export_to_a_bracketed_path_says_where_it_wrote(student_src, bracketed):
    pytest.importorskip("gguf")
    out = bracketed / "s.gguf"
    result = run("export", str(student_src), "--format", "gguf", "--out", str(out))
    assert result.exit_code == 0, (result.exception, result.output)
    assert f"GGUF written to {out} " in result.output and f"ollama create NAME -f {bracketed}/s.Modelfile" in \
        result.output
    assert sorted(p.name for p in bracketed.iterdir()) == ["s.Modelfile", "s.gguf", "s.kdcode.json"]


def test_pip_lines_keep_their_extras(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if it were not installed
    result = run("complete", str(gguf), input="x = ")
    _one_error_line(result, "pip install 'kdcode[llamacpp]'")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"onnx")
    (onnx / "kdcode.json").write_text(json.dumps({"kind": "export", "format": "onnx"}))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    _one_error_line(run("complete", str(onnx), input="x = "), "pip install 'kdcode[onnx]'")


def test_a_progress_bar_shows_a_bracketed_task_as_it_is():
    from kdcode.progress import make_progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, markup=False, color_system=None)
    with make_progress(console=console) as progress:
        task = progress.add_task("eval m[/b]x", total=2, info="loss [/i] 1.0")
        progress.update(task, advance=2)
    assert "eval m[/b]x" in buf.getvalue() and "loss [/i] 1.0" in buf.getvalue()


def test_tables_and_styled_lines_are_text():
    from kdcode.cli._console import metrics_table, styled

    buf = io.StringIO()
    console = Console(file=buf, width=200, markup=False, color_system=None)
    console.print(metrics_table("[min-max]", [("m[/b]x", {"es": "1 [0-2]"})], [("es", "ES")]))
    console.print(styled("wrote", "green", "a[/b] [red]x"))
    text = buf.getvalue()
    assert "[min-max]" in text and "m[/b]x" in text and "1 [0-2]" in text and "\\[" not in text
    assert "wrote a[/b] [red]x" in text
