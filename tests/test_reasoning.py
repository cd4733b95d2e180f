"""The NLG tasks' data formats, splits and answer extraction, on the real mirrored files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reslora.lab.tasks import seeded_parts
from reslora.lab.tasks.reasoning import (ReasoningTask, answer_complete, extract_answer, gsm8k_example, is_correct,
                                    svamp_example)

MIRROR = os.environ.get("DATA_MIRROR")
needs_data = pytest.mark.skipif(not MIRROR, reason="set DATA_MIRROR to the local data mirror (e.g. ../shared/data)")


def task(name, **data):
    data = {"mirror": str(Path(MIRROR).resolve()) if MIRROR else None, "split_seed": 0, "val_samples": 50,
            "max_train_samples": None, "max_test_samples": None, "max_length": 256, "cache_dir": ".cache",
            "allow_unlisted": False, **data}
    return ReasoningTask(OmegaConf.create({"name": name, "max_new_tokens": 8}), OmegaConf.create(data), seed=0)


@pytest.mark.parametrize("text, kind, want", [
    ("so 9 * 2 = 18.\nThe answer is 18.", "number", "18"),
    ("The answer is $1,234.50 dollars", "number", "1234.5"),
    ("The answer is: -7", "number", "-7"),
    ("The answer is 0.25.", "number", "0.25"),
    ("The answer is c.", "choice", "c"),
    ("The answer is (B)", "choice", "b"),
    ("I think 42", "number", None),
    ("The answer is unknown", "number", None),
])
def test_extract_answer(text, kind, want):
    assert extract_answer(text, kind) == want


@pytest.mark.parametrize("text, kind, stops", [
    ("9 * 2 = 18.\nThe answer is 18.\nQuestion: 3 + 4?\nThe answer is 7.", "number", True),
    ("The answer is 18.5\n", "number", True),
    ("The answer is \n\n 1,234.5 apples\nmore", "number", True),
    ("The answer is: -7\n", "number", True),
    ("The answer is c.\nThe answer is d.", "choice", True),
    ("The answer is\n(b)\n", "choice", True),
    ("The answer is unknown\nThe answer is 3", "number", True),
    ("The answer is 18.5", "number", False),  # 18.5 might go on: 18.55
    ("no answer\nat all", "number", False),
])
def test_generation_stops_only_when_the_answer_is_final(text, kind, stops):
    """Generation ends a sequence at the first prefix where answer_complete holds: every such prefix must
    yield the answer the whole text yields."""
    cuts = [i for i in range(len(text) + 1) if answer_complete(text[:i])]
    assert all(extract_answer(text[:i], kind) == extract_answer(text, kind) for i in cuts)
    assert bool(cuts) == stops


def test_is_correct_compares_numbers_with_tolerance_and_letters_exactly():
    assert is_correct("18", "18", "number") and is_correct("18.0", "18", "number")
    assert not is_correct("18.5", "18", "number") and not is_correct(None, "18", "number")
    assert is_correct("c", "c", "choice") and not is_correct("a", "c", "choice")


def test_gsm8k_format_drops_calculator_annotations_and_ends_with_the_answer():
    ex = gsm8k_example({"question": "Q?", "answer": "16 - 3 = <<16-3=13>>13 eggs.\n#### 1,300"})
    assert ex.target == " 16 - 3 = 13 eggs.\nThe answer is 1300." and ex.answer == "1300" and ex.kind == "number"
    assert extract_answer(ex.target, ex.kind) == ex.answer


def test_svamp_format():
    ex = svamp_example({"Body": "Each pack costs 76 dollars.", "Question": "How much?", "Equation": "( 76.0 - 25.0 )",
                        "Answer": 51.0})
    assert ex.prompt == "Question: Each pack costs 76 dollars. How much?\nAnswer:"
    assert ex.target == " ( 76.0 - 25.0 ). The answer is 51." and ex.answer == "51"


@needs_data
@pytest.mark.parametrize("name, sizes", [("gsm8k", (7423, 50, 1319)), ("svamp", (650, 50, 300)),
                                         ("mathqa", (4425, 50, 2985))])
def test_splits_from_the_mirror_are_disjoint_and_fixed(name, sizes):
    splits, note = task(name).examples()
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == sizes
    prompts = {k: {e.prompt for e in v} for k, v in splits.items()}
    assert not prompts["validation"] & prompts["train"]
    if name != "gsm8k":  # GSM8K's official splits repeat a few questions; ours are as published
        assert not prompts["test"] & (prompts["train"] | prompts["validation"])
    again, _ = task(name).examples()
    assert [e.prompt for e in again["validation"]] == [e.prompt for e in splits["validation"]]
    if name != "svamp":  # the shared split helper's order (SVAMP's train is itself a seeded part of one file)
        n_train = sizes[0] + sizes[1]
        assert [e.id for e in splits["validation"]] == list(seeded_parts(n_train, 0, {"validation": 50})["validation"])
    for ex in splits["train"][:50] + splits["test"][:50]:
        assert extract_answer(ex.target, ex.kind) == ex.answer


@needs_data
def test_mathqa_is_lettered_multiple_choice():
    ex = task("mathqa").examples()[0]["test"][1]
    assert "Options: a ) 129 , b ) 130" in ex.prompt and ex.target == " The answer is a." and ex.kind == "choice"


@needs_data
@pytest.mark.parametrize("name", ["hellaswag", "metamathqa"])
def test_tasks_not_in_the_mirror_fail_with_a_clear_message(name):
    with pytest.raises(FileNotFoundError, match="not in the local mirror"):
        task(name).examples()
