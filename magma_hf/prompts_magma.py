"""MAGMA's prompt layout, flat so that a saved folder's code (the app of a Space) builds prompts as the package does.

Images sit where their `<|image|>` placeholders are; a text without placeholders gets its images in front (the
processor's rule, `place_images_in_front`). Few-shot examples come first, each an image, its text and a newline, then
the query: `<|image|>example 1\\n<|image|>example 2\\n<|image|>query`. The newline ends an example as it ends a
generated answer (`magma_hf.generation.ANSWER_END` is this separator), so the examples show the model where an answer
ends. The evaluation harness (`magma_hf.evaluation.prompts.build_prompt`) and the app (`app_magma.py`) both build their
prompts here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .processing_magma import IMAGE_TOKEN, place_images_in_front

EXAMPLE_SEPARATOR = "\n"  # ends each few-shot example (and each generated answer)
QA_TEMPLATE = "Q: {question} A:"


def few_shot_prompt(example_texts: Sequence[str], query: str) -> str:
    """One `<|image|>` + text + newline per example (in order), then `query`, which carries its own placeholders."""
    return "".join(IMAGE_TOKEN + text + EXAMPLE_SEPARATOR for text in example_texts) + query


def query_with_images(prompt: str, n_images: int) -> str:
    """`prompt` with its `n_images` images placed: at its `<|image|>` placeholders, or in front where it has none.

    Raises `ValueError` when the prompt has placeholders and their number is not `n_images`."""
    placeholders = prompt.count(IMAGE_TOKEN)
    if placeholders and placeholders != n_images:
        raise ValueError(
            f"The prompt has {placeholders} {IMAGE_TOKEN} placeholder{'s' * (placeholders != 1)} and {n_images} "
            f"image{'s' * (n_images != 1)} go with it: give one image per {IMAGE_TOKEN}, or no {IMAGE_TOKEN} to put "
            "the images in front"
        )
    return place_images_in_front(prompt, n_images)


__all__ = ["EXAMPLE_SEPARATOR", "QA_TEMPLATE", "few_shot_prompt", "query_with_images"]
