"""`mllm export --format gguf`: the LLM GGUF + mmproj GGUF load in llama.cpp's multimodal library (mtmd) and answer
like mllm; a LoRA's effect survives the merge; what llama.cpp cannot express is refused in one line.

Everything runs for real: tiny random SigLIP / CLIP towers and a tiny LLaMA built here, exported, then loaded by
llama-cpp-python's mtmd binding and decoded greedily beside mllm's torch model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import readme_figures
from gguf import GGUFReader

from app.cli import main as cli
from mllm.assembly import build_model
from mllm.backends.mtmd import MtmdRunner
from mllm.checkpoint import save_pretrained
from mllm.config import CONFIG_FILE, ConnectorConfig, LLMConfig, LoraConfig, MLLMConfig, VisionConfig
from mllm.errors import UnexportableError
from mllm.gguf_check import QUESTIONS, check_images, llama_prompt
from mllm.gguf_convert import write_llm_gguf
from mllm.gguf_export import export_gguf
from mllm.gguf_mmproj import KEY_FEATURE_LAYER
from mllm.ollama import go_template
from mllm.templates import NAMED_TEMPLATES
from mllm.tiny import build_siglip

ANSWER = "the circle is red"
# The README: "f16 gives 9/9 equal answers with a first-token logit difference of 3.7e-4 of the logits' largest
# magnitude" (f16 LLM + f16 mmproj against mllm's float32 torch model; measured 3.6e-3 with logits up to 9.71). The
# bound is twice the README's figure: the summation order, and so the last digits, differ from CPU to CPU.
F16_RELATIVE_LOGIT_DIFF = 2 * float(
    readme_figures(r"f16 gives 9/9 equal answers with a first-token logit difference of ([\d.e-]+) of the logits")[0]
)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return build_siglip(tmp_path_factory.mktemp("tiny-siglip"))


def _config(llm_dir, tower_dir, connector="mlp2x_gelu", lora=None) -> MLLMConfig:
    return MLLMConfig(
        vision=VisionConfig(kind="hf", path=str(tower_dir)),
        connector=ConnectorConfig(kind=connector),
        llm=LLMConfig(path=str(llm_dir), lora=lora),
        template="auto",
        tune={"vision": "frozen", "connector": "full", "llm": "lora" if lora else "frozen"},
    )


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, tiny_llama_dir, siglip_dir):
    """SigLIP + mlp2x_gelu + tiny LLaMA, connector and LoRA trained a few steps to say ANSWER about the check's
    images: the adapter then decides the answer (the untuned model says something else)."""
    # lm_head too: a random tiny LLaMA's logits are bounded by its final RMSNorm and small output rows, so the
    # attention / MLP adapters alone cannot make one answer decisive (their loss stalls at 4.8).
    targets = (*LoraConfig().target_modules, "lm_head")
    torch.manual_seed(0)
    model = build_model(_config(tiny_llama_dir, siglip_dir, lora=LoraConfig(8, 16, 0.0, targets)), device="cpu")
    for name, param in model.named_parameters():  # what stage `instruct` trains: the connector and the adapter
        param.requires_grad = name.startswith("connector.") or "lora_" in name
    processor = model.processor
    rows = [
        processor.encode(
            [{"role": "user", "content": f"{processor.image_token}\n{q}"}, {"role": "assistant", "content": ANSWER}],
            images=[image],
        )
        for image, q in zip(check_images(), (QUESTIONS[1], QUESTIONS[0], QUESTIONS[2]))
    ]
    batch = processor.collate(rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(40):
        _, loss = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the adapter did not learn the answer (loss {loss.item():.3f})"
    directory = tmp_path_factory.mktemp("lora-ckpt")
    save_pretrained(model.eval(), directory)
    return directory


@pytest.fixture(scope="module")
def f16_export(lora_checkpoint, tmp_path_factory):
    return export_gguf(str(lora_checkpoint), tmp_path_factory.mktemp("export") / "out", llm_type="f16")


def test_f16_export_answers_token_for_token_like_mllm(f16_export):
    report = f16_export.reports[0]
    assert report.llm_type == "f16" and len(report.cases) == len(QUESTIONS) * len(check_images())
    assert report.all_equal, report.summary()
    assert all(case.prompt_equal for case in report.cases)  # the GGUF's tokenizer and template agree with mllm's
    assert report.max_logit_diff < F16_RELATIVE_LOGIT_DIFF * report.logit_scale, report.summary()
    assert report.image_feature_diff < 5e-3, report.summary()  # the mmproj computes mllm's tower + connector


def test_the_adapter_survives_the_export(f16_export, lora_checkpoint, tiny_llama_dir, tmp_path):
    """The merged export says what the LoRA taught; the same export without the adapter (the base LLM's GGUF with
    the same mmproj) says something else."""
    from mllm.loading import load_model

    model = load_model(str(lora_checkpoint), device="cpu", quantization="none", backend="transformers")
    tokens = f16_export.reports[0].cases[1].mllm_tokens
    assert model.processor.decode(tokens).strip() == ANSWER
    base = write_llm_gguf(tiny_llama_dir, tmp_path / "base.gguf", "f16")
    picture = model.processor.image_processor.load(check_images()[0])
    stops = set(model.processor.stop_token_ids)
    prompt = llama_prompt(model, QUESTIONS[1], adds_bos=False)
    answers = {}
    for name, gguf in (("merged", f16_export.llm), ("base", base)):
        runner = MtmdRunner(gguf, f16_export.mmproj)
        try:
            answers[name] = runner.answer(prompt, [np.asarray(picture)], 24, stops).tokens
        finally:
            runner.close()
    assert model.processor.decode(answers["merged"]).strip() == ANSWER
    assert answers["base"] != answers["merged"]


def test_export_folder_holds_modelfile_and_readme(f16_export):
    files = sorted(p.name for p in f16_export.out.iterdir())
    assert files == ["Modelfile", "README.md", "mmproj-f16.gguf", "model-f16.gguf"]
    modelfile = (f16_export.out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\nFROM ./mmproj-f16.gguf\n")
    # ChatML, translated: each role's turn, the generation prompt, the end-of-turn token as the stop.
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert modelfile.count('TEMPLATE """') == 1 and '{{ end }}{{ end }}<|im_start|>assistant\n"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    readme = (f16_export.out / "README.md").read_text()
    assert "ollama create my-vlm -f Modelfile" in readme
    assert "llama-server -m model-f16.gguf --mmproj mmproj-f16.gguf" in readme
    assert "9/9 answers token-for-token equal" in readme


