"""`mllm export --format gguf OUT`: a model for the GGUF world (Ollama, llama-server, LM Studio), checked against
the model it came from.

OUT holds:
- `model-<type>.gguf`: the LLM (a LoRA adapter merged into the float32 weights first, then quantized, so its
  effect survives) in `f16`, `q8_0` or `q4_0`, written by `mllm.gguf_convert`, with the model's chat template;
- `mmproj-<type>.gguf`: the vision tower and connector (`mllm.gguf_mmproj`);
- `Modelfile`: Ollama's recipe (both files, the chat template as a Go template, the stop tokens);
- `README.md`: the one-line commands for `ollama create` and `llama-server`, and the check's figures.

The check (`mllm.gguf_check`, on by default where llama.cpp's multimodal binding is installed) answers a fixed
set of images and questions in llama.cpp and in mllm. Without `llm_type` the export picks the smallest type
whose answers all equal mllm's, trying q4_0, then q8_0, then f16; each try is reported.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch
from gguf import GGUFReader

from mllm.atomic import atomic_directory
from mllm.checkpoint import read_config
from mllm.config import CONFIG_FILE, MLLMConfig
from mllm.errors import CheckpointError
from mllm.gguf_convert import write_llm_gguf
from mllm.gguf_mmproj import MMPROJ_TYPES, check_expressible, check_tower, write_mmproj
from mllm.hf_checkpoints import detect_format, forget_key_mapping, quiet_loading, replaceable_output
from mllm.loading import BUILTIN, load_model, resolve_name
from mllm.ollama import modelfile, readme
from mllm.templates import render

LLM_TYPES = ("f16", "q8_0", "q4_0")  # what the user may pick; q4_0 is the 4-bit type
AUTO_ORDER = ("q4_0", "q8_0", "f16")  # smallest first: the check keeps the first whose answers all hold
UNCHECKED_TYPE = "q8_0"  # without a check: measured on the demo model to keep float32's accuracy (README)


@dataclass
class GGUFExport:
    """What an export wrote and what its check measured."""

    out: Path
    llm: Path
    mmproj: Path
    reports: list = field(default_factory=list)  # `mllm.gguf_check.CheckReport`, one per LLM type tried

    def summary(self) -> str:
        lines = [f"wrote {self.out}: {self.llm.name}, {self.mmproj.name}, Modelfile, README.md"]
        lines += [f"check: {report.summary()}" for report in self.reports]
        return "\n".join(lines)


def model_config(name: str) -> MLLMConfig:
    """The config of the model `name` names (built-in, mllm checkpoint, llava-hf directory), read without weights."""
    if name in BUILTIN:
        directory = BUILTIN[name]
        return read_config(directory) if (directory / CONFIG_FILE).is_file() else MLLMConfig()
    directory = Path(resolve_name(name))
    if (directory / CONFIG_FILE).is_file():
        return read_config(directory)
    if detect_format(directory) is not None:
        from mllm.interop.importer import plan_import

        return plan_import(directory).config
    raise CheckpointError(f"{name} is neither an mllm checkpoint nor a llava-hf directory; nothing to export")


def check_available() -> bool:
    """Whether llama.cpp's multimodal binding is installed (without loading it)."""
    from mllm.backends.mtmd import available

    return available()


def export_gguf(
    name: str,
    out: str | Path,
    llm_type: str | None = None,
    mmproj_type: str = "f16",
    check: bool | None = None,
) -> GGUFExport:
    """Export the model `name` (as `mllm.load_model` takes it) to the folder `out`. `check=None`: check where
    llama.cpp's multimodal binding is installed. A model llama.cpp cannot express is refused before any weight
    is read (`UnexportableError`)."""
    if llm_type is not None and llm_type not in LLM_TYPES:
        raise CheckpointError(f"LLM type {llm_type!r} is not offered; choose one of {', '.join(LLM_TYPES)}")
    if mmproj_type not in MMPROJ_TYPES:
        raise CheckpointError(f"mmproj type {mmproj_type!r} is not offered; choose one of {', '.join(MMPROJ_TYPES)}")
    check = check_available() if check is None else check
    if check and not check_available():
        raise CheckpointError("--check needs llama-cpp-python with its multimodal library (mtmd); or pass --no-check")
    check_expressible(model_config(name))
    # float32 on the CPU through transformers: a LoRA adapter is merged into the weights at load.
    model = load_model(name, device="cpu", quantization="none", backend="transformers").eval()
    check_tower(model)
    types = [llm_type] if llm_type else list(AUTO_ORDER if check else [UNCHECKED_TYPE])
    out = Path(out).expanduser().resolve()
    with atomic_directory(out, may_replace=_replaceable) as staging:
        mmproj = write_mmproj(model, staging / f"mmproj-{mmproj_type}.gguf", mmproj_type)
        with tempfile.TemporaryDirectory(dir=staging) as llm_dir:
            adds_bos = save_llm(model, Path(llm_dir))
            result = _write_llm(model, Path(llm_dir), staging, types, mmproj, mmproj_type, adds_bos, check)
        (staging / "Modelfile").write_text(modelfile(model, result.llm.name, mmproj.name, adds_bos))
        (staging / "README.md").write_text(readme(result.llm.name, mmproj.name, [r.summary() for r in result.reports]))
    return dataclasses.replace(result, out=out, llm=out / result.llm.name, mmproj=out / mmproj.name)


