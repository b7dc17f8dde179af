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
`score`, `references`, `support_ids`, ...); an interrupted run started again with the same output resumes after
the examples already there. When all are done, `OUTPUT` (JSON) gets the aggregate metrics, the settings and every
record with its score.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .evaluation_data import QA_TASKS, TASKS, EvalSet, draw_support, load_eval_set
from .processing_magma import IMAGE_TOKEN
from .vqa_metrics import aggregate_accuracy, gqa_accuracy, vqa_accuracy

logger = logging.getLogger(__name__)

EXAMPLE_SEPARATOR = "\n"
QA_TEMPLATE = "Q: {question} A:"
DEFAULT_MAX_NEW_TOKENS = {"vqa": 10, "okvqa": 10, "gqa": 10, "caption": 30}
RESULTS_FORMAT = "magma_hf.evaluation/1"
SUPPORT_FROM_DATA = "the evaluation data"  # few-shot examples drawn from the evaluated data itself
# Settings that change the answers: a results file written with other values cannot be resumed.
RESUME_KEYS = ("task", "shots", "seed", "max_new_tokens", "prompt_template", "support")


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
    """The full prompt with one `<|image|>` per image: `shots` as (prompt, target) pairs, then the query."""
    parts = [IMAGE_TOKEN + example_text(task, p, t, template) + EXAMPLE_SEPARATOR for p, t in shots]
    return "".join(parts) + IMAGE_TOKEN + query_text(task, prompt, template)


def clean_generation(text: str) -> str:
    """The answer in a continuation: up to the first newline, whitespace stripped."""
    return text.split("\n", 1)[0].strip()


