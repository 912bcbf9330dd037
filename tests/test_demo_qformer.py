"""The shipped Q-Former demo variant (mllm/assets/demo-qformer, `--model default-qformer`): BLIP-2's connector
loads by name and answers its world at the README's figure.

The 50 questions are regenerated bit for bit as in tests/test_demo_model.py (the shapes world is a pure
function of (seed, image index)); they are held-out test-split questions for this variant too.
"""

from __future__ import annotations

import pytest

from mllm.loading import BUILTIN
from training.data import read_rows
from training.evaluate import evaluate
from training.synth import write_dataset

pytestmark = pytest.mark.slow

QFORMER_DIR = BUILTIN["default-qformer"]
#: The README's figure for this variant on these 50 questions (its "Demo model" section: 72%, 36 / 50, int4;
#: 74% in full precision; 73.4% on the first 700 test questions), less one question: the two precisions
#: already differ by one near-tie, and another CPU's rounding may flip one more. CI fails below that.
README_TEST_ACCURACY = 0.70


@pytest.fixture(scope="module")
def qformer_model():
    from mllm.loading import load_model

    assert (QFORMER_DIR / "mllm_config.json").is_file(), "the Q-Former demo weights are missing"
    return load_model("default-qformer", device="cpu")  # int4: what a CPU user gets


def test_shipped_qformer_weights_are_small_safetensors():
    files = [p for p in QFORMER_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 40 * 2**20  # Q-Former + adapter + tokenizer, no LLM copy


def test_it_is_blip2s_connector(qformer_model):
    assert qformer_model.config.connector.kind == "qformer"
    assert qformer_model.config.connector.num_query_tokens == 16


def test_fifty_fixed_test_questions(qformer_model, tmp_path):
    paths = write_dataset(tmp_path, n=400, seed=0)
    rows = read_rows(paths["test_qa"], paths["images"])[:50]
    summary, predictions = evaluate(qformer_model, rows, progress=False)
    wrong = [p for p in predictions if not p["ok"]]
    assert summary["accuracy"] >= README_TEST_ACCURACY, wrong
