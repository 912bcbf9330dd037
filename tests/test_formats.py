"""Dataset formats (`training.formats`): LLaMA-Factory ShareGPT rows, OpenAI `messages` with `image_url` parts
(data: URLs and paths) and Hugging Face `datasets` (a `save_to_disk` folder, Parquet) read as the same rows as
their LLaVA original, multi-image rows included; the validator names every bad row in each; `mllm data
convert` round-trips."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from training.data import DataError
from training.formats import convert, detect, load_records, read_rows
from training.synth import write_dataset
from training.validate import validate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """6 shapes rows plus one two-image row (a multi-image row in every format)."""
    files = write_dataset(tmp_path_factory.mktemp("shapes"), 6, seed=0, splits=(("train", 1.0),))
    rows = json.loads(files["train"].read_text())
    first, second = rows[0]["image"], rows[1]["image"]
    rows.append({"id": "two", "image": [first, second], "conversations": [
        {"from": "human", "value": "<image>\nLeft one.\n<image>\nRight one. Same shapes?"},
        {"from": "gpt", "value": "no"}]})  # fmt: skip
    files["train"].write_text(json.dumps(rows))
    return files


def _seen(rows) -> list[tuple]:
    """What training sees of each row: its messages and its images' bytes."""
    return [(r.id if not r.id.startswith(("row ", "line ")) else None, r.messages, [p.read_bytes() for p in r.images])
            for r in rows]  # fmt: skip


def _strip_ids(seen):
    return [(messages, images) for _, messages, images in seen]


@pytest.mark.parametrize("to", ["sharegpt", "openai"])
@pytest.mark.parametrize("embed", [False, True])
def test_a_converted_file_reads_back_as_the_llava_rows(shapes, tmp_path, to, embed):
    target = tmp_path / f"rows.{to}.jsonl"
    n, _ = convert(shapes["train"], target, to, shapes["images"], embed=embed)
    assert n == 7
    # Embedded images (data: URLs) are decoded next to the data file, so no image folder is needed then.
    folder = None if embed else shapes["images"]
    assert load_records(target, folder).format == to  # detected from the rows
    original = read_rows(shapes["train"], shapes["images"])
    assert _seen(read_rows(target, folder)) == _seen(original)
    assert len(original[-1].images) == 2  # the multi-image row made it through, images in order
    back = tmp_path / "back.json"
    convert(target, back, "llava", folder)
    assert _seen(read_rows(back, folder if not embed else tmp_path)) == _seen(original)


def test_openai_rows_as_the_api_takes_them(shapes, tmp_path):
    png = (shapes["images"] / read_rows(shapes["train"], shapes["images"])[0].images[0].name).read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "shapes"}]}]}  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (read,) = read_rows(path, None)
    assert [m["role"] for m in read.messages] == ["system", "user", "assistant"]
    assert read.messages[1]["content"] == "What is this?\n<image>"  # the image in its place in the text
    assert read.images[0].read_bytes() == png and read.images[0].is_relative_to(tmp_path / ".decoded")


