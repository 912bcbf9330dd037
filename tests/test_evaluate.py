"""Metric functions on hand-made cases."""

from __future__ import annotations

import pytest

from training.evaluate import Scores, markdown_table, normalize_answer


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Red.", "red"),
        ("  The RED circle! ", "red circle"),
        ("three", "3"),
        ("There are 2 objects.", "there are 2 objects"),
        ("top-left", "top left"),
        ("an orange square", "orange square"),
        ("3.5", "3.5"),
        ("Yes, it is.", "yes it is"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_accuracy_per_type_and_overall():
    s = Scores()
    s.add("color", "Red.", "red")
    s.add("color", "blue", "red")
    s.add("count", "three", "3")
    s.add("count", "4", "3")
    summary = s.summary()
    assert summary["questions"] == 4 and summary["accuracy"] == 0.5
    assert summary["per_type"]["color"] == {"accuracy": 0.5, "n": 2}
    assert summary["count"] == {"accuracy": 0.5, "n": 2}


def test_yes_no_precision_recall_f1():
    s = Scores()
    # references: yes yes yes no no; predictions: yes yes no yes no
    for pred, ref in [("Yes.", "yes"), ("yes", "yes"), ("no", "yes"), ("yes", "no"), ("No", "no")]:
        s.add("exists", pred, ref)
    yn = s.summary()["yes_no"]
    assert yn["n"] == 5
    assert yn["accuracy"] == pytest.approx(3 / 5)
    assert yn["precision"] == pytest.approx(2 / 3)
    assert yn["recall"] == pytest.approx(2 / 3)
    assert yn["f1"] == pytest.approx(2 / 3)
    assert yn["yes_ratio"] == pytest.approx(3 / 5)


def test_rambling_yes_no_answer_is_a_no():
    s = Scores()
    s.add("exists", "I think there might be", "yes")
    yn = s.summary()["yes_no"]
    assert yn["recall"] == 0.0 and yn["yes_ratio"] == 0.0


def test_markdown_table_lists_every_type():
    s = Scores()
    s.add("shape", "circle", "circle")
    s.add("exists", "no", "yes")
    table = markdown_table(s.summary(), title="demo")
    assert "| shape | 1 | 100.0% |" in table and "| exists | 1 | 0.0% |" in table
    assert "**overall** | 2 | **50.0%**" in table and "F1" in table
