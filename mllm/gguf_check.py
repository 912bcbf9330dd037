"""The check a GGUF export runs: the exported files answer a fixed set of images and questions in llama.cpp's
multimodal library, and mllm's own model (torch, float32, the same weights before export) answers them too.

Both decode greedily. The report says how many answers are token-for-token equal (the prompt's tokens must be
equal too: llama.cpp tokenizes the text with the GGUF's own tokenizer), the largest difference between the two
first-token logit vectors, and the largest difference between the image features llama.cpp's mmproj computes and
mllm's tower + connector (which tells a tower problem from an LLM one).

Both sides see the same pixels: the check hands llama.cpp the model-sized image mllm's processor made (S x S RGB,
already padded / resized), so its own resize is the identity and the comparison is of the models. A user's image
goes through llama.cpp's own LLaVA preprocessing (pad to a square, bicubic resize), close to mllm's `pad` mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import DynamicCache

from mllm.backends.mtmd import MtmdRunner, marker
from mllm.templates import render

QUESTIONS = ("What is in the image?", "What colour is the biggest shape?", "Describe the image in one sentence.")
MAX_NEW_TOKENS = 24


def check_images(size: int = 224) -> list[Image.Image]:
    """Three fixed pictures: a red disc on white, a blue square and a green triangle on grey, seeded noise."""
    disc = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(disc).ellipse((size * 0.2, size * 0.2, size * 0.8, size * 0.8), fill=(220, 30, 30))
    shapes = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(shapes)
    draw.rectangle((size * 0.1, size * 0.1, size * 0.45, size * 0.45), fill=(30, 60, 220))
    draw.polygon([(size * 0.55, size * 0.9), (size * 0.9, size * 0.9), (size * 0.72, size * 0.5)], fill=(30, 180, 60))
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [disc, shapes, Image.fromarray(noise)]


@dataclass
class Case:
    """One image and question answered by both."""

    image: int
    question: str
    mllm_tokens: list[int]
    llama_tokens: list[int]
    prompt_equal: bool
    first_logit_diff: float  # max |llama.cpp - mllm| over the vocabulary, before the first answer token

    @property
    def equal(self) -> bool:
        return self.prompt_equal and self.mllm_tokens == self.llama_tokens


@dataclass
class CheckReport:
    llm_type: str
    mmproj_type: str
    cases: list[Case] = field(default_factory=list)
    image_feature_diff: float = 0.0  # max |llama.cpp mmproj output - mllm connector output| over the images
    feature_scale: float = 0.0  # max |mllm connector output|
    logit_scale: float = 0.0  # max |mllm first-token logit|, to read the differences against
    has_cls: bool = False  # the tower has a CLS token (CLIP)

    @property
    def equal(self) -> int:
        return sum(case.equal for case in self.cases)

    @property
    def all_equal(self) -> bool:
        return self.equal == len(self.cases)

    @property
    def max_logit_diff(self) -> float:
        return max((case.first_logit_diff for case in self.cases), default=0.0)

    def summary(self) -> str:
        line = (
            f"LLM {self.llm_type} + mmproj {self.mmproj_type}: {self.equal}/{len(self.cases)} answers token-for-token "
            f"equal to mllm's (torch, float32); max first-token logit diff {self.max_logit_diff:.4g} "
            f"(logits up to {self.logit_scale:.3g}); max image-feature diff {self.image_feature_diff:.3g} (features up to "
            f"{self.feature_scale:.3g})"
        )
        if self.features_differ:
            line += "; llama.cpp computes different image features"
            if self.has_cls:  # what the check measured on tiny CLIP towers (tests/test_gguf_export.py)
                line += " (a CLIP tower meets llama.cpp's CLS-token order defect, ggml-org/llama.cpp#25814)"
        elif not self.prompt_ok:
            line += "; the prompts tokenize differently"
        elif not self.all_equal:
            line += f"; {self.llm_type} changes answers"
        return line

    @property
    def features_differ(self) -> bool:
        # f16 weights and GELU's tanh / table forms stay well inside the features' range (measured: 7.9e-4 of 0.75 on
        # the tiny SigLIP; 1.2e-3 on the trained connector of scripts/bench_gguf_export.py); a wrong tower or token
        # order is off by about the features' own size (0.98 of 0.8 on the tiny CLIP, ggml-org/llama.cpp#25814).
        return self.image_feature_diff > 0.25 * self.feature_scale

    @property
    def prompt_ok(self) -> bool:
        return all(case.prompt_equal for case in self.cases)


@torch.inference_mode()
def mllm_answer(model, ids: torch.Tensor, features: torch.Tensor, stops: set[int]) -> tuple[list[int], np.ndarray]:
    """mllm's greedy answer to `ids` (L,) with `features` (n_img, N_img, D) in its image slots, through the LLM's
    own transformers forward and KV cache: (tokens, first-token logits (V,))."""
    embeds = model.embed(ids[None], image_features=features)  # (1, L, D)
    cache = DynamicCache()
    out = model.llm(inputs_embeds=embeds, cache=cache, use_cache=True)
    logits = out.logits[0, -1].float()
    first, tokens = logits.numpy().copy(), []
    while len(tokens) < MAX_NEW_TOKENS:
        token = int(logits.argmax())
        if token in stops:
            break
        tokens.append(token)
        out = model.llm(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        logits = out.logits[0, -1].float()
    return tokens, first


def llama_prompt(model, question: str, adds_bos: bool) -> str:
    """The prompt text llama.cpp is given: mllm's rendered template, the image token replaced by mtmd's marker,
    and a leading BOS left to the tokenizer when the GGUF adds one (as llama-server does)."""
    processor = model.processor
    messages = [{"role": "user", "content": f"{processor.image_token}\n{question}"}]
    text = render(processor.tokenizer, processor.template, messages, True).replace(processor.image_token, marker())
    bos = processor.tokenizer.bos_token
    if adds_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def run_check(model, llm_gguf, mmproj, llm_type: str, mmproj_type: str, adds_bos: bool) -> CheckReport:
    """Answer `QUESTIONS` about `check_images()` with `model` (an MLLM in float32) and with the exported files."""
    processor = model.processor
    stops = set(processor.stop_token_ids)
    report = CheckReport(llm_type, mmproj_type, has_cls=model.vision.model.config.model_type == "clip_vision_model")
    runner = MtmdRunner(llm_gguf, mmproj)
    try:
        for index, picture in enumerate(check_images()):
            image = processor.image_processor.load(picture)  # the (S, S) RGB image the tower sees
            pixels = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
            with torch.inference_mode():
                features = model.get_image_features(processor.image_processor([image]))  # (1, N_img, D)
            theirs = runner.image_embeddings(pixels)  # (N_img, D)
            report.image_feature_diff = max(
                report.image_feature_diff, float(np.abs(theirs - features[0].numpy()).max())
            )
            report.feature_scale = max(report.feature_scale, float(features.abs().max()))
            for question in QUESTIONS:
                messages = [{"role": "user", "content": f"{processor.image_token}\n{question}"}]
                ids = processor.encode(messages, images=[image], add_generation_prompt=True, labels=False).input_ids
                tokens, logits = mllm_answer(model, ids, features, stops)
                answer = runner.answer(llama_prompt(model, question, adds_bos), [pixels], MAX_NEW_TOKENS, stops)
                ours = [-1 if i == processor.image_token_id else i for i in ids.tolist()]
                n = logits.shape[0]  # llama.cpp's vocabulary may hold the image token past the LLM's
                report.logit_scale = max(report.logit_scale, float(np.abs(logits).max()))
                report.cases.append(
                    Case(
                        image=index,
                        question=question,
                        mllm_tokens=tokens,
                        llama_tokens=answer.tokens,
                        prompt_equal=ours == answer.prompt_tokens,
                        first_logit_diff=float(np.abs(answer.first_logits[:n] - logits).max()),
                    )
                )
    finally:
        runner.close()
    return report
