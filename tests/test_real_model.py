"""End to end on the real offline weights: EfficientNet-Lite0 tower + SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
from PIL import Image

from mllm.generation import GenerationConfig, generate, stream
from mllm.session import ChatSession

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    from mllm.loading import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="module")
def cat():
    from skimage import data

    return Image.fromarray(data.chelsea())


def test_default_model_streams_text_about_an_image(default_model, cat):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "Describe the image."}]}
    ]
    # A photo is outside the demo model's shapes world: it still answers in its one description format.
    pieces = list(stream(default_model, messages, gen=GenerationConfig(max_new_tokens=24)))
    text = "".join(pieces)
    assert len(pieces) >= 5, pieces  # streamed, not returned at once
    assert sum(c.isalpha() for c in text) > 20, text
    assert default_model.vision.num_tokens == 49 and default_model.vision.hidden_size == 1728  # the whole 7x7 grid


def test_real_session_follow_up_reuses_the_cache_on_the_cpu_default(default_model, cat):
    gen = GenerationConfig(max_new_tokens=12)
    session = ChatSession(default_model, gen=gen)
    session.ask("Describe this picture.", [cat])
    second = session.ask("Say it again, shorter.")
    assert session.last_prefill_tokens < 30 and second  # only the new turn was prefilled


def test_real_session_follow_up_matches_reprefill(cat):
    """On torch's int4 path a follow-up on the session's cache is token for token a re-prefill of the whole
    history (llama.cpp computes a one-row and a many-row prefill with different kernels, so there the two
    can part at a near-tie)."""
    from mllm.loading import load_model

    default_model = load_model("default", device="cpu", backend="int4")
    gen = GenerationConfig(max_new_tokens=12)
    session = ChatSession(default_model, gen=gen)
    session.ask("Describe this picture.", [cat])
    second = session.ask("Say it again, shorter.")
    assert session.last_prefill_tokens < 30
    assert second == generate(default_model, session.messages[:-1], session.images, gen=gen)
