"""Behaviour checks for the shapes world: determinism, splits, answer/scene consistency, rendering, format."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import synth, synth_language, synth_scene

SPLITS = ("train", "val", "test")


def _scenes(n: int, seed: int = 0, **knobs):
    """(scene, caption, qas) triples drawn the way write_dataset does, without rendering."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 100_003 + i)
        scene = synth_scene.make_scene(rng, **knobs)
        cap = synth_language.caption(scene, rng)
        out.append((scene, cap, synth_language.questions(scene, rng, caption_text=cap)))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.json"))}


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    synth.write_dataset(root, 200, seed=0)
    return root


def _rows(root: Path, suffix: str = "") -> dict[str, list[dict]]:
    return {name: json.loads((root / f"{name}{suffix}.json").read_text()) for name in SPLITS}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    synth.write_dataset(a, 24, seed=3)
    synth.write_dataset(b, 24, seed=3)
    synth.write_dataset(c, 24, seed=4)
    assert _files(a) == _files(b)
    pa, pb = _pixels(a), _pixels(b)
    assert pa.keys() == pb.keys() and len(pa) == 24
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert _files(a) != _files(c)
    assert not any(np.array_equal(x, y) for x, y in zip(pa.values(), _pixels(c).values()))


def test_splits_are_disjoint_complete_and_stable(dataset, tmp_path):
    ids = {name: {r["id"] for r in rows} for name, rows in _rows(dataset).items()}
    assert sum(len(s) for s in ids.values()) == 200 == len(set().union(*ids.values()))
    for suffix in ("_captions", "_qa"):
        for name, rows in _rows(dataset, suffix).items():
            assert {r["image"].removesuffix(".png") for r in rows} <= ids[name]
    # Stable: a smaller dataset with the same seed puts each image in the same split.
    synth.write_dataset(tmp_path, 30, seed=0)
    for name, rows in _rows(tmp_path).items():
        assert {r["id"] for r in rows} <= ids[name]


def test_split_shares_follow_the_request():
    shares = (("train", 0.8), ("val", 0.1), ("test", 0.1))
    counts = Counter(synth.split_of(5, i, shares) for i in range(5000))
    assert abs(counts["train"] / 5000 - 0.8) < 0.03
    assert abs(counts["val"] / 5000 - 0.1) < 0.02 and abs(counts["test"] / 5000 - 0.1) < 0.02


@pytest.mark.parametrize("splits", [(("train", 0.5), ("val", 0.1)), (("a", 0.5), ("a", 0.5)), ()])
def test_bad_splits_raise(tmp_path, splits):
    with pytest.raises(ValueError):
        synth.write_dataset(tmp_path, 2, seed=0, splits=splits)


