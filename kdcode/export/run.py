"""`kdcode export`: a model folder as one GGUF file or an ONNX folder, with the manifest chain.

Both record the source (its path, the sha256 of its weight files, its own manifest) and the export settings:

- ONNX: ``OUT/kdcode.json`` (kind ``export``), with the sha256 of ``model.onnx`` under ``weights_sha256`` so that
  loading checks it as it checks any kdcode folder; the folder also holds ``config.json`` and the tokenizer.
- GGUF: the provenance inside the file (key ``kdcode.manifest``: source, settings, kdcode version), and a sidecar
  ``F.kdcode.json`` beside ``F.gguf`` with the same plus the GGUF's own sha256 (checked on load when present),
  and the ollama ``F.Modelfile``.

A quantized export (GGUF ``--quant`` other than f32, ONNX ``--int8``) is measured before it reports success: ES and
perplexity of the float source and of the export in its runtime on the same held-out code
(:mod:`kdcode.compression.quality`), recorded under ``quality`` in the manifest (the GGUF's sidecar); where the
runtime is not installed (llama-cpp-python for GGUF) the record says so.

Outputs are checked before the model is loaded (never inside the source, writable, enough space) and written
atomically: a killed export leaves no half-written file or folder under the asked name, and a GGUF's three files
replace the old ones together or not at all (:mod:`kdcode.export.fileset`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from kdcode import __version__
from kdcode.compression.quality import check_spec, compare, in_memory, measure, skipped
from kdcode.errors import KdcodeError
from kdcode.export.fileset import atomic_files, modelfile_path, sidecar_path  # noqa: F401 - paths re-exported
from kdcode.export.gguf_file import MANIFEST_KEY, write_gguf
from kdcode.export.modelfile import modelfile
from kdcode.export.onnx_graph import export_onnx, quantize_int8
from kdcode.models.artifacts import (
    MANIFEST,
    atomic_dir,
    check_output,
    kdcode_layout,
    library_versions,
    read_manifest,
    sha256_file,
    utc_now,
    weights_sha256,
    write_error,
    write_json,
)
from kdcode.models.fim_tokens import detect, infill_order
from kdcode.models.load import context_length, load_model, resolve_path, weights_bytes
from kdcode.quiet import quiet_hf, quiet_loggers
from kdcode.spec_compress import ExportCheckSpec, ExportSpec

BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _libraries(*names: str) -> dict[str, str]:
    out = library_versions()
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _source(lm: Any) -> dict[str, Any]:
    return {"name": lm.name, "path": str(lm.folder.resolve()) if lm.folder else None,
            "weights_sha256": weights_sha256(lm.folder) if lm.folder else {"hub": lm.fingerprint},
            "hub": lm.hub and {k: lm.hub[k] for k in ("id", "revision")}, "verified": lm.verified,
            "n_layer": lm.n_layer, "params_m": round(lm.params / 1e6, 3)}


def _load(name: str, verify: bool) -> Any:
    lm = load_model(name, check=verify, dtype=torch.float32)
    layout = kdcode_layout(lm.manifest)
    if layout.get("int8") or layout.get("heads_per_layer"):
        kind = "int8" if layout.get("int8") else "head-pruned (layers differ in heads)"
        raise KdcodeError(f"{name} is {kind}, which GGUF and ONNX cannot hold as it is; export its float parent "
                          "and quantize there (--quant q8_0, --int8)")
    lm.model.float().eval()
    return lm


def run_export(name: str, spec: ExportSpec, out: Path, overwrite: bool = False,
               verify: bool = True, check: ExportCheckSpec | None = None) -> tuple[Path, dict[str, Any]]:
    """Export ``name`` as ``spec`` says to ``out`` (a .gguf file, or a folder for ONNX); a quantized export is
    measured against its source as ``check`` says (None: not measured; the CLI always passes one). Returns (out,
    manifest)."""
    source = resolve_path(name)
    size = weights_bytes(name)
    _check_extra(spec.format)
    if spec.format == "gguf":
        out = Path(out)
        if out.suffix != ".gguf":
            raise KdcodeError(f"--out {out}: a GGUF export is one file; name it F.gguf")
        need = int(size / 4 * BYTES_PER_WEIGHT[spec.quant or "f32"]) if size else None
        check_output(out, overwrite, {"MODEL": source}, need_bytes=need, folder=False)
        for path in (out, sidecar_path(out), modelfile_path(out)):
            if path.is_dir() and not path.is_symlink():
                raise KdcodeError(f"{path} is a folder, where the export writes a file: move it away or choose "
                                  "another --out")
            if path.exists() and not overwrite:
                raise KdcodeError(f"{path} exists; choose another --out or pass --overwrite")
        lm = _load(name, verify)
        before = _before(lm, spec, check)
        return out, _with_quality(_export_gguf(lm, spec, out), out, sidecar_path(out), before)
    check_output(out, overwrite, {"MODEL": source}, need_bytes=2 * size if size else None)
    lm = _load(name, verify)
    before = _before(lm, spec, check)
    return out, _with_quality(_export_onnx(lm, spec, out, overwrite), out, out / "kdcode.json", before)


def _before(lm: Any, spec: ExportSpec, check: ExportCheckSpec | None) -> dict[str, Any] | None:
    """The float source measured, when the export quantizes; or why its export cannot be measured here."""
    if check is None:
        return None
    quant = (spec.quant or "f32") if spec.format == "gguf" else ("int8" if spec.int8 else "f32")
    eval_spec = check_spec(check, check.data)
    if quant == "f32" or eval_spec is None:
        return None
    if spec.format == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        return {"quality": skipped(f"llama-cpp-python is not installed, so the {quant} GGUF cannot be run here "
                                   "(pip install llama-cpp-python, then kdcode eval F.gguf)")}
    return {"what": f"{spec.format} {quant}", "check": check, "spec": eval_spec,
            "before": measure(lm.name, eval_spec, check.check_samples, in_memory(lm.model, lm.tokenizer, lm.verified))}


def _with_quality(manifest: dict[str, Any], out: Path, record: Path, before: dict[str, Any] | None) -> dict[str, Any]:
    """The written export measured in its runtime against ``before``; the manifest file gains ``quality``."""
    if before is None:
        return manifest
    quality = before.get("quality")
    if quality is None:
        after = measure(str(out), before["spec"], before["check"].check_samples)
        quality = compare(before["before"], after, before["check"], before["what"])
    manifest = {**manifest, "quality": quality}
    write_json(record, manifest)
    return manifest


def _check_extra(fmt: str) -> None:
    """The packages an export needs, named before any work."""
    need = {"gguf": (["gguf"], "gguf"), "onnx": (["onnx", "onnxscript", "onnxruntime"], "onnx")}[fmt]
    missing = [m for m in need[0] if importlib.util.find_spec(m) is None]
    if missing:
        raise KdcodeError(f"--format {fmt} needs {', '.join(missing)}: pip install 'kdcode[{need[1]}]'")


def _provenance(lm: Any, spec: ExportSpec) -> dict[str, Any]:
    return {"kind": "export", "kdcode_version": __version__,
            "created_at": utc_now(),
            "export": spec.model_dump(mode="json"), "source": _source(lm),
            **({"fim": lm.manifest["fim"]} if isinstance((lm.manifest or {}).get("fim"), dict) else {})}


def _export_gguf(lm: Any, spec: ExportSpec, out: Path) -> dict[str, Any]:
    quant = spec.quant or "f32"
    inside = _provenance(lm, spec)
    n_ctx = context_length(lm.model.config, 1024)
    sidecar, ollama = sidecar_path(out), modelfile_path(out)
    # the three files move into place together or not at all: never a GGUF beside a sidecar describing another
    with atomic_files([out, sidecar, ollama]) as (tmp, tmp_sidecar, tmp_ollama):
        with _naming(out):
            summary = write_gguf(tmp, lm.model, lm.tokenizer, quant, inside)
        manifest = {**inside, "format": "gguf", "file": out.name, "sha256": sha256_file(tmp),
                    "bytes": tmp.stat().st_size,
                    "gguf": {**summary, "quant": quant, "n_ctx": n_ctx, "provenance_key": MANIFEST_KEY},
                    "parent_manifest": lm.manifest, "libraries": _libraries("gguf")}
        with _naming(sidecar):
            tmp_sidecar.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        with _naming(ollama):
            order = infill_order("auto", lm.manifest)
            tmp_ollama.write_text(modelfile(out.name, lm.tokenizer, n_ctx, lm.name, detect(lm.tokenizer), order),
                                  encoding="utf-8")
    return manifest


@contextmanager
def _naming(target: Path) -> Iterator[None]:
    """A failure to write ``target`` (disk full, read-only, a library's wrapper of them) as one line naming it."""
    try:
        yield
    except KdcodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - people get one line naming the file
        raise write_error(exc, target) from exc


def _export_onnx(lm: Any, spec: ExportSpec, out: Path, overwrite: bool) -> dict[str, Any]:
    manifest = _provenance(lm, spec)
    with atomic_dir(out, overwrite) as tmp, quiet_loggers("torch.onnx", "torch.export", "onnxscript", ""):
        graph = export_onnx(lm.model, tmp / ("float.onnx" if spec.int8 else "model.onnx"), spec.opset,
                            head_as_matmul=spec.int8)
        tied = graph.pop("tied_embedding")
        if spec.int8:
            graph["int8"] = quantize_int8(tmp / "float.onnx", tmp / "model.onnx", tied)
            for leftover in tmp.glob("float.onnx*"):
                leftover.unlink()
        with quiet_hf():
            lm.model.config.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
        files = sorted(p for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        manifest.update({
            "format": "onnx", "onnx": {**graph, "opset": spec.opset, "files": [p.name for p in files]},
            "weights_sha256": {p.name: sha256_file(p) for p in files},
            "bytes": sum(p.stat().st_size for p in files),
            "model": {"n_layer": lm.n_layer, "params": lm.params, "params_m": round(lm.params / 1e6, 3)},
            "parent_manifest": lm.manifest, "libraries": _libraries("onnx", "onnxscript", "onnxruntime"),
        })
        write_json(tmp / MANIFEST, manifest)
        (tmp / "README.md").write_text(
            f"# ONNX export of {lm.name} (kdcode)\n\nRun it with `kdcode bench|eval|complete|serve DIR --backend "
            "onnxruntime`; the graph takes past key values (see kdcode.json).\n", encoding="utf-8")
    return read_manifest(out) or manifest
