"""The field's scorers, reproduced from their official definitions: VQAv2, POPE and MME.

- VQAv2: `normalize_answer` and `vqa_accuracy` follow the official evaluation script (`vqaEval.py` of
  GT-Vision-Lab/VQA, PythonEvaluationTools): its punctuation rules (a digit-comma-digit anywhere in the answer
  removes every punctuation mark instead of spacing it; `'`, `:`, `%`, `#` are not punctuation there), its
  period rule (a period not followed by a digit goes, at most 32 of them: the script passes `re.UNICODE` as the
  count), its number words (`none` -> `0` ... `ten` -> `10`), articles and contraction map; normalisation
  happens only when the 10 reference answers are not all the same, and then the references get the
  punctuation pass only. Accuracy is the mean over the 10 leave-one-out subsets of min(1, matches / 3).
- POPE: LLaVA's `eval_pope.py`: the answer's first sentence (up to the first period), commas dropped, split on
  spaces; `No`, `no` or `not` among the words means "no", anything else "yes". Accuracy, precision, recall, F1
  and the yes-ratio of the predictions, "yes" the positive class, per split (`category`).
- MME: the benchmark's `calculation.py`: answers lowercased, "yes" / "no" exactly or in their first four
  characters (else "other"); per subtask accuracy and accuracy+ (both questions of an image right), the score
  100 * (acc + acc+), and the perception (10 subtasks) and cognition (4 subtasks) sums.
"""

from __future__ import annotations

import re
from collections import defaultdict

# ---- VQAv2 ------------------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern, typo included: "(?!<=\d)" is a negative lookahead, so only "a period not followed by a
# digit" is tested; and `sub(..., re.UNICODE)` makes that a count of 32.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # 32


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: each mark next to a space (or anywhere, when a digit-comma-digit occurs
    in the text) is removed, otherwise replaced by a space; then periods not before a digit go."""
    out = text
    comma_digit = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or comma_digit:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words to digits, articles dropped, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """An answer as the official VQAv2 script compares it (when the references disagree): whitespace, then
    `process_punctuation`, then `process_digit_article`."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 accuracy of one answer against its (10) human answers, in [0, 1]: for each reference left out in
    turn, min(1, matches among the others / 3), averaged. As the official script: the answer is normalised and
    the references get the punctuation pass only if they are not all the same."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    prediction = _clean(prediction)  # the script cleans the answer's whitespace, never the references'
    if len(set(references)) > 1:
        references = [process_punctuation(r) for r in references]
        prediction = normalize_answer(prediction)
    scores = []
    for left_out in range(len(references)):
        others = references[:left_out] + references[left_out + 1 :]
        scores.append(min(1.0, sum(r == prediction for r in others) / 3))
    return sum(scores) / len(scores)


def vqa_scores(items: list[tuple[str, list[str], str]]) -> dict:
    """(prediction, references, answer_type) per question -> overall and per answer-type accuracy in percent,
    rounded to 2 places as the official script reports them."""
    per_type: dict[str, list[float]] = defaultdict(list)
    every = []
    for prediction, references, answer_type in items:
        acc = vqa_accuracy(prediction, references)
        every.append(acc)
        per_type[answer_type].append(acc)
    overall = round(100 * sum(every) / len(every), 2) if every else 0.0
    return {
        "questions": len(every),
        "overall": overall,
        "per_answer_type": {k: round(100 * sum(v) / len(v), 2) for k, v in sorted(per_type.items())},
    }


# ---- POPE -------------------------------------------------------------------------------------------
def pope_answer(text: str) -> str:
    """LLaVA's POPE parsing: "no" if `No`, `no` or `not` is a word of the first sentence, else "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of parsed predictions ("yes" / "no") against labels; a label
    other than "no" counts as yes, as in LLaVA's script. Undefined ratios (no positives) are 0."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"POPE needs one label per prediction, got {len(predictions)} and {len(labels)}")
    pred = [0 if p == "no" else 1 for p in predictions]
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(gold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": (tp + tn) / len(gold),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(pred) / len(pred),
    }  # fmt: skip


def pope_scores(items: list[tuple[str, str, str]]) -> dict:
    """(answer text, label, category) per question -> metrics per category (random / popular / adversarial)."""
    by_category: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for text, label, category in items:
        by_category[category][0].append(pope_answer(text))
        by_category[category][1].append(label.strip().lower())
    return {category: pope_metrics(*pair) for category, pair in sorted(by_category.items())}


# ---- MME --------------------------------------------------------------------------------------------
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(text: str) -> str:
    """MME's parsing: "yes" / "no" exactly, else whichever of them is in the first four characters, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_scores(items: list[tuple[str, str, str, str]]) -> dict:
    """(answer text, gold "yes"/"no", subtask, image) per question -> per subtask accuracy, accuracy+ and score
    (100 * (acc + acc+)), and the perception / cognition totals over the subtasks present."""
    subtasks: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for text, gold, subtask, image in items:
        subtasks[subtask][image].append(mme_answer(text) == gold.strip().lower())
    out = {}
    for subtask, images in sorted(subtasks.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        out[subtask] = {"questions": len(answers), "accuracy": 100 * acc, "accuracy_plus": 100 * acc_plus,
                        "score": 100 * (acc + acc_plus)}  # fmt: skip
    return {
        "subtasks": out,
        "perception": sum(v["score"] for k, v in out.items() if k in MME_PERCEPTION),
        "cognition": sum(v["score"] for k, v in out.items() if k in MME_COGNITION),
    }
