"""MLLM: vision tower -> connector -> image tokens merged into the LLM's token embeddings.

The model never sees strings: the processor turns messages into ids where each image occupies
`tokens_per_image` slots holding `image_token_id`. Here those slots are overwritten with the
connector's output by `masked_scatter`, after a loud check that slots and features agree.
A connector that reads text (InstructBLIP's Q-Former) also takes each image's instruction as
`qformer_input_ids` / `qformer_attention_mask` (n_img, T), made by the processor; other models never need them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.backends import select as select_backend
from mllm.classifier_view import ClassifierView
from mllm.config import MLLMConfig
from mllm.connectors import Connector
from mllm.errors import MessageError
from mllm.llm import compute_dtype
from mllm.processor import IGNORE_INDEX, Processor
from mllm.vision import VisionTower


class MLLM(nn.Module):
    """The three components and the processor that feeds them; `mllm.assembly.assemble` puts them together."""

    def __init__(
        self,
        config: MLLMConfig,
        vision: VisionTower,
        connector: Connector,
        llm: nn.Module,
        processor: Processor,
        view: ClassifierView | None = None,
    ):
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.processor = processor
        # The tower's classifier read as words after the connector's tokens (`mllm.classifier_view`), or None.
        self.view = view
        self.image_token_id = processor.image_token_id
        self.tokens_per_image = connector.num_tokens + (view.num_tokens if view is not None else 0)
        self._backend = None

    @property
    def backend(self):
        """What decodes: `mllm.backends`, chosen once (at load by `mllm.loading`, else `auto` when first asked)."""
        if self._backend is None:
            self._backend = select_backend(self)
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        self._backend = backend

    def place(self, device: torch.device) -> MLLM:
        """Tower and connector follow the LLM's device and compute dtype (they are never quantized)."""
        dtype = compute_dtype(self.config.llm, device)
        self.vision.to(device=device, dtype=dtype)
        self.connector.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ---- images -------------------------------------------------------------------------------
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_views: list | None = None,
    ) -> torch.Tensor:
        """(n_img, 3, S, S) -> (n_img, N_img, D_llm); a text-reading connector also needs the (n_img, T) ids."""
        tower_trains = any(p.requires_grad for p in self.vision.parameters()) and self.training
        with torch.set_grad_enabled(tower_trains and torch.is_grad_enabled()):
            features = self.vision(pixel_values.to(self.device))  # (n_img, N_v, D_v)
        return self.image_tokens(features, qformer_input_ids, qformer_attention_mask, image_views)

    def image_tokens(
        self,
        features: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_views: list | None = None,
    ) -> torch.Tensor:
        """Tower output (n_img, N_v, D_v) -> what fills the image slots (n_img, N_img, D_llm): the connector's
        tokens, then the classifier's view as words where the model has one (`image_views[i]`, where given,
        replaces image i's own view: training rows that teach reading it)."""
        tokens = self.connector(
            features.to(next(self.connector.parameters()).dtype), qformer_input_ids, qformer_attention_mask
        )
        if self.view is None:
            return tokens
        with torch.no_grad():
            words = self.view(features, self.llm.get_input_embeddings(), image_views)  # (n_img, K, D_llm)
        return torch.cat([tokens, words.to(tokens.dtype)], 1)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_views: list | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image slots filled: (B, L) -> (B, L, D_llm)."""
        image_mask = input_ids == self.image_token_id  # (B, L)
        # Image slots may hold an id past the LLM's vocabulary; look up a harmless id there instead.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_slots = int(image_mask.sum())
        if image_features is None and pixel_values is not None and len(pixel_values):
            image_features = self.get_image_features(
                pixel_values, qformer_input_ids, qformer_attention_mask, image_views
            )
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if n_slots != n_features:
            raise MessageError(
                f"image token slots ({n_slots}) and image features ({n_features}) differ: the text has "
                f"{n_slots / self.tokens_per_image:g} image placeholder(s) of {self.tokens_per_image} tokens but "
                f"{0 if image_features is None else image_features.shape[0]} image(s) were given"
            )
        if n_slots:
            features = image_features.to(embeds.dtype).reshape(-1, embeds.shape[-1])  # (n_img * N_img, D_llm)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).expand_as(embeds), features)
        return embeds

    # ---- training / scoring -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        supervised_logits_only: bool = False,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_views: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits, loss or None); loss is mean next-token CE over supervised tokens.

        Logits are (B, L, V), or with `supervised_logits_only` (training) just the (n_supervised, V)
        rows the loss needs: the vocabulary projection of every other position is skipped.
        `qformer_input_ids` / `qformer_attention_mask` (n_img, T): each image's instruction (text-reading
        connectors only; `processor.collate` makes them).
        """
        input_ids = input_ids.to(self.device)
        embeds = self.embed(
            input_ids, pixel_values, image_features, qformer_input_ids, qformer_attention_mask, image_views
        )
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        targets = keep = None
        if labels is not None:
            targets = labels.to(self.device)[:, 1:]  # (B, L-1): position t predicts token t+1
            if not (targets != IGNORE_INDEX).any():
                raise ValueError(
                    "every label in this batch is masked (-100): no assistant tokens to learn from; "
                    "check the data (empty answers, or truncation cut them off)"
                )
            if supervised_logits_only:
                keep = F.pad(targets != IGNORE_INDEX, (0, 1))  # (B, L) bool, positions whose next token is a label
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=0 if keep is None else keep,
        )
        logits, loss = out.logits, None
        if targets is not None:
            if keep is not None:
                loss = F.cross_entropy(logits.float(), targets[keep[:, :-1]])
            else:
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
                )
        return logits, loss
