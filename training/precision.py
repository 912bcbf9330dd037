"""Training precision: bf16 autocast where the hardware computes bf16 fast, fp32 elsewhere.

On GPUs with bf16 that is the usual mixed precision. On CPUs with bf16 instructions (AVX512-BF16 from
Cooper Lake / Zen 4, AMX from Sapphire Rapids) oneDNN's bf16 matrix products are ~4x faster than fp32 (two
cores: a 1,280 x 576 x 3,072 product 6.5 ms against 27.7 with AMX; a 2,400 x 576 x 1,536 one 5.2 ms
against 24.7 with AVX512-BF16 alone), but two things would eat the gain, so a bf16 CPU run also:
- keeps the frozen LLM weights in bf16: autocast re-casts a weight that needs no gradient on every call
  (its cast cache holds only leaf tensors that require grad), ~15% of a step;
- runs attention in fp32 (`sdpa_fp32`): PyTorch's CPU flash-attention kernel is 2-4x slower in bf16
  than in fp32 at these lengths (16 x 9 heads x 100 positions, forward + backward: 89 ms against 24 ms).
Trainable weights stay fp32 either way (Adam updates would be rounded away in bf16).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PRECISIONS = ("auto", "bf16", "fp32")
FP32_ATTENTION = "sdpa_fp32"


def cpu_has_fast_bf16() -> bool:
    """bf16 dot products in hardware: AMX tiles or AVX512-BF16 (without either, bf16 is emulated and slower)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check is not None and check() for check in checks)


def use_bf16(precision: str, cpu: bool) -> bool:
    """Whether a run with this stage `precision` (auto | bf16 | fp32) autocasts to bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return False
    if cpu:
        fast = cpu_has_fast_bf16()
        if precision == "bf16" and not fast:
            raise ValueError(
                "precision=bf16 on a CPU without AMX or AVX512-BF16: bf16 matrix products would be slower than fp32 "
                "here; use precision=auto or fp32"
            )
        return fast
    supported = torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise ValueError("precision=bf16 on a GPU without bf16; use precision=auto or fp32")
    return supported


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with q / k / v (B, H, T, hd) upcast to fp32; output back in their dtype."""
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(dtype), weights


AttentionInterface.register(FP32_ATTENTION, _sdpa_in_fp32)


def prepare_cpu_bf16(llm: torch.nn.Module) -> None:
    """Frozen LLM weights to bf16 and attention in fp32 for a bf16-autocast CPU run (module docstring)."""
    for param in llm.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    base.set_attn_implementation(FP32_ATTENTION)


def restore_attention(llm: torch.nn.Module) -> None:
    """Back to plain SDPA, so nothing saved or served after training names the training-only kernel."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    if getattr(base.config, "_attn_implementation", None) == FP32_ATTENTION:
        base.set_attn_implementation("sdpa")
