"""The training loop, top to bottom: data order, lr schedule, accumulation, clipping, eval, checkpoints.

It runs on `accelerate` (CPU, one GPU, or DDP / FSDP / DeepSpeed through `accelerate launch` or
torchrun; FSDP is tested on 2 CPU processes, DeepSpeed needs CUDA). The data order (one dataset or a weighted
mixture, `training.mixture`) is a (seed, epoch)-seeded permutation cut into global batches, so the data
position is just the optimizer step: resuming needs no sampler state. Every optimizer step's gradient
is the token-mean over the whole global batch, whatever the split into processes and micro-batches.

Before step 0 every row is encoded once, so a bad row stops the run, named, on every rank at once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration, gather_object
from torch import nn
from tqdm.auto import tqdm

import training.tracking as tracking
from mllm.model import MLLM
from mllm.processor import Processor
from training.batches import Collator, Samples, StepBatches, batch_weight, row_length, to_device
from training.data import ConversationDataset, DataError, Row
from training.feature_cache import FeatureCache
from training.live_eval import LiveEval
from training.mixture import Mixture
from training.precision import prepare_cpu_bf16, restore_attention, use_bf16
from training.resume import checkpoint_to_resume, restore_checkpoint, save_checkpoint, whole_parameters
from training.run_output import Metrics, plot_losses, save_final_model
from training.stage_config import StageConfig
from training.stage_model import build_objective, param_groups


@dataclass
class TrainResult:
    steps: int
    """Optimizer steps done (counting those before a resume)."""
    losses: list[float]
    """Train loss (global-batch token mean) of each logged step of this run."""
    val_loss: float | None
    """Validation loss at the end (None without validation data)."""


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of each group's peak lr: linear warmup, then cosine to 0 (nanoGPT's get_lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_accelerator(stage: StageConfig, report_to: str = "none", output: str | Path | None = None) -> Accelerator:
    """bf16 autocast where bf16 is fast (GPUs with bf16, CPUs with AMX or AVX512-BF16: training.precision),
    else fp32. `report_to`: the live tracker (`training.tracking`), logging under `output`/logs."""
    cpu = not torch.cuda.is_available()  # also makes torchrun on a CPU host a gloo DDP run
    world = PartialState(cpu=cpu).num_processes
    bf16 = use_bf16(stage.precision, cpu)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, "bf16" if bf16 else "no"):
        # accelerate fixes the precision once per process; a later run in the same process (a notebook,
        # a sweep, the tests) with another precision starts a fresh state rather than failing.
        AcceleratorState._reset_state()
    log_with = tracking.trackers(report_to)
    if log_with and output is None:
        raise ValueError(f"--report-to {report_to} needs the run's output directory for its logs")
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=stage.gradient_accumulation(world),
        mixed_precision="bf16" if bf16 else "no",
        log_with=log_with or None,
        project_config=ProjectConfiguration(str(output), logging_dir=str(Path(output) / tracking.LOG_DIR))
        if log_with
        else None,
    )
    if cpu and world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # `accelerate launch` with an FSDP config on a CPU host: accelerate turns FSDP on for accelerators only and
        # leaves the run plain DDP (MULTI_CPU), while torch's FSDP itself shards over gloo on CPU. Turned on here,
        # with the plugin read from the config's environment, so the FSDP path runs (and is tested) without a GPU.
        # (in both states: accelerate copies the process state into the accelerator's on every AcceleratorState())
        for state in (PartialState(), accelerator.state):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")  # FSDP takes `cpu`, not DDP's `cpu:0`, as its device_id
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


class TrainStep(nn.Module):
    """The model and the stage's objective as one module: DDP / FSDP wrap this, so everything with
    gradients runs inside its forward. Returns {"loss": mean loss of the micro-batch, ...}."""

    def __init__(self, model: MLLM, objective: nn.Module | None):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        features = batch.get("vision_features")  # (n_img, N_v, D_v) from the cache, or None
        if self.objective is not None:
            if features is None:
                features = self.model.vision(batch["pixel_values"])  # (n_img, N_v, D_v)
            return self.objective(features, batch["captions"])
        # An instruction-reading Q-Former (InstructBLIP) also takes each image's instruction ids (n_img, T).
        qformer = {key: batch.get(key) for key in ("qformer_input_ids", "qformer_attention_mask")}
        views = batch.get("image_views")  # per image: a row's own classifier view, or None
        image_features = None
        if features is not None:
            image_features = self.model.image_tokens(features, *qformer.values(), views)  # (n_img, N_img, D_llm)
        _, loss = self.model(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=None if features is not None else batch["pixel_values"],
            labels=batch["labels"],
            image_features=image_features,
            supervised_logits_only=True,  # the vocabulary projection only where a label is
            image_views=views,
            **qformer,
        )
        return {"loss": loss}


def open_feature_cache(model, stage, root, datasets, accelerator, show_progress) -> FeatureCache | None:
    """A filled cache when the tower is frozen and caching is on; `datasets`: (name, rows) pairs, filled one
    after the other (the progress bar names each); each rank computes a share of each one's misses."""
    if stage.vision != "frozen" or root is None:
        return None
    cache = FeatureCache(root, model.vision, model.config.vision, model.processor.image_processor)
    for name, rows in datasets:
        missing = cache.missing(image for row in rows for image in row.images)
        accelerator.wait_for_everyone()  # every rank has listed the misses before anyone writes
        mine = missing[accelerator.process_index :: accelerator.num_processes]
        bar = show_progress and accelerator.is_main_process
        cache.precompute(mine, stage.per_device_batch_size, bar, desc=f"caching vision features of {name}")
        accelerator.wait_for_everyone()
    return cache


