"""Connectors map (B, N_v, D_v) features to (B, N_img, D_llm) image tokens; the registry is explicit."""

from __future__ import annotations

import pytest
import torch

from mllm.config import ConnectorConfig
from mllm.connectors import CONNECTORS, build_connector


@pytest.mark.parametrize("kind, tokens", [("linear", 9), ("mlp2x_gelu", 9), ("qformer", 4)])
def test_connector_shapes(kind, tokens):
    cfg = ConnectorConfig(kind=kind, num_query_tokens=4, qformer_layers=1, qformer_hidden_size=16, qformer_heads=2)
    connector = build_connector(cfg, vision_hidden=12, vision_tokens=9, llm_hidden=20)
    out = connector(torch.randn(3, 9, 12))
    assert out.shape == (3, tokens, 20)
    assert connector.num_tokens == tokens
    out.sum().backward()
    assert all(p.grad is not None for p in connector.parameters() if p.requires_grad)


def test_unknown_connector_raises():
    cfg = ConnectorConfig()
    object.__setattr__(cfg, "kind", "resampler")  # bypass config validation to hit the registry
    with pytest.raises(ValueError, match="unknown connector 'resampler'; known: linear, mlp2x_gelu, qformer"):
        build_connector(cfg, 4, 4, 4)
    assert set(CONNECTORS) == {"linear", "mlp2x_gelu", "qformer"}


def test_qformer_query_count_is_independent_of_the_grid():
    cfg = ConnectorConfig(kind="qformer", num_query_tokens=3, qformer_layers=1, qformer_hidden_size=16, qformer_heads=2)
    connector = build_connector(cfg, vision_hidden=8, vision_tokens=49, llm_hidden=10)
    assert connector(torch.randn(2, 49, 8)).shape == (2, 3, 10)
    assert connector(torch.randn(2, 16, 8)).shape == (2, 3, 10)


def test_qformer_vision_positions_make_the_cross_attention_see_where_each_token_is():
    """Without positions the Q-Former reads its image tokens as a set: shuffling them changes nothing, which is
    what a CNN tower (no position in its features) hands it. With them the order matters."""
    torch.manual_seed(0)
    features = torch.randn(2, 9, 16)  # (B, N_v, D_v)
    shuffled = features[:, torch.randperm(9)]
    blind = build_connector(ConnectorConfig(kind="qformer", num_query_tokens=4), 16, 9, 32).eval()
    placed = build_connector(
        ConnectorConfig(kind="qformer", num_query_tokens=4, qformer_vision_positions=True), 16, 9, 32
    ).eval()
    assert placed.vision_positions.shape == (1, 9, 16) and blind.vision_positions is None
    with torch.no_grad():
        torch.testing.assert_close(blind(features), blind(shuffled))
        assert placed(features).shape == (2, 4, 32)
        assert not torch.allclose(placed(features), placed(shuffled), atol=1e-4)
        with pytest.raises(ValueError, match="learned positions for 9 image tokens but got 16"):
            placed(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="qformer_vision_positions=1 must be true or false"):
        ConnectorConfig(kind="qformer", qformer_vision_positions=1)
