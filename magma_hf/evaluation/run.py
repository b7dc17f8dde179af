"""`magma-hf eval`: zero- and few-shot evaluation of MAGMA on VQA v2, OK-VQA, GQA and image captioning (`evaluate`).

The prompts are the paper's open-ended format (`evaluation.prompts`). Answers are generated greedily
(`do_sample=False`), batched with left padding, and stripped of surrounding whitespace. Few-shot examples are drawn
per question from a support split with a seeded generator that depends only on `(seed, question id)`.

Results: `OUTPUT.jsonl` gets one record per example as soon as its batch is done (`id`, `prompt`, `answer`,
`score`, `references`, `support_ids`, ...) after a header recording what produced them: the task, shots, seed,
template and generation budget, the data (path, split, a fingerprint of its questions), the support data, and the
model (a sha256 of its weights, its dtype). An interrupted run started again with the same output resumes after the
examples already there; a run that differs in any of these is refused, naming the difference. When all are done,
`OUTPUT` (JSON) gets the aggregate metrics, the settings and every record with its score. Both are written
atomically, and a file the harness did not write is never replaced. Under `accelerate launch` the examples are
sharded over the processes, each appending to its own log, merged by the main process; the result equals one
process's. All of that is the resumable job of `magma_hf.jobs`: this module gives it the evaluation's identity
(`RUN_KEYS`, `DATA_KEYS`) and its records (one per question or image, with its score).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..cli import refuse
from ..data.shards import is_shard_spec
from ..generation import generate_answers
from ..jobs import Job, add_model_arguments, load_model, processes, run_command
from .caption_metrics import CaptionMetricsUnavailable, caption_scores, check_caption_requirements
from .data import QA_TASKS, TASKS, EvalSet, draw_support, load_eval_set
from .prompts import DEFAULT_MAX_NEW_TOKENS, build_prompt
from .vqa_metrics import aggregate_accuracy, gqa_accuracy, vqa_accuracy

logger = logging.get_logger(__name__)

# 2: the log records the model's weights and the data's questions (1 recorded names only).
RESULTS_FORMAT = "magma_hf.evaluation/2"
SUPPORT_FROM_DATA = "the evaluation data"  # few-shot examples drawn from the evaluated data itself
# What produced a log's answers: a log written with other values is not resumed. The model's keys
# (`jobs.MODEL_KEYS`) are known only once it is loaded, so they are checked after these.
RUN_KEYS = ("task", "shots", "seed", "max_new_tokens", "prompt_template")
DATA_KEYS = ("data", "split", "data_questions", "support", "support_split", "support_questions")


# ---------------------------------------------------------------------------------------------------------------------
# Generation


class _Generator:
    """Greedy, batched answers to one batch of prompts at a time (the shared path of `magma_hf.generation`)."""

    def __init__(self, model, processor, max_new_tokens: int):
        if processor.tokenizer.padding_side != "left":  # before anything is generated or written
            raise ValueError("Batched generation needs left padding; MagmaProcessor sets it, this processor does not")
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    def __call__(self, prompts: list[str], images: list[list]) -> list[str]:
        return generate_answers(self.model, self.processor, prompts, images, max_new_tokens=self.max_new_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Identity


def results_log_path(output: str | os.PathLike) -> Path:
    """`results.json` -> `results.jsonl` (the per-example log beside the aggregate)."""
    output = Path(output)
    return output.with_suffix(".jsonl") if output.suffix == ".json" else output.with_name(output.name + ".jsonl")


def questions_fingerprint(eval_set: EvalSet) -> str:
    """sha256 of what a data set asks and expects: ids, prompts, references, few-shot targets and image keys."""
    content = [eval_set.ids, eval_set.prompts, eval_set.references, eval_set.targets, eval_set.image_keys]
    return "sha256:" + hashlib.sha256(json.dumps(content, ensure_ascii=False, default=str).encode()).hexdigest()


def data_name(source, eval_set: EvalSet) -> str:
    """A data argument as recorded: local paths made absolute (the same folder from any working directory)."""
    if isinstance(source, (list, tuple)):
        return ", ".join(data_name(item, eval_set) for item in source)
    if isinstance(source, (str, os.PathLike)):
        local_shards = is_shard_spec(source) and "://" not in str(source)  # a glob or brace range exists as no path
        return str(Path(source).resolve()) if Path(source).exists() or local_shards else str(source)
    return eval_set.source  # a datasets.Dataset or an EvalSet: its questions' fingerprint identifies it


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def aggregate_metrics(task: str, eval_set: EvalSet, records: list[dict]) -> dict[str, Any]:
    """The metrics of `records` (of `eval_set`, in its order); for captions, each record's `score` is set too."""
    if task in QA_TASKS:
        groups = {
            name: [labels[eval_set.index_of(r["id"])] for r in records] for name, labels in eval_set.groups.items()
        }
        return aggregate_accuracy([r["score"] for r in records], groups)
    corpus, per_example = caption_scores(
        {str(r["id"]): r["answer"] for r in records}, {str(r["id"]): r["references"] for r in records}
    )
    for record in records:
        record["score"] = per_example[str(record["id"])]
    return {**corpus, "num_images": len(records)}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluate


