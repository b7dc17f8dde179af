"""Greedy answers from vLLM's offline engine, cleaned up exactly as `magma_hf.generation` cleans up `generate`'s.

The caption command's `--engine vllm` calls `VllmGenerator`; the offline `LLM` starts processes, so a script that
uses it needs an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from transformers import GenerationConfig

from ..generation import ANSWER_END, decode_answers, stop_token_ids
from ..processing_magma import MagmaProcessor


class VllmGenerator:
    """`VllmGenerator(model_dir, max_new_tokens, **llm_kwargs)(prompts, images)`: one answer per prompt, greedy.

    The answers are those of `magma_hf.generation.generate_answers` on the transformers model: each prompt's
    `<|image|>` marks where its images go (without one, they go in front), generation stops at the first newline,
    and the continuation is cut at end-of-text, decoded by the processor (image tokens dropped) and its first line kept.

    Args:
        model_dir: A MAGMA folder (the converter's or `save_pretrained`'s).
        max_new_tokens: The generation budget of each answer.
        llm_kwargs: Passed to `vllm.LLM` (e.g. `dtype`, `tensor_parallel_size`, `limit_mm_per_prompt`).
    """

    def __init__(self, model_dir: str, max_new_tokens: int, **llm_kwargs):
        from vllm import LLM, SamplingParams

        self.processor = MagmaProcessor.from_pretrained(model_dir)
        # The ids that end an answer, as for the transformers model: its generation config's, else the tokenizer's.
        engine = SimpleNamespace(generation_config=_generation_config(model_dir))
        self.stop_ids = stop_token_ids(engine, self.processor.tokenizer)
        self.llm = LLM(model=str(model_dir), **llm_kwargs)
        # Greedy, stopping where the answer ends; the clean-up below cuts at end-of-text and the first line anyway.
        self.sampling_params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, stop=[ANSWER_END], skip_special_tokens=False
        )

    def __call__(self, prompts: list[str], images: list[list]) -> list[str]:
        """`prompts[i]` with the PIL images `images[i]` (an empty list for none) -> its answer."""
        if len(images) != len(prompts):
            raise ValueError(f"VllmGenerator got {len(prompts)} prompts and {len(images)} image lists: give one each")
        requests = [self._request(prompt, sample_images) for prompt, sample_images in zip(prompts, images)]
        outputs = self.llm.generate(requests, self.sampling_params, use_tqdm=False)
        continuations = [list(output.outputs[0].token_ids) for output in outputs]
        return decode_answers(self.processor, continuations, self.stop_ids)

    @staticmethod
    def _request(prompt: str, images: Sequence) -> dict:
        request = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": list(images)}
        return request


def _generation_config(model_dir: str) -> GenerationConfig:
    """The folder's generation config; transformers' defaults (no end-of-text id) where it has none."""
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig()


__all__ = ["VllmGenerator"]