# ------------------------------------------------------------------------------------------------------- generation
class _Generator:
    """Greedy, batched answers from a MAGMA model and processor."""

    def __init__(self, model, processor, max_new_tokens: int):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.padding_side != "left":
            raise ValueError("Batched generation needs left padding; MagmaProcessor sets it, this processor does not")
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.generate_kwargs = dict(
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            stop_strings=[EXAMPLE_SEPARATOR],
            tokenizer=self.tokenizer,
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: list[list]) -> list[str]:
        inputs = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, **self.generate_kwargs)
        continuations = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [clean_generation(self._decode(ids)) for ids in continuations]

    def _decode(self, ids: list[int]) -> str:
        end = next((n for n, token in enumerate(ids) if token in self.stop_ids), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------- results files
def results_log_path(output: str | os.PathLike) -> Path:
    """`results.json` -> `results.jsonl` (the per-example log beside the aggregate)."""
    output = Path(output)
    return output.with_suffix(".jsonl") if output.suffix == ".json" else output.with_name(output.name + ".jsonl")


def _read_log(path: Path, settings: Mapping[str, Any]) -> dict[str, dict]:
    """Records already in the log, by id. A log from other settings is an error; a torn last line is dropped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a magma_hf evaluation log; choose another --output or move it")
    differing = {
        k: (header["settings"].get(k), settings[k]) for k in RESUME_KEYS if header["settings"].get(k) != settings[k]
    }
    if differing:
        details = ", ".join(f"{k}: {old!r} in the file, {new!r} now" for k, (old, new) in differing.items())
        raise ValueError(
            f"Cannot resume {path}: it was written with other settings ({details}). "
            "Choose another --output, or move the file away to start again."
        )
    records: dict[str, dict] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the run was killed while writing this line
                logger.warning("%s: dropping the incomplete last line", path)
                path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
                break
            raise ValueError(f"{path}, line {number}, is not valid JSON; the log is damaged") from None
        records[str(record["id"])] = record
    return records


def _write_json_atomically(path: Path, payload: Mapping) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------- scoring
def score_answer(task: str, answer: str, references: list[str]) -> float:
    return gqa_accuracy(answer, references) if task == "gqa" else vqa_accuracy(answer, references)


def _aggregate(task: str, eval_set: EvalSet, records: list[dict]) -> dict[str, Any]:
    if task in QA_TASKS:
        groups = {
            name: [labels[eval_set.index_of(r["id"])] for r in records] for name, labels in eval_set.groups.items()
        }
        return aggregate_accuracy([r["score"] for r in records], groups)
    from .caption_metrics import caption_scores

    corpus, per_example = caption_scores(
        {str(r["id"]): r["answer"] for r in records}, {str(r["id"]): r["references"] for r in records}
    )
    for record in records:
        record["score"] = per_example[str(record["id"])]
    return {**corpus, "num_images": len(records)}


# --------------------------------------------------------------------------------------------------------- evaluate
def load_model_and_processor(path: str | os.PathLike, device: str | None = None, dtype: str | None = None):
    """A MAGMA folder's model (in eval mode, on `device`) and processor."""
    from .modeling_magma import MagmaForConditionalGeneration
    from .processing_magma import MagmaProcessor, check_processor_matches_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype in (None, "auto"):
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
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
) -> dict[str, Any]:
    """Evaluate a MAGMA model on a VQA-style or captioning dataset, zero- or few-shot.

    Args:
        task: `vqa`, `okvqa` (VQA accuracy), `gqa` (exact match) or `caption` (BLEU-4 and CIDEr-D).
        model: a `MagmaForConditionalGeneration`, or the path of a MAGMA folder (then `processor` may be None).
        processor: its `MagmaProcessor`.
        dataset: the evaluation data: a folder in the original layout, a 🤗 dataset or its path/name, or an
            `EvalSet` (see `magma_hf.evaluation_data` for the fields).
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

    Returns:
        `{"task", "metrics", "settings", "examples"}`: for question answering `metrics` holds `accuracy` (percent)
        and per answer/question type accuracies when the data has those fields; for captioning BLEU-1..4 and
        CIDEr-D on the COCO tool's scale. `examples` are the per-example records with their `score`.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; tasks are {', '.join(TASKS)}")
    if shots < 0 or batch_size < 1:
        raise ValueError(f"shots must be >= 0 and batch_size >= 1 (got {shots}, {batch_size})")
    if task in QA_TASKS and prompt_template is not None and "{question}" not in prompt_template:
        raise ValueError(f"The question template {prompt_template!r} has no {{question}} field")
    if task == "caption":  # fail before hours of generation, not after
        from .caption_metrics import check_caption_requirements

        check_caption_requirements()
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        model, loaded_processor = load_model_and_processor(model)
        processor = processor or loaded_processor
    else:
        model_name = getattr(model, "name_or_path", "") or type(model).__name__
    if processor is None:
        raise ValueError("evaluate() needs the model's processor (or a model path to load both from)")
    if dataset is None:
        raise ValueError("evaluate() needs a dataset")

    full_set = dataset if isinstance(dataset, EvalSet) else load_eval_set(dataset, task, split=split, columns=columns)
    eval_set = full_set.select(limit) if limit is not None else full_set
    if shots and support is not None:
        support_set = support if isinstance(support, EvalSet) else load_eval_set(support, task, support_split, columns)
    else:
        support_set = full_set if shots else None  # all of it, so that `limit` does not change the draws
        if shots:
            logger.warning(
                "No support split given: few-shot examples come from the evaluation data itself (never "
                "the question itself or its image). Pass the training split as support for the usual protocol."
            )
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
    settings = {
        "task": task,
        "shots": shots,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "prompt_template": prompt_template,
        "support": None if not shots else (support_set.source if support is not None else SUPPORT_FROM_DATA),
        "model": model_name,
        "data": eval_set.source,
        "batch_size": batch_size,
    }

    log_path = results_log_path(output) if output is not None else None
    done: dict[str, dict] = {}
    if log_path is not None and log_path.exists():
        done = _read_log(log_path, settings)
        unknown = [key for key in done if full_set.index_of(key) is None]
        if unknown:
            raise ValueError(
                f"{log_path} has results for ids not in the data (e.g. {unknown[:3]}); it belongs to "
                "other data. Choose another --output."
            )
    elif log_path is not None:
        if Path(output).exists():  # results whose log is gone: never overwrite them
            raise ValueError(
                f"{output} exists but its per-example log {log_path} does not, so the run cannot resume; move "
                f"{output} away or choose another --output."
            )
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(json.dumps({"format": RESULTS_FORMAT, "settings": settings}) + "\n", encoding="utf-8")

    todo = [row for row in range(len(eval_set)) if str(eval_set.ids[row]) not in done]
    if done and todo:
        logger.info("Resuming %s: %d of %d examples already done", log_path, len(eval_set) - len(todo), len(eval_set))
    generator = _Generator(model, processor, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        _run(task, eval_set, support_set, todo, generator, settings, done, log_path, batch_size, progress)
    finally:
        model.train(was_training)

    records = [done[str(example_id)] for example_id in eval_set.ids]
    metrics = _aggregate(task, eval_set, records)
    result = {"task": task, "metrics": metrics, "settings": settings, "examples": records}
    if output is not None:
        result["results_log"] = str(log_path)
        _write_json_atomically(Path(output), result)
    return result


def _run(task, eval_set, support_set, todo, generator, settings, done, log_path, batch_size, progress) -> None:
    from tqdm.auto import tqdm

    shots, seed, template = settings["shots"], settings["seed"], settings["prompt_template"]
    exclude_query = settings["support"] == SUPPORT_FROM_DATA
    bar = tqdm(
        total=len(eval_set), initial=len(eval_set) - len(todo), desc=f"{task} {shots}-shot", disable=not progress
    )
    log = open(log_path, "a", encoding="utf-8") if log_path is not None else None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts, images, support_rows = [], [], []
            for row in batch:
                rows = draw_support(
                    support_set, shots, seed, eval_set.ids[row], eval_set.image_keys[row], exclude_query
                )
                shot_pairs = [(support_set.prompts[r], support_set.targets[r]) for r in rows]
                prompts.append(build_prompt(task, eval_set.prompts[row], shot_pairs, template))
                images.append([support_set.image(r) for r in rows] + [eval_set.image(row)])
                support_rows.append(rows)
            answers = generator(prompts, images)
            for row, prompt, answer, rows in zip(batch, prompts, answers, support_rows):
                record = _record(task, eval_set, row, prompt, answer, [support_set.ids[r] for r in rows])
                done[str(record["id"])] = record
                if log is not None:
                    log.write(json.dumps(record, ensure_ascii=False) + "\n")
            if log is not None:
                log.flush()
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
        help="evaluation data: folder(s) in the original layout, a save_to_disk folder, or a "
        "datasets.load_dataset name/folder",
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = args.output or f"eval-{args.task}-{args.shots}shot.json"
    data = args.data if len(args.data) > 1 else args.data[0]
    support = None if args.support is None else (args.support if len(args.support) > 1 else args.support[0])
    if args.task == "caption":
        from .caption_metrics import CaptionMetricsUnavailable, check_caption_requirements

        try:
            check_caption_requirements()
        except CaptionMetricsUnavailable as error:
            print(f"error: {error}")
            return 2
    model, processor = load_model_and_processor(args.model, device=args.device, dtype=args.dtype)
    try:
        result = evaluate(
            args.task,
            model,
            processor,
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
        )
    except (ValueError, FileNotFoundError) as error:  # bad data or settings: the message says what to fix
        print(f"error: {error}")
        return 2
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


__all__ = ["build_prompt", "clean_generation", "evaluate", "load_model_and_processor", "results_log_path"]
