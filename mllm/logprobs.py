"""Log probabilities of a reply's tokens, and of the most likely alternatives at each step (OpenAI's `logprobs` /
`top_logprobs`).

A `LogprobRecord` rides in the reply's GenerationConfig (`Reply` puts a fresh one there), so `Sequence.sample`
adds one entry per token it emits whichever driver runs it (alone or in a batch). The values are the model's
own distribution, `log_softmax` of the logits before sampling settings (temperature, top-p, a grammar) reshape
it, as vLLM and OpenAI report them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # as OpenAI allows


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    """The `k` most likely tokens at this step and their log probabilities, most likely first."""


class LogprobRecord:
    """One reply's entries, appended on the model thread and read by the reply's reader."""

    def __init__(self, top: int = 0):
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={top} must be between 0 and {MAX_TOP_LOGPROBS}")
        self.top = top
        self._entries: list[TokenLogprob] = []
        self._lock = threading.Lock()

    def add(self, logits: torch.Tensor, token: int) -> None:
        """`logits` (1, V): the step's raw scores; `token` the one sampled from them."""
        logprobs = logits.float().log_softmax(-1)[0]  # (V,)
        top = ()
        if self.top:
            values, ids = logprobs.topk(self.top)
            top = tuple(zip(ids.tolist(), values.tolist()))
        with self._lock:
            self._entries.append(TokenLogprob(token, float(logprobs[token]), top))

    def since(self, start: int) -> list[TokenLogprob]:
        """The entries from the `start`-th on (a streaming reader takes the new ones with each piece)."""
        with self._lock:
            return self._entries[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
