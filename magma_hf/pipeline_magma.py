"""MAGMA's `image-text-to-text` pipeline (transformers 5 redirects `image-to-text` to it): captions for images alone,
answers for images with a prompt."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline, ReturnType
from transformers.pipelines.image_text_to_text import logger as stock_pipeline_logger

from .configuration_magma import MagmaConfig
from .hub_magma import config_left_unchanged
from .image_processing_magma import load_image_input
from .processing_magma import check_processor_matches_model, load_images_naming_the_source

# transformers' advice to a prompt that is not a chat, where the processor has a chat template (MAGMA's only turns a
# chat into MAGMA's plain prompt, which is what the pipeline takes).
CHAT_FORMAT_HINT = "The input data was not formatted as a chat"


def _not_the_chat_format_hint(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(CHAT_FORMAT_HINT)


@contextmanager
def chat_format_hint_dropped() -> Iterator[None]:
    """The stock pipeline's hint is dropped during a MAGMA call only (as a `warning_once`, it is then not shown
    for another model in the same process either)."""
    stock_pipeline_logger.addFilter(_not_the_chat_format_hint)
    try:
        yield
    finally:
        stock_pipeline_logger.removeFilter(_not_the_chat_format_hint)


class MagmaImageToTextPipeline(ImageTextToTextPipeline):
    """MAGMA's pipeline for the `image-to-text` and `image-text-to-text` tasks.

    `pipe(image)` captions the image; `pipe(image, text="Q: What is this? A:")` continues the prompt after it.

    Returns `[{"generated_text": ...}]` per input holding only the newly generated text (pass
    `return_full_text=True` to get the prompt in front). Images may be PIL images, paths or URLs, alone or in lists;
    `<|image|>` in the text places several images. Generation follows the model's generation config (from the
    folder's generation_config.json: MAGMA's sampling settings in every folder this project writes); pass
    `generate_kwargs={"do_sample": False}` for greedy captions.

    `import magma_hf` registers this class for `image-text-to-text` in transformers' `PIPELINE_REGISTRY`, which
    replaces the stock class for every model in the process: for a model that is not MAGMA, constructing it gives
    transformers' own `ImageTextToTextPipeline`, so other models keep exactly their pipeline.
    """

    def __new__(cls, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if not is_magma_model(model):
            return ImageTextToTextPipeline(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_processor_matches_model(self.processor, self.model.config, self.model.config.name_or_path)

    def __call__(self, images=None, text=None, **kwargs: Any):
        if images is not None and text is None and self._is_plain_image_batch(images):
            text = [""] * len(images) if isinstance(images, (list, tuple)) else ""
        with chat_format_hint_dropped():
            return super().__call__(images, text=text, **kwargs)

    @staticmethod
    def _is_plain_image_batch(images) -> bool:
        """Images or image lists, as opposed to the `{"images": ..., "text": ...}` dicts the parent also takes."""
        items = images if isinstance(images, (list, tuple)) else [images]
        return all(not isinstance(item, dict) for item in items)

    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        # transformers' `load_images` converts to RGB, which turns 16-bit images white: MAGMA's decoder goes first,
        # and a source that cannot be read is named.
        if isinstance(inputs, dict) and inputs.get("images") is not None:
            images = load_images_naming_the_source(inputs["images"], partial(load_image_input, timeout=timeout))
            inputs = {**inputs, "images": images}
        return super().preprocess(
            inputs, timeout=timeout, continue_final_message=continue_final_message, **processing_kwargs
        )

    def save_pretrained(self, save_directory, **kwargs: Any) -> None:
        """transformers' pipeline saving, which sets `custom_pipelines` on the live model config to write it: left as
        it was (the model's saving writes MAGMA's entries, under both task names)."""
        with config_left_unchanged(self.model.config):
            super().save_pretrained(save_directory, **kwargs)

    def _sanitize_parameters(self, return_full_text=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            return_full_text=return_full_text, **kwargs
        )
        if return_full_text is None and "return_type" not in postprocess_params:
            postprocess_params["return_type"] = ReturnType.NEW_TEXT
        return preprocess_params, forward_params, postprocess_params


def is_magma_model(model) -> bool:
    """Whether `model` is a MAGMA model, the package's class or the one loaded with `trust_remote_code`."""
    return getattr(getattr(model, "config", None), "model_type", None) == MagmaConfig.model_type
