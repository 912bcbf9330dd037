"""BLIP-2 stage 1 (`qformer_pretrain`): Q-Former representation learning against a frozen vision tower.

No LLM. Three objectives share the Q-Former's self-attention between the learned queries and the
caption tokens (cross-attention to the image exists only at query positions):

- ITC: query outputs and the text [CLS] are projected to `embed_dim`; similarity = max over queries;
  symmetric InfoNCE with a learnable temperature. Queries and text run in separate passes.
- ITM: one joint pass, queries and text see each other; a binary head on the mean query output
  classifies the positive pairs and hard negatives sampled from softmax(ITC similarity).
- ITG: one joint pass with the mask below; the text is decoded causally while reading the queries;
  the LM head is tied to the text word embeddings.

The connector keeps its stage-2 layout (`vision_norm`, `vision_positions`, `query_tokens`, `qformer`,
`proj`): BLIP-2 drops the text feed-forward blocks after stage 1, and transformers' `Blip2QFormerModel` without
`use_qformer_text_input` has none. Every text-only part (embeddings, per-layer text FFN, ITC
projections, ITM head, LM head, temperature) lives here, so `connector.state_dict()` loads into a
plain `QFormerConnector`. `connector.proj` takes no part in any loss: `trainable_parameters()`
leaves it out.

In-batch negatives are per process: under DDP each rank contrasts its own batch (LAVIS gathers
features across ranks; here the batch seen is the batch contrasted).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerIntermediate, Blip2QFormerOutput

from mllm.connectors import QFormerConnector
from mllm.hub import require_safetensors

logger = logging.getLogger(__name__)


class TextFeedForward(nn.Module):
    """The text-position FFN of one Q-Former layer (queries have their own: `intermediate_query`)."""

    def __init__(self, config):
        super().__init__()
        # Same classes and attribute names as BERT / Blip2QFormerLayer's text branch, so weights map by name.
        self.intermediate = Blip2QFormerIntermediate(config)
        self.output = Blip2QFormerOutput(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden), hidden)


class QFormerPretrainer(nn.Module):
    def __init__(
        self,
        connector: QFormerConnector,
        tokenizer=None,
        embed_dim: int = 256,
        max_text_length: int = 32,
        init_text_from: str | None = None,
    ):
        super().__init__()
        if not isinstance(connector, QFormerConnector):
            raise ValueError(f"qformer_pretrain needs a QFormerConnector, got {type(connector).__name__}")
        if (tokenizer is None) == (init_text_from is None):
            raise ValueError("pass exactly one of `tokenizer` or `init_text_from` (whose tokenizer is then used)")
        if init_text_from is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(init_text_from)
        if tokenizer.cls_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs BERT-style [CLS] and [PAD] tokens (cls_token, pad_token)")
        self.connector = connector
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        config = connector.qformer_config
        width = config.hidden_size

        # One extra row after the tokenizer's vocabulary: [DEC], the start token of ITG (BLIP-2 adds
        # it to bert-base-uncased the same way, as id 30522). The tokenizer itself is not changed.
        self.dec_token_id = len(tokenizer)
        self.word_embeddings = nn.Embedding(len(tokenizer) + 1, width, padding_idx=tokenizer.pad_token_id)
        self.position_embeddings = nn.Embedding(max_text_length, width)
        self.text_ffn = nn.ModuleList(TextFeedForward(config) for _ in range(config.num_hidden_layers))
        self.vision_projection = nn.Linear(width, embed_dim)
        self.text_projection = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        # BERT's LM-head transform; the decoder matrix is `word_embeddings.weight` (tied), plus a bias.
        self.lm_transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.lm_bias = nn.Parameter(torch.zeros(len(tokenizer) + 1))
        self.temp = nn.Parameter(torch.tensor(0.07))
        for name, module in self.named_modules():
            if name and not name.startswith("connector"):
                _init_like_bert(module, config.initializer_range)
        if init_text_from is not None:
            self.init_text_from_bert(init_text_from)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything stage 1 trains: the Q-Former side of the connector and the text parts, not `connector.proj`."""
        return [p for name, p in self.named_parameters() if not name.startswith("connector.proj.")]

    # ---- text -> tensors ----------------------------------------------------------------------

    def tokenize(self, captions: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ([CLS] ... [SEP] ids (B, T), padding mask (B, T)), truncated to max_text_length."""
        enc = self.tokenizer(
            captions, padding="longest", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if not bool((ids[:, 0] == self.tokenizer.cls_token_id).all()):
            raise ValueError("the tokenizer must start every caption with [CLS] (a BERT-style post-processor)")
        return ids.to(device), mask.to(device)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, D_q)

    # ---- the shared transformer -----------------------------------------------------------------

    def run_qformer(
        self,
        image_features: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Queries (when image_features is given) and text through the connector's layers -> (B, Q + T, D_q).

        Why not `connector.qformer(...)`: it has no text FFN (see the module docstring), so the
        layer loop is spelled out here with the connector's own attention / cross-attention / query
        FFN modules, and the text FFN from `self.text_ffn`. The result for queries alone equals
        `connector.query_features` (a test checks it).
        """
        qformer = self.connector.qformer
        parts = []
        if image_features is not None:
            image = self.connector.image_keys(image_features)  # (B, N_v, D_v)
            parts.append(self.connector.query_tokens.expand(image.shape[0], -1, -1))  # (B, Q, D_q)
        if input_ids is not None:
            parts.append(self.embed_text(input_ids))  # (B, T, D_q)
        n_query = parts[0].shape[1] if image_features is not None else 0
        hidden = qformer.dropout(qformer.layernorm(torch.cat(parts, dim=1)))  # (B, Q + T, D_q)
        text_mask = attention_mask if input_ids is not None else hidden.new_ones(hidden.shape[0], 0)
        bias = attention_bias(n_query, text_mask, causal, hidden.dtype)  # (B, 1, Q + T, Q + T)
        for layer, text_ffn in zip(qformer.encoder.layer, self.text_ffn):
            attended = layer.attention(hidden, attention_mask=bias)  # shared self-attention
            queries, text = attended[:, :n_query], attended[:, n_query:]
            if n_query and layer.has_cross_attention:
                queries = layer.crossattention(queries, encoder_hidden_states=image)  # only queries see the image
            hidden = torch.cat([layer.feed_forward_chunk_query(queries), text_ffn(text)], dim=1)
        return hidden

    # ---- losses -----------------------------------------------------------------------------

    def forward(self, image_features: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """(B, N_v, D_v) frozen-tower features + B captions -> {loss, itc, itm, itg}; loss = itc + itm + itg."""
        if len(captions) != image_features.shape[0]:
            raise ValueError(f"got {image_features.shape[0]} images but {len(captions)} captions; pass one each")
        return self.losses(image_features, *self.tokenize(captions, image_features.device))

    def losses(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch = image_features.shape[0]
        if batch < 2:
            raise ValueError(f"ITC and ITM need in-batch negatives: batch size must be >= 2, got {batch}")
        # Identical captions (common in synthetic data) are positives for each other, never negatives.
        same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (B, B)

        # ITC: separate passes; image side is exactly what stage 2 feeds the LLM projection.
        query_out = self.connector.query_features(image_features)  # (B, Q, D_q)
        text_out = self.run_qformer(None, input_ids, attention_mask)  # (B, T, D_q)
        image_emb = F.normalize(self.vision_projection(query_out), dim=-1)  # (B, Q, E)
        text_emb = F.normalize(self.text_projection(text_out[:, 0]), dim=-1)  # (B, E)
        temp = self.temp.clamp(0.001, 0.5)
        sim = torch.einsum("iqe,te->iqt", image_emb, text_emb).amax(dim=1) / temp  # (B_img, B_txt)
        targets = same_text.float() / same_text.sum(1, keepdim=True)
        itc = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.t(), targets)) / 2

        # ITM: positives, then (hard negative image, text) and (image, hard negative text).
        neg_text, neg_image = sample_hard_negatives(sim.detach(), same_text)
        itm_ids = torch.cat([input_ids, input_ids, input_ids[neg_text]])  # (3B, T)
        itm_mask = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        itm_images = torch.cat([image_features, image_features[neg_image], image_features])  # (3B, N_v, D_v)
        fused = self.run_qformer(itm_images, itm_ids, itm_mask)  # (3B, Q + T, D_q)
        n_query = query_out.shape[1]
        itm_logits = self.itm_head(fused[:, :n_query].mean(dim=1))  # (3B, 2)
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(itm_logits.device)
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [DEC] replaces [CLS]; position t predicts token t + 1; padding is ignored.
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        logits = self.lm_logits(self.run_qformer(image_features, dec_ids, attention_mask, causal=True)[:, n_query:])
        labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)

        return {"loss": itc + itm + itg, "itc": itc, "itm": itm, "itg": itg}

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D_q) -> (B, T, V + 1) through the LM head tied to the word embeddings."""
        return F.linear(self.lm_transform(text_hidden), self.word_embeddings.weight, self.lm_bias)

    # ---- initialisation from a BERT-architecture encoder -----------------------------------------

    @torch.no_grad()
    def init_text_from_bert(self, directory: str | os.PathLike) -> list[str]:
        """Copy what fits from a BERT checkpoint; returns (and logs) what was copied and what was not.

        Same width: word + position embeddings (BERT's segment-0 embedding folded into the
        positions) and the embedding LayerNorm. Narrower Q-Former: the embeddings projected on their
        top principal directions. Same width, FFN size and head count: per layer, self-attention
        into the shared attention, FFN into both the query FFN and the text FFN (as BLIP-2 does
        from bert-base), for the first min(layers) layers. Cross-attention has no counterpart.
        """
        from transformers import AutoModel

        require_safetensors(directory)  # pickled weights are refused by name, with the command that converts them
        source = AutoModel.from_pretrained(directory, use_safetensors=True, trust_remote_code=False)
        state, bert_heads = source.state_dict(), source.config.num_attention_heads
        prefix = "embeddings.word_embeddings.weight"
        if prefix not in state or "encoder.layer.0.attention.self.query.weight" not in state:
            raise ValueError(f"{directory} is not a BERT-architecture encoder (no {prefix} / encoder.layer.*)")
        config = self.connector.qformer_config
        words = state["embeddings.word_embeddings.weight"]  # (V, D_bert)
        positions = state["embeddings.position_embeddings.weight"][: self.max_text_length]
        if "embeddings.token_type_embeddings.weight" in state:
            positions = positions + state["embeddings.token_type_embeddings.weight"][0]
        vocab, bert_width = words.shape
        if vocab != self.dec_token_id:
            raise ValueError(f"{directory}: {vocab} word embeddings but its tokenizer has {self.dec_token_id} tokens")
        if positions.shape[0] < self.max_text_length:
            raise ValueError(f"max_text_length={self.max_text_length} exceeds {directory}'s {positions.shape[0]}")

        report = []
        width = config.hidden_size
        if width == bert_width:
            self.word_embeddings.weight[:vocab] = words
            self.position_embeddings.weight.copy_(positions)
            _copy(self.connector.qformer.layernorm, state, "embeddings.LayerNorm")
            report.append(f"copied word/position embeddings ({vocab}x{width}) and the embedding LayerNorm")
        elif width < bert_width:
            # Orthonormal basis of the top `width` principal directions of the word embeddings.
            mean = words.mean(0)
            basis = torch.linalg.svd(words - mean, full_matrices=False).Vh[:width]  # (D_q, D_bert)
            self.word_embeddings.weight[:vocab] = (words - mean) @ basis.T
            self.position_embeddings.weight.copy_(positions @ basis.T)
            report.append(f"projected word/position embeddings {bert_width} -> {width} wide (top principal directions)")
            report.append("not copied: embedding LayerNorm (width differs)")
        else:
            report.append(
                f"not copied: embeddings (Q-Former {width} wide, {directory} {bert_width}: wider can't be filled)"
            )

        bert_ffn = state["encoder.layer.0.intermediate.dense.weight"].shape[0]
        ours = (width, config.intermediate_size, config.num_attention_heads)
        shapes_match = ours == (bert_width, bert_ffn, bert_heads)
        bert_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        n_copy = min(config.num_hidden_layers, bert_layers) if shapes_match else 0
        for i in range(n_copy):
            layer, src = self.connector.qformer.encoder.layer[i], f"encoder.layer.{i}"
            for name in ("query", "key", "value"):
                _copy(getattr(layer.attention.attention, name), state, f"{src}.attention.self.{name}")
            _copy(layer.attention.output.dense, state, f"{src}.attention.output.dense")
            _copy(layer.attention.output.LayerNorm, state, f"{src}.attention.output.LayerNorm")
            for ffn in (self.text_ffn[i], _QueryFFN(layer)):
                _copy(ffn.intermediate.dense, state, f"{src}.intermediate.dense")
                _copy(ffn.output.dense, state, f"{src}.output.dense")
                _copy(ffn.output.LayerNorm, state, f"{src}.output.LayerNorm")
        if n_copy:
            report.append(f"copied self-attention + FFN (query and text) of layers 0-{n_copy - 1} of {bert_layers}")
            report.append("not copied: cross-attention (no counterpart in a text encoder)")
        else:
            report.append(
                "not copied: layers (need the same width / FFN size / heads: Q-Former "
                f"{'/'.join(map(str, ours))}, {directory} {bert_width}/{bert_ffn}/{bert_heads})"
            )
        for line in report:
            logger.info("init_text_from %s: %s", directory, line)
        return report


def attention_bias(n_query: int, text_mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive self-attention mask (B, 1, Q + T, Q + T): 0 where allowed, dtype-min where not.

    Keys are columns. Query columns are visible to every row; padded text columns to none. Without
    `causal` (ITC text pass, ITM) everything else is visible both ways. With `causal` (ITG):

               keys:  queries   text
      query rows   [    all   |  none   ]   queries never see the caption
      text rows    [    all   |  t' <= t ]  text sees the image summary and earlier text

    transformers' QFormer turns a 2D padding mask into a bidirectional one, which can't express the
    ITG pattern; its attention layers take a ready 4D additive mask (eager adds it to the scores,
    SDPA passes it as `attn_mask`), so the full pattern is built here once per pass.
    """
    batch, n_text = text_mask.shape
    length = n_query + n_text
    device = text_mask.device
    allowed = torch.ones(batch, length, length, dtype=torch.bool, device=device)
    allowed[:, :, n_query:] &= text_mask.bool()[:, None, :]
    if causal:
        allowed[:, :n_query, n_query:] = False
        allowed[:, n_query:, n_query:] &= torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return bias[:, None]  # (B, 1, Q + T, Q + T)


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, same_text: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_img, B_txt) ITC logits -> (negative text per image (B,), negative image per text (B,)).

    Negatives are drawn from softmax(sim) with the positive (and captions identical to it) given
    weight 0, so similar-looking pairs are picked more often. If a row has no other caption left
    (every caption in the batch is the same), it falls back to any other index.
    """
    batch = sim.shape[0]
    not_self = ~torch.eye(batch, dtype=torch.bool, device=sim.device)
    allowed = not_self if same_text is None else ~same_text
    allowed = torch.where(allowed.any(1, keepdim=True), allowed, not_self)  # (B, B), the transpose is the same
    i2t = (F.softmax(sim.float(), dim=1) + 1e-4) * allowed
    t2i = (F.softmax(sim.t().float(), dim=1) + 1e-4) * allowed
    return torch.multinomial(i2t, 1).squeeze(1), torch.multinomial(t2i, 1).squeeze(1)


class _QueryFFN:
    """A view of a Blip2QFormerLayer's query FFN with BERT's attribute names (for copying)."""

    def __init__(self, layer):
        self.intermediate, self.output = layer.intermediate_query, layer.output_query


def _copy(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    module.weight.copy_(state[f"{prefix}.weight"])
    module.bias.copy_(state[f"{prefix}.bias"])


def _init_like_bert(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
