"""Evaluation data: questions, answers or captions, and images, from the original MAGMA layout or a 🤗 dataset.

Two sources are read into one `EvalSet`:

- The original layout (`DIR/images/**`, `DIR/image_data/**/*.json`, read by `magma_hf.load_magma_dataset`),
  each json `{"image_path": ..., "captions": [...], "metadata": {...}}`. Question answering reads
  `metadata.question` (str), `metadata.answers` (list of str or of VQA's `{"answer": ...}` dicts: ten for VQA v2 and
  OK-VQA, one for GQA; `metadata.answer` (str) is accepted for GQA), and optionally `metadata.question_id`,
  `metadata.image_id`, `metadata.answer_type`, `metadata.question_type` (per-type accuracies) and
  `metadata.multiple_choice_answer` (the answer shown when the question serves as a few-shot example; default: the
  most common human answer). Captioning reads `captions` (the references) and `metadata.image_id` if present.
- A 🤗 dataset (a `datasets.Dataset`, a `save_to_disk` folder, or anything `load_dataset` takes) with the columns
  `image`, `question`, `answers` (or `answer`), and optionally `question_id`, `image_id`, `answer_type`,
  `question_type`, `multiple_choice_answer`; for captioning `image`, `captions` (or `caption`) and optionally
  `image_id`. Other names are mapped with `columns={"image": "img", "question": "q", ...}`.

For the caption task, webdataset `.tar` and parquet shards (img2dataset's `webdataset` and `parquet` output: a
folder, a glob, a brace range, or a list of shard files) are read where they lie, through
`magma_hf.data.shards.ShardIndex`: the references are each sample's captions (its `.txt`, or the `caption` of its
`.json`; the parquet caption column), the id its `image_id` metadata where it has one, else its key
`<shard>/<key>`; images are read and decoded when their batch is evaluated. Parquet shards take `columns` for
`image` and `captions`.

Examples without an id get their row number (stable only while the data does not change).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from transformers.utils import logging

from ..data import SKIP_EXAMPLES, load_magma_dataset
from ..data.decoding import caption_problem, clean_captions
from ..data.shards import ShardIndex, TarShards, open_shards
from ..data.sources import reads_as_shards
from ..image_processing_magma import open_image
from .vqa_metrics import answer_strings, most_common_answer

logger = logging.get_logger(__name__)

QA_TASKS = ("vqa", "okvqa", "gqa")
TASKS = (*QA_TASKS, "caption")
# Standard field -> column names tried in order when no mapping is given.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "question": ("question",),
    "answers": ("answers", "answer"),
    "captions": ("captions", "caption"),
    "question_id": ("question_id",),
    "image_id": ("image_id",),
    "answer_type": ("answer_type",),
    "question_type": ("question_type",),
    "multiple_choice_answer": ("multiple_choice_answer",),
}
GROUP_FIELDS = ("answer_type", "question_type")


@dataclass
class EvalSet:
    """Examples to evaluate (or to draw few-shot examples from), with their images read lazily.

    `prompts` holds what the prompt template formats (the question; empty for captioning), `references` the answers
    or captions scored against, `targets` the text shown when the example is a few-shot example.
    """

    task: str
    ids: list[Any]
    prompts: list[str]
    references: list[list[str]]
    targets: list[str]
    image_keys: list[str | None]
    groups: dict[str, list[str | None]]
    dataset: Any  # datasets.Dataset holding the image column
    image_column: str
    base_dir: Path | None = None
    source: str = ""
    read_image: Callable[[int], Image.Image] | None = None  # images not in `dataset` (shards): row -> decoded image
    _id_index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        for index, example_id in enumerate(self.ids):
            key = str(example_id)
            if key in self._id_index:
                raise ValueError(
                    f"{self.source}: the id {example_id!r} occurs twice (rows {self._id_index[key]} and "
                    f"{index}); ids must be unique to score and resume"
                )
            self._id_index[key] = index

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, example_id) -> int | None:
        return self._id_index.get(str(example_id))

    def image(self, index: int) -> Image.Image:
        """The decoded image of row `index`."""
        try:
            if self.read_image is not None:
                return self.read_image(index)
            return _to_pil(self.dataset[index][self.image_column], self.base_dir)
        except Exception as error:
            raise ValueError(
                f"{self.source}: cannot read the image of example {self.ids[index]!r} ({error})"
            ) from error

    def select(self, count: int) -> EvalSet:
        """The first `count` examples."""
        if count >= len(self):
            return self
        groups = {name: labels[:count] for name, labels in self.groups.items()}
        return replace(self, ids=self.ids[:count], prompts=self.prompts[:count], references=self.references[:count],
                       targets=self.targets[:count], image_keys=self.image_keys[:count], groups=groups)  # fmt: skip


def _to_pil(value, base_dir: Path | None) -> Image.Image:
    """An image value of the data (PIL, datasets' `{"bytes", "path"}`, or a path) decoded by MAGMA's one decoder."""
    if isinstance(value, Image.Image):
        return value
    if value is None:  # the MAGMA layout's reader gives None for an image it could not decode (and warned about)
        raise ValueError("the image file cannot be decoded (see the warning above)")
    if isinstance(value, Mapping):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return open_image(value["bytes"])
        value = value.get("path")
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return open_image(path)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"image=img,question=q"` (or a dict) -> `{"image": "img", "question": "q"}`, checking the field names."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"Column mapping {spec!r} is not of the form field=column,field=column")
        spec = {key.strip(): value.strip() for key, value in pairs}
    unknown = sorted(set(spec) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} in the column mapping; fields are {sorted(DEFAULT_COLUMNS)}")
    return dict(spec)


def is_original_layout(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "image_data").is_dir()


def load_eval_set(
    source, task: str, split: str | None = None, columns: str | Mapping[str, str] | None = None
) -> EvalSet:
    """Read evaluation (or few-shot support) data for `task` from the original layout or a 🤗 dataset.

    Args:
        source: a folder in the original layout (or a list of them), a `save_to_disk` folder, a name or folder that
            `datasets.load_dataset` reads, or a `datasets.Dataset` / `DatasetDict`; for `caption`, also `.tar` or
            parquet shards (a folder of them, a glob, a brace range, or a list of shard files).
        task: one of `vqa`, `okvqa`, `gqa`, `caption`.
        split: the split of a dataset with several.
        columns: field -> column name mapping for 🤗 datasets (see the module docstring for the fields).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; tasks are {', '.join(TASKS)}")
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _from_columns(pick_split(source, split, "the given dataset"), task, parse_columns(columns), None, "data")
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if task == "caption" and items and all(reads_as_shards(item) for item in items):
        return _from_shards(items if len(items) > 1 else items[0], parse_columns(columns))
    paths = [Path(p) for p in items]
    if all(is_original_layout(p) for p in paths):
        return _from_original_layout(paths, task)
    if len(paths) != 1:
        raise ValueError(f"Several data folders are only read in the original layout (with image_data/): {paths}")
    path = paths[0]
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = pick_split(datasets.load_from_disk(str(path)), split, str(path))
        return _from_columns(dataset, task, parse_columns(columns), path, str(path))
    try:
        loaded = datasets.load_dataset(str(path), split=split)
    except Exception as error:
        raise ValueError(
            f"Cannot read evaluation data from {str(path)!r}: it is not a folder in the original MAGMA layout (no "
            f"image_data/ in it), not a save_to_disk folder, and datasets.load_dataset failed: {error}"
        ) from error
    return _from_columns(pick_split(loaded, split, str(path)), task, parse_columns(columns), path, str(path))


def pick_split(dataset, split: str | None, name: str):
    """The one split of `dataset` to read: `split`, or its only one; an error naming the splits otherwise (`name`
    names the data in it)."""
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if split is not None:
        if split not in dataset:
            raise ValueError(f"{name} has no split {split!r}; its splits are {sorted(dataset)}")
        return dataset[split]
    if len(dataset) == 1:
        return next(iter(dataset.values()))
    raise ValueError(f"{name} has several splits {sorted(dataset)}; choose one with split= (--split)")


def _find_column(names: Sequence[str], field_name: str, mapping: Mapping[str, str], required: bool) -> str | None:
    if field_name in mapping:
        if mapping[field_name] not in names:
            raise ValueError(
                f"The column {mapping[field_name]!r} mapped to {field_name!r} is not in the data "
                f"(columns: {list(names)})"
            )
        return mapping[field_name]
    for candidate in DEFAULT_COLUMNS[field_name]:
        if candidate in names:
            return candidate
    if required:
        raise ValueError(
            f"The data has no {field_name!r} column (tried {list(DEFAULT_COLUMNS[field_name])}; columns: "
            f"{list(names)}). Map one with columns={{'{field_name}': NAME}} (--columns {field_name}=NAME)."
        )
    return None


def _undecoded_images(dataset, image_column: str):
    """An image column left as `{"bytes", "path"}`, so that MAGMA's own decoder reads it (`datasets` would not scale
    16-bit images)."""
    if isinstance(dataset.features.get(image_column), datasets.Image) and dataset.features[image_column].decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _column_values(dataset, column: str | None) -> list | None:
    # Without the format (e.g. data.py's image-decoding transform), reading a text column decodes no image.
    return None if column is None else list(dataset.with_format(None).select_columns([column])[column])


def _from_columns(dataset, task: str, mapping: Mapping[str, str], base_dir: Path | None, source: str) -> EvalSet:
    names = dataset.column_names
    qa = task in QA_TASKS
    image_column = _find_column(names, "image", mapping, required=True)
    dataset = _undecoded_images(dataset, image_column)
    fields = {
        name: _column_values(dataset, _find_column(names, name, mapping, required=False))
        for name in ("question_id", "image_id", *GROUP_FIELDS, "multiple_choice_answer")
    }
    if qa:
        fields["question"] = _column_values(dataset, _find_column(names, "question", mapping, required=True))
        fields["answers"] = _column_values(dataset, _find_column(names, "answers", mapping, required=True))
    else:
        fields["captions"] = _column_values(dataset, _find_column(names, "captions", mapping, required=True))
    rows = [{key: values[i] for key, values in fields.items() if values is not None} for i in range(len(dataset))]
    return _build(task, rows, dataset, image_column, base_dir, source)


def _from_original_layout(paths: list[Path], task: str) -> EvalSet:
    data_dir = [str(p) for p in paths] if len(paths) > 1 else str(paths[0])
    dataset = load_magma_dataset(data_dir)
    source = ", ".join(str(p) for p in paths)
    # The reader drops samples it cannot pair (no captions, a missing image, a bad json). A score over fewer questions
    # than the data holds is not the benchmark's score, so that is an error here.
    n_files = sum(1 for p in paths for _ in (p / "image_data").rglob("*.json"))
    if n_files != len(dataset):
        raise ValueError(
            f"{source}: {n_files - len(dataset)} of {n_files} samples were skipped by the reader (see the warnings "
            "above: a missing image, an unreadable json, or no captions). Evaluation scores every sample: fix or "
            "remove them. Question-answering samples need a non-empty `captions` too, e.g. "
            '["Q: {question} A: {answer}"].'
        )
    metadata = [_as_dict(value) for value in _column_values(dataset, "metadata")]
    captions = _column_values(dataset, "captions")
    image_paths = _column_values(dataset, "image_path")
    rows = []
    for meta, caps, image_path in zip(metadata, captions, image_paths):
        row = {key: meta.get(key) for key in ("question_id", "image_id", *GROUP_FIELDS, "multiple_choice_answer")}
        row["image_key"] = str(meta["image_id"]) if meta.get("image_id") is not None else str(image_path)
        if task in QA_TASKS:
            row["question"] = meta.get("question")
            row["answers"] = meta["answers"] if meta.get("answers") is not None else meta.get("answer")
        else:
            row["captions"] = caps
        rows.append(row)
    return _build(task, rows, dataset, "image", None, source)


def _from_shards(spec, mapping: Mapping[str, str]) -> EvalSet:
    """Captioning references from shards read where they lie. Every sample is scored, so a sample that cannot be
    (no image, no caption, a caption that is not text) is an error naming it, as for the original layout."""
    specs = [os.fspath(item) for item in (spec if isinstance(spec, list) else [spec])]
    specs = [item if "://" in item else os.path.abspath(item) for item in specs]  # the same from any directory
    source = ", ".join(specs)
    unknown = sorted(set(mapping) - {"image", "captions"})
    if unknown:
        raise ValueError(f"{source}: shards map only the image and captions columns, not {unknown}")
    shards = open_shards(specs if len(specs) > 1 else specs[0], mapping.get("image"), mapping.get("captions"), source)
    if mapping and isinstance(shards, TarShards):
        raise ValueError(f"{source}: a column mapping names parquet columns; .tar shards have members, not columns")
    index = ShardIndex(shards)
    rows, problems = [], []
    for label, sample in zip(index.labels, index.samples):
        problem = sample.problem or caption_problem(sample.captions)
        captions = None if problem else clean_captions(sample.captions)
        if problem or captions is None:
            problems.append(f"{label} ({problem or 'no captions'})")
            continue
        image_id = sample.metadata.get("image_id")
        rows.append({"image_id": sample.key if image_id is None else image_id, "captions": captions})
    if problems:
        first = "; ".join(problems[:SKIP_EXAMPLES])
        raise ValueError(
            f"{source}: {len(problems)} of {len(index)} samples cannot be scored: {first}. Evaluation scores every "
            "sample: fix or remove them"
        )
    if not rows:
        raise ValueError(f"{source}: the shards hold no samples")
    eval_set = _build("caption", rows, None, "", None, source)
    eval_set.read_image = index.open_image  # rows are the index's samples, in order
    return eval_set


def _as_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        return json.loads(value) if value.strip() else {}
    return dict(value)


def _answers_of(value) -> list[str]:
    # A `Sequence` of answer dicts comes out of Arrow as a dict of lists ({"answer": [...], ...}).
    if isinstance(value, Mapping) and isinstance(value.get("answer"), list):
        value = value["answer"]
    return answer_strings(value) if value is not None else []


def _build(task: str, rows: list[dict], dataset, image_column: str, base_dir: Path | None, source: str) -> EvalSet:
    ids, prompts, references, targets, image_keys = [], [], [], [], []
    groups: dict[str, list[str | None]] = {name: [] for name in GROUP_FIELDS}
    for index, row in enumerate(rows):
        example_id = row.get("question_id") if task in QA_TASKS else row.get("image_id")
        ids.append(index if example_id is None else example_id)
        what = f"{source}: example {ids[-1]!r} (row {index})"
        if task in QA_TASKS:
            question = row.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{what} has no question (metadata.question / the question column)")
            answers = _answers_of(row.get("answers"))
            if not answers:
                raise ValueError(f"{what} has no answers (metadata.answers / the answers column)")
            if task == "gqa" and len(answers) != 1:
                raise ValueError(f"{what}: GQA takes one answer per question, got {len(answers)}: {answers!r}")
            prompts.append(question.strip())
            references.append(answers)
            chosen = row.get("multiple_choice_answer")
            targets.append(
                chosen.strip() if isinstance(chosen, str) and chosen.strip() else most_common_answer(answers)
            )
        else:
            captions = row.get("captions")
            captions = [captions] if isinstance(captions, str) else [c for c in (captions or []) if c and c.strip()]
            if not captions:
                raise ValueError(f"{what} has no reference caption (captions)")
            prompts.append("")
            references.append(list(captions))
            targets.append(captions[0].strip())
        image_key = row.get("image_key") or (None if row.get("image_id") is None else str(row["image_id"]))
        image_keys.append(image_key)
        for name in GROUP_FIELDS:
            groups[name].append(None if row.get(name) is None else str(row[name]))
    groups = {name: labels for name, labels in groups.items() if any(label is not None for label in labels)}
    return EvalSet(task, ids, prompts, references, targets, image_keys, groups, dataset, image_column, base_dir, source)


def draw_support(
    support: EvalSet, shots: int, seed: int, query_id, query_image_key: str | None = None, exclude_query: bool = False
) -> list[int]:
    """Rows of `support` to show as the `shots` few-shot examples for one query, drawn without replacement.

    The draw depends only on `(seed, query_id)`, so it does not change with the batch size, the order of evaluation
    or a resumed run. With `exclude_query` (the support set is the evaluation set itself) the query and any example
    of the same image are never drawn.
    """
    if shots <= 0:
        return []
    rng = random.Random(f"{seed}/{query_id}")  # str seeds hash with SHA-512: stable across runs and processes

    def usable(row: int) -> bool:
        if not exclude_query:
            return True
        if str(support.ids[row]) == str(query_id):
            return False
        return query_image_key is None or support.image_keys[row] != query_image_key

    n = len(support)
    drawn = [row for row in rng.sample(range(n), min(n, shots + 8)) if usable(row)]
    if len(drawn) < shots:  # many excluded rows (several questions per image): draw among all usable ones
        candidates = [row for row in range(n) if usable(row)]
        if len(candidates) < shots:
            raise ValueError(
                f"{shots}-shot prompts need {shots} support examples; {support.source or 'the support'} "
                f"has only {len(candidates)} usable for example {query_id!r}"
            )
        drawn = rng.sample(candidates, shots)
    return drawn[:shots]


__all__ = ["DEFAULT_COLUMNS", "EvalSet", "QA_TASKS", "TASKS", "draw_support", "load_eval_set", "parse_columns"]
