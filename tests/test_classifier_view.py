"""The classifier's view (`mllm.classifier_view`): the real EfficientNet-Lite0 classifier on real photos, its words
in the image slots, training rows that give a view, the real-photo question set and its scorer."""

from __future__ import annotations

import json
import random
from importlib import resources

import pytest
import torch
from PIL import Image

from mllm.assembly import build_model
from mllm.classifier_view import fit_view, imagenet_labels, view_text
from mllm.config import LLMConfig, MLLMConfig, VisionConfig
from training.data import DataError, parse_row
from training.photo_eval import PHOTOS, photo_correct, write_question_set
from training.synth_views import answer, draw_view, neighbours, shapes_world_classes


def _photo(package: str, inner: str) -> Image.Image:
    with resources.as_file(resources.files(package) / inner) as path:
        return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def viewed(tiny_llama_dir):
    """The real tower and its classifier, a tiny LLM (a character-level tokenizer: 24 slots hold few words): 49
    connector tokens + 24 words per image."""
    config = MLLMConfig(
        vision=VisionConfig(kind="efficientnet_lite0", features="multiscale", classifier_view=24),
        llm=LLMConfig(path=str(tiny_llama_dir)),
        template="auto",
    )
    torch.manual_seed(0)
    return build_model(config, device="cpu").eval()


def test_the_labels_are_imagenets_in_the_classifiers_order():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[285] == "Egyptian Mau" and labels[293] == "cheetah"


@pytest.mark.parametrize(
    "photo, top",
    [
        (("skimage", "data/chelsea.png"), "Egyptian Mau"),
        (("skimage", "data/coffee.png"), "espresso"),
        (("gradio", "media_assets/images/lion.jpg"), "lion"),
    ],
)
def test_the_classifier_reads_real_photos_from_the_towers_own_output(viewed, photo, top):
    pixels = viewed.processor.image_processor.preprocess(_photo(*photo))[None]
    with torch.inference_mode():
        view = viewed.view.views(viewed.view.probabilities(viewed.vision(pixels)))[0]
    assert view[0][0] == top and view[0][1] > 0.5
    assert all(p >= 0.02 for _, p in view[1:]) and len(view) <= 3


def test_the_words_fill_a_fixed_number_of_slots_padded_on_the_left(viewed):
    view = viewed.view
    short = view.ids([("lion", 0.89)])
    assert len(short) == view.num_tokens and short[0] == view.filler and short[-1] != view.filler
    long = [("Great Dane", 0.45), ("Curly-coated Retriever", 0.2), ("Chesapeake Bay Retriever", 0.1)]
    ids = view.ids(long)
    assert len(ids) == view.num_tokens
    kept = view.tokenizer.decode(ids).strip()
    assert kept.startswith("maybe: Great Dane") and kept.count(",") < 2  # classes that do not fit are left out
    assert kept == view_text(fit_view(long, view.tokenizer, view.num_tokens))  # what a training answer may name


def test_the_image_slots_hold_the_connector_tokens_then_the_words(viewed, images):
    assert viewed.tokens_per_image == viewed.connector.num_tokens + 24
    encoded = viewed.processor.encode([{"role": "user", "content": "<image>\nWhat is this?"}], images[:1])
    assert int((encoded.input_ids == viewed.image_token_id).sum()) == viewed.tokens_per_image
    pixels = viewed.processor.image_inputs(encoded)["pixel_values"]
    with torch.inference_mode():
        own = viewed.get_image_features(pixels)  # (1, 49 + 24, D)
        given = viewed.get_image_features(pixels, image_views=[[("cheetah", 0.9)]])
    assert own.shape == (1, viewed.tokens_per_image, viewed.llm.config.hidden_size)
    assert torch.equal(own[:, :49], given[:, :49])  # the connector's tokens do not depend on the view
    words = viewed.llm.get_input_embeddings()(torch.tensor([viewed.view.ids([("cheetah", 0.9)])]))
    assert torch.equal(given[:, 49:], words) and not torch.equal(own[:, 49:], given[:, 49:])


def test_only_the_efficientnet_tower_has_a_classifier_view(tiny_clip_dir):
    with pytest.raises(ValueError, match="classifier_view needs the efficientnet_lite0 tower"):
        VisionConfig(kind="hf", path=str(tiny_clip_dir), classifier_view=8)
    with pytest.raises(ValueError, match="classifier_view"):
        VisionConfig(classifier_view=-1)


