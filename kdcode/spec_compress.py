"""Specs of the commands that write compressed or exported models (`kdcode compress`, `kdcode export`), beside
:mod:`kdcode.spec` (which holds the run, eval, bench and sweep specs and stays within its size)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdcode.spec import DataSpec, _Spec

Int8SchemeName = Literal["auto", "weight-only", "per-token", "smooth-per-token", "smoothquant", "per-tensor"]
#: each int8 scheme: whether SmoothQuant's outlier migration runs first, how the activations are quantized, and how
#: many input channels of the LM head stay float32 (smooth-per-token: the migration cannot reach the input of a
#: head tied to the embedding, and on a real model that head's per-token rounding was over half of what the scheme
#: lost; its channels of largest calibration values are kept float, LLM.int8()'s decomposition)
INT8_SCHEMES: dict[str, tuple[bool, str, int]] = {
    "weight-only": (False, "weight-only", 0),
    "per-token": (False, "per-token", 0),
    "smooth-per-token": (True, "per-token", 16),
    "smoothquant": (True, "per-tensor", 0),
    "per-tensor": (False, "per-tensor", 0),
}


class QualityCheckSpec(_Spec):
    """What `kdcode compress` and `kdcode export` measure before they report success: the model before and after
    on the held-out split of ``data`` (line completion ES and perplexity), and when to warn."""

    check_samples: int = Field(32, ge=0, description="held-out line completions scored before and after, for ES (0 "
                               "skips)")
    check_blocks: int = Field(16, ge=0, description="held-out blocks scored before and after, for perplexity (0 "
                              "skips)")
    max_es_drop: float = Field(1.0, ge=0.0, description="warn when ES drops by more than this many points")
    max_ppl_rise: float = Field(3.0, ge=0.0, description="warn when perplexity rises by more than this many percent")


class CompressSpec(QualityCheckSpec):
    """`kdcode compress`: prune (heads, MLP neurons), then store as fp16/bf16 or int8."""

    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(None, description="store float weights in this dtype")
    int8: bool = Field(False, description="int8 weights of every Linear/Conv1D, for CPU inference")
    int8_scheme: Int8SchemeName = Field(
        "auto", description="int8 activations: auto (the default: smooth-per-token where the CPU has int8 dot "
        "products and the blocks are GPT-2 or Llama-style, else weight-only; see docs/compression.md), weight-only "
        "(activations kept float), per-token (int8 per token), smooth-per-token (outliers moved into the weights, "
        "then per token; the LM head's 16 largest input channels float32), smoothquant (outliers moved, then per "
        "tensor), per-tensor (one scale per input: the old scheme, which Llama-style outliers defeat)"
    )
    smooth_alpha: float = Field(0.5, gt=0.0, lt=1.0, description="smooth-per-token, smoothquant: migration strength "
                                "alpha")
    prune_heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of attention heads removed per layer "
                               "(GPT-2, Llama-style; GQA: per group)")
    prune_ffn: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP neurons / gated channels removed per "
                             "layer")
    data: DataSpec = Field(default_factory=DataSpec, description="calibration corpus (its train split)")
    calib_batches: int = Field(8, ge=1, description="calibration batches that score heads/neurons")
    calib_batch_size: int = Field(8, ge=1, description="blocks per calibration batch")
    calib_block_size: int | None = Field(None, ge=8, description="tokens per calibration block (default 256)")


GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0")


class ExportCheckSpec(QualityCheckSpec):
    """The quality check of `kdcode export --quant/--int8`: on the held-out split of ``data``."""

    data: DataSpec = Field(default_factory=DataSpec, description="held-out code for the check")


class ExportSpec(_Spec):
    """`kdcode export`: a model folder as one GGUF file (llama.cpp, ollama) or an ONNX folder (ONNX Runtime)."""

    format: Literal["gguf", "onnx"] = Field(description="gguf (llama.cpp, ollama) or onnx (ONNX Runtime)")
    quant: Literal["f32", "f16", "q8_0", "q4_0"] | None = Field(
        None, description="GGUF weight type of the 2-D matrices (default f32); norms and biases stay f32"
    )
    int8: bool = Field(False, description="ONNX: dynamic int8 weights through ONNX Runtime's quantizer")
    opset: int = Field(18, ge=17, le=23, description="ONNX opset")

    @model_validator(mode="after")
    def _one_format(self) -> ExportSpec:
        if self.format == "onnx" and self.quant is not None:
            raise ValueError("--quant is for --format gguf; ONNX takes --int8")
        if self.format == "gguf" and self.int8:
            raise ValueError("--int8 is for --format onnx; GGUF takes --quant q8_0")
        return self