def check_rows(rows: list[Row], processor: Processor, stage: StageConfig, accelerator: Accelerator, split: str):
    """Encode every row once (split over processes) so a bad row stops the run before step 0, named,
    on every rank at once; a row whose labels are all masked is an error, never a silent zero loss."""
    errors, dataset = [], ConversationDataset(rows, processor)
    for i in range(accelerator.process_index, len(rows), accelerator.num_processes):
        row = rows[i]
        answers = sum(m["role"] == "assistant" for m in row.messages)
        if stage.data == "captions" and (len(row.images) != 1 or answers != 1):
            errors.append(
                f"{row.id}: a captions stage needs 1 image and 1 answer per row, got {len(row.images)} and {answers}"
            )
            continue
        try:
            dataset[i]
        except DataError as e:
            errors.append(str(e))
    if accelerator.num_processes > 1:
        errors = gather_object(errors)
    if errors:
        shown = "\n  ".join(errors[:10])
        raise DataError(f"{split} data: {len(errors)} bad row(s); run `mllm data validate` for details:\n  {shown}")


@torch.no_grad()
def validation_loss(
    step_module, samples: Samples, collate: Collator, stage: StageConfig, accelerator: Accelerator
) -> float:
    """Token-weighted mean loss over `samples`; each rank takes every world-th row. Runs the unwrapped
    module: a DDP forward syncs buffers, which would hang when ranks hold different batch counts."""
    module = accelerator.unwrap_model(step_module)
    module.eval()
    mine = list(range(accelerator.process_index, len(samples), accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of loss * weight, sum of weight)
    for first in range(0, len(mine), stage.per_device_batch_size):
        batch = collate([samples[i] for i in mine[first : first + stage.per_device_batch_size]])
        with accelerator.autocast():
            loss = module(to_device(batch, accelerator.device))["loss"]
        weight = batch_weight(batch)
        total += torch.stack(
            [loss.double() * weight, torch.tensor(float(weight), dtype=torch.float64, device=loss.device)]
        )
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1])