@dataclass
class _Examples:
    """What an evaluation asks: `full` is the data as loaded (the log's ids and the few-shot draws refer to it),
    `asked` its first `limit` examples, and `support_rows[row]` the rows of `support` shown before asked row `row`."""

    full: EvalSet
    asked: EvalSet
    support: EvalSet | None
    support_rows: list[list[int]]
    separate_support: bool  # the few-shot examples come from other data than `full`


def evaluate(
    task: str,
    model,
    processor=None,
    dataset=None,
    *,
    shots: int = 0,
    support=None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output: str | os.PathLike | None = None,
    seed: int = 0,
    limit: int | None = None,
    split: str | None = None,
    support_split: str | None = None,
    columns: str | Mapping[str, str] | None = None,
    prompt_template: str | None = None,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Evaluate a MAGMA model on a VQA-style or captioning dataset, zero- or few-shot.

    Args:
        task: `vqa`, `okvqa` (VQA accuracy), `gqa` (exact match) or `caption` (BLEU-4 and CIDEr-D).
        model: a `MagmaForConditionalGeneration`, or the path of a MAGMA folder (then `processor` may be None).
        processor: its `MagmaProcessor`.
        dataset: the evaluation data: a folder in the original layout, a 🤗 dataset or its path/name, or an
            `EvalSet` (see `magma_hf.evaluation.data` for the fields).
        shots: few-shot examples per prompt.
        support: where the few-shot examples come from (same forms as `dataset`); by default the evaluation data
            itself, never the question itself nor another question on its image.
        batch_size: prompts per `generate` call; results do not depend on it.
        max_new_tokens: generation budget (default 10 for question answering, 30 for captions).
        output: the aggregate JSON's path; the per-example log goes beside it (`.jsonl`) and makes runs resumable.
            None keeps everything in memory.
        seed: seeds the few-shot draw.
        limit: evaluate only the first `limit` examples.
        split / support_split / columns: passed to `load_eval_set`.
        prompt_template: question template with `{question}` (default `"Q: {question} A:"`), or the caption prompt
            (default none).
        progress: show a progress bar.
        device / dtype: where and in which dtype a model given as a path is loaded (as `load_model_and_processor`).

    Returns:
        `{"task", "metrics", "settings", "examples"}`: for question answering `metrics` holds `accuracy` (percent)
        and per answer/question type accuracies when the data has those fields; for captioning BLEU-1..4 and
        CIDEr-D on the COCO tool's scale. `examples` are the per-example records with their `score`.
    """
    _check_arguments(task, shots, batch_size, max_new_tokens, limit, prompt_template)
    if task == "caption":  # fail before hours of generation, not after
        check_caption_requirements()
    _check_sources(model, processor, dataset, shots, support, support_split)

    # Everything that can go wrong with the data or the output is found before the model is loaded or a file written.
    examples = _load_examples(task, dataset, shots, support, seed, limit, split, support_split, columns)
    settings = _settings(task, shots, seed, max_new_tokens, prompt_template, dataset, split, support, support_split,
                         examples)  # fmt: skip
    job = _start_job(output, settings)

    model, processor, identity = load_model(model, processor, device, dtype, job.procs, fingerprint=output is not None)
    settings.update(identity, batch_size=batch_size)
    generator = _Generator(model, processor, settings["max_new_tokens"])

    job.resume(known=examples.full.index_of)
    _answer(job, examples, generator, batch_size, progress)
    job.finish([str(example_id) for example_id in examples.full.ids])
    return job.procs.broadcast(_results(job, examples) if job.procs.is_main else None)


def _check_arguments(
    task: str, shots: int, batch_size: int, max_new_tokens: int | None, limit: int | None, prompt_template: str | None
) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; tasks are {', '.join(TASKS)}")
    for name, value, least in (
        ("shots", shots, 0),
        ("batch_size", batch_size, 1),
        ("max_new_tokens", max_new_tokens, 1),
        ("limit", limit, 1),
    ):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if prompt_template is not None:
        if task in QA_TASKS and "{question}" not in prompt_template:
            raise ValueError(f"The question template {prompt_template!r} has no {{question}} field")
        try:
            prompt_template.format(question="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"The prompt template {prompt_template!r} is not a format string with only a {{question}} field "
                f"({type(error).__name__}: {error}); write a literal brace as {{{{ or }}}}"
            ) from None


def _check_sources(model, processor, dataset, shots: int, support, support_split: str | None) -> None:
    """The data, the support and the model are given in forms `evaluate` can use."""
    if dataset is None:
        raise ValueError("evaluate() needs a dataset")
    if support_split is not None and support is None:  # it would be ignored: the support is the data itself
        raise ValueError(f"support_split={support_split!r} (--support-split) is given without support data (--support)")
    if support is not None and not shots:
        logger.warning("Support data is given but shots is 0: no few-shot examples are shown")
    if processor is None and not isinstance(model, (str, os.PathLike)):
        raise ValueError("evaluate() needs the model's processor (or a model path to load both from)")


def _load_examples(task, dataset, shots, support, seed, limit, split, support_split, columns) -> _Examples:
    """The data, its first `limit` examples and the few-shot examples drawn for each of those: drawn now, so that
    too few support examples is an error before anything is written."""
    full_set = dataset if isinstance(dataset, EvalSet) else load_eval_set(dataset, task, split=split, columns=columns)
    eval_set = full_set.select(limit) if limit is not None else full_set
    if shots and support is not None:
        support_set = support if isinstance(support, EvalSet) else load_eval_set(support, task, support_split, columns)
    else:
        support_set = full_set if shots else None  # all of it, so that `limit` does not change the draws
        if shots:
            logger.warning(
                "No support split given: few-shot examples come from the evaluated data itself (never "
                "the question itself or its image). Pass the training split as support for the usual protocol."
            )
    separate_support = bool(shots) and support is not None
    support_rows = [
        draw_support(support_set, shots, seed, eval_set.ids[row], eval_set.image_keys[row], not separate_support)
        for row in range(len(eval_set))
    ]
    return _Examples(full_set, eval_set, support_set, support_rows, separate_support)


def _settings(
    task, shots, seed, max_new_tokens, prompt_template, dataset, split, support, support_split, examples: _Examples
) -> dict[str, Any]:
    """The evaluation's identity as its log records it: `RUN_KEYS` and `DATA_KEYS` (the model's come once loaded)."""
    separate = examples.separate_support
    return {
        "task": task,
        "shots": shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task],
        "prompt_template": prompt_template,
        "data": data_name(dataset, examples.full),
        "split": split,
        "data_questions": questions_fingerprint(examples.full),
        "support": None if not shots else data_name(support, examples.support) if separate else SUPPORT_FROM_DATA,
        "support_split": support_split if separate else None,
        "support_questions": questions_fingerprint(examples.support) if separate else None,
    }


def _start_job(output: str | os.PathLike | None, settings: dict[str, Any]) -> Job:
    """The job writing `output` and its log beside it (None: in memory only), with its output checked."""
    log_path = results_log_path(output) if output is not None else None
    procs = processes()
    if procs.count > 1 and output is None:
        raise ValueError(
            f"A sharded evaluation ({procs.count} processes) needs an output: the processes' results meet in its log"
        )
    output = Path(output) if output is not None else None
    if output is not None and (output.is_dir() or log_path.is_dir()):
        raise ValueError(f"--output {output}: {output if output.is_dir() else log_path} is a folder; give a file name")
    job = Job(RESULTS_FORMAT, log_path, settings, RUN_KEYS + DATA_KEYS, procs, results_path=output)
    job.check_output()
    return job


def _answer(job: Job, examples: _Examples, generator: _Generator, batch_size: int, progress: bool) -> None:
    """Answer the examples not done yet (this process's share), each batch's records logged (`generate_answers`
    puts the model in eval mode)."""
    task, shots, template = job.settings["task"], job.settings["shots"], job.settings["prompt_template"]
    eval_set, support_set, support_rows = examples.asked, examples.support, examples.support_rows

    def records_for(batch: list[int]) -> list[dict[str, Any]]:
        prompts, images = [], []
        for row in batch:
            shot_pairs = [(support_set.prompts[r], support_set.targets[r]) for r in support_rows[row]]
            prompts.append(build_prompt(task, eval_set.prompts[row], shot_pairs, template))
            images.append([support_set.image(r) for r in support_rows[row]] + [eval_set.image(row)])
        answers = generator(prompts, images)
        return [
            _record(task, eval_set, row, prompt, answer, [support_set.ids[r] for r in support_rows[row]])
            for row, prompt, answer in zip(batch, prompts, answers)
        ]

    job.run(job.pending(eval_set.ids), len(eval_set), records_for, batch_size, noun="examples",
            desc=f"{task} {shots}-shot", progress=progress)  # fmt: skip


def _record(task: str, eval_set: EvalSet, row: int, prompt: str, answer: str, support_ids: list) -> dict[str, Any]:
    references = eval_set.references[row]
    qa = task in QA_TASKS
    score = (gqa_accuracy if task == "gqa" else vqa_accuracy)(answer, references) if qa else None  # captions: later
    question = {"question": eval_set.prompts[row]} if qa else {}
    return {"id": eval_set.ids[row], **question, "prompt": prompt, "answer": answer, "score": score,
            "references": references, "support_ids": support_ids}  # fmt: skip


def _results(job: Job, examples: _Examples) -> dict[str, Any]:
    """The result (metrics, settings, every record with its score), written to the output when there is one."""
    task = job.settings["task"]
    records = [job.done[str(example_id)] for example_id in examples.asked.ids]
    metrics = aggregate_metrics(task, examples.asked, records)
    result = {"task": task, "metrics": metrics, "settings": job.settings, "examples": records}
    if job.results_path is not None:
        result["results_log"] = str(job.log_path)
        job.write_results(result)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=TASKS, help="benchmark: vqa, okvqa, gqa or caption")
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="evaluation data: folder(s) in the original layout, a save_to_disk folder, a "
        "datasets.load_dataset name/folder, or (--task caption) .tar or parquet shards: a folder, glob or brace range",
    )
    parser.add_argument("--model", required=True, help="a MAGMA model folder (model and processor)")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt (default 0)")
    parser.add_argument("--support", nargs="+", help="where few-shot examples come from (default: the --data itself)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="generation budget (default 10, captions 30)")
    parser.add_argument(
        "--output",
        help="aggregate JSON; per-example records go to the same name with .jsonl (default: eval-TASK-Kshot.json)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw (default 0)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--split", help="split of a dataset with several")
    parser.add_argument("--support-split", help="split of the --support dataset")
    parser.add_argument("--columns", help="column mapping for 🤗 datasets, e.g. image=img,question=q,answers=a")
    parser.add_argument("--prompt-template", help="question template (default 'Q: {question} A:'), or caption prompt")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    output = args.output or f"eval-{args.task}-{args.shots}shot.json"
    data = args.data if len(args.data) > 1 else args.data[0]
    support = None if args.support is None else (args.support if len(args.support) > 1 else args.support[0])
    if args.task == "caption":  # named before anything is read
        try:
            check_caption_requirements()
        except CaptionMetricsUnavailable as error:
            return refuse(error)

    def work() -> dict[str, Any]:
        return evaluate(args.task, args.model, None, data, shots=args.shots, support=support,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, output=output, seed=args.seed,
                        limit=args.limit, split=args.split, support_split=args.support_split, columns=args.columns,
                        prompt_template=args.prompt_template, progress=not args.no_progress, device=args.device,
                        dtype=args.dtype)  # fmt: skip

    def report(result: dict[str, Any]) -> None:
        print(format_metrics(result))
        print(f"results: {output} (per example: {results_log_path(output)})")

    return run_command(work, report)


def format_metrics(result: Mapping[str, Any]) -> str:
    """A short text table of a result's metrics."""
    digits = 4 if result["task"] == "caption" else 2
    lines = [f"{result['task']} {result['settings']['shots']}-shot"]
    for name, value in result["metrics"].items():
        if isinstance(value, Mapping):
            lines.extend(f"  {name} {label}: {v:.{digits}f}" for label, v in value.items())
        elif isinstance(value, float) and not math.isnan(value):
            lines.append(f"  {name}: {value:.{digits}f}")
        else:
            lines.append(f"  {name}: {value}")
    return "\n".join(lines)


__all__ = ["evaluate", "format_metrics", "results_log_path"]
