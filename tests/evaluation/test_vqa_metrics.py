"""VQA accuracy and GQA exact match: hand-worked rules, and numbers from the official VQA evaluation script."""

import json
from pathlib import Path

import pytest

from magma_hf.evaluation.vqa_metrics import (
    aggregate_accuracy,
    gqa_accuracy,
    most_common_answer,
    normalize_answer,
    normalize_punctuation,
    normalize_words,
    vqa_accuracy,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("t-shirt", "t shirt"),  # a mark with no space beside it becomes a space
        ("wood / metal", "wood  metal"),  # beside a space it is dropped
        ("yes !", "yes "),
        ("yes, it is", "yes it is"),  # "," beside a space: dropped
        ("red,white", "red white"),
        ("1,000", "1000"),  # a comma between digits drops every mark of the answer...
        ("1,000-ish (about)", "1000ish about"),  # ...not only the comma
        ('"blue"', " blue "),
        ("2.5", "2.5"),  # a full stop before a digit stays
        ("yes.", "yes"),
        ("mr. smith.", "mr smith"),
        ("don't", "don't"),  # apostrophes, colons, $, % are not in the list
        ("3:00", "3:00"),
        ("$5", "$5"),
        ("." * 40 + "x", "." * 8 + "x"),  # at most 32 full stops dropped, as the official call does
    ],
)
def test_punctuation_rules(text, expected):
    assert normalize_punctuation(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two Dogs", "2 dogs"),  # lower case, number words
        ("none", "0"),
        ("zero or ten", "0 or 10"),
        ("eleven", "eleven"),  # only zero..ten (and none) are mapped
        ("a dog", "dog"),  # articles
        ("The cat and an apple", "cat and apple"),
        ("dont know", "don't know"),  # contractions restored
        ("its 3 oclock", "its 3 o'clock"),  # "its" is not in the table
        ("Im here", "im here"),  # the table's "Im" never matches: words are lower-cased first
        ("somebody'd", "somebodyd"),  # the official table maps it so
        ("  red \t  car  ", "red car"),  # whitespace collapsed
    ],
)
def test_word_rules(text, expected):
    assert normalize_words(text) == expected


def test_normalize_answer_combines_the_rules():
    assert normalize_answer("  The T-Shirt!\n") == "t shirt"
    assert normalize_answer("Two dogs.") == "2 dogs"


@pytest.mark.parametrize(
    "matches, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_average(matches, expected):
    # n matching among ten: (n * min(1, (n-1)/3) + (10-n) * min(1, n/3)) / 10
    answers = ["red"] * matches + ["blue"] * (10 - matches)
    if matches == 10:
        answers[0] = "Red"  # keep the answers different, else nothing is normalised
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_identical_answers_are_compared_unnormalised():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 9 + ["two"]) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is always cleaned


def test_answer_dicts_and_other_counts():
    answers = [{"answer": "cat", "answer_confidence": "yes", "answer_id": i} for i in range(5)]
    answers += [{"answer": "dog", "answer_confidence": "yes", "answer_id": i} for i in range(5, 10)]
    assert vqa_accuracy("a cat", answers) == 1.0
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5 * (0 + 1 / 3))
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("cat", [])
    with pytest.raises(ValueError, match="'answer' key"):
        vqa_accuracy("cat", [{"text": "cat"}])


def test_gqa_exact_match_after_normalisation():
    assert gqa_accuracy("The Table.", "table") == 1.0
    assert gqa_accuracy("two", "2") == 1.0  # always normalised: there is one answer
    assert gqa_accuracy("left side", "left") == 0.0
    assert gqa_accuracy("yes", ["yes"]) == 1.0
    with pytest.raises(ValueError, match="one reference answer"):
        gqa_accuracy("yes", ["yes", "no"])


def test_most_common_answer():
    assert most_common_answer(["no", "yes", "yes", "no", "maybe"]) == "no"  # first of equals
    assert most_common_answer([{"answer": "2"}, {"answer": "two"}, {"answer": "two"}]) == "two"


def test_matches_the_official_vqa_evaluation():
    cases = json.loads((FIXTURES / "vqa_cases.json").read_text())
    official = json.loads((FIXTURES / "vqa_official_scores.json").read_text())
    scores = [vqa_accuracy(case["prediction"], case["answers"]) for case in cases]
    for case, score in zip(cases, scores):
        # The official script stores per-question percentages rounded to 2 decimals.
        assert round(100 * score, 2) == official["evalQA"][str(case["question_id"])], case
    aggregate = aggregate_accuracy(
        scores,
        {
            "answer_type": [case["answer_type"] for case in cases],
            "question_type": [case["question_type"] for case in cases],
        },
    )
    assert round(aggregate["accuracy"], 2) == official["overall"]
    assert {k: round(v, 2) for k, v in aggregate["accuracy_per_answer_type"].items()} == official["perAnswerType"]
    assert {k: round(v, 2) for k, v in aggregate["accuracy_per_question_type"].items()} == official["perQuestionType"]
