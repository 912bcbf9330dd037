"""The training loop's checks on its data and model: every row encoded once before step 0 (a bad row
stops the run, named, on every rank at once), and the validation loss.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from mllm.processor import Processor
from training.data import ConversationDataset, DataError, Row
from training.loop_batches import Collator, Samples, batch_weight, to_device
from training.stage_config import StageConfig


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
def evaluate(step_module, samples: Samples, collate: Collator, stage: StageConfig, accelerator: Accelerator) -> float:
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
