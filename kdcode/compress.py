"""Beyond distillation: prune and quantize a model folder, keeping the manifest chain.

Steps run in a fixed order, each optional: **prune** (attention heads and/or MLP neurons of a GPT-2),
then **store** (``--dtype fp16|bf16``, or ``--int8``).

Structured pruning removes, in every layer, the fraction F of units that matter least by a first-order
Taylor score measured on a few calibration batches of the corpus's train split. A mask ``xi = 1`` is put
on each unit's output (each head's slice of the attention output before ``c_proj``, each MLP neuron's
activation before ``mlp.c_proj``) and the score of a unit is ``sum over batches |dL/dxi|``, L the
next-token cross-entropy of the batch. For a head h this is ``|sum_tokens h . dL/dh|`` (Michel, Levy &
Neubig 2019, "Are Sixteen Heads Really Better than One?"; per batch, absolute value, summed), for a
neuron j it is ``|sum_tokens a_j * dL/da_j|`` (Molchanov et al. 2017). Heads and neurons are scored in
the same pass, on the unpruned model. A pruned unit is cut out of the weights (``c_attn`` columns and
``c_proj`` rows of a head, ``c_fc`` columns and ``mlp.c_proj`` rows of a neuron), which computes
exactly what the original model computes with that unit's output zeroed.

Int8 is post-training dynamic quantization for CPU inference: every ``nn.Linear`` and GPT-2 ``Conv1D``
weight is stored as int8 with one float32 scale per output channel (symmetric: ``scale = max|w| / 127``,
``q = round(w / scale)``), so ``|w - q * scale| <= scale / 2``; activations are quantized per tensor
at run time by torch's fbgemm/x86 kernel (``torch.ops.quantized.linear_dynamic``). A LM head tied to
the input embedding is quantized once: the embedding reads the same int8 rows and dequantizes them.
Biases, layer norms and position embeddings stay float32.

Loading: fp16/bf16 and FFN-pruned folders are plain Hugging Face folders. Head-pruned folders (layers
with fewer heads than ``n_head``: transformers 5 has no ``prune_heads``) and int8 folders
(``model_int8.safetensors`` with ``<module>.weight_int8`` / ``<module>.weight_scale`` keys) load through
:func:`kdcode.models.load_model`, which rebuilds them from ``kdcode.json``'s ``compression.layout``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from kdcode.errors import KdcodeError
from kdcode.spec import DataSpec, _Spec

INT8_FILE = "model_int8.safetensors"
INT8_SCHEME = (
    "weights int8 symmetric per output channel (scale = max|w|/127, w ~ q*scale), stored (out, in) as "
    "<module>.weight_int8 + float32 <module>.weight_scale; activations quantized dynamically per tensor "
    "(uint8) by torch.ops.quantized.linear_dynamic; bias, norms, position embeddings float32"
)
HEAD_SCORE = "|sum over tokens of h . dL/dh| per head (Michel et al. 2019, via a head mask), per batch, summed"
FFN_SCORE = "|sum over tokens of a * dL/da| per MLP neuron (first-order Taylor, via a neuron mask), per batch, summed"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CompressSpec(_Spec):
    """`kdcode compress`: prune (heads, MLP neurons), then store as fp16/bf16 or int8."""

    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(None, description="store float weights in this dtype")
    int8: bool = Field(False, description="dynamic int8 quantization of Linear/Conv1D weights (CPU inference)")
    prune_heads: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of attention heads removed per layer")
    prune_ffn: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of MLP neurons removed per layer")
    data: DataSpec = Field(default_factory=DataSpec, description="calibration corpus (its train split)")
    calib_batches: int = Field(8, ge=1)
    calib_batch_size: int = Field(8, ge=1)
    calib_block_size: int | None = Field(None, ge=8, description="tokens per calibration block (default 256)")


# ----------------------------------------------------------------------------------- int8 tensors
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (rows, cols), scale float32 (rows,)) with |w - q*scale| <= scale/2."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row: any scale is exact
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _reduce_range() -> bool:
    # fbgemm without VNNI adds u8*s8 pairs in int16 (vpmaddubsw), which saturates for 8-bit activations;
    # torch's own dynamic Linear uses 7-bit activations on fbgemm/x86 for that reason, and so do we.
    return torch.backends.quantized.engine in ("fbgemm", "x86")


def _prepack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    with warnings.catch_warnings():  # quantized tensor creation is deprecated in torch 2.13, still works
        warnings.simplefilter("ignore")
        zero = torch.zeros(q.size(0), dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qw, bias)


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` on torch's dynamic int8 kernel; holds only the packed weight.

    Its state dict is ``weight_int8`` (out, in) int8, ``weight_scale`` (out,) float32 and ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.set_weight(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.ones(out_features),
            torch.zeros(out_features) if bias else None,
        )

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._packed = _prepack(q.contiguous(), scale.float(), None if bias is None else bias.detach().float())

    @classmethod
    def from_float(cls, module: nn.Module) -> Int8Linear:
        from transformers.pytorch_utils import Conv1D

        w = module.weight.detach()
        w = w.t() if isinstance(module, Conv1D) else w  # Conv1D stores (in, out)
        new = cls(w.size(1), w.size(0), module.bias is not None)
        new.set_weight(*quantize_int8(w), module.bias)
        return new

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        qw, bias = torch.ops.quantized.linear_unpack(self._packed)
        return qw.int_repr(), qw.q_per_channel_scales().float(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise KdcodeError("int8 models run on CPU only (torch's dynamic int8 kernels); use --device cpu")
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, _reduce_range())

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        q, scale, bias = self.unpacked()
        destination[prefix + "weight_int8"] = q
        destination[prefix + "weight_scale"] = scale
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: Any,
        unexpected: Any,
        errors: Any,
    ) -> None:
        names = ["weight_int8", "weight_scale"] + (["bias"] if self.has_bias else [])
        absent = [prefix + n for n in names if prefix + n not in state_dict]
        if absent:
            missing.extend(absent)
            return
        q, scale = state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"]
        if tuple(q.shape) != (self.out_features, self.in_features) or q.dtype != torch.int8:
            errors.append(
                f"{prefix}weight_int8: {q.dtype} {tuple(q.shape)}, expected int8 "
                f"{(self.out_features, self.in_features)}"
            )
            return
        self.set_weight(q, scale, state_dict.get(prefix + "bias"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, int8"


class Int8Embedding(nn.Module):
    """An embedding whose rows are int8 with one scale per row (the tied LM head reads the same rows)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))
        self.version = 0  # bumped on every load, so that a tied head repacks

    @classmethod
    def from_float(cls, module: nn.Embedding) -> Int8Embedding:
        new = cls(*module.weight.shape)
        new.weight_int8, new.weight_scale = quantize_int8(module.weight)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].float() * self.weight_scale[ids].unsqueeze(-1)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.version += 1


