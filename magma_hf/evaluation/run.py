"""Zero- and few-shot evaluation of MAGMA on VQA v2, OK-VQA, GQA and image captioning (`magma-hf eval`).

Prompts (the paper's open-ended format):

- zero-shot question answering: `<|image|>Q: {question} A:`;
- K-shot: K support examples, each `<|image|>Q: {question} A: {answer}` followed by a newline, then the query, in
  one interleaved sequence: `<|image|>Q: q1 A: a1\\n<|image|>Q: q2 A: a2\\n<|image|>Q: {question} A:`;
- captioning: the image alone (MAGMA's pretraining format: image, then caption), or `<|image|>{caption}\\n` per
  support example before the query image; `prompt_template` sets a caption prompt such as "A picture of".

The newline ends each example because the generated answer is cut at the first newline (and generation stops
there); the few-shot examples thus show the model where an answer ends. Answers are generated greedily
(`do_sample=False`), batched with left padding, and stripped of surrounding whitespace. Few-shot examples are drawn
per question from a support split with a seeded generator that depends only on `(seed, question id)`.

Results: `OUTPUT.jsonl` gets one record per example as soon as its batch is done (`id`, `prompt`, `answer`,
`score`, `references`, `support_ids`, ...) after a header recording what produced them: the task, shots, seed,
template and generation budget, the data (path, split, a fingerprint of its questions), the support data, and the
model (a sha256 of its weights, its dtype). An interrupted run started again with the same output resumes after the
examples already there; a run that differs in any of these is refused, naming the difference. When all are done,
`OUTPUT` (JSON) gets the aggregate metrics, the settings and every record with its score. Both are written
atomically, and a file the harness did not write is never replaced. Under `accelerate launch` the examples are
sharded over the processes, each appending to its own log, merged by the main process (`evaluation.records`); the
result equals one process's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging as std_logging
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..data.shards import is_shard_spec
from ..generation import generate_answers
from ..hub_magma import check_processor_files
from ..io_utils import write_text_atomically
from ..processing_magma import IMAGE_TOKEN, MagmaProcessor, check_processor_matches_model
from ..prompts_magma import QA_TEMPLATE, few_shot_prompt
from .caption_metrics import CaptionMetricsUnavailable, caption_scores, check_caption_requirements
from .data import QA_TASKS, TASKS, EvalSet, draw_support, load_eval_set
from .records import (
    append_records,
    check_no_orphaned_process_logs,
    check_resumable,
    differences,
    merge_process_logs,
    open_for_append,
    processes,
    read_done,
    read_header,
    remove_leftovers,
    shard,
)
from .vqa_metrics import aggregate_accuracy, gqa_accuracy, vqa_accuracy

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = {"vqa": 10, "okvqa": 10, "gqa": 10, "caption": 30}
# 2: the log records the model's weights and the data's questions (1 recorded names only).
RESULTS_FORMAT = "magma_hf.evaluation/2"
SUPPORT_FROM_DATA = "the evaluation data"  # few-shot examples drawn from the evaluated data itself
# What produced a log's answers: a log written with other values is not resumed. The model's keys are known only
# once it is loaded, so they are checked after the others (which a rerun can check before loading 12 GB).
RUN_KEYS = ("task", "shots", "seed", "max_new_tokens", "prompt_template")
DATA_KEYS = ("data", "split", "data_questions", "support", "support_split", "support_questions")
MODEL_KEYS = ("model_weights", "dtype")
RESUME_KEYS = RUN_KEYS + DATA_KEYS + MODEL_KEYS


# ----------------------------------------------------------------------------------------------------------- prompts
def query_text(task: str, prompt: str, template: str | None) -> str:
    """The text after the query image: the filled question template, or the caption prompt."""
    if task in QA_TASKS:
        return (template or QA_TEMPLATE).format(question=prompt)
    return template or ""


def example_text(task: str, prompt: str, target: str, template: str | None) -> str:
    """A support example's text: its query text followed by its answer (or caption)."""
    head = query_text(task, prompt, template)
    return f"{head} {target}" if head else target


