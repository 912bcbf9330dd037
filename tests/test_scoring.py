"""The official scorers (`training.scoring`) on hand-written fixtures with hand-computed results: every rule of
VQAv2's `vqaEval.py`, LLaVA's POPE parsing and metrics, MME's accuracy / accuracy+ and sums."""

from __future__ import annotations

import pytest

from training.evaluate import normalize_answer, vqa_accuracy
from training.scoring import mme_answer, mme_scores, pope_answer, pope_metrics, pope_scores, vqa_scores

# (answer, what the official script compares it as), each worked out by hand from the rules.
NORMALISED = [
    ("Yes", "yes"),                              # lowercase
    ("  two\n", "2"),                            # whitespace, number words
    ("none", "0"),                               # "none" is a number word there
    ("ten", "10"),
    ("eleven", "eleven"),                        # only zero to ten
    ("a dog", "dog"),                            # articles
    ("The Cat", "cat"),
    ("an apple", "apple"),
    ("dont", "don't"),                           # contraction map
    ("isnt it", "isn't it"),
    ("whats that", "what's that"),
    ("oclock", "o'clock"),
    ("yall", "y'all"),
    ("Im", "im"),                                # the map's capitalised keys never match lowercased words
    ("cat's", "cat's"),                          # an apostrophe is not punctuation there
    ("5:30", "5:30"),                            # nor a colon
    ("100%", "100%"),                            # nor a percent sign
    ("#1", "#1"),                                # nor a hash
    ("10,000", "10000"),                         # digit-comma-digit: marks are removed, not spaced
    ("1,000 people, maybe", "1000 people maybe"),  # ... every mark, once such a comma occurs
    ("red,blue", "red blue"),                    # no digit comma, no adjacent space: the mark becomes a space
    ("red, blue", "red blue"),                   # next to a space: removed
    ("black/white", "black white"),
    ("black / white", "black white"),
    ("t-shirt", "t shirt"),
    ("well-done!", "well done"),
    ("yes!", "yes"),                             # at the end: "!" becomes a space, stripped by the split
    ("(yes)", "yes"),
    ('"stop"', "stop"),
    ("a.m.", "am"),                              # periods not before a digit go
    ("3.5", "3.5"),                              # a decimal point stays
    ("yes.", "yes"),
    ("St. Louis", "st louis"),
    ("2.", "2"),
    ("left;right", "left right"),
    ("x=y", "x y"),
    ("a+b", "b"),                                # "a" and "b" after spacing: the article "a" goes
    ("under_score", "under score"),
    ("<none>", "0"),
    ("@home", "home"),
    ("`tick`", "tick"),
    ("one two three", "1 2 3"),
    ("The one", "1"),
    ("Two dogs.", "2 dogs"),
]  # fmt: skip


@pytest.mark.parametrize("answer, expected", NORMALISED)
def test_normalize_answer_is_the_official_processing(answer, expected):
    assert normalize_answer(answer) == expected


def test_there_are_enough_hand_written_fixtures():
    assert len(NORMALISED) >= 40


# (answer, the 10 human answers, accuracy by hand: mean over leave-one-out of min(1, matches / 3))
ACCURACY = [
    ("yes", ["yes"] * 10, 1.0),
    ("no", ["yes"] * 10, 0.0),
    ("2", ["2"] * 3 + ["3"] * 7, 0.9),           # 3 of the 10 left-outs see only 2 matches: (7 * 1 + 3 * 2/3) / 10
    ("2", ["2"] * 2 + ["3"] * 8, 0.6),           # (8 * 2/3 + 2 * 1/3) / 10
    ("2", ["2"] + ["3"] * 9, 0.3),               # (9 * 1/3 + 0) / 10
    ("2", ["2"] * 4 + ["3"] * 6, 1.0),
    ("two", ["2"] * 4 + ["3"] * 6, 1.0),         # references disagree: the answer is normalised
    ("two", ["2"] * 10, 0.0),                    # references agree: nothing is normalised
    ("Yes", ["yes"] * 10, 0.0),                  # ... not even the case
    ("Yes", ["yes"] * 9 + ["no"], 1.0),
    ("  yes \n", ["yes"] * 9 + ["no"], 1.0),
    ("the dog", ["dog"] * 5 + ["cat"] * 5, 1.0),
    ("10,000", ["10000"] * 3 + ["many"] * 7, 0.9),
    ("red, white", ["red white"] * 2 + ["red"] * 8, 0.6),
    ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9),
    ("blue", ["blue?"] * 3 + ["red"] * 7, 0.0),  # references get the punctuation pass only: "blue " (the space
    ("blue", ["blue ?"] * 3 + ["red"] * 7, 0.0),  # a spaced mark leaves) never matches; next to a space it goes,
    ("blue ?", ["blue"] * 3 + ["red"] * 7, 0.9),  # but the space stays, while the answer is split and rejoined
]  # fmt: skip


