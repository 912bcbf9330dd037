"""What goes into each optimizer step: the seeded data order cut into micro-batches, the dataset and
the collator that turn rows into tensors (reading a frozen tower's features from the cache), and the
weight of a micro-batch in the global batch's token mean.

The data order is a (seed, epoch)-seeded permutation cut into global batches, so the data position is
just the optimizer step: resuming needs no sampler state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mllm.image_processing import ImageError
from mllm.processor import IGNORE_INDEX, Processor
from training.data import ConversationDataset, DataError, Row
from training.feature_cache import FeatureCache
from training.mixture import Mixture
from training.stage_config import StageConfig


def batch_weight(batch: dict) -> int:
    """What the micro-batch's mean loss averages over: supervised tokens (the MLLM loss) or captions."""
    if "captions" in batch:
        return len(batch["captions"])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches (lists of row indices) for optimizer steps [start, end).

    Epoch e's global batches come from a permutation seeded by (seed, e): step s takes global batch i
    of epoch e, e, i = divmod(s, steps_per_epoch), and micro-batch k of rank r is its slice
    (k * world + r). With `stage.group_by_length`, each run of `GROUP_BATCHES` global batches of the
    permutation is sorted by row length before it is cut, and the batches are then shuffled (the
    `group_by_modality_length` idea of LLaVA): rows of one batch have similar lengths, so little of
    each step is padding. Everything depends on (seed, epoch) only, so `--resume` and DDP see the
    same batches. With a `mixture` of several datasets, the epoch's rows are its weighted draw
    (`training.mixture`) from the same generator instead of a permutation.
    """

    GROUP_BATCHES = 16

    def __init__(self, lengths: list[int], stage: StageConfig, world: int, rank: int, start: int, end: int,
                 mixture: Mixture | None = None) -> None:  # fmt: skip
        self.lengths, self.stage, self.world, self.rank = np.asarray(lengths), stage, world, rank
        self.mixture = mixture
        self.start, self.end = start, end
        self.accum = stage.gradient_accumulation(world)
        self.steps_per_epoch = len(lengths) // stage.global_batch_size

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch_size) row indices of one epoch."""
        rng = np.random.default_rng([self.stage.seed, epoch])
        size = self.stage.global_batch_size
        order = self.mixture.draw(rng) if self.mixture is not None else rng.permutation(len(self.lengths))
        perm = order[: self.steps_per_epoch * size]
        if not self.stage.group_by_length:
            return perm.reshape(self.steps_per_epoch, size)
        group = size * self.GROUP_BATCHES
        runs = [perm[i : i + group] for i in range(0, len(perm), group)]
        # Longest first inside each run (stable, so ties keep the permutation's order).
        perm = np.concatenate([run[np.argsort(-self.lengths[run], kind="stable")] for run in runs])
        return perm.reshape(self.steps_per_epoch, size)[rng.permutation(self.steps_per_epoch)]

    def __iter__(self):
        size, batches, batches_epoch = self.stage.per_device_batch_size, None, -1
        for step in range(self.start, self.end):
            epoch, index = divmod(step, self.steps_per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = self.epoch_batches(epoch), epoch
            chunk = batches[index]
            for k in range(self.accum):
                first = (k * self.world + self.rank) * size
                yield chunk[first : first + size].tolist()


def row_length(row: Row, tokens_per_image: int) -> int:
    """A cheap token-count estimate for length grouping: ~4 characters per token, plus the image slots."""
    return sum(len(m["content"]) for m in row.messages) // 4 + len(row.images) * tokens_per_image


class Samples(torch.utils.data.Dataset):
    """Row -> (Encoded, caption); the caption (last answer) feeds objectives that take text, not tokens."""

    def __init__(self, rows: list[Row], processor: Processor):
        self.rows, self.encoded = rows, ConversationDataset(rows, processor)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        return self.encoded[index], row.messages[-1]["content"], row.views or [None] * len(row.images)


@dataclass
class Collator:
    processor: Processor
    cache: FeatureCache | None
    captions: bool

    def __call__(self, samples: list) -> dict:
        encoded = [e for e, _, _ in samples]
        try:
            if self.cache is None:
                batch = self.processor.collate(encoded)  # pixel_values (n_img, 3, S, S)
            else:  # the tower is frozen: read its output instead of loading pixels
                batch = self.processor.collate([dataclasses.replace(e, images=[]) for e in encoded])
                del batch["pixel_values"]
                batch["vision_features"] = self.cache.get([s for e in encoded for s in e.images])  # (n_img, N_v, D_v)
        except ImageError as e:
            raise DataError(str(e)) from e
        if self.captions:
            batch["captions"] = [c for _, c, _ in samples]
        views = [v for _, _, row_views in samples for v in row_views]  # one per image, in order
        if any(v is not None for v in views):
            batch["image_views"] = views
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device`; other values (captions) stay as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