class Int8TiedHead(nn.Module):
    """The LM head tied to an :class:`Int8Embedding`: packs its int8 rows once; stores nothing of its own."""

    def __init__(self, embedding: Int8Embedding) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its tensors are saved once
        self._packed: Any = None
        self._version = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise KdcodeError("int8 models run on CPU only (torch's dynamic int8 kernels); use --device cpu")
        emb = self.embedding
        if self._packed is None or self._version != emb.version:
            self._packed, self._version = _prepack(emb.weight_int8, emb.weight_scale, None), emb.version
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, _reduce_range())


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _tied_names(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding, LM head) module names when the head's weight is the embedding's."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or not isinstance(inp, nn.Embedding) or out.weight is not inp.weight:
        return None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return names[id(inp)], names[id(out)]


def quantize_model(model: nn.Module) -> dict[str, Any]:
    """Replace every Linear / Conv1D by :class:`Int8Linear` (in place); returns the int8 layout."""
    tied = _tied_names(model)
    if tied and getattr(model.get_submodule(tied[1]), "bias", None) is not None:
        raise KdcodeError("a tied LM head with a bias is not supported by --int8")
    targets = [n for n, m in model.named_modules() if _is_linear(m) and (not tied or n != tied[1])]
    for name in targets:
        model.set_submodule(name, Int8Linear.from_float(model.get_submodule(name)))
    if tied:
        emb = Int8Embedding.from_float(model.get_submodule(tied[0]))
        model.set_submodule(tied[0], emb)
        model.set_submodule(tied[1], Int8TiedHead(emb))
    return {
        "scheme": INT8_SCHEME,
        "file": INT8_FILE,
        "modules": targets,
        "tied": {"embedding": tied[0], "head": tied[1]} if tied else None,
        "reduce_range": _reduce_range(),
    }


