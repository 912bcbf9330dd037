"""ChatEngine on the tiny random model: streaming, cancel, the queue, conversation edits, errors, export."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from app.engine import ChatEngine
from app.scheduling import ChatError, QueueFull
from mllm.generation import GenerationConfig
from training.formats import read_rows

LONG = GenerationConfig(max_new_tokens=40, ignore_eos=True)  # a fixed length: cancel has room to cut it
SHORT = GenerationConfig(max_new_tokens=6)


@pytest.fixture
def engine(tiny_model):
    return ChatEngine(tiny_model, max_concurrency=1, max_queue=1, gen=SHORT)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def test_stream_yields_the_reply_and_records_the_turn(engine, images):
    conv = engine.new_conversation()
    reply = "".join(engine.stream(conv, "what color", images[:1], gen=LONG))
    assert reply
    [turn] = engine.history(conv)
    # The stored reply is the decoded ids, and the stream says the same, a trailing half-formed character included.
    assert (turn.text, turn.images, turn.reply) == ("what color", images[:1], reply)


def test_cancel_stops_between_tokens_and_keeps_the_partial_reply(engine):
    conv = engine.new_conversation()
    stream = engine.stream(conv, "describe the image", gen=LONG)
    first = [next(stream) for _ in range(3)]
    assert engine.cancel(conv)
    assert list(stream) == []  # the decode loop saw the event before the next token
    assert stream.finish_reason == "cancelled"
    assert engine.history(conv)[-1].reply.startswith("".join(first))


def test_cancel_from_another_thread_stops_a_running_generation(engine, tiny_model):
    # Counted, not timed: the 8th decode forward waits until another thread has cancelled, so however loaded the
    # machine, the reply must end at the next check between two tokens, far short of its 400.
    reached, cancelled = threading.Event(), threading.Event()
    forwards: list[int] = []

    def pause_at_the_eighth(*_):
        forwards.append(1)
        if len(forwards) == 8:
            reached.set()
            assert cancelled.wait(30)

    hook = tiny_model.llm.register_forward_hook(pause_at_the_eighth)
    try:
        conv = engine.new_conversation()
        gen = GenerationConfig(max_new_tokens=400, ignore_eos=True)
        stream = engine.stream(conv, "hello", gen=gen)
        pieces: list[str] = []
        worker = threading.Thread(target=lambda: pieces.extend(stream))
        worker.start()
        assert reached.wait(30)  # generating: the prompt and six tokens' forwards done
        assert engine.cancel(conv)
        cancelled.set()
        worker.join(timeout=30)
        assert not worker.is_alive()
    finally:
        hook.remove()
    assert stream.finish_reason == "cancelled"
    assert len(forwards) <= 9 and len(pieces) <= 8, (len(forwards), len(pieces))  # no forward after the cancel
    assert engine.history(conv)[-1].reply.startswith("".join(pieces))  # the partial reply is kept


def test_queue_admits_in_order_reports_positions_and_refuses_past_the_limit(engine):
    first = engine.stream("a", "hello", gen=LONG)
    next(first)  # admitted and generating
    positions: list[int] = []
    second = engine.stream("b", "hello", on_queue=positions.append)
    with pytest.raises(QueueFull, match="busy"):
        engine.stream("c", "hello")
    answers: list[str] = []
    waiter = threading.Thread(target=lambda: answers.append("".join(second)))
    waiter.start()
    _wait_for(lambda: positions)
    time.sleep(0.1)
    assert positions == [1] and not answers  # still waiting behind the first
    list(first)
    waiter.join(timeout=10)
    assert answers and engine.history("b")[0].reply.startswith(answers[0])


def test_cancelled_while_queued_leaves_no_trace(engine):
    first = engine.stream("a", "hello", gen=LONG)
    next(first)
    queued = engine.stream("b", "hello")
    engine.cancel("b")
    assert list(queued) == []
    assert engine.history("b") == []
    first.close()
    assert "".join(engine.stream("b", "hello again"))  # the place in the queue was freed


def test_one_reply_at_a_time_per_conversation(engine):
    conv = engine.new_conversation()
    running = engine.stream(conv, "hello", gen=LONG)
    next(running)
    with pytest.raises(ChatError, match="press Stop first") as err:
        engine.stream(conv, "again")
    assert err.value.code == "busy"
    running.close()


def test_regenerate_undo_edit_clear(engine, images):
    conv = engine.new_conversation()
    "".join(engine.stream(conv, "what color", images[:1]))
    "".join(engine.stream(conv, "how many objects", images[1:]))
    replies = [t.reply for t in engine.history(conv)]
    # Greedy decoding: re-asking after the rollback (KV cache cropped) gives the same answer.
    "".join(engine.regenerate(conv))
    assert [t.reply for t in engine.history(conv)] == replies
    assert engine.undo(conv) == ("how many objects", images[1:])
    assert [t.text for t in engine.history(conv)] == ["what color"]
    "".join(engine.edit_last(conv, "describe the image"))
    [turn] = engine.history(conv)
    assert (turn.text, turn.images) == ("describe the image", images[:1])
    engine.clear(conv)
    assert engine.history(conv) == []
    with pytest.raises(ChatError, match="no message"):
        engine.undo(conv)


def test_bad_image_is_refused_with_its_problem(engine):
    conv = engine.new_conversation()
    with pytest.raises(ChatError, match="not a readable image") as err:
        engine.stream(conv, "what is this", [b"not an image at all"])
    assert err.value.code == "invalid_image"
    assert engine.history(conv) == []


def test_too_many_images_says_the_limit(engine, images):
    conv = engine.new_conversation()
    "".join(engine.stream(conv, "first", [images[0]] * 5))
    with pytest.raises(ChatError, match="at most 8 per conversation") as err:
        engine.stream(conv, "more", [images[1]] * 4)
    assert err.value.code == "too_many_images"
    assert len(engine.history(conv)) == 1


def test_over_long_conversation_says_the_limit_and_offers_a_reset(engine, tiny_model):
    tiny_model.processor.max_length = 64
    conv = engine.new_conversation()
    with pytest.raises(ChatError, match="limit of 64.*reset") as err:
        engine.stream(conv, "hello " * 80)
    assert err.value.code == "context_length_exceeded"
    # The refused message left no trace and the conversation goes on: a reply of real tokens, recorded as its turn.
    assert engine.history(conv) == []
    text = "".join(engine.stream(conv, "hello", gen=GenerationConfig(max_new_tokens=4, ignore_eos=True)))
    assert text
    [turn] = engine.history(conv)
    assert (turn.text, turn.images, turn.reply) == ("hello", [], text)


def test_export_llava_json_round_trips_through_read_rows(engine, images, tmp_path):
    conv = engine.new_conversation()
    replies = ["".join(engine.stream(conv, "what color", images)), "".join(engine.stream(conv, "and now?"))]
    path = engine.export_llava(conv, tmp_path)
    [row] = read_rows(path, image_folder=tmp_path)
    assert [m["content"] for m in row.messages] == ["<image>\n<image>\nwhat color", replies[0], "and now?", replies[1]]
    assert [m["role"] for m in row.messages] == ["user", "assistant", "user", "assistant"]
    assert [Image.open(p).getpixel((0, 0)) for p in row.images] == [im.getpixel((0, 0)) for im in images]


def test_export_of_an_empty_conversation_says_why(engine, tmp_path):
    with pytest.raises(ChatError, match="nothing to export"):
        engine.export_llava(engine.new_conversation(), tmp_path)


def test_complete_is_stateless_and_counts_tokens(engine):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": _png((200, 0, 0))}, {"type": "text", "text": "hi"}]}
    ]
    stream = engine.complete(messages, gen=GenerationConfig(max_new_tokens=5, ignore_eos=True))
    text = "".join(stream)
    assert stream.completion_tokens == 5 and stream.finish_reason == "length" and stream.prompt_tokens > 16
    assert "".join(engine.complete(messages, gen=GenerationConfig(max_new_tokens=5, ignore_eos=True))) == text
    with pytest.raises(ChatError, match="image 1: not a readable image"):
        engine.complete([{"role": "user", "content": [{"type": "image", "image": b"junk"}]}])


def test_info_describes_the_model(engine):
    info = engine.info()
    assert info["vision"].startswith("hf") and info["connector"] == "mlp2x_gelu"
    assert info["quantization"] == "none" and info["device"] == "cpu"
    assert info["parameters"] > 0 and info["weights_bytes"] >= 4 * info["parameters"] // 2


@pytest.mark.slow
def test_the_parameter_count_is_the_architectures_however_the_weights_are_held():
    """SmolLM2-135M's 134.5 M (its embedding tied to the head) plus the tower and connector, whether the LLM's layers
    are in torch in float32, packed int4 (a packed copy of the head), or in llama.cpp outside torch (stored, the
    count would be 33.0 M)."""
    from mllm.loading import load_model

    counts = {}
    for backend, quantization in (("transformers", "none"), ("int4", "int4"), ("auto", None)):
        model = load_model("default", device="cpu", backend=backend, quantization=quantization)
        counts[model.backend.name] = ChatEngine(model, name="default").info()["parameters"]
        if backend == "transformers":
            stored = sum(p.numel() for p in model.parameters())
    assert counts["transformers"] == stored == counts["int4"] == counts["llamacpp"]
    assert 134_000_000 < stored < 145_000_000


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory, tiny_clip_dir):
    """The tiny model with an 8k context, so a 7,000-token prompt fits."""
    import torch

    from mllm.assembly import build_model
    from mllm.config import LLMConfig, MLLMConfig, VisionConfig
    from mllm.tiny import build_llama

    llm_dir = build_llama(tmp_path_factory.mktemp("tiny-llama-8k"), max_position_embeddings=8192)
    torch.manual_seed(0)
    config = MLLMConfig(vision=VisionConfig(kind="hf", path=str(tiny_clip_dir)), llm=LLMConfig(path=str(llm_dir)))
    return build_model(config, device="cpu").eval()


def test_a_long_prefill_never_stalls_a_running_stream(long_context_model):
    """While one request's 7,000-token prompt is prefilled (in chunks), an admitted stream keeps decoding: the
    model thread runs at most 0.1 s of prompt chunks between two decode steps (the README's figure). Counted on
    the model's calls, not timed: with every call taking at least `call_s`, no more than 0.1 / call_s + 1 chunks
    can run back to back, whatever the machine's load (a slower machine only fits fewer)."""
    from mllm.batching import JOB_BUDGET_S

    budget_s = 0.1  # README, Serving: "prefill chunks run between two steps, at most 0.1 s of them"
    assert JOB_BUDGET_S <= budget_s
    model = long_context_model
    engine = ChatEngine(model, max_concurrency=2, max_queue=2)
    call_s = 0.03
    calls: list[str] = []  # "chunk" (a prompt chunk: inputs_embeds) or "step" (a decode step: token ids)

    def record(module, args, kwargs, output):
        calls.append("chunk" if kwargs.get("inputs_embeds") is not None else "step")
        time.sleep(call_s)

    hook = model.llm.register_forward_hook(record, with_kwargs=True)
    try:
        # A budget far past the prefill's length: the stream is still running when the long prompt is done.
        running = engine.complete([{"role": "user", "content": "hello"}], GenerationConfig(4000, ignore_eos=True))
        next(running)  # admitted, its own prompt prefilled, decoding
        calls.clear()
        long_prompt = [{"role": "user", "content": "the circle is red and the square is blue " * 780}]
        long_request = engine.complete(long_prompt, GenerationConfig(2, ignore_eos=True))
        assert 6_500 < long_request.prompt_tokens < 8_000
        first_long_piece = next(long_request)  # returns once the whole prompt is prefilled
        log = list(calls)
        running.close()
        long_request.close()
    finally:
        hook.remove()
    assert first_long_piece is not None
    first, last = log.index("chunk"), len(log) - 1 - log[::-1].index("chunk")
    during = log[first : last + 1]  # from the long prompt's first chunk to its last
    chunks, steps = during.count("chunk"), during.count("step")
    assert chunks >= 6_500 // 128, f"{chunks} prompt chunks: the prompt was not prefilled in chunks"
    longest_run = max(len(run) for run in "".join("c" if c == "chunk" else "s" for c in during).split("s"))
    most = int(budget_s / call_s) + 1
    counts = f"{chunks} chunks, {steps} decode steps, {longest_run} chunks in a row at most"
    assert longest_run <= most, f"the running stream stalled ({counts}; allowed: {most} in a row)"
    assert steps >= (chunks - 1) // most, f"the running stream stalled ({counts})"