def test_a_row_may_give_its_images_view_and_a_bad_one_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    row = {"id": "r", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A lion."}]}  # fmt: skip
    assert parse_row("r", {**row, "classifier_view": [["lion", 0.9], ["cheetah", 0.05]]}, tmp_path).views == [
        [("lion", 0.9), ("cheetah", 0.05)]
    ]
    assert parse_row("r", row, tmp_path).views is None
    bad = {
        "not a list": ("lion", "non-empty list"),
        "unknown": ([["unicorn", 0.9]], "'unicorn', which is not one of the 1000 ImageNet classes"),
        "probability": ([["lion", 1.5]], "probability 1.5; use a value in \\[0, 1\\]"),
        "pair": ([["lion"]], "is not a \\[class name, probability\\] pair"),
    }
    for value, message in bad.values():
        with pytest.raises(DataError, match=f"^r: .*{message}"):
            parse_row("r", {**row, "classifier_view": value}, tmp_path)
    two = {**row, "image": ["a.png", "a.png"], "classifier_view": [["lion", 0.9]]}
    with pytest.raises(DataError, match="describes one image, but the row has 2"):
        parse_row("r", two, tmp_path)


def test_the_answer_follows_how_sure_the_view_is():
    assert answer([("cheetah", 0.73), ("leopard", 0.14)]) == "This looks like a cheetah."
    assert answer([("Egyptian Mau", 0.77)]) == "This looks like an Egyptian Mau."
    assert answer([("drilling rig", 0.46), ("crane", 0.09)]) == (
        "It may be a drilling rig, or perhaps a crane; I am not sure."
    )
    assert answer([("bobsleigh", 0.2), ("football helmet", 0.17), ("go-kart", 0.05)]) == (
        "I am not sure what this shows. My best guesses: bobsleigh, football helmet or go-kart."
    )


def test_drawn_views_look_like_real_photos_views():
    from mllm.vision import EfficientNetLite0Tower

    weight, _ = EfficientNetLite0Tower.imagenet_classifier()
    near = neighbours(weight)
    labels = imagenet_labels()
    assert {labels[i] for i in near[293].tolist()} & {"leopard", "jaguar", "snow leopard"}  # cheetah's neighbours
    rng = random.Random(0)
    for _ in range(200):
        view = draw_view(rng, rng.randrange(1000), near, labels)
        probabilities = [p for _, p in view]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-9
        assert 0.05 < probabilities[0] < 0.98 and len({name for name, _ in view}) == 3
    sure = sum(answer(draw_view(rng, 293, near, labels)).startswith("This looks") for _ in range(400))
    assert 0.25 < sure / 400 < 0.42  # each kind of answer about a third of the rows


def test_classes_common_in_shapes_pictures_are_found():
    probabilities = torch.full((100, 1000), 1e-4)
    probabilities[:, 549] = 0.5  # envelope, on every picture
    probabilities[:3, 852] = 0.4  # tennis ball, on 3 of them
    probabilities[0, 291] = 0.45  # lion, once
    assert shapes_world_classes(probabilities, min_share=0.02) == {549, 852} | set(
        probabilities[5].topk(3).indices.tolist()
    )


def test_the_photo_question_set_is_built_from_the_installed_packages_and_scored(tmp_path):
    path = write_question_set(tmp_path)
    rows = json.loads(path.read_text())
    assert len(rows) == len(PHOTOS) and all((tmp_path / "images" / r["image"]).is_file() for r in rows)
    cheetah = next(r for r in rows if r["id"] == "gradio-cheetah")
    astronaut = next(r for r in rows if r["id"] == "skimage-astronaut")
    assert photo_correct("This looks like a cheetah.", cheetah)
    assert photo_correct("I am not sure what this shows. My best guesses: leopard, jaguar or lion.", cheetah)
    assert not photo_correct("This looks like a lion.", cheetah)
    assert not photo_correct("There are 4 objects: a large blue circle at the top left.", cheetah)
    assert photo_correct("I am not sure what this shows. My best guesses: bobsleigh or go-kart.", astronaut)
    assert not photo_correct("This looks like a bobsleigh.", astronaut)
    assert view_text([("cheetah", 0.734), ("leopard", 0.14)]) == "sure: cheetah, leopard"
    assert view_text([("drilling rig", 0.46)]) == "maybe: drilling rig"
    assert view_text([("bobsleigh", 0.2), ("go-kart", 0.05)]) == "unsure: bobsleigh, go-kart"


def test_a_drawn_view_is_cut_to_what_the_model_reads_so_answers_never_name_more():
    from mllm.llm import load_tokenizer
    from mllm.vision import EfficientNetLite0Tower

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    near, labels, rng = neighbours(EfficientNetLite0Tower.imagenet_classifier()[0]), imagenet_labels(), random.Random(1)
    cut = 0
    for _ in range(200):
        drawn = draw_view(rng, rng.randrange(1000), near, labels)
        view = fit_view(drawn, tokenizer, 10)
        assert view == drawn[: len(view)]  # the last classes go first
        assert len(tokenizer.encode(view_text(view), add_special_tokens=False)) <= 10 or len(view) == 1
        said, kept = answer(view), {name for name, _ in view}
        assert view[0][0] in said and not [name for name, _ in drawn[len(view) :] if name in said and name not in kept]
        cut += len(view) < len(drawn)
    assert cut > 20  # long names really are cut


def test_pictures_of_no_world_are_textured_and_reproducible():
    import numpy as np

    from training.synth_views import texture

    for seed in range(5):  # each kind once
        image = texture(seed, size=64)
        pixels = np.asarray(image).reshape(-1, 3)
        assert image.size == (64, 64) and len(np.unique(pixels, axis=0)) > 200  # never a few flat colours
        assert np.array_equal(np.asarray(texture(seed, size=64)), np.asarray(image))
