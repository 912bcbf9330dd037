"""Constrained decoding: a reply held to a JSON schema (or to any JSON object) by a mask over the next token.

`Grammar.json_schema(tokenizer, schema)` compiles a request's grammar once (a 400-worthy `GrammarError` when the
schema is invalid); each reply decoding under it takes its own `Constraint` (`grammar.start()`), which
`mllm.generation.Sequence.sample` asks for the tokens allowed next (`mask`) and tells each token sampled
(`advance`). The mask is applied to the logits before sampling, so it works the same on every decode backend and
for each reply of a batch, each with its own grammar.

The engine is llguidance: measured on the default model (SmolLM2's 49k-token vocabulary, llama.cpp, a 12.3 ms
decode step on 2 cores) by `scripts/bench_grammar.py`, its mask and advance cost 0.11 ms a token (0.9% of a step)
and a schema compiles in 4 ms, against xgrammar's 0.19 ms (1.5%) and 153 ms, and outlines-core's 0.68 ms (5.6%)
and 491 ms (its regex index is built over the whole vocabulary for each schema).
"""

from __future__ import annotations

import json
import weakref

import llguidance
import llguidance.hf
import numpy as np
import torch
from jsonschema import Draft202012Validator, SchemaError

from mllm.errors import GrammarError

# JSON as compact as `json.dumps` writes it: no free whitespace, which a small model would otherwise fill with
# newlines up to its token budget.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# `json_object` (OpenAI): any JSON object.
ANY_OBJECT = {"type": "object"}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer, stop_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (~1 s to build: once per tokenizer)."""
    key = (tuple(stop_token_ids),)
    cached = _tokenizers.setdefault(tokenizer, {})
    if key not in cached:
        cached[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(stop_token_ids))
    return cached[key]


class Grammar:
    """A compiled grammar for one request; `start()` gives each reply its own matcher state."""

    def __init__(self, tokenizer, stop_token_ids: list[int], grammar: str):
        self.tokenizer = _ll_tokenizer(tokenizer, stop_token_ids)
        self.vocab = len(tokenizer)
        self.grammar = grammar
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"the schema cannot be used to constrain the reply: {error}")

    @classmethod
    def json_schema(cls, tokenizer, stop_token_ids: list[int], schema: dict, strict: bool = True) -> Grammar:
        """Replies that are JSON documents valid against `schema` (a JSON Schema, draft 2020-12). `strict`: a
        keyword the engine cannot enforce is an error; else it is ignored (the reply is then only checked for
        what the engine can enforce)."""
        if not isinstance(schema, dict):
            raise GrammarError(f"the schema must be a JSON object, not {type(schema).__name__}")
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(the top level)"
            raise GrammarError(f"the schema is not a valid JSON Schema at {where}: {e.message}") from None
        options = {**JSON_OPTIONS, "lenient": not strict}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        return cls(tokenizer, stop_token_ids, grammar)

    @classmethod
    def json_object(cls, tokenizer, stop_token_ids: list[int]) -> Grammar:
        return cls.json_schema(tokenizer, stop_token_ids, ANY_OBJECT)

    def start(self) -> Constraint:
        return Constraint(llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0), self.vocab)


class Constraint:
    """One reply's place in its grammar: the tokens allowed next, and each token sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing may follow but the end of the reply."""
        return self.matcher.is_stopped()

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` (1, V) with every token the grammar does not allow next set to -inf (in place)."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # little-endian 32-bit words
        allowed = torch.from_numpy(np.unpackbits(words, bitorder="little")[: self.vocab].astype(bool))  # (V_tok,)
        if not allowed.any():  # a dead end (or a resource limit hit): nothing could be sampled
            raise GrammarError(f"the grammar allows no next token: {self.matcher.get_error() or 'a dead end'}")
        width = min(self.vocab, scores.shape[-1])
        scores[0, :width].masked_fill_(~allowed[:width].to(scores.device, non_blocking=True), float("-inf"))
        scores[0, width:] = float("-inf")  # rows past the tokenizer's vocabulary (padding) are never text
        return scores

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")