def _apply_int8_layout(model: nn.Module, layout: dict[str, Any]) -> None:
    """Put empty int8 modules where ``layout`` says (shapes from the float skeleton); load fills them."""
    from transformers.pytorch_utils import Conv1D

    for name in layout["modules"]:
        m = model.get_submodule(name)
        if not _is_linear(m):
            raise KdcodeError(f"int8 layout names {name}, which is not a Linear/Conv1D in this architecture")
        in_f, out_f = (m.weight.shape[0], m.weight.shape[1]) if isinstance(m, Conv1D) else m.weight.shape[::-1]
        model.set_submodule(name, Int8Linear(int(in_f), int(out_f), m.bias is not None))
    tied = layout.get("tied")
    if tied:
        emb = Int8Embedding(*model.get_submodule(tied["embedding"]).weight.shape)
        model.set_submodule(tied["embedding"], emb)
        model.set_submodule(tied["head"], Int8TiedHead(emb))


def memory_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory: parameters and buffers (once each), packed int8 weights."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + 4 * m.out_features * (2 if m.has_bias else 1)
        elif isinstance(m, Int8TiedHead):
            total += m.embedding.weight_int8.numel()
    return total


def int8_param_count(model: nn.Module) -> int:
    """Weights held as int8 (not in ``model.parameters()``), the tied head's counted once."""
    return sum(
        m.in_features * m.out_features + (m.out_features if m.has_bias else 0)
        for m in model.modules()
        if isinstance(m, Int8Linear)
    ) + sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Embedding))


# ------------------------------------------------------------------------------------------ pruning
def _gpt2_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if getattr(model.config, "model_type", None) != "gpt2" or blocks is None:
        raise KdcodeError(
            f"--prune-heads/--prune-ffn support GPT-2 models; this one is {getattr(model.config, 'model_type', '?')}"
        )
    if getattr(model.config, "add_cross_attention", False):
        raise KdcodeError("--prune-heads/--prune-ffn do not support GPT-2 with cross-attention")
    return list(blocks)


def calibration_blocks(spec: CompressSpec, tokenizer: Any, n_positions: int) -> torch.Tensor:
    """The first ``calib_batches * calib_batch_size`` blocks of the corpus's train split (all files if empty)."""
    from kdcode.data import encode_documents, load_corpus, to_blocks

    corpus = load_corpus(spec.data)
    docs = corpus.splits.get("train") or [d for s in corpus.splits.values() for d in s]
    block = min(spec.calib_block_size or 256, n_positions)
    need = spec.calib_batches * spec.calib_batch_size
    stream: list[int] = []
    for i in range(0, len(docs), 16):
        stream += encode_documents(docs[i : i + 16], tokenizer)
        if len(stream) >= need * block:
            break
    return to_blocks(stream, block)[:need]