@pytest.fixture(scope="module")
def hf_sources(shapes, tmp_path_factory) -> dict[str, Path]:
    """The shapes rows as a `datasets` folder and as Parquet: ShareGPT columns, images as `datasets.Image`."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    sharegpt = root / "rows.jsonl"
    convert(shapes["train"], sharegpt, "sharegpt", shapes["images"])
    rows = [json.loads(line) for line in sharegpt.read_text().splitlines()]
    table = {"id": [r["id"] for r in rows], "messages": [r["messages"] for r in rows],
             "images": [[{"bytes": (shapes["images"] / i).read_bytes(), "path": i} for i in r["images"]] for r in rows]}  # fmt: skip
    dataset = datasets.Dataset.from_dict(table).cast_column("images", datasets.List(datasets.Image()))
    dataset.save_to_disk(root / "saved")
    dataset.to_parquet(root / "rows.parquet")
    return {"saved": root / "saved", "parquet": root / "rows.parquet"}


@pytest.mark.parametrize("source", ["saved", "parquet"])
def test_hugging_face_datasets_read_as_the_llava_rows(shapes, hf_sources, source):
    rows = read_rows(hf_sources[source], None)
    assert _seen(rows) == _seen(read_rows(shapes["train"], shapes["images"]))  # ids, messages, image bytes
    assert all(p.is_relative_to(hf_sources[source].parent / ".decoded") or p.is_relative_to(hf_sources[source] / ".decoded")
               for r in rows for p in r.images)  # fmt: skip


def test_a_dataset_dict_asks_for_one_split(hf_sources, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.load_from_disk(hf_sources["saved"])}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"holds splits \['train'\]; give one split's folder"):
        read_rows(tmp_path / "dict", None)


BAD_SHAREGPT = [
    {"messages": [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "ok"}], "images": ["IMG"]},
    {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
    {"id": "no-msgs", "images": []},
    {"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "ok"}], "images": ["gone.png"]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
    {"messages": [{"role": "user", "content": "<image><image> hi"}, {"role": "assistant", "content": "ok"}], "images": ["IMG"]},
]  # fmt: skip
BAD_OPENAI = [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG"}}]},
                  {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]},
                  {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
                  {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": [{"type": "audio", "data": "x"}]}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]},
]  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (BAD_SHAREGPT, [
            ("line 2", "message 0 has role='bot'; use user, assistant or system"),
            ("no-msgs", "'messages' must be a non-empty list of {'role', 'content'}"),
            ("line 4", "image file 'gone.png' not found under"),
            ("line 5", "an answer (gpt turn) is empty"),
            ("line 6", "2 <image> placeholder(s) but 1 image(s)"),
        ]),
        (BAD_OPENAI, [
            ("line 2", "message 0 part 0: the data: URL's base64 does not decode"),
            ("line 3", "is a web URL; download it and give its path"),
            ("line 4", "message 0 part 0: expected a text or image_url part"),
            ("line 5", "turns must alternate human, gpt, human, ...; turn 0 is assistant"),
        ]),
    ],
    ids=["sharegpt", "openai"],
)  # fmt: skip
def test_the_validator_names_every_bad_row_of_each_format(shapes, tmp_path, rows, expected):
    image = read_rows(shapes["train"], shapes["images"])[0].images[0].name
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r).replace("IMG", image) + "\n" for r in rows))
    report = validate(path, shapes["images"])
    assert report.rows_total == len(rows) and report.rows_bad == len(expected)
    assert [where for where, _ in report.problems] == [where for where, _ in expected]
    for (_, reason), (_, wanted) in zip(report.problems, expected):
        assert wanted in reason
    with pytest.raises(DataError, match="bad row"):  # training refuses the file, too (placeholders: at encoding)
        read_rows(path, shapes["images"])


def test_the_validator_names_bad_rows_in_a_parquet_file(shapes, tmp_path):
    import datasets

    rows = {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                         [{"role": "user", "content": "hi"}, {"role": "narrator", "content": "ok"}]]}  # fmt: skip
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "bad.parquet")
    report = validate(tmp_path / "bad.parquet", None)
    assert report.format == "sharegpt" and report.problems == [
        ("row 1", "message 1 has role='narrator'; use user, assistant or system")
    ]


def test_detection_and_its_errors(tmp_path):
    llava = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    sharegpt = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    openai = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]}  # fmt: skip
    assert [detect([r]) for r in (llava, sharegpt, openai)] == ["llava", "sharegpt", "openai"]
    assert detect([sharegpt, openai]) == "openai"  # string contents are valid OpenAI messages too
    with pytest.raises(DataError, match=r"the rows mix formats \(llava, sharegpt\); give --format"):
        detect([llava, sharegpt])
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(sharegpt) + "\n")
    assert load_records(path, None, "sharegpt").format == "sharegpt"
    with pytest.raises(DataError, match="unknown data format 'alpaca'; use one of llava, sharegpt, openai, hf"):
        load_records(path, None, "alpaca")


def test_mllm_data_convert_command(shapes, tmp_path, capsys):
    from app.cli import main

    assert main(["data", "convert", str(shapes["train"]), str(tmp_path / "o.jsonl"), "--to", "openai",
                 "--image-folder", str(shapes["images"])]) == 0  # fmt: skip
    assert f"wrote 7 openai rows to {tmp_path / 'o.jsonl'}; its image paths resolve under" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    assert main(["data", "convert", str(bad), str(tmp_path / "x.json"), "--to", "llava"]) == 2
    assert "line 1: message 0 has role='bot'" in capsys.readouterr().err
    image = read_rows(shapes["train"], shapes["images"])[0].images[0].name
    two = {"messages": [{"role": "user", "content": "<image><image> hi"}, {"role": "assistant", "content": "ok"}],
           "images": [image]}  # fmt: skip
    bad.write_text(json.dumps(two) + "\n")
    args = [
        "data",
        "convert",
        str(bad),
        str(tmp_path / "x.jsonl"),
        "--to",
        "openai",
        "--image-folder",
        str(shapes["images"]),
    ]
    assert main(args) == 2
    assert "line 1: 2 <image> placeholder(s) but 1 image(s)" in capsys.readouterr().err


def test_openai_rows_in_parquet_read_as_the_llava_rows(shapes, tmp_path):
    """OpenAI rows as a `datasets` table: Arrow gives every part every field (None where absent), dropped on read."""
    import datasets

    convert(shapes["train"], tmp_path / "rows.jsonl", "openai", shapes["images"], embed=True)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    for row in rows:  # one Arrow type per column: every content a list of parts
        for message in row["messages"]:
            if isinstance(message["content"], str):
                message["content"] = [{"type": "text", "text": message["content"]}]
    datasets.Dataset.from_list([{"id": r["id"], "messages": r["messages"]} for r in rows]).to_parquet(
        tmp_path / "o.parquet"
    )
    got = read_rows(tmp_path / "o.parquet", None)
    assert _seen(got) == _seen(read_rows(shapes["train"], shapes["images"]))
