"""Several datasets in one stage (`training.mixture`): `--data PATH:WEIGHT` and the stage's `datasets`, the
weighted draw seeded by (seed, epoch) only, so a stopped run resumes to the uninterrupted one's batches, losses
and weights; each dataset checked and named on its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.batches import StepBatches
from training.data import DataError, Row
from training.formats import convert
from training.loop import train
from training.mixture import DataSource, Mixture, parse_source, read_mixture
from training.stage_config import load_stage
from training.stage_model import model_for_stage
from training.synth import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, tag: str) -> list[Row]:
    return [Row(f"{tag}{i}", [], [], {}) for i in range(n)]


def test_sources_parse_from_the_command_line_and_yaml(tmp_path):
    assert parse_source("a.json:0.7") == DataSource("a.json", 0.7)
    assert parse_source("a.json") == DataSource("a.json")
    assert parse_source("c:/data/a.json") == DataSource("c:/data/a.json")  # a ':' that is no weight
    assert parse_source({"path": "b.jsonl", "weight": 3, "image_folder": "img"}) == DataSource("b.jsonl", 3.0, "img")
    with pytest.raises(ValueError, match="weight -1.0 must be > 0"):
        parse_source("a.json:-1")
    with pytest.raises(ValueError, match="give `path` and optionally weight, image_folder, format"):
        parse_source({"file": "a.json"})
    with pytest.raises(ValueError, match="give a weight to every --data source"):
        Mixture.of([(DataSource("a", 1.0), _rows(2, "a")), (DataSource("b"), _rows(2, "b"))])
    yaml = tmp_path / "mix.yaml"
    yaml.write_text("base: instruct\ndatasets:\n  - a.json:0.7\n  - {path: b.jsonl, weight: 0.3}\n")
    assert [parse_source(e) for e in load_stage(yaml).datasets] == [
        DataSource("a.json", 0.7),
        DataSource("b.jsonl", 0.3),
    ]
    with pytest.raises(ValueError, match="weight 0.0 must be > 0"):
        load_stage("instruct", {"datasets": ["a.json:0"]})


def test_the_draw_follows_the_weights_and_the_seed_alone():
    mixture = Mixture.of([(DataSource("big", 0.2), _rows(900, "big")), (DataSource("small", 0.8), _rows(100, "small"))])
    stage = load_stage("instruct", {"per_device_batch_size": 10, "global_batch_size": 20, "group_by_length": False})
    lengths = [10] * 1000
    batches = StepBatches(lengths, stage, 1, 0, 0, 100, mixture)
    epoch = batches.epoch_batches(0).ravel()
    share_small = float((epoch >= 900).mean())
    assert 0.75 < share_small < 0.85  # the weights, not the sizes (0.1)
    # The small dataset is oversampled: each of its rows comes round 8 times, none 2 more often than another.
    counts = np.bincount(epoch[epoch >= 900] - 900, minlength=100)
    assert counts.max() - counts.min() <= 1
    assert (StepBatches(lengths, stage, 1, 0, 0, 100, mixture).epoch_batches(0).ravel() == epoch).all()  # seeded
    assert not (batches.epoch_batches(1).ravel() == epoch).all()  # a new draw each epoch
    # A run started at step 30 (a resume) gets the very micro-batches the whole run has from step 30 on.
    assert list(StepBatches(lengths, stage, 1, 0, 30, 100, mixture)) == list(batches)[30 * 2 :]
    # No weights: each dataset's share of rows.
    plain = Mixture.of([(DataSource("a"), _rows(30, "a")), (DataSource("b"), _rows(10, "b"))])
    assert plain.weights.tolist() == [0.75, 0.25]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> dict[str, Path]:
    """Shapes rows as LLaVA JSON (captions) and OpenAI JSONL (instructions), one image folder."""
    root = tmp_path_factory.mktemp("mix")
    files = write_dataset(root / "shapes", 16, seed=0, splits=(("train", 1.0),))
    convert(files["train"], root / "qa.jsonl", "openai", files["images"])
    return {"captions": files["train_captions"], "qa": root / "qa.jsonl", "images": files["images"]}


SETTINGS = {"llm": "lora", "llm_lr": 1e-2, "connector_lr": 1e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
            "per_device_batch_size": 2, "global_batch_size": 4, "epochs": 4, "warmup_ratio": 0.2, "max_length": 256}  # fmt: skip


def _run(tiny_config, two_datasets, out: Path, weights=(0.25, 0.75), resume=False, **settings):
    sources = [DataSource(str(two_datasets[name]), w) for name, w in zip(("captions", "qa"), weights)]
    stage = load_stage("instruct", {**SETTINGS, **settings})
    torch.manual_seed(0)
    model = model_for_stage(stage, config=tiny_config, device="cpu")
    mixture = read_mixture(sources, two_datasets["images"], None)
    result = train(model, stage, mixture, out, feature_cache=out.parent / "cache", resume=resume, show_progress=False)
    return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_stopped_mixture_resumes_to_the_uninterrupted_losses_and_weights(tiny_config, two_datasets, tmp_path):
    # LoRA dropout and 2 micro-batches a step: the resume must bring back the RNG and the mixture's data position.
    whole, whole_weights = _run(tiny_config, two_datasets, tmp_path / "whole", max_steps=6)
    _run(tiny_config, two_datasets, tmp_path / "stopped", max_steps=2)  # stopped after step 2: checkpoint-2
    state = json.loads((tmp_path / "stopped" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [(d["rows"], d["weight"]) for d in state["datasets"]] == [(16, 0.25), (16, 0.75)]
    resumed, resumed_weights = _run(tiny_config, two_datasets, tmp_path / "stopped", resume=True, max_steps=6)
    assert resumed.losses == pytest.approx(whole.losses[2:], abs=1e-6)  # each step's loss: the same batches
    assert max(float((resumed_weights[k] - whole_weights[k]).abs().max()) for k in whole_weights) <= 1e-6
    with pytest.raises(ValueError, match="was trained on datasets .* give the same --data sources and weights"):
        _run(tiny_config, two_datasets, tmp_path / "stopped", weights=(0.5, 0.5), resume=True, max_steps=6)


def test_a_bad_row_is_named_with_its_dataset(tiny_config, two_datasets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                               "images": ["gone.png"]}) + "\n")  # fmt: skip
    sources = [DataSource(str(two_datasets["captions"]), 0.5), DataSource(str(bad), 0.5)]
    with pytest.raises(DataError, match=f"(?s){bad}: 1 bad row.*line 1: image file 'gone.png' not found"):
        read_mixture(sources, two_datasets["images"], None)


def test_mllm_train_takes_weighted_data_and_stage_datasets(tiny_config, two_datasets, tmp_path, capsys):
    from training.train import main

    config = tmp_path / "model.json"
    tiny_config.save(config)
    sets = [a for k, v in {**SETTINGS, "max_steps": 1}.items() for a in ("--set", f"{k}={v}")]
    common = ["--stage", "instruct", "--image-folder", str(two_datasets["images"]), "--model-config", str(config),
              "--feature-cache", str(tmp_path / "cache"), "--quiet", *sets]  # fmt: skip
    data = ["--data", f"{two_datasets['captions']}:0.3", "--data", f"{two_datasets['qa']}:0.7"]
    assert main([*common, *data, "--output", str(tmp_path / "cli")]) == 0
    state = json.loads((tmp_path / "cli" / "checkpoint-1" / "trainer_state.json").read_text())
    assert [d["weight"] for d in state["datasets"]] == [0.3, 0.7]
    yaml = tmp_path / "instruct.yaml"
    yaml.write_text(f"datasets: ['{two_datasets['captions']}:0.3', {{path: '{two_datasets['qa']}', weight: 0.7}}]\n")
    assert main([*common, "--config", str(yaml), "--output", str(tmp_path / "yaml")]) == 0
    losses = [json.loads(line)["loss"] for out in ("cli", "yaml") for line in (tmp_path / out / "metrics.jsonl").open()]
    assert losses[0] == losses[1]  # the same mixture, given either way
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "none")]) == 2
    assert "no training data: give --data (or `datasets` in the stage YAML)" in capsys.readouterr().err


def test_the_validator_reports_each_dataset_of_a_mixture(two_datasets, tmp_path, capsys):
    from training.validate import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    args = [f"{two_datasets['qa']}:0.7", f"{bad}:0.3", "--image-folder", str(two_datasets["images"])]
    assert main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{two_datasets['qa']}: checked 16 openai rows: all good",
        f"{bad}: line 1: message 0 has role='bot'; use user, assistant or system",
        f"{bad}: checked 1 sharegpt rows: 1 bad (1 bad sharegpt row)",
    ]
