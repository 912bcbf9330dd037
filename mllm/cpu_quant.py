"""Weight-only int4 for fast CPU decoding, on torch's own CPU kernel.

A CPU decode step streams every weight once, so bytes per token decide the speed. `quantize_int4`
replaces each `nn.Linear` of the LLM (the LM head included) by an `Int4Linear`: weights in groups of 32
along the input dimension, each group stored as 4-bit codes with its own scale and zero point
(asymmetric, min/max, the zero point kept in floating point: the "tinygemm" format), packed by
`torch._convert_weight_to_int4pack_for_cpu` and multiplied by `torch._weight_int4pack_mm_for_cpu` (the
kernel torchao's CPU int4 layout runs on). Activations, norms and embeddings stay in `dtype` (bfloat16:
these CPUs multiply it natively); the vision tower and the connector are not touched.

A LoRA adapter is not merged first: it stays beside the 4-bit base as an exact float32 low-rank path
(`y = int4(x) + (x A^T) B^T`). Merging and then quantizing erases it wherever the base weights already
sit on a 4-bit grid (the default model's SmolLM2 comes from a Q4_1 GGUF): rounding the merged weights puts
most of them back on the base's codes, and the demo model falls from 98% to 0% on its test questions,
answering like the base LLM. It is an inference format (no gradients flow through packed weights); train
with `qlora` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.errors import CheckpointError

GROUP_SIZE = 32  # weights per scale / zero point: the same block size as the GGUF Q4_0 / Q4_1 formats
OUT_MULTIPLE = 16  # the packing kernel takes output sizes in multiples of 16


def fits_int4(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    """Whether torch's int4 kernel takes this layer's shape (an LM head over 32,001 tokens does not)."""
    out_features, in_features = linear.weight.shape
    return in_features % group_size == 0 and out_features % OUT_MULTIPLE == 0


class Int4Linear(nn.Module):
    """`y = x W^T + b` with W in 4-bit groups: (..., in_features) -> (..., out_features); with `lora`
    (A (r, in), B (out, r), scaling) the adapter's `scaling * B A x` is added, computed in float32."""

    def __init__(
        self,
        linear: nn.Linear,
        dtype: torch.dtype = torch.bfloat16,
        group_size: int = GROUP_SIZE,
        lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ):
        super().__init__()
        out_features, in_features = linear.weight.shape
        if not fits_int4(linear, group_size):
            raise CheckpointError(
                f"int4 needs in_features divisible by {group_size} and out_features by {OUT_MULTIPLE}, but this "
                f"layer is {in_features} -> {out_features}; keep it unquantized (quantize_int4 does)"
            )
        self.in_features, self.out_features, self.group_size, self.dtype = in_features, out_features, group_size, dtype
        groups = linear.weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)  # (out, in / group)
        # The kernel computes w = (q - 8) * scale + zero; round scale and zero to `dtype` first, so the codes
        # are chosen against the values the kernel will really use.
        scale = ((high - low) / 15).clamp(min=1e-6).to(dtype)
        zero = (low + 8 * scale.float()).to(dtype)
        base = zero.float() - 8 * scale.float()  # the value of code 0
        codes = ((groups - base[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(out_features, in_features), 1)
        self.register_buffer("packed_weight", packed)
        self.register_buffer(
            "scale_and_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        )  # (G, out, 2)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)
        # float32: these CPUs run tiny bfloat16 matmuls ~6x slower than float32 ones (40 vs 7 us at rank 16).
        a, b, scaling = lora if lora is not None else (None, None, 0.0)
        self.register_buffer("lora_a", None if a is None else a.detach().float().t().contiguous())  # (in, r)
        self.register_buffer(
            "lora_b", None if b is None else (b.detach().float() * scaling).t().contiguous()
        )  # (r, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # (N, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed_weight, self.group_size, self.scale_and_zero)
        if self.bias is not None:
            y = y + self.bias
        if self.lora_a is not None:
            y = y + ((x.reshape(-1, self.in_features).float() @ self.lora_a) @ self.lora_b).to(y.dtype)  # (N, out)
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def _replace_linears(module: nn.Module, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if (lora := _lora_of(child)) is not None and fits_int4(child.base_layer):
            setattr(module, name, Int4Linear(child.base_layer, dtype, lora=lora))
        elif lora is not None:  # unquantized, so the adapter can merge exactly
            child.merge()
            setattr(module, name, child.base_layer.to(dtype))
        elif isinstance(child, nn.Linear) and fits_int4(child):
            setattr(module, name, Int4Linear(child, dtype))
        elif isinstance(child, nn.Linear):  # a shape the kernel cannot pack: kept, in `dtype` like the rest
            child.to(dtype)
        else:
            _replace_linears(child, dtype)


def _lora_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scaling) of a peft LoRA layer's active adapter, or None for any other module."""
    if not isinstance(getattr(layer, "base_layer", None), nn.Linear) or not hasattr(layer, "lora_A"):
        return None
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


@torch.no_grad()
def quantize_int4(llm: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Every `nn.Linear` of `llm` as an `Int4Linear`, everything else in `dtype`; in place, returned.

    `llm` may carry an unmerged peft LoRA adapter: each adapted layer becomes an `Int4Linear` of its base
    with the adapter beside it, and the plain transformers model is returned. A tied LM head (SmolLM2's
    49,152 x 576 one is a fifth of its weights) gets its own int4 copy: the embedding lookup reads one row
    per token, the head reads them all every step.
    """
    if next(llm.parameters()).device.type != "cpu":
        raise CheckpointError("int4 is the CPU path; on CUDA load with --load-4bit (bitsandbytes nf4)")
    _replace_linears(llm, dtype)  # from the float32 weights, before anything is rounded to `dtype`
    if hasattr(llm, "get_base_model"):  # a PeftModel whose adapters now live in the Int4Linear layers
        llm = llm.get_base_model()
    # The remaining parameters (norms, embeddings) in `dtype`; buffers keep theirs: the rotary inv_freq stays
    # float32 (in bfloat16 positions past a few thousand drift) and so do the adapters and the packed codes.
    for param in llm.parameters():
        param.data = param.data.to(dtype)
    if hasattr(llm, "config"):
        llm.config.tie_word_embeddings = False  # the head is no longer the embedding matrix
    return llm.eval()