def build_prompt(task: str, prompt: str, shots: list[tuple[str, str]], template: str | None = None) -> str:
    """The full prompt with one `<|image|>` per image: `shots` as (prompt, target) pairs, then the query (MAGMA's
    few-shot layout, `prompts_magma.few_shot_prompt`)."""
    examples = [example_text(task, p, t, template) for p, t in shots]
    return few_shot_prompt(examples, IMAGE_TOKEN + query_text(task, prompt, template))


# ------------------------------------------------------------------------------------------------------- generation
class _Generator:
    """Greedy, batched answers to one batch of prompts at a time (the shared path of `magma_hf.generation`)."""

    def __init__(self, model, processor, max_new_tokens: int):
        if processor.tokenizer.padding_side != "left":  # before anything is generated or written
            raise ValueError("Batched generation needs left padding; MagmaProcessor sets it, this processor does not")
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    def __call__(self, prompts: list[str], images: list[list]) -> list[str]:
        return generate_answers(self.model, self.processor, prompts, images, max_new_tokens=self.max_new_tokens)


# ---------------------------------------------------------------------------------------------------- results files
def results_log_path(output: str | os.PathLike) -> Path:
    """`results.json` -> `results.jsonl` (the per-example log beside the aggregate)."""
    output = Path(output)
    return output.with_suffix(".jsonl") if output.suffix == ".json" else output.with_name(output.name + ".jsonl")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes), the identity of what answers.

    Exact: any changed weight changes it, and the same weights give the same value whatever folder, copy or device
    they come from (a dtype is other bytes, hence another identity: it gives other answers too). Tensors are hashed
    in threads (hashlib releases the GIL), so a 12 GB model takes seconds, against hours of generation.
    """
    state = model.state_dict()

    def tensor_digest(name: str) -> str:
        tensor = state[name].detach()
        digest = hashlib.sha256(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()))
        return digest.hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(tensor_digest, sorted(state)))
    return "sha256:" + hashlib.sha256("".join(digests).encode()).hexdigest()


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


# ---------------------------------------------------------------------------------------------------------- scoring
def score_answer(task: str, answer: str, references: list[str]) -> float:
    return gqa_accuracy(answer, references) if task == "gqa" else vqa_accuracy(answer, references)


def _aggregate(task: str, eval_set: EvalSet, records: list[dict]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------------- evaluate
def load_model_and_processor(path: str | os.PathLike, device: str | None = None, dtype: str | None = None):
    """A MAGMA folder's model (in eval mode, on `device`) and processor."""
    if not Path(path).exists() and (Path(path).is_absolute() or str(path).startswith((".", "~"))):
        raise FileNotFoundError(f"there is no model folder {path}")  # not a Hub id: transformers would say it is
    if Path(path).is_dir():
        check_processor_files(path)  # before the weights load, which may take minutes
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype in (None, "auto"):
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    from ..modeling_magma import MagmaForConditionalGeneration  # here: `magma-hf caption --engine vllm` imports this
    # module in vLLM's environment, whose transformers has only MAGMA's config and processors (README)

    model = MagmaForConditionalGeneration.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()
    processor = MagmaProcessor.from_pretrained(str(path))
    check_processor_matches_model(processor, model.config, str(path))
    return model, processor


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
    if dataset is None:
        raise ValueError("evaluate() needs a dataset")
    if support_split is not None and support is None:  # it would be ignored: the support is the data itself
        raise ValueError(f"support_split={support_split!r} (--support-split) is given without support data (--support)")
    if support is not None and not shots:
        logger.warning("Support data is given but shots is 0: no few-shot examples are shown")
    if processor is None and not isinstance(model, (str, os.PathLike)):
        raise ValueError("evaluate() needs the model's processor (or a model path to load both from)")

    # Everything that can go wrong with the data or the output is found before the model is loaded or a file written.
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
    # Drawn now, so that too few support examples is an error before anything is written.
    support_rows = [
        draw_support(support_set, shots, seed, eval_set.ids[row], eval_set.image_keys[row], not separate_support)
        for row in range(len(eval_set))
    ]
    settings = {
        "task": task,
        "shots": shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task],
        "prompt_template": prompt_template,
        "data": data_name(dataset, full_set),
        "split": split,
        "data_questions": questions_fingerprint(full_set),
        "support": None if not shots else data_name(support, support_set) if separate_support else SUPPORT_FROM_DATA,
        "support_split": support_split if separate_support else None,
        "support_questions": questions_fingerprint(support_set) if separate_support else None,
    }
    log_path = results_log_path(output) if output is not None else None
    procs = processes()
    if procs.count > 1 and output is None:
        raise ValueError(
            f"A sharded evaluation ({procs.count} processes) needs an output: the processes' results meet in its log"
        )
    recorded = _check_output(Path(output), log_path, settings) if output is not None else None

    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        model, loaded_processor = load_model_and_processor(model, device=device or procs.device, dtype=dtype)
        processor = processor or loaded_processor
    else:
        model_name = getattr(model, "name_or_path", "") or type(model).__name__
    settings.update(
        model=model_name,
        model_weights=weights_fingerprint(model) if output is not None else None,  # identifies a resumable run
        dtype=str(model.dtype).removeprefix("torch."),
        batch_size=batch_size,
    )
    generator = _Generator(model, processor, settings["max_new_tokens"])

    done: dict[str, dict] = {}
    if log_path is not None:
        if recorded is not None and procs.is_main:
            check_resumable(log_path, recorded, settings, MODEL_KEYS)
        done = read_done(
            log_path, RESULTS_FORMAT, settings, RESUME_KEYS, recorded is not None, procs, known=full_set.index_of
        )
    todo = [row for row in range(len(eval_set)) if str(eval_set.ids[row]) not in done]
    if done and todo and procs.is_main:
        logger.info("Resuming %s: %d of %d examples already done", log_path, len(eval_set) - len(todo), len(eval_set))
    was_training = model.training
    model.eval()
    try:
        _run(
            task, eval_set, support_set, support_rows, shard(todo, procs), generator, settings, done, log_path,
            batch_size, progress, procs,
        )  # fmt: skip
    finally:
        model.train(was_training)

    if log_path is not None:
        merge_process_logs(log_path, done, [str(example_id) for example_id in full_set.ids], procs)
    if procs.is_main:
        records = [done[str(example_id)] for example_id in eval_set.ids]
        metrics = _aggregate(task, eval_set, records)
        result = {"task": task, "metrics": metrics, "settings": settings, "examples": records}
        if output is not None:
            result["results_log"] = str(log_path)
            remove_leftovers(Path(output))
            write_text_atomically(
                Path(output), json.dumps({"format": RESULTS_FORMAT, **result}, indent=1, ensure_ascii=False) + "\n"
            )
    return procs.broadcast(result if procs.is_main else None)


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


