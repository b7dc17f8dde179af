"""The prompts of evaluation and captioning (the paper's open-ended format), and their generation budgets.

- zero-shot question answering: `<|image|>Q: {question} A:`;
- K-shot: K support examples, each `<|image|>Q: {question} A: {answer}` followed by a newline, then the query, in
  one interleaved sequence: `<|image|>Q: q1 A: a1\\n<|image|>Q: q2 A: a2\\n<|image|>Q: {question} A:`;
- captioning: the image alone (MAGMA's pretraining format: image, then caption), or `<|image|>{caption}\\n` per
  support example before the query image; `prompt_template` sets a caption prompt such as "A picture of".

The newline ends each example because the generated answer is cut at the first newline (and generation stops
there); the few-shot examples thus show the model where an answer ends. `magma-hf caption` builds its prompt here
too: the captioning prompt, `--prompt` as its template.
"""

from __future__ import annotations

from ..processing_magma import IMAGE_TOKEN
from ..prompts_magma import QA_TEMPLATE, few_shot_prompt
from .data import QA_TASKS

DEFAULT_MAX_NEW_TOKENS = {"vqa": 10, "okvqa": 10, "gqa": 10, "caption": 30}


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


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "build_prompt", "example_text", "query_text"]
