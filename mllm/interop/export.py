"""Export an mllm checkpoint as a transformers `LlavaForConditionalGeneration` directory.

The result loads with `LlavaForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` and
no custom code, so vLLM, SGLang and `transformers serve` can serve it:

mllm                                   llava-hf
vision (hf CLIP / SigLIP tower)        vision_tower, vision_feature_layer, vision_feature_select_strategy
connector mlp2x_gelu proj.0 / proj.2   multi_modal_projector.linear_1 / linear_2, projector_hidden_act="gelu"
connector linear proj                  linear_1 = proj, linear_2 = identity, projector_hidden_act="linear"
llm (LoRA merged on request)           language_model + lm_head; vocabulary grown to hold the image token
processor                              LlavaProcessor: image processor with our resize, tokenizer, chat
                                       template accepting list content, image token expansion

Q-Former connectors and non-transformers towers (EfficientNet-Lite0) have no Llava equivalent: refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mllm.atomic import atomic_directory
from mllm.checkpoint import load_pretrained, read_config
from mllm.config import MLLMConfig
from mllm.errors import CheckpointError
from mllm.hf_checkpoints import forget_key_mapping, quiet_loading, replaceable_output, saved_dtype
from mllm.interop.chat_templates import string_template
from mllm.llm import resolve_llm_path
from mllm.model import MLLM
from mllm.processor import QFORMER_TOKENIZER_DIR
from mllm.vision import HFVisionTower

FORMATS = ("hf-llava",)
LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")  # what vLLM / SGLang's Llava accept
PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "linear": "linear"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_exportable(directory: Path, config: MLLMConfig, merge_lora: bool) -> None:
    """Refuse what has no Llava equivalent before any weight is loaded."""
    if config.vision.kind != "hf":
        raise CheckpointError(
            f"{directory}: the vision tower {config.vision.kind!r} is not a transformers model; Llava's vision_tower "
            "must be a CLIP or SigLIP vision model, so this checkpoint can't be exported as hf-llava"
        )
    if config.connector.kind not in PROJECTOR_ACT or (directory / QFORMER_TOKENIZER_DIR).is_dir():
        raise CheckpointError(
            f"{directory}: the {config.connector.kind!r} connector has no Llava equivalent (Llava's projector is a "
            "linear -> activation -> linear MLP); only linear and mlp2x_gelu connectors export as hf-llava"
        )
    if (directory / "adapter").is_dir() and not merge_lora:
        raise CheckpointError(
            f"{directory} holds an unmerged LoRA adapter; Llava checkpoints have no adapters: pass --merge-lora to "
            "merge it into the base weights (W + alpha/r * B A)"
        )


def export_hf_llava(checkpoint: str | Path, out: str | Path, merge_lora: bool = False, dtype: str = "auto") -> Path:
    """Write mllm checkpoint `checkpoint` to `out` as a transformers Llava directory.

    `dtype`: `auto` (the base LLM's own dtype), float32, float16 or bfloat16.
    """
    directory = Path(checkpoint).expanduser().resolve()
    config = read_config(directory, quantization="none")
    check_exportable(directory, config, merge_lora)
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not valid; use auto, {', '.join(DTYPES)}")
    # Unquantized float32 on CPU; an adapter is merged into the weights by the loader (trainable=False).
    model = load_pretrained(directory, device="cpu", quantization="none", trainable=False)
    tower = model.vision
    if not isinstance(tower, HFVisionTower) or tower.model.config.model_type not in LLAVA_TOWERS:
        kind = getattr(getattr(tower, "model", None), "config", None)
        raise CheckpointError(
            f"{directory}: the tower is a {getattr(kind, 'model_type', type(tower).__name__)}; hf-llava exports "
            f"need one of {', '.join(LLAVA_TOWERS)} (what transformers / vLLM Llava models load)"
        )
    target = _base_dtype(directory, config) if dtype == "auto" else DTYPES[dtype]

    llava = forget_key_mapping(build_llava(model).to(target))
    processor = build_processor(model)
    generation = model.llm.generation_config
    # Stop where mllm stops (EOS and the template's end-of-turn token).
    generation.eos_token_id = list(model.processor.stop_token_ids)
    if generation.pad_token_id is None:
        generation.pad_token_id = model.processor.tokenizer.pad_token_id
    llava.generation_config = generation

    out = Path(out).expanduser().resolve()
    with atomic_directory(out, may_replace=replaceable_output) as staging, quiet_loading():
        llava.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return out


def build_llava(model: MLLM) -> LlavaForConditionalGeneration:
    """A Llava model sharing (not copying) the MLLM's tower and LLM modules."""
    tower, llm, connector = model.vision, model.llm, model.connector
    tokenizer = model.processor.tokenizer
    image_token_id = model.image_token_id
    vocab = max(llm.get_input_embeddings().num_embeddings, len(tokenizer), image_token_id + 1)
    text_config = llm.config
    text_config.vocab_size = vocab
    for sub in (text_config, tower.model.config):
        sub._name_or_path = ""  # local paths of the exporting machine mean nothing where the export is served
    config = LlavaConfig(
        vision_config=tower.model.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act=PROJECTOR_ACT[model.config.connector.kind],
        vision_feature_select_strategy="default" if tower.drop_cls else "full",
        vision_feature_layer=tower.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):  # no second copy of the weights: the real modules are put in below
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = tower.model
    llava.model.language_model = llm.base_model
    llava.lm_head = llm.get_output_embeddings()
    projector = llava.model.multi_modal_projector
    if model.config.connector.kind == "mlp2x_gelu":
        projector.linear_1, projector.linear_2 = connector.proj[0], connector.proj[2]
    else:  # linear: Llava's MLP with an identity activation and an identity second layer
        projector.linear_1 = connector.proj
        width = connector.proj.out_features
        projector.linear_2 = nn.Linear(width, width, dtype=connector.proj.weight.dtype)
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(width))
            projector.linear_2.bias.zero_()
    _grow_vocabulary(llava, vocab)
    return llava.eval()


