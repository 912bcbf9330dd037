"""Grammar overhead: what holding a reply to a JSON schema costs per token, for each constrained-decoding library.

Loads the default model (its decode backend: llama.cpp on a CPU), decodes a JSON reply under a schema with
llguidance (mllm's engine, `mllm.constrained`) and times the decode step alone; then replays the same tokens
through each library's matcher, timing what it adds to a step (the mask of the next allowed tokens, applying it
to the logits, and advancing by the sampled token), and its compile time for the schema. Prints one line per
library: compile ms, mask+advance ms per token, and that as a share of a decode step. xgrammar and outlines-core
are only compared here (`pip install xgrammar outlines-core`); a missing one is skipped with a line saying so.

    .venv/bin/python scripts/bench_grammar.py [--tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from mllm.constrained import Grammar
from mllm.generation import GenerationConfig, Reply
from mllm.loading import load_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 5},
        "pet": {
            "type": "object",
            "properties": {"kind": {"type": "string"}, "legs": {"type": "integer"}},
            "required": ["kind", "legs"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "colors", "pet"],
    "additionalProperties": False,
}


def llguidance_run(tokenizer, stops, tokens, vocab):
    start = time.perf_counter()
    constraint = Grammar.json_schema(tokenizer, stops, SCHEMA).start()
    compiled = time.perf_counter() - start
    scores = torch.zeros(1, vocab)
    start = time.perf_counter()
    for token in tokens:
        constraint.mask(scores)
        constraint.advance(token)
    return compiled, (time.perf_counter() - start) / len(tokens)


def xgrammar_run(tokenizer, stops, tokens, vocab):
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=stops)
    compiled_grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled_grammar)
    compiled = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    scores = torch.zeros(1, vocab)
    start = time.perf_counter()
    for token in tokens:
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(scores, bitmask)
        assert matcher.accept_token(token), token
    return compiled, (time.perf_counter() - start) / len(tokens)


def outlines_run(tokenizer, stops, tokens, vocab):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    start = time.perf_counter()
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    table: dict[bytes, list[int]] = {}
    for text, index in tokenizer.get_vocab().items():
        if index in stops or index in tokenizer.all_special_ids:
            continue
        raw = bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else text.encode()
        table.setdefault(raw, []).append(index)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ ]?"), Vocabulary(stops[0], table))
    guide = Guide(index)
    compiled = time.perf_counter() - start
    scores = torch.zeros(1, vocab)
    start = time.perf_counter()
    for token in tokens:
        allowed = torch.tensor(guide.get_tokens())
        mask = torch.ones(vocab, dtype=torch.bool)
        mask[allowed] = False
        scores[0].masked_fill_(mask, float("-inf"))
        guide.advance(token)
    return compiled, (time.perf_counter() - start) / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("default")
    processor = model.processor
    stops = list(processor.stop_token_ids)
    prompt = [{"role": "user", "content": "Describe a person called Ann and her pet as JSON."}]
    encoded = processor.encode(prompt, None, add_generation_prompt=True, labels=False)
    grammar = Grammar.json_schema(processor.tokenizer, stops, SCHEMA)

    def decode(constrained: bool) -> tuple[list[int], float]:
        gen = GenerationConfig(
            max_new_tokens=args.tokens, constraint=grammar if constrained else None, ignore_eos=not constrained
        )
        reply = Reply(model, encoded.input_ids, gen)
        next(piece for piece in reply if piece)  # the prompt's prefill and the first token: not timed
        first, start = len(reply.ids), time.perf_counter()
        "".join(reply)
        return reply.ids, (time.perf_counter() - start) / max(1, len(reply.ids) - first)

    tokens, _ = decode(True)
    # The same number of tokens unconstrained (a free reply runs to the budget: ignore_eos).
    args.tokens = len(tokens)
    json.loads(processor.decode(tokens))  # the reply is the schema's JSON
    plain = statistics.median(decode(False)[1] for _ in range(args.repeats))
    constrained = statistics.median(decode(True)[1] for _ in range(args.repeats))
    print(f"backend {model.backend.name}; {len(tokens)} tokens of JSON: {processor.decode(tokens)[:120]}...")
    print(
        f"decode step {plain * 1e3:.2f} ms; with llguidance in the loop {constrained * 1e3:.2f} ms "
        f"(+{(constrained / plain - 1) * 100:.1f}%)"
    )
    vocab = len(processor.tokenizer)
    for name, run in (("llguidance", llguidance_run), ("xgrammar", xgrammar_run), ("outlines-core", outlines_run)):
        try:
            runs = [run(processor.tokenizer, stops, tokens, vocab) for _ in range(args.repeats)]
        except ImportError:  # the two compared against are not mllm's dependencies
            print(f"{name:14s} not installed: .venv/bin/pip install {name} to compare it")
            continue
        compiled = statistics.median(r[0] for r in runs)
        per_token = statistics.median(r[1] for r in runs)
        print(
            f"{name:14s} compile {compiled * 1e3:8.1f} ms   mask+advance {per_token * 1e3:6.3f} ms/token "
            f"= {per_token / plain * 100:5.1f}% of a decode step"
        )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