def test_cli_export_without_the_check(lora_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["export", str(lora_checkpoint), str(out), "--format", "gguf", "--type", "q8_0", "--no-check"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: model-q8_0.gguf, mmproj-f16.gguf, Modelfile, README.md")
    assert "not run (exported with --no-check)" in (out / "README.md").read_text()
    # Exporting again over an earlier export replaces it; over an unrelated folder, refuses.
    assert cli(["export", "--model", str(lora_checkpoint), str(out), "--format", "gguf", "--no-check"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "mmproj-f16.gguf", "model-q8_0.gguf"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli(["export", str(lora_checkpoint), str(tmp_path / "mine"), "--format", "gguf", "--no-check"]) == 2
    assert "is not a previous mllm output" in capsys.readouterr().err


def test_mmproj_metadata_is_what_clips_loader_reads(f16_export, siglip_dir):
    reader = GGUFReader(f16_export.mmproj)
    value = {key: field.contents() for key, field in reader.fields.items()}
    assert value["general.architecture"] == "clip" and value["clip.projector_type"] == "mlp"
    assert value["clip.has_vision_encoder"] is True and value["clip.use_gelu"] is True  # SigLIP's tanh GELU
    assert value["clip.vision.image_size"] == 32 and value["clip.vision.patch_size"] == 8
    assert value[KEY_FEATURE_LAYER] == [1]  # hidden_states[-2] of a 2-layer tower
    assert value["clip.vision.block_count"] == 1  # only the layer llama.cpp runs
    assert np.allclose(value["clip.vision.image_mean"], [0.5, 0.5, 0.5])  # SigLIP's processor
    names = {t.name for t in reader.tensors}
    assert {"v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight", "mm.0.weight", "mm.2.bias"} <= names
    assert not any(name.startswith(("v.blk.1.", "v.post_ln")) for name in names)


def test_q8_0_export_reports_its_differences(lora_checkpoint, tmp_path):
    result = export_gguf(str(lora_checkpoint), tmp_path / "q8", llm_type="q8_0")
    report = result.reports[0]
    assert result.llm.name == "model-q8_0.gguf" and len(report.cases) == 9
    line = report.summary()
    assert line.startswith("LLM q8_0 + mmproj f16: ") and f"{report.equal}/9 answers token-for-token equal" in line
    assert ("q8_0 changes answers" in line) == (not report.all_equal)
    assert 0 < report.max_logit_diff < 0.05 * report.logit_scale, line


def test_linear_connector_is_exact_through_clips_mlp(tiny_llama_dir, siglip_dir, tmp_path):
    """clip's projector applies GELU after mm.0; GELU(z) - GELU(-z) = z makes a linear connector exact."""
    torch.manual_seed(0)
    save_pretrained(build_model(_config(tiny_llama_dir, siglip_dir, "linear"), device="cpu"), tmp_path / "ckpt")
    result = export_gguf(str(tmp_path / "ckpt"), tmp_path / "out", llm_type="f16", mmproj_type="f32")
    report = result.reports[0]
    assert report.image_feature_diff < 2e-3, report.summary()
    assert report.all_equal, report.summary()


def test_clip_tower_is_written_as_llama_cpp_reads_it(tiny_llama_dir, tiny_clip_dir, tmp_path):
    """A CLIP tower's image features in llama.cpp equal mllm's, or, in llama.cpp builds with its CLS-order defect
    (ggml-org/llama.cpp#25814: the class token concatenated after the patches, positions and row selection still
    assuming it first), exactly what that defect computes from our file, simulated here in torch."""
    torch.manual_seed(0)
    model = build_model(_config(tiny_llama_dir, tiny_clip_dir), device="cpu").eval()
    save_pretrained(model, tmp_path / "ckpt")
    result = export_gguf(str(tmp_path / "ckpt"), tmp_path / "out", llm_type="f16", mmproj_type="f32", check=False)
    assert result.reports == []
    picture = model.processor.image_processor.load(check_images()[1])
    runner = MtmdRunner(result.llm, result.mmproj)
    try:
        theirs = runner.image_embeddings(np.asarray(picture))  # (16, 64)
    finally:
        runner.close()
    pixels = model.processor.image_processor([picture])
    with torch.inference_mode():
        ours = model.get_image_features(pixels)[0].numpy()
        clip = model.vision.model
        emb = clip.embeddings
        patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (1, 16, 32)
        sequence = torch.cat([patches, emb.class_embedding.view(1, 1, -1)], dim=1)  # CLS last
        hidden = clip.pre_layrnorm(sequence + emb.position_embedding.weight[None])  # positions 0..16 in order
        hidden = clip.encoder.layers[0](hidden, None)  # feature layer -2 of 2: the first layer's output
        defect = model.connector(hidden[:, 1:])[0].numpy()  # rows 1..16: patch 0 dropped, CLS kept
    diff = min(np.abs(theirs - ours).max(), np.abs(theirs - defect).max())
    assert diff < 2e-3, (np.abs(theirs - ours).max(), np.abs(theirs - defect).max())


def test_checked_clip_export_names_the_feature_difference(tiny_llama_dir, tiny_clip_dir, tmp_path):
    """With a CLIP tower in a llama.cpp that has the CLS-order defect, the check says so instead of blaming the LLM
    type, and the export stops searching types (none mends the tower) at the unchecked default, q8_0."""
    torch.manual_seed(0)
    save_pretrained(build_model(_config(tiny_llama_dir, tiny_clip_dir), device="cpu").eval(), tmp_path / "ckpt")
    result = export_gguf(str(tmp_path / "ckpt"), tmp_path / "out")
    first = result.reports[0]
    assert first.llm_type == "q4_0"
    if first.features_differ:
        assert "ggml-org/llama.cpp#25814" in first.summary() and "changes answers" not in first.summary()
        assert [r.llm_type for r in result.reports] == ["q4_0", "q8_0"] and result.llm.name == "model-q8_0.gguf"
    else:  # a llama.cpp with the fix: the ordinary search, smallest type whose answers hold
        assert first.image_feature_diff < 5e-3
        assert result.reports[-1].all_equal or result.llm.name == "model-f16.gguf"


def test_llava_hf_checkpoint_exports_and_answers_alike(tmp_path, tiny_llama_dir):
    """Import then export: a llava-hf directory (SigLIP tower, a LLaMA whose tokenizer adds BOS, LLaVA's
    "USER: ... ASSISTANT:" template) exported by its path; llama.cpp adds the BOS the template wrote."""
    from test_interop import LLAVA_TEMPLATE, _llm_tokenizer, _perturb, _text_config
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor

    directory = tmp_path / "llava-hf"
    directory.mkdir()
    tok = _llm_tokenizer(directory)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    config = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", patch_size=8, **vision),
        text_config=_text_config("llama", tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    _perturb(llava)
    llava.save_pretrained(directory)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=0,
    ).save_pretrained(directory)
    result = export_gguf(str(directory), tmp_path / "out", llm_type="f16")
    reader = GGUFReader(result.llm)
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is True
    report = result.reports[0]
    assert report.prompt_ok, report.summary()  # BOS, "USER: <image>\n... ASSISTANT:" tokenized alike
    # A random LLaVA's logits are nearly flat (up to 1.25): f16 rounding may flip a late near-tie (measured 8/9
    # answers whole), never the first token.
    assert all(case.mllm_tokens[:1] == case.llama_tokens[:1] for case in report.cases), report.summary()
    assert report.max_logit_diff < 5e-3 * report.logit_scale, report.summary()


def test_refusals_are_one_line_exit_2(tmp_path, capsys, tiny_config):
    """The built-in default (EfficientNet-Lite0) and a Q-Former model are refused before any weight is read."""
    assert cli(["export", "--format", "gguf", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "EfficientNet-Lite0" in err and "CLIP or SigLIP tower" in err, err
    qformer = tmp_path / "qformer"
    qformer.mkdir()
    tiny_config.replace(connector=ConnectorConfig(kind="qformer")).save(qformer / CONFIG_FILE)
    assert cli(["export", str(qformer), str(tmp_path / "b"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'qformer' connector" in err and "linear or mlp2x_gelu" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UnexportableError, match="pool"):
        from mllm.gguf_mmproj import check_expressible

        check_expressible(tiny_config.replace(vision=dataclasses.replace(tiny_config.vision, pool=2)))


@pytest.mark.parametrize("name", ["vicuna_v1", "plain"])
def test_named_templates_translate_to_go(tiny_model, name):
    """Every turn layout of the named templates rebuilds as Ollama's Go template would render it."""
    tokenizer = tiny_model.processor.tokenizer
    template = go_template(tokenizer, NAMED_TEMPLATES[name], adds_bos=False)
    assert template is not None
    if name == "vicuna_v1":
        bos = tokenizer.bos_token
        assert template.startswith(f"{{{{ if not .System }}}}{bos}A chat between a curious human")
        assert '{{ else if eq .Role "user" }}USER: {{ .Content }} ' in template
        assert template.endswith("{{ end }}{{ end }}ASSISTANT:")
        stripped = go_template(tokenizer, NAMED_TEMPLATES[name], adds_bos=True)
        assert stripped.startswith("{{ if not .System }}A chat between")  # llama.cpp adds the BOS