def _check_output(output: Path, log_path: Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The settings recorded in `output`'s log when this run resumes it (None for a new run), after checking that
    neither the log nor a finished `output` belongs to another run: those are never continued or overwritten."""
    if output.is_dir() or log_path.is_dir():
        raise ValueError(f"--output {output}: {output if output.is_dir() else log_path} is a folder; give a file name")
    check_no_orphaned_process_logs(log_path)
    if not log_path.exists():
        _check_writable_folder(output.parent)
        if output.exists():  # results whose log is gone: never overwrite them
            raise ValueError(
                f"{output} exists but its per-example log {log_path} does not, so the run cannot resume; move "
                f"{output} away or choose another --output."
            )
        return None
    recorded = read_header(log_path, RESULTS_FORMAT)
    check_resumable(log_path, recorded, settings, RUN_KEYS + DATA_KEYS)
    if output.exists():  # a finished run: the aggregate is rewritten only when it is this run's
        try:
            finished = json.loads(output.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            finished = None
        if not isinstance(finished, dict) or finished.get("format") != RESULTS_FORMAT:
            raise ValueError(
                f"{output} is not a magma_hf results file of this format; move it or choose another --output"
            )
        details = differences(finished.get("settings", {}), recorded, RESUME_KEYS)
        if details:
            raise ValueError(
                f"{output} holds the results of another run than its log {log_path} ({details}); move one away"
            )
    return recorded


def _check_writable_folder(folder: Path) -> None:
    """An error naming the folder when results cannot be written into it (it, or the nearest existing parent)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"Cannot write the results into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write the results into {folder}: {existing} is not writable")


