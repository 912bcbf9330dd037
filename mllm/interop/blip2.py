"""Import transformers `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration` checkpoints
with a decoder-only LLM (OPT, LLaMA-class); encoder-decoder (Flan-T5) ones are refused.

BLIP-2                                   mllm
vision_model (EVA ViT-g) layers          vision: kind=hf, path=<checkpoint>, feature_layer=-1, CLS kept
vision_model.post_layernorm              connector.vision_norm (same epsilon: the tower's layer_norm_eps)
query_tokens                             connector.query_tokens
qformer.layernorm, qformer.encoder       connector.qformer (Blip2QFormerModel)
language_projection                      connector.proj
language_model                           llm
InstructBLIP adds: qformer.embeddings.{word,position}_embeddings -> connector.{word,position}_embeddings,
qformer.embeddings.layernorm -> connector.qformer.layernorm, and the Q-Former's text feed-forward blocks; the
connector is configured with `qformer_text_input=True` and the processor gets `qformer_tokenizer/`.

Our tower returns `hidden_states[-1]`, the last layer *before* BLIP-2's post_layernorm, so the connector's
`vision_norm` is exactly that LayerNorm: the imported model computes what transformers computes.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig

from mllm.config import ConnectorConfig, LLMConfig, MLLMConfig, VisionConfig
from mllm.hf_checkpoints import read_tensors
from mllm.interop.chat_templates import prompt_template
from mllm.interop.plan import ImportPlan, image_settings
from mllm.llm import check_decoder_only
from mllm.processor import QFORMER_TOKENIZER_DIR

_TEXT_FFN = re.compile(
    r"\.layer\.\d+\.(intermediate|output)\."
)  # the text feed-forward (not *_query, not attention.output)
_OUR_QFORMER_EPS = 1e-12  # Blip2QFormerConfig's default, which our connector builds with


def plan_blip2(path: Path, hf_config: PretrainedConfig, template: str | None = None) -> ImportPlan:
    """BLIP-2 and InstructBLIP (`hf_config.model_type` tells which). `template` is not used: these models
    take a plain prompt, reproduced by `prompt_template`."""
    instruct = hf_config.model_type == "instructblip"
    fmt = "instructblip" if instruct else "blip2"
    check_decoder_only(str(path), hf_config.text_config)
    vision_cfg, qformer_cfg = hf_config.vision_config, hf_config.qformer_config
    _check_qformer(path, qformer_cfg, vision_cfg)

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    image_token = "<image>"
    if hf_config.image_token_index is not None:
        image_token = tokenizer.convert_ids_to_tokens(hf_config.image_token_index)
        if image_token is None or image_token == tokenizer.unk_token:
            raise ValueError(f"{path}: image_token_index={hf_config.image_token_index} is not a tokenizer token")
    jinja = prompt_template(tokenizer, image_token)
    tokenizer.chat_template = jinja

    resize_mode, mean, std = image_settings(path, vision_cfg.image_size)
    fields = dict(
        kind="qformer",
        num_query_tokens=hf_config.num_query_tokens,
        qformer_layers=qformer_cfg.num_hidden_layers,
        qformer_hidden_size=qformer_cfg.hidden_size,
        qformer_heads=qformer_cfg.num_attention_heads,
        qformer_cross_attention_frequency=qformer_cfg.cross_attention_frequency,
        # BLIP-2's post_layernorm uses the tower's epsilon (1e-6), not PyTorch's default.
        vision_norm_eps=vision_cfg.layer_norm_eps,
    )
    if instruct:
        fields.update(
            qformer_text_input=True,
            qformer_vocab_size=qformer_cfg.vocab_size,
            qformer_max_text_positions=qformer_cfg.max_position_embeddings,
        )
    connector_cfg = ConnectorConfig(**fields)
    config = MLLMConfig(
        # The Q-Former reads every token of the last layer, CLS included.
        vision=VisionConfig(
            kind="hf",
            path=str(path),
            feature_layer=-1,
            drop_cls=False,
            resize_mode=resize_mode,
            image_mean=mean,
            image_std=std,
        ),
        connector=connector_cfg,
        llm=LLMConfig(path=str(path)),
        template="auto",
        image_token=image_token,
        max_images=1,  # BLIP-2 puts one image's query tokens in front of the prompt
    )

    prefixes = ("vision_model.post_layernorm.", "query_tokens", "qformer.", "language_projection.")
    tensors = read_tensors(path, lambda k: k.startswith(prefixes))
    state = {
        "vision_norm.weight": tensors["vision_model.post_layernorm.weight"],
        "vision_norm.bias": tensors["vision_model.post_layernorm.bias"],
        "query_tokens": tensors["query_tokens"],
        "proj.weight": tensors["language_projection.weight"],
        "proj.bias": tensors["language_projection.bias"],
    }
    for key, value in tensors.items():
        if key.startswith("qformer.encoder.") and (instruct or not _TEXT_FFN.search(key)):
            state[key] = value
    norm = "qformer.embeddings.layernorm." if instruct else "qformer.layernorm."
    for name in ("weight", "bias"):
        state[f"qformer.layernorm.{name}"] = tensors[norm + name]

    qformer_tokenizer = None
    if instruct:
        state["word_embeddings.weight"] = tensors["qformer.embeddings.word_embeddings.weight"]
        state["position_embeddings.weight"] = tensors["qformer.embeddings.position_embeddings.weight"]
        qformer_tokenizer = AutoTokenizer.from_pretrained(
            str(path), subfolder=QFORMER_TOKENIZER_DIR, trust_remote_code=False
        )
    return ImportPlan(
        fmt=fmt,
        path=path,
        config=config,
        hf_config=hf_config,
        tokenizer=tokenizer,
        template=jinja,
        connector_state=state,
        qformer_tokenizer=qformer_tokenizer,
    )


def _check_qformer(path: Path, qformer, vision) -> None:
    """Our connector builds its Blip2QFormerConfig from a few fields; the rest must be what it assumes."""
    expected = {
        "intermediate_size": 4 * qformer.hidden_size,
        "hidden_act": "gelu",
        "layer_norm_eps": _OUR_QFORMER_EPS,
        "encoder_hidden_size": vision.hidden_size,
    }
    for name, value in expected.items():
        if getattr(qformer, name) != value:
            raise ValueError(
                f"{path}: qformer_config.{name}={getattr(qformer, name)!r}, but mllm's qformer connector assumes "
                f"{value!r}; this checkpoint can't be imported exactly"
            )