def train(
    model: MLLM,
    stage: StageConfig,
    train_rows: list[Row] | Mixture,
    output_dir: str | Path,
    *,
    val_rows: list[Row] | None = None,
    accelerator: Accelerator | None = None,
    resume: bool = False,
    feature_cache: str | Path | None = "auto",
    show_progress: bool = True,
    report_to: str = "none",
    live_eval: LiveEval | None = None,
) -> TrainResult:
    """Train `model` (made by `training.stage_model.model_for_stage`) for `stage`: checkpoints, metrics.jsonl, loss.png and
    the final model go to `output_dir`. `train_rows`: rows, or a `Mixture` of several datasets sampled by weight.
    `feature_cache`: a directory, `auto` (`output_dir/../.feature_cache`) or None (run the tower live).
    `report_to`: the live tracker of an accelerator made here (a given one carries its own). `live_eval`: answer
    scores on held-out questions at each `eval_every` and at the end (`training.live_eval`)."""
    accelerator = accelerator or make_accelerator(stage, report_to, output_dir)
    mixture = train_rows if isinstance(train_rows, Mixture) else None
    if mixture is not None:
        train_rows = mixture.rows
        # One source is plain data: its order stays the permutation a single --data file gets.
        parts = zip(mixture.names, mixture.offsets, mixture.sizes)
        datasets = [(name, train_rows[first : first + size]) for name, first, size in parts]
        mixture = mixture if len(mixture.sizes) > 1 else None
    else:
        datasets = [("training", train_rows)]
    output, device = Path(output_dir), accelerator.device
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    accum, size = stage.gradient_accumulation(world), stage.global_batch_size
    steps_per_epoch = len(train_rows) // size  # the last incomplete global batch of an epoch is dropped
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_rows)} training rows are fewer than one global batch ({size}); lower global_batch_size"
        )
    total = stage.total_steps or stage.epochs * steps_per_epoch
    if stage.max_steps is not None and stage.max_steps > total:
        raise ValueError(
            f"max_steps={stage.max_steps} is past the schedule's end ({total} steps); raise epochs or total_steps"
        )
    end, warmup = stage.max_steps or total, math.ceil(stage.warmup_ratio * total)
    output.mkdir(parents=True, exist_ok=True)
    if live_eval is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Generation needs the whole model on one process; ZeRO-3 partitions it (FSDP's are gathered for it).
        raise ValueError("evaluation while training (--eval-data) runs with one process, DDP or FSDP, not DeepSpeed")

    for name, rows in datasets:  # per dataset, so a bad row's message names its file
        check_rows(rows, model.processor, stage, accelerator, name)
    check_rows(val_rows or [], model.processor, stage, accelerator, "validation")
    cache_root = output.parent / ".feature_cache" if feature_cache == "auto" else feature_cache
    cache_sets = [*datasets, *([("validation", val_rows)] if val_rows else [])]
    cache = open_feature_cache(model, stage, cache_root, cache_sets, accelerator, show_progress)
    # bf16 on a CPU: frozen LLM weights in bf16 and fp32 attention (training.precision). Not when the
    # checkpoint carries the LLM's own weights (an earlier full tune): those must not be rounded.
    cpu_bf16 = accelerator.mixed_precision == "bf16" and device.type == "cpu" and model.config.tune["llm"] != "full"
    if cpu_bf16:
        prepare_cpu_bf16(model.llm)
    objective = build_objective(stage, model)
    step_module = TrainStep(model, objective)
    optimizer = torch.optim.AdamW(param_groups(model, stage, objective))
    start, checkpoint = 0, None
    if resume:
        mix = mixture.describe() if mixture is not None else None
        checkpoint, start = checkpoint_to_resume(output, stage, len(train_rows), step_module, mix)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    trainable = [p for p in step_module.parameters() if p.requires_grad]

    collate = Collator(model.processor, cache, captions=objective is not None)
    loader = torch.utils.data.DataLoader(
        Samples(train_rows, model.processor),
        batch_sampler=StepBatches(
            [row_length(r, model.tokens_per_image) for r in train_rows], stage, world, rank, start, end, mixture
        ),
        collate_fn=collate,
        num_workers=stage.num_workers,
        generator=torch.Generator().manual_seed(stage.seed),  # never draws from the global RNG
    )
    batches = iter(loader)
    metrics = Metrics(output / "metrics.jsonl", keep_until=start, enabled=main)
    best = LiveEval.best_so_far(output / "metrics.jsonl") if live_eval is not None and start and main else None
    if checkpoint is not None:  # weights, optimizer and RNG; last, so nothing above shifts the dropout masks
        restore_checkpoint(checkpoint, accelerator)
    tracking.start(accelerator, stage, output, start)
    bar = tqdm(total=end, initial=start, desc=stage.name, disable=not (show_progress and main), dynamic_ncols=True)
    losses, val_loss, logged, tick, tokens = [], None, start, time.perf_counter(), 0
    for step in range(start, end):
        step_module.train()
        for part in ("vision", "connector"):  # frozen parts stay in eval mode: dropout off, BatchNorm stats fixed
            getattr(model, part).train(stage.tune[part] != "frozen")
        factor = lr_factor(step, warmup, total)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        micro = [next(batches) for _ in range(accum)]
        weights = [batch_weight(b) for b in micro]
        tokens += sum(tracking.batch_tokens(b) for b in micro)  # this rank's; summed over ranks when logged
        # A sync point: every rank needs the global batch's token count before its first backward.
        global_weight = accelerator.reduce(torch.tensor(float(sum(weights)), device=device), "sum").item()
        step_loss = torch.zeros((), device=device)
        for batch, weight in zip(micro, weights):
            with accelerator.accumulate(step_module):  # DDP skips the gradient all-reduce until the last one
                loss = step_module(to_device(batch, device))["loss"]
                share = weight / global_weight
                # accelerate divides by `accum` and DDP averages over ranks: undo both, so the summed
                # gradient is that of the token mean over the whole global batch.
                accelerator.backward(loss * share * accum * world)
                step_loss += loss.detach().float() * share
        grad_norm = accelerator.clip_grad_norm_(trainable, stage.max_grad_norm) if stage.max_grad_norm else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)
        if done % stage.log_every == 0 or done == end:
            loss_value = accelerator.reduce(step_loss, "sum").item()  # each rank holds a partial sum
            all_tokens = accelerator.reduce(torch.tensor(float(tokens), device=device), "sum").item()
            now = time.perf_counter()
            speed, token_speed = size * (done - logged) / (now - tick), all_tokens / (now - tick)
            logged, tick, tokens = done, now, 0
            lrs = {f"lr_{p}": stage.lr[p] * factor for p in ("vision", "connector", "llm") if stage.tune[p] != "frozen"}
            norm = None if grad_norm is None else float(grad_norm)
            losses.append(loss_value)
            record = {
                "step": done,
                "epoch": round(done / steps_per_epoch, 4),
                "loss": loss_value,
                **lrs,
                "grad_norm": norm,
                "samples_per_s": round(speed, 2),
                "tokens_per_s": round(token_speed, 1),
                **tracking.memory(),
            }
            metrics.write(**record)
            tracking.log(accelerator, record, done)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{max(lrs.values()):.2e}", samples_s=f"{speed:.1f}")
        at_eval = done == end or (stage.eval_every and done % stage.eval_every == 0)
        if val_rows and at_eval:
            with whole_parameters(accelerator):  # FSDP: the unwrapped module needs whole parameters
                val_loss = validation_loss(step_module, Samples(val_rows, model.processor), collate, stage, accelerator)
            metrics.write(step=done, val_loss=val_loss)
            tracking.log(accelerator, {"val_loss": val_loss}, done)
        if live_eval is not None and at_eval:
            with whole_parameters(accelerator):
                if main:  # greedy answers from the model as it is now, on the main process (the others wait)
                    with accelerator.autocast():  # as the steps run (a no-op in fp32)
                        summary = live_eval.score(model, output, done)
                    record = live_eval.record(summary)
                    metrics.write(step=done, **record)
                    tracking.log(accelerator, record, done)
                    best = live_eval.keep_if_best(model, output, done, summary["accuracy"], best)
                    bar.set_postfix(eval_accuracy=f"{summary['accuracy']:.3f}")
                accelerator.wait_for_everyone()
        # A run stopped before its schedule's end (max_steps) always leaves a checkpoint to resume from.
        if (stage.save_every and done % stage.save_every == 0) or (done == end and end < total):
            epoch, in_epoch = divmod(done, steps_per_epoch)  # the data position of the next step
            state = {
                "step": done,
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "sampler_seed": stage.seed,
                "num_rows": len(train_rows),
                "world_size": world,
                "datasets": mixture.describe() if mixture is not None else None,
            }
            save_checkpoint(output, model, stage, state, accelerator)
    bar.close()
    for tracker in accelerator.trackers:  # flush and close them (not end_training: it ends the process group too)
        tracker.finish()
    if cpu_bf16:
        restore_attention(model.llm)
    with whole_parameters(accelerator):
        if main:
            save_final_model(model, output)
            plot_losses(output / "metrics.jsonl", output / "loss.png")
    accelerator.wait_for_everyone()
    return TrainResult(steps=end, losses=losses, val_loss=val_loss)