def unit_importance(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, heads: bool = True, ffn: bool = True
) -> dict[str, list[torch.Tensor]]:
    """Per layer, the score of every head and MLP neuron: sum over batches of |dL/d mask| (see module doc)."""
    layers = _gpt2_blocks(model)
    head_masks = [torch.ones(b.attn.num_heads, requires_grad=True) for b in layers] if heads else []
    ffn_masks = [torch.ones(b.mlp.c_fc.nf, requires_grad=True) for b in layers] if ffn else []
    hooks = []
    for i, b in enumerate(layers):
        if heads:
            hd = b.attn.head_dim
            hooks.append(
                b.attn.c_proj.register_forward_pre_hook(
                    lambda m, a, k=head_masks[i], hd=hd: (a[0] * k.repeat_interleave(hd).to(a[0].dtype),)
                )
            )
        if ffn:
            hooks.append(
                b.mlp.c_proj.register_forward_pre_hook(lambda m, a, k=ffn_masks[i]: (a[0] * k.to(a[0].dtype),))
            )
    masks = head_masks + ffn_masks
    scores = [torch.zeros_like(m) for m in masks]
    was_training = model.training
    model.eval()  # no dropout: the score of the model as it will run
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for start in range(0, len(blocks), batch_size):
                x = blocks[start : start + batch_size].to(device)
                loss = model(x, labels=x).loss
                for s, g in zip(scores, torch.autograd.grad(loss, masks)):
                    s += g.detach().abs().float()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = len(head_masks)
    return {"heads": scores[:n], "ffn": scores[n:]}


def keep_top(scores: torch.Tensor, fraction: float, what: str) -> list[int]:
    """Indices (ascending) of the units kept when the ``fraction`` with the lowest scores is removed."""
    n = scores.numel()
    drop = min(int(fraction * n + 1e-9), n - 1)
    if drop == 0:
        raise KdcodeError(f"pruning {fraction} of {n} {what} per layer removes none; use at least {1 / n:.3g}")
    keep = torch.argsort(scores, descending=True, stable=True)[: n - drop]
    return sorted(int(i) for i in keep)


