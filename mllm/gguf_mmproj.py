"""The vision half of a model as an `mmproj` GGUF: the file llama.cpp's multimodal library (mtmd, its `clip`
loader) reads beside the LLM's GGUF, as llama-server's `--mmproj` and Ollama's second `FROM` take it.

What llama.cpp can express is LLaVA's shape: a ViT tower (CLIP or SigLIP) whose chosen hidden layer, CLS token
dropped, goes through a `mlp` projector (`mm.0` -> GELU -> `mm.2`). `check_expressible` refuses everything else
by name before a weight is read; `write_mmproj` writes the tower and the connector.

mllm                                    mmproj (names: llama.cpp's tools/mtmd/clip-impl.h, gguf-py's constants)
embeddings.class_embedding              v.class_embd                      (CLIP only)
embeddings.patch_embedding              v.patch_embd.weight [.bias]       (the conv; SigLIP's has a bias)
embeddings.position_embedding           v.position_embd.weight
pre_layrnorm                            v.pre_ln                          (CLIP only)
encoder.layers.N.self_attn.q/k/v/out    v.blk.N.attn_q / attn_k / attn_v / attn_out
encoder.layers.N.layer_norm1 / 2        v.blk.N.ln1 / ln2
encoder.layers.N.mlp.fc1 / fc2          v.blk.N.ffn_up / ffn_down
post_layernorm                          not written: LLaVA reads a hidden layer, before it
connector mlp2x_gelu proj.0 / proj.2    mm.0 / mm.2
connector linear proj                   mm.0 = [W; -W], mm.2 = [I, -I]    (see `_linear_as_mlp`)

The feature layer: clip's LLaVA graph runs the layers below the deepest index in `clip.vision.feature_layer`
and takes the hidden state there (0 = the embeddings after pre_ln, k = after layer k), as transformers'
`hidden_states[k]`. The file holds those k layers only: llama.cpp never runs the rest.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from mllm.config import MLLMConfig
from mllm.errors import UnexportableError
from mllm.gguf_convert import GGUFTensor, write_gguf

CLIP_ARCH = "clip"
PROJECTOR = gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP]  # "mlp": LLaVA's projector
KEY_FEATURE_LAYER = "clip.vision.feature_layer"  # clip-impl.h's KEY_FEATURE_LAYER; gguf-py has no constant
MMPROJ_TYPES = {"f16": GGMLQuantizationType.F16, "f32": GGMLQuantizationType.F32}
TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}
CONNECTORS = ("linear", "mlp2x_gelu")
# The tower MLP's activation -> clip's `clip.use_gelu` (GELU, tanh form) or nothing (its default, quick GELU).
ACTIVATIONS = {"quick_gelu": False, "gelu_pytorch_tanh": True, "gelu": True}
WHAT_EXPORTS = "a CLIP or SigLIP tower with a linear or mlp2x_gelu connector exports as gguf (LLaVA's shape)"


def check_expressible(config: MLLMConfig) -> None:
    """Refuse, before any weight is read, a model part llama.cpp's mmproj cannot express: one line naming the
    part and what can be exported instead."""
    if config.vision.kind != "hf":
        raise UnexportableError(
            f"the {config.vision.kind!r} vision tower (EfficientNet-Lite0, a CNN) cannot be expressed in llama.cpp's "
            f"mmproj, whose clip loader runs ViT towers; only {WHAT_EXPORTS} (or train one: vision.kind=hf)"
        )
    if config.connector.kind not in CONNECTORS:
        raise UnexportableError(
            f"the {config.connector.kind!r} connector (BLIP-2's Q-Former) has no llama.cpp projector; only "
            f"{WHAT_EXPORTS}"
        )
    if config.vision.pool is not None:
        raise UnexportableError(
            f"vision.pool={config.vision.pool} (pooled image tokens) has no llama.cpp equivalent; only {WHAT_EXPORTS}, "
            "without pooling"
        )


def check_tower(model) -> None:
    """The loaded tower's own settings that the mmproj cannot carry."""
    tower = model.vision
    hf = tower.model.config
    if hf.model_type not in TOWERS:
        raise UnexportableError(
            f"the vision tower is a {hf.model_type!r} (e.g. BLIP-2's EVA); llama.cpp's LLaVA graph runs CLIP and "
            f"SigLIP towers: only {WHAT_EXPORTS}"
        )
    patches = (hf.image_size // hf.patch_size) ** 2
    if tower.num_tokens != patches:
        raise UnexportableError(
            "the tower keeps its CLS token (vision.drop_cls=false); llama.cpp's LLaVA graph always drops it: "
            "export a model trained with drop_cls=true"
        )
    if hf.hidden_act not in ACTIVATIONS:
        raise UnexportableError(
            f"the tower's activation {hf.hidden_act!r} has no llama.cpp clip equivalent ({', '.join(ACTIVATIONS)} do)"
        )
    if hf.intermediate_size == hf.hidden_size:
        # clip.cpp swaps ffn_up / ffn_down when ffn_down's input width equals n_embd (a fix for old files).
        raise UnexportableError(
            f"the tower's MLP is as wide as its hidden size ({hf.hidden_size}); llama.cpp's clip loader reads such "
            "a file with its MLP layers swapped, so it cannot be exported"
        )


def feature_index(feature_layer: int, n_layers: int) -> int:
    """transformers' `hidden_states` index (negative from the end) as the non-negative one clip.cpp wants."""
    return feature_layer % (n_layers + 1)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _tensor(name: str, value: np.ndarray, qtype: GGMLQuantizationType) -> GGUFTensor:
    # 1-D tensors (norms, biases, the class embedding) stay f32, as llama.cpp's converters keep them.
    stored = GGMLQuantizationType.F32 if value.ndim < 2 else qtype
    return GGUFTensor(name, tuple(value.shape), stored, lambda: value)


def _linear_as_mlp(weight: np.ndarray, bias: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A linear connector as clip's `mlp` projector, which always applies GELU after `mm.0`.

    GELU(z) - GELU(-z) = z * (Phi(z) + Phi(-z)) = z for every z (Phi(-z) = 1 - Phi(z); the tanh form is odd in
    the same way), so mm.0 = [W; -W], b0 = [b; -b] (2 D_llm rows) and mm.2 = [I, -I], b2 = 0 give W x + b exactly
    up to float rounding."""
    width = weight.shape[0]
    eye = np.eye(width, dtype=np.float32)
    return [
        ("mm.0.weight", np.concatenate([weight, -weight])),  # (2 D_llm, D_v)
        ("mm.0.bias", np.concatenate([bias, -bias])),  # (2 D_llm,)
        ("mm.2.weight", np.concatenate([eye, -eye], axis=1)),  # (D_llm, 2 D_llm)
        ("mm.2.bias", np.zeros(width, dtype=np.float32)),
    ]


def _projector(model) -> list[tuple[str, np.ndarray]]:
    connector = model.connector
    if model.config.connector.kind == "linear":
        return _linear_as_mlp(_f32(connector.proj.weight), _f32(connector.proj.bias))
    first, second = connector.proj[0], connector.proj[2]
    return [
        ("mm.0.weight", _f32(first.weight)),  # (D_llm, D_v)
        ("mm.0.bias", _f32(first.bias)),
        ("mm.2.weight", _f32(second.weight)),  # (D_llm, D_llm)
        ("mm.2.bias", _f32(second.bias)),
    ]


_LAYER_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
_EMBEDDINGS = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",  # (D_v, 3, P, P): ggml's ne = [P, P, 3, D_v]
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",  # (N_pos, D_v)
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}


def _tower(model, n_layers: int) -> list[tuple[str, np.ndarray]]:
    """The tower's tensors in clip's names: the embeddings and the first `n_layers` layers."""
    hf = model.vision.model
    state = getattr(hf, "vision_model", hf).state_dict()  # older transformers nest the tower one level down
    out = [(name, _f32(state[key])) for key, name in _EMBEDDINGS.items() if key in state]
    for layer in range(n_layers):
        for part, short in _LAYER_PARTS.items():
            for suffix in ("weight", "bias"):
                out.append((f"v.blk.{layer}.{short}.{suffix}", _f32(state[f"encoder.layers.{layer}.{part}.{suffix}"])))
    return out


def write_mmproj(model, out_path: str | Path, dtype: str = "f16") -> Path:
    """The tower and connector of `model` (an MLLM with a CLIP / SigLIP tower and a linear / mlp2x_gelu
    connector, float32) as an mmproj GGUF at `out_path`, 2-D and 4-D weights in `dtype` (f16 or f32)."""
    if dtype not in MMPROJ_TYPES:
        raise UnexportableError(f"mmproj type {dtype!r} is not supported; use one of {', '.join(MMPROJ_TYPES)}")
    check_expressible(model.config)
    check_tower(model)
    hf = model.vision.model.config
    n_layers = feature_index(model.vision.feature_layer, hf.num_hidden_layers)
    image = model.processor.image_processor
    projector = _projector(model)
    tensors = [_tensor(name, value, MMPROJ_TYPES[dtype]) for name, value in _tower(model, n_layers) + projector]
    llm_width = projector[-1][1].shape[0]

    def metadata(writer: GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(f"mmproj ({TOWERS[hf.model_type]} + {model.config.connector.kind})")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_clip_has_vision_encoder(True)
        writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
        writer.add_clip_projector_type(PROJECTOR)
        writer.add_vision_image_size(hf.image_size)
        writer.add_vision_patch_size(hf.patch_size)
        writer.add_vision_embedding_length(hf.hidden_size)
        writer.add_vision_feed_forward_length(hf.intermediate_size)
        writer.add_vision_block_count(n_layers)
        writer.add_vision_head_count(hf.num_attention_heads)
        writer.add_vision_attention_layernorm_eps(hf.layer_norm_eps)
        writer.add_vision_projection_dim(llm_width)  # what the projector outputs: the LLM's width
        # The processor's normalisation (the tower's own unless the config overrode it), as mllm applies it.
        writer.add_vision_image_mean([float(v) for v in image.image_mean])
        writer.add_vision_image_std([float(v) for v in image.image_std])
        writer.add_array(KEY_FEATURE_LAYER, [n_layers])
        if ACTIVATIONS[hf.hidden_act]:
            writer.add_vision_use_gelu(True)

    return write_gguf(out_path, CLIP_ARCH, metadata, tensors)
