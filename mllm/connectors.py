"""Connectors: vision features (B, N_v, D_v) -> LLM-width image tokens (B, N_img, D_llm).

`linear` is LLaVA-1's projection, `mlp2x_gelu` LLaVA-1.5's, `qformer` BLIP-2's: learned query
tokens read the image through cross-attention (transformers' Blip2QFormerModel), so the LLM sees
`num_query_tokens` tokens whatever the tower's grid. With `qformer_text_input` the Q-Former also
reads each image's instruction (InstructBLIP), so the image tokens depend on the question.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mllm.config import ConnectorConfig


class Connector(nn.Module):
    """Base: `num_tokens` is how many LLM tokens one image becomes; `reads_text` connectors also take the
    Q-Former token ids of each image's instruction (see QFormerConnector)."""

    num_tokens: int
    reads_text: bool = False

    def forward(
        self, features: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:  # (B, N_v, D_v) [+ (B, T) instruction ids and mask] -> (B, N_img, D_llm)
        raise NotImplementedError

    def _no_text(self, text_ids: torch.Tensor | None) -> None:
        """Every connector takes the same arguments; one that reads no text refuses instruction ids."""
        if text_ids is not None:
            raise ValueError(
                f"this {type(self).__name__} reads no instruction text (connector.qformer_text_input is false)"
            )


class LinearConnector(Connector):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int):
        super().__init__()
        self.num_tokens = vision_tokens
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, features: torch.Tensor, text_ids=None, text_mask=None) -> torch.Tensor:
        self._no_text(text_ids)
        return self.proj(features)  # (B, N_v, D_llm)


class MLP2xGeluConnector(Connector):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int):
        super().__init__()
        self.num_tokens = vision_tokens
        # Attribute names follow LLaVA-1.5's `mm_projector.{0,2}` so weights map one-to-one.
        self.proj = nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))

    def forward(self, features: torch.Tensor, text_ids=None, text_mask=None) -> torch.Tensor:
        self._no_text(text_ids)
        return self.proj(features)  # (B, N_v, D_llm)


POSITION_STD = 0.5  # the image tokens' learned positions at initialisation, against unit-variance features


class QFormerConnector(Connector):
    """BLIP-2's Q-Former; with `cfg.qformer_text_input`, InstructBLIP's, which also reads the instruction:
    its token ids are embedded (word + position), appended after the queries and attend with them (the
    instruction steers what the queries pick out of the image); only the query outputs go to the LLM.
    """

    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int):
        super().__init__()
        self.num_tokens = cfg.num_query_tokens
        self.reads_text = cfg.qformer_text_input
        self.qformer_config = Blip2QFormerConfig(
            hidden_size=cfg.qformer_hidden_size,
            num_hidden_layers=cfg.qformer_layers,
            num_attention_heads=cfg.qformer_heads,
            intermediate_size=4 * cfg.qformer_hidden_size,
            cross_attention_frequency=cfg.qformer_cross_attention_frequency,
            encoder_hidden_size=vision_hidden,
            # Text positions need the text feed-forward blocks, which BLIP-2 (queries only) drops.
            use_qformer_text_input=cfg.qformer_text_input,
        )
        # BLIP-2 normalises the tower's output before the Q-Former reads it; towers such as
        # EfficientNet have no final LayerNorm, so the connector owns one.
        self.vision_norm = nn.LayerNorm(vision_hidden, eps=cfg.vision_norm_eps)
        self.vision_positions = None  # (1, N_v, D_v): where each image token sits, for a tower that does not say
        if cfg.qformer_vision_positions:
            # As loud as the content: the features are layer-normalised (unit variance), and a position starting
            # at BLIP's 0.02 would take thousands of steps at stage-1 rates to be heard at all.
            self.vision_positions = nn.Parameter(torch.randn(1, vision_tokens, vision_hidden) * POSITION_STD)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_hidden_size))
        nn.init.normal_(self.query_tokens, std=self.qformer_config.initializer_range)
        self.qformer = Blip2QFormerModel(self.qformer_config)
        if self.reads_text:
            self.word_embeddings = nn.Embedding(cfg.qformer_vocab_size, cfg.qformer_hidden_size)
            self.position_embeddings = nn.Embedding(cfg.qformer_max_text_positions, cfg.qformer_hidden_size)
        self.proj = nn.Linear(cfg.qformer_hidden_size, llm_hidden)  # BLIP-2's `language_projection`

    def query_features(
        self,
        features: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q-Former output before the LLM projection (BLIP-2 stage 1 trains on this): (B, N_v, D_v) -> (B, Q, D_q).

        `text_ids` (B, T) / `text_mask` (B, T, 1 = real token): the instruction, for a `reads_text` connector only.
        """
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # (B, Q, D_q)
        features = self.image_keys(features)  # (B, N_v, D_v)
        if not self.reads_text:
            self._no_text(text_ids)
            return self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state
        text_ids, text_mask = self._check_text(text_ids, text_mask, features.shape[0], queries.device)
        positions = torch.arange(text_ids.shape[1], device=queries.device)
        text = self.word_embeddings(text_ids) + self.position_embeddings(positions)  # (B, T, D_q)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=queries.device)  # (B, Q)
        out = self.qformer(
            query_embeds=torch.cat([queries, text.to(queries.dtype)], dim=1),  # (B, Q + T, D_q)
            query_length=queries.shape[1],  # cross-attention to the image and the query FFN: queries only
            attention_mask=torch.cat([query_mask, text_mask], dim=1),  # (B, Q + T)
            encoder_hidden_states=features,
        )
        return out.last_hidden_state[:, : queries.shape[1]]  # (B, Q, D_q)

    def image_keys(self, features: torch.Tensor) -> torch.Tensor:
        """What the cross-attention reads: the tower's tokens normalised, plus their positions where the connector
        learns them. (B, N_v, D_v) -> (B, N_v, D_v)."""
        features = self.vision_norm(features)
        if self.vision_positions is None:
            return features
        if features.shape[1] != self.vision_positions.shape[1]:
            raise ValueError(
                f"this Q-Former learned positions for {self.vision_positions.shape[1]} image tokens but got "
                f"{features.shape[1]}; use the tower settings (image size, pooling) it was trained with"
            )
        return features + self.vision_positions.to(features.dtype)

    def _check_text(self, ids, mask, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is None:
            raise ValueError(
                "this Q-Former reads each image's instruction too (InstructBLIP): pass its Q-Former token ids "
                "(the processor's `qformer_input_ids`, from the text of the user turn holding the image)"
            )
        if ids.ndim != 2 or ids.shape[0] != batch:
            raise ValueError(f"instruction ids must be (n_images={batch}, T), got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"the instruction is {ids.shape[1]} Q-Former tokens; this Q-Former reads at most "
                f"{self.position_embeddings.num_embeddings} (truncate it)"
            )
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            raise ValueError(f"instruction mask {tuple(mask.shape)} and ids {tuple(ids.shape)} differ in shape")
        return ids.to(device), mask.to(device=device, dtype=torch.long)

    def forward(
        self, features: torch.Tensor, text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.proj(self.query_features(features, text_ids, text_mask))  # (B, Q, D_llm)


CONNECTORS: dict[str, type[Connector]] = {
    "linear": LinearConnector,
    "mlp2x_gelu": MLP2xGeluConnector,
    "qformer": QFormerConnector,
}


def build_connector(cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int) -> Connector:
    try:
        cls = CONNECTORS[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown connector {cfg.kind!r}; known: {', '.join(CONNECTORS)}") from None
    return cls(cfg, vision_hidden, vision_tokens, llm_hidden)
