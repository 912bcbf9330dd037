"""The classifier's view of an image, handed to the LLM as words in the image's slots.

The built-in model's tower is the real ImageNet EfficientNet-Lite0, and its ImageNet classifier (`_fc`, global
average pool -> 1000 classes) is good on real photos. No captioned photos exist offline, so nothing could
learn to map the tower's features of a real photo to words. The classifier already does: `ClassifierView`
turns its top classes into text ("sure: cheetah, leopard, jaguar"), left-padded to a fixed `num_tokens`,
and embeds that text with the LLM's own embedding table; those embeddings follow the connector's image tokens
in every image slot. The mapping from classifier to LLM is the LLM's own vocabulary, not learned; what the
LLM learns (`training/synth_views.py`) is to read it: name the object when the classifier is sure, give its
top guesses when it is not, and keep answering shapes-world pictures as before.

It computes the classifier from the tower's output: the first 1280 channels of every token are the head's
7x7 map, and their mean over the tokens is the classifier's input (its global average pool), so the feature
cache of a frozen tower serves it unchanged. A training row can give the view instead (`views`: the rows of
`training/synth_views.py`, which teach reading it for classes no shapes picture shows).
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import nn

View = list[tuple[str, float]]  # (class name, probability), most likely first
TOP_K = 3  # classes named at most
MIN_SHARE = 0.02  # classes below this are not named (after the first)
# How sure the classifier is, said in a word before the classes: a 135M LLM reads "sure" / "maybe" / "unsure"
# at once, where learning thresholds on the printed percentages took far more steps than it had.
SURE, MAYBE = 0.5, 0.25  # the top class's probability each word starts at
HEAD_CHANNELS = 1280  # EfficientNet-Lite0's head width: the classifier's input


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in the classifier's order, as the gradio package ships them."""
    try:
        text = (resources.files("gradio") / "media_assets" / "data" / "imagenet_labels.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(
            "the ImageNet class names come from the gradio package (media_assets/data/imagenet_labels.json); "
            "install the project's dependencies (make install)"
        ) from e
    labels = json.loads(text)
    if len(labels) != 1000:
        raise ValueError(f"gradio's imagenet_labels.json holds {len(labels)} names, not 1000")
    return labels


def confidence(view: View) -> str:
    """'sure', 'maybe' or 'unsure', from the top class's probability."""
    p = view[0][1]
    return "sure" if p >= SURE else "maybe" if p >= MAYBE else "unsure"


def view_text(view: View) -> str:
    """'sure: cheetah, leopard, jaguar': what the LLM reads. The confidence word carries the probabilities: printed
    percentages cost three tokens each (one per digit), and every token here is prefilled with every image."""
    return f"{confidence(view)}: " + ", ".join(name for name, _ in view)


def fit_view(view: View, tokenizer, slots: int) -> View:
    """`view` less its last classes until its text fits `slots` tokens (the first class always stays): what the
    LLM reads, so what a training row's answer may name (`training/synth_views.py`)."""
    while len(view) > 1 and len(tokenizer.encode(view_text(view), add_special_tokens=False)) > slots:
        view = view[:-1]
    return view


class ClassifierView(nn.Module):
    """(n_img, N_v, D_v) tower features -> (n_img, num_tokens, D_llm) embedded words of the top classes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, tokenizer, num_tokens: int):
        """`weight` (1000, 1280) / `bias` (1000,): the tower's ImageNet classifier; `num_tokens`: slots per image."""
        super().__init__()
        self.classifier = nn.Linear(weight.shape[1], weight.shape[0])
        self.classifier.weight.data.copy_(weight)
        self.classifier.bias.data.copy_(bias)
        self.classifier.requires_grad_(False)  # the ImageNet classifier as it is: never trained here
        self.labels = imagenet_labels()
        self.index = {name: i for i, name in enumerate(self.labels)}
        self.tokenizer, self.num_tokens = tokenizer, num_tokens
        self.filler = tokenizer.encode(" ", add_special_tokens=False)[0]  # left padding: one space token

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(n, N_v, D_v) -> (n, 1000): the classifier on the head map's global average pool."""
        pooled = features[..., :HEAD_CHANNELS].float().mean(1)  # (n, 1280)
        return self.classifier.float()(pooled).softmax(-1)

    def views(self, probabilities: torch.Tensor) -> list[View]:
        """The named classes of each image: up to TOP_K, the first always, the others from MIN_SHARE on."""
        values, indices = probabilities.topk(TOP_K, -1)
        out = []
        for row_values, row_indices in zip(values.tolist(), indices.tolist()):
            view = [
                (self.labels[i], p) for k, (p, i) in enumerate(zip(row_values, row_indices)) if k == 0 or p >= MIN_SHARE
            ]
            out.append(view)
        return out

    def ids(self, view: View) -> list[int]:
        """The view's text as exactly `num_tokens` ids (`fit_view`), padding on the left."""
        ids = self.tokenizer.encode(
            view_text(fit_view(view, self.tokenizer, self.num_tokens)), add_special_tokens=False
        )
        ids = ids[: self.num_tokens]  # one class longer than the slots: the confidence word and name's start kept
        return [self.filler] * (self.num_tokens - len(ids)) + ids

    def forward(self, features: torch.Tensor, embeddings: nn.Embedding, given: list[View | None] | None = None):
        """(n, N_v, D_v) -> (n, num_tokens, D_llm). `given[i]`, where not None, replaces image i's own view."""
        own = self.views(self.probabilities(features))
        chosen = [g if given is not None and g is not None else v for v, g in zip(own, given or [None] * len(own))]
        ids = torch.tensor([self.ids(v) for v in chosen], device=embeddings.weight.device)  # (n, num_tokens)
        return embeddings(ids)  # (n, num_tokens, D_llm)