def test_scene_layout_is_unambiguous():
    for scene, _, _ in _scenes(400, max_objects=5):
        objs = scene.objects
        assert 1 <= len(objs) <= 5
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        assert len({o.position for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            x0, y0, x1, y1 = a.bbox
            assert 0 < x0 and 0 < y0 and x1 < synth_scene.CANVAS and y1 < synth_scene.CANVAS
            # The centre sits well away from the thirds borders, so its position word is clear.
            for v in (a.cx, a.cy):
                assert (
                    min(abs(v - b) for b in (0, synth_scene.CANVAS / 3, 2 * synth_scene.CANVAS / 3, synth_scene.CANVAS))
                    > 20
                )
            for b in objs[i + 1 :]:
                bx0, by0, bx1, by1 = b.bbox
                assert x1 < bx0 or bx1 < x0 or y1 < by0 or by1 < y0, f"{a} overlaps {b}"


def test_object_count_knobs():
    assert all(len(s.objects) == 5 for s, _, _ in _scenes(30, min_objects=5, max_objects=5))
    assert {len(s.objects) for s, _, _ in _scenes(200, min_objects=2, max_objects=3)} == {2, 3}
    for knobs in ({"min_objects": 0}, {"max_objects": 6}, {"min_objects": 3, "max_objects": 2}):
        with pytest.raises(ValueError):
            synth_scene.make_scene(random.Random(0), **knobs)


def _expected_position(o) -> str:
    third = synth_scene.CANVAS / 3
    return f"{('top', 'middle', 'bottom')[int(o.cy // third)]} {('left', 'center', 'right')[int(o.cx // third)]}"


def test_every_answer_matches_the_scene():
    exists = Counter()
    for scene, cap, qas in _scenes(500):
        objs = scene.objects
        assert 1 <= len(qas) <= 4
        assert len({(q.type, tuple(q.params.items())) for q in qas}) == len(qas)
        for q in qas:
            p = q.params
            if q.type == "color":
                matches = [o for o in objs if o.shape == p["shape"]]
                assert len(matches) == 1 and q.answer == matches[0].color
            elif q.type == "shape":
                matches = [o for o in objs if o.color == p["color"]]
                assert len(matches) == 1 and q.answer == matches[0].shape
            elif q.type == "count":
                recount = sum(all(getattr(o, k) == v for k, v in p.items()) for o in objs)
                assert q.answer == str(recount)
            elif q.type == "position":
                (o,) = [o for o in objs if (o.color, o.shape) == (p["color"], p["shape"])]
                assert q.answer == _expected_position(o)
            elif q.type == "exists":
                present = any((o.color, o.shape) == (p["color"], p["shape"]) for o in objs)
                assert q.answer == ("yes" if present else "no")
                exists[q.answer] += 1
            else:
                assert q.type == "describe" and q.answer == cap
            for word in p.values():  # the question names what it asks about
                assert word in q.question or synth_language.PLURALS[word] in q.question
        for o in objs:
            assert f"{o.size} {o.color} {o.shape} at the {o.position}" in cap
    assert 0.35 < exists["no"] / exists.total() < 0.65


def test_count_answers_are_digits_and_include_zero():
    answers = [q.answer for _, _, qas in _scenes(300) for q in qas if q.type == "count"]
    assert all(a.isdigit() for a in answers) and "0" in answers


def test_render_size_mode_and_centre_colour():
    for scene, _, _ in _scenes(60, max_objects=5):
        img = synth_scene.render(scene)
        assert img.size == (224, 224) and img.mode == "RGB"
        for o in scene.objects:
            assert img.getpixel((o.cx, o.cy)) == synth_scene.COLORS[o.color], o


def test_written_images_are_224_rgb(dataset):
    for path in sorted((dataset / "images").glob("*.png"))[:20]:
        with Image.open(path) as img:
            assert img.size == (224, 224) and img.mode == "RGB"


def test_conversation_format_and_placeholders(dataset):
    for rows in _rows(dataset).values():
        for row in rows:
            conv = row["conversations"]
            assert (dataset / "images" / row["image"]).is_file()
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert [(q["question"], q["answer"]) for q in row["qa"]] == [
                (h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(conv[::2], conv[1::2])
            ]
    for rows in _rows(dataset, "_captions").values():
        for row in rows:
            human, gpt = row["conversations"]
            assert human == {"from": "human", "value": "<image>"} and gpt["from"] == "gpt" and gpt["value"]
    for rows in _rows(dataset, "_qa").values():
        for row in rows:
            human, gpt = row["conversations"]
            assert row["id"].startswith(row["image"].removesuffix(".png") + "_q")
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert row["type"] in synth_language.QUESTION_TYPES and gpt["value"]


def test_all_question_types_appear_in_200_images(dataset):
    types = Counter(row["type"] for rows in _rows(dataset, "_qa").values() for row in rows)
    assert set(types) == set(synth_language.QUESTION_TYPES)


def test_main_prints_a_summary(tmp_path, capsys):
    assert synth.main([str(tmp_path), "--n", "6", "--seed", "2", "--max-objects", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("wrote 6 images") and "\n" not in out
    assert len(list((tmp_path / "images").glob("*.png"))) == 6