def _conv1d(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(weight.size(1), weight.size(0))
    m.weight = nn.Parameter(weight.detach().clone().contiguous())
    m.bias = nn.Parameter(bias.detach().clone().contiguous())
    return m


def prune_heads(model: nn.Module, keep: list[list[int]]) -> None:
    """Cut every layer's attention down to the heads in ``keep[layer]`` (in place)."""
    for b, heads in zip(_gpt2_blocks(model), keep):
        attn = b.attn
        hd, width = attn.head_dim, attn.split_size
        idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        cols = torch.cat([idx, width + idx, 2 * width + idx])  # q, k, v columns of c_attn
        attn.c_attn = _conv1d(attn.c_attn.weight[:, cols], attn.c_attn.bias[cols])
        attn.c_proj = _conv1d(attn.c_proj.weight[idx], attn.c_proj.bias)
        attn.num_heads, attn.split_size = len(heads), len(heads) * hd


def prune_ffn(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep the MLP neurons in ``keep[layer]`` (same count in every layer, so ``n_inner`` holds it)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise KdcodeError("MLP pruning must keep the same number of neurons in every layer")
    for b, idx_list in zip(_gpt2_blocks(model), keep):
        idx = torch.tensor(idx_list)
        b.mlp.c_fc = _conv1d(b.mlp.c_fc.weight[:, idx], b.mlp.c_fc.bias[idx])
        b.mlp.c_proj = _conv1d(b.mlp.c_proj.weight[idx], b.mlp.c_proj.bias)
    model.config.n_inner = sizes.pop()


def _resize_heads(model: nn.Module, heads_per_layer: list[int]) -> None:
    """Give a freshly built GPT-2 the attention shapes of a head-pruned one (weights are loaded next)."""
    from transformers.pytorch_utils import Conv1D

    for b, k in zip(_gpt2_blocks(model), heads_per_layer):
        attn = b.attn
        embed, hd = attn.c_attn.weight.shape[0], attn.head_dim
        attn.c_attn, attn.c_proj = Conv1D(3 * k * hd, embed), Conv1D(embed, k * hd)
        attn.num_heads, attn.split_size = k, k * hd


def heads_per_layer(model: nn.Module) -> list[int] | None:
    """Heads of every GPT-2 layer, or None when they all have the config's ``n_head`` (or not GPT-2)."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if getattr(model.config, "model_type", None) != "gpt2" or blocks is None:
        return None
    counts = [int(b.attn.num_heads) for b in blocks]
    return counts if any(c != model.config.n_head for c in counts) else None


# ------------------------------------------------------------------------------------------ loading
def kdcode_layout(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A folder's ``compression.layout`` ({} for a plain Hugging Face folder)."""
    return ((manifest or {}).get("compression") or {}).get("layout") or {}


def check_trainable(manifest: dict[str, Any] | None, what: str) -> None:
    """Refuse to train an int8 folder: its weights are packed int8 buffers, not parameters."""
    if kdcode_layout(manifest).get("int8"):
        parent = ((manifest or {}).get("compression") or {}).get("parent") or {}
        where = f" ({parent['path']})" if parent.get("path") else ""
        raise KdcodeError(f"{what} is int8 (kdcode compress --int8) and cannot be trained; use its float parent{where}")


def record_layout(manifest: dict[str, Any], model: nn.Module, source: str) -> None:
    """Give the manifest of a trained model that kept a head-pruned shape from ``source`` the ``compression``
    section :func:`load_compressed` rebuilds it from (nothing for a plain shape)."""
    heads = heads_per_layer(model)
    if not heads:
        return
    manifest.setdefault("model", {})["heads_per_layer"] = heads
    manifest["compression"] = {
        "layout": {"loader": "kdcode", "heads_per_layer": heads, "int8": None},
        "loading": "kdcode.models.load_model only: layers have fewer attention heads than n_head",
        "inherited_from": source,
    }


def load_compressed(path: Path, manifest: dict[str, Any]) -> nn.Module:
    """Rebuild a head-pruned and/or int8 folder: float architecture from config, reshaped, then its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdcode.artifacts import weight_files

    layout = manifest["compression"]["layout"]
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    if layout.get("heads_per_layer"):
        _resize_heads(model, layout["heads_per_layer"])
    int8 = layout.get("int8")
    if int8:
        model.float()  # what is not int8 was saved as float32
        _apply_int8_layout(model, int8)
    else:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    tied = _tied_names(model) if not int8 else None
    expected = set(model.state_dict()) - ({f"{tied[1]}.weight"} if tied else set())  # saved once, as the embedding
    bad = sorted(expected ^ set(state))
    if bad:
        raise KdcodeError(f"cannot rebuild the compressed model in {path}: weights do not fit its layout ({bad[:4]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise KdcodeError(
            f"cannot rebuild the compressed model in {path}: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    return model.eval()


# ------------------------------------------------------------------------------------------ the run
class _Int8Folder:
    """What :func:`kdcode.artifacts.save_model` writes for an int8 model: config + int8 safetensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        self.model.config.save_pretrained(path)
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(path)
        tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(Path(path) / INT8_FILE), metadata={"format": "pt", "kdcode": "int8"})


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + int8_param_count(model)


def run_compress(
    name: str, spec: CompressSpec, out: Path, overwrite: bool = False, verify: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Load ``name``, prune then quantize / cast it as ``spec`` says, and write ``out`` with the manifest chain."""
    from kdcode.artifacts import check_out_dir, save_model, weights_sha256
    from kdcode.models import load_model

    if spec.int8 and spec.dtype not in (None, "fp32"):
        raise KdcodeError(f"--int8 keeps the non-quantized tensors in fp32; drop --dtype {spec.dtype}")
    if not (spec.int8 or spec.dtype or spec.prune_heads or spec.prune_ffn):
        raise KdcodeError("nothing to do: pass --dtype, --int8, --prune-heads and/or --prune-ffn")
    check_out_dir(out, overwrite)
    lm = load_model(name, check=verify)
    model = lm.model
    if kdcode_layout(lm.manifest).get("int8"):
        raise KdcodeError(f"{name} is already int8; compress its float parent instead")
    params_before = _params(model)
    steps: list[dict[str, Any]] = []
    if spec.prune_heads or spec.prune_ffn:
        first = _gpt2_blocks(model)[0]  # check the fractions before the calibration pass
        if spec.prune_heads:
            keep_top(torch.zeros(first.attn.num_heads), spec.prune_heads, "heads")
        if spec.prune_ffn:
            keep_top(torch.zeros(first.mlp.c_fc.nf), spec.prune_ffn, "MLP neurons")
        n_pos = int(getattr(model.config, "n_positions", 1024))
        blocks = calibration_blocks(spec, lm.tokenizer, n_pos)
        scores = unit_importance(
            model, blocks, spec.calib_batch_size, heads=bool(spec.prune_heads), ffn=bool(spec.prune_ffn)
        )
        calib = {
            "data": spec.data.source,
            "split": "train",
            "blocks": len(blocks),
            "block_size": blocks.size(1),
            "batch_size": spec.calib_batch_size,
        }
        units = (
            ("prune-heads", spec.prune_heads, "heads", "heads", prune_heads, HEAD_SCORE),
            ("prune-ffn", spec.prune_ffn, "ffn", "MLP neurons", prune_ffn, FFN_SCORE),
        )
        for step, fraction, key, what, prune, score in units:
            if not fraction:
                continue
            keep = [keep_top(s, fraction, what) for s in scores[key]]
            prune(model, keep)
            steps.append({"step": step, "fraction": fraction, "score": score, "calibration": calib, "kept": keep})
    heads = heads_per_layer(model)
    int8_layout = None
    if spec.int8:
        model.float()
        int8_layout = quantize_model(model)
        steps.append(
            {"step": "int8", "scheme": INT8_SCHEME, "modules": len(int8_layout["modules"]), "tied": int8_layout["tied"]}
        )
    elif spec.dtype:
        model.to(DTYPES[spec.dtype])
        steps.append({"step": "dtype", "dtype": spec.dtype})
    custom = bool(heads or int8_layout)
    reasons = []
    if heads:
        reasons.append("layers have fewer attention heads than n_head (transformers 5 has no prune_heads)")
    if int8_layout:
        reasons.append(f"int8 weights in {INT8_FILE}")
    parent = {
        "path": str(lm.path.resolve()) if lm.path else name,
        "weights_sha256": weights_sha256(lm.path) if lm.path else {"hub": lm.fingerprint},
    }
    manifest: dict[str, Any] = {
        "kind": "compressed",
        "model": {
            "n_layer": lm.n_layer,
            "params_m": round(_params(model) / 1e6, 3),
            "params_m_before": round(params_before / 1e6, 3),
            "heads_per_layer": heads,
            "n_inner": getattr(model.config, "n_inner", None),
        },
        "compression": {
            "spec": spec.model_dump(mode="json"),
            "steps": steps,
            "layout": {"loader": "kdcode" if custom else "transformers", "heads_per_layer": heads, "int8": int8_layout},
            "loading": ("kdcode.models.load_model only: " + "; ".join(reasons))
            if custom
            else "plain transformers: AutoModelForCausalLM.from_pretrained",
            "parent": parent,
            "parent_manifest": lm.manifest,
        },
    }
    writer = _Int8Folder(model) if int8_layout else model
    save_model(out, writer, lm.tokenizer, manifest, overwrite=overwrite)
    from kdcode.artifacts import read_manifest

    return out, read_manifest(out) or manifest