@pytest.mark.parametrize("prediction, references, expected", ACCURACY)
def test_vqa_accuracy_is_the_official_consensus(prediction, references, expected):
    assert vqa_accuracy(prediction, references) == pytest.approx(expected)


def test_vqa_scores_per_answer_type_in_percent():
    items = [("yes", ["yes"] * 10, "yes/no"), ("no", ["yes"] * 10, "yes/no"), ("2", ["2"] * 3 + ["3"] * 7, "number")]
    scores = vqa_scores(items)
    assert scores == {"questions": 3, "overall": 63.33, "per_answer_type": {"number": 90.0, "yes/no": 50.0}}
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("yes", [])


POPE_PARSED = [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is no dog in the image.", "no"),
    ("The dog is not visible.", "no"),
    ("Yes. But no cat.", "yes"),            # only the first sentence counts
    ("Nope", "yes"),                        # "Nope" is not a "no" word
    ("no", "no"),
    ("No", "no"),
    ("NO", "yes"),                          # the words are matched as written
    ("Yes, not sure though", "no"),         # "not" anywhere in the first sentence
    ("I think so", "yes"),
    ("no,", "no"),                          # commas are dropped first
]  # fmt: skip


@pytest.mark.parametrize("text, expected", POPE_PARSED)
def test_pope_parsing_is_llavas(text, expected):
    assert pope_answer(text) == expected


def test_pope_metrics_by_hand():
    # labels:      yes yes yes yes no  no  no  no
    # predictions: yes yes yes no  yes no  no  no  -> TP 3, FN 1, FP 1, TN 3
    metrics = pope_metrics(["yes", "yes", "yes", "no", "yes", "no", "no", "no"], ["yes"] * 4 + ["no"] * 4)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (3, 1, 1, 3)
    assert metrics["accuracy"] == 0.75 and metrics["precision"] == 0.75 and metrics["recall"] == 0.75
    assert metrics["f1"] == pytest.approx(0.75) and metrics["yes_ratio"] == 0.5
    per_split = pope_scores(
        [
            ("Yes.", "yes", "random"),
            ("No.", "no", "random"),
            ("Yes.", "no", "adversarial"),
            ("No", "yes", "adversarial"),
        ]
    )
    assert per_split["random"]["accuracy"] == 1.0 and per_split["adversarial"]["accuracy"] == 0.0
    assert per_split["adversarial"]["precision"] == 0.0 and per_split["adversarial"]["f1"] == 0.0
    with pytest.raises(ValueError, match="one label per prediction"):
        pope_metrics(["yes"], [])


def test_mme_parsing_and_scores_by_hand():
    assert [mme_answer(t) for t in ("Yes", "no", "Yes, it is.", "Not at all", "It is", "nope")] == [
        "yes", "no", "yes", "no", "other", "no",
    ]  # fmt: skip
    items = [
        # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2 -> score 125
        ("Yes", "Yes", "existence", "1.jpg"), ("No", "No", "existence", "1.jpg"),
        ("Yes", "Yes", "existence", "2.jpg"), ("Yes", "No", "existence", "2.jpg"),
        # count: all right -> 200
        ("yes", "yes", "count", "3.jpg"), ("no", "no", "count", "3.jpg"),
        # code_reasoning (cognition): an unparsable answer is wrong -> acc 1/2, acc+ 0 -> 50
        ("Yes", "yes", "code_reasoning", "4.png"), ("maybe", "no", "code_reasoning", "4.png"),
    ]  # fmt: skip
    scores = mme_scores(items)
    assert scores["subtasks"]["existence"] == {"questions": 4, "accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert scores["subtasks"]["count"]["score"] == 200.0 and scores["subtasks"]["code_reasoning"]["score"] == 50.0
    assert scores["perception"] == 325.0 and scores["cognition"] == 50.0
