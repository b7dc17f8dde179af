"""Batches for MAGMA training: an image's tokens, one of its captions, end-of-text; the original's loss."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
# Keys the collator adds for MagmaTrainer when `report_skips` is on (the Trainer removes them before the forward).
SKIPPED_KEY = "magma_num_skipped"
SKIPPED_IMAGES_KEY = "magma_skipped_images"  # what each skipped sample was (its key or image path), for an error
SKIPPED_REASONS_KEY = "magma_skip_reasons"  # and why it was skipped
EMPTY_KEY = "magma_empty_batch"


@dataclass
class MagmaDataCollator:
    """Turn rows of an image-caption dataset (see `magma_hf.data`) into MAGMA's training inputs.

    Each sample becomes `[<|image|>] * n_image_tokens + caption + [eos]`, the layout of the original MAGMA training and
    of [`MagmaProcessor`] for a caption prompt. Labels are `-100` on the image tokens and on padding; the caption's
    tokens and its first end-of-text count, as in the original's `build_labels` (the model shifts them inside).

    Padding is on the right: every sample's tokens then sit at positions `0..len-1`, the positions GPT-J sees for the
    same sample alone and at generation, so no `position_ids` are needed (left padding would shift them unless
    position ids were computed from the attention mask).

    Truncation only ever shortens the caption: at most `max_length - n_image_tokens` caption tokens are kept, the
    end-of-text included when it fits (as the original, which cut the padded caption to the room left by the image).

    Rows whose `image` is `None` (undecodable, see `magma_hf.data`), that carry a `problem` (a streamed sample that
    cannot be used: `magma_hf.data.streaming`) or whose image fails preprocessing are skipped (one warning each; with
    `report_skips` the batch says how many, which and why); the batch is then smaller. A batch with
    nothing left becomes a placeholder of one blank image whose labels are all `-100`, flagged for [`MagmaTrainer`],
    which turns its loss into an exact zero (every process still runs forward and backward, which distributed
    training needs).

    Args:
        processor ([`MagmaProcessor`]): Image preprocessing, tokenizer, image token and image-token count.
        max_length (`int`, defaults to 2048): Longest sequence, image tokens included (GPT-J's context).
        caption_choice (`str`, defaults to `"random"`): `"random"` picks one caption per sample with Python's `random`
            (whose state Trainer checkpoints save and restore), `"first"` always the first (deterministic evaluation).
        blind (`bool`, defaults to `False`): Zero `pixel_values` (MAGMA's `run_blind` baseline: the image carries no
            information).
        pad_to_multiple_of (`int`, *optional*): Pad the sequence length to a multiple of this.
        report_skips (`bool`, defaults to `False`): Add `magma_num_skipped` / `magma_skipped_images` /
            `magma_skip_reasons` / `magma_empty_batch` entries to each batch for [`MagmaTrainer`] (which counts skips
            across dataloader workers and processes, and stops a run that skips too many).

    `__call__` returns `pixel_values` `[b, 3, s, s]` and `input_ids`, `attention_mask`, `labels`, each `[b, seq]`.
    """

    processor: object
    max_length: int = 2048
    caption_choice: str = "random"
    blind: bool = False
    pad_to_multiple_of: int | None = None
    report_skips: bool = False

    def __post_init__(self):
        if self.caption_choice not in ("random", "first"):
            raise ValueError(f"caption_choice must be 'random' or 'first', got {self.caption_choice!r}")
        self.num_image_tokens = self.processor.num_image_tokens
        if self.max_length <= self.num_image_tokens:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed the {self.num_image_tokens} image tokens of an image: "
                "the caption needs at least one position"
            )
        tokenizer = self.processor.tokenizer
        self.image_token_id = self.processor.image_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("The tokenizer has no eos token: MAGMA ends every caption with it")

    def _pixel_values(self, sample: dict) -> torch.Tensor | None:
        image = sample.get("image")
        where = sample.get("image_path") or "sample"
        if image is None:
            return None  # magma_hf.data warned when it failed to decode
        try:
            return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        except Exception as error:  # an image PIL opened but preprocessing cannot take (odd modes, zero size, ...)
            logger.warning(f"Skipping sample: cannot preprocess image {where}: {type(error).__name__}: {error}")
            return None

    def _tokenize(self, captions: list[str]) -> list[list[int]]:
        # Caption text is text: a literal "<|image|>" or "<|endoftext|>" in it must not become a special token.
        encoded = self.processor.tokenizer(captions, add_special_tokens=False, split_special_tokens=True)
        room = self.max_length - self.num_image_tokens
        return [(ids + [self.eos_token_id])[:room] for ids in encoded["input_ids"]]

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values, captions = [], []
        skipped, skipped_images, reasons = 0, [], []
        for sample in samples:
            problem = sample.get("problem")
            if problem:  # a streamed row says why it cannot be used; nothing else warned about it
                logger.warning(f"Skipping sample {sample.get('key') or sample.get('image_path')}: {problem}")
            values = None if problem else self._pixel_values(sample)
            if values is None:
                skipped += 1
                skipped_images.append(sample.get("key") or sample.get("image_path") or "an image stored as bytes")
                reasons.append(problem or "cannot decode or preprocess")
                continue
            pixel_values.append(values)
            choices = sample["captions"]
            captions.append(choices[0] if self.caption_choice == "first" else random.choice(choices))
        empty = not pixel_values
        if empty:
            size = self.processor.image_processor.crop_size
            pixel_values = [torch.zeros(3, size["height"], size["width"])]
            text_ids = [[self.eos_token_id]]
        else:
            text_ids = self._tokenize(captions)
        batch = self._pad(text_ids, ignore_all_labels=empty)
        batch["pixel_values"] = torch.stack(pixel_values)
        if self.blind:
            batch["pixel_values"] = torch.zeros_like(batch["pixel_values"])
        if self.report_skips:
            batch.update({SKIPPED_KEY: skipped, SKIPPED_IMAGES_KEY: skipped_images, SKIPPED_REASONS_KEY: reasons})
            batch[EMPTY_KEY] = empty
        return batch

    def _pad(self, text_ids: list[list[int]], ignore_all_labels: bool) -> dict[str, torch.Tensor]:
        lengths = [self.num_image_tokens + len(ids) for ids in text_ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(text_ids), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(text_ids), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(text_ids), width), dtype=torch.long)
        for row, (ids, length) in enumerate(zip(text_ids, lengths)):
            ids = torch.tensor(ids, dtype=torch.long)
            input_ids[row, : self.num_image_tokens] = self.image_token_id
            input_ids[row, self.num_image_tokens : length] = ids
            attention_mask[row, :length] = 1
            if not ignore_all_labels:
                labels[row, self.num_image_tokens : length] = ids
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


__all__ = ["MagmaDataCollator"]
