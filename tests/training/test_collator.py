"""MagmaDataCollator: layout, labels (the original's build_labels), padding, truncation, skipped samples."""

import random

import pytest
import torch

from magma_hf.training.collator import EMPTY_KEY, SKIPPED_IMAGES_KEY, SKIPPED_KEY, MagmaDataCollator
from tests.helpers import random_image

N_IMAGE = 4  # 64 px / 32 = 2 x 2 image tokens


def sample(seed, *captions):
    return {"image": random_image(seed), "captions": list(captions), "image_path": f"img{seed}.png"}


def original_build_labels(captions: torch.Tensor, n_image: int, eos: int) -> torch.Tensor:
    """The original `build_labels` (magma/utils.py) on right-padded captions: -100 for the image, the caption up to
    and including its first eos, -100 after."""
    labels = torch.cat([torch.full((captions.shape[0], n_image), -100), captions[:, :-n_image]], dim=1)
    for label in labels:
        for k, token in enumerate(label):
            if token == eos:
                label[k + 1 :] = -100
                break
    return labels


def test_layout_labels_and_padding(processor):
    tokenizer = processor.tokenizer
    collator = MagmaDataCollator(processor, max_length=64)
    captions = ["a photo of a cat", "a dog running on the beach with a ball"]
    batch = collator([sample(0, captions[0]), sample(1, captions[1])])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    eos, image = tokenizer.eos_token_id, processor.image_token_id
    for row, caption in enumerate(captions):
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        length = N_IMAGE + len(ids) + 1
        # image tokens first, then the caption, then eos: what the processor builds for a caption prompt, plus eos
        prompt = processor(images=random_image(row), text=caption, return_tensors="pt")["input_ids"][0].tolist()
        assert batch["input_ids"][row, :length].tolist() == prompt + [eos]
        assert batch["input_ids"][row, :N_IMAGE].tolist() == [image] * N_IMAGE
        # right padding: positions 0..length-1 are the sample's own
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert batch["labels"][row, :length].tolist() == [-100] * N_IMAGE + ids + [eos]
        assert (batch["labels"][row, length:] == -100).all()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
    # the same labels as the original's build_labels on captions padded with eos to a fixed length
    padded = torch.full((2, 64), eos)
    for row, caption in enumerate(captions):
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        padded[row, : len(ids)] = torch.tensor(ids)
    original = original_build_labels(padded, N_IMAGE, eos)[:, : batch["labels"].shape[1]]
    assert torch.equal(batch["labels"], original)


def test_loss_counts_caption_and_first_eos(model, processor):
    collator = MagmaDataCollator(processor, max_length=64)
    batch = collator([sample(0, "a photo of a cat"), sample(1, "two people riding bicycles")])
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits[:, :-1].flatten(0, 1)
    targets = batch["labels"][:, 1:].flatten()
    counted = targets != -100
    assert int(counted.sum()) == sum(
        len(processor.tokenizer(c)["input_ids"]) + 1 for c in ["a photo of a cat", "two people riding bicycles"]
    )
    expected = torch.nn.functional.cross_entropy(logits[counted], targets[counted])
    torch.testing.assert_close(output.loss, expected)


def test_truncation_never_cuts_image_tokens(processor):
    eos = processor.tokenizer.eos_token_id
    caption = "a dog running on the beach with a ball"
    ids = processor.tokenizer(caption, add_special_tokens=False)["input_ids"]
    batch = MagmaDataCollator(processor, max_length=N_IMAGE + 3)([sample(0, caption)])
    assert batch["input_ids"].tolist() == [[processor.image_token_id] * N_IMAGE + ids[:3]]
    assert batch["labels"].tolist() == [[-100] * N_IMAGE + ids[:3]]
    fits = MagmaDataCollator(processor, max_length=N_IMAGE + len(ids) + 1)([sample(0, caption)])
    assert fits["input_ids"][0, -1] == eos
    with pytest.raises(ValueError, match="must exceed the 4 image tokens"):
        MagmaDataCollator(processor, max_length=N_IMAGE)


def test_special_tokens_in_captions_stay_text(processor):
    batch = MagmaDataCollator(processor, max_length=128)([sample(0, "a <|image|> and <|endoftext|> here")])
    text = batch["input_ids"][0, N_IMAGE:]
    assert processor.image_token_id not in text.tolist()
    assert text.tolist().count(processor.tokenizer.eos_token_id) == 1  # only the one the collator appends


def test_caption_choice(processor):
    captions = ["a photo of a cat", "a dog running"]
    first = MagmaDataCollator(processor, caption_choice="first")
    random_choice = MagmaDataCollator(processor)
    seen_first = {first([sample(0, *captions)])["input_ids"].shape[1] for _ in range(10)}
    assert len(seen_first) == 1
    random.seed(0)
    seen = {tuple(random_choice([sample(0, *captions)])["labels"][0].tolist()) for _ in range(30)}
    assert len(seen) == 2
    with pytest.raises(ValueError, match="caption_choice"):
        MagmaDataCollator(processor, caption_choice="longest")


def test_blind_zeroes_images(processor):
    batch = MagmaDataCollator(processor, blind=True)([sample(0, "a photo of a cat")])
    assert batch["pixel_values"].abs().sum() == 0
    assert (batch["input_ids"][0, :N_IMAGE] == processor.image_token_id).all()


def test_undecodable_samples_are_skipped(processor):
    collator = MagmaDataCollator(processor, report_skips=True)
    bad = {"image": None, "captions": ["never paired"], "image_path": "bad.jpg"}
    batch = collator([bad, sample(1, "a dog running"), bad])
    assert batch["input_ids"].shape[0] == batch["pixel_values"].shape[0] == 1
    expected = processor.tokenizer("a dog running", add_special_tokens=False)["input_ids"]
    assert batch["labels"][0, N_IMAGE:].tolist()[: len(expected)] == expected
    assert batch[SKIPPED_KEY] == 2 and batch[EMPTY_KEY] is False
    empty = collator([bad])
    assert empty[EMPTY_KEY] is True and empty["pixel_values"].shape[0] == 1
    assert (empty["labels"] == -100).all()
    assert empty[SKIPPED_KEY] == 1 and empty[SKIPPED_IMAGES_KEY] == ["bad.jpg"]
