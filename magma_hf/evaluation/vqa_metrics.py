"""VQA accuracy as the official VQA evaluation defines it, and GQA exact match after the same normalisation.

The rules follow GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py` (commit a013f00), written anew
here. For one question with human answers `gt_1 .. gt_n` (n = 10 in VQA v2 and OK-VQA) and a predicted answer:

1. Newlines and tabs become spaces; leading and trailing whitespace is stripped (answers and prediction).
2. Only when the human answers are not all the same string, every answer and the prediction are normalised:
   punctuation (`normalize_punctuation`), then lower case, number words to digits, articles dropped and contractions
   restored (`normalize_words`). When all human answers agree, the comparison is on the stripped strings as they are
   (the official script does this; e.g. "Yes" scores 0 against ten "yes").
3. The score is `min(1, matches / 3)` over the other n - 1 answers, averaged over the n leave-one-out subsets.

Reported accuracies are percentages of the mean score, as the official script reports them (it also rounds to two
decimals; the values here are not rounded).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

# Replaced by a space, or dropped when the answer has it next to a space or has a comma between digits ("1,000").
# Apostrophes, colons, '#', '$', '%', '&', '*' and the like are left alone: they are not in the official list.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A full stop not followed by a digit is dropped ("2.5" keeps its point). The official call passes `re.UNICODE` (32)
# where `re.sub` takes its count, so at most 32 full stops are dropped per answer; kept for identical scores.
_FULL_STOP = re.compile(r"\.(?!\d)")
_MAX_FULL_STOPS_DROPPED = 32

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# Words written without their apostrophe, mapped to the contraction (the official table, entry for entry; its
# capitalised keys such as "Im" never match because words are lower-cased first, and "somebody'd" really does map
# to "somebodyd" there).
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
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip


def clean_whitespace(text: str) -> str:
    """Step 1: newlines and tabs to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_punctuation(text: str) -> str:
    """Punctuation marks become spaces, or vanish where the text has them beside a space or a comma inside a number.

    Each mark is judged on the text as given (not on the text as the other marks left it). Then every full stop not
    followed by a digit is dropped.
    """
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        beside_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if (drop_all or beside_space) else " ")
    return _FULL_STOP.sub("", out, count=_MAX_FULL_STOPS_DROPPED)


def normalize_words(text: str) -> str:
    """Lower case, split on whitespace, number words to digits, drop articles, restore contractions, join by spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The full normalisation of an answer: whitespace, punctuation, then words."""
    return normalize_words(normalize_punctuation(clean_whitespace(text)))


def answer_strings(answers: str | Sequence[str] | Sequence[Mapping]) -> list[str]:
    """Human answers as strings: a string, a list of strings, or VQA's list of `{"answer": ...}` dicts."""
    if isinstance(answers, str):
        return [answers]
    strings = []
    for answer in answers:
        if isinstance(answer, Mapping):
            if "answer" not in answer:
                raise ValueError(f"An answer dict has no 'answer' key (keys: {sorted(answer)})")
            answer = answer["answer"]
        if not isinstance(answer, str):
            raise TypeError(f"Answers must be strings or {{'answer': str}} dicts, got {type(answer).__name__}")
        strings.append(answer)
    return strings


def vqa_accuracy(prediction: str, answers: str | Sequence[str] | Sequence[Mapping]) -> float:
    """The official VQA score of one prediction, in [0, 1].

    Args:
        prediction: the model's answer.
        answers: the human answers (ten in VQA v2 / OK-VQA; any non-empty number works), as strings or
            `{"answer": ...}` dicts.
    """
    human = [clean_whitespace(answer) for answer in answer_strings(answers)]
    if not human:
        raise ValueError("vqa_accuracy needs at least one human answer")
    prediction = clean_whitespace(prediction)
    if len(set(human)) > 1:
        human = [normalize_words(normalize_punctuation(answer)) for answer in human]
        prediction = normalize_words(normalize_punctuation(prediction))
    matches = sum(answer == prediction for answer in human)
    # Leaving out answer i leaves `matches - [answer i matches]` matching answers among the others.
    return sum(min(1.0, (matches - (answer == prediction)) / 3) for answer in human) / len(human)


def gqa_accuracy(prediction: str, answer: str | Sequence[str] | Sequence[Mapping]) -> float:
    """GQA: 1.0 when the prediction equals the one reference answer after `normalize_answer`, else 0.0."""
    references = answer_strings(answer)
    if len(references) != 1:
        raise ValueError(f"GQA has one reference answer per question, got {len(references)}: {references!r}")
    return float(normalize_answer(prediction) == normalize_answer(references[0]))


def aggregate_accuracy(
    scores: Iterable[float], groups: Mapping[str, Iterable[str | None]] | None = None
) -> dict[str, float | int | dict[str, float]]:
    """Mean score as a percentage, plus the same per group (e.g. per `answer_type`, as the official script reports).

    Args:
        scores: per-question scores in [0, 1].
        groups: optional `{group_name: per-question labels}` aligned with `scores`; questions labelled None are left
            out of that breakdown.

    Returns:
        `{"accuracy": float, "num_questions": int, "accuracy_per_<group_name>": {label: float}}`.
    """
    scores = list(scores)
    result: dict[str, float | int | dict[str, float]] = {
        "accuracy": 100.0 * sum(scores) / len(scores) if scores else float("nan"),
        "num_questions": len(scores),
    }
    for name, labels in (groups or {}).items():
        labels = list(labels)
        if len(labels) != len(scores):
            raise ValueError(f"{len(labels)} '{name}' labels for {len(scores)} scores")
        per_label: dict[str, list[float]] = defaultdict(list)
        for label, score in zip(labels, scores):
            if label is not None:
                per_label[str(label)].append(score)
        if per_label:
            result[f"accuracy_per_{name}"] = {
                label: 100.0 * sum(values) / len(values) for label, values in sorted(per_label.items())
            }
    return result


def most_common_answer(answers: str | Sequence[str] | Sequence[Mapping]) -> str:
    """The answer given most often (the first of equals in order), as VQA's `multiple_choice_answer` picks it."""
    strings = [clean_whitespace(answer) for answer in answer_strings(answers)]
    if not strings:
        raise ValueError("No answers to choose from")
    counts = Counter(strings)
    return max(strings, key=lambda answer: counts[answer])


__all__ = [
    "aggregate_accuracy", "answer_strings", "clean_whitespace", "gqa_accuracy", "most_common_answer",
    "normalize_answer", "normalize_punctuation", "normalize_words", "vqa_accuracy",
]  # fmt: skip
