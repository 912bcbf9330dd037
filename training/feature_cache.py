"""On-disk cache of a frozen vision tower's output, so later epochs and stages skip the tower.

One safetensors file per image holds its features BEFORE the connector, `(N_v, D_v)`, in the
tower's dtype. Files live under `ROOT/<tower key>/`, where the tower key hashes everything that
decides the features: the VisionConfig (as JSON), the image processing (size, mean, std, resize),
the tower's dtype and a fingerprint of its weights. A file is named by the hash of the image
file's bytes, so a renamed image hits and an edited one misses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mllm.image_processing import ImageProcessor
from mllm.vision import VisionTower


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def tower_key(vision: VisionTower, vision_config, image_processor: ImageProcessor) -> str:
    settings = {
        "vision": dataclasses.asdict(vision_config),
        "image_processor": dataclasses.asdict(image_processor),
        "dtype": str(next(vision.parameters()).dtype),
        "weights": weights_fingerprint(vision),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    """`get(paths) -> (n, N_v, D_v)`; `precompute(paths)` fills what is missing, batch by batch."""

    def __init__(self, root: str | Path, vision: VisionTower, vision_config, image_processor: ImageProcessor):
        self.vision = vision
        self.image_processor = image_processor
        self.directory = Path(root) / tower_key(vision, vision_config, image_processor)
        self._hashes: dict[Path, str] = {}  # image path -> content hash, read once per process

    def file_for(self, image: str | Path) -> Path:
        image = Path(image)
        if image not in self._hashes:
            self._hashes[image] = file_hash(image)
        digest = self._hashes[image]
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def missing(self, images: Iterable[str | Path]) -> list[Path]:
        unique = dict.fromkeys(Path(i) for i in images)
        return [i for i in unique if not self.file_for(i).is_file()]

    @torch.no_grad()
    def precompute(
        self,
        images: list[Path],
        batch_size: int = 32,
        show_progress: bool = True,
        desc: str = "caching vision features",
    ) -> int:
        """Run the tower on `images` (in eval mode, as training sees a frozen tower); returns how many."""
        was_training = self.vision.training
        self.vision.eval()
        try:
            for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not show_progress):
                chunk = images[start : start + batch_size]
                features = self.vision(self.image_processor(chunk))  # (b, N_v, D_v)
                for image, feature in zip(chunk, features):
                    self._write(self.file_for(image), feature)
        finally:
            self.vision.train(was_training)
        return len(images)

    def _write(self, path: Path, features: torch.Tensor) -> None:
        # Temp file + rename: a reader (another rank, a killed run) never sees half a file.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"features": features.detach().to("cpu").contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def get(self, images: list[str | Path]) -> torch.Tensor:
        """Cached features of `images`, in order: (n, N_v, D_v); (0, N_v, D_v) for none."""
        if not images:
            return torch.zeros((0, self.vision.num_tokens, self.vision.hidden_size))
        tensors = []
        for image in images:
            path = self.file_for(image)
            if not path.is_file():
                raise FileNotFoundError(f"no cached features for {image} in {self.directory}; run precompute first")
            tensors.append(load_file(path)["features"])
        return torch.stack(tensors)