def _run(
    task, eval_set, support_set, support_rows, todo, generator, settings, done, log_path, batch_size, progress, procs
) -> None:
    """Answer the rows `todo` (this process's share), appending each batch's records to this process's log."""
    shots, template = settings["shots"], settings["prompt_template"]
    sharded = f" (process 1 of {procs.count})" if procs.count > 1 else ""
    initial = len(eval_set) - len(todo) if procs.count == 1 else 0
    bar = tqdm(
        total=initial + len(todo),
        initial=initial,
        desc=f"{task} {shots}-shot{sharded}",
        disable=not progress or not procs.is_main,
    )
    log = open_for_append(log_path, RESULTS_FORMAT, settings, procs) if log_path is not None else None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts, images = [], []
            for row in batch:
                shot_pairs = [(support_set.prompts[r], support_set.targets[r]) for r in support_rows[row]]
                prompts.append(build_prompt(task, eval_set.prompts[row], shot_pairs, template))
                images.append([support_set.image(r) for r in support_rows[row]] + [eval_set.image(row)])
            answers = generator(prompts, images)
            records = [
                _record(task, eval_set, row, prompt, answer, [support_set.ids[r] for r in support_rows[row]])
                for row, prompt, answer in zip(batch, prompts, answers)
            ]
            done.update((str(record["id"]), record) for record in records)
            if log is not None:
                append_records(log, records)
            bar.update(len(batch))
    finally:
        bar.close()
        if log is not None:
            log.close()


def _record(task: str, eval_set: EvalSet, row: int, prompt: str, answer: str, support_ids: list) -> dict[str, Any]:
    record: dict[str, Any] = {"id": eval_set.ids[row]}
    if task in QA_TASKS:
        record["question"] = eval_set.prompts[row]
    record.update(prompt=prompt, answer=answer)
    record["score"] = score_answer(task, answer, eval_set.references[row]) if task in QA_TASKS else None
    record["references"] = eval_set.references[row]
    record["support_ids"] = support_ids
    return record


# --------------------------------------------------------------------------------------------------------------- CLI
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
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    std_logging.basicConfig(level=std_logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = args.output or f"eval-{args.task}-{args.shots}shot.json"
    data = args.data if len(args.data) > 1 else args.data[0]
    support = None if args.support is None else (args.support if len(args.support) > 1 else args.support[0])
    if args.task == "caption":
        try:
            check_caption_requirements()
        except CaptionMetricsUnavailable as error:
            print(f"error: {error}")
            return 2
    try:  # the model is loaded inside, once the data and the output are known to be usable
        result = evaluate(
            args.task,
            args.model,
            None,
            data,
            shots=args.shots,
            support=support,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            output=output,
            seed=args.seed,
            limit=args.limit,
            split=args.split,
            support_split=args.support_split,
            columns=args.columns,
            prompt_template=args.prompt_template,
            progress=not args.no_progress,
            device=args.device,
            dtype=args.dtype,
        )
    except (ValueError, OSError) as error:  # bad data, settings, model folder or output: the message names it
        print(f"error: {error}")
        return 2
    if processes().is_main:  # under accelerate launch every process has the result; one prints it
        print(format_metrics(result))
        print(f"results: {output} (per example: {results_log_path(output)})")
    return 0


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


__all__ = ["build_prompt", "evaluate", "load_model_and_processor", "results_log_path"]
