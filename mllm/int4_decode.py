"""The int4 decode step: one new token through an int4 LLaMA-class LLM as plain tensor operations.

Once `mllm.cpu_quant` has made the weights 4-bit, a decode step on the CPU is bound by calls, not bytes:
transformers' layer code (module calls, hooks, mask and cache bookkeeping) costs more than the matrix
products. `Int4Decoder` runs the same arithmetic on the same tensors (the fused q/k/v and gate/up
matrices, the LoRA side paths, transformers' own rotary embedding, the same `DynamicCache`) with nothing
else around it: 74 tokens/s on the default model where the transformers forward of the same modules
gives 47, token for token the same greedy output. Prompts (prefill, `forward`) go through it too, and a batch of
sequences decodes in one `step` (its keys / values side by side in `mllm.batch_kv.BatchKV`).

It takes a model only when every block is one it computes exactly (LLaMA's: RMSNorm, rotary, SiLU gate,
no sliding window, no q/k norm); `for_model` returns None otherwise and decoding stays on transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.batch_kv import BatchKV, in_given_order, in_slot_order
from mllm.cpu_features import bf16_in_hardware
from mllm.cpu_quant import Int4Linear, Int4Siblings

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
# The int4 kernel's cost grows with rows past a few (it unpacks per row block), a bf16 product's barely
# (AMX / AVX512-BF16). Measured on the default model, 2 cores, ms for 1 / 8 / 63 rows: gate/up int4
# 0.08 / 0.29 / 2.17 against bf16 0.33 / 0.21 / 0.72; q/k/v 0.04 / 0.10 / 0.67 against 0.11 / 0.09 / 0.20.
# So prompt chunks of at least DENSE_ROWS rows go through a dense copy of the blocks' weights (dequantized
# once from the int4 codes: the same weights), decode steps stay int4. The copy is bf16 where the CPU computes
# bf16 in hardware; elsewhere bf16 products are emulated (an AVX2-only EPYC took 783 ms for a 63-token prompt,
# 190 in float32) and the copy is float32 (`mllm.cpu_features`).
DENSE_ROWS = 8
# The copy costs 2 (bf16) or 4 (float32) bytes per weight beside the 0.5 of int4: kept only while it stays
# under this (the default model's is 203 / 406 MiB; a 7B model's would be 13 GiB and keeps int4 prefill).
DENSE_BUDGET_MIB = 1024


def dense_dtype(activations: torch.dtype) -> torch.dtype:
    """The dense copy's dtype: the activations' where the CPU computes it in hardware, else float32."""
    if activations == torch.bfloat16 and not bf16_in_hardware():
        return torch.float32
    return activations


class Projection:
    """One int4 product and its LoRA side path as bare tensors: `(N, in) -> (N, out)` (a fused group's outputs
    side by side, `sizes` wide each)."""

    def __init__(self, layer: Int4Linear | Int4Siblings):
        base = layer.base if isinstance(layer, Int4Siblings) else layer
        self.packed, self.scale_and_zero, self.bias = base.packed_weight, base.scale_and_zero, base.bias
        self.group_size = base.group_size
        self.down, self.up = layer.lora_a, layer.lora_b  # (in, r), (r, out) or None
        if isinstance(layer, Int4Siblings):
            self.sizes = [end - start for start, end in layer.columns]
        else:
            self.sizes = [layer.out_features]
        self.in_features = base.in_features
        self.dense: torch.Tensor | None = None  # (out, in) dense copy for wide inputs (`densify`)
        self.dense_bias: torch.Tensor | None = None

    def densify(self) -> int:
        """Keep a dense copy of the weights (`dense_dtype`): the int4 kernel applied to the identity gives W^T
        exactly as the kernel dequantizes it. The LoRA side path is merged into the copy (in float32, then
        rounded once): a wide product is then one call instead of three, two of them in float32. Returns its
        bytes."""
        dtype = dense_dtype(self.scale_and_zero.dtype)
        eye = torch.eye(self.in_features, dtype=self.scale_and_zero.dtype)
        weight_t = int4_mm(eye, self.packed, self.group_size, self.scale_and_zero)  # (in, out)
        if self.down is not None:
            weight_t = weight_t.float() + self.down @ self.up  # (in, r) @ (r, out)
        self.dense = weight_t.t().to(dtype).contiguous()  # (out, in)
        self.dense_bias = None if self.bias is None else self.bias.to(dtype)
        return self.dense.numel() * self.dense.element_size()

    def dense_bytes(self) -> int:
        return self.in_features * sum(self.sizes) * dense_dtype(self.scale_and_zero.dtype).itemsize

    def __call__(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """`wide`: the caller allows the dense copy (prompt chunks; never decode steps, so a reply decodes the
        same whatever else is in its batch); it is used when there is one and x has DENSE_ROWS rows or more."""
        if wide and self.dense is not None and x.shape[0] >= DENSE_ROWS:
            # (N, out), the adapter merged in; cast only where the copy is float32 (bf16 not in hardware)
            return F.linear(x.to(self.dense.dtype), self.dense, self.dense_bias).to(x.dtype)
        y = int4_mm(x, self.packed, self.group_size, self.scale_and_zero)  # (N, out)
        if self.bias is not None:
            y += self.bias
        if self.down is not None:
            y += ((x.float() @ self.down) @ self.up).to(y.dtype)  # in float32, like the adapter
        return y


class Block:
    """One decoder layer's tensors."""

    def __init__(self, layer: nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.o = Projection(attention.fused_q_k_v), Projection(attention.o_proj)
        self.gate_up, self.down = Projection(mlp.fused_gate_up), Projection(mlp.down_proj)
        self.scaling = attention.scaling

    def projections(self) -> list[Projection]:
        return [self.qkv, self.o, self.gate_up, self.down]

    def finish(self, h: torch.Tensor, attended: torch.Tensor, wide: bool = False) -> torch.Tensor:
        """The block after attention: output projection and residual, then the SiLU-gated MLP and residual.
        h (N, D), attended (N, H * hd) -> (N, D). `wide`: see `Projection.__call__`."""
        h = h + self.o(attended, wide)
        x = F.rms_norm(h, self.norm2.normalized_shape, self.norm2.weight, self.norm2.eps)
        gate, up = self.gate_up(x, wide).split(self.gate_up.sizes, -1)
        return h + self.down(F.silu(gate) * up, wide)


class Int4Decoder:
    """`decoder(token, cache) -> logits (1, V)`: appends one token to a batch-1 `DynamicCache` the prompt was
    prefilled into, as transformers' forward would."""

    def __init__(self, llm: nn.Module, dense_budget_mib: float = DENSE_BUDGET_MIB):
        config = llm.config
        self.embed = llm.model.embed_tokens.weight  # (V, D)
        self.rotary = llm.model.rotary_emb
        self.norm = llm.model.norm
        self.head = Projection(llm.lm_head)
        self.blocks = [Block(layer) for layer in llm.model.layers]
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = llm.model.layers[0].self_attn.head_dim
        self.batch = BatchKV(len(self.blocks), self.kv_heads, self.head_dim, self.embed.dtype)
        projections = [p for block in self.blocks for p in block.projections()]
        if sum(p.dense_bytes() for p in projections) <= dense_budget_mib * 2**20:
            self.dense_bytes = sum(p.densify() for p in projections)
        else:
            self.dense_bytes = 0  # prompts stay on the int4 kernel

    @classmethod
    def for_model(cls, llm: nn.Module) -> Int4Decoder | None:
        """The decoder of an int4 LLM whose blocks it computes exactly, or None."""
        config = getattr(llm, "config", None)
        if type(llm).__name__ not in ARCHITECTURES or config is None:
            return None
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return None
        if getattr(config, "hidden_act", None) != "silu" or not isinstance(llm.lm_head, Int4Linear):
            return None
        for layer in llm.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if not (
                isinstance(getattr(attention, "fused_q_k_v", None), Int4Siblings)
                and isinstance(attention.o_proj, Int4Linear)
                and isinstance(getattr(mlp, "fused_gate_up", None), Int4Siblings)
                and isinstance(mlp.down_proj, Int4Linear)
                and isinstance(layer.input_layernorm, nn.RMSNorm)
                and isinstance(layer.post_attention_layernorm, nn.RMSNorm)
                and not hasattr(attention, "q_norm")
            ):
                return None
        return cls(llm) if isinstance(llm.model.norm, nn.RMSNorm) else None

    def __call__(self, token: int, cache) -> torch.Tensor:
        """One decode step: `token` appended to `cache`; the logits of what comes next (1, V)."""
        return self.forward(self.embed[token][None], cache)

    def forward(self, h: torch.Tensor, cache) -> torch.Tensor:
        """`h` (N, D): the input embeddings of N new positions (a prompt chunk, image slots already merged,
        or one decoded token), appended to `cache`; the logits at the last of them (1, V)."""
        return self.forward_packed([h], [cache])

    def forward_packed(self, hs: list[torch.Tensor], caches: list) -> torch.Tensor:
        """Several prompt chunks at once, each appended to its own cache: `hs[i]` (N_i, D) -> the logits at the
        last position of each (S, V). The projections run over all chunks' rows as one (sum N_i, in) product,
        attention chunk by chunk against its own cache. Why: a product of the bf16 copy first reads all its
        weights (~18 ms a forward on the default model, 2 cores), so two 63-token prompts packed cost 59 ms
        against 2 x 37. Each row's result does not depend on the others (a row of a product is the same dot
        products whatever the rows beside it), so a prompt prefills to the same logits packed or alone."""
        sizes = [h.shape[0] for h in hs]
        pasts = [cache.get_seq_length() for cache in caches]  # positions already in each cache
        h = torch.cat(hs).to(self.embed.dtype)  # (T, D), T = sum N_i
        t = h.shape[0]
        positions = torch.cat([torch.arange(past, past + n) for past, n in zip(pasts, sizes)])  # (T,)
        cos, sin = self.rotary(h[None], positions[None])  # (1, T, hd) each
        cos, sin = cos[:, None], sin[:, None]  # (1, 1, T, hd): broadcast over heads
        # One query row per new position: it sees its cache and its chunk's positions up to its own.
        masks = [
            None if n == 1 else torch.ones(n, past + n, dtype=torch.bool).tril(past) for n, past in zip(sizes, pasts)
        ]
        ends = torch.tensor(sizes).cumsum(0).tolist()
        spans = [(end - n, end) for n, end in zip(sizes, ends)]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        for index, block in enumerate(self.blocks):
            x = F.rms_norm(h, block.norm1.normalized_shape, block.norm1.weight, block.norm1.eps)
            qkv = block.qkv(x, wide=True)  # (T, (H + 2 KV) * hd): q, k and v side by side
            qk = qkv[:, : (heads + kv_heads) * head_dim].view(t, heads + kv_heads, head_dim).transpose(0, 1)[None]
            qk = _rotate(qk, cos, sin)  # one rotation for q and k: (1, H + KV, T, hd)
            v = qkv[:, (heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim).transpose(0, 1)[None]
            attended = []
            for (start, end), cache, mask in zip(spans, caches, masks):
                q = qk[:, :heads, start:end]  # (1, H, N_i, hd)
                keys, values = cache.update(qk[:, heads:, start:end], v[:, :, start:end], index)  # (1, KV, L_i, hd)
                if mask is None:  # a decode step: the batched step's attention, so a reply alone is the reply batched
                    attended.append(decode_attention(q, keys, values, None, block.scaling))
                else:
                    attended.append(
                        F.scaled_dot_product_attention(
                            q, keys, values, attn_mask=mask, scale=block.scaling, enable_gqa=kv_heads != heads
                        )
                    )  # (1, H, N_i, hd)
            attended = torch.cat(attended, 2) if len(attended) > 1 else attended[0]  # (1, H, T, hd)
            h = block.finish(h, attended[0].transpose(0, 1).reshape(t, heads * head_dim), wide=True)
        last = torch.tensor(ends) - 1  # each chunk's last row
        h = F.rms_norm(h[last], self.norm.normalized_shape, self.norm.weight, self.norm.eps)  # (S, D)
        return self.head(h)  # (S, V)

    def step(self, tokens: list[int], caches: list, wide: bool = True) -> torch.Tensor:
        """One decode step for B sequences at once, each with its own cache (their lengths may differ): the
        projections run as one (B, in) product each, and attention as one masked `decode_attention` per layer
        over the batch's keys / values (`BatchKV`: the caches are copied in when they join and written back by
        `release`). Logits (B, V), in the order given.

        `wide`: batches of DENSE_ROWS or more go through the bf16 copy of the weights (a 16-row step: 62 ms
        against 107 on the int4 kernel). Its products round differently from the int4 kernel's, so a reply
        decoded in such a batch can differ from the same reply decoded alone where two tokens are within
        bf16 rounding of each other. `wide=False` keeps every step on the int4 kernel: exactly the reply
        decoded alone, whatever else runs."""
        if len(tokens) == 1 and not self.batch.rows:
            return self(tokens[0], caches[0])  # one sequence alone: its own cache, nothing to pad
        slots = self.batch.arrange(caches)  # slot of each cache; the batch's rows are slots 0..B-1
        b, heads, kv_heads, head_dim = len(tokens), self.heads, self.kv_heads, self.head_dim
        h = self.embed[torch.tensor(in_slot_order(tokens, slots))]  # (B, D), row s = slot s
        positions, mask = self.batch.begin_step()  # (B,), (B, 1, 1, L): each row sees its own positions only
        cos, sin = self.rotary(h[None], positions[None])  # (1, B, hd): each row its position
        cos, sin = cos[0, :, None, None], sin[0, :, None, None]  # (B, 1, 1, hd)
        for index, block in enumerate(self.blocks):
            x = F.rms_norm(h, block.norm1.normalized_shape, block.norm1.weight, block.norm1.eps)
            qkv = block.qkv(x, wide)  # (B, (H + 2 KV) * hd)
            qk = _rotate(qkv[:, : (heads + kv_heads) * head_dim].view(b, heads + kv_heads, 1, head_dim), cos, sin)
            v = qkv[:, (heads + kv_heads) * head_dim :].view(b, kv_heads, head_dim)
            keys, values = self.batch.write(index, qk[:, heads:, 0], v)  # (B, KV, L, hd) each
            attended = decode_attention(qk[:, :heads], keys, values, mask, block.scaling)  # (B, H, 1, hd)
            h = block.finish(h, attended.reshape(b, heads * head_dim), wide)
        self.batch.advance()
        h = F.rms_norm(h, self.norm.normalized_shape, self.norm.weight, self.norm.eps)
        logits = self.head(h)  # (B, V) by slot
        return in_given_order(logits, slots)  # (B, V), back in the order given

    def release(self, cache) -> None:
        """`cache` leaves the batch: its keys / values so far are written back into it (a no-op when it is
        not in the batch)."""
        self.batch.release(cache)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query position per sequence: q (B, H, 1, hd) against keys / values (B, KV, L, hd), `mask`
    (B, 1, 1, L) True where a row may look (None: everywhere) -> (B, H, 1, hd) in the keys' dtype.

    Two float32 products and a softmax. torch's CPU flash attention tiles for many query rows; with one row
    and a padding mask it costs 5x this (16 sequences x 160 keys x 9 heads: 1.18 ms against 0.23 ms), which
    was half of a 16-sequence decode step."""
    b, heads, _, head_dim = q.shape
    kv_heads = keys.shape[1]
    # A KV head's H / KV query heads side by side, as SDPA's enable_gqa pairs them (query head h reads h // G).
    grouped = q.reshape(b, kv_heads, heads // kv_heads, head_dim).float()  # (B, KV, G, hd)
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scale  # (B, KV, G, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    attended = torch.matmul(scores.softmax(-1), values.float())  # (B, KV, G, hd)
    return attended.reshape(b, heads, 1, head_dim).to(keys.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding (the rotate-half form): x (1, heads, N, hd), cos / sin (1, 1, N, hd)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def int4_decoder(llm: nn.Module) -> Int4Decoder | None:
    """`Int4Decoder.for_model(llm)`, built once per model (kept on it, outside its modules and state dict)."""
    if "_int4_decoder" not in llm.__dict__:
        llm.__dict__["_int4_decoder"] = Int4Decoder.for_model(llm)
    return llm.__dict__["_int4_decoder"]
