"""Connectors: vision features (B, N_v, D_v) -> LLM-width image tokens (B, N_img, D_llm).

`linear` is LLaVA-1's projection, `mlp2x_gelu` LLaVA-1.5's, `qformer` BLIP-2's: learned query
tokens read the image through cross-attention (transformers' Blip2QFormerModel), so the LLM sees
`num_query_tokens` tokens whatever the tower's grid.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mllm.config import ConnectorConfig


class Connector(nn.Module):
    """Base: `num_tokens` is how many LLM tokens one image becomes."""

    num_tokens: int

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, N_v, D_v) -> (B, N_img, D_llm)
        raise NotImplementedError


class LinearConnector(Connector):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int):
        super().__init__()
        self.num_tokens = vision_tokens
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # (B, N_v, D_llm)


class MLP2xGeluConnector(Connector):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int):
        super().__init__()
        self.num_tokens = vision_tokens
        # Attribute names follow LLaVA-1.5's `mm_projector.{0,2}` so weights map one-to-one.
        self.proj = nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # (B, N_v, D_llm)


class QFormerConnector(Connector):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, vision_tokens: int, llm_hidden: int):
        super().__init__()
        self.num_tokens = cfg.num_query_tokens
        self.qformer_config = Blip2QFormerConfig(
            hidden_size=cfg.qformer_hidden_size,
            num_hidden_layers=cfg.qformer_layers,
            num_attention_heads=cfg.qformer_heads,
            intermediate_size=4 * cfg.qformer_hidden_size,
            cross_attention_frequency=cfg.qformer_cross_attention_frequency,
            encoder_hidden_size=vision_hidden,
        )
        # BLIP-2 normalises the tower's output before the Q-Former reads it; towers such as
        # EfficientNet have no final LayerNorm, so the connector owns one.
        self.vision_norm = nn.LayerNorm(vision_hidden, eps=cfg.vision_norm_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_hidden_size))
        nn.init.normal_(self.query_tokens, std=self.qformer_config.initializer_range)
        self.qformer = Blip2QFormerModel(self.qformer_config)
        self.proj = nn.Linear(cfg.qformer_hidden_size, llm_hidden)  # BLIP-2's `language_projection`

    def query_features(self, features: torch.Tensor) -> torch.Tensor:
        """Q-Former output before the LLM projection (BLIP-2 stage 1 trains on this)."""
        features = self.vision_norm(features)  # (B, N_v, D_v)
        queries = self.query_tokens.expand(features.shape[0], -1, -1)  # (B, Q, D_q)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=features)
        return out.last_hidden_state  # (B, Q, D_q)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.query_features(features))  # (B, Q, D_llm)


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
