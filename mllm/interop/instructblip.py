"""InstructBLIP: the Q-Former reads the instruction too, so image features depend on the text.

mllm's processor / model / generation pass only pixels to the connector; until they carry the instruction's
Q-Former token ids, this wrapper does it around an MLLM whose connector is an `InstructQFormerConnector`:

    ib = InstructBlip.from_pretrained(path)      # a transformers InstructBLIP directory or a converted checkpoint
    ib.generate([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                              {"type": "text", "text": "What is unusual here?"}]}])

The instruction of an image is the text of the turn that carries it (placeholders removed): exactly the
`text` InstructBlipProcessor is given for that prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from mllm.checkpoint import QFORMER_TOKENIZER_DIR, assemble_checkpoint, read_config
from mllm.generation import GenerationConfig, TextStream, stream_ids
from mllm.interop.blip2 import instruct_connector_factory
from mllm.interop.common import detect_format
from mllm.model import MLLM


@dataclass
class InstructBlip:
    model: MLLM
    """The MLLM; its connector is an InstructQFormerConnector."""
    qformer_tokenizer: PreTrainedTokenizerBase
    """The Q-Former's (BERT) tokenizer, for the instruction."""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, quantization: str | None = None):
        path = Path(path)
        if detect_format(path) == "instructblip":
            from mllm.interop.importer import plan_import
            from mllm.interop.plan import assemble

            plan = plan_import(path)
            if quantization is not None:
                plan.config = plan.config.replace(llm=_with(plan.config.llm, quantization=quantization))
            return cls(assemble(plan, device), plan.extras["qformer_tokenizer"])
        if not (path / QFORMER_TOKENIZER_DIR).is_dir():
            raise ValueError(f"{path} is neither a transformers InstructBLIP directory nor a converted one")
        config = read_config(path, quantization)
        qformer_tokenizer = AutoTokenizer.from_pretrained(str(path / QFORMER_TOKENIZER_DIR), trust_remote_code=False)
        with safe_open(str(path / "connector.safetensors"), framework="pt") as f:
            words = f.get_slice("word_embeddings.weight").get_shape()
            positions = f.get_slice("position_embeddings.weight").get_shape()[0]
        factory = instruct_connector_factory(config.connector, words, positions, qformer_tokenizer.pad_token_id)
        return cls(assemble_checkpoint(path, config, device=device, connector_factory=factory), qformer_tokenizer)

    # ---- instruction -> Q-Former ids ----------------------------------------------------------------
    def instructions(self, messages: list[dict]) -> list[str]:
        """One instruction per image, in placeholder order: the text of the turn that carries the image."""
        token = self.model.processor.image_token
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                n_images = sum(1 for part in content if part.get("type") == "image")
                text = "".join(part["text"] for part in content if part.get("type") == "text")
            else:
                n_images = content.count(token)
                text = content.replace(token + "\n", "").replace(token, "")
            out += [text] * n_images
        return out

    def image_features(self, messages: list[dict], sources: list) -> torch.Tensor:
        """(n_img, Q, D_llm) for the images `sources` of `messages`."""
        model = self.model
        instructions = self.instructions(messages)
        if len(instructions) != len(sources):
            raise ValueError(f"{len(sources)} image(s) but {len(instructions)} image placeholder(s) in the messages")
        qformer = self.qformer_tokenizer(
            instructions,
            padding=True,
            truncation=True,
            max_length=model.connector.max_positions,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        pixel_values = model.processor.pixel_values(sources)
        with torch.inference_mode():
            features = model.vision(pixel_values.to(model.device))  # (n_img, N_v, D_v)
            features = features.to(next(model.connector.parameters()).dtype)
            return model.connector(features, qformer["input_ids"], qformer["attention_mask"])

    # ---- scoring / generation ------------------------------------------------------------------------
    def logits(self, messages: list[dict], images: list | None = None) -> torch.Tensor:
        """(L, V) next-token logits of the prompt (generation prompt added)."""
        enc = self.model.processor.encode(messages, images, add_generation_prompt=True)
        features = self.image_features(messages, enc.images) if enc.images else None
        with torch.inference_mode():
            logits, _ = self.model(enc.input_ids[None], image_features=features)
        return logits[0]

    def generate_ids(self, messages: list[dict], images: list | None = None, gen: GenerationConfig | None = None):
        enc = self.model.processor.encode(messages, images, add_generation_prompt=True)
        features = self.image_features(messages, enc.images) if enc.images else None
        cache = DynamicCache(config=self.model.llm.config)
        return stream_ids(self.model, enc.input_ids, cache, [], gen or GenerationConfig(), features)

    def generate(self, messages: list[dict], images: list | None = None, gen: GenerationConfig | None = None) -> str:
        text = TextStream(self.model.processor)
        return "".join(text.push(token) for token in self.generate_ids(messages, images, gen))


def _with(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)
