"""The Q-Former connector with `qformer_text_input` (InstructBLIP): it reads each image's instruction too."""

from __future__ import annotations

import re

import pytest
import torch

from mllm.config import ConnectorConfig
from mllm.connectors import QFormerConnector, build_connector

DIMS = dict(vision_hidden=12, vision_tokens=9, llm_hidden=20)


def _cfg(text: bool) -> ConnectorConfig:
    return ConnectorConfig(
        kind="qformer",
        num_query_tokens=4,
        qformer_layers=2,
        qformer_hidden_size=16,
        qformer_heads=2,
        qformer_text_input=text,
        qformer_vocab_size=50,
        qformer_max_text_positions=8,
    )


def test_text_connector_shapes_and_gradients():
    torch.manual_seed(0)
    connector = build_connector(_cfg(True), **DIMS)
    assert isinstance(connector, QFormerConnector) and connector.reads_text
    ids = torch.randint(1, 50, (3, 5))
    out = connector(torch.randn(3, 9, 12), ids, torch.ones_like(ids))
    assert out.shape == (3, 4, 20)  # only the query outputs reach the LLM
    out.sum().backward()
    assert connector.word_embeddings.weight.grad[ids.unique()].abs().sum() > 0
    # Text positions have their own feed-forward blocks (BLIP-2 without text input has none).
    assert any(".intermediate." in name for name, _ in connector.qformer.named_parameters())


def test_padding_the_instruction_changes_nothing():
    torch.manual_seed(0)
    connector = build_connector(_cfg(True), **DIMS).eval()
    features, ids = torch.randn(1, 9, 12), torch.tensor([[5, 6, 7]])
    alone = connector(features, ids)  # no mask: every token is real
    padded = connector(features, torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)
    other = connector(features, torch.tensor([[9, 6, 7]]))
    assert (other - alone).abs().max() > 1e-4  # the instruction steers what the queries read


def test_plain_qformer_is_unchanged_and_refuses_text():
    plain = build_connector(_cfg(False), **DIMS)
    assert not plain.reads_text
    # The text connector only adds weights (embeddings, text FFN): a plain one has none of them.
    names, text_names = set(plain.state_dict()), set(build_connector(_cfg(True), **DIMS).state_dict())
    extra = text_names - names
    assert names < text_names and {"word_embeddings.weight", "position_embeddings.weight"} < extra
    assert all("embeddings" in n or re.search(r"\.layer\.\d+\.(intermediate|output)\.", n) for n in extra)
    assert plain(torch.randn(2, 9, 12)).shape == (2, 4, 20)
    with pytest.raises(ValueError, match="reads no instruction text"):
        plain(torch.randn(2, 9, 12), torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (None, None, "reads each image's instruction too"),
        (torch.ones(3, dtype=torch.long), None, r"must be \(n_images=2, T\)"),
        (torch.ones(1, 3, dtype=torch.long), None, r"must be \(n_images=2, T\)"),
        (torch.ones(2, 9, dtype=torch.long), None, "9 Q-Former tokens; this Q-Former reads at most 8"),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), "mask .* and ids .* differ"),
    ],
)
def test_bad_instruction_inputs_raise_clearly(ids, mask, message):
    connector = build_connector(_cfg(True), **DIMS)
    with pytest.raises(ValueError, match=message):
        connector(torch.randn(2, 9, 12), ids, mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qformer_text_input=True), "needs connector.kind='qformer', not 'mlp2x_gelu'"),
        (dict(kind="qformer", qformer_text_input=1), "qformer_text_input=1 must be true or false"),
        (dict(kind="qformer", qformer_vocab_size=0), "qformer_vocab_size=0 must be > 0"),
        (dict(kind="qformer", qformer_max_text_positions=-1), "qformer_max_text_positions=-1 must be > 0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConnectorConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    from mllm.config import MLLMConfig

    config = MLLMConfig(connector=_cfg(True))
    config.save(tmp_path / "mllm_config.json")
    assert MLLMConfig.load(tmp_path / "mllm_config.json") == config
