"""MagmaImageProcessor against the original torchvision preprocessing, and MagmaProcessor's prompt layout."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from magma_hf import MagmaImageProcessor, MagmaProcessor
from tests.helpers import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE,
    make_tokenizer,
    original_preprocess,
    photo_variants,
    random_image,
    sample_photos,
)


def test_image_processor_reproduces_the_original_preprocessing_on_photographs():
    processor = MagmaImageProcessor()
    for image in photo_variants():
        ours = processor(image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == (3, 384, 384)
        assert np.abs(ours - original_preprocess(image)).max() <= 1e-5, image.size


def test_image_size_argument_sets_resize_and_crop():
    processor = MagmaImageProcessor(image_size=64)
    image = sample_photos()[0]
    ours = processor(image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == (3, 64, 64)
    assert np.abs(ours - original_preprocess(image, 64)).max() <= 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1"])
def test_other_image_modes_become_rgb(mode):
    source = random_image(0, size=(90, 70))
    image = source.convert(mode)
    pixel_values = MagmaImageProcessor(image_size=64)(image, return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64) and np.isfinite(pixel_values).all()
    if mode in ("L", "1", "LA"):  # gray stays gray: the three channels agree once normalisation is undone
        rgb = pixel_values[0] * np.array(CLIP_STD)[:, None, None] + np.array(CLIP_MEAN)[:, None, None]
        assert np.abs(rgb[0] - rgb[1]).max() < 1e-5 and np.abs(rgb[1] - rgb[2]).max() < 1e-5
    if mode in ("P", "CMYK"):  # the same as converting to RGB first
        expected = original_preprocess(image.convert("RGB"), 64)
        assert np.abs(pixel_values[0] - expected).max() <= 1e-5


WHITE = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
BLACK = -np.array(CLIP_MEAN) / np.array(CLIP_STD)


@pytest.mark.parametrize("size", [(96, 80), (80, 64)])  # resized (96x80 -> 77x64), and already at size: no resize
def test_transparent_pixels_are_white_where_the_original_showed_black_or_the_hidden_colour(size):
    """The documented difference: RGBA is composited over white here; the original dropped the alpha after resizing."""
    array = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    array[..., 0] = 255  # red everywhere, hidden under alpha 0 on the left half
    array[:, size[0] // 2 :, 3] = 255
    image = Image.fromarray(array, mode="RGBA")
    ours = MagmaImageProcessor(image_size=64)(image, return_tensors="np")["pixel_values"][0]
    original = original_preprocess(image, 64)
    assert np.allclose(ours[:, 32, 2], WHITE, atol=1e-5)  # transparent: white
    red = (np.array([1.0, 0.0, 0.0]) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(ours[:, 32, 60], red, atol=1e-5) and np.allclose(original[:, 32, 60], red, atol=1e-5)
    hidden = BLACK if size == (96, 80) else red  # Pillow resizes RGBA premultiplied: transparent turns black
    assert np.allclose(original[:, 32, 2], hidden, atol=1e-5)


def test_palette_and_bilevel_images_are_resized_bicubic_where_the_original_used_nearest():
    for mode in ("P", "1"):
        image = random_image(3, size=(90, 70)).convert(mode)
        ours = MagmaImageProcessor(image_size=64)(image, return_tensors="np")["pixel_values"][0]
        assert np.abs(ours - original_preprocess(image.convert("RGB"), 64)).max() <= 1e-5  # bicubic on RGB
        nearest = T.Resize(64, interpolation=T.InterpolationMode.NEAREST_EXACT)(image.convert("RGB"))
        assert np.abs(original_preprocess(image, 64) - original_preprocess(nearest, 64)).max() <= 1e-5, mode
        assert np.abs(ours - original_preprocess(image, 64)).max() > 0.5  # far apart on a noisy image


def test_number_of_image_tokens_comes_from_the_crop_size(tokenizer):
    for size, expected in [(64, 4), (384, 144), (224, 49)]:
        processor = MagmaProcessor(image_processor=MagmaImageProcessor(image_size=size), tokenizer=tokenizer)
        assert processor.num_image_tokens == expected
        ids = processor(images=[random_image(0)], text=["a cat"]).input_ids[0]
        assert ids[:expected] == [processor.image_token_id] * expected and ids[expected] != processor.image_token_id


def test_tokenizer_without_image_token_is_a_clear_error():
    plain = make_tokenizer(with_image_token=False)
    assert IMAGE not in plain.get_vocab()
    with pytest.raises(ValueError, match=r"has no '<\|image\|>' token"):
        MagmaProcessor(image_processor=MagmaImageProcessor(image_size=64), tokenizer=plain)


def test_text_without_placeholder_gets_its_images_in_front(processor):
    image_id, n = processor.image_token_id, processor.num_image_tokens
    text_ids = processor.tokenizer("a photo of", add_special_tokens=False).input_ids
    single = processor(images=[random_image(0)], text="a photo of").input_ids[0]
    assert single == [image_id] * n + text_ids
    two_images = processor(images=[random_image(0), random_image(1)], text=["a photo of"]).input_ids[0]
    assert two_images == [image_id] * (2 * n) + text_ids
    nested = processor(images=[[random_image(0)], [random_image(1), random_image(2)]], text=["a", "b"], padding=True)
    assert [row.count(image_id) for row in nested.input_ids] == [n, 2 * n]
    captions = processor(images=[random_image(0), random_image(1)], padding=True).input_ids
    assert captions == [[image_id] * n, [image_id] * n]


def test_each_placeholder_is_one_image_in_order(processor):
    image_id, n = processor.image_token_id, processor.num_image_tokens
    out = processor(
        images=[random_image(0), random_image(1), random_image(2)],
        text=[f"a cat {IMAGE} and a dog {IMAGE}", f"{IMAGE} a house"],
        return_tensors="pt",
        padding=True,
    )
    assert out.pixel_values.shape == (3, 3, 64, 64)
    first = out.input_ids[0][out.attention_mask[0].bool()].tolist()
    cat = processor.tokenizer("a cat ", add_special_tokens=False).input_ids
    assert first[: len(cat)] == cat and first[len(cat) : len(cat) + n] == [image_id] * n
    assert first[-n:] == [image_id] * n
    assert (out.input_ids == image_id).sum(1).tolist() == [2 * n, n]
    expected = MagmaImageProcessor(image_size=64)(random_image(2), return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(out.pixel_values[2], expected)


def test_placeholder_and_image_counts_must_match(processor):
    with pytest.raises(ValueError, match=r"Found total 2 <\|image\|> tokens and 1 images"):
        processor(images=[random_image(0)], text=[f"{IMAGE} and {IMAGE}"])
    with pytest.raises(ValueError, match="Found 1 <\\|image\\|> tokens in the text but no images"):
        processor(text=[f"{IMAGE} a cat"])
    with pytest.raises(ValueError, match="Got 3 images for 2 texts"):
        processor(images=[random_image(0), random_image(1), random_image(2)], text=["a", "b"])


def test_truncation_never_cuts_image_tokens(processor):
    n = processor.num_image_tokens
    kept = processor(images=[random_image(0)], text=["a photo of a cat on a sofa"], truncation=True, max_length=n + 2)
    assert kept.input_ids[0][:n] == [processor.image_token_id] * n and len(kept.input_ids[0]) == n + 2
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        processor(images=[random_image(0)], text=["a photo"], truncation=True, max_length=n - 1)


def test_batches_pad_on_the_left(processor):
    out = processor(
        images=[random_image(0), random_image(1)],
        text=["a", "a much longer prompt than this"],
        return_tensors="pt",
        padding=True,
    )
    mask = out.attention_mask
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert (out.input_ids[0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = MagmaProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == processor.num_image_tokens and loaded.image_token_id == processor.image_token_id
    assert loaded.tokenizer.padding_side == "left"
    inputs = dict(images=[random_image(0)], text=["a photo"], return_tensors="pt")
    torch.testing.assert_close(loaded(**inputs).pixel_values, processor(**inputs).pixel_values, rtol=0, atol=0)
    assert loaded(**inputs).input_ids.tolist() == processor(**inputs).input_ids.tolist()
