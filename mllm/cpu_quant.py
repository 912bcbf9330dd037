"""Weight-only int4 for fast CPU decoding, on torch's own CPU kernel.

A CPU decode step streams every weight once, so bytes per token decide the speed. `quantize_int4`
replaces each `nn.Linear` of the LLM (the LM head included) by an `Int4Linear`: weights in groups of 32
along the input dimension, each group stored as 4-bit codes with its own scale and zero point
(asymmetric, min/max, the zero point kept in floating point: the "tinygemm" format), packed by
`torch._convert_weight_to_int4pack_for_cpu` and multiplied by `torch._weight_int4pack_mm_for_cpu` (the
kernel torchao's CPU int4 layout runs on). Activations, norms and embeddings stay in `dtype` (bfloat16:
these CPUs multiply it natively); the vision tower and the connector are not touched.

Once the weights are 4-bit a decode step is mostly per-call cost, not bytes, so the projections that read
the same input (q/k/v, gate/up) become one matrix each (`Int4Siblings`) and LLaMA's eight-operation RMSNorm
becomes torch's fused `nn.RMSNorm`.

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


# Projections that read the same input in every LLaMA-class block: packed as one matrix each.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Int4Siblings(nn.Module):
    """Sibling projections that read the same input (attention's q/k/v, an MLP's gate/up) as one int4 matrix:
    one kernel call and one LoRA down-projection where there were one per sibling (a decode step is mostly
    per-call cost once the weights are 4-bit: q, k and v alone take 52 us, fused 26 us).

    The model still calls each sibling (`Int4Part`) with the same tensor, one after the other; the first
    call computes them all and each other sibling takes its slice once, as long as its input is that very
    tensor (identity, and the version counter where autograd keeps one). Another input, or a sibling called
    twice, computes afresh, so a caller that feeds siblings different tensors still gets the right answers.
    """

    def __init__(self, parts: list[tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor, float] | None]], dtype):
        super().__init__()
        linears = [linear for linear, _ in parts]
        fused = nn.Linear(linears[0].in_features, sum(x.out_features for x in linears), bias=False)
        fused.weight.data = torch.cat([x.weight.detach().float() for x in linears])
        if any(x.bias is not None for x in linears):
            fused.bias = nn.Parameter(
                torch.cat(
                    [
                        x.bias.detach().float() if x.bias is not None else x.weight.new_zeros(x.out_features)
                        for x in linears
                    ]
                )
            )
        self.base = Int4Linear(fused, dtype)
        self.in_features = fused.in_features
        bounds = torch.tensor([0] + [x.out_features for x in linears]).cumsum(0).tolist()
        self.columns = list(zip(bounds[:-1], bounds[1:]))  # each sibling's slice of the fused output
        # LoRA as one low-rank pair: the down-projections side by side (in, sum r), the up-projections one
        # block-diagonal (sum r, sum out) matrix, zero where a sibling has no adapter. Two float32 products per
        # group instead of two per sibling: the zeros cost a few hundred KB of reads a layer, the calls they
        # save cost more (74 against 64 tokens/s on the default model).
        self.ranks, offset = [], 0  # each sibling's rows of the pair, None without an adapter
        for _, lora in parts:
            self.ranks.append(None if lora is None else (offset, offset + lora[0].shape[0]))
            offset += 0 if lora is None else lora[0].shape[0]
        lora_a = lora_b = None
        if offset:
            lora_a = torch.cat([lora[0].detach().float().t() for _, lora in parts if lora is not None], 1)
            lora_b = torch.zeros(offset, self.columns[-1][1])
            for (start, end), rows, (_, lora) in zip(self.columns, self.ranks, parts):
                if rows is not None:
                    lora_b[rows[0] : rows[1], start:end] = (lora[1].detach().float() * lora[2]).t()
        self.register_buffer("lora_a", None if lora_a is None else lora_a.contiguous())  # (in, sum r)
        self.register_buffer("lora_b", lora_b)  # (sum r, sum out)
        self._last: tuple | None = None  # (input, its version, fused output, siblings served)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All siblings' outputs side by side: (..., in) -> (..., sum out)."""
        y = self.base(x)
        if self.lora_a is not None:
            rows = x.reshape(-1, self.in_features).float()  # (N, in), float32 like the adapter
            y = y + ((rows @ self.lora_a) @ self.lora_b).to(y.dtype).reshape(y.shape)
        return y

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s output, from the group's last result when `x` is the input it was computed for."""
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last
        if last is None or last[0] is not x or last[1] != version or index in last[3]:
            last = self._last = (x, version, self(x), set())
        last[3].add(index)  # each sibling takes one result once: a second call is a new round
        if len(last[3]) == len(self.columns):
            self._last = None  # every sibling has its slice: hold nothing between steps
        start, end = self.columns[index]
        return last[2][..., start:end]  # a view; the models reshape it with .view, which a column slice allows


class Int4Part(nn.Module):
    """One sibling of an `Int4Siblings` group, where the model calls it: (..., in) -> (..., out_i)."""

    def __init__(self, group: Int4Siblings, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the parent owns the group once
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.columns[index][1] - group.columns[index][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a fused group"


def _int4_parts(child: nn.Module):
    """(linear, lora) of a layer int4 can take (a plain linear or a peft LoRA one of a shape that fits), else None."""
    if (lora := _lora_of(child)) is not None and fits_int4(child.base_layer):
        return child.base_layer, lora
    if isinstance(child, nn.Linear) and fits_int4(child):
        return child, None
    return None


def _fuse_siblings(module: nn.Module, dtype: torch.dtype) -> None:
    children = dict(module.named_children())
    for names in SIBLINGS:
        parts = [_int4_parts(children[n]) if n in children else None for n in names]
        if any(p is None for p in parts) or len({p[0].in_features for p in parts}) != 1:
            continue
        group = Int4Siblings(parts, dtype)
        module.add_module("fused_" + "_".join(n.removesuffix("_proj") for n in names), group)
        for i, name in enumerate(names):
            setattr(module, name, Int4Part(group, i))


def _replace_linears(module: nn.Module, dtype: torch.dtype) -> None:
    _fuse_siblings(module, dtype)
    for name, child in module.named_children():
        if isinstance(child, (Int4Siblings, Int4Part)):
            continue
        if (parts := _int4_parts(child)) is not None:
            setattr(module, name, Int4Linear(parts[0], dtype, lora=parts[1]))
        elif _lora_of(child) is not None:  # a shape the kernel cannot pack: unquantized, so the adapter merges exactly
            child.merge()
            setattr(module, name, child.base_layer.to(dtype))
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


# RMSNorms whose forward is LLaMA's (float32 statistics, then the weight): torch's fused `nn.RMSNorm` is one
# kernel where theirs is eight operations, the same numbers.
LLAMA_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _fuse_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child).__name__ in LLAMA_RMS_NORMS:
            norm = nn.RMSNorm(child.weight.shape, eps=child.variance_epsilon, dtype=child.weight.dtype)
            norm.weight = child.weight
            setattr(module, name, norm)
        else:
            _fuse_norms(child)


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
    _fuse_norms(llm)
    if hasattr(llm, "config") and llm.config.tie_word_embeddings:
        llm.config.tie_word_embeddings = False  # the head is no longer the embedding matrix
        llm.config.head_copies_embedding = True  # but a copy of it: one matrix as the model defines it
    for kept in ("_int4_decoder", "_transformers_batch"):  # built for the weights as they were (mllm.backends)
        llm.__dict__.pop(kept, None)
    return llm.eval()
