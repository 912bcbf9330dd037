"""Several datasets in one stage, sampled by weight (LLaMA-Factory's `interleave_probs`), deterministically.

    mllm train ... --data llava_instruct.json:0.7 --data sharegpt4v.jsonl:0.3
    # or in a stage YAML:  datasets: [{path: a.json, weight: 0.7, image_folder: a/images}, "b.jsonl:0.3"]

An epoch is as many rows as the datasets hold together. Each of its slots draws a dataset with the
weights' probabilities, and dataset d's slots take its rows in a permutation of its own (repeated when the
weight asks for more rows than it has: oversampling). Every draw comes from the (seed, epoch)-seeded
generator `training.batches.StepBatches` hands over, so the order is a function of (seed, epoch) alone and
`--resume` needs no sampler state, as with one dataset. No weights at all: each dataset's share of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import Row
from training.formats import read_rows


@dataclass(frozen=True)
class DataSource:
    path: str
    """A data file or folder of any `training.formats` format."""
    weight: float | None = None
    """Relative sampling weight (normalised over the sources); None: the source's share of rows."""
    image_folder: str | None = None
    """Where its images resolve (None: `--image-folder`)."""
    format: str | None = None
    """Its format (None: detected, or `--format`)."""

    def __post_init__(self) -> None:
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"data source {self.path}: weight {self.weight} must be > 0")


def parse_source(entry: str | dict) -> DataSource:
    """`path`, `path:weight` (as --data takes it) or a mapping {path, weight, image_folder, format} (YAML)."""
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"path", "weight", "image_folder", "format"})
        if unknown or "path" not in entry:
            raise ValueError(f"data source {entry}: give `path` and optionally weight, image_folder, format")
        weight = entry.get("weight")
        return DataSource(str(entry["path"]), None if weight is None else float(weight),
                          entry.get("image_folder"), entry.get("format"))  # fmt: skip
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"data source {entry!r}: expected PATH or PATH:WEIGHT")
    path, sep, tail = entry.rpartition(":")
    if sep and path:
        try:
            return DataSource(path, float(tail))
        except ValueError as e:
            if "must be > 0" in str(e):
                raise
    return DataSource(entry)  # no weight (a ':' may be part of the path)


@dataclass
class Mixture:
    """The training rows of several sources, concatenated, and how an epoch samples them."""

    names: list[str]
    """Each source's path, for messages."""
    sizes: list[int]
    """Rows per source; source d holds rows [offsets[d], offsets[d] + sizes[d]) of `rows`."""
    weights: np.ndarray
    """Sampling probability of each source (sums to 1)."""
    rows: list[Row]

    @classmethod
    def of(cls, parts: list[tuple[DataSource, list[Row]]]) -> Mixture:
        weights = [source.weight for source, _ in parts]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError("give a weight to every --data source (PATH:WEIGHT) or to none")
        sizes = [len(rows) for _, rows in parts]
        if 0 in sizes:
            raise ValueError(f"data source {parts[sizes.index(0)][0].path} holds no rows")
        raw = np.asarray(sizes if weights[0] is None else weights, dtype=np.float64)
        return cls([s.path for s, _ in parts], sizes, raw / raw.sum(), [r for _, rows in parts for r in rows])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch's row indices into `rows` (len(rows) of them), from the epoch's seeded generator."""
        total = len(self.rows)
        choice = rng.choice(len(self.sizes), size=total, p=self.weights)  # the source of each slot
        order = np.empty(total, dtype=np.int64)
        for d, (size, offset) in enumerate(zip(self.sizes, self.offsets)):
            slots = np.flatnonzero(choice == d)
            repeats = -(-len(slots) // size)  # ceil: a small source with a large weight comes round again
            picks = np.concatenate([rng.permutation(size) for _ in range(repeats)]) if repeats else np.empty(0, int)
            order[slots] = offset + picks[: len(slots)]
        return order

    def describe(self) -> list[dict]:
        """What a checkpoint records of the mixture (a resume must see the same)."""
        return [{"path": n, "rows": s, "weight": round(float(w), 6)} for n, s, w in zip(self.names, self.sizes, self.weights)]  # fmt: skip


def read_mixture(sources: list[DataSource], image_folder: str | Path | None, format: str | None) -> Mixture:
    """Every source's rows (bad rows named with their source); `image_folder` / `format` for sources without."""
    parts = []
    for source in sources:
        rows = read_rows(source.path, source.image_folder or image_folder, source.format or format)
        parts.append((source, rows))
    return Mixture.of(parts)