def _grow_vocabulary(llava: LlavaForConditionalGeneration, vocab: int) -> None:
    """Add rows up to `vocab` (the image token, tokens the tokenizer has beyond the LLM's table).

    New rows are the mean of the existing ones: an input row is overwritten by image features anyway, and an
    output row's logit is then the mean of all logits, so greedy decoding never picks one.
    """
    embeddings = llava.get_input_embeddings()
    old = embeddings.num_embeddings
    if vocab <= old:
        return
    tied = llava.lm_head.weight is embeddings.weight
    with torch.no_grad():
        rows = embeddings.weight.mean(0, keepdim=True).expand(vocab - old, -1)
        grown = nn.Embedding(vocab, embeddings.embedding_dim, padding_idx=embeddings.padding_idx)
        grown.weight.copy_(torch.cat([embeddings.weight, rows]))
        llava.set_input_embeddings(grown.to(embeddings.weight.dtype))
        if tied:
            llava.lm_head = nn.Linear(embeddings.embedding_dim, vocab, bias=False)
            llava.lm_head.weight = llava.get_input_embeddings().weight
        else:
            head = llava.lm_head
            out_rows = head.weight.mean(0, keepdim=True).expand(vocab - old, -1)
            grown_head = nn.Linear(head.in_features, vocab, bias=False, dtype=head.weight.dtype)
            grown_head.weight.copy_(torch.cat([head.weight, out_rows]))
            llava.lm_head = grown_head


def build_processor(model: MLLM) -> LlavaProcessor:
    """A LlavaProcessor that turns list-content messages + images into the ids and pixels mllm uses."""
    # Imported here, not at the top: without torchvision, transformers warns as soon as these names are
    # imported; the export writes their standard (torchvision-free on load) configs either way.
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    ours = model.processor.image_processor
    size = ours.image_size
    common = dict(image_mean=list(ours.image_mean), image_std=list(ours.image_std), resample=3, do_convert_rgb=True)
    if ours.resize_mode == "pad":
        # Pads with int(mean * 255); mllm rounds, so padded borders may differ by one level.
        image_processor = LlavaImageProcessor(
            do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **common
        )
    elif ours.resize_mode == "resize":
        image_processor = CLIPImageProcessor(
            size={"height": size, "width": size}, do_center_crop=False, crop_size={"height": size, "width": size},
            **common,
        )  # fmt: skip
    else:  # shortest side + centre crop
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True, **common
        )
    tower = model.vision
    patches = (tower.image_size // tower.model.config.patch_size) ** 2
    tokenizer = model.processor.tokenizer
    template = string_template(model.processor.template, model.processor.image_token)
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy="default" if tower.drop_cls else "full",
        chat_template=template,
        image_token=model.processor.image_token,
        # Llava's processor counts patches + these - (1 if "default"): CLIP has a CLS token to count.
        num_additional_image_tokens=1 if tower.drop_cls else tower.num_tokens - patches,
    )


def _base_dtype(directory: Path, config: MLLMConfig) -> torch.dtype:
    """The dtype the base LLM was saved in (export keeps it unless told otherwise)."""
    source = directory / "llm" if (directory / "llm").is_dir() else resolve_llm_path(config.llm.path)
    try:
        base = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError):
        return torch.float32
    return saved_dtype(base)