def _replaceable(path: Path) -> bool:
    return replaceable_output(path) or (path / "Modelfile").is_file()  # an earlier gguf export


def _write_llm(model, llm_dir: Path, staging: Path, types, mmproj: Path, mmproj_type: str, adds_bos: bool, check):
    """The LLM GGUF in the first of `types` whose check holds (or the last one tried)."""
    from mllm.gguf_check import run_check

    reports, queue = [], list(types)
    while True:
        kind = queue.pop(0)
        path = write_llm_gguf(llm_dir, staging / f"model-{kind}.gguf", kind)
        set_add_bos(path, adds_bos)
        if not check:
            return GGUFExport(staging, path, mmproj)
        reports.append(run_check(model, path, mmproj, kind, mmproj_type, adds_bos))
        if reports[-1].all_equal or not queue:
            return GGUFExport(staging, path, mmproj, reports)
        path.unlink()  # changes answers: try the next, larger type
        if reports[-1].features_differ and UNCHECKED_TYPE in queue:
            queue = [UNCHECKED_TYPE]  # no LLM type mends the image features: the type an unchecked export gets


def save_llm(model, directory: Path) -> bool:
    """The model's LLM (adapter already merged) as a transformers directory `write_llm_gguf` converts: weights,
    config, the tokenizer with the model's chat template. Returns whether prompts start with BOS (the GGUF's
    `add_bos_token`, so that llama.cpp adds exactly the BOS mllm's template writes)."""
    llm, processor = model.llm, model.processor
    tokenizer = processor.tokenizer
    rows = llm.get_input_embeddings().num_embeddings
    if processor.image_token_id >= rows:
        _grow(llm, processor.image_token_id + 1)
    tokenizer.chat_template = processor.template  # llama-server's --jinja renders it; mtmd markers go in content
    with quiet_loading():
        forget_key_mapping(llm).save_pretrained(directory, safe_serialization=True)  # an imported llava-hf's too
        tokenizer.save_pretrained(directory)
    return prompt_bos(tokenizer, processor.template)


def prompt_bos(tokenizer, template: str) -> bool:
    """Whether the GGUF should say `add_bos_token`: the tokenizer puts BOS before a text by itself and the template
    writes it first, so llama.cpp's tokenizer can add it (llama-server then drops the template's copy). A BOS
    that only opens a turn (ChatML's `<|im_start|>` on SmolLM2) stays the template's."""
    bos = tokenizer.bos_token
    if not bos:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = tokenizer("a", add_special_tokens=True)["input_ids"]
    prompt = render(tokenizer, template, [{"role": "user", "content": "q"}], True)
    return adds[:1] == [tokenizer.bos_token_id] and plain[:1] != adds[:1] and prompt.startswith(bos)


def _grow(llm, rows: int) -> None:
    """Give the vocabulary rows up to the image token (its id lies past the LLM's table, and llama.cpp needs a
    row per token). New rows are the mean of the others: an input row is never looked up (mtmd passes image
    embeddings), and an output row's logit is then the mean logit, never the greedy pick."""
    with torch.no_grad():
        embed = llm.get_input_embeddings()
        old = embed.num_embeddings
        mean_in = embed.weight.mean(0, keepdim=True)
        head = llm.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        mean_out = None if tied or head is None else head.weight.mean(0, keepdim=True)
        llm.resize_token_embeddings(rows, mean_resizing=False)
        llm.get_input_embeddings().weight[old:] = mean_in
        if mean_out is not None:
            llm.get_output_embeddings().weight[old:] = mean_out


def set_add_bos(path: Path, value: bool) -> None:
    """Rewrite the GGUF's `tokenizer.ggml.add_bos_token` in place (a one-byte value: the file keeps its layout)."""
    reader = GGUFReader(path, "r+")
    field_ = reader.get_field(gguf.Keys.Tokenizer.ADD_BOS)
    if field_ is None:
        raise CheckpointError(f"{path} has no {gguf.Keys.Tokenizer.ADD_BOS}; convert the model again")
    field_.parts[field_.data[0]][0] = value
    reader.data.flush()
    del reader
